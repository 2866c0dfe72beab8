//! `SHOW ...` in the admin console: what pgmux is configured with and
//! what it sees now.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::command::HELP;
use super::table::{v, Table};
use crate::protocol::error::{sqlstate, PgError};
use crate::proxy::Proxy;

/// The table for `SHOW what`.
pub async fn show(proxy: &Arc<Proxy>, what: &str) -> Result<Table, PgError> {
    match what {
        "version" => {
            let mut t = Table::text(&["version"]);
            t.row(vec![v(format!("pgmux {}", env!("CARGO_PKG_VERSION")))]);
            Ok(t)
        }
        "help" => {
            let mut t = Table::text(&["command"]);
            for c in HELP.split(';') {
                t.row(vec![v(c.trim())]);
            }
            Ok(t)
        }
        "databases" => Ok(databases(proxy)),
        "shards" => Ok(shards(proxy).await),
        "pools" => Ok(pools(proxy)),
        "clients" => Ok(clients(proxy)),
        "servers" => Ok(servers(proxy)),
        "stats" => Ok(stats(proxy)),
        "config" => Ok(config(proxy)),
        "replicas" => Ok(replicas(proxy)),
        "routes" => Ok(routes(proxy)),
        other => Err(PgError::error(sqlstate::SYNTAX_ERROR, format!("unknown SHOW item \"{other}\""))
            .with_hint(format!("Commands: {HELP}"))),
    }
}

fn databases(proxy: &Proxy) -> Table {
    let cfg = proxy.config();
    let mut t = Table::spec("name kind primary replicas shards:int dbname pool_mode pool_size:int read_routing");
    for (name, db) in &cfg.databases {
        let sharded = !db.shards.is_empty();
        let replicas: Vec<String> = db.replicas.iter().map(|r| r.addr.to_string()).collect();
        t.row(vec![
            v(name),
            v(if sharded { "sharded" } else { "plain" }),
            db.primary.as_ref().map(|p| p.to_string()),
            v(replicas.join(",")),
            v(db.shards.len()),
            v(db.server_dbname(name)),
            v(format!("{:?}", db.pool_mode.unwrap_or(cfg.pool.pool_mode)).to_lowercase()),
            v(db.pool_size.unwrap_or(cfg.pool.default_pool_size)),
            v(if db.read_routing && !replicas.is_empty() { "on" } else { "off" }),
        ]);
    }
    t
}

/// One row per (sharded database, map, shard); directory maps with their
/// key counts.
async fn shards(proxy: &Proxy) -> Table {
    let mut t = Table::spec("database map kind shard index:int primary replicas keys:int moving:int");
    let topo = proxy.topology();
    for (name, db) in topo.config.databases.iter().filter(|(_, db)| !db.shards.is_empty()) {
        let directories = proxy.directories_for(&topo, name, db);
        let maps: Vec<(Option<&String>, Option<&crate::config::MapConfig>)> = if db.maps.is_empty() {
            vec![(None, None)]
        } else {
            db.maps.iter().map(|(n, m)| (Some(n), Some(m))).collect()
        };
        for (map, cfg) in maps {
            let counts = match map.and_then(|m| directories.get(m)) {
                Some(d) => match d.key_counts().await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(database = %name, "SHOW SHARDS: {e}");
                        None
                    }
                },
                None => None,
            };
            for (i, s) in db.shards.iter().enumerate() {
                let replicas: Vec<String> = s.replicas.iter().map(|r| r.addr.to_string()).collect();
                let keys = counts.as_ref().map(|c| c.get(&s.name).copied().unwrap_or((0, 0)));
                t.row(vec![
                    v(name),
                    map.cloned(),
                    cfg.map(|c| c.kind().to_string()),
                    v(&s.name),
                    v(i),
                    v(&s.primary),
                    v(replicas.join(",")),
                    keys.map(|k| k.0.to_string()),
                    keys.map(|k| k.1.to_string()),
                ]);
            }
        }
    }
    t
}

fn unix(t: std::time::SystemTime) -> String {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs().to_string()).unwrap_or_default()
}

/// Pools sorted by backend and user.
fn sorted_pools(proxy: &Proxy) -> Vec<Arc<crate::backend::pool::Pool>> {
    let mut pools = proxy.pools.all();
    pools.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
    pools
}

/// PgBouncer's SHOW POOLS columns (where they mean the same), per pool.
fn pools(proxy: &Proxy) -> Table {
    let mut t = Table::spec(
        "database user cl_active:int cl_waiting:int sv_active:int sv_idle:int sv_used:int sv_login:int \
         maxwait:int maxwait_us:int pool_mode pool_size:int backend paused",
    );
    for p in sorted_pools(proxy) {
        let login = p.stats.connecting.load(Relaxed);
        let active = p.in_use().saturating_sub(login);
        let wait = p.stats.max_wait();
        t.row(vec![
            v(&p.database),
            v(&p.user),
            v(active),
            v(p.stats.waiting.load(Relaxed)),
            v(active),
            v(p.idle_count()),
            v(0),
            v(login),
            v(wait.as_secs()),
            v(wait.subsec_micros()),
            v(format!("{:?}", p.settings.mode).to_lowercase()),
            v(p.settings.size),
            v(&p.addr),
            v(if p.is_paused() { "yes" } else { "no" }),
        ]);
    }
    t
}

