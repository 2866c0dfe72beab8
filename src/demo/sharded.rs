//! `pgmux demo --sharded`: two shard primaries, each with a streaming
//! replica (two local clusters), the key directory in the first, pgmux in
//! front; the schema and a little data loaded through pgmux itself (its
//! schema changes run on both shards): users and orders by hash of the
//! user id (ids made by `pgmux_next_id`), events by region (list),
//! tenants by directory, countries on every shard.

use pgmux::config::Config;
use pgmux::proxy::Proxy;
use pgmux_testkit::{Cluster, ClusterSpec, HbaMethod, Role};

use super::{DemoError, DEMO_PASSWORD, DEMO_USER};

pub const SHARDED_DB: &str = "shop";

/// The statements that load the demo, run through pgmux.
const SCHEMA: &str = "
CREATE SEQUENCE users_id_seq START 1000;
CREATE TABLE users (id bigint PRIMARY KEY DEFAULT pgmux_next_id('users_id_seq'), name text, score int);
CREATE SEQUENCE orders_id_seq;
CREATE TABLE orders (id bigint DEFAULT pgmux_next_id('orders_id_seq'), user_id bigint, amount numeric);
CREATE TABLE events (region text, what text);
CREATE TABLE tenants (tenant_id text PRIMARY KEY, name text);
CREATE TABLE countries (code text PRIMARY KEY, name text);
INSERT INTO countries VALUES ('ch', 'Switzerland'), ('fr', 'France'), ('us', 'United States');
INSERT INTO users (id, name, score) VALUES (1, 'ada', 3), (2, 'bob', 5), (3, 'cyd', 4), (4, 'dee', 1), (5, 'eve', 5);
INSERT INTO orders (user_id, amount) VALUES (1, 9.50), (2, 12.00), (2, 3.25), (3, 7.75), (5, 20.00);
INSERT INTO events (region, what) VALUES ('eu', 'signup'), ('us', 'login'), ('ch', 'logout');
INSERT INTO tenants (tenant_id, name) VALUES ('acme', 'Acme'), ('globex', 'Globex'), ('initech', 'Initech');
";

/// The demo's pgmux config for the two shard clusters.
pub fn sharded_config(shards: &[Cluster; 2], port: u16) -> String {
    let shard = |i: usize, c: &Cluster| {
        let replicas: Vec<String> = c.replicas.iter().map(|r| format!("\"{}\"", r.addr())).collect();
        format!("{{ name = \"s{i}\", primary = \"{}\", replicas = [{}] }}", c.primary.addr(), replicas.join(", "))
    };
    format!(
        r#"{head}
[databases.{SHARDED_DB}]
shards = [{s0}, {s1}]
monitor_user = "{DEMO_USER}"
check_interval = "200ms"
tables = [
  {{ name = "users", key = "id", map = "by_user" }},
  {{ name = "orders", key = "user_id", map = "by_user" }},
  {{ name = "events", key = "region", map = "by_region" }},
  {{ name = "tenants", key = "tenant_id", map = "by_tenant" }},
]
reference_tables = ["countries"]
allow_cross_shard_writes = true
two_phase_commit = true

[databases.{SHARDED_DB}.maps.by_user]
kind = "hash"
type = "int8"

[databases.{SHARDED_DB}.maps.by_region]
kind = "list"
type = "text"
lists = [{{ values = ["eu", "ch", "fr"], shard = "s0" }}, {{ values = ["us"], shard = "s1" }}]
default = "s0"

[databases.{SHARDED_DB}.maps.by_tenant]
kind = "directory"
type = "text"
backend = "{dir}"
user = "{DEMO_USER}"
"#,
        head = super::config_head(port),
        s0 = shard(0, &shards[0]),
        s1 = shard(1, &shards[1]),
        dir = shards[0].primary.addr(),
    )
}

/// Start the shards, pgmux, and load the demo; wait for Ctrl-C.
pub async fn run(port: u16) -> Result<(), DemoError> {
    eprintln!("starting 2 shard primaries, each with a streaming replica ...");
    let spec = ClusterSpec {
        replicas: 1,
        roles: vec![Role::new(DEMO_USER, DEMO_PASSWORD, HbaMethod::Scram)],
        databases: vec![SHARDED_DB.into()],
        extra_conf: vec!["max_prepared_transactions = 20".into()],
        ..ClusterSpec::default()
    };
    let start = |spec: ClusterSpec| async move {
        let started = tokio::task::spawn_blocking(move || Cluster::start(&spec)).await;
        Ok::<_, DemoError>(started.map_err(|e| DemoError::Task(e.to_string()))??)
    };
    let first = start(spec.clone()).await?;
    let shards = [first, start(spec).await?];
    let config = Config::parse(&sharded_config(&shards, port), "demo config")?;
    let running = Proxy::start(config).await.map_err(DemoError::Listen)?;
    let url = format!("postgresql://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{port}/{SHARDED_DB}");
    if let Err(e) = load(&url).await {
        running.stop().await;
        return Err(e);
    }
    println!();
    for (i, c) in shards.iter().enumerate() {
        println!("shard s{i} (data in {}):", c.root().display());
        println!("  primary   {}", c.primary.addr());
        for r in &c.replicas {
            println!("  replica   {}", r.addr());
        }
    }
    println!("  pgmux     {}", running.addr);
    println!();
    println!("Loaded through pgmux: users and orders by hash of the user id, events by region,");
    println!("tenants by directory, countries on every shard. Try:");
    println!("  SELECT inet_server_port(), * FROM users WHERE id = 2;");
    println!("  SELECT count(*), avg(score) FROM users;");
    println!("  INSERT INTO users (name) VALUES ('fay') RETURNING id;");
    println!();
    println!("Connect with:");
    println!("  psql \"{url}\"");
    println!("Console:");
    println!("  psql \"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{port}/pgmux\"");
    println!();
    println!("Press Ctrl-C to stop and remove everything.");
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("stopping ...");
    running.stop().await;
    tokio::task::spawn_blocking(move || drop(shards)).await.map_err(|e| DemoError::Task(e.to_string()))?;
    Ok(())
}

/// Load the schema and data through pgmux.
async fn load(url: &str) -> Result<(), DemoError> {
    let (client, conn) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| DemoError::Task(e.to_string()))?;
    let task = tokio::spawn(conn);
    for sql in SCHEMA.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
        client.simple_query(sql).await.map_err(|e| DemoError::Task(format!("loading the demo ({sql}): {e}")))?;
    }
    drop(client);
    let _ = task.await;
    Ok(())
}
