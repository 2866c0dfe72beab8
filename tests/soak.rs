//! Soak: mixed pgbench load (TPC-B-like writes, select-only reads, and a
//! script of explicit transactions, all with prepared statements) through
//! the pgmux binary over a primary and 2 replicas, for `SOAK_SECONDS`
//! (60 by default; `SOAK_SECONDS=600` for the 10-minute run). Checked:
//! zero failed transactions, server connections within the pools and not
//! growing, RSS stable (start and end printed), and every server
//! connection PostgreSQL sees listed by SHOW SERVERS.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{replicated, rows, APP};

const SCRIPT: &str = "\\set aid random(1, 100000 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
COMMIT;
";

#[test]
fn soak_mixed_load_over_replicas() {
    let seconds: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let c = replicated::cluster();
    let dir = tempfile::tempdir().unwrap();
    let cfg = replicated::config(&c, "", "").replacen(
        "log_level = \"warn\"\n",
        "log_level = \"warn\"\nadmin_users = [\"app\"]\n",
        1,
    );
    let port = support::listen_port(&cfg);
    let path = dir.path().join("pgmux.toml");
    std::fs::write(&path, &cfg).unwrap();
    let script = dir.path().join("txn.sql");
    std::fs::write(&script, SCRIPT).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgmux")).arg("--config").arg(&path).spawn().unwrap();
    let pid = child.id();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let url = |db: &str| support::conn_str(port, APP.0, APP.1, db);
        let admin = support::connect_when_up(&url("pgmux")).await.expect("pgmux up");
        let pgbench = |args: &[&str]| {
            let mut cmd = Command::new("pgbench");
            cmd.env("PGPASSWORD", APP.1).args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP.0]).args(args);
            cmd.arg("app");
            cmd
        };
        let init = pgbench(&["-i", "-s", "2", "-q"]).output().unwrap();
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        let seconds_arg = seconds.to_string();
        let script_arg = format!("{}@2", script.display());
        let mut load = pgbench(&[
            "-c", "12", "-j", "2", "-T", &seconds_arg, "-M", "prepared", "-n",
            "-b", "tpcb-like@1", "-b", "select-only@5", "-f", &script_arg,
        ]);
        let load = std::thread::spawn(move || load.output().unwrap());
        tokio::time::sleep(Duration::from_secs((seconds / 6).max(5))).await;
        let (rss_start, servers_start) = (support::rss_kib(pid), rows(&admin, "SHOW SERVERS").await.len());
        let out = tokio::task::spawn_blocking(move || load.join().unwrap()).await.unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("number of failed transactions: 0"), "{text}");
        let (rss_end, servers) = (support::rss_kib(pid), rows(&admin, "SHOW SERVERS").await);
        // 3 pools (primary, 2 replicas) of 4: never more, and no growth.
        assert!(servers.len() <= 12 && servers.len() <= servers_start.max(1) + 3, "{servers_start} -> {}", servers.len());
        assert!(rss_end <= rss_start + rss_start / 2 + 4096, "RSS {rss_start} KiB -> {rss_end} KiB");
        // Every server connection PostgreSQL sees is in SHOW SERVERS.
        let mut seen = 0usize;
        for node in std::iter::once(&c.primary).chain(&c.replicas) {
            let n = c
                .psql(node, "postgres", "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND datname = 'app' AND application_name <> 'pgmux-monitor'")
                .unwrap();
            seen += n.parse::<usize>().unwrap();
        }
        let pids: Vec<_> = servers.iter().map(|r| r[5].clone()).collect();
        assert_eq!(seen, pids.len(), "PostgreSQL sees {seen}, SHOW SERVERS lists {pids:?}");
        let tps = text.lines().find_map(|l| l.strip_prefix("tps = ")?.split_whitespace().next().map(str::to_string));
        let xacts = text.lines().find_map(|l| l.strip_prefix("number of transactions actually processed: ").map(str::to_string));
        format!(
            "{seconds}s mixed pgbench (-M prepared, 12 clients): {} transactions, tps {}, 0 failed; server connections {servers_start} -> {}; RSS {rss_start} KiB -> {rss_end} KiB",
            xacts.unwrap_or_default(),
            tps.unwrap_or_default(),
            servers.len()
        )
    });
    println!("soak: {report}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
