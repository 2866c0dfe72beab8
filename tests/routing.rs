//! Read/write splitting on a real primary + 2 streaming replicas: reads go
//! to healthy replicas within the lag bounds, writes and transactions to
//! the primary, hints are honoured, read-your-writes holds.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use pgmux::proxy::RunningProxy;
use pgmux_testkit::Cluster;
use support::replicated::{self, SERIAL};
use support::scalar;
use tokio_postgres::types::Type;

fn cluster() -> Cluster {
    replicated::cluster()
}

/// pgmux in front of the cluster; `max_lag_bytes` small enough for the lag
/// test, generous for the others (so background WAL never diverts a read).
async fn proxy(c: &Cluster, max_lag_bytes: u64) -> RunningProxy {
    replicated::start(&replicated::config(c, "", &format!("max_lag_bytes = {max_lag_bytes}"))).await
}

async fn client(p: &RunningProxy) -> tokio_postgres::Client {
    replicated::client(p).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_to_replicas_writes_and_transactions_to_primary() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let p = proxy(&c, 16 * 1024 * 1024).await;
    let cl = client(&p).await;
    let primary = c.primary.port.to_string();
    let replicas: HashSet<String> = c.replicas.iter().map(|r| r.port.to_string()).collect();
    // DDL from another client: this one has not written (read-your-writes
    // would send its next reads to the primary until replicas catch up).
    client(&p).await.simple_query("CREATE TABLE t (id int primary key, v text)").await.unwrap();
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let port = scalar(&cl, "SELECT inet_server_port()").await;
        assert!(replicas.contains(&port), "read went to {port}");
        seen.insert(port);
        // Extended protocol reads too.
        let row = cl.query_typed("SELECT inet_server_port()::text, pg_is_in_recovery()", &[]).await.unwrap();
        assert!(row[0].get::<_, bool>(1));
        seen.insert(row[0].get::<_, String>(0));
    }
    assert_eq!(seen.len(), 2, "round robin over both replicas");
    // Writes, locking reads, write functions: primary.
    for sql in [
        "INSERT INTO t VALUES (1, 'a') RETURNING inet_server_port()",
        "SELECT inet_server_port() FROM t WHERE id = 1 FOR UPDATE",
        "SELECT inet_server_port() FROM (SELECT pg_advisory_xact_lock(1)) x",
    ] {
        assert_eq!(scalar(&cl, sql).await, primary, "{sql}");
    }
    // A transaction stays on the primary, reads included.
    cl.simple_query("BEGIN").await.unwrap();
    assert_eq!(scalar(&cl, "SELECT inet_server_port()").await, primary);
    cl.simple_query("COMMIT").await.unwrap();
    // Hints.
    assert_eq!(scalar(&cl, "/* pgmux: primary */ SELECT inet_server_port()").await, primary);
    // A read-only transaction may go to a replica (once replicas have
    // replayed this client's writes: read-your-writes).
    tokio::time::sleep(Duration::from_millis(400)).await;
    cl.simple_query("BEGIN READ ONLY").await.unwrap();
    let port = scalar(&cl, "SELECT inet_server_port()").await;
    cl.simple_query("COMMIT").await.unwrap();
    assert!(replicas.contains(&port), "BEGIN READ ONLY went to {port}");
    // The session setting pgmux.route overrides; a SET is no write, so
    // read-your-writes does not hold reads back afterwards.
    cl.simple_query("SET pgmux.route = 'primary'").await.unwrap();
    for _ in 0..3 {
        assert_eq!(scalar(&cl, "SELECT inet_server_port()").await, primary);
    }
    cl.simple_query("SET pgmux.route = 'auto'").await.unwrap();
    let port = scalar(&cl, "SELECT inet_server_port()").await;
    assert!(replicas.contains(&port), "after pgmux.route = 'auto' a read went to {port}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_never_reads_stale() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    // One replica replays slowly: each commit is applied 30 ms late.
    let slow = &c.replicas[0];
    c.psql(slow, "postgres", "ALTER SYSTEM SET recovery_min_apply_delay = '30ms'").unwrap();
    c.psql(slow, "postgres", "SELECT pg_reload_conf()").unwrap();
    let p = proxy(&c, 16 * 1024 * 1024).await;
    let cl = client(&p).await;
    cl.simple_query("CREATE TABLE w (id int primary key)").await.unwrap();
    let mut on_replica = 0;
    for i in 0..1000i32 {
        cl.execute_typed("INSERT INTO w VALUES ($1)", &[(&i, Type::INT4)]).await.unwrap();
        if i % 50 == 49 {
            // Time for fresh samples: this read may go to a replica that
            // has replayed the write (the fast one), and must see it.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let row = cl
            .query_typed("SELECT count(*), pg_is_in_recovery() FROM w WHERE id = $1", &[(&i, Type::INT4)])
            .await
            .unwrap();
        assert_eq!(row[0].get::<_, i64>(0), 1, "stale read of row {i}");
        if row[0].get::<_, bool>(1) {
            on_replica += 1;
        }
    }
    assert!(on_replica > 0, "no read went to a replica that had caught up");
    // Another client that did not write reads from replicas (once they are
    // back within max_lag_bytes after the burst of writes).
    let other = client(&p).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while scalar(&other, "SELECT pg_is_in_recovery()").await != "t" {
        assert!(Instant::now() < deadline, "reads of a client that never wrote stay on the primary");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_gets_no_reads_until_it_catches_up() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let p = proxy(&c, 1024).await;
    let cl = client(&p).await;
    let paused = &c.replicas[0];
    c.psql(paused, "postgres", "SELECT pg_wal_replay_pause()").unwrap();
    let writer = client(&p).await;
    writer.simple_query("CREATE TABLE lag (x text)").await.unwrap();
    writer.simple_query("INSERT INTO lag SELECT repeat('x', 100) FROM generate_series(1, 200)").await.unwrap();
    // Within two check intervals the paused replica is out.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let ports: HashSet<String> =
            futures_util::future::join_all((0..10).map(|_| scalar(&cl, "SELECT inet_server_port()")))
                .await
                .into_iter()
                .collect();
        if !ports.contains(&paused.port.to_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "paused replica still gets reads: {ports:?}");
    }
    c.psql(paused, "postgres", "SELECT pg_wal_replay_resume()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let port = scalar(&cl, "SELECT inet_server_port()").await;
        if port == paused.port.to_string() {
            break;
        }
        assert!(Instant::now() < deadline, "resumed replica never came back");
    }
    p.stop().await;
}

/// An extended-protocol batch is routed at its first Execute/Sync/Flush,
/// by every Parse before it: a read's Parse and Bind sent ahead, then a
/// write's, in another packet, all go to the primary together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_batch_routed_at_its_first_execute() {
    use bytes::BytesMut;
    use support::raw::{self, Raw};
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let p = proxy(&c, 16 * 1024 * 1024).await;
    client(&p).await.simple_query("CREATE TABLE eb (x int)").await.unwrap();
    let mut r = Raw::login(p.addr.port(), support::APP.0, support::APP.1, "app", &[]).await;
    let mut b = BytesMut::new();
    raw::parse(&mut b, "", "SELECT inet_server_port()::text");
    raw::bind(&mut b, "p1", "", &[]);
    r.send(&b).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut b = BytesMut::new();
    raw::parse(&mut b, "", "INSERT INTO eb VALUES (1) RETURNING inet_server_port()::text");
    raw::bind(&mut b, "p2", "", &[]);
    raw::execute(&mut b, "p1", 0);
    raw::execute(&mut b, "p2", 0);
    raw::sync(&mut b);
    r.send(&b).await;
    let (rows, errors) = raw::rows_and_errors(&r.until_ready().await);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(rows, vec![c.primary.port.to_string(); 2]);
    p.stop().await;
}
