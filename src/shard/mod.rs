//! Sharding: a sharded database's shards (each a primary with its read
//! routing), its compiled shard maps, and the decision of which shards a
//! statement goes to — one (by its key, a hint or `SET pgmux.shard`), or
//! all of them (a read merged by [`merge`], or a refusal).
//!
//! A statement's text is analyzed (and the analysis cached) in
//! `analysis.rs`; [`ShardRouter::route`] turns the analysis, the key
//! values and the directory's answers into a [`ShardTarget`].

mod analysis;
pub mod copy;
pub mod directory;
pub mod hash;
pub mod ids;
pub mod key;
pub mod lex;
pub mod map;
pub mod merge;
pub mod mover;
pub mod numeric;
pub mod rekey;
pub mod schema;
pub mod split;
pub mod twophase;
pub mod values;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::backend::pool::Pool;
use crate::config::{Database, KeyType};
use crate::protocol::error::{sqlstate, PgError};
use crate::router::route::Routing;
use crate::sql::classify::{Classifier, Hint, Kind};
use analysis::Analysis;
use key::{KeyExpr, Scope};
use map::{Key, ShardMap};

/// Directory keys a session looked up for its current transaction:
/// (map, key) → shard (None: not in the directory).
pub type Resolved = HashMap<(usize, String), Option<usize>>;

/// One shard as a session uses it.
#[derive(Clone)]
pub struct ShardBackend {
    pub name: String,
    pub primary: Arc<Pool>,
    pub routing: Option<Arc<Routing>>,
}

/// Where a statement goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardTarget {
    /// This shard.
    One(usize),
    /// Any shard will do (no sharded table).
    Any,
    /// Every shard, results merged.
    All(Box<merge::MergePlan>),
    /// Look `key` up in directory map `map` first (`assign`: an INSERT,
    /// which gives a new key a shard), then route again.
    Lookup { map: usize, key: String, assign: bool },
    /// COPY FROM STDIN into a sharded table: rows split by key.
    CopyIn(Box<copy::CopyIn>),
    /// A write run on each of these shards (None: all), not atomically
    /// (`allow_cross_shard_writes`).
    Write(Option<Vec<usize>>),
    /// A write to a reference table: the same on every shard
    /// (`allow_cross_shard_writes`).
    Everywhere,
    /// An INSERT whose rows belong to several shards, cut per shard
    /// (`allow_cross_shard_writes`).
    Split(Box<split::Split>),
    /// A schema change: on every shard.
    Schema(schema::Change),
    /// Read this table's columns first (an INSERT without a column
    /// list), then route again.
    Columns(String),
    /// An UPDATE that assigns the shard key: rows may move between shards
    /// (`allow_cross_shard_writes`).
    Rekey(Box<rekey::Rekey>),
    /// `SELECT pgmux.unique_id()`, answered by pgmux (the column's name).
    UniqueId(String),
    /// An INSERT whose key the database makes (`pgmux_next_id`): any
    /// shard, a new transaction's chosen in turn ([`ShardRouter::next_made`]).
    Made,
}
struct TableMap {
    tables: HashMap<String, (String, usize)>,
    /// Reference tables, folded.
    reference: std::collections::HashSet<String>,
    /// Sharded tables' columns, as read from the first shard (shared by
    /// every user's router of the database).
    columns: Arc<schema::Columns>,
}

impl key::Tables for TableMap {
    fn sharded(&self, table: &str) -> Option<(&str, usize)> {
        self.tables.get(table).map(|(k, m)| (k.as_str(), *m))
    }

    fn columns(&self, table: &str) -> Option<Arc<[String]>> {
        self.columns.get(table)
    }

    fn made_key(&self, table: &str) -> Option<bool> {
        self.columns.made_key(table)
    }
}

