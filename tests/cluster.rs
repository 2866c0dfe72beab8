//! Integration tests of the test kit's cluster harness (`pgmux-testkit`) against real PostgreSQL servers.

use std::net::TcpStream;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgmux_testkit::{Cluster, ClusterError, ClusterSpec, HbaMethod, Node, NodeRole, PgBin, Role};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

const DB: &str = "appdb";

fn roles() -> Vec<Role> {
    vec![
        Role::new("app_scram", "scram pw", HbaMethod::Scram),
        Role::new("app_md5", "md5'pw", HbaMethod::Md5),
        Role::new("app_password", "plain-pw", HbaMethod::Password),
        Role::new("app_trust", "trust-pw", HbaMethod::Trust),
    ]
}

async fn connect(node: &Node, user: &str, pw: &str, db: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(&node.conn_str(user, pw, db), NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn query_one_string(client: &Client, sql: &str) -> String {
    let row = client.query_one(sql, &[]).await;
    let row = row.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    row.get::<_, String>(0)
}

fn port_closed(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_err()
}

#[test]
fn full_cluster_lifecycle() {
    let bin = PgBin::locate().expect("PostgreSQL binaries (see PgBin::INSTALL_HINT)");
    assert!(bin.dir.join("initdb").is_file());
    assert_eq!(ClusterSpec::default().max_connections, 200);

    let spec = ClusterSpec {
        replicas: 2,
        extra_primaries: 1,
        roles: roles(),
        databases: vec![DB.to_string()],
        ..ClusterSpec::default()
    };
    let t0 = Instant::now();
    let cluster = Cluster::start(&spec).expect("cluster start");
    eprintln!("Cluster::start (2 replicas + 1 extra primary) took {:?}", t0.elapsed());

    assert_eq!(cluster.primary.role, NodeRole::Primary);
    assert_eq!(cluster.replicas.len(), 2);
    assert!(cluster.replicas.iter().all(|r| r.role == NodeRole::Replica));
    assert_eq!(cluster.extra_primaries.len(), 1);
    assert_eq!(cluster.extra_primaries[0].role, NodeRole::ExtraPrimary);
    assert_eq!(cluster.primary.addr(), format!("127.0.0.1:{}", cluster.primary.port));
    let root = cluster.root().to_path_buf();
    let ports: Vec<u16> = cluster.nodes().map(|n| n.port).collect();
    assert!(root.file_name().unwrap().to_string_lossy().starts_with("pgmux-"));
    assert!(cluster.primary.data_dir.join("PG_VERSION").is_file());

    // Stored password formats follow the HBA method.
    let stored = cluster
        .psql(
            &cluster.primary,
            "postgres",
            "SELECT rolname || '=' || left(rolpassword, 6) FROM pg_authid \
             WHERE rolname LIKE 'app_%' OR rolname = 'postgres' ORDER BY rolname",
        )
        .unwrap();
    let lines: Vec<&str> = stored.lines().collect();
    assert_eq!(lines.len(), 5, "{stored}");
    assert!(lines[0].starts_with("app_md5=md5"), "{stored}");
    for line in &lines[1..] {
        assert!(line.ends_with("=SCRAM-"), "{stored}");
    }

    // psql errors surface as ClusterError::Command.
    match cluster.psql(&cluster.primary, "postgres", "SELECT * FROM no_such_table") {
        Err(ClusterError::Command { output, .. }) => {
            assert!(output.contains("no_such_table"), "{output}")
        }
        other => panic!("expected Command error, got {other:?}"),
    }

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // Every role over TCP with its password, on every primary.
        for node in std::iter::once(&cluster.primary).chain(&cluster.extra_primaries) {
            for role in roles() {
                let client = connect(node, &role.name, &role.password, DB)
                    .await
                    .unwrap_or_else(|e| panic!("{} on {}: {e}", role.name, node.name));
                assert_eq!(query_one_string(&client, "SELECT current_user::text").await, role.name);
                let wrong = connect(node, &role.name, "wrong password", DB).await;
                if role.method == HbaMethod::Trust {
                    assert!(wrong.is_ok(), "trust role must ignore the password");
                } else {
                    let err = wrong.err().unwrap_or_else(|| panic!("{} accepted a wrong password", role.name));
                    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
                }
            }
            let su = connect(node, "postgres", Cluster::superuser_password(), "postgres")
                .await
                .expect("superuser over TCP");
            assert_eq!(query_one_string(&su, "SELECT pg_is_in_recovery()::text").await, "false");
            assert!(connect(node, "postgres", "nope", "postgres").await.is_err());
        }
        // The database belongs to the first role.
        let owner = cluster
            .psql(
                &cluster.primary,
                "postgres",
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'appdb'",
            )
            .unwrap();
        assert_eq!(owner, "app_scram");

        // Replication: write on the primary, read on each replica.
        let app = connect(&cluster.primary, "app_scram", "scram pw", DB).await.unwrap();
        app.batch_execute("CREATE TABLE t (id int primary key, v text); INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g; GRANT ALL ON t TO PUBLIC")
            .await
            .unwrap();
        cluster.wait_replicas_caught_up().unwrap();
        for replica in &cluster.replicas {
            let c = connect(replica, "app_md5", "md5'pw", DB).await.unwrap();
            assert_eq!(query_one_string(&c, "SELECT pg_is_in_recovery()::text").await, "true");
            assert_eq!(query_one_string(&c, "SELECT count(*)::text FROM t").await, "100");
            assert!(c.batch_execute("INSERT INTO t VALUES (1000, 'y')").await.is_err(), "replica is read-only");
        }
        // The extra primary is independent.
        let extra = &cluster.extra_primaries[0];
        assert_eq!(cluster.psql(extra, DB, "SELECT to_regclass('t') IS NULL").unwrap(), "t");

        // Stop and restart a replica; it catches up afterwards.
        let r1 = &cluster.replicas[0];
        cluster.stop_node(r1).unwrap();
        assert!(port_closed(r1.port));
        assert!(connect(r1, "app_md5", "md5'pw", DB).await.is_err());
        app.batch_execute("INSERT INTO t SELECT g, 'z' FROM generate_series(101, 150) g").await.unwrap();
        cluster.start_node(r1).unwrap();
        cluster.wait_replicas_caught_up().unwrap();
        for replica in &cluster.replicas {
            assert_eq!(cluster.psql(replica, DB, "SELECT count(*) FROM t").unwrap(), "150");
            assert_eq!(cluster.psql(replica, DB, "SELECT pg_is_in_recovery()").unwrap(), "t");
        }
    });
    drop(rt);

    let t1 = Instant::now();
    drop(cluster);
    eprintln!("Cluster drop took {:?}", t1.elapsed());
    assert!(!root.exists(), "{} still exists", root.display());
    for port in ports {
        assert!(port_closed(port), "port {port} still accepts connections");
    }
}

