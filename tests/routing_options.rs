//! The routing choices of a database, each on a real primary + 2 streaming
//! replicas: load balancing, primary reads, read-your-writes off,
//! transactions routed by their first statement, read-only sessions,
//! hints and their errors, and the write-function lists.

mod support;

use std::collections::HashSet;

use pgmux_testkit::free_port;
use support::replicated::{self, client, port_of, SERIAL};
use support::{code, scalar, text};

const PORT: &str = "SELECT inet_server_port()";

async fn ports(cl: &tokio_postgres::Client, n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(port_of(cl, PORT).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancing_modes_primary_reads_and_read_your_writes_off() {
    let _serial = SERIAL.lock().await;
    let c = replicated::cluster();
    let (primary, r0, r1) = (c.primary.port, c.replicas[0].port, c.replicas[1].port);
    let start = |db: String| replicated::start_owned(replicated::config(&c, "", &db));

    // weighted: a weight of 0 drains a replica.
    let p = start(format!(
        "replicas = [{{ addr = \"{}\", weight = 0 }}, {{ addr = \"{}\", weight = 3 }}]\nload_balancing = \"weighted\"",
        c.replicas[0].addr(),
        c.replicas[1].addr()
    ))
    .await;
    assert!(ports(&client(&p).await, 20).await.iter().all(|&port| port == r1), "weight 0 still gets reads");
    p.stop().await;

    // random: both replicas, never the primary.
    let p = start("load_balancing = \"random\"".into()).await;
    let seen: HashSet<u16> = ports(&client(&p).await, 40).await.into_iter().collect();
    assert_eq!(seen, HashSet::from([r0, r1]));
    p.stop().await;

    // primary_reads = always_eligible: the primary is one more candidate.
    let p = start("primary_reads = \"always_eligible\"".into()).await;
    let seen: HashSet<u16> = ports(&client(&p).await, 12).await.into_iter().collect();
    assert_eq!(seen, HashSet::from([primary, r0, r1]));
    p.stop().await;

    // least_connections: a transaction held open on one replica sends the
    // other clients' reads to the other one.
    let p = start("load_balancing = \"least_connections\"".into()).await;
    let holder = client(&p).await;
    holder.simple_query("BEGIN READ ONLY").await.unwrap();
    let held = port_of(&holder, PORT).await;
    let other = if held == r0 { r1 } else { r0 };
    assert!(ports(&client(&p).await, 10).await.iter().all(|&port| port == other), "reads went to the busy replica");
    holder.simple_query("COMMIT").await.unwrap();
    p.stop().await;

    // read_your_writes = "off": a read right after a write may go to a
    // replica (it is on by default: then it would go to the primary).
    let p = start("read_your_writes = \"off\"".into()).await;
    let cl = client(&p).await;
    cl.simple_query("CREATE TABLE ryw_off (x int)").await.unwrap();
    for _ in 0..10 {
        cl.simple_query("INSERT INTO ryw_off VALUES (1)").await.unwrap();
        assert_eq!(scalar(&cl, "SELECT pg_is_in_recovery()").await, "t");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_replicas_and_primary_reads_never() {
    let _serial = SERIAL.lock().await;
    let c = replicated::cluster();
    let dead = format!("replicas = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]", free_port().unwrap(), free_port().unwrap());
    // fallback (the default): reads go to the primary.
    let p = replicated::start(&replicated::config(&c, "", &dead)).await;
    let cl = client(&p).await;
    assert_eq!(ports(&cl, 5).await, vec![c.primary.port; 5]);
    assert!(!p.proxy.monitor("app").unwrap().replica(0).reachable);
    p.stop().await;
    // never: a read fails with a clear error; the session goes on.
    let p = replicated::start(&replicated::config(&c, "", &format!("{dead}\nprimary_reads = \"never\""))).await;
    let cl = client(&p).await;
    let e = cl.simple_query(PORT).await.unwrap_err();
    assert_eq!(code(&e), "57P03", "{}", text(&e));
    assert!(text(&e).contains("no replica"), "{}", text(&e));
    let e = cl.query_typed(PORT, &[]).await.unwrap_err();
    assert_eq!(code(&e), "57P03", "{}", text(&e));
    cl.simple_query("CREATE TABLE never_t (x int)").await.unwrap();
    assert_eq!(
        scalar(&cl, "INSERT INTO never_t VALUES (1) RETURNING inet_server_port()").await,
        c.primary.port.to_string()
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_routed_by_their_first_statement() {
    let _serial = SERIAL.lock().await;
    let c = replicated::cluster();
    let primary = c.primary.port;
    let replicas = HashSet::from([c.replicas[0].port, c.replicas[1].port]);
    let p = replicated::start(&replicated::config(&c, "", "transaction_routing = \"first_statement\"")).await;
    client(&p).await.simple_query("CREATE TABLE fs (x int)").await.unwrap();
    c.wait_replicas_caught_up().unwrap();
    let cl = client(&p).await;
    // Reads first: a replica, for the whole transaction.
    cl.simple_query("BEGIN").await.unwrap();
    let port = port_of(&cl, PORT).await;
    assert!(replicas.contains(&port), "read-first transaction went to {port}");
    assert_eq!(port_of(&cl, PORT).await, port);
    cl.simple_query("COMMIT").await.unwrap();
    // Writes first: the primary.
    cl.simple_query("START TRANSACTION").await.unwrap();
    assert_eq!(scalar(&cl, "INSERT INTO fs VALUES (1) RETURNING inet_server_port()").await, primary.to_string());
    assert_eq!(port_of(&cl, PORT).await, primary);
    cl.simple_query("COMMIT").await.unwrap();
    // Empty transactions never reach a server.
    for end in ["COMMIT", "ROLLBACK", "END"] {
        cl.simple_query("BEGIN").await.unwrap();
        cl.simple_query(end).await.unwrap();
    }
    // The driver's transaction API (BEGIN, then prepared statements).
    let mut other = client(&p).await;
    c.wait_replicas_caught_up().unwrap();
    let tx = other.transaction().await.unwrap();
    let row = tx.query_one("SELECT inet_server_port()::int, count(*) FROM fs", &[]).await.unwrap();
    assert!(replicas.contains(&(row.get::<_, i32>(0) as u16)));
    assert_eq!(row.get::<_, i64>(1), 1);
    tx.commit().await.unwrap();
    // A statement pgmux refuses fails the transaction; COMMIT rolls back.
    cl.simple_query("BEGIN").await.unwrap();
    let e = cl.simple_query("/* pgmux: sideways */ SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "42601", "{}", text(&e));
    let e = cl.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02", "{}", text(&e));
    cl.simple_query("COMMIT").await.unwrap();
    assert_eq!(scalar(&cl, "SELECT 'alive'").await, "alive");
    // A read-only session's transactions may go to a replica even with a
    // plain BEGIN.
    cl.simple_query("SET default_transaction_read_only = on").await.unwrap();
    // (This client wrote above: read-your-writes holds its reads on the
    // primary until the monitor has seen the replicas past that write.)
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    cl.simple_query("BEGIN").await.unwrap();
    assert!(replicas.contains(&port_of(&cl, PORT).await));
    cl.simple_query("COMMIT").await.unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_errors_and_write_function_lists() {
    let _serial = SERIAL.lock().await;
    let c = replicated::cluster();
    let primary = c.primary.port;
    let replicas = HashSet::from([c.replicas[0].port, c.replicas[1].port]);
    let p = replicated::start(&replicated::config(&c, "", "write_functions = [\"bump\"]")).await;
    let setup = client(&p).await;
    setup
        .batch_execute(
            "CREATE TABLE hits (n int);
             CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS 'INSERT INTO hits VALUES (1) RETURNING n';
             CREATE FUNCTION pure_fn() RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 1'",
        )
        .await
        .unwrap();
    c.wait_replicas_caught_up().unwrap();
    let cl = client(&p).await;
    const ON: &str = "(SELECT setting FROM pg_settings WHERE name = 'port')";
    let port: u16 = scalar(&cl, &format!("SELECT {ON}, pure_fn()")).await.parse().unwrap();
    assert!(replicas.contains(&port), "an unknown function is a read by default");
    // bump() writes: read-your-writes then holds this client's reads back,
    // so the checks below use another client.
    assert_eq!(scalar(&setup, &format!("SELECT {ON}, bump()")).await, primary.to_string());
    // Hints, both comment styles.
    assert_eq!(port_of(&cl, "-- pgmux: primary\nSELECT inet_server_port()").await, primary);
    assert!(replicas.contains(&port_of(&cl, "/* pgmux: replica */ SELECT inet_server_port()").await));
    // Unknown hints and pgmux.route values: clear errors, session intact,
    // in the simple and the extended protocol.
    let e = cl.simple_query("/* pgmux: sideways */ SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "42601", "{}", text(&e));
    assert!(text(&e).contains("unknown pgmux hint"), "{}", text(&e));
    let e = cl.query_typed("-- pgmux: shard=x\nSELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&e), "42601", "{}", text(&e));
    let e = cl.simple_query("SET pgmux.route = 'sideways'").await.unwrap_err();
    assert_eq!(code(&e), "22023", "{}", text(&e));
    assert_eq!(scalar(&cl, "SELECT 'alive'").await, "alive");
    p.stop().await;
    // functions_are_writes: only functions known to be read-only stay reads.
    let p = replicated::start(&replicated::config(&c, "", "functions_are_writes = true")).await;
    let cl = client(&p).await;
    let port: u16 = scalar(&cl, &format!("SELECT {ON}, lower('X')")).await.parse().unwrap();
    assert!(replicas.contains(&port), "lower() is read-only");
    assert_eq!(scalar(&cl, &format!("SELECT {ON}, pure_fn()")).await, primary.to_string());
    p.stop().await;
}
