//! Test harness: one real PostgreSQL cluster per test binary (started on
//! first use, stopped at process exit), a fresh database per test, and a
//! pgmux instance per test on a free loopback port.
#![allow(dead_code)]

pub mod invariants;
pub mod raw;
pub mod replicated;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use pgmux::config::Config;
use pgmux::proxy::{Proxy, RunningProxy};
use pgmux_testkit::{free_port, Cluster, ClusterSpec, HbaMethod, Role};
use tokio_postgres::{Client, NoTls};

pub const APP: (&str, &str) = ("app", "app-secret");
pub const MD5USER: (&str, &str) = ("md5user", "md5-secret");
pub const PWUSER: (&str, &str) = ("pwuser", "pw-secret");
pub const TRUSTUSER: (&str, &str) = ("trustuser", "trust-secret");

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static DB_SEQ: AtomicUsize = AtomicUsize::new(0);

extern "C" fn stop_cluster() {
    if let Some(c) = CLUSTER.get() {
        c.shutdown();
        let _ = std::fs::remove_dir_all(c.root());
    }
}

/// The shared cluster of this test binary (primary only, plus replicas
/// when `PGMUX_TEST_REPLICAS` asks for them).
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let spec = ClusterSpec {
            replicas: 0,
            roles: vec![
                Role::new(APP.0, APP.1, HbaMethod::Scram),
                Role::new(MD5USER.0, MD5USER.1, HbaMethod::Md5),
                Role::new(PWUSER.0, PWUSER.1, HbaMethod::Password),
                Role::new(TRUSTUSER.0, TRUSTUSER.1, HbaMethod::Trust),
            ],
            ..ClusterSpec::default()
        };
        let c = Cluster::start(&spec).unwrap_or_else(|e| panic!("cannot start test cluster: {e}"));
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_cluster) };
        c
    })
}

/// A new database on the primary, usable by every test role.
pub fn fresh_db(prefix: &str) -> String {
    let c = cluster();
    let name = format!("{prefix}_{}_{}", std::process::id(), DB_SEQ.fetch_add(1, Ordering::Relaxed));
    c.psql(&c.primary, "postgres", &format!("CREATE DATABASE {name} OWNER {}", APP.0)).expect("create database");
    c.psql(&c.primary, "postgres", &format!("GRANT ALL ON DATABASE {name} TO PUBLIC")).expect("grant");
    c.psql(&c.primary, &name, "GRANT ALL ON SCHEMA public TO PUBLIC").expect("grant schema");
    name
}

/// pgmux config for `db` on the shared primary; `pool` lines go under
/// `[pool]`, `extra` is appended.
pub fn config_text(db: &str, pool: &str, extra: &str) -> String {
    let c = cluster();
    let port = free_port().expect("free port");
    format!(
        r#"[pgmux]
listen = "127.0.0.1:{port}"
log_level = "warn"

[pool]
{pool}

[[users]]
name = "{app}"
password = "{app_pw}"

[[users]]
name = "{md5}"
password = "{md5_pw}"
auth_method = "md5"

[[users]]
name = "{pw}"
password = "{pw_pw}"
auth_method = "password"

[[users]]
name = "{trust}"
auth_method = "trust"
server_password = "{trust_pw}"

[databases.{db}]
primary = "{primary}"
{extra}
"#,
        app = APP.0,
        app_pw = APP.1,
        md5 = MD5USER.0,
        md5_pw = MD5USER.1,
        pw = PWUSER.0,
        pw_pw = PWUSER.1,
        trust = TRUSTUSER.0,
        trust_pw = TRUSTUSER.1,
        primary = c.primary.addr(),
    )
}

/// Start pgmux with the given config text.
/// A port picked free may be taken before pgmux binds it (clusters start
/// in parallel tests): then another is tried.
pub async fn start_proxy(text: &str) -> RunningProxy {
    let mut config = Config::parse(text, "test config").unwrap_or_else(|e| panic!("bad test config: {e}\n{text}"));
    for _ in 0..10 {
        match Proxy::start(config.clone()).await {
            Ok(p) => return p,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                config.general.listen.port = free_port().expect("free port");
            }
            Err(e) => panic!("start pgmux: {e}"),
        }
    }
    panic!("no free port for pgmux after 10 tries")
}

/// pgmux in front of `db` with `pool` settings.
pub async fn proxy(db: &str, pool: &str) -> RunningProxy {
    start_proxy(&config_text(db, pool, "")).await
}

pub fn conn_str(port: u16, user: &str, password: &str, db: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db} connect_timeout=10")
}

/// Connect with tokio-postgres; the connection task runs in the background.
pub async fn connect_str(s: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(s, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// As `app` through pgmux.
pub async fn app(p: &RunningProxy, db: &str) -> Client {
    connect_str(&conn_str(p.addr.port(), APP.0, APP.1, db)).await.expect("connect through pgmux")
}

/// As the superuser straight to the primary.
pub async fn direct(db: &str) -> Client {
    let c = cluster();
    let s = conn_str(c.primary.port, "postgres", Cluster::superuser_password(), db);
    connect_str(&s).await.expect("connect to primary")
}

/// Server connections pgmux holds to `db` (as seen by PostgreSQL; the
/// tests' own superuser connections are not counted).
pub async fn backends(direct: &Client, db: &str) -> i64 {
    let row = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' AND usename <> 'postgres'",
            &[&db],
        )
        .await
        .expect("count backends");
    row.get(0)
}

/// First column of the first row of a simple query, as text.
pub async fn scalar(c: &Client, sql: &str) -> String {
    let msgs = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", text(&e)));
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or("").to_string();
        }
    }
    panic!("{sql}: no rows")
}

/// SQLSTATE of an error, for assertions.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("<no code: {e}>"))
}

/// Full text of an error (tokio-postgres' Display says only "db error").
pub fn text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

/// A connection attempt that must fail; returns its error.
pub async fn refused(s: &str) -> tokio_postgres::Error {
    match connect_str(s).await {
        Ok(_) => panic!("connection unexpectedly accepted: {s}"),
        Err(e) => e,
    }
}

/// Samples how many server connections pgmux holds to a database, every
/// 20 ms, until stopped; reports the most seen.
pub struct BackendSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max: std::sync::Arc<std::sync::atomic::AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl BackendSampler {
    pub fn start(db: &str) -> BackendSampler {
        use std::sync::atomic::{AtomicBool, AtomicI64};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let max = std::sync::Arc::new(AtomicI64::new(0));
        let (s, m, db) = (stop.clone(), max.clone(), db.to_string());
        let task = tokio::spawn(async move {
            let d = direct(&db).await;
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(backends(&d, &db).await, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
        BackendSampler { stop, max, task }
    }

    /// Stop sampling; the most server connections seen.
    pub async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("sampler task");
        self.max.load(Ordering::Relaxed)
    }
}

/// The port of a test config's `listen` line.
pub fn listen_port(cfg: &str) -> u16 {
    cfg.lines()
        .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:")?.strip_suffix('"')?.parse().ok())
        .expect("a listen line")
}

/// All rows of a simple query, as text.
pub async fn rows(c: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let msgs = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {}", text(&e)));
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Connect to a pgmux that is starting (up to 5 s).
pub async fn connect_when_up(s: &str) -> Option<Client> {
    for _ in 0..100 {
        if let Ok(c) = connect_str(s).await {
            return Some(c);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap()
}
