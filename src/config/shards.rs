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

/// A key and what is wrong with it.
type Invalid = (String, String);

/// Check a sharded database's keys; the error names the offending key.
pub fn check(db: &str, k: &Database) -> Result<(), Invalid> {
    let keys = Keys { db, shards: k.shards.iter().map(|s| s.name.as_str()).collect() };
    for (i, s) in k.shards.iter().enumerate() {
        if s.name.is_empty() || keys.shards[..i].contains(&s.name.as_str()) {
            return Err((
                keys.key(&format!("shards[{i}].name")),
                format!("shard name \"{}\" is empty or repeated", s.name),
            ));
        }
    }
    if k.two_phase_commit && !k.allow_cross_shard_writes {
        return Err((keys.key("two_phase_commit"), "needs allow_cross_shard_writes = true".into()));
    }
    for (name, map) in &k.maps {
        match map {
            MapConfig::Hash { .. } => {}
            MapConfig::Directory { table, weights, user, .. } => {
                let login = user.is_some() || k.monitor_user.is_some();
                check_directory(&keys, &keys.key(&format!("maps.{name}")), table, weights, login)?
            }
            MapConfig::Range { ranges, .. } => check_ranges(&keys, name, map.key_type(), ranges)?,
            MapConfig::List { lists, default, .. } => {
                check_lists(&keys, name, map.key_type(), lists, default.as_deref())?
            }
        }
    }
    let mut tables: Vec<String> = Vec::new();
    for (i, t) in k.tables.iter().enumerate() {
        let at = keys.key(&format!("tables[{i}]"));
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

/// Where the keys of one sharded database are, and its shard names.
struct Keys<'a> {
    db: &'a str,
    shards: Vec<&'a str>,
}

impl Keys<'_> {
    /// The full name of a key of the database.
    fn key(&self, s: &str) -> String {
        format!("databases.{}.{s}", self.db)
    }

    /// `name` must be one of the shards; `what` is the key naming it.
    fn known_shard(&self, what: String, name: &str) -> Result<(), Invalid> {
        if self.shards.contains(&name) {
            Ok(())
        } else {
            Err((what, format!("unknown shard \"{name}\" (shards: {})", self.shards.join(", "))))
        }
    }
}

/// A key value of a map must be of the map's type.
fn typed(kt: KeyType, what: String, v: &RawKey) -> Result<(), Invalid> {
    match (kt, v) {
        (KeyType::Int2 | KeyType::Int4 | KeyType::Int8, RawKey::Int(_)) => Ok(()),
        (KeyType::Text | KeyType::Uuid, RawKey::Text(_)) => Ok(()),
        _ => Err((what, format!("value {v:?} does not match the map's type {kt:?}"))),
    }
}

/// A directory map (`at`: its key): its table, its weights, and a user
/// to log in as (`login`: its own or the database's monitor_user).
fn check_directory(
    keys: &Keys,
    at: &str,
    table: &str,
    weights: &std::collections::BTreeMap<String, u32>,
    login: bool,
) -> Result<(), Invalid> {
    let ident = |t: &str| {
        t.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    if !ident(table) {
        return Err((format!("{at}.table"), "must be a lower-case identifier".into()));
    }
    for w in weights.keys() {
        keys.known_shard(format!("{at}.weights"), w)?;
    }
    if !login {
        return Err((format!("{at}.user"), "needed (or the database's monitor_user)".into()));
    }
    Ok(())
}

/// The ranges of range map `name`: known shards, typed, ordered bounds,
/// no overlaps.
fn check_ranges(keys: &Keys, name: &str, kt: KeyType, ranges: &[RangeEntry]) -> Result<(), Invalid> {
    for (i, r) in ranges.iter().enumerate() {
        let at = keys.key(&format!("maps.{name}.ranges[{i}]"));
        keys.known_shard(format!("{at}.shard"), &r.shard)?;
        for v in r.from.iter().chain(r.to.iter()) {
            typed(kt, at.clone(), v)?;
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
    Ok(())
}

/// The lists of list map `name`: known shards, typed values, each value
/// once; a known default shard.
fn check_lists(
    keys: &Keys,
    name: &str,
    kt: KeyType,
    lists: &[ListEntry],
    default: Option<&str>,
) -> Result<(), Invalid> {
    let mut seen: Vec<&RawKey> = Vec::new();
    for (i, l) in lists.iter().enumerate() {
        let at = keys.key(&format!("maps.{name}.lists[{i}]"));
        keys.known_shard(format!("{at}.shard"), &l.shard)?;
        for v in &l.values {
            typed(kt, at.clone(), v)?;
            if seen.contains(&v) {
                return Err((at, format!("value {v:?} is listed twice")));
            }
            seen.push(v);
        }
    }
    if let Some(d) = default {
        keys.known_shard(keys.key(&format!("maps.{name}.default")), d)?;
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
