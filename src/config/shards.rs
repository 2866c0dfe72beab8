//! Sharding configuration of a database: its shards (each a primary with
//! replicas), the shard maps (hash, range, list) and the tables they
//! apply to, reference tables, and their validation.
//!
//! ```toml
//! [databases.shop]
//! shards = [{ name = "s0", primary = "10.0.0.1:5432" }, { name = "s1", primary = "10.0.0.2:5432" }]
//! tables = [{ name = "users", key = "id", map = "by_id" }, { name = "orders", key = "user_id", map = "by_id" }]
//! reference_tables = ["countries"]
//! [databases.shop.maps.by_id]
//! kind = "hash"
//! type = "int8"
//! ```

use serde::Deserialize;

use super::{Database, HostPort, Replica};

/// `shards = [...]`: one shard.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub name: String,
    pub primary: HostPort,
    #[serde(default)]
    pub replicas: Vec<Replica>,
    /// Database name on this shard's servers (defaults to the database's).
    #[serde(default)]
    pub dbname: Option<String>,
}

/// `tables = [...]`: a sharded table, its key column and map.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardedTable {
    pub name: String,
    pub key: String,
    pub map: String,
}

/// The type of a shard key, as PostgreSQL hashes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    #[serde(alias = "smallint")]
    Int2,
    #[serde(alias = "integer", alias = "int")]
    Int4,
    #[serde(alias = "bigint")]
    Int8,
    #[serde(alias = "varchar")]
    Text,
    Uuid,
}

/// A key value in the config (a TOML integer or string).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum RawKey {
    Int(i64),
    Text(String),
}

/// One range of a range map: `from` inclusive, `to` exclusive (as in
/// PostgreSQL's `PARTITION BY RANGE`); a missing end is unbounded.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeEntry {
    #[serde(default)]
    pub from: Option<RawKey>,
    #[serde(default)]
    pub to: Option<RawKey>,
    pub shard: String,
}

/// One entry of a list map: these values live on this shard.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListEntry {
    pub values: Vec<RawKey>,
    pub shard: String,
}

/// `[databases.NAME.maps.MAP]`: how a key picks its shard.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum MapConfig {
    /// PostgreSQL `PARTITION BY HASH` with modulus = number of shards:
    /// remainder `i` is the `i`-th shard.
    Hash {
        #[serde(rename = "type")]
        key_type: KeyType,
    },
    Range {
        #[serde(rename = "type")]
        key_type: KeyType,
        ranges: Vec<RangeEntry>,
    },
    List {
        #[serde(rename = "type")]
        key_type: KeyType,
        lists: Vec<ListEntry>,
        /// Shard of values not listed (none: such a key is an error).
        #[serde(default)]
        default: Option<String>,
    },
    /// A key → shard table in PostgreSQL (see `shard::directory`).
    Directory {
        #[serde(rename = "type")]
        key_type: KeyType,
        /// The server holding the directory table.
        backend: HostPort,
        /// Its database (default: the sharded database's name).
        #[serde(default)]
        dbname: Option<String>,
        #[serde(default = "directory_table")]
        table: String,
        /// The `[[users]]` entry to log in as (default: `monitor_user`).
        #[serde(default)]
        user: Option<String>,
        /// Weights of shards for new keys (default 1; 0: no new keys).
        #[serde(default)]
        weights: std::collections::BTreeMap<String, u32>,
        #[serde(default = "directory_cache")]
        cache_size: usize,
    },
}

fn directory_table() -> String {
    "pgmux_directory".into()
}

fn directory_cache() -> usize {
    100_000
}

impl MapConfig {
    /// `hash`, `range`, `list` or `directory`.
    pub fn kind(&self) -> &'static str {
        match self {
            MapConfig::Hash { .. } => "hash",
            MapConfig::Range { .. } => "range",
            MapConfig::List { .. } => "list",
            MapConfig::Directory { .. } => "directory",
        }
    }

    pub fn key_type(&self) -> KeyType {
        match self {
            MapConfig::Hash { key_type }
            | MapConfig::Range { key_type, .. }
            | MapConfig::List { key_type, .. }
            | MapConfig::Directory { key_type, .. } => *key_type,
        }
    }
}