/// A sharded database, for one user.
pub struct ShardRouter {
    pub name: String,
    pub backends: Vec<ShardBackend>,
    maps: Vec<ShardMap>,
    tables: TableMap,
    /// Directories of `directory` maps, by map index.
    directories: HashMap<usize, Arc<directory::Directory>>,
    classifier: Classifier,
    allow_cross_shard_writes: bool,
    two_phase_commit: bool,
    /// Shards whose two-phase commit log table is known to exist.
    commit_logs: Mutex<std::collections::HashSet<usize>>,
    cache: Mutex<LruCache<String, Analysis>>,
    /// Analyses by statement shape (see [`ShardRouter::analysis`]).
    shapes: Mutex<LruCache<String, Analysis>>,
    /// The schema changes the analyses were made after.
    analyzed_after: std::sync::atomic::AtomicU64,
    /// The shard of the next INSERT whose key the database makes.
    next_made: AtomicUsize,
    /// `pgmux_next_id` was installed on the shards (or could not be).
    ids_installed: tokio::sync::OnceCell<()>,
}

fn feature(message: impl Into<String>) -> PgError {
    PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, message)
}

impl ShardRouter {
    /// `directories`: the started directories of `directory` maps, by map name.
    pub fn new(
        name: &str,
        db: &Database,
        backends: Vec<ShardBackend>,
        directories: &HashMap<String, Arc<directory::Directory>>,
        columns: Arc<schema::Columns>,
    ) -> ShardRouter {
        let shard_index = |s: &str| db.shards.iter().position(|x| x.name == s).unwrap_or(0);
        let mut maps = Vec::new();
        let mut map_index = HashMap::new();
        for (map_name, cfg) in &db.maps {
            match ShardMap::compile(cfg, db.shards.len(), shard_index) {
                Ok(m) => {
                    map_index.insert(map_name.clone(), maps.len());
                    maps.push(m);
                }
                Err(e) => tracing::error!(database = name, map = %map_name, "shard map unusable: {e}"),
            }
        }
        let directories = map_index.iter().filter_map(|(name, &i)| Some((i, directories.get(name)?.clone()))).collect();
        let tables = db
            .tables
            .iter()
            .filter_map(|t| Some((t.name.to_lowercase(), (t.key.to_lowercase(), *map_index.get(&t.map)?))))
            .collect();
        let cap = NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN);
        ShardRouter {
            name: name.to_string(),
            backends,
            maps,
            tables: TableMap {
                tables,
                reference: db.reference_tables.iter().map(|t| t.to_lowercase()).collect(),
                columns,
            },
            directories,
            classifier: Classifier::new(0, &db.write_functions, db.functions_are_writes),
            allow_cross_shard_writes: db.allow_cross_shard_writes,
            two_phase_commit: db.two_phase_commit,
            commit_logs: Mutex::new(Default::default()),
            cache: Mutex::new(LruCache::new(cap)),
            shapes: Mutex::new(LruCache::new(cap)),
            analyzed_after: Default::default(),
            next_made: AtomicUsize::new(0),
            ids_installed: tokio::sync::OnceCell::new(),
        }
    }

    /// Transactions may span shards (`allow_cross_shard_writes`).
    pub fn cross_shard(&self) -> bool {
        self.allow_cross_shard_writes
    }

    /// Commit what spans shards atomically (`two_phase_commit`).
    pub fn two_phase(&self) -> bool {
        self.two_phase_commit
    }

    /// Whether shard `i` has the two-phase commit log; `set` records that
    /// it has.
    pub fn commit_log(&self, i: usize, set: bool) -> bool {
        let mut logs = self.commit_logs.lock().unwrap_or_else(|e| e.into_inner());
        if set {
            logs.insert(i);
        }
        logs.contains(&i)
    }

    /// Settle the prepared transactions a pgmux left on these shards
    /// (see [`twophase::recover`]).
    pub async fn recover_prepared(&self, grace: std::time::Duration) -> Result<twophase::Recovered, PgError> {
        twophase::recover(&self.backends, grace).await
    }

    /// A lone `BEGIN` / `START TRANSACTION` (any mode): its shard is that
    /// of the transaction's first statement.
    pub fn begins_transaction(&self, sql: &str) -> bool {
        let head = sql.trim_start().get(..5).unwrap_or_default();
        if !head.eq_ignore_ascii_case("begin") && !head.eq_ignore_ascii_case("start") {
            return false;
        }
        self.classifier
            .classify(sql)
            .is_ok_and(|c| c.statements == 1 && matches!(c.kind, Kind::Begin | Kind::BeginReadOnly))
    }

    fn shard_named(&self, s: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.name == s).or_else(|| s.parse().ok().filter(|&i| i < self.backends.len()))
    }

    /// Where the statement `sql` goes; `params` are the Bind values (text
    /// or binary per `formats`) for `$n` keys; `session_shard` is the
    /// session's `pgmux.shard` setting.
    pub fn route(
        &self,
        sql: &str,
        params: &[(Option<&[u8]>, bool)],
        session_shard: Option<&str>,
        resolved: &mut Resolved,
    ) -> Result<ShardTarget, PgError> {
        if let Some(s) = session_shard.filter(|s| !s.is_empty() && *s != "auto") {
            return self.shard_named(s).map(ShardTarget::One).ok_or_else(|| {
                PgError::error(sqlstate::INVALID_PARAMETER_VALUE, format!("pgmux.shard: no shard \"{s}\""))
            });
        }
        let analysis = self.analysis(sql);
        match analysis {
            Analysis::Refused(why) => Err(feature(format!("pgmux: {why}"))),
            Analysis::CopyIn(c) => Ok(ShardTarget::CopyIn(c)),
            Analysis::Scatter(plan) => Ok(ShardTarget::All(plan)),
            Analysis::Hinted(Hint::Shard(n)) => usize::try_from(n)
                .ok()
                .filter(|&i| i < self.backends.len())
                .map(ShardTarget::One)
                .ok_or_else(|| PgError::error(sqlstate::INVALID_PARAMETER_VALUE, format!("pgmux: no shard {n}"))),
            Analysis::Hinted(Hint::Key(k)) => {
                let map = self.maps.first().ok_or_else(|| feature("pgmux: this database has no shard map"))?;
                let key = Key::from_text(map.key_type(), &k).map_err(key_error)?;
                match self.shard_for(0, &key, false, resolved)? {
                    KeyShard::At(i) => Ok(ShardTarget::One(i)),
                    KeyShard::Absent => Ok(ShardTarget::Any),
                    KeyShard::Lookup(t) => Ok(t),
                }
            }
            Analysis::Everywhere => Ok(ShardTarget::Everywhere),
            Analysis::Schema(change) => Ok(ShardTarget::Schema(change)),
            Analysis::UniqueId(column) => Ok(ShardTarget::UniqueId(column)),
            Analysis::Rekey { scope, rekey } => self.rekey_target(scope, rekey, params, resolved),
            Analysis::Scope { scope: Scope::Columns(table), .. } => Ok(ShardTarget::Columns(table)),
            Analysis::Scope { scope: Scope::Made { .. }, .. } => Ok(ShardTarget::Made),
            Analysis::Scope { scope: Scope::Unsharded, home: true, .. } => Ok(ShardTarget::One(0)),
            Analysis::Hinted(_) | Analysis::Scope { scope: Scope::Unsharded, .. } => Ok(ShardTarget::Any),
            Analysis::Scope { scope: Scope::Mixed(tables), .. } => Err(feature(format!(
                "pgmux: tables sharded by different maps ({}) cannot be used in one statement",
                tables.join(", ")
            ))),
            Analysis::Scope { scope: Scope::All { .. }, insert: false, .. } if self.allow_cross_shard_writes => {
                Ok(ShardTarget::Write(None))
            }
            Analysis::Scope { scope: Scope::All { .. }, .. } => Err(feature(
                "pgmux: a write to a sharded table needs its shard key (WHERE key = ... or the key column in INSERT)",
            )
            .with_hint("Or name the shard: /* pgmux: shard=N */ or SET pgmux.shard = N.")),
            Analysis::Scope { scope: Scope::Keys { map, keys }, read, insert, merge, .. } => {
                match self.shards_of_keys(map, &keys, insert, params, resolved)? {
                    KeysAt::Lookup(t) => Ok(t),
                    KeysAt::Shards(each) if insert => self.insert_rows(sql, &each),
                    KeysAt::Shards(each) => {
                        let mut shards: Vec<usize> = Vec::new();
                        for s in each.into_iter().flatten() {
                            if !shards.contains(&s) {
                                shards.push(s);
                            }
                        }
                        self.spanning(sql, shards, read, merge)
                    }
                }
            }
        }
    }

    /// The shard of each of a statement's keys in map `m` (`params`: the
    /// Bind values; None: a key the directory does not have), or the
    /// directory lookup that must come first.
    fn shards_of_keys(
        &self,
        m: usize,
        keys: &[KeyExpr],
        insert: bool,
        params: &[(Option<&[u8]>, bool)],
        resolved: &mut Resolved,
    ) -> Result<KeysAt, PgError> {
        let map = &self.maps[m];
        let mut shards = Vec::with_capacity(keys.len());
        for k in keys {
            let key = resolve(map.key_type(), k, params)?;
            shards.push(match self.shard_for(m, &key, insert, resolved)? {
                KeyShard::At(s) => Some(s),
                KeyShard::Absent => None,
                KeyShard::Lookup(t) => return Ok(KeysAt::Lookup(t)),
            });
        }
        Ok(KeysAt::Shards(shards))
    }

    /// Where an INSERT whose row `i` belongs on shard `each[i]` goes: that
    /// shard, or each shard its rows (cut per shard) when writes may span
    /// shards.
    fn insert_rows(&self, sql: &str, each: &[Option<usize>]) -> Result<ShardTarget, PgError> {
        // An INSERT gives every key a shard (a directory assigns one).
        let each: Vec<usize> = each.iter().map(|s| s.unwrap_or(0)).collect();
        match each.split_first() {
            None => Ok(ShardTarget::Any),
            Some((first, rest)) if rest.iter().all(|s| s == first) => Ok(ShardTarget::One(*first)),
            Some(_) if !self.allow_cross_shard_writes => Err(feature(
                "pgmux: an INSERT whose rows belong to several shards is a write spanning shards, refused \
                 (allow_cross_shard_writes = false)",
            )
            .with_hint("Insert each shard's rows in an INSERT of their own.")),
            Some(_) => split::split_insert(sql, &each)
                .map(|s| ShardTarget::Split(Box::new(s)))
                .map_err(|why| feature(format!("pgmux: {why}"))),
        }
    }

    /// Where a statement (not an INSERT) whose keys are on `shards` goes:
    /// nowhere in particular (no key is anywhere), that shard, or every one
    /// of them (a read merged by `merge`, or a write when allowed).
    fn spanning(
        &self,
        sql: &str,
        mut shards: Vec<usize>,
        read: bool,
        merge: Option<Result<Box<merge::MergePlan>, String>>,
    ) -> Result<ShardTarget, PgError> {
        match shards.as_slice() {
            // Keys the directory does not have: no rows anywhere.
            [] => Ok(ShardTarget::Any),
            [one] => Ok(ShardTarget::One(*one)),
            _ if read => match merge.or_else(|| match self.analyze(sql) {
                // From a shape: the merge plan is this text's own.
                Analysis::Scope { merge, .. } => merge,
                _ => None,
            }) {
                Some(Ok(mut plan)) => {
                    shards.sort_unstable();
                    plan.shards = Some(shards);
                    Ok(ShardTarget::All(plan))
                }
                Some(Err(why)) => Err(feature(format!("pgmux: keys on several shards: {why}"))),
                None => Err(feature("pgmux: keys on several shards in one read")),
            },
            _ if self.allow_cross_shard_writes => {
                shards.sort_unstable();
                Ok(ShardTarget::Write(Some(shards)))
            }
            _ => Err(feature("pgmux: a write spanning shards is refused (allow_cross_shard_writes = false)")),
        }
    }
}

