//! The replica monitor against a real PostgreSQL cluster (primary + 2 replicas).
//! One test walks through every scenario in order on a single cluster, since a
//! cluster takes seconds to build on a 2-core machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgmux::backend::replicas::monitor::{Backend, Monitor, MonitorConfig};
use pgmux_testkit::{Cluster, ClusterSpec, Node};

const INTERVAL: Duration = Duration::from_millis(200);

fn backend(n: &Node) -> Backend {
    Backend { name: n.name.clone(), host: "127.0.0.1".into(), port: n.port }
}

fn psql(cluster: &Cluster, node: &Node, sql: &str) -> String {
    tokio::task::block_in_place(|| cluster.psql(node, "postgres", sql)).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn dump(m: &Monitor) -> String {
    let mut s = format!("primary: {:?}\n", m.primary());
    for i in 0..m.replica_count() {
        s += &format!("replica {i}: {:?}\n", m.replica(i));
    }
    s + &format!("eligible: {:?}", m.eligible_replicas())
}

/// Wait for sampling rounds until `cond` holds; panic with all states after `within`.
async fn wait_until(m: &Monitor, within: Duration, what: &str, cond: impl Fn(&Monitor) -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond(m) {
        assert!(t0.elapsed() < within, "not {what} within {within:?}:\n{}", dump(m));
        tokio::time::timeout(within, m.wait_sample()).await.expect("sampling round");
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_against_real_cluster() {
    let t_test = Instant::now();
    let spec = ClusterSpec { replicas: 2, ..Default::default() };
    let cluster = tokio::task::block_in_place(|| {
        let c = Cluster::start(&spec)?;
        c.wait_replicas_caught_up().map(|_| c)
    })
    .expect("cluster");
    eprintln!("cluster up after {:?}", t_test.elapsed());
    let (r0, r1) = (&cluster.replicas[0], &cluster.replicas[1]);
    let cfg = MonitorConfig {
        check_interval: INTERVAL,
        max_lag_bytes: Some(1024),
        max_lag: None,
        ban_time: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        user: "postgres".into(),
        password: Cluster::superuser_password().into(),
        dbname: "postgres".into(),
        ..MonitorConfig::default()
    };
    let replicas: Vec<Backend> = cluster.replicas.iter().map(backend).collect();
    let mon = Monitor::start(backend(&cluster.primary), replicas.clone(), cfg.clone());
    // No lag limits: eligibility ignores lag, replicas_at still checks replay.
    let unlimited_cfg = MonitorConfig { max_lag_bytes: None, ..cfg.clone() };
    let unlimited = Monitor::start(backend(&cluster.primary), replicas.clone(), unlimited_cfg);
    // Time-lag limit only.
    let timed_cfg = MonitorConfig { max_lag_bytes: None, max_lag: Some(Duration::from_millis(400)), ..cfg.clone() };
    let timed = Monitor::start(backend(&cluster.primary), replicas, timed_cfg);

    // (1) States after the first sample.
    mon.wait_sample().await;
    unlimited.wait_sample().await;
    let p = mon.primary();
    assert!(p.reachable && p.in_recovery == Some(false) && p.current_lsn.is_some(), "{}", dump(&mon));
    assert!(p.sampled_at.is_some() && p.last_error.is_none() && p.replay_lsn.is_none(), "{}", dump(&mon));
    assert_eq!(mon.primary_lsn(), p.current_lsn);
    for i in 0..2 {
        let r = mon.replica(i);
        assert!(r.reachable && r.in_recovery == Some(true), "{}", dump(&mon));
        assert!(r.replay_lsn.is_some() && r.receive_lsn.is_some() && r.current_lsn.is_none(), "{}", dump(&mon));
        assert!(r.lag_bytes.is_some_and(|l| l <= 1024), "{}", dump(&mon));
        assert_eq!(r.lag, Some(Duration::ZERO), "{}", dump(&mon));
    }
    assert_eq!(mon.eligible_replicas(), vec![0, 1], "{}", dump(&mon));
    assert_eq!(mon.promoted_replica(), None);
    eprintln!("(1) ok at {:?}", t_test.elapsed());

    // (2) Pause replay on replica 0, write on the primary.
    psql(&cluster, r0, "SELECT pg_wal_replay_pause()");
    psql(&cluster, &cluster.primary, "CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 2000)");
    let t_write = Instant::now();
    mon.wait_sample().await;
    mon.wait_sample().await;
    assert!(t_write.elapsed() < 3 * INTERVAL, "two rounds took {:?}", t_write.elapsed());
    let st = mon.replica(0);
    assert!(!mon.eligible_replicas().contains(&0), "{}", dump(&mon));
    assert!(st.lag_bytes.is_some_and(|l| l > 1024), "{}", dump(&mon));
    wait_until(&mon, 2 * INTERVAL + INTERVAL, "replica 1 eligible", |m| m.eligible_replicas() == [1]).await;
    // Received WAL keeps arriving while replay is paused; time lag grows.
    wait_until(&mon, Duration::from_secs(2), "receiving while paused", |m| {
        let r = m.replica(0);
        r.receive_lsn > r.replay_lsn
    })
    .await;
    let lag1 = mon.replica(0).lag.expect("time lag");
    tokio::time::sleep(2 * INTERVAL).await;
    let lag2 = mon.replica(0).lag.expect("time lag");
    assert!(lag2 >= lag1 + 2 * INTERVAL, "lag does not grow: {lag1:?} -> {lag2:?}");
    // max_lag: excluded once the paused replica is more than 400 ms behind.
    wait_until(&timed, Duration::from_secs(2), "excluded by time lag", |m| m.eligible_replicas() == [1]).await;
    assert!(timed.replica(0).lag.is_some_and(|l| l > Duration::from_millis(400)), "{}", dump(&timed));
    eprintln!("(2) paused replica excluded at {:?}", t_test.elapsed());

    // (3) Read-your-writes: replicas at the primary LSN after the write.
    mon.wait_sample().await;
    let lsn = mon.primary_lsn().expect("primary LSN");
    assert!(mon.primary().sampled_at.is_some_and(|t| t > t_write));
    assert!(lsn > st.replay_lsn.expect("replay"));
    wait_until(&unlimited, Duration::from_secs(2), "replica 1 at LSN", |m| m.replicas_at(lsn) == [1]).await;
    assert_eq!(unlimited.eligible_replicas(), vec![0, 1], "{}", dump(&unlimited));
    assert_eq!(mon.replicas_at(lsn), vec![1], "{}", dump(&mon));
    assert_eq!(mon.replicas_at(0), vec![1], "{}", dump(&mon));

    // Resume: eligible again within a few intervals, and at the LSN.
    psql(&cluster, r0, "SELECT pg_wal_replay_resume()");
    let took = wait_until(&mon, 5 * INTERVAL, "both eligible after resume", |m| m.eligible_replicas() == [0, 1]).await;
    wait_until(&unlimited, 5 * INTERVAL, "both at LSN", |m| m.replicas_at(lsn) == [0, 1]).await;
    wait_until(&timed, 5 * INTERVAL, "time lag back to 0", |m| m.eligible_replicas() == [0, 1]).await;
    assert_eq!(mon.replica(0).lag, Some(Duration::ZERO), "{}", dump(&mon));
    eprintln!("(3) replicas_at ok; resumed replica eligible after {took:?}");

    // (4) Stop replica 0: unreachable and banned; back after the ban expires.
    tokio::task::block_in_place(|| cluster.stop_node(r0)).expect("stop replica 0");
    wait_until(&mon, Duration::from_secs(2), "replica 0 unreachable", |m| !m.replica(0).reachable).await;
    let st = mon.replica(0);
    assert!(st.banned_until.is_some_and(|t| t > Instant::now()) && st.last_error.is_some(), "{}", dump(&mon));
    assert_eq!(mon.eligible_replicas(), vec![1], "{}", dump(&mon));
    wait_until(&unlimited, Duration::from_secs(2), "replica 0 excluded", |m| m.eligible_replicas() == [1]).await;
    // Rounds keep completing while a backend is down or banned.
    let t = Instant::now();
    mon.wait_sample().await;
    assert!(t.elapsed() < 3 * INTERVAL, "round with a dead backend took {:?}", t.elapsed());
    tokio::task::block_in_place(|| cluster.start_node(r0)).expect("start replica 0");
    let t_started = Instant::now();
    let ban_end = mon.replica(0).banned_until;
    wait_until(&mon, Duration::from_secs(5), "replica 0 back", |m| m.eligible_replicas() == [0, 1]).await;
    assert!(ban_end.is_none_or(|t| Instant::now() >= t), "eligible before the ban ended");
    let st = mon.replica(0);
    assert!(st.reachable && st.banned_until.is_none() && st.last_error.is_none(), "{}", dump(&mon));
    eprintln!("(4) restarted replica eligible {:?} after start", t_started.elapsed());

    // ban() from the proxy: excluded at once, re-probed after ban_time.
    mon.ban(1, "proxy saw a connect failure");
    assert_eq!(mon.eligible_replicas(), vec![0]);
    assert_eq!(mon.replica(1).last_error.as_deref(), Some("proxy saw a connect failure"));
    let took =
        wait_until(&mon, Duration::from_secs(3), "replica 1 unbanned", |m| m.eligible_replicas() == [0, 1]).await;
    assert!(took >= Duration::from_millis(900), "ban lifted after {took:?}");

    // (5) Promote replica 1.
    psql(&cluster, r1, "SELECT pg_promote()");
    wait_until(&mon, 5 * INTERVAL, "replica 1 promoted", |m| m.promoted_replica() == Some(1)).await;
    assert_eq!(mon.eligible_replicas(), vec![0], "{}", dump(&mon));
    eprintln!("(5) promotion seen at {:?}", t_test.elapsed());

    // Dropping the handles stops the tasks and closes the control connections.
    let weak = Arc::downgrade(&mon);
    drop(mon);
    unlimited.stop();
    unlimited.wait_sample().await; // returns at once when stopped
    drop(unlimited);
    drop(timed);
    assert!(weak.upgrade().is_none());
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgmux-monitor'";
    let t = Instant::now();
    while psql(&cluster, &cluster.primary, sql) != "0" {
        assert!(t.elapsed() < Duration::from_secs(5), "monitor connections left open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("total {:?}", t_test.elapsed());
}
