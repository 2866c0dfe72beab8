//! `SHOW ...` in the admin console: what pgmux is configured with and
//! what it sees now.

use std::sync::Arc;

use super::command::HELP;
use super::table::{v, Table, Type};
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
        other => Err(PgError::error(sqlstate::SYNTAX_ERROR, format!("unknown SHOW item \"{other}\""))
            .with_hint(format!("Commands: {HELP}"))),
    }
}

fn databases(proxy: &Proxy) -> Table {
    let cfg = &proxy.config;
    let mut t = Table::new(&[
        ("name", Type::Text),
        ("kind", Type::Text),
        ("primary", Type::Text),
        ("replicas", Type::Text),
        ("shards", Type::Int8),
        ("dbname", Type::Text),
        ("pool_mode", Type::Text),
        ("pool_size", Type::Int8),
        ("read_routing", Type::Text),
    ]);
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
    let mut t = Table::new(&[
        ("database", Type::Text),
        ("map", Type::Text),
        ("kind", Type::Text),
        ("shard", Type::Text),
        ("index", Type::Int8),
        ("primary", Type::Text),
        ("replicas", Type::Text),
        ("keys", Type::Int8),
        ("moving", Type::Int8),
    ]);
    for (name, db) in proxy.config.databases.iter().filter(|(_, db)| !db.shards.is_empty()) {
        let directories = proxy.directories_for(name, db);
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