/// Where the keys of one statement are.
enum KeysAt {
    /// The shard of each key (None: a key the directory does not have).
    Shards(Vec<Option<usize>>),
    /// A directory lookup comes first.
    Lookup(ShardTarget),
}

/// Where one key is.
enum KeyShard {
    At(usize),
    /// Not in the directory (and not to be assigned).
    Absent,
    Lookup(ShardTarget),
}

impl ShardRouter {
    /// The shard of a key; a directory answer from the cache is kept in
    /// `resolved`, so the rest of the transaction sees the same one even if
    /// the cache entry goes meanwhile.
    fn shard_for(&self, map: usize, key: &Key, insert: bool, resolved: &mut Resolved) -> Result<KeyShard, PgError> {
        let m = self.maps.get(map).ok_or_else(|| feature("pgmux: unknown shard map"))?;
        if !matches!(m, ShardMap::Directory { .. }) {
            return m.shard_of(key).map(KeyShard::At).map_err(key_error);
        }
        let dir = self.directories.get(&map).ok_or_else(|| feature("pgmux: shard directory not configured"))?;
        let text = key.directory_text();
        let known = match resolved.get(&(map, text.clone())) {
            Some(k) => Some(*k),
            None => {
                let hit = dir.cached(&text);
                if let Some(h) = hit {
                    resolved.insert((map, text.clone()), h);
                }
                hit
            }
        };
        Ok(match known {
            Some(Some(i)) => KeyShard::At(i),
            Some(None) if !insert => KeyShard::Absent,
            _ => KeyShard::Lookup(ShardTarget::Lookup { map, key: text, assign: insert }),
        })
    }

