//! Shared server-side prepared statements that must not outlive what they
//! were planned for: a schema change made behind pgmux's back (straight on
//! the server), a different `search_path` per client, a type dropped and
//! created again; the server's own FATAL reaching the client as sent; and
//! the same through real drivers (psycopg 3, asyncpg), with startup
//! parameters from libpq's environment. Transaction mode, one server
//! connection, so every client shares it (unless a test says otherwise).

mod support;

use bytes::BytesMut;
use support::raw::{self, Raw};
use support::{code, APP};

/// tokio-postgres, prepared once and reused (Parse + Describe, then Binds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_does_not_break_later_clients() {
    let db = support::fresh_db("stale_mig");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let direct = support::direct(&db).await;
    direct
        .batch_execute("CREATE TABLE t3 (id int, v text); INSERT INTO t3 VALUES (1, 'a'); GRANT ALL ON t3 TO PUBLIC")
        .await
        .unwrap();
    let a = support::app(&p, &db).await;
    let sql = "SELECT * FROM t3 WHERE id = $1";
    let old = a.prepare(sql).await.unwrap();
    assert_eq!(a.query_one(&old, &[&1i32]).await.unwrap().len(), 2);
    // Behind pgmux's back: only the server's error can tell.
    direct.batch_execute("ALTER TABLE t3 ADD COLUMN note text DEFAULT 'x'").await.unwrap();
    for _ in 0..3 {
        let b = support::app(&p, &db).await;
        let st = b.prepare(sql).await.unwrap();
        assert_eq!(st.columns().len(), 3, "a later client gets a fresh plan");
        let row = b.query_one(&st, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, String>(2), "x");
        // Unnamed-per-call form too.
        assert_eq!(b.query_one(sql, &[&1i32]).await.unwrap().len(), 3);
    }
    // The client that was told the old shape gets PostgreSQL's own error,
    // as on its own connection, every time; preparing again mends it.
    for _ in 0..2 {
        let e = a.query_one(&old, &[&1i32]).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{e:?}");
    }
    let fresh = a.prepare(sql).await.unwrap();
    assert_eq!(a.query_one(&fresh, &[&1i32]).await.unwrap().len(), 3);
    // A column type change, then DROP/CREATE of the table.
    direct.batch_execute("ALTER TABLE t3 ALTER COLUMN id TYPE bigint").await.unwrap();
    let b = support::app(&p, &db).await;
    assert_eq!(b.query_one("SELECT * FROM t3 WHERE id = $1", &[&1i64]).await.unwrap().get::<_, i64>(0), 1);
    direct
        .batch_execute("DROP TABLE t3; CREATE TABLE t3 (id bigint, z int); INSERT INTO t3 VALUES (1, 7); GRANT ALL ON t3 TO PUBLIC")
        .await
        .unwrap();
    let row = b.query_one("SELECT * FROM t3 WHERE id = $1", &[&1i64]).await.unwrap();
    assert_eq!(row.get::<_, i32>(1), 7);
    let m = support::scalar(&direct, "SELECT 1").await;
    assert_eq!(m, "1");
    p.stop().await;
}

