//! What a client learns at startup, against real PostgreSQL: the
//! ParameterStatus values (the server's spelling of what the startup
//! packet set, as a direct connection reports them), the pid of its
//! BackendKeyData (the real one in session mode, cancel still working) and
//! the pid of the notifications it sends itself (the one of its key).

mod support;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgmux::protocol::messages as msg;
use support::raw::{rows_and_errors, Raw};
use support::{scalar, APP};
use tokio::io::AsyncWriteExt;

/// Startup settings in a spelling other than the server's.
const LOOSE: &[(&str, &str)] = &[("client_encoding", "utf8"), ("DateStyle", "sql,dmy"), ("TimeZone", "utc")];

async fn proxy(db: &str, mode: &str) -> pgmux::proxy::RunningProxy {
    support::proxy(db, &format!("default_pool_size = 2\npool_mode = \"{mode}\"")).await
}

/// (pid, channel, payload) of a NotificationResponse body.
fn notification(body: &[u8]) -> (i32, String, String) {
    let pid = i32::from_be_bytes(body[..4].try_into().expect("pid"));
    let mut parts = body[4..].split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).into_owned());
    (pid, parts.next().unwrap_or_default(), parts.next().unwrap_or_default())
}

/// The next message, which must be a NotificationResponse.
async fn next_notification(c: &mut Raw) -> (i32, String, String) {
    let (tag, body) = c.recv().await;
    assert_eq!(tag, b'A', "expected a notification");
    notification(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_values_are_the_servers_spelling() {
    let db = support::fresh_db("startup_spelling");
    let direct = Raw::login(support::cluster().primary.port, APP.0, APP.1, &db, LOOSE).await;
    assert_eq!(direct.params["client_encoding"], "UTF8", "{:?}", direct.params);
    assert_eq!(direct.params["DateStyle"], "SQL, DMY");
    assert_eq!(direct.params["TimeZone"], "UTC");
    for mode in ["transaction", "session"] {
        let p = proxy(&db, mode).await;
        // The first login learns the spellings from a server, the second
        // has them from the pool's cache.
        for round in 0..2 {
            let mut c = Raw::login(p.addr.port(), APP.0, APP.1, &db, LOOSE).await;
            assert_eq!(c.params, direct.params, "{mode} mode, login {round}");
            // What the client was told is what the server says: the first
            // transaction re-reports nothing.
            let mut q = BytesMut::new();
            msg::query(&mut q, "SHOW DateStyle");
            c.send(&q).await;
            let replies = c.until_ready().await;
            assert!(!replies.iter().any(|(t, _)| *t == b'S'), "{mode}: a ParameterStatus after login");
            assert_eq!(rows_and_errors(&replies).0, ["SQL, DMY"]);
        }
        // A value the server refuses fails the login, as it does there.
        let bad: &[(&str, &str)] = &[("client_encoding", "no-such-encoding")];
        let direct_err = Raw::try_login(support::cluster().primary.port, APP.0, APP.1, &db, bad).await.err();
        let err = Raw::try_login(p.addr.port(), APP.0, APP.1, &db, bad).await.err();
        let code = |e: &Option<String>| e.as_deref().and_then(|e| e.split(' ').next()).map(str::to_string);
        assert_eq!(code(&err), code(&direct_err), "{mode}: {err:?} vs {direct_err:?}");
        assert!(err.is_some(), "{mode}: an invalid client_encoding must fail the login");
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_key_carries_the_backend_pid() {
    let db = support::fresh_db("startup_pid");
    let p = proxy(&db, "session").await;
    let mut a = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    let mut b = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    for c in [&mut a, &mut b] {
        let pid = c.query("SELECT pg_backend_pid()").await.0;
        assert_eq!(pid, [c.key.0.to_string()], "BackendKeyData pid is the server connection's");
    }
    assert_ne!(a.key, b.key);
    // A client notifying itself sees that same pid.
    a.query("LISTEN startup_pid").await;
    let mut q = BytesMut::new();
    msg::query(&mut q, "NOTIFY startup_pid, 'me'");
    a.send(&q).await;
    let own: Vec<_> = a.until_ready().await.into_iter().filter(|(t, _)| *t == b'A').collect();
    assert_eq!(own.len(), 1);
    assert_eq!(notification(&own[0].1), (a.key.0, "startup_pid".into(), "me".into()));
    // The key still cancels the client's query (pgmux's secret, the real pid).
    let mut q = BytesMut::new();
    msg::query(&mut q, "SELECT pg_sleep(10)");
    let started = Instant::now();
    b.send(&q).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut cancel = BytesMut::new();
    msg::cancel_request(&mut cancel, b.key.0, b.key.1);
    let mut s = tokio::net::TcpStream::connect(p.addr).await.expect("connect for cancel");
    s.write_all(&cancel).await.expect("send cancel");
    let (_, errors) = rows_and_errors(&b.until_ready().await);
    assert!(errors.len() == 1 && errors[0].starts_with("57014"), "{errors:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "cancel took {:?}", started.elapsed());
    assert_eq!(b.query("SELECT pg_backend_pid()").await.0, [b.key.0.to_string()]);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_own_notifications_carry_the_key_pid() {
    let db = support::fresh_db("startup_notify");
    let p = proxy(&db, "transaction").await;
    let mut a = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    // LISTEN pins the client to its server connection.
    a.query("LISTEN startup_notify").await;
    let real = a.query("SELECT pg_backend_pid()").await.0;
    assert_ne!(real, [a.key.0.to_string()], "in transaction mode the key's pid is pgmux's");
    let mut q = BytesMut::new();
    msg::query(&mut q, "NOTIFY startup_notify, 'me'");
    a.send(&q).await;
    let own: Vec<_> = a.until_ready().await.into_iter().filter(|(t, _)| *t == b'A').collect();
    assert_eq!(own.len(), 1);
    assert_eq!(notification(&own[0].1), (a.key.0, "startup_notify".into(), "me".into()));
    // Another session's notification keeps its sender's real pid: a direct
    // connection, and another client of pgmux.
    let d = support::direct(&db).await;
    let direct_pid: i32 = scalar(&d, "SELECT pg_backend_pid()").await.parse().expect("pid");
    d.simple_query("NOTIFY startup_notify, 'direct'").await.expect("notify");
    assert_eq!(next_notification(&mut a).await, (direct_pid, "startup_notify".into(), "direct".into()));
    let mut b = Raw::login(p.addr.port(), APP.0, APP.1, &db, &[]).await;
    let (rows, errors) = b.query("SELECT pg_backend_pid(); NOTIFY startup_notify, 'pgmux'").await;
    assert!(errors.is_empty(), "{errors:?}");
    let b_pid: i32 = rows[0].parse().expect("pid");
    assert_ne!(b_pid, b.key.0);
    assert_eq!(next_notification(&mut a).await, (b_pid, "startup_notify".into(), "pgmux".into()));
    p.stop().await;
}
