//! Driver compatibility: real client drivers (psycopg 3, asyncpg, pgjdbc,
//! node-postgres) run unchanged through pgmux in transaction mode with a
//! pool of 2 for 6–8 concurrent clients, so their named prepared statements
//! must follow each client from one server connection to another.
//!
//! The programs live in tests/drivers/ (tests/drivers/install.sh installs
//! the drivers). Each reads PGMUX_HOST/PORT/USER/PASSWORD/DB, asserts on
//! every result and ends with "OK rows=N pids=K"; a missing driver or
//! toolchain fails the test.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{backends, scalar, APP};
use tokio::process::Command;

/// Transaction mode (the default) with fewer server connections than clients.
const POOL: &str = "default_pool_size = 2";
const POOL_SIZE: i64 = 2;
const TIMEOUT: Duration = Duration::from_secs(120);
const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Tables every driver program works on.
const SCHEMA: &str = "
    CREATE TABLE items (client int NOT NULL, n int NOT NULL, label text NOT NULL, PRIMARY KEY (client, n));
    GRANT ALL ON items TO PUBLIC;";

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Run one program to completion (or TIMEOUT); panics with its output
/// unless it exits 0. Returns its stdout.
async fn run(what: &str, mut cmd: Command) -> String {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!("{what}: cannot start {cmd:?}: {e} (run tests/drivers/install.sh to install the drivers)")
    });
    let started = Instant::now();
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after {TIMEOUT:?}; killed"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}) after {:.1?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status,
        started.elapsed()
    );
    eprintln!("{what}: ok in {:.1?}", started.elapsed());
    stdout
}

/// A fresh database with the schema, pgmux (POOL) in front of it, the
/// driver program `cmd` run against it, then the checks every driver
/// shares.
async fn driver_test(prefix: &str, mut cmd: Command) {
    let db = support::fresh_db(prefix);
    let direct = support::direct(&db).await;
    direct.batch_execute(SCHEMA).await.expect("create schema");
    let p = support::proxy(&db, POOL).await;

    let sampler = support::BackendSampler::start(&db);

    cmd.env("PGMUX_HOST", "127.0.0.1")
        .env("PGMUX_PORT", p.addr.port().to_string())
        .env("PGMUX_USER", APP.0)
        .env("PGMUX_PASSWORD", APP.1)
        .env("PGMUX_DB", &db)
        .current_dir(drivers_dir());
    let stdout = run(prefix, cmd).await;
    let max_seen = sampler.stop().await;

    // "OK rows=N pids=K": what the driver committed, and how many server
    // connections (backend pids) its clients ran on.
    let summary =
        stdout.lines().rev().find(|l| l.starts_with("OK ")).unwrap_or_else(|| panic!("no OK line:\n{stdout}"));
    let field = |k: &str| -> i64 {
        summary
            .split_whitespace()
            .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k}= in {summary:?}"))
    };
    assert_eq!(scalar(&direct, "SELECT count(*) FROM items").await, field("rows").to_string(), "{summary}");
    let pids = field("pids");
    assert!((1..=POOL_SIZE).contains(&pids), "clients ran on {pids} server connections: {summary}");
    let max = max_seen;
    assert!(max <= POOL_SIZE, "pg_stat_activity showed {max} pgmux connections during the run");
    let now = backends(&direct, &db).await;
    assert!((1..=POOL_SIZE).contains(&now), "pgmux holds {now} server connections at the end");
    p.stop().await;
}

/// `program args...`; `driver_test` adds the environment and directory.
fn command(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg() {
    driver_test("drv_psycopg", command("python3", &["psycopg_test.py"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg() {
    driver_test("drv_asyncpg", command("python3", &["asyncpg_test.py"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc() {
    let jar = Path::new(PGJDBC_JAR);
    assert!(
        jar.is_file(),
        "{PGJDBC_JAR} missing: run tests/drivers/install.sh (Debian package libpostgresql-jdbc-java)"
    );
    let classes = tempfile::tempdir().expect("temp dir");
    let dir = classes.path().to_str().expect("utf-8 temp path");
    let mut javac = command("javac", &["-cp", PGJDBC_JAR, "-d", dir, "PgjdbcTest.java"]);
    javac.current_dir(drivers_dir());
    run("javac PgjdbcTest.java", javac).await;
    let classpath = format!("{PGJDBC_JAR}:{dir}");
    driver_test("drv_pgjdbc", command("java", &["-cp", &classpath, "PgjdbcTest"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg() {
    let pg = drivers_dir().join("node/node_modules/pg/package.json");
    assert!(pg.is_file(), "{} missing: run tests/drivers/install.sh (npm ci in tests/drivers/node)", pg.display());
    driver_test("drv_node_pg", command("node", &["node/pg_test.js"])).await;
}