/// Check a sharded database's keys; the error names the offending key.
pub fn check(db: &str, k: &Database) -> Result<(), (String, String)> {
    let key = |s: &str| format!("databases.{db}.{s}");
    let shard_names: Vec<&str> = k.shards.iter().map(|s| s.name.as_str()).collect();
    for (i, s) in k.shards.iter().enumerate() {
        if s.name.is_empty() || shard_names[..i].contains(&s.name.as_str()) {
            return Err((key(&format!("shards[{i}].name")), format!("shard name \"{}\" is empty or repeated", s.name)));
        }
    }
    if k.two_phase_commit && !k.allow_cross_shard_writes {
        return Err((key("two_phase_commit"), "needs allow_cross_shard_writes = true".into()));
    }
    let known_shard = |what: String, name: &str| -> Result<(), (String, String)> {
        if shard_names.contains(&name) {
            Ok(())
        } else {
            Err((what, format!("unknown shard \"{name}\" (shards: {})", shard_names.join(", "))))
        }
    };
    for (name, map) in &k.maps {
        let kt = map.key_type();
        let typed = |what: String, v: &RawKey| -> Result<(), (String, String)> {
            match (kt, v) {
                (KeyType::Int2 | KeyType::Int4 | KeyType::Int8, RawKey::Int(_)) => Ok(()),
                (KeyType::Text | KeyType::Uuid, RawKey::Text(_)) => Ok(()),
                _ => Err((what, format!("value {v:?} does not match the map's type {kt:?}"))),
            }
        };
        match map {
            MapConfig::Hash { .. } => {}
            MapConfig::Directory { table, weights, user, .. } => {
                let at = key(&format!("maps.{name}"));
                let ident = |t: &str| {
                    t.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                        && t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                };
                if !ident(table) {
                    return Err((format!("{at}.table"), "must be a lower-case identifier".into()));
                }
                for w in weights.keys() {
                    known_shard(format!("{at}.weights"), w)?;
                }
                if user.is_none() && k.monitor_user.is_none() {
                    return Err((format!("{at}.user"), "needed (or the database's monitor_user)".into()));
                }
            }
            MapConfig::Range { ranges, .. } => {
                for (i, r) in ranges.iter().enumerate() {
                    let at = key(&format!("maps.{name}.ranges[{i}]"));
                    known_shard(format!("{at}.shard"), &r.shard)?;
                    for v in r.from.iter().chain(r.to.iter()) {
                        typed(at.clone(), v)?;
                    }
                    if let (Some(f), Some(t)) = (&r.from, &r.to) {
                        if cmp_raw(f, t) != std::cmp::Ordering::Less {
                            return Err((at, "from must be below to (from is inclusive, to exclusive)".into()));
                        }
                    }
                    for (j, o) in ranges[..i].iter().enumerate() {
                        if overlaps(r, o) {
                            return Err((at, format!("overlaps ranges[{j}]")));
                        }
                    }
                }
            }
            MapConfig::List { lists, default, .. } => {
                let mut seen: Vec<&RawKey> = Vec::new();
                for (i, l) in lists.iter().enumerate() {
                    let at = key(&format!("maps.{name}.lists[{i}]"));
                    known_shard(format!("{at}.shard"), &l.shard)?;
                    for v in &l.values {
                        typed(at.clone(), v)?;
                        if seen.contains(&v) {
                            return Err((at, format!("value {v:?} is listed twice")));
                        }
                        seen.push(v);
                    }
                }
                if let Some(d) = default {
                    known_shard(key(&format!("maps.{name}.default")), d)?;
                }
            }
        }
    }
    let mut tables: Vec<String> = Vec::new();
    for (i, t) in k.tables.iter().enumerate() {
        let at = key(&format!("tables[{i}]"));
        let lower = t.name.to_ascii_lowercase();
        if tables.contains(&lower) || k.reference_tables.iter().any(|r| r.eq_ignore_ascii_case(&t.name)) {
            return Err((at, format!("table \"{}\" is mapped twice", t.name)));
        }
        if !k.maps.contains_key(&t.map) {
            return Err((format!("{at}.map"), format!("unknown map \"{}\"", t.map)));
        }
        tables.push(lower);
    }
    Ok(())
}

fn cmp_raw(a: &RawKey, b: &RawKey) -> std::cmp::Ordering {
    match (a, b) {
        (RawKey::Int(x), RawKey::Int(y)) => x.cmp(y),
        (RawKey::Text(x), RawKey::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (RawKey::Int(_), RawKey::Text(_)) => std::cmp::Ordering::Less,
        (RawKey::Text(_), RawKey::Int(_)) => std::cmp::Ordering::Greater,
    }
}

/// Whether two half-open ranges share a value.
fn overlaps(a: &RangeEntry, b: &RangeEntry) -> bool {
    let below = |to: &Option<RawKey>, from: &Option<RawKey>| match (to, from) {
        (Some(t), Some(f)) => cmp_raw(t, f) != std::cmp::Ordering::Greater,
        _ => false,
    };
    !(below(&a.to, &b.from) || below(&b.to, &a.from))
}
