//! `pgmux check-config`: the topology a config resolves to, in words —
//! listeners, databases with their primaries, replicas and read routing,
//! shards with their maps and tables, and users — so that what pgmux will
//! do can be read before it runs.

use std::fmt::Write;

use super::{Config, Database, MapConfig};

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|x| x.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// A config enum as the config spells it (`RoundRobin` -> `round_robin`;
/// TLS modes with `-`).
fn lower(x: impl std::fmt::Debug) -> String {
    let name = format!("{x:?}");
    let sep = if name.starts_with("Verify") || name == "ScramSha256" { '-' } else { '_' };
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(sep);
        }
        out.push(c.to_ascii_lowercase());
    }
    out.replace("sha256", "sha-256")
}

impl Config {
    /// The resolved topology, one fact per line.
    pub fn describe(&self) -> String {
        let g = &self.general;
        let mut out = String::new();
        let _ = writeln!(out, "listen {} (client TLS: {})", g.listen, lower(g.tls_mode));
        let metrics = g.metrics_listen.as_ref().map_or("off".to_string(), |m| format!("http://{m}/metrics"));
        let _ = writeln!(
            out,
            "metrics {metrics}; admin console users: {}; stats users: {}",
            list(&g.admin_users),
            list(&g.stats_users)
        );
        for (name, db) in &self.databases {
            self.describe_database(&mut out, name, db);
        }
        let users = self.users.values().map(|u| format!("{} ({})", u.name, lower(u.auth_method)));
        let _ = writeln!(out, "users: {}", list(users));
        out
    }

    fn describe_database(&self, out: &mut String, name: &str, db: &Database) {
        let mode = db.pool_mode.unwrap_or(self.pool.pool_mode);
        let size = db.pool_size.unwrap_or(self.pool.default_pool_size);
        let pool =
            format!("{} mode, pool {size} per user, server TLS {}", lower(mode), lower(self.pool.server_tls_mode));
        if db.shards.is_empty() {
            let _ = writeln!(out, "database {name} -> {} on {} ({pool})", db.server_dbname(name), db.primary_addr());
            describe_reads(out, "  ", db);
            return;
        }
        let cross = match (db.allow_cross_shard_writes, db.two_phase_commit) {
            (false, _) => "refused",
            (true, false) => "allowed, committed shard by shard",
            (true, true) => "allowed, two-phase commit",
        };
        let _ = writeln!(out, "database {name}: {} shards ({pool}); cross-shard writes {cross}", db.shards.len());
        for (i, (group, gdb)) in db.groups(name).iter().enumerate() {
            let shard = &db.shards[i];
            let _ =
                writeln!(out, "  shard {} [{i}] -> {} on {}", shard.name, gdb.server_dbname(group), gdb.primary_addr());
            describe_reads(out, "    ", gdb);
        }
        for (map, m) in &db.maps {
            let how = match m {
                MapConfig::Directory { backend, dbname, table, weights, .. } => format!(
                    " in table {table} on {backend}/{} (new keys by weight: {})",
                    dbname.as_deref().unwrap_or(db.server_dbname(name)),
                    list(db.shards.iter().map(|s| format!(
                        "{}={}",
                        s.name,
                        weights.get(&s.name).copied().unwrap_or(1)
                    )))
                ),
                _ => String::new(),
            };
            let _ = writeln!(out, "  map {map}: {} of {}{how}", m.kind(), lower(m.key_type()));
        }
        for t in &db.tables {
            let _ = writeln!(out, "  table {} sharded by {} ({})", t.name, t.key, t.map);
        }
        let _ = writeln!(out, "  reference tables (any shard reads): {}", list(&db.reference_tables));
    }
}

fn describe_reads(out: &mut String, indent: &str, db: &Database) {
    if db.replicas.is_empty() || !db.read_routing {
        let _ = writeln!(out, "{indent}every statement to the primary");
        return;
    }
    let replicas = db.replicas.iter().map(|r| format!("{} (weight {})", r.addr, r.weight));
    let _ = writeln!(out, "{indent}replicas: {}", list(replicas));
    let _ = writeln!(
        out,
        "{indent}reads to replicas within {:?} / {} bytes of lag ({}), primary reads {}, read-your-writes {}, transactions by {}{}",
        db.lag_bound(),
        db.max_lag_bytes,
        lower(db.load_balancing),
        lower(db.primary_reads),
        lower(db.read_your_writes),
        lower(db.transaction_routing),
        if db.follow_promotion { ", writes follow a promoted replica" } else { "" },
    );
}

#[cfg(test)]
mod tests {
    use super::lower;
    use crate::config::{AuthMethod, LoadBalancing, ServerTlsMode, TransactionRouting};

    #[test]
    fn spells_values_as_the_config_does() {
        assert_eq!(lower(LoadBalancing::RoundRobin), "round_robin");
        assert_eq!(lower(TransactionRouting::FirstStatement), "first_statement");
        assert_eq!(lower(ServerTlsMode::VerifyFull), "verify-full");
        assert_eq!(lower(AuthMethod::ScramSha256), "scram-sha-256");
        assert_eq!(lower(AuthMethod::Md5), "md5");
    }
}
