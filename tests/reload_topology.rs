//! Changing where reads go while clients stay connected: a reload that
//! changes the replicas of a database (a session follows the new topology
//! at its next transaction — weights move its reads, removed replicas get
//! none, and with none left reads go to the primary), and the admin
//! console's BAN / UNBAN of a replica.

mod support;

use support::replicated::{self, client, port_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_reads_to_the_new_replicas() {
    let _serial = replicated::SERIAL.lock().await;
    let c = replicated::cluster();
    let (r1, r2) = (c.replicas[0].addr(), c.replicas[1].addr());
    let with =
        |replicas: &str| replicated::config(&c, "", &format!("load_balancing = \"weighted\"\nreplicas = {replicas}"));
    let first = with(&format!("[{{ addr = \"{r1}\", weight = 1 }}]"));
    let p = replicated::start(&first).await;
    let cl = client(&p).await;
    let read = "SELECT inet_server_port()";
    for _ in 0..5 {
        assert_eq!(port_of(&cl, read).await, c.replicas[0].port);
    }
    let port = support::listen_port(&first);
    let apply = |text: String| {
        let text =
            text.replacen(&format!("127.0.0.1:{}", support::listen_port(&text)), &format!("127.0.0.1:{port}"), 1);
        pgmux::config::Config::parse(&text, "reload").unwrap()
    };
    // The second replica added, the first drained (weight 0).
    let second = with(&format!("[{{ addr = \"{r1}\", weight = 0 }}, {{ addr = \"{r2}\", weight = 1 }}]"));
    let first_monitor = p.proxy.monitor("app").expect("a monitor");
    p.proxy.apply_config(apply(second.clone())).unwrap();
    let monitor = p.proxy.monitor("app").expect("a monitor");
    assert!(!std::sync::Arc::ptr_eq(&first_monitor, &monitor), "new replicas: a new monitor");
    // The same group again: the snapshot swapped in keeps its monitor.
    p.proxy.apply_config(apply(second)).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&monitor, &p.proxy.monitor("app").expect("a monitor")),
        "an unchanged group keeps its monitor"
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for _ in 0..5 {
        let got = port_of(&cl, read).await;
        assert_eq!(
            got, c.replicas[1].port,
            "reads follow the reload (primary {}, r1 {})",
            c.primary.port, c.replicas[0].port
        );
    }
    // No replicas: reads go to the primary.
    p.proxy.apply_config(apply(with("[]"))).unwrap();
    for _ in 0..3 {
        assert_eq!(port_of(&cl, read).await, c.primary.port);
    }
    assert!(p.proxy.monitor("app").is_none(), "the monitor of a group without replicas stopped");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ban_and_unban_a_replica_from_the_console() {
    let _serial = replicated::SERIAL.lock().await;
    let c = replicated::cluster();
    let text = replicated::config(&c, "", "").replacen(
        "log_level = \"warn\"\n",
        "log_level = \"warn\"\nadmin_users = [\"app\"]\n",
        1,
    );
    let p = replicated::start(&text).await;
    let cl = client(&p).await;
    let admin =
        support::connect_str(&support::conn_str(p.addr.port(), support::APP.0, support::APP.1, "pgmux")).await.unwrap();
    let read = "SELECT inet_server_port()";
    let ports = |n| {
        let cl = &cl;
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..n {
                seen.insert(port_of(cl, read).await);
            }
            seen
        }
    };
    let both: std::collections::BTreeSet<u16> = c.replicas.iter().map(|r| r.port).collect();
    assert_eq!(ports(8).await, both);
    admin.simple_query("BAN app/replica1").await.unwrap();
    assert_eq!(ports(8).await, [c.replicas[1].port].into_iter().collect());
    let replicas = admin.simple_query("SHOW REPLICAS").await.unwrap();
    let banned = replicas.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(1) == Some("app/replica1") && r.get(4) == Some("no"),
        _ => false,
    });
    assert!(banned, "SHOW REPLICAS shows the ban");
    admin.simple_query("UNBAN app/replica1").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(ports(8).await, both);
    p.stop().await;
}
