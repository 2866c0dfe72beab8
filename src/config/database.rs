//! `[databases.NAME]`: a logical database clients connect to — its
//! servers (a primary and replicas, or shards), pool overrides, read
//! routing and its lag bounds, the functions that make a statement a
//! write, and its sharding keys (see [`super::shards`]) — and the backend
//! groups (one primary with its replicas each) it resolves to.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{
    Dur, HostPort, LoadBalancing, MapConfig, PoolMode, PrimaryReads, ReadYourWrites, Replica, Shard, ShardedTable,
    TransactionRouting,
};

/// `[databases.NAME]`: a logical database clients connect to.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// The primary (unsharded databases; a sharded one names each shard's).
    #[serde(default)]
    pub primary: Option<HostPort>,
    #[serde(default)]
    pub replicas: Vec<Replica>,
    /// Database name on the servers (defaults to the key).
    #[serde(default)]
    pub dbname: Option<String>,
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    #[serde(default)]
    pub pool_size: Option<usize>,
    #[serde(default)]
    pub min_pool_size: Option<usize>,
    /// Send reads to healthy replicas within the lag bounds (needs
    /// `monitor_user` and at least one replica).
    #[serde(default = "yes")]
    pub read_routing: bool,
    /// The `[[users]]` entry whose password the lag monitor logs in with.
    #[serde(default)]
    pub monitor_user: Option<String>,
    /// Replicas further behind the primary than this many WAL bytes get no reads.
    #[serde(default = "default_lag_bytes")]
    pub max_lag_bytes: u64,
    /// Replicas further behind than this get no reads.
    #[serde(default = "default_lag")]
    pub max_lag: Dur,
    /// `max_lag` in milliseconds (give one or the other).
    #[serde(default)]
    pub max_lag_ms: Option<u64>,
    #[serde(default = "default_check_interval")]
    pub check_interval: Dur,
    /// How long a failing replica is left out before it is probed again.
    #[serde(default = "default_ban_time")]
    pub ban_time: Dur,
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    #[serde(default)]
    pub primary_reads: PrimaryReads,
    #[serde(default)]
    pub read_your_writes: ReadYourWrites,
    #[serde(default)]
    pub transaction_routing: TransactionRouting,
    /// Functions (unqualified names) whose calls make a statement a write,
    /// on top of the built-in list (nextval, pg_advisory_lock, ...).
    #[serde(default)]
    pub write_functions: Vec<String>,
    /// A call of any function not known to be read-only makes a statement a
    /// write.
    #[serde(default)]
    pub functions_are_writes: bool,
    /// Send writes to a replica that was promoted while the primary is down
    /// or in recovery.
    #[serde(default)]
    pub follow_promotion: bool,
    /// Sharding (see [`super::shards`]): the shards, each a primary with replicas.
    #[serde(default)]
    pub shards: Vec<Shard>,
    /// Sharded tables: key column and map.
    #[serde(default)]
    pub tables: Vec<ShardedTable>,
    #[serde(default)]
    pub maps: BTreeMap<String, MapConfig>,
    /// Tables with the same rows on every shard: reads go to one shard,
    /// writes are refused (they would have to reach every shard at once).
    #[serde(default)]
    pub reference_tables: Vec<String>,
    /// Writes without a key, or to several shards, run on each shard (not
    /// atomically) instead of being refused.
    #[serde(default)]
    pub allow_cross_shard_writes: bool,
    /// With `allow_cross_shard_writes`: commit what touched several shards
    /// with PostgreSQL's two-phase commit (`PREPARE TRANSACTION`), all or
    /// nothing. The shards need `max_prepared_transactions > 0`.
    #[serde(default)]
    pub two_phase_commit: bool,
}

fn yes() -> bool {
    true
}
fn default_lag_bytes() -> u64 {
    16 * 1024 * 1024
}
pub(super) fn default_lag() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_check_interval() -> Dur {
    Dur(Duration::from_millis(500))
}
fn default_ban_time() -> Dur {
    Dur(Duration::from_secs(30))
}

impl Database {
    /// The time-lag bound: `max_lag_ms` when given, else `max_lag`.
    pub fn lag_bound(&self) -> Duration {
        self.max_lag_ms.map(Duration::from_millis).unwrap_or(self.max_lag.0)
    }

    pub fn server_dbname<'a>(&'a self, key: &'a str) -> &'a str {
        self.dbname.as_deref().unwrap_or(key)
    }

    /// The backend groups behind this database: (name, database with one
    /// primary and its replicas). One for an unsharded database (its own
    /// name); `NAME/SHARD` per shard of a sharded one, with the shard's
    /// servers and every other setting of the database.
    pub fn groups(&self, name: &str) -> Vec<(String, Database)> {
        if self.shards.is_empty() {
            return vec![(name.to_string(), self.clone())];
        }
        self.shards
            .iter()
            .map(|s| {
                let mut db = self.clone();
                db.primary = Some(s.primary.clone());
                db.replicas = s.replicas.clone();
                db.dbname = Some(s.dbname.clone().unwrap_or_else(|| self.server_dbname(name).to_string()));
                db.shards = Vec::new();
                db.tables = Vec::new();
                db.maps = BTreeMap::new();
                (format!("{name}/{}", s.name), db)
            })
            .collect()
    }

    /// The primary of a group (see [`Database::groups`]).
    pub fn primary_addr(&self) -> HostPort {
        self.primary.clone().unwrap_or_else(|| HostPort { host: "invalid".into(), port: 1 })
    }
}