/// Schema per tenant: the same text under two search paths is two
/// statements on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_decides_which_statement() {
    let db = support::fresh_db("stale_path");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let direct = support::direct(&db).await;
    direct
        .batch_execute(
            "CREATE SCHEMA ta; CREATE SCHEMA tb; GRANT ALL ON SCHEMA ta, tb TO PUBLIC;
             CREATE TABLE ta.items (id int, a text); INSERT INTO ta.items VALUES (1, 'from ta');
             CREATE TABLE tb.items (id int, b int, c int); INSERT INTO tb.items VALUES (1, 2, 3);
             GRANT ALL ON ALL TABLES IN SCHEMA ta, tb TO PUBLIC",
        )
        .await
        .unwrap();
    let url =
        |path: &str| format!("{} options='-c search_path={path}'", support::conn_str(p.addr.port(), APP.0, APP.1, &db));
    let ta = support::connect_str(&url("ta")).await.unwrap();
    let tb = support::connect_str(&url("tb")).await.unwrap();
    let sql = "SELECT * FROM items WHERE id > $1";
    for _ in 0..3 {
        let row = ta.query_one(sql, &[&0i32]).await.unwrap();
        assert_eq!((row.len(), row.get::<_, String>(1)), (2, "from ta".to_string()));
        let row = tb.query_one(sql, &[&0i32]).await.unwrap();
        assert_eq!((row.len(), row.get::<_, i32>(2)), (3, 3));
    }
    // A SET inside the session moves the statement too, in and out of a
    // transaction.
    ta.batch_execute("SET search_path = tb").await.unwrap();
    assert_eq!(ta.query_one(sql, &[&0i32]).await.unwrap().len(), 3);
    ta.batch_execute("BEGIN; SET LOCAL search_path = ta").await.unwrap();
    assert_eq!(ta.query_one(sql, &[&0i32]).await.unwrap().len(), 2);
    ta.batch_execute("COMMIT").await.unwrap();
    assert_eq!(ta.query_one(sql, &[&0i32]).await.unwrap().len(), 3);
    assert_eq!(tb.query_one(sql, &[&0i32]).await.unwrap().len(), 3);
    p.stop().await;
}

/// Parse, then Bind/Execute/Sync with text parameters of unspecified type
/// (what psycopg and libpq send): the rows, or the errors.
async fn run_typed(c: &mut Raw, name: &str, param: &str) -> (Vec<String>, Vec<String>) {
    let mut b = BytesMut::new();
    raw::bind(&mut b, "", name, &[Some(param)]);
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    c.send(&b).await;
    raw::rows_and_errors(&c.until_ready().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_dropped_and_created_again() {
    let db = support::fresh_db("stale_type");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let direct = support::direct(&db).await;
    direct.batch_execute("CREATE TYPE mood AS ENUM ('ok')").await.unwrap();
    let port = p.addr.port();
    let mut a = Raw::login(port, APP.0, APP.1, &db, &[]).await;
    a.prepare("m", "SELECT $1::mood::text").await;
    assert_eq!(run_typed(&mut a, "m", "ok").await, (vec!["ok".to_string()], vec![]));
    direct.batch_execute("DROP TYPE mood; CREATE TYPE mood AS ENUM ('ok', 'fine')").await.unwrap();
    let mut b = Raw::login(port, APP.0, APP.1, &db, &[]).await;
    b.prepare("m2", "SELECT $1::mood::text").await;
    assert_eq!(run_typed(&mut b, "m2", "fine").await, (vec!["fine".to_string()], vec![]));
    // The first client never saw a description: its statement runs anew.
    assert_eq!(run_typed(&mut a, "m", "fine").await, (vec!["fine".to_string()], vec![]));
    p.stop().await;
}

/// DDL relayed through pgmux invalidates every statement of the database
/// at once (no error needed), also on other pools of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_through_pgmux_invalidates() {
    let db = support::fresh_db("stale_ddl");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let a = support::app(&p, &db).await;
    a.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await.unwrap();
    let mut raw_client = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    raw_client.prepare("q", "SELECT * FROM t").await;
    assert_eq!(raw_client.run_prepared("q").await.0, vec!["1".to_string()]);
    // In a transaction: the statements are dropped once it commits.
    a.batch_execute("BEGIN; ALTER TABLE t ADD COLUMN w int DEFAULT 5; COMMIT").await.unwrap();
    let b = support::app(&p, &db).await;
    let row = b.query_one("SELECT * FROM t", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(1), 5);
    assert_eq!(raw_client.run_prepared("q").await.1, Vec::<String>::new());
    p.stop().await;
}

/// The FATAL the server sent on its own, as the client received it:
/// (SQLSTATE, severity, message); the connection is closed after it.
async fn server_goodbye(c: &mut Raw) -> (String, String, String) {
    let (tag, body) = c.recv().await;
    assert_eq!(tag, b'E', "an ErrorResponse, not {}", tag as char);
    let f = pgmux::protocol::error::parse_fields(&body);
    let get = |k| pgmux::protocol::error::field(&f, k).unwrap_or_default().to_string();
    let next = c.try_recv().await.map(|(tag, _)| tag as char);
    assert_eq!(next, None, "nothing after the FATAL: the session ends, as with PostgreSQL");
    (get(b'C'), get(b'V'), get(b'M'))
}

/// The server ends the session with its own FATAL: the client gets that
/// error (SQLSTATE, severity, message), not a generic 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_fatal_reaches_the_client() {
    let db = support::fresh_db("stale_fatal");
    let p = support::proxy(&db, "default_pool_size = 2").await;
    let port = p.addr.port();
    let opts = [("options", "-c idle_in_transaction_session_timeout=300")];
    let mut c = Raw::login(port, APP.0, APP.1, &db, &opts).await;
    c.query("BEGIN").await;
    let (code, severity, message) = server_goodbye(&mut c).await;
    assert_eq!((code.as_str(), severity.as_str()), ("25P03", "FATAL"), "{message}");
    assert!(message.contains("idle-in-transaction timeout"), "{message}");

    let direct = support::direct(&db).await;
    let mut c = Raw::login(port, APP.0, APP.1, &db, &[]).await;
    let (pid, errors) = c.query("BEGIN; SELECT pg_backend_pid()").await;
    assert!(errors.is_empty(), "{errors:?}");
    let pid: i32 = pid[0].parse().unwrap();
    direct.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    let (code, severity, message) = server_goodbye(&mut c).await;
    assert_eq!((code.as_str(), severity.as_str()), ("57P01", "FATAL"), "{message}");
    p.stop().await;

    // Session mode: the same, once (not followed by pgmux's own error).
    let p = support::proxy(&db, "default_pool_size = 2\npool_mode = \"session\"").await;
    let mut c = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    let (pid, _) = c.query("SELECT pg_backend_pid()").await;
    let pid: i32 = pid[0].parse().unwrap();
    direct.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    let (code, severity, message) = server_goodbye(&mut c).await;
    assert_eq!((code.as_str(), severity.as_str()), ("57P01", "FATAL"), "{message}");
    p.stop().await;
}

