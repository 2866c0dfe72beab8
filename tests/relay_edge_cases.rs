//! Edge cases of the transaction-mode relay found in review: pipelined and
//! failing COPY, errors mid-pipeline with pgmux's own replies queued,
//! eviction and Close skipped after an error, session settings (extended
//! protocol SET, set_config, SET ROLE, failed or rolled-back SET), SQL
//! PREPARE anywhere in a string, and errors pgmux raises aborting the
//! transaction. Each asserts what PostgreSQL itself would do.

mod support;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pgmux::protocol::messages as msg;
use support::raw::{self, Raw};
use support::APP;

fn put_cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn close_stmt(b: &mut BytesMut, name: &str) {
    let mut body = BytesMut::new();
    body.put_u8(b'S');
    put_cstr(&mut body, name);
    b.put_u8(b'C');
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(&body);
}

fn flush(b: &mut BytesMut) {
    b.put_u8(b'H');
    b.put_i32(4);
}

fn q(b: &mut BytesMut, sql: &str) {
    msg::query(b, sql);
}

async fn recv_until(r: &mut Raw, tag: u8) -> Vec<(u8, BytesMut)> {
    let mut out = Vec::new();
    loop {
        let (t, body) = r.recv().await;
        out.push((t, body));
        if t == tag {
            return out;
        }
    }
}

/// Another client (pool of 1) gets the server connection and sees a clean one.
async fn other_client(port: u16, db: &str) -> Result<(), String> {
    let fut = async {
        let c = support::connect_str(&support::conn_str(port, APP.0, APP.1, db)).await.map_err(|e| e.to_string())?;
        c.simple_query("SELECT 1").await.map_err(|e| support::text(&e))?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(Duration::from_secs(15), fut).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

async fn raw_login(port: u16, db: &str) -> Raw {
    Raw::login(port, APP.0, APP.1, db, &[]).await
}

/// A fresh database with table `t (x int)`, and a superuser client to it.
async fn db_with_t(prefix: &str) -> (String, tokio_postgres::Client) {
    let db = support::fresh_db(prefix);
    let direct = support::direct(&db).await;
    direct.batch_execute("CREATE TABLE t (x int); GRANT ALL ON t TO PUBLIC").await.unwrap();
    (db, direct)
}

/// Two COPY FROM STDIN with their data and CopyDone right behind each Query.
fn two_pipelined_copies(b: &mut BytesMut) {
    for v in [b"1\n", b"2\n"] {
        q(b, "COPY t FROM STDIN");
        raw::copy_data(b, v);
        raw::copy_done(b);
    }
}

// ---------------------------------------------------------------- settings

/// Session state set by client A must not be visible to client B, which gets
/// the same (only) server connection next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_never_leak_to_the_next_client() {
    let db = support::fresh_db("rv_leak");
    let direct = support::direct(&db).await;
    let role = format!("rv_role_{}", std::process::id());
    let _ = direct.batch_execute(&format!("CREATE ROLE {role}; GRANT {role} TO {}", APP.0)).await;
    // (label, what A runs (simple Query unless it starts with "X:" = extended protocol), B's check, expected)
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("SET via extended protocol", "X:SET statement_timeout = '4321ms'".into(), "SHOW statement_timeout", "0"),
        (
            "set_config(.., false)",
            "SELECT set_config('statement_timeout', '4321ms', false)".into(),
            "SHOW statement_timeout",
            "0",
        ),
        ("SET SCHEMA", "SET SCHEMA 'rv_nowhere'".into(), "SHOW search_path", "\"$user\", public"),
        (
            "SET SESSION CHARACTERISTICS",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE".into(),
            "SHOW default_transaction_isolation",
            "read committed",
        ),
        ("SET ROLE", format!("SET ROLE {role}"), "SELECT current_user", APP.0),
        (
            "E'' string hides a SET",
            "SELECT E'\\''; SET statement_timeout = '4321ms'".into(),
            "SHOW statement_timeout",
            "0",
        ),
    ];
    let mut failures = Vec::new();
    for (label, a_sql, check, want) in cases {
        let p = support::proxy(&db, "default_pool_size = 1").await;
        let mut a = raw_login(p.addr.port(), &db).await;
        let mut b = BytesMut::new();
        if let Some(sql) = a_sql.strip_prefix("X:") {
            raw::parse(&mut b, "", sql);
            raw::bind(&mut b, "", "", &[]);
            raw::execute(&mut b, "", 0);
            raw::sync(&mut b);
        } else {
            q(&mut b, &a_sql);
        }
        a.send(&b).await;
        let (_, errs) = raw::rows_and_errors(&a.until_ready().await);
        assert!(errs.is_empty(), "{label}: {errs:?}");
        // (Some of these pin A to the connection: B gets it when A leaves.)
        drop(a);
        let c = support::app(&p, &db).await;
        let got = support::scalar(&c, check).await;
        if got != want {
            failures.push(format!("{label}: next client sees {check} = {got:?}, want {want:?}"));
        }
        p.stop().await;
    }
    assert!(failures.is_empty(), "session state leaked:\n{}", failures.join("\n"));
}

