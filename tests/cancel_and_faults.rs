//! Cancel requests and server failures through pgmux.

mod support;

use std::time::{Duration, Instant};

use support::{code, scalar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let db = support::fresh_db("cancel");
    let p = support::proxy(&db, "default_pool_size = 2").await;
    let c = support::app(&p, &db).await;
    let token = c.cancel_token();
    let started = Instant::now();
    let q = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(30)").await;
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(NoTls).await.expect("send cancel");
    let (c, r) = q.await.unwrap();
    let e = r.expect_err("query must be cancelled");
    assert_eq!(code(&e), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The session goes on, and a cancel while idle is a no-op.
    token.cancel_query(NoTls).await.expect("idle cancel");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(scalar(&c, "SELECT 'still here'").await, "still here");
    // A cancel with a made-up key does nothing to anyone.
    let other = support::app(&p, &db).await;
    let q = tokio::spawn(async move { other.simple_query("SELECT pg_sleep(1)").await.map(|_| ()) });
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut b = bytes::BytesMut::new();
    pgmux::protocol::messages::cancel_request(&mut b, 12345, 678);
    s.write_all(&b).await.unwrap();
    assert!(q.await.unwrap().is_ok());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backend_fails_only_its_client() {
    let db = support::fresh_db("fault_term");
    let p = support::proxy(&db, "default_pool_size = 5").await;
    let direct = support::direct(&db).await;
    let bystander = support::app(&p, &db).await;
    bystander.simple_query("BEGIN").await.unwrap();
    let by_pid = scalar(&bystander, "SELECT pg_backend_pid()").await;
    // Outside a transaction (simple and extended protocol), and inside one.
    let (simple, extended, in_txn) =
        (support::app(&p, &db).await, support::app(&p, &db).await, support::app(&p, &db).await);
    in_txn.simple_query("BEGIN").await.unwrap();
    let victims = tokio::spawn(async move {
        let (a, b, c) = tokio::join!(
            simple.simple_query("SELECT pg_sleep(30)"),
            extended.query("SELECT pg_sleep(30)::text", &[]),
            in_txn.simple_query("SELECT pg_sleep(30)")
        );
        let errors = [a.map(|_| ()), b.map(|_| ()), c.map(|_| ())].map(|r| r.expect_err("a victim must see an error"));
        (simple, extended, in_txn, errors)
    });
    let terminate = format!(
        "SELECT count(pg_terminate_backend(pid))::text FROM pg_stat_activity \
         WHERE datname = '{db}' AND query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while scalar(&direct, &terminate.replace("count(pg_terminate_backend(pid))", "count(*)")).await != "3" {
        assert!(Instant::now() < deadline, "the three queries never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scalar(&direct, &terminate).await, "3");
    let (simple, extended, in_txn, errors) = victims.await.unwrap();
    // Outside a transaction: an error (the statement may or may not have
    // run), and the session goes on with a new server connection.
    for (c, e) in [(&simple, &errors[0]), (&extended, &errors[1])] {
        assert_eq!(code(e), "08006", "{}", support::text(e));
        let detail = e.as_db_error().and_then(|d| d.detail()).unwrap_or_default();
        assert!(detail.contains("may or may not have run"), "{detail}");
        assert_eq!(scalar(c, "SELECT 'still here'").await, "still here");
        let row = c.query_one("SELECT $1::int + 1", &[&41i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
    }
    // Inside a transaction the transaction is gone: so is the session, as
    // when PostgreSQL ends a backend.
    assert!(code(&errors[2]) == "57P01" || code(&errors[2]) == "08006", "{}", support::text(&errors[2]));
    assert!(in_txn.simple_query("SELECT 1").await.is_err() && in_txn.is_closed());
    // The bystander's transaction carries on, on the same backend.
    assert_eq!(scalar(&bystander, "SELECT pg_backend_pid()").await, by_pid);
    bystander.simple_query("COMMIT").await.unwrap();
    // New clients get healthy connections.
    for _ in 0..5 {
        let c = support::app(&p, &db).await;
        assert_eq!(scalar(&c, "SELECT 1").await, "1");
    }
    p.stop().await;
}

/// A TCP forwarder that can cut every connection passing through it.
async fn cutter(target: String) -> (u16, watch::Sender<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let target = target.clone();
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                let (mut ri, mut wi) = inbound.split();
                let (mut ro, mut wo) = outbound.split();
                let a = async {
                    let mut b = [0u8; 8192];
                    loop {
                        let n = ri.read(&mut b).await.unwrap_or(0);
                        if n == 0 || wo.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let b = async {
                    let mut b = [0u8; 8192];
                    loop {
                        let n = ro.read(&mut b).await.unwrap_or(0);
                        if n == 0 || wi.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = a => {}
                    _ = b => {}
                    _ = rx.wait_for(|cut| *cut) => {}
                }
            });
        }
    });
    (port, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_death_gives_08006() {
    let db = support::fresh_db("fault_silent");
    let (port, cut) = cutter(support::cluster().primary.addr()).await;
    let text =
        support::config_text(&db, "default_pool_size = 2", "[databases.other]\nprimary = \"PRIMARY\"\ndbname = \"DB\"")
            .replacen(&support::cluster().primary.addr(), &format!("127.0.0.1:{port}"), 1)
            .replace("PRIMARY", &support::cluster().primary.addr())
            .replace("\"DB\"", &format!("\"{db}\""));
    let p = support::start_proxy(&text).await;
    let victim = support::app(&p, &db).await;
    let other = support::app(&p, "other").await;
    let q = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cut.send(true).unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), q)
        .await
        .expect("client must not hang")
        .unwrap()
        .expect_err("error expected");
    assert_eq!(code(&e), "08006", "{}", support::text(&e));
    // Clients of other server connections are unaffected.
    assert_eq!(scalar(&other, "SELECT 'fine'").await, "fine");
    p.stop().await;
}