/// psycopg 3 (auto-prepare) and asyncpg: tests/drivers/stale_statements.py.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_and_asyncpg() {
    let db = support::fresh_db("stale_py");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    python_check("stale_statements.py", &p, &db).await;
    p.stop().await;
}

/// Run `tests/drivers/<script>` against `p` (and the server straight, as
/// PGMUX_DIRECT_PORT); it must print OK.
pub async fn python_check(script: &str, p: &pgmux::proxy::RunningProxy, db: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .current_dir(dir)
        .env("PGMUX_HOST", "127.0.0.1")
        .env("PGMUX_PORT", p.addr.port().to_string())
        .env("PGMUX_DIRECT_PORT", support::cluster().primary.port.to_string())
        .env("PGMUX_USER", APP.0)
        .env("PGMUX_PASSWORD", APP.1)
        .env("PGMUX_DB", db)
        .kill_on_drop(true)
        .output();
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(120), out).await.expect("timed out").expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("OK"), "{script}: {text}");
}

/// Startup parameters from libpq's environment: tests/drivers/libpq_env.py.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_environment_parameters() {
    let db = support::fresh_db("stale_env");
    for mode in ["transaction", "session"] {
        let p = support::proxy(&db, &format!("default_pool_size = 2\npool_mode = \"{mode}\"")).await;
        python_check("libpq_env.py", &p, &db).await;
        p.stop().await;
    }
}

/// pg_prepared_statements lists the client's own statements (by its
/// names), never the texts other clients prepared on the same server
/// connection; SQL-level PREPAREs are listed as PostgreSQL lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_view_is_the_clients_own() {
    let db = support::fresh_db("stale_view");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let port = p.addr.port();
    let mut a = Raw::login(port, APP.0, APP.1, &db, &[]).await;
    a.prepare("card", "SELECT $1::text AS card /* client A */").await;
    let mut b = Raw::login(port, APP.0, APP.1, &db, &[]).await;
    b.prepare("mine", "SELECT 2 /* client B */").await;
    let (rows, errors) = b.query("SELECT name || ': ' || statement FROM pg_prepared_statements ORDER BY 1").await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(rows, vec!["mine: SELECT 2 /* client B */".to_string()]);
    let (rows, _) = a.query("SELECT count(*) FROM pg_catalog.pg_prepared_statements p WHERE p.name = 'card'").await;
    assert_eq!(rows, vec!["1".to_string()]);
    // The function behind the view.
    let (rows, errors) =
        b.query("SELECT string_agg(name || ': ' || statement, ',') FROM pg_prepared_statement()").await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(rows, vec!["mine: SELECT 2 /* client B */".to_string()]);
    // The extended protocol (psycopg's default), unnamed.
    let mut m = BytesMut::new();
    raw::parse(&mut m, "", "SELECT string_agg(name, ',') FROM pg_prepared_statements");
    raw::bind(&mut m, "", "", &[]);
    raw::execute(&mut m, "", 0);
    raw::sync(&mut m);
    a.send(&m).await;
    assert_eq!(raw::rows_and_errors(&a.until_ready().await).0, vec!["card".to_string()]);
    p.stop().await;
}