/// A SET that fails on the server (bad value, unknown parameter) leaves the
/// session usable: pgmux must not replay it on the next checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_set_does_not_kill_the_session() {
    let db = support::fresh_db("rv_badset");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let c = support::app(&p, &db).await;
    let e = c.simple_query("SET work_mem = 'bogus'").await.unwrap_err();
    assert_eq!(support::code(&e), "22023");
    let r = c.simple_query("SELECT 1").await;
    assert!(r.is_ok(), "session died after a failed SET: {:?}", r.err().map(|e| support::text(&e)));
    p.stop().await;
}

/// SET inside a transaction that is rolled back is undone by PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_in_rolled_back_transaction_is_undone() {
    let db = support::fresh_db("rv_rbset");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let c = support::app(&p, &db).await;
    c.batch_execute("BEGIN; SET statement_timeout = '4321ms'; ROLLBACK").await.unwrap();
    assert_eq!(support::scalar(&c, "SHOW statement_timeout").await, "0");
    p.stop().await;
}

// ------------------------------------------------------- prepared tracking

/// LRU eviction (Close of the victim) queued behind a failing message is
/// skipped by the server: pgmux must keep the victim as prepared there (else
/// re-preparing it fails with 42P05 on that connection, for every client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_skipped_after_error_breaks_the_statement() {
    let db = support::fresh_db("rv_evict");
    let p = support::proxy(&db, "default_pool_size = 1\nmax_prepared_statements = 1").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    a.prepare("a", "SELECT 1").await;
    // Error first, then a Parse that evicts "a".
    let mut b = BytesMut::new();
    raw::failing_execute(&mut b);
    raw::parse(&mut b, "b", "SELECT 2");
    raw::sync(&mut b);
    a.send(&b).await;
    let (_, errs) = raw::rows_and_errors(&a.until_ready().await);
    assert_eq!(errs.len(), 1, "{errs:?}");
    // "a" still exists as far as PostgreSQL is concerned.
    assert_eq!(a.run_prepared("a").await, (vec!["1".to_string()], vec![]));
    p.stop().await;
}

/// Close of a statement skipped after an error: PostgreSQL keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_skipped_after_error_keeps_the_statement() {
    let db = support::fresh_db("rv_close");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    a.prepare("s1", "SELECT 7").await;
    let mut b = BytesMut::new();
    raw::failing_execute(&mut b);
    close_stmt(&mut b, "s1");
    raw::sync(&mut b);
    a.send(&b).await;
    let (_, errs) = raw::rows_and_errors(&a.until_ready().await);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(a.run_prepared("s1").await, (vec!["7".to_string()], vec![]));
    p.stop().await;
}

/// An error pgmux emulates (duplicate statement name) must abort the
/// implicit transaction like PostgreSQL does: the INSERT before it in the
/// same Sync batch is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulated_error_aborts_the_implicit_transaction() {
    let (db, direct) = db_with_t("rv_dup").await;
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    a.prepare("s1", "SELECT 1").await;
    let mut b = BytesMut::new();
    raw::parse(&mut b, "", "INSERT INTO t VALUES (1)");
    raw::bind(&mut b, "", "", &[]);
    raw::execute(&mut b, "", 0);
    raw::parse(&mut b, "s1", "SELECT 2");
    raw::sync(&mut b);
    a.send(&b).await;
    let (_, errs) = raw::rows_and_errors(&a.until_ready().await);
    assert!(errs.len() == 1 && errs[0].starts_with("42P05"), "{errs:?}");
    assert_eq!(support::scalar(&direct, "SELECT count(*) FROM t").await, "0", "INSERT committed despite the error");
    p.stop().await;
}

/// SQL PREPARE outside the leading position pins the client too; when it
/// leaves, no client-named statement stays on the pooled server connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_in_multi_statement_is_cleaned_up() {
    let db = support::fresh_db("rv_prep");
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    let mut b = BytesMut::new();
    q(&mut b, "SELECT 1; PREPARE rv_leak AS SELECT 42");
    a.send(&b).await;
    let (_, errs) = raw::rows_and_errors(&a.until_ready().await);
    drop(a);
    let c = support::app(&p, &db).await;
    let n = support::scalar(&c, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'rv_leak'").await;
    assert!(errs.is_empty(), "{errs:?}");
    assert_eq!(n, "0", "PREPARE not cleaned up: the next client sees it");
    p.stop().await;
}

