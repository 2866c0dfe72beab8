//! Cluster-unique ids. In the database: `pgmux_next_id('seq')`, a function
//! pgmux installs on each shard of a database with a hash map, takes
//! numbers from the shard's sequence until one hashes (as the hash map
//! hashes it: PostgreSQL's `satisfies_hash_partition`) to this very shard
//! — used as a key column's `DEFAULT`, each id is unique across shards
//! and routes back to the shard that made it, and an INSERT that leaves
//! the key to it can go to any shard. In pgmux: `SELECT pgmux.unique_id()`
//! answers an id from the time, the node id and a counter, for keys made
//! outside the database.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds from the Unix epoch to 2025-01-01, the ids' epoch.
const EPOCH_MS: u64 = 1_735_689_600_000;
/// Bits of an id: 41 of milliseconds, 10 of node id, 12 of counter.
const NODE_BITS: u32 = 10;
const COUNTER_BITS: u32 = 12;

/// The statements that install `pgmux_next_id` on shard `shard` of
/// `shards` (an empty hash-partitioned table stands for the key's hash).
pub fn install_sql(shard: usize, shards: usize) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS pgmux_hash_int8 (k int8) PARTITION BY HASH (k);
         CREATE OR REPLACE FUNCTION pgmux_next_id(seq regclass) RETURNS bigint
         LANGUAGE plpgsql VOLATILE AS $pgmux$
         DECLARE v bigint;
         BEGIN
           LOOP
             v := nextval(seq);
             IF satisfies_hash_partition('pgmux_hash_int8'::regclass, {shards}, {shard}, v) THEN
               RETURN v;
             END IF;
           END LOOP;
         END $pgmux$;
         COMMENT ON FUNCTION pgmux_next_id(regclass) IS 'pgmux: ids of shard {shard} of {shards}'"
    )
}

/// Whether a column default makes its value with `pgmux_next_id`.
pub fn made_by_pgmux(default: &str) -> bool {
    default.contains("pgmux_next_id(")
}

/// Ids made in pgmux: milliseconds since 2025 (41 bits), node id (10
/// bits), a counter within the millisecond (12 bits). Increasing in one
/// pgmux; unique across pgmux instances with distinct node ids.
pub struct UniqueIds {
    node: u64,
    /// (millisecond, counter) of the last id.
    last: Mutex<(u64, u64)>,
}

/// The process's id maker (its node id from the first call: a change
/// takes a restart).
pub fn unique_ids(node: u16) -> &'static UniqueIds {
    static IDS: std::sync::OnceLock<UniqueIds> = std::sync::OnceLock::new();
    IDS.get_or_init(|| UniqueIds::new(node))
}

/// Whether `stmt` is `SELECT pgmux.unique_id()` (alone, optionally
/// aliased): the column's name.
pub fn unique_id_call(stmt: &sqlparser::ast::Statement) -> Option<String> {
    use sqlparser::ast::{Expr, FunctionArguments, SelectItem, SetExpr, Statement};
    let Statement::Query(q) = stmt else { return None };
    let SetExpr::Select(s) = q.body.as_ref() else { return None };
    if !s.from.is_empty() || s.selection.is_some() || s.projection.len() != 1 {
        return None;
    }
    let (Expr::Function(f), alias) = (match &s.projection[0] {
        SelectItem::UnnamedExpr(e) => (e, None),
        SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.value.clone())),
        _ => return None,
    }) else {
        return None;
    };
    let empty = match &f.args {
        FunctionArguments::List(l) => l.args.is_empty(),
        FunctionArguments::None => true,
        FunctionArguments::Subquery(_) => false,
    };
    (empty && f.name.to_string().eq_ignore_ascii_case("pgmux.unique_id")).then(|| alias.unwrap_or("unique_id".into()))
}

impl UniqueIds {
    pub fn new(node: u16) -> UniqueIds {
        UniqueIds { node: u64::from(node) & ((1 << NODE_BITS) - 1), last: Mutex::new((0, 0)) }
    }

    /// The next id.
    pub fn next(&self) -> i64 {
        let now = || {
            let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis();
            u64::try_from(ms).unwrap_or(u64::MAX).saturating_sub(EPOCH_MS)
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // Never backwards (a clock step back waits in the last millisecond).
        let mut ms = now().max(last.0);
        let counter = if ms == last.0 { last.1 + 1 } else { 0 };
        let counter = if counter >> COUNTER_BITS != 0 {
            // This millisecond is used up: the next one.
            ms += 1;
            0
        } else {
            counter
        };
        *last = (ms, counter);
        let id = (ms << (NODE_BITS + COUNTER_BITS)) | (self.node << COUNTER_BITS) | counter;
        i64::try_from(id & (u64::MAX >> 1)).unwrap_or(0)
    }
}

impl super::ShardRouter {
    /// The shard of the next transaction starting with an INSERT whose key
    /// the database makes: one shard after the other.
    pub fn next_made(&self) -> usize {
        self.next_made.fetch_add(1, Ordering::Relaxed) % self.backends.len().max(1)
    }

    /// Whether `pgmux_next_id` is installed on the shards (or was tried).
    pub fn ids_ready(&self) -> bool {
        self.ids_installed.initialized()
    }

    /// Install `pgmux_next_id` on every shard, once, when a map hashes
    /// (see above); a shard that refuses it is logged.
    pub async fn install_ids(&self) {
        let hashed = self.maps.iter().any(|m| matches!(m, super::map::ShardMap::Hash { .. }));
        self.ids_installed
            .get_or_init(|| async {
                if !hashed {
                    return;
                }
                let n = self.backends.len();
                for (i, b) in self.backends.iter().enumerate() {
                    let done = match b.primary.get().await {
                        Ok(mut c) => match c.conn().run(&install_sql(i, n)).await {
                            Ok(()) => {
                                c.release();
                                Ok(())
                            }
                            Err(e) => Err(e.to_string()),
                        },
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = done {
                        tracing::warn!(database = %self.name, shard = %b.name, "installing pgmux_next_id: {e}");
                    }
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_carry_the_node() {
        let ids = UniqueIds::new(5);
        let mut prev = 0;
        for _ in 0..100_000 {
            let id = ids.next();
            assert!(id > prev, "{id} after {prev}");
            assert_eq!((id >> COUNTER_BITS) & 0x3ff, 5);
            prev = id;
        }
    }
}