/// A type created in a savepoint that is rolled back: statements prepared
/// inside it are not used again after the rollback (psycopg's
/// test_change_type_savepoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_in_a_rolled_back_savepoint() {
    let db = support::fresh_db("stale_savepoint");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let mut c = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    c.query("BEGIN").await;
    for round in 0..3 {
        let (_, errors) = c.query("SAVEPOINT sp; CREATE TYPE sp_mood AS ENUM ('ok')").await;
        assert!(errors.is_empty(), "{errors:?}");
        let name = format!("q{round}");
        c.prepare(&name, "SELECT $1::sp_mood::text").await;
        assert_eq!(run_typed(&mut c, &name, "ok").await, (vec!["ok".to_string()], vec![]), "round {round}");
        let (_, errors) = c.query("ROLLBACK TO SAVEPOINT sp").await;
        assert!(errors.is_empty(), "{errors:?}");
    }
    c.query("COMMIT").await;
    // A client that leaves inside its transaction: pgmux rolls it back, and
    // what it prepared there goes with it.
    for round in 0..2 {
        let mut c = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
        let (_, errors) = c.query("BEGIN; CREATE TYPE gone_mood AS ENUM ('ok')").await;
        assert!(errors.is_empty(), "{errors:?}");
        c.prepare("g", "SELECT $1::gone_mood::text").await;
        assert_eq!(run_typed(&mut c, "g", "ok").await, (vec!["ok".to_string()], vec![]), "round {round}");
        drop(c);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    p.stop().await;
}

/// What each of a client's described statements answers after DDL run by
/// another client: (SQLSTATE or "ok" with the column count) per statement.
async fn after_ddl(a: &tokio_postgres::Client, stmts: &[tokio_postgres::Statement]) -> Vec<String> {
    let mut out = Vec::new();
    for st in stmts {
        out.push(match a.query(st, &[]).await {
            Ok(rows) => format!("ok {}", rows.first().map_or(0, |r| r.len())),
            Err(e) => code(&e).to_string(),
        });
    }
    out
}

