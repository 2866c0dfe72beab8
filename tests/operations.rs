//! Operating a running pgmux: Prometheus counters that match a known
//! workload, hot reload under a pgbench load (no failed transaction, an
//! invalid file refused), graceful shutdown (no transaction cut before the
//! timeout, the rest closed after it), PAUSE / RESUME / KILL / RECONNECT,
//! and the binary's signals (SIGHUP reloads, SIGTERM drains).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{code, rows, scalar, text, APP, MD5USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn with_admin(cfg: &str, extra_general: &str) -> String {
    cfg.replacen(
        "log_level = \"warn\"\n",
        &format!("log_level = \"warn\"\nadmin_users = [\"{}\"]\n{extra_general}", APP.0),
        1,
    )
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// The value of a metric line `name{labels}` (labels as printed).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

async fn console(p: &pgmux::proxy::RunningProxy) -> tokio_postgres::Client {
    support::connect_str(&support::conn_str(p.addr.port(), APP.0, APP.1, "pgmux")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_show_match_a_known_workload() {
    let db = support::fresh_db("ops_metrics");
    let metrics_port = pgmux_testkit::free_port().unwrap();
    let metrics_line = format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n");
    let cfg = with_admin(&support::config_text(&db, "default_pool_size = 3", ""), &metrics_line);
    let p = support::start_proxy(&cfg).await;
    let cl = support::app(&p, &db).await;
    for _ in 0..10 {
        cl.simple_query("SELECT 1").await.unwrap();
    }
    cl.batch_execute("BEGIN").await.unwrap();
    cl.simple_query("SELECT 2").await.unwrap();
    cl.batch_execute("COMMIT").await.unwrap();
    let e = cl.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(code(&e), "22012");
    // A prepared statement: prepared on the server once, then reused.
    let stmt = cl.prepare("SELECT $1::int").await.unwrap();
    for i in 0..3 {
        let r = cl.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(r.get::<_, i32>(0), i);
    }
    // Two pipelined: both answers usually arrive in one read, and each
    // is counted and timed.
    let (a, b) = futures_util::future::join(cl.query_one(&stmt, &[&7]), cl.query_one(&stmt, &[&8])).await;
    assert_eq!((a.unwrap().get::<_, i32>(0), b.unwrap().get::<_, i32>(0)), (7, 8));
    let series = |name: &str| format!("pgmux_{name}{{backend=\"{db}\",route=\"primary\"}}");
    // The client may read its last answer before the session gives the
    // connection back: scrape until the session is idle.
    let mut m = String::new();
    for _ in 0..50 {
        m = scrape(p.metrics_addr.expect("metrics listening")).await;
        if metric(&m, "pgmux_client_connections{state=\"idle\"}") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 10 + 3 + 1 + 6 (prepare, 5 executions) answers; 10 + 1 + 1 + 6
    // transactions.
    assert_eq!(metric(&m, &series("queries_total")), 20.0, "{m}");
    assert_eq!(metric(&m, &series("transactions_total")), 18.0);
    assert_eq!(metric(&m, "pgmux_query_duration_seconds_count{route=\"primary\"}"), 20.0);
    assert_eq!(metric(&m, "pgmux_transaction_duration_seconds_count{route=\"primary\"}"), 18.0);
    assert_eq!(metric(&m, "pgmux_prepared_statements_total{event=\"miss\"}"), 1.0);
    // The Describe after the Parse, and the 5 Binds, find it prepared.
    assert_eq!(metric(&m, "pgmux_prepared_statements_total{event=\"hit\"}"), 6.0);
    assert_eq!(metric(&m, "pgmux_errors_total{class=\"22\"}"), 1.0);
    assert!(metric(&m, &format!("pgmux_pool_wait_seconds_count{{backend=\"{db}\"}}")) >= 12.0);
    assert_eq!(metric(&m, "pgmux_client_connections{state=\"idle\"}"), 1.0);
    assert_eq!(metric(&m, &format!("pgmux_server_connections{{backend=\"{db}\",state=\"idle\"}}")), 1.0);
    assert!(metric(&m, &format!("pgmux_bytes_total{{backend=\"{db}\",direction=\"client_to_server\"}}")) > 100.0);
    // No per-client or per-query label anywhere.
    assert!(!m.contains("SELECT") && !m.contains("127.0.0.1:"), "{m}");

    // The console sees the same.
    let admin = console(&p).await;
    let pools = rows(&admin, "SHOW POOLS").await;
    let pool = pools.iter().find(|r| r[0].as_deref() == Some(db.as_str())).expect("the pool");
    assert_eq!((pool[2].as_deref(), pool[5].as_deref(), pool[11].as_deref()), (Some("0"), Some("1"), Some("3")));
    let stats = rows(&admin, "SHOW STATS").await;
    let st = stats.iter().find(|r| r[0].as_deref() == Some(db.as_str())).expect("stats");
    assert_eq!((st[2].as_deref(), st[3].as_deref()), (Some("18"), Some("20")));
    let routes = rows(&admin, "SHOW ROUTES").await;
    assert!(routes.contains(&vec![Some(db.clone()), Some("primary".into()), Some("20".into()), Some("18".into())]));
    let clients = rows(&admin, "SHOW CLIENTS").await;
    assert_eq!(clients.iter().filter(|r| r[2].as_deref() == Some(db.as_str())).count(), 1);
    assert!(clients.iter().any(|r| r[2].as_deref() == Some("pgmux") && r[3].as_deref() == Some("idle")));
    let servers = rows(&admin, "SHOW SERVERS").await;
    assert_eq!(servers.iter().filter(|r| r[2].as_deref() == Some(db.as_str())).count(), 1);
    let config = rows(&admin, "SHOW CONFIG").await;
    assert!(config.contains(&vec![Some("default_pool_size".into()), Some("3".into())]));
    assert!(rows(&admin, "SHOW REPLICAS").await.is_empty(), "no replicas configured");
    let e = admin.simple_query("BAN nobody/replica1").await.unwrap_err();
    assert_eq!(code(&e), "42704");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_kill_and_reconnect() {
    let db = support::fresh_db("ops_pause");
    let p = support::start_proxy(&with_admin(&support::config_text(&db, "default_pool_size = 2", ""), "")).await;
    let admin = console(&p).await;
    let busy = support::app(&p, &db).await;
    let other = support::app(&p, &db).await;
    assert_eq!(scalar(&other, "SELECT 1").await, "1");
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // PAUSE waits for the transaction in flight.
    let pause = tokio::spawn(async move {
        let r = admin.simple_query(&format!("PAUSE {}", "ops_pause_db_placeholder")).await.map(|_| ());
        (admin, r)
    });
    let (admin, r) = pause.await.unwrap();
    assert_eq!(code(&r.unwrap_err()), "3D000", "unknown database");
    let db2 = db.clone();
    let pause = tokio::spawn(async move {
        let started = Instant::now();
        admin.simple_query(&format!("PAUSE {db2}")).await.unwrap();
        (admin, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!pause.is_finished(), "PAUSE returned while a transaction was running");
    busy.batch_execute("COMMIT").await.unwrap();
    let (admin, took) = pause.await.unwrap();
    assert!(took >= Duration::from_millis(300));
    // New transactions wait until RESUME.
    let held = tokio::spawn(async move {
        let r = scalar(&other, "SELECT 2").await;
        (other, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a transaction ran while paused");
    assert!(rows(&admin, "SHOW POOLS").await.iter().any(|r| r[0].as_deref() == Some(db.as_str())
        && r[3].as_deref() == Some("1")
        && r[13].as_deref() == Some("yes")));
    admin.simple_query(&format!("RESUME {db}")).await.unwrap();
    let (other, r) = held.await.unwrap();
    assert_eq!(r, "2");

    // RECONNECT replaces the server connections.
    let before = rows(&admin, "SHOW SERVERS").await;
    admin.simple_query(&format!("RECONNECT {db}")).await.unwrap();
    assert_eq!(scalar(&other, "SELECT 3").await, "3");
    let after = rows(&admin, "SHOW SERVERS").await;
    let ids = |r: &[Vec<Option<String>>]| -> Vec<Option<String>> {
        r.iter().filter(|s| s[2].as_deref() == Some(db.as_str())).map(|s| s[0].clone()).collect()
    };
    assert!(!ids(&after).is_empty());
    assert!(ids(&after).iter().all(|id| !ids(&before).contains(id)), "{before:?} / {after:?}");

    // KILL drops the database's clients.
    admin.simple_query(&format!("KILL {db}")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = other.simple_query("SELECT 4").await.unwrap_err();
    assert!(other.is_closed() || code(&e) == "57P01", "{}", text(&e));
    assert!(busy.simple_query("SELECT 5").await.is_err());
    assert_eq!(scalar(&support::app(&p, &db).await, "SELECT 6").await, "6", "new clients come in");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_pgbench_fails_no_transaction() {
    let db = support::fresh_db("ops_reload");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgmux.toml");
    let base = with_admin(&support::config_text(&db, "default_pool_size = 2", ""), "");
    // The md5 user is added by the reload.
    let without = base.replace(&format!("[[users]]\nname = \"{}\"", MD5USER.0), "[[users]]\nname = \"md5later\"");
    std::fs::write(&path, &without).unwrap();
    let p = support::start_proxy(&without).await;
    // pgbench binds to the port pgmux got (start_proxy may pick another).
    let port = p.addr.port().to_string();
    let actual = without.replacen(
        &format!("listen = \"127.0.0.1:{}\"", support::listen_port(&without)),
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    );
    std::fs::write(&path, &actual).unwrap();
    p.proxy.set_config_path(&path);
    let early = support::app(&p, &db).await;
    let pgbench = |args: &[&str]| {
        let mut c = Command::new("pgbench");
        c.env("PGPASSWORD", APP.1).args(["-h", "127.0.0.1", "-p", &port, "-U", APP.0]).args(args).arg(&db);
        c
    };
    let init = pgbench(&["-i", "-s", "1", "-q"]).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let load = std::thread::spawn({
        let mut cmd = pgbench(&["-c", "6", "-j", "2", "-T", "6", "-n"]);
        move || cmd.output().unwrap()
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A bigger pool and a new user, under load.
    let bigger = actual.replace("default_pool_size = 2", "default_pool_size = 4").replace("md5later", MD5USER.0);
    std::fs::write(&path, &bigger).unwrap();
    let admin = console(&p).await;
    admin.simple_query("RELOAD").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // An invalid file is refused; the config in force stays.
    std::fs::write(&path, "[pool]\ndefault_pool_size = 0\n").unwrap();
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(code(&e), "F0000", "{}", text(&e));
    let out = load.join().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.contains("number of failed transactions: 0"), "{report}");
    let pools = rows(&admin, "SHOW POOLS").await;
    let sizes: Vec<_> = pools.iter().filter(|r| r[0].as_deref() == Some(db.as_str())).map(|r| r[11].clone()).collect();
    assert_eq!(sizes, vec![Some("4".to_string())], "{pools:?}");
    let config = rows(&admin, "SHOW CONFIG").await;
    assert!(config.contains(&vec![Some("default_pool_size".into()), Some("4".into())]));
    // The client connected before the reloads was never dropped; the new
    // user logs in.
    assert_eq!(scalar(&early, "SELECT 1").await, "1");
    let md5 = support::connect_str(&support::conn_str(p.addr.port(), MD5USER.0, MD5USER.1, &db)).await.unwrap();
    assert_eq!(scalar(&md5, "SELECT 2").await, "2");
    // The retired pool's connections close: what stays is within the new
    // pool size (plus the md5 user's one).
    let direct = support::direct(&db).await;
    let mut n = 0;
    for _ in 0..100 {
        n = support::backends(&direct, &db).await;
        if n <= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(n <= 5, "{n} server connections");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_transactions_finish_then_closes_the_rest() {
    let db = support::fresh_db("ops_shutdown");
    let p = support::start_proxy(&support::config_text(&db, "default_pool_size = 4", "")).await;
    support::app(&p, &db).await.batch_execute("CREATE TABLE t (client int, n int, part int)").await.unwrap();
    let mut workers = Vec::new();
    for c in 0..4 {
        let cl = support::app(&p, &db).await;
        workers.push(tokio::spawn(async move {
            let mut committed = 0;
            loop {
                if let Err(e) = cl.batch_execute("BEGIN").await {
                    return (committed, None, e.to_string());
                }
                let steps = [
                    format!("INSERT INTO t VALUES ({c}, {committed}, 1)"),
                    "SELECT pg_sleep(0.05)".to_string(),
                    format!("INSERT INTO t VALUES ({c}, {committed}, 2)"),
                    "COMMIT".to_string(),
                ];
                for s in &steps {
                    if let Err(e) = cl.batch_execute(s).await {
                        return (committed, Some(s.clone()), e.to_string());
                    }
                }
                committed += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let started = Instant::now();
    p.proxy.drain(Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "clients between transactions leave at once");
    let direct = support::direct(&db).await;
    for (c, w) in workers.into_iter().enumerate() {
        let (committed, failed_at, why) = w.await.unwrap();
        assert!(failed_at.is_none(), "client {c}: a transaction was cut at {failed_at:?}: {why}");
        assert!(committed > 0);
        let n = scalar(&direct, &format!("SELECT count(*) FROM t WHERE client = {c}")).await;
        assert_eq!(n, (2 * committed).to_string(), "client {c}");
    }
    p.stop().await;

    // A transaction longer than the timeout is closed when it ends.
    let p = support::start_proxy(&support::config_text(&db, "", "")).await;
    let slow = support::app(&p, &db).await;
    slow.batch_execute("BEGIN").await.unwrap();
    let sleeping = tokio::spawn(async move { slow.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    p.proxy.drain(Duration::from_millis(800)).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(5), "{took:?}");
    assert!(sleeping.await.unwrap().is_err());
    p.stop().await;
}

#[test]
fn binary_reloads_on_sighup_and_drains_on_sigterm() {
    let db = support::fresh_db("ops_signals");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgmux.toml");
    let cfg = support::config_text(&db, "", "");
    let port = support::listen_port(&cfg);
    let without = cfg.replace(&format!("[[users]]\nname = \"{}\"", MD5USER.0), "[[users]]\nname = \"md5later\"");
    std::fs::write(&path, &without).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgmux")).arg("--config").arg(&path).spawn().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = |u: (&str, &str)| support::conn_str(port, u.0, u.1, &db);
        let cl = support::connect_when_up(&url(APP)).await.expect("pgmux up");
        assert!(support::connect_str(&url(MD5USER)).await.is_err());
        std::fs::write(&path, &cfg).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        let md5 = support::connect_when_up(&url(MD5USER)).await.expect("the reloaded user logs in");
        assert_eq!(scalar(&md5, "SELECT 1").await, "1");
        assert_eq!(scalar(&cl, "SELECT 2").await, "2", "a client from before the reload");
        // SAFETY: as above.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let e = cl.simple_query("SELECT 3").await.unwrap_err();
        assert!(cl.is_closed() || code(&e) == "57P01", "{}", text(&e));
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "pgmux did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn binary_logs_connections_and_slow_queries_without_parameters() {
    let db = support::fresh_db("ops_logs");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgmux.toml");
    let cfg = support::config_text(&db, "", "").replacen(
        "log_level = \"warn\"\n",
        "log_level = \"info\"\nlog_format = \"json\"\nlog_slow_queries = \"150ms\"\n",
        1,
    );
    let port = support::listen_port(&cfg);
    std::fs::write(&path, &cfg).unwrap();
    let log = dir.path().join("pgmux.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgmux"))
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = support::conn_str(port, APP.0, APP.1, &db);
        let cl = support::connect_when_up(&url).await.expect("pgmux up");
        cl.simple_query("SELECT 1").await.unwrap();
        cl.query("SELECT pg_sleep(0.3), $1::text AS secret", &[&"hunter2-parameter"]).await.unwrap();
        drop(cl);
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let event = |msg: &str| lines.iter().filter(move |l| l["fields"]["message"] == msg).collect::<Vec<_>>();
    let opened = event("client connected");
    assert!(opened.iter().any(|l| l["fields"]["user"] == APP.0 && l["fields"]["database"] == db.as_str()), "{text}");
    let closed = event("client disconnected");
    assert!(
        closed.iter().any(|l| l["fields"]["duration_s"].as_f64().is_some() && l["fields"]["addr"].is_string()),
        "{text}"
    );
    let slow = event("slow query");
    assert_eq!(slow.len(), 1, "{text}");
    assert!(slow[0]["fields"]["statement"].as_str().unwrap().contains("pg_sleep(0.3)"));
    assert!(slow[0]["fields"]["duration_ms"].as_u64().unwrap() >= 300);
    assert!(!text.contains("hunter2"), "a parameter was logged: {text}");
    assert!(!text.contains(APP.1), "a password was logged");
}
