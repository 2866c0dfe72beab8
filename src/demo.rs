//! `pgmux demo`: a real local topology from the installed PostgreSQL
//! binaries — a primary and two streaming replicas in a temp dir on free
//! loopback ports (`--sharded`: two shards, see `sharded.rs`) — with
//! pgmux in front. Ctrl-C tears it all down.

mod sharded;

use pgmux::config::Config;
use pgmux::proxy::Proxy;
use pgmux_testkit::{free_port, Cluster, ClusterError, ClusterSpec, HbaMethod, PgBin, Role};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Cluster(#[from] ClusterError),
    #[error("{0}")]
    Config(#[from] pgmux::config::ConfigError),
    #[error("pgmux could not listen: {0}")]
    Listen(std::io::Error),
    #[error("{0}")]
    Task(String),
}

pub const DEMO_USER: &str = "demo";
pub const DEMO_PASSWORD: &str = "demo";
pub const DEMO_DB: &str = "demo";

/// The demo's pgmux config for a running cluster.
pub fn demo_config(cluster: &Cluster, port: u16) -> String {
    let replicas: Vec<String> = cluster.replicas.iter().map(|r| format!("\"{}\"", r.addr())).collect();
    format!(
        r#"{head}
[databases.{DEMO_DB}]
primary = "{primary}"
replicas = [{replicas}]
monitor_user = "{DEMO_USER}"
check_interval = "200ms"
"#,
        head = config_head(port),
        primary = cluster.primary.addr(),
        replicas = replicas.join(", "),
    )
}

/// What every demo config starts with: pgmux on `port`, the demo user.
fn config_head(port: u16) -> String {
    format!(
        r#"[pgmux]
listen = "127.0.0.1:{port}"
admin_users = ["{DEMO_USER}"]

[pool]
default_pool_size = 10

[[users]]
name = "{DEMO_USER}"
password = "{DEMO_PASSWORD}"
"#
    )
}

pub async fn run(install: bool, port: Option<u16>, sharded: bool) -> Result<(), DemoError> {
    binaries(install).await?;
    let port = match port {
        Some(p) => p,
        None if std::net::TcpListener::bind(("127.0.0.1", 6432)).is_ok() => 6432,
        None => free_port()?,
    };
    if sharded {
        return sharded::run(port).await;
    }
    replicated(port).await
}

/// PostgreSQL's server binaries, installed when missing and asked to.
async fn binaries(install: bool) -> Result<(), DemoError> {
    if let Err(ClusterError::NotInstalled(hint)) = PgBin::locate() {
        if !install {
            eprintln!(
                "PostgreSQL server binaries not found. Install them with:\n    {hint}\nor run `pgmux demo --install`."
            );
            return Err(ClusterError::NotInstalled(hint).into());
        }
        eprintln!("installing PostgreSQL ...");
        tokio::task::spawn_blocking(PgBin::install).await.map_err(|e| DemoError::Task(e.to_string()))??;
    }
    Ok(())
}

/// A primary and 2 streaming replicas.
async fn replicated(port: u16) -> Result<(), DemoError> {
    eprintln!("starting a primary and 2 streaming replicas ...");
    let spec = ClusterSpec {
        replicas: 2,
        roles: vec![Role {
            name: DEMO_USER.into(),
            password: DEMO_PASSWORD.into(),
            method: HbaMethod::Scram,
            superuser: false,
        }],
        databases: vec![DEMO_DB.into()],
        ..ClusterSpec::default()
    };
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&spec))
        .await
        .map_err(|e| DemoError::Task(e.to_string()))??;
    let config = Config::parse(&demo_config(&cluster, port), "demo config")?;
    let running = Proxy::start(config).await.map_err(DemoError::Listen)?;
    println!();
    println!("pgmux demo is up (data in {}):", cluster.root().display());
    println!("  primary   {}", cluster.primary.addr());
    for r in &cluster.replicas {
        println!("  replica   {}", r.addr());
    }
    println!("  pgmux     {}", running.addr);
    println!();
    println!("Reads go to the replicas (lag-aware, read-your-writes), writes and transactions");
    println!("to the primary; try SELECT inet_server_port(), pg_is_in_recovery();");
    println!();
    println!("Connect with:");
    println!("  psql \"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{port}/{DEMO_DB}\"");
    println!();
    println!("Press Ctrl-C to stop and remove everything.");
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("stopping ...");
    running.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await.map_err(|e| DemoError::Task(e.to_string()))?;
    Ok(())
}
