//! A primary with 2 streaming replicas of its own per test, and pgmux
//! routing reads over them. Tests of one binary that use it take
//! [`SERIAL`] so that their free ports cannot collide.

use std::time::Duration;

use pgmux::proxy::RunningProxy;
use pgmux_testkit::{free_port, Cluster, ClusterSpec, HbaMethod, Role};

use super::APP;

pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn cluster() -> Cluster {
    let spec = ClusterSpec {
        replicas: 2,
        roles: vec![Role::new(APP.0, APP.1, HbaMethod::Scram)],
        databases: vec!["app".into()],
        ..ClusterSpec::default()
    };
    Cluster::start(&spec).expect("cluster with replicas")
}

/// Config text for pgmux in front of `c`, database `app` with the lines
/// `db` added to its section (they may override the defaults here).
pub fn config(c: &Cluster, pool: &str, db: &str) -> String {
    let replicas: Vec<String> = c.replicas.iter().map(|r| format!("\"{}\"", r.addr())).collect();
    format!(
        r#"[pgmux]
listen = "127.0.0.1:{port}"
log_level = "warn"

[pool]
default_pool_size = 4
{pool}

[[users]]
name = "{user}"
password = "{pw}"

[databases.app]
primary = "{primary}"
monitor_user = "{user}"
check_interval = "100ms"
{db}
"#,
        port = free_port().unwrap(),
        user = APP.0,
        pw = APP.1,
        primary = c.primary.addr(),
        db = if db.contains("replicas") {
            db.to_string()
        } else {
            format!("replicas = [{}]\n{db}", replicas.join(", "))
        },
    )
}

/// pgmux from `text`, after its monitor has taken its first samples.
pub async fn start(text: &str) -> RunningProxy {
    let p = super::start_proxy(text).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    p
}

/// [`start`] taking its text by value (for closures).
pub async fn start_owned(text: String) -> RunningProxy {
    start(&text).await
}

/// The connection string of `app` through `p`.
pub fn url(p: &RunningProxy) -> String {
    super::conn_str(p.addr.port(), APP.0, APP.1, "app")
}

pub async fn client(p: &RunningProxy) -> tokio_postgres::Client {
    super::connect_str(&super::conn_str(p.addr.port(), APP.0, APP.1, "app")).await.unwrap()
}

/// The port of the server that ran `sql` (its first column).
pub async fn port_of(c: &tokio_postgres::Client, sql: &str) -> u16 {
    super::scalar(c, sql).await.parse().unwrap_or_else(|_| panic!("{sql} gave no port"))
}