fn clients(proxy: &Proxy) -> Table {
    let mut t = Table::spec("id:int user database state addr port:int connect_time:int application_name");
    for c in proxy.sessions.all() {
        t.row(vec![
            v(c.id),
            v(&c.user),
            v(&c.database),
            v(c.state().name()),
            v(c.addr.ip()),
            v(c.addr.port()),
            v(unix(c.since)),
            v(&c.application_name),
        ]);
    }
    t
}

fn servers(proxy: &Proxy) -> Table {
    let mut t = Table::spec("id:int user database state addr pid:int connect_time:int");
    for p in sorted_pools(proxy) {
        for (s, idle) in p.servers() {
            t.row(vec![
                v(s.id),
                v(&p.user),
                v(&p.database),
                v(if idle { "idle" } else { "active" }),
                v(&p.addr),
                v(s.pid),
                v(unix(s.since)),
            ]);
        }
    }
    t
}

/// Totals since pgmux started, and averages: per second for counts and
/// bytes, per transaction / query / checkout for times (µs).
fn stats(proxy: &Proxy) -> Table {
    let mut t = Table::spec(
        "database user total_xact_count:int total_query_count:int total_received:int total_sent:int \
         total_xact_time:int total_query_time:int total_wait_time:int avg_xact_count:int avg_query_count:int \
         avg_recv:int avg_sent:int avg_xact_time:int avg_query_time:int avg_wait_time:int",
    );
    let secs = proxy.started.elapsed().as_secs().max(1);
    for p in sorted_pools(proxy) {
        let s = &p.stats;
        let (xacts, queries) = (s.xacts.load(Relaxed), s.queries.load(Relaxed));
        let (recv, sent) = (s.sent.load(Relaxed), s.received.load(Relaxed));
        let (xact_us, query_us, wait_us) = (s.xact_us.load(Relaxed), s.query_us.load(Relaxed), s.wait_us.load(Relaxed));
        let checkouts = s.checkouts.load(Relaxed);
        t.row(vec![
            v(&p.database),
            v(&p.user),
            v(xacts),
            v(queries),
            v(recv),
            v(sent),
            v(xact_us),
            v(query_us),
            v(wait_us),
            v(xacts / secs),
            v(queries / secs),
            v(recv / secs),
            v(sent / secs),
            v(xact_us.checked_div(xacts).unwrap_or(0)),
            v(query_us.checked_div(queries).unwrap_or(0)),
            v(wait_us.checked_div(checkouts).unwrap_or(0)),
        ]);
    }
    t
}

fn config(proxy: &Proxy) -> Table {
    let c = proxy.config();
    let (g, p) = (&c.general, &c.pool);
    let mut t = Table::text(&["key", "value"]);
    let list = |l: &[String]| l.join(",");
    for (k, val) in [
        ("listen", g.listen.to_string()),
        ("log_level", g.log_level.clone()),
        ("max_client_conn", g.max_client_conn.to_string()),
        ("worker_threads", g.worker_threads.to_string()),
        ("admin_users", list(&g.admin_users)),
        ("stats_users", list(&g.stats_users)),
        ("metrics_listen", g.metrics_listen.as_ref().map(|m| m.to_string()).unwrap_or_default()),
        ("shutdown_timeout", format!("{:?}", g.shutdown_timeout.0)),
        ("pool_mode", format!("{:?}", p.pool_mode).to_lowercase()),
        ("default_pool_size", p.default_pool_size.to_string()),
        ("min_pool_size", p.min_pool_size.to_string()),
        ("query_wait_timeout", format!("{:?}", p.query_wait_timeout.0)),
        ("server_idle_timeout", format!("{:?}", p.server_idle_timeout.0)),
        ("server_lifetime", format!("{:?}", p.server_lifetime.0)),
        ("server_connect_timeout", format!("{:?}", p.server_connect_timeout.0)),
        ("server_reset_query", p.server_reset_query.clone()),
        ("max_prepared_statements", p.max_prepared_statements.to_string()),
        ("max_client_prepared_statements", p.max_client_prepared_statements.to_string()),
    ] {
        t.row(vec![v(k), v(val)]);
    }
    t
}

/// Every backend the lag monitors watch.
fn replicas(proxy: &Proxy) -> Table {
    let mut t =
        Table::spec("group name addr role healthy in_recovery banned_for_ms:int lag_bytes:int lag_ms:int last_error");
    let groups = proxy.monitors();
    let now = std::time::Instant::now();
    for (group, m) in groups {
        for (i, (b, s)) in m.snapshot().into_iter().enumerate() {
            let banned = s.banned_until.filter(|u| *u > now).map(|u| (u - now).as_millis());
            t.row(vec![
                v(&group),
                v(&b.name),
                v(format!("{}:{}", b.host, b.port)),
                v(if i == 0 { "primary" } else { "replica" }),
                v(if s.reachable && banned.is_none() { "yes" } else { "no" }),
                s.in_recovery.map(|r| if r { "yes".to_string() } else { "no".to_string() }),
                banned.map(|b| b.to_string()),
                s.lag_bytes.map(|b| b.to_string()),
                s.lag.map(|l| l.as_millis().to_string()),
                s.last_error.clone(),
            ]);
        }
    }
    t
}

/// Queries and transactions each backend got, by route (primary,
/// replica, shard; scatter for statements run across shards).
fn routes(proxy: &Proxy) -> Table {
    let mut t = Table::spec("backend route queries:int transactions:int");
    for (backend, route, queries, xacts) in proxy.metrics.routes() {
        t.row(vec![v(backend), v(route), v(queries), v(xacts)]);
    }
    t
}
