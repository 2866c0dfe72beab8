//! Scale: 10,000 idle clients logged in at once plus 200 active ones
//! (pgbench) on one pgmux process with 20 server connections per pool —
//! every client served, no error — and pgmux's memory per idle client,
//! measured from its RSS (printed; fails above the goal, 16 KiB), beside
//! PgBouncer's measured the same way in the same run when it is installed.

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

/// `n` idle clients logged in to `port`, 100 at a time; the first failure
/// to log in, with how many did.
async fn idle_clients(port: u16, db: &str, n: usize) -> Result<Vec<TcpStream>, String> {
    let mut idle = Vec::with_capacity(n);
    while idle.len() < n {
        let batch: Vec<_> = (0..(n - idle.len()).min(100))
            .map(|_| {
                let db = db.to_string();
                tokio::spawn(async move { idle_client(port, &db).await })
            })
            .collect();
        for b in batch {
            match b.await {
                Ok(Ok(s)) => idle.push(s),
                Ok(Err(e)) => return Err(format!("login {} of {n} failed: {e}", idle.len() + 1)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok(idle)
}

/// PgBouncer (transaction mode, pool 20, trust for the idle clients' user)
/// in front of `db`, as a daemon: (its pid, its port, its directory).
fn start_pgbouncer(db: &str) -> Option<(u32, u16, tempfile::TempDir)> {
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let dir = tempfile::tempdir().ok()?;
    let port = pgmux_testkit::free_port().ok()?;
    let server = support::cluster().primary.port;
    let (ini, auth, pidfile) = (dir.path().join("pgbouncer.ini"), dir.path().join("users.txt"), dir.path().join("pid"));
    std::fs::write(&auth, format!("\"{}\" \"\"\n", TRUSTUSER.0)).ok()?;
    let text = format!(
        "[databases]\n{db} = host=127.0.0.1 port={server} dbname={db} user={} password={}\n\
         [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\n\
         auth_file = {}\npool_mode = transaction\ndefault_pool_size = 20\nmax_client_conn = 11000\n\
         pidfile = {}\nlogfile = {}\nlog_connections = 0\nlog_disconnections = 0\n",
        APP.0,
        APP.1,
        auth.display(),
        pidfile.display(),
        dir.path().join("log").display()
    );
    std::fs::write(&ini, text).ok()?;
    // A daemon, with room for 11,000 sockets (runuser's PAM session starts
    // from the default limit).
    let run = format!("ulimit -n 16384 && exec {bin} -d {}", ini.display());
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status();
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", &run]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &run]);
        c
    };
    let ok = cmd.status().ok()?.success();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok && Instant::now() < deadline {
        if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse().ok()) {
            return Some((pid, port, dir));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// PgBouncer's RSS per idle client, measured as pgmux's is (a first
/// client, then the rest), or why not.
async fn pgbouncer_per_idle_client(db: &str) -> Result<f64, String> {
    let Some((pid, port, _dir)) = start_pgbouncer(db) else {
        return Err("PgBouncer not installed or not started".into());
    };
    let measured = async {
        let first = idle_client(port, db).await.map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = support::rss_kib(pid);
        // A stalled PgBouncer fails the measurement, not the test.
        let rest = tokio::time::timeout(Duration::from_secs(120), idle_clients(port, db, IDLE - 1))
            .await
            .map_err(|_| "10,000 logins did not finish in 120 s".to_string())??;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = support::rss_kib(pid);
        drop((first, rest));
        Ok::<f64, String>(after.saturating_sub(before) as f64 / IDLE as f64)
    }
    .await;
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    measured
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
        idle.extend(idle_clients(port, &db, IDLE - 1).await.expect("every idle client logged in"));
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
        drop(idle);
        let bouncer = match pgbouncer_per_idle_client(&db).await {
            Ok(kib) => format!("PgBouncer in the same run: {kib:.1} KiB per idle client"),
            Err(why) => format!("PgBouncer not measured: {why}"),
        };
        format!(
            "{IDLE} idle clients logged in in {login_time:?}; pgmux RSS {before} KiB -> {after} KiB = {:.1} KiB per idle client; \
             {ACTIVE} active clients: pgbench -S tps {}, 0 failed, {servers} server connections; {bouncer}",
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