    /// A sharded table's key column and map.
    pub fn sharded_table(&self, table: &str) -> Option<(String, usize)> {
        self.tables.tables.get(table).cloned()
    }

    pub fn key_type(&self, map: usize) -> Option<KeyType> {
        self.maps.get(map).map(ShardMap::key_type)
    }

    /// The shard of `key` in `map`, looked up (and assigned: the key is
    /// being written) in a directory when it has to be.
    pub async fn shard_of_key(&self, map: usize, key: &Key, resolved: &mut Resolved) -> Result<usize, PgError> {
        for _ in 0..4 {
            match self.shard_for(map, key, true, resolved)? {
                KeyShard::At(i) => return Ok(i),
                KeyShard::Absent => {}
                KeyShard::Lookup(_) => self.lookup(map, &key.directory_text(), true, resolved).await?,
            }
        }
        Err(PgError::error(sqlstate::CONNECTION_FAILURE, format!("pgmux: the shard directory did not place key {key}")))
    }

    /// Resolve a [`ShardTarget::Lookup`] into `resolved`.
    pub async fn lookup(&self, map: usize, key: &str, assign: bool, resolved: &mut Resolved) -> Result<(), PgError> {
        let dir = self.directories.get(&map).ok_or_else(|| feature("pgmux: shard directory not configured"))?;
        let shard = dir
            .lookup(key, assign)
            .await
            .map_err(|e| PgError::error(sqlstate::CONNECTION_FAILURE, format!("pgmux: {e}")))?;
        resolved.insert((map, key.to_string()), shard);
        Ok(())
    }
}

