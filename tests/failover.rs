//! Faults on a real primary + 2 streaming replicas: a replica killed under
//! read load (no client sees it), the primary down (writes fail fast and
//! clearly, reads go on), a replica promoted (writes follow it), and a
//! primary that is in fact a standby (never sent a write).

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::invariants;
use support::replicated::{self, client, SERIAL};
use support::{code, scalar, text};

const PORT: &str = "SELECT inet_server_port()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_mid_load_no_read_fails() {
    let _serial = SERIAL.lock().await;
    let c = replicated::cluster();
    let p = replicated::start(&replicated::config(&c, "", "")).await;
    client(&p).await.batch_execute(invariants::TABLE).await.unwrap();
    c.wait_replicas_caught_up().unwrap();
    let checker = invariants::Checker::start(&replicated::url(&p), 4);
    let killed = c.replicas[0].port;
    let stop = Instant::now() + Duration::from_secs(4);
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for n in 0..8 {
        let cl = client(&p).await;
        let reads = reads.clone();
        readers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while Instant::now() < stop {
                // Simple and extended protocol alike.
                let port = if n % 2 == 0 {
                    cl.simple_query(PORT).await.map(|m| match &m[1] {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap_or("").parse().unwrap_or(0),
                        _ => 0,
                    })
                } else {
                    cl.query_one("SELECT inet_server_port()::int", &[]).await.map(|r| r.get::<_, i32>(0) as u16)
                };
                let port = port.unwrap_or_else(|e| panic!("a read failed: {}", text(&e)));
                seen.push((Instant::now(), port));
                reads.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill_node(&c.replicas[0]).unwrap();
    let killed_at = Instant::now();
    let mut after = HashSet::new();
    for r in readers {
        for (at, port) in r.await.expect("no reader may fail") {
            if at > killed_at {
                after.insert(port);
            }
        }
    }
    assert!(!after.contains(&killed), "reads went to the killed replica after it died");
    assert!(after.contains(&c.replicas[1].port), "the surviving replica took the reads: {after:?}");
    let m = p.proxy.monitor("app").unwrap();
    assert!(!m.replica(0).reachable || m.replica(0).banned_until.is_some());
    eprintln!("{} reads, none failed", reads.load(Ordering::Relaxed));
    let tally = checker.finish().await;
    assert!(tally.writes > 0 && tally.reads > 0, "{tally:?}");
    assert_eq!(tally.failed, 0, "nothing but a replica failed: {tally:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_then_promotion_is_followed() {
    let _serial = SERIAL.lock().await;
    let c = replicated::cluster();
    let text_cfg = replicated::config(&c, "server_connect_timeout = \"1s\"", "follow_promotion = true");
    let p = replicated::start(&text_cfg).await;
    let cl = client(&p).await;
    cl.simple_query("CREATE TABLE f (x int)").await.unwrap();
    cl.batch_execute(invariants::TABLE).await.unwrap();
    c.wait_replicas_caught_up().unwrap();
    let checker = invariants::Checker::start(&replicated::url(&p), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The monitor samples the primary after `cl`'s last write first: its
    // reads during the outage need that proof.
    p.proxy.monitor("app").unwrap().wait_sample().await;
    c.stop_node(&c.primary).unwrap();
    // Writes fail fast with a clear error; the session and reads go on.
    let t0 = Instant::now();
    let e = cl.simple_query("INSERT INTO f VALUES (1)").await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3), "write took {:?}", t0.elapsed());
    assert!(code(&e).starts_with("08"), "{}", text(&e));
    let replicas = HashSet::from([c.replicas[0].port, c.replicas[1].port]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = p.proxy.monitor("app").unwrap();
    for _ in 0..5 {
        match cl.simple_query(PORT).await {
            Ok(rows) => match &rows[1] {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    assert!(replicas.contains(&r.get(0).unwrap_or("").parse().unwrap_or(0)))
                }
                other => panic!("unexpected {other:?}"),
            },
            Err(e) => panic!(
                "a read failed with the primary down: {}\nprimary {:?}\nreplica 0 {:?}\nreplica 1 {:?}",
                text(&e),
                m.primary(),
                m.replica(0),
                m.replica(1)
            ),
        }
    }
    // Promote replica 0: writes follow within a few check intervals.
    c.psql(&c.replicas[0], "postgres", "SELECT pg_promote()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let port = loop {
        match cl.simple_query("INSERT INTO f VALUES (2) RETURNING inet_server_port()").await {
            Ok(m) => match &m[1] {
                tokio_postgres::SimpleQueryMessage::Row(r) => break r.get(0).unwrap_or("").to_string(),
                other => panic!("unexpected {other:?}"),
            },
            Err(e) => assert!(Instant::now() < deadline, "writes never followed the promotion: {}", text(&e)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(port, c.replicas[0].port.to_string());
    // Read-your-writes follows too: the read sees the write (replica 1
    // still follows the dead primary and has not got it).
    assert_eq!(scalar(&cl, "SELECT count(*) FROM f").await, "1");
    assert_eq!(scalar(&cl, "/* pgmux: primary */ SELECT pg_is_in_recovery()").await, "f");
    let tally = checker.finish().await;
    eprintln!("{tally:?}");
    assert!(tally.writes > 0 && tally.reads > 0, "{tally:?}");
    assert_eq!(tally.reconnects, 0, "{tally:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_as_primary_is_never_sent_a_write() {
    let _serial = SERIAL.lock().await;
    let c = replicated::cluster();
    let text_cfg = replicated::config(&c, "", "").replacen(
        &format!("primary = \"{}\"", c.primary.addr()),
        &format!("primary = \"{}\"", c.replicas[1].addr()),
        1,
    );
    let p = replicated::start(&text_cfg).await;
    let cl = client(&p).await;
    let e = cl.simple_query("CREATE TABLE nope (x int)").await.unwrap_err();
    assert_eq!(code(&e), "25006", "{}", text(&e));
    assert!(text(&e).contains("pgmux") && text(&e).contains("recovery"), "{}", text(&e));
    // Reads still work.
    assert_eq!(scalar(&cl, "SELECT 'read'").await, "read");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_restart_writes_fail_fast_then_recover() {
    let _serial = SERIAL.lock().await;
    let c = replicated::cluster();
    let p = replicated::start(&replicated::config(&c, "server_connect_timeout = \"1s\"", "")).await;
    let cl = client(&p).await;
    cl.simple_query("CREATE TABLE r (x int)").await.unwrap();
    cl.batch_execute(invariants::TABLE).await.unwrap();
    c.wait_replicas_caught_up().unwrap();
    let checker = invariants::Checker::start(&replicated::url(&p), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.stop_node(&c.primary).unwrap();
    for _ in 0..3 {
        let t0 = Instant::now();
        let e = cl.simple_query("INSERT INTO r VALUES (1)").await.unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3), "write took {:?}", t0.elapsed());
        assert!(code(&e).starts_with("08"), "{}", text(&e));
    }
    c.start_node(&c.primary).unwrap();
    // The same session writes again once the primary is back: no restart
    // of pgmux, no reconnect of the client.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cl.simple_query("INSERT INTO r VALUES (2)").await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "writes did not recover: {}", text(&e)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(scalar(&cl, "/* pgmux: primary */ SELECT count(*) FROM r").await, "1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = checker.finish().await;
    eprintln!("{tally:?}");
    assert!(tally.writes > 0 && tally.failed > 0, "writes before and after, failures during: {tally:?}");
    // Errors during the outage, but no session lost: pgmux answers the
    // statements a dying server took with an error and the client goes on.
    assert_eq!(tally.reconnects, 0, "{tally:?}");
    p.stop().await;
}

/// Kill, on the primary, the backends that run a query with `marker` in
/// its text, one after another as they appear, `times` in all.
fn kill_running(c: &pgmux_testkit::Cluster, marker: &str, times: usize) {
    let mut killed: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let find = format!(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid() AND state = 'active'"
    );
    while killed.len() < times {
        if Instant::now() >= deadline {
            // Where the query ran instead, for the failure message.
            let all = "SELECT pid, state, query FROM pg_stat_activity WHERE backend_type = 'client backend'";
            for n in std::iter::once(&c.primary).chain(&c.replicas) {
                eprintln!("{}: {}", n.name, c.psql(n, "postgres", all).unwrap_or_default());
            }
        }
        assert!(Instant::now() < deadline, "only {} of {times} runs of {marker} seen", killed.len());
        let pids = c.psql(&c.primary, "postgres", &find).unwrap();
        for pid in
            pids.lines().filter(|p| !p.is_empty() && !killed.contains(*p)).map(str::to_string).collect::<Vec<_>>()
        {
            c.psql(&c.primary, "postgres", &format!("SELECT pg_terminate_backend({pid})")).unwrap();
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_server_dies_before_answering_runs_again_once() {
    let _serial = SERIAL.lock().await;
    let c = Arc::new(replicated::cluster());
    let p = replicated::start(&replicated::config(&c, "", "")).await;
    // Both replicas banned: reads go to the primary.
    let m = p.proxy.monitor("app").unwrap();
    for (backend, _) in m.snapshot().iter().skip(1) {
        assert!(m.hold(&backend.name, true));
    }
    // A sample in flight when BAN came does not lift it.
    m.wait_sample().await;
    assert!((0..2).all(|i| pgmux::backend::replicas::monitor::Monitor::is_banned(&m.replica(i))));
    let cl = Arc::new(client(&p).await);
    // Killed once: the read runs again on a new connection, unseen.
    let reader = cl.clone();
    let once = tokio::spawn(async move { scalar(&reader, "SELECT pg_sleep(0.5)::text || 'ran_once'").await });
    let killer = c.clone();
    tokio::task::spawn_blocking(move || kill_running(&killer, "ran_once", 1)).await.unwrap();
    assert_eq!(once.await.expect("the read was run again"), "ran_once");
    // Killed on its second run too: an error, and the session goes on.
    let reader = cl.clone();
    let twice = tokio::spawn(async move { reader.simple_query("SELECT pg_sleep(0.5)::text || 'ran_twice'").await });
    let killer = c.clone();
    tokio::task::spawn_blocking(move || kill_running(&killer, "ran_twice", 2)).await.unwrap();
    let e = twice.await.unwrap().expect_err("killed twice");
    assert_eq!(code(&e), "08006", "{}", text(&e));
    assert_eq!(scalar(&cl, "SELECT 'after'").await, "after");
    p.stop().await;
}