#[test]
fn panic_with_live_cluster_still_cleans_up() {
    let seen: Mutex<Option<(PathBuf, Vec<u16>)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let spec = ClusterSpec { replicas: 1, ..ClusterSpec::default() };
        let cluster = Cluster::start(&spec).expect("cluster start");
        let ports = cluster.nodes().map(|n| n.port).collect::<Vec<_>>();
        assert!(ports.iter().all(|p| !port_closed(*p)));
        *seen.lock().unwrap() = Some((cluster.root().to_path_buf(), ports));
        panic!("deliberate panic while a cluster is running");
    }));
    assert!(result.is_err());
    let (root, ports) = seen.lock().unwrap().take().expect("cluster was started");
    assert!(!root.exists(), "{} still exists", root.display());
    for port in ports {
        assert!(port_closed(port), "port {port} still accepts connections");
    }
}

#[test]
fn startup_failure_reports_the_server_log() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cluster>();

    let spec = ClusterSpec { extra_conf: vec!["no_such_setting = 1".to_string()], ..ClusterSpec::default() };
    match Cluster::start(&spec) {
        Err(ClusterError::Command { cmd, output, .. }) => {
            assert!(cmd.contains("pg_ctl"), "{cmd}");
            assert!(output.contains("no_such_setting"), "{output}");
        }
        Err(other) => panic!("expected a Command error, got {other}"),
        Ok(_) => panic!("a cluster with an invalid setting started"),
    }
}

#[test]
fn shutdown_stops_every_server_and_drop_removes_the_dir() {
    let cluster = Cluster::start(&ClusterSpec { replicas: 1, ..ClusterSpec::default() }).expect("cluster start");
    let root = cluster.root().to_path_buf();
    assert!(cluster.socket_dir().starts_with(&root));
    assert_eq!(cluster.psql(&cluster.replicas[0], "postgres", "SELECT 40 + 2").unwrap(), "42");
    cluster.shutdown();
    for node in cluster.nodes() {
        assert!(port_closed(node.port), "{} still accepts connections", node.name);
        assert!(!node.data_dir.join("postmaster.pid").exists());
    }
    assert!(root.exists(), "shutdown alone keeps the directory");
    drop(cluster);
    assert!(!root.exists());
}