fn key_error(e: map::KeyError) -> PgError {
    match e {
        map::KeyError::Invalid(..) => PgError::error(sqlstate::INVALID_TEXT_REPRESENTATION, format!("pgmux: {e}")),
        map::KeyError::NoShard(_) => PgError::error(sqlstate::CHECK_VIOLATION, format!("pgmux: {e}"))
            .with_hint("The shard map has no range or list entry for this key."),
    }
}

fn resolve(kt: KeyType, k: &KeyExpr, params: &[(Option<&[u8]>, bool)]) -> Result<Key, PgError> {
    match k {
        KeyExpr::Lit(s) => Key::from_text(kt, s).map_err(key_error),
        KeyExpr::LitAt(_) => Err(feature("pgmux: unresolved key literal")),
        KeyExpr::Param(n) => match params.get(n.wrapping_sub(1)) {
            Some((Some(v), true)) => Key::from_binary(kt, v).map_err(key_error),
            Some((Some(v), false)) => Key::from_text(kt, &String::from_utf8_lossy(v)).map_err(key_error),
            Some((None, _)) => Err(feature("pgmux: a NULL shard key")),
            None => Err(PgError::error(sqlstate::PROTOCOL_VIOLATION, format!("pgmux: no value for ${n}"))),
        },
    }
}
