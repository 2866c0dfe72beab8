//! Pooling against real PostgreSQL: transaction and session mode, limits,
//! timeouts, per-client runtime parameters, cleanup of abandoned
//! transactions.

mod support;

use std::time::{Duration, Instant};

use support::raw::Raw;
use support::{backends, code, scalar, APP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_ten_server_connections() {
    let db = support::fresh_db("pool_500");
    let p = support::proxy(&db, "default_pool_size = 10\nquery_wait_timeout = \"60s\"").await;
    let direct = support::direct(&db).await;
    direct.simple_query("CREATE TABLE hits (client int, n int)").await.unwrap();
    direct.simple_query("GRANT ALL ON hits TO PUBLIC").await.unwrap();

    let sampler = support::BackendSampler::start(&db);
    let mut tasks = Vec::new();
    for client in 0..500i32 {
        let (port, db) = (p.addr.port(), db.clone());
        tasks.push(tokio::spawn(async move {
            let c = support::connect_str(&support::conn_str(port, APP.0, APP.1, &db)).await.expect("connect");
            for n in 0..20 {
                c.simple_query(&format!("BEGIN; INSERT INTO hits VALUES ({client}, {n}); COMMIT")).await.expect("txn");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let max = sampler.stop().await;
    assert_eq!(scalar(&direct, "SELECT count(*) FROM hits").await, "10000");
    assert_eq!(scalar(&direct, "SELECT count(DISTINCT client) FROM hits").await, "500");
    assert!(max <= 10, "pg_stat_activity showed {max} pgmux connections");
    assert!(max >= 1);
    assert!(backends(&direct, &db).await <= 10);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_holds_server_until_idle() {
    let db = support::fresh_db("pool_txn");
    let p = support::proxy(&db, "default_pool_size = 2").await;
    let a = support::app(&p, &db).await;
    let b = support::app(&p, &db).await;
    // Inside a transaction the same backend serves every statement.
    a.simple_query("BEGIN").await.unwrap();
    let pid1 = scalar(&a, "SELECT pg_backend_pid()").await;
    let _ = scalar(&b, "SELECT 1").await;
    let pid2 = scalar(&a, "SELECT pg_backend_pid()").await;
    assert_eq!(pid1, pid2);
    // A failed transaction (status E) keeps the server too, until ROLLBACK.
    assert!(a.simple_query("SELECT 1/0").await.is_err());
    let e = a.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    a.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(scalar(&a, "SELECT 'ok'").await, "ok");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_names_itself() {
    let db = support::fresh_db("pool_wait");
    let p = support::proxy(&db, "default_pool_size = 1\nquery_wait_timeout = \"1s\"").await;
    let holder = support::app(&p, &db).await;
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    let waiter = support::app(&p, &db).await;
    let started = Instant::now();
    let e = waiter.simple_query("SELECT 2").await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(support::text(&e).contains("query_wait_timeout"), "{}", support::text(&e));
    assert_eq!(code(&e), "08P01");
    holder.simple_query("COMMIT").await.unwrap();
    let again = support::app(&p, &db).await;
    assert_eq!(scalar(&again, "SELECT 3").await, "3");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_transaction_is_rolled_back() {
    let db = support::fresh_db("pool_gone");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let direct = support::direct(&db).await;
    direct.simple_query("CREATE TABLE t (id int primary key); GRANT ALL ON t TO PUBLIC").await.unwrap();
    let pid = {
        let a = support::app(&p, &db).await;
        a.simple_query("BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
        let pid = scalar(&a, "SELECT pg_backend_pid()").await;
        drop(a);
        pid
    };
    // The same server connection is reused (pool of one), rolled back: no
    // row, no lock, idle.
    let b = support::app(&p, &db).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        b.simple_query("INSERT INTO t VALUES (1)").await.expect("row lock released");
    })
    .await
    .expect("insert must not block on the abandoned transaction");
    assert_eq!(scalar(&b, "SELECT pg_backend_pid()").await, pid);
    assert_eq!(scalar(&b, "SELECT count(*) FROM t").await, "1");

    // A client gone while its query still runs: the connection finishes
    // (or is closed) and never comes back dirty.
    let c = support::app(&p, &db).await;
    let h = tokio::spawn(async move {
        let _ = c.simple_query("BEGIN; INSERT INTO t VALUES (2); SELECT pg_sleep(1)").await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.abort();
    let _ = h.await;
    let d = support::app(&p, &db).await;
    assert_eq!(scalar(&d, "SELECT count(*) FROM t").await, "1");
    assert_eq!(scalar(&d, "SELECT now() = statement_timestamp()").await, "t", "not inside a leftover transaction");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_state_then_discards_it() {
    let db = support::fresh_db("pool_session");
    let p = support::proxy(&db, "default_pool_size = 1\npool_mode = \"session\"").await;
    let a = support::app(&p, &db).await;
    a.simple_query("CREATE TEMP TABLE scratch (x int); SET work_mem = '7MB'").await.unwrap();
    a.simple_query("INSERT INTO scratch VALUES (1)").await.unwrap();
    assert_eq!(scalar(&a, "SELECT count(*) FROM scratch").await, "1");
    assert_eq!(scalar(&a, "SHOW work_mem").await, "7MB");
    let pid = scalar(&a, "SELECT pg_backend_pid()").await;
    drop(a);
    let b = support::app(&p, &db).await;
    assert_eq!(scalar(&b, "SELECT pg_backend_pid()").await, pid, "session-mode connection reused");
    let e = b.simple_query("SELECT * FROM scratch").await.unwrap_err();
    assert_eq!(code(&e), "42P01", "temp table gone after DISCARD ALL");
    assert_ne!(scalar(&b, "SHOW work_mem").await, "7MB");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_sees_its_own_runtime_parameters() {
    let db = support::fresh_db("pool_params");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let port = p.addr.port();
    let mut a = Raw::login(
        port,
        APP.0,
        APP.1,
        &db,
        &[
            ("application_name", "client-a"),
            ("TimeZone", "America/New_York"),
            ("DateStyle", "SQL, DMY"),
            ("IntervalStyle", "iso_8601"),
            ("options", "-c search_path=schema_a,public -c statement_timeout=1234"),
        ],
    )
    .await;
    let mut b =
        Raw::login(port, APP.0, APP.1, &db, &[("application_name", "client-b"), ("TimeZone", "Asia/Tokyo")]).await;
    // Welcome ParameterStatus reflects each client's values.
    assert_eq!(a.params["application_name"], "client-a");
    assert_eq!(a.params["TimeZone"], "America/New_York");
    assert_eq!(a.params["DateStyle"], "SQL, DMY");
    assert_eq!(a.params["IntervalStyle"], "iso_8601");
    assert_eq!(b.params["application_name"], "client-b");
    assert_eq!(b.params["TimeZone"], "Asia/Tokyo");
    assert_eq!(b.params["DateStyle"], "ISO, MDY");
    let q = "SELECT concat_ws('|', current_setting('application_name'), current_setting('TimeZone'), current_setting('DateStyle'), current_setting('IntervalStyle'), current_setting('search_path'), current_setting('statement_timeout'), pg_backend_pid())";
    for _ in 0..3 {
        let ra = a.query(q).await.0.remove(0);
        let rb = b.query(q).await.0.remove(0);
        let fa: Vec<_> = ra.split('|').collect();
        let fb: Vec<_> = rb.split('|').collect();
        assert_eq!(fa[..6], ["client-a", "America/New_York", "SQL, DMY", "iso_8601", "schema_a,public", "1234ms"]);
        assert_eq!(fb[..6], ["client-b", "Asia/Tokyo", "ISO, MDY", "postgres", "\"$user\", public", "0"]);
        assert_eq!(fa[6], fb[6], "one server connection serves both");
    }
    // A client's own SET (reported via ParameterStatus) sticks to it.
    a.query("SET application_name = 'client-a2'").await;
    assert_eq!(a.params["application_name"], "client-a2");
    assert_eq!(b.query("SELECT current_setting('application_name')").await.0, vec!["client-b"]);
    assert_eq!(a.query("SELECT current_setting('application_name')").await.0, vec!["client-a2"]);
    assert_eq!(b.params["application_name"], "client-b");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_startup_parameter_fails_login() {
    let db = support::fresh_db("pool_badparam");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let e =
        Raw::try_login(p.addr.port(), APP.0, APP.1, &db, &[("no_such_setting", "1")]).await.err().expect("must fail");
    assert!(e.starts_with("42704"), "{e}");
    // A parameter the server reports is tried too (pgmux learns the
    // server's spelling of the client's value): a bad value fails the
    // login as well. Either way the pool must stay healthy.
    let e = Raw::try_login(p.addr.port(), APP.0, APP.1, &db, &[("DateStyle", "bogus")]).await.err();
    assert!(e.as_deref().is_some_and(|e| e.starts_with("22023")), "{e:?}");
    let c = support::app(&p, &db).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_lifetime_and_min_pool_size() {
    let db = support::fresh_db("pool_timers");
    let direct = support::direct(&db).await;
    // min_pool_size keeps 2 open; idle extras close after 1 s.
    let p = support::proxy(&db, "default_pool_size = 5\nmin_pool_size = 2\nserver_idle_timeout = \"1s\"").await;
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| support::app(&p, &db))).await;
    for c in &clients {
        c.simple_query("BEGIN").await.unwrap();
    }
    let n = backends(&direct, &db).await;
    assert!((4..=5).contains(&n), "{n} connections for 4 busy clients in a pool of 5");
    for c in &clients {
        c.simple_query("COMMIT").await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while backends(&direct, &db).await != 2 {
        assert!(Instant::now() < deadline, "idle connections not closed down to min_pool_size");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.stop().await;

    // server_lifetime: a connection older than 1 s is replaced.
    let p = support::proxy(&db, "default_pool_size = 1\nserver_lifetime = \"1s\"").await;
    let c = support::app(&p, &db).await;
    let pid1 = scalar(&c, "SELECT pg_backend_pid()").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid2 = scalar(&c, "SELECT pg_backend_pid()").await;
    assert_ne!(pid1, pid2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connect_timeout_is_reported() {
    // A listener that accepts TCP but never speaks.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let text = support::config_text("ghost", "server_connect_timeout = \"500ms\"", "")
        .replace(&support::cluster().primary.addr(), &format!("127.0.0.1:{port}"));
    let p = support::start_proxy(&text).await;
    let started = Instant::now();
    let e = support::refused(&support::conn_str(p.addr.port(), APP.0, APP.1, "ghost")).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(code(&e), "08006", "{}", support::text(&e));
    assert!(support::text(&e).contains("timed out"), "{}", support::text(&e));
    drop(silent);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_extra_clients() {
    let db = support::fresh_db("pool_maxc");
    let text =
        support::config_text(&db, "", "").replace("log_level = \"warn\"", "log_level = \"warn\"\nmax_client_conn = 2");
    let p = support::start_proxy(&text).await;
    let _a = support::app(&p, &db).await;
    let _b = support::app(&p, &db).await;
    let e = support::refused(&support::conn_str(p.addr.port(), APP.0, APP.1, &db)).await;
    assert_eq!(code(&e), "53300");
    drop(_a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = support::app(&p, &db).await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_follows_its_client_and_never_leaks() {
    let db = support::fresh_db("pool_set");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let a = support::app(&p, &db).await;
    let b = support::app(&p, &db).await;
    let show = "SELECT current_setting('search_path') || '|' || current_setting('statement_timeout') || '|' || coalesce(current_setting('myapp.tenant', true), '') || '|' || pg_backend_pid()";
    let (b0, _) = scalar(&b, show).await.rsplit_once('|').map(|(x, y)| (x.to_string(), y.to_string())).unwrap();
    a.simple_query("SET search_path = a_schema, public; SET statement_timeout TO '4s'; SET myapp.tenant = 'acme'")
        .await
        .unwrap();
    for _ in 0..3 {
        let ra = scalar(&a, show).await;
        let rb = scalar(&b, show).await;
        assert!(ra.starts_with("a_schema, public|4s|acme|"), "{ra}");
        assert!(rb.starts_with(&b0), "client b sees a's settings: {rb} (expected {b0})");
        assert_eq!(ra.rsplit('|').next(), rb.rsplit('|').next(), "one server connection serves both");
    }
    a.simple_query("RESET statement_timeout").await.unwrap();
    assert!(scalar(&a, show).await.starts_with("a_schema, public|0|acme|"));
    a.simple_query("RESET ALL").await.unwrap();
    assert!(scalar(&a, show).await.starts_with(&b0));
    // SET LOCAL stays inside its transaction.
    a.simple_query("BEGIN; SET LOCAL work_mem = '3MB'; COMMIT").await.unwrap();
    assert_ne!(scalar(&b, "SHOW work_mem").await, "3MB");
    p.stop().await;
}

/// Session state that cannot follow a client to another server connection
/// (temporary tables, LISTEN, session advisory locks) pins the client to
/// its connection until it leaves; then the connection is reset and reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_the_client_until_it_leaves() {
    let db = support::fresh_db("pool_pin");
    let p = support::proxy(&db, "default_pool_size = 3").await;
    let direct = support::direct(&db).await;
    let a = support::app(&p, &db).await;
    a.simple_query("CREATE TEMP TABLE scratch (x int)").await.unwrap();
    let pid_a = scalar(&a, "SELECT pg_backend_pid()").await;
    // Without pinning, this transaction would take A's idle connection
    // (the pool hands out the most recently used one first).
    let b = support::app(&p, &db).await;
    b.simple_query("BEGIN").await.unwrap();
    assert_ne!(scalar(&b, "SELECT pg_backend_pid()").await, pid_a);
    a.simple_query("INSERT INTO scratch VALUES (1)").await.unwrap();
    assert_eq!(scalar(&a, "SELECT count(*) FROM scratch").await, "1");
    assert_eq!(scalar(&a, "SELECT pg_backend_pid()").await, pid_a);
    b.simple_query("COMMIT").await.unwrap();
    // LISTEN and a session advisory lock pin too.
    let c = support::app(&p, &db).await;
    c.simple_query("LISTEN jobs; SELECT pg_advisory_lock(7)").await.unwrap();
    let pid_c = scalar(&c, "SELECT pg_backend_pid()").await;
    let held = format!("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = {pid_c}");
    assert_eq!(scalar(&direct, &held).await, "1");
    assert_eq!(scalar(&c, "SELECT pg_backend_pid()").await, pid_c);
    // Leaving resets the connection (DISCARD ALL) and returns it.
    let connections = support::backends(&direct, &db).await;
    drop((a, c));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(scalar(&direct, &held).await, "0", "advisory lock survived the client");
    let listening = format!("SELECT count(*) FROM pg_stat_activity WHERE pid IN ({pid_a}, {pid_c})");
    assert_eq!(scalar(&direct, &listening).await, "2", "pinned connections were closed, not reused");
    assert_eq!(support::backends(&direct, &db).await, connections);
    let d = support::app(&p, &db).await;
    let temp = "SELECT count(*) FROM pg_class WHERE relname = 'scratch' AND relpersistence = 't'";
    assert_eq!(scalar(&d, temp).await, "0", "temporary table survived the client");
    p.stop().await;
}