// --------------------------------------------------------------------- COPY

/// Extended-protocol COPY that fails mid-stream, the client's remaining
/// CopyData/CopyDone/Sync arriving after the server's error (a large
/// upload): the reply queue must stay in step, the connection be released,
/// and later synthetic replies come in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_error_midstream_releases_and_stays_in_sync() {
    let (db, _direct) = db_with_t("rv_xcopy").await;
    let p = support::proxy(&db, "default_pool_size = 1\nquery_wait_timeout = \"2s\"").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    // s1 prepared on the server, so a later Parse of the same text is synthetic.
    a.prepare("s1", "SELECT 5").await;
    let mut b = BytesMut::new();
    raw::parse(&mut b, "", "COPY t FROM STDIN");
    raw::bind(&mut b, "", "", &[]);
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    a.send(&b).await;
    recv_until(&mut a, b'G').await;
    let mut b = BytesMut::new();
    raw::copy_data(&mut b, b"not a number\n");
    a.send(&b).await;
    recv_until(&mut a, b'E').await;
    // The rest of the upload was already on its way.
    let mut b = BytesMut::new();
    raw::copy_data(&mut b, b"1\n");
    raw::copy_done(&mut b);
    raw::sync(&mut b);
    a.send(&b).await;
    let tail = a.until_ready().await;
    assert_eq!(tail.iter().map(|m| m.0).collect::<Vec<_>>(), vec![b'Z']);
    // Queue in sync: Parse of a statement the server has, then Sync.
    let mut b = BytesMut::new();
    raw::parse(&mut b, "s2", "SELECT 5");
    raw::sync(&mut b);
    a.send(&b).await;
    let mut tags: Vec<u8> = a.until_ready().await.iter().map(|m| m.0).collect();
    if tags == [b'Z'] {
        // pgmux: the ParseComplete arrives after the ReadyForQuery.
        if let Ok(Some((t, _))) = tokio::time::timeout(Duration::from_millis(500), a.try_recv()).await {
            tags.push(t);
        }
    }
    assert_eq!(tags, vec![b'1', b'Z'], "ParseComplete must precede ReadyForQuery");
    assert_eq!(other_client(p.addr.port(), &db).await, Ok(()), "server connection never released");
    p.stop().await;
}

/// Simple-query COPY failing mid-stream; the client's CopyDone arrives after
/// the error (PostgreSQL drops it). The connection must still be released
/// after the client's next query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_copy_error_midstream_then_copy_done() {
    let (db, _direct) = db_with_t("rv_scopy").await;
    let p = support::proxy(&db, "default_pool_size = 1\nquery_wait_timeout = \"2s\"").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    let mut b = BytesMut::new();
    q(&mut b, "COPY t FROM STDIN");
    a.send(&b).await;
    recv_until(&mut a, b'G').await;
    let mut b = BytesMut::new();
    raw::copy_data(&mut b, b"not a number\n");
    a.send(&b).await;
    a.until_ready().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut b = BytesMut::new();
    raw::copy_done(&mut b);
    a.send(&b).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Next query of A fails (any error).
    let mut b = BytesMut::new();
    q(&mut b, "SELECT 1/0");
    a.send(&b).await;
    let (_, errs) = raw::rows_and_errors(&a.until_ready().await);
    assert_eq!(errs.len(), 1);
    let mut b = BytesMut::new();
    q(&mut b, "SELECT 1");
    a.send(&b).await;
    a.until_ready().await;
    assert_eq!(other_client(p.addr.port(), &db).await, Ok(()), "server connection pinned to A");
    p.stop().await;
}

/// Two COPY FROM STDIN pipelined in one write (data and CopyDone right
/// behind each Query).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipelined_copies_release() {
    let (db, _direct) = db_with_t("rv_2copy").await;
    let p = support::proxy(&db, "default_pool_size = 1\nquery_wait_timeout = \"2s\"").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    let mut b = BytesMut::new();
    two_pipelined_copies(&mut b);
    a.send(&b).await;
    for _ in 0..2 {
        let (_, errs) = raw::rows_and_errors(&a.until_ready().await);
        assert!(errs.is_empty(), "{errs:?}");
    }
    assert_eq!(other_client(p.addr.port(), &db).await, Ok(()), "server connection pinned to A");
    p.stop().await;
}

