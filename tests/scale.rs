//! Scale: 10,000 idle clients logged in at once plus 200 active ones
//! (pgbench) on one pgmux process with 20 server connections per pool —
//! every client served, no error — and pgmux's memory per idle client,
//! measured from its RSS (printed; fails above the goal, 16 KiB).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgmux::protocol::frame;
use pgmux::protocol::messages as msg;
use support::{APP, TRUSTUSER};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const IDLE: usize = 10_000;
const ACTIVE: usize = 200;

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Log in as the trust user and wait for ReadyForQuery.
async fn idle_client(port: u16, db: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut out = BytesMut::new();
    msg::startup(&mut out, &[("user", TRUSTUSER.0), ("database", db)]);
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    loop {
        match frame::read_message(&mut s, &mut buf, 1 << 20).await {
            Ok((b'Z', _)) => return Ok(s),
            Ok((b'E', body)) => return Err(std::io::Error::other(String::from_utf8_lossy(&body).into_owned())),
            Ok(_) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
}

#[test]
fn ten_thousand_idle_clients_and_two_hundred_active() {
    raise_fd_limit();
    let db = support::fresh_db("scale");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgmux.toml");
    let cfg = support::config_text(&db, "default_pool_size = 20", "").replacen(
        "log_level = \"warn\"\n",
        "log_level = \"warn\"\nmax_client_conn = 11000\n",
        1,
    );
    let port = support::listen_port(&cfg);
    std::fs::write(&path, &cfg).unwrap();
    // PGMUX_BIN: measure another build (e.g. target/release/pgmux).
    let bin = std::env::var("PGMUX_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pgmux").to_string());
    let mut child = Command::new(bin).arg("--config").arg(&path).spawn().unwrap();
    let pid = child.id();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let report = rt.block_on(async {
        let url = support::conn_str(port, APP.0, APP.1, &db);
        let probe = support::connect_when_up(&url).await.expect("pgmux up");
        let pgbench = |args: &[&str]| {
            let mut c = Command::new("pgbench");
            c.env("PGPASSWORD", APP.1).args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP.0]).args(args).arg(&db);
            c
        };
        let init = pgbench(&["-i", "-s", "1", "-q"]).output().unwrap();
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        // A first idle client, so its pool and welcome exist before measuring.
        let first = idle_client(port, &db).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = support::rss_kib(pid);
        let started = Instant::now();
        let mut idle = vec![first];
        for chunk in 0..IDLE.div_ceil(100) {
            let n = (IDLE - 1 - chunk * 100).min(100);
            let batch: Vec<_> = (0..n)
                .map(|_| {
                    let db = db.clone();
                    tokio::spawn(async move { idle_client(port, &db).await })
                })
                .collect();
            for b in batch {
                idle.push(b.await.unwrap().expect("an idle client logged in"));
            }
            if idle.len() >= IDLE {
                break;
            }
        }
        let login_time = started.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = support::rss_kib(pid);
        assert_eq!(idle.len(), IDLE);
        // 200 active clients on top, through 20 server connections.
        let out = pgbench(&["-c", &ACTIVE.to_string(), "-j", "2", "-T", "5", "-S", "-n"]).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("number of failed transactions: 0"), "{text}");
        let tps = text.lines().find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next().map(str::to_string));
        let direct = support::direct(&db).await;
        let servers: i64 = support::scalar(
            &direct,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND usename = '{}'", APP.0),
        )
        .await
        .parse()
        .unwrap();
        assert!(servers <= 20, "{servers} server connections for the active clients");
        // The idle clients are all still there and served.
        assert_eq!(support::scalar(&probe, "SELECT 1").await, "1");
        for s in idle.iter_mut().step_by(IDLE / 20) {
            let mut q = BytesMut::new();
            msg::query(&mut q, "SELECT 1");
            s.write_all(&q).await.unwrap();
            let mut buf = BytesMut::new();
            loop {
                let (tag, _) = frame::read_message(s, &mut buf, 1 << 20).await.unwrap();
                assert_ne!(tag, b'E');
                if tag == b'Z' {
                    break;
                }
            }
        }
        let per_client = (after.saturating_sub(before) as f64) * 1024.0 / IDLE as f64;
        format!(
            "{IDLE} idle clients logged in in {login_time:?}; pgmux RSS {before} KiB -> {after} KiB = {:.1} KiB per idle client; \
             {ACTIVE} active clients: pgbench -S tps {}, 0 failed, {servers} server connections",
            per_client / 1024.0,
            tps.unwrap_or_default()
        )
    });
    println!("scale: {report}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = child.wait();
    let per_client_kib: f64 =
        report.split(" KiB per idle client").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    // The goal is 16 KiB; 8.1–8.2 KiB measured (see README, Reliability),
    // most of it the session's task: a rare path's state kept inline in it
    // (16.9 KiB before those were boxed) fails this.
    assert!(per_client_kib <= 16.0, "{report}");
}
