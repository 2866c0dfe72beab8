//! Network faults between pgmux and its server, through a TCP fault proxy
//! in the test: when the path blackholes, a query in flight is canceled at
//! `query_timeout` (its client told `57014`), a new server connection fails
//! at `server_connect_timeout` (`08006`, the session goes on), no client
//! hangs; when the path heals, pgmux serves again without a restart.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{code, text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards TCP to `target`; while `stalled`, bytes stop flowing both ways
/// and new connections are held without reaching the target.
struct FaultProxy {
    addr: std::net::SocketAddr,
    stalled: Arc<AtomicBool>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl FaultProxy {
    async fn start(target: String) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (flag, target) = (flag.clone(), target.clone());
                tokio::spawn(async move {
                    while flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let Ok(server) = TcpStream::connect(&target).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, flag.clone()), pump(sr, cw, flag));
                });
            }
        });
        FaultProxy { addr, stalled }
    }

    fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_network_times_out_and_recovers() {
    let db = support::fresh_db("faults");
    let fault = FaultProxy::start(support::cluster().primary.addr()).await;
    let cfg = support::config_text(&db, "server_connect_timeout = \"1s\"\nquery_timeout = \"2s\"", "").replace(
        &format!("primary = \"{}\"", support::cluster().primary.addr()),
        &format!("primary = \"{}\"", fault.addr),
    );
    let p = support::start_proxy(&cfg).await;
    let a = support::app(&p, &db).await;
    let b = support::app(&p, &db).await;
    assert_eq!(support::scalar(&a, "SELECT 1").await, "1");
    a.batch_execute(support::invariants::TABLE).await.unwrap();
    a.batch_execute(&format!("GRANT ALL ON invariants TO {}", support::TRUSTUSER.0)).await.unwrap();
    // Its own pool (another user): the checker takes none of app's connections.
    let url = support::conn_str(p.addr.port(), support::TRUSTUSER.0, "x", &db);
    let checker = support::invariants::Checker::start(&url, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The path stalls mid-query: canceled at query_timeout.
    fault.stall(true);
    let started = Instant::now();
    let e = a.simple_query("SELECT 2").await.unwrap_err();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(5), "{took:?}");
    assert!(code(&e) == "57014" || a.is_closed(), "{}", text(&e));

    // A new server connection cannot log in: server_connect_timeout, and
    // the session goes on.
    let started = Instant::now();
    let e = b.simple_query("SELECT 3").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert_eq!(code(&e), "08006", "{}", text(&e));

    // Healed: the same session, and new clients, are served.
    fault.stall(false);
    assert_eq!(support::scalar(&b, "SELECT 4").await, "4");
    assert_eq!(support::scalar(&support::app(&p, &db).await, "SELECT 5").await, "5");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = checker.finish().await;
    assert!(tally.writes > 0 && tally.failed > 0, "{tally:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_copy_and_mid_transaction_leaves_a_clean_connection() {
    use pgmux::protocol::messages as msg;
    use support::raw::Raw;
    let db = support::fresh_db("faults_copy");
    let p = support::start_proxy(&support::config_text(&db, "default_pool_size = 1", "")).await;
    let port = p.addr.port();
    let trust = support::TRUSTUSER.0;
    let mut s = Raw::login(port, trust, "", &db, &[]).await;
    s.query("CREATE TABLE t (x int); GRANT ALL ON t TO PUBLIC").await;
    // Killed mid-COPY: CopyInResponse received, some rows sent, socket gone.
    let mut q = bytes::BytesMut::new();
    msg::query(&mut q, "COPY t FROM STDIN");
    s.send(&q).await;
    assert_eq!(s.recv().await.0, b'G');
    s.send(b"d\0\0\0\x0a1\n2\n3\n").await;
    drop(s);
    // Killed mid-transaction, holding a row lock.
    let mut s = Raw::login(port, trust, "", &db, &[]).await;
    s.query("BEGIN; INSERT INTO t VALUES (9); LOCK TABLE t IN ACCESS EXCLUSIVE MODE").await;
    drop(s);
    // The pool's one server connection comes back clean: nothing of
    // either, no lock, no open transaction.
    let c = support::connect_str(&support::conn_str(port, support::TRUSTUSER.0, "x", &db)).await.unwrap();
    let started = Instant::now();
    assert_eq!(support::scalar(&c, "SELECT count(*) FROM t").await, "0");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(support::scalar(&c, "SELECT now() = statement_timestamp()").await, "t", "not inside an old transaction");
    let direct = support::direct(&db).await;
    let idle_in_txn = support::scalar(
        &direct,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND state LIKE 'idle in transaction%'"),
    )
    .await;
    assert_eq!(idle_in_txn, "0");
    p.stop().await;
}