/// A client told its statements' shapes (tokio-postgres describes what it
/// prepares), then DDL relayed through pgmux by another client: every
/// statement answers as it would on the client's own connection — the
/// one whose columns changed fails with 0A000 (never rows of a shape it
/// was not told), one of a dropped table with 42P01, the others run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn described_statements_across_ddl_through_pgmux() {
    let db = support::fresh_db("stale_told");
    let p = support::proxy(&db, "default_pool_size = 2").await;
    let setup = "CREATE TABLE t4 (id int, v text); CREATE TABLE t5 (id int); CREATE TABLE t6 (id int); \
                 INSERT INTO t4 VALUES (1, 'a'); INSERT INTO t5 VALUES (1); INSERT INTO t6 VALUES (1); \
                 GRANT ALL ON t4, t5, t6 TO PUBLIC; ";
    let setup = format!(
        "{setup} ALTER TABLE t4 OWNER TO {u}; ALTER TABLE t5 OWNER TO {u}; ALTER TABLE t6 OWNER TO {u}",
        u = APP.0
    );
    support::direct(&db).await.batch_execute(&setup).await.unwrap();
    let texts = ["SELECT * FROM t4", "SELECT id FROM t5", "SELECT * FROM t6", "SELECT id FROM t4"];
    let ddl = "ALTER TABLE t4 ADD COLUMN note text DEFAULT 'x'; DROP TABLE t6";
    let mut answers = Vec::new();
    for through_pgmux in [false, true] {
        let (a, b) = if through_pgmux {
            (support::app(&p, &db).await, support::app(&p, &db).await)
        } else {
            (support::direct(&db).await, support::direct(&db).await)
        };
        let mut stmts = Vec::new();
        for t in texts {
            stmts.push(a.prepare(t).await.unwrap());
        }
        assert_eq!(after_ddl(&a, &stmts).await, ["ok 2", "ok 1", "ok 1", "ok 1"]);
        b.batch_execute(ddl).await.unwrap();
        let mut seen = vec![after_ddl(&a, &stmts).await];
        // And again (still failing, as on PostgreSQL), then inside a
        // transaction block.
        seen.push(after_ddl(&a, &stmts[1..2]).await);
        a.batch_execute("BEGIN").await.unwrap();
        seen.push(after_ddl(&a, &stmts[3..]).await);
        seen.push(after_ddl(&a, &stmts[..1]).await);
        a.batch_execute("ROLLBACK").await.unwrap();
        seen.push(after_ddl(&a, &stmts[..1]).await);
        // Preparing again mends it.
        let fresh = a.prepare(texts[0]).await.unwrap();
        seen.push(after_ddl(&a, &[fresh]).await);
        answers.push(seen);
        // The same schema for the next round.
        support::direct(&db).await.batch_execute(&format!("DROP TABLE IF EXISTS t4, t5, t6; {setup}")).await.unwrap();
    }
    let expected = vec![
        vec!["0A000", "ok 1", "42P01", "ok 1"],
        vec!["ok 1"],
        vec!["ok 1"],
        vec!["0A000"],
        vec!["0A000"],
        vec!["ok 3"],
    ];
    assert_eq!(answers[0], expected, "directly");
    assert_eq!(answers[1], expected, "through pgmux");
    p.stop().await;
}

/// The check of a described statement's shape after DDL, in the middle
/// of a pipelined batch: behind an Execute that fails (the server skips
/// the check; the client gets that error, nothing hangs) and behind one
/// that runs (its rows, then the 0A000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shape_check_in_a_pipeline() {
    let db = support::fresh_db("stale_pipe");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let other = support::app(&p, &db).await;
    other.batch_execute("CREATE TABLE t7 (id int); INSERT INTO t7 VALUES (1)").await.unwrap();
    let mut c = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    let mut m = BytesMut::new();
    raw::parse(&mut m, "q", "SELECT * FROM t7");
    raw::describe_statement(&mut m, "q");
    raw::sync(&mut m);
    c.send(&m).await;
    c.until_ready().await;
    other.batch_execute("ALTER TABLE t7 ADD COLUMN w int DEFAULT 2").await.unwrap();
    let within = std::time::Duration::from_secs(10);
    let mut m = BytesMut::new();
    raw::failing_execute(&mut m);
    raw::bind(&mut m, "", "q", &[]);
    raw::execute(&mut m, "", 0);
    raw::sync(&mut m);
    c.send(&m).await;
    let got = tokio::time::timeout(within, c.until_ready()).await.expect("an answer");
    let (rows, errors) = raw::rows_and_errors(&got);
    assert!(rows.is_empty() && errors.len() == 1 && errors[0].starts_with("22012"), "{rows:?} {errors:?}");
    let mut m = BytesMut::new();
    raw::parse(&mut m, "", "SELECT 5");
    raw::bind(&mut m, "", "", &[]);
    raw::execute(&mut m, "", 0);
    raw::bind(&mut m, "", "q", &[]);
    raw::execute(&mut m, "", 0);
    raw::sync(&mut m);
    c.send(&m).await;
    let got = tokio::time::timeout(within, c.until_ready()).await.expect("an answer");
    assert_eq!(
        raw::rows_and_errors(&got),
        (vec!["5".to_string()], vec!["0A000 cached plan must not change result type".to_string()])
    );
    // The connection is clean for the next client.
    assert_eq!(support::scalar(&other, "SELECT count(*) FROM t7").await, "1");
    p.stop().await;
}