/// A lone Flush, then simple queries only: nothing is pending on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_then_simple_query_releases() {
    let db = support::fresh_db("rv_flush");
    let p = support::proxy(&db, "default_pool_size = 1\nquery_wait_timeout = \"2s\"").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    let mut b = BytesMut::new();
    flush(&mut b);
    q(&mut b, "SELECT 1");
    a.send(&b).await;
    a.until_ready().await;
    assert_eq!(other_client(p.addr.port(), &db).await, Ok(()), "server connection pinned to A");
    p.stop().await;
}

/// A simple Query pipelined after an extended-protocol error and before the
/// Sync is ignored by PostgreSQL (ignore till Sync): only one ReadyForQuery
/// comes, and the connection must still be released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_skipped_after_extended_error_releases() {
    let db = support::fresh_db("rv_skipq");
    let p = support::proxy(&db, "default_pool_size = 1\nquery_wait_timeout = \"2s\"").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    let mut b = BytesMut::new();
    raw::parse(&mut b, "", "SELEC 1");
    q(&mut b, "SELECT 1");
    raw::sync(&mut b);
    a.send(&b).await;
    let (_, errs) = raw::rows_and_errors(&a.until_ready().await);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let mut b = BytesMut::new();
    q(&mut b, "SELECT 2");
    a.send(&b).await;
    a.until_ready().await;
    assert_eq!(other_client(p.addr.port(), &db).await, Ok(()), "server connection pinned to A");
    p.stop().await;
}

/// An error pgmux makes up inside an explicit transaction (a Parse of a
/// name the client already uses) must leave the transaction failed ('E'),
/// so COMMIT rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulated_error_fails_the_explicit_transaction() {
    let (db, direct) = db_with_t("rv_prepx").await;
    let p = support::proxy(&db, "default_pool_size = 1").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    for sql in ["BEGIN", "INSERT INTO t VALUES (1)"] {
        let mut b = BytesMut::new();
        q(&mut b, sql);
        a.send(&b).await;
        a.until_ready().await;
    }
    let mut b = BytesMut::new();
    raw::parse(&mut b, "dup", "SELECT 1");
    raw::sync(&mut b);
    a.send(&b).await;
    a.until_ready().await;
    let mut b = BytesMut::new();
    raw::parse(&mut b, "dup", "SELECT 2");
    raw::sync(&mut b);
    a.send(&b).await;
    let reply = a.until_ready().await;
    assert_eq!(raw::rows_and_errors(&reply).1.len(), 1);
    let status = reply.last().unwrap().1[0];
    let mut b = BytesMut::new();
    q(&mut b, "COMMIT");
    a.send(&b).await;
    a.until_ready().await;
    let n = support::scalar(&direct, "SELECT count(*) FROM t").await;
    assert_eq!((status as char, n.as_str()), ('E', "0"), "transaction not failed by the error; COMMIT committed");
    p.stop().await;
}

/// After two pipelined COPYs, a client that disconnects with a query in
/// flight: pgmux must drain every ReadyForQuery (or close the connection)
/// so the next client never gets a stray reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_after_pipelined_copies_next_client_in_sync() {
    let (db, _direct) = db_with_t("rv_dirty").await;
    let p = support::proxy(&db, "default_pool_size = 1\nquery_wait_timeout = \"20s\"").await;
    let mut a = raw_login(p.addr.port(), &db).await;
    let mut b = BytesMut::new();
    two_pipelined_copies(&mut b);
    a.send(&b).await;
    a.until_ready().await;
    a.until_ready().await;
    // B waits for the (pinned) connection.
    let c = support::app(&p, &db).await;
    let waiter = tokio::spawn(async move {
        let mut seen = Vec::new();
        for sql in ["SELECT 1", "SELECT 2", "SELECT 3"] {
            let rows = c.simple_query(sql).await.map_err(|e| support::text(&e));
            let v = rows.map(|m| {
                m.iter()
                    .filter_map(|r| match r {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            });
            seen.push(v);
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut b = BytesMut::new();
    raw::parse(&mut b, "", "SELECT pg_sleep(0.3)");
    raw::bind(&mut b, "", "", &[]);
    raw::execute(&mut b, "", 0);
    raw::sync(&mut b);
    a.send(&b).await;
    drop(a);
    let seen = tokio::time::timeout(Duration::from_secs(30), waiter).await.expect("B hangs").unwrap();
    let want: Vec<Result<Vec<String>, String>> = vec![Ok(vec!["1".into()]), Ok(vec!["2".into()]), Ok(vec!["3".into()])];
    assert_eq!(seen, want);
    p.stop().await;
}
