//! Sharding: a sharded database's shards (each a primary with its read
//! routing), its compiled shard maps, and the decision of which shards a
//! statement goes to — one (by its key, a hint or `SET pgmux.shard`), or
//! all of them (a read merged by [`merge`], or a refusal).

pub mod copy;
pub mod directory;
pub mod hash;
pub mod key;
pub mod map;
pub mod merge;
pub mod mover;
pub mod twophase;
pub mod values;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::backend::pool::Pool;
use crate::config::{Database, KeyType};
use crate::protocol::error::{sqlstate, PgError};
use crate::router::route::Routing;
use crate::sql::classify::{Classifier, Hint, Kind};
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
}

/// The analysis of one statement text, cached.
#[derive(Clone, Debug)]
enum Analysis {
    Scope {
        scope: Scope,
        read: bool,
        insert: bool,
        /// Names tables neither sharded nor reference: the first shard's.
        home: bool,
        /// How a read merges when its keys are on several shards.
        merge: Option<Result<Box<merge::MergePlan>, String>>,
    },
    Scatter(Box<merge::MergePlan>),
    /// A write to a reference table: on every shard.
    Everywhere,
    Refused(String),
    Hinted(Hint),
    CopyIn(Box<copy::CopyIn>),
}

struct TableMap {
    tables: HashMap<String, (String, usize)>,
    /// Reference tables, folded.
    reference: std::collections::HashSet<String>,
}

impl key::Tables for TableMap {
    fn sharded(&self, table: &str) -> Option<(&str, usize)> {
        self.tables.get(table).map(|(k, m)| (k.as_str(), *m))
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
            tables: TableMap { tables, reference: db.reference_tables.iter().map(|t| t.to_lowercase()).collect() },
            directories,
            classifier: Classifier::new(0, &db.write_functions, db.functions_are_writes),
            allow_cross_shard_writes: db.allow_cross_shard_writes,
            two_phase_commit: db.two_phase_commit,
            commit_logs: Mutex::new(Default::default()),
            cache: Mutex::new(LruCache::new(cap)),
            shapes: Mutex::new(LruCache::new(cap)),
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

    fn analyze(&self, sql: &str) -> Analysis {
        let classified = match self.classifier.classify(sql) {
            Ok(c) => c,
            Err(e) => return Analysis::Refused(e.to_string()),
        };
        let read = matches!(classified.kind, Kind::Read);
        if let Some(h @ (Hint::Shard(_) | Hint::Key(_))) = classified.hint {
            return Analysis::Hinted(h);
        }
        let Ok(stmts) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
            return Analysis::Scope { scope: Scope::Unsharded, read, insert: false, home: false, merge: None };
        };
        if stmts.len() > 1 {
            let scopes: Vec<Scope> = stmts.iter().map(|s| key::scope(s, &self.tables)).collect();
            if scopes.iter().all(|s| *s == Scope::Unsharded) {
                return Analysis::Scope { scope: Scope::Unsharded, read, insert: false, home: false, merge: None };
            }
            return Analysis::Refused(
                "several statements in one query on a sharded database: send them one by one".into(),
            );
        }
        let Some(stmt) = stmts.first() else {
            return Analysis::Scope { scope: Scope::Unsharded, read, insert: false, home: false, merge: None };
        };
        match copy::copy_in(stmt) {
            Some(Ok(c)) if self.tables.tables.contains_key(&c.table) => return Analysis::CopyIn(Box::new(c)),
            Some(Err(why)) => return Analysis::Refused(why),
            _ => {}
        }
        let insert = matches!(stmt, sqlparser::ast::Statement::Insert(_));
        if let Some(t) = key::write_target(stmt).filter(|t| self.tables.reference.contains(t)) {
            if self.allow_cross_shard_writes {
                return Analysis::Everywhere;
            }
            return Analysis::Refused(format!(
                "{t} is a reference table (the same rows on every shard): change it on each shard directly \
                 (or set allow_cross_shard_writes)"
            ));
        }
        let home = key::relations(stmt)
            .iter()
            .any(|t| !self.tables.reference.contains(t) && !self.tables.tables.contains_key(t));
        match key::scope(stmt, &self.tables) {
            Scope::All { .. } if read => match merge::plan(stmt, sql) {
                Ok(plan) => Analysis::Scatter(Box::new(plan)),
                Err(why) => Analysis::Refused(why),
            },
            scope @ Scope::Keys { .. } if read => {
                let merge = Some(merge::plan(stmt, sql).map(Box::new));
                Analysis::Scope { scope, read, insert, home, merge }
            }
            scope => Analysis::Scope { scope, read, insert, home, merge: None },
        }
    }

    /// The analysis of `sql`: cached by its text, or by its shape (literals
    /// blanked) with the key literals taken from this text by position.
    fn analysis(&self, sql: &str) -> Analysis {
        if let Some(a) = self.cache.lock().ok().and_then(|mut c| c.get(sql).cloned()) {
            return a;
        }
        let shaped = crate::sql::scan::shape_and_literals(sql);
        if let Some((shape, lits)) = &shaped {
            let hit = self.shapes.lock().ok().and_then(|mut c| c.get(shape).cloned());
            if let Some(Analysis::Scope { scope: Scope::Keys { map, keys }, read, insert, home, .. }) = hit {
                let keys = keys
                    .into_iter()
                    .map(|k| match k {
                        KeyExpr::LitAt(i) => KeyExpr::Lit(lits.get(i).cloned().unwrap_or_default()),
                        k => k,
                    })
                    .collect();
                return Analysis::Scope { scope: Scope::Keys { map, keys }, read, insert, home, merge: None };
            }
            if let Some(a) = hit {
                return a;
            }
        }
        let a = self.analyze(sql);
        if sql.len() > crate::sql::classify::MAX_CACHED_LEN {
            return a;
        }
        // A shape is reusable when its key literals sit at known positions:
        // every literal value of the text is distinct.
        let template = shaped.and_then(|(shape, lits)| {
            let distinct = lits.iter().enumerate().all(|(i, l)| !lits[..i].contains(l));
            let t = match &a {
                Analysis::Scope { scope: Scope::Keys { map, keys }, read, insert, home, .. } if distinct => {
                    let keys = keys
                        .iter()
                        .map(|k| match k {
                            KeyExpr::Lit(v) => lits.iter().position(|l| l == v).map(KeyExpr::LitAt),
                            k => Some(k.clone()),
                        })
                        .collect::<Option<Vec<_>>>()?;
                    let scope = Scope::Keys { map: *map, keys };
                    Analysis::Scope { scope, read: *read, insert: *insert, home: *home, merge: None }
                }
                Analysis::Scope { scope: Scope::Unsharded | Scope::All { .. } | Scope::Mixed(_), .. } => a.clone(),
                _ => return None,
            };
            Some((shape, t))
        });
        if let Ok(mut c) = self.cache.lock() {
            c.put(sql.to_string(), a.clone());
        }
        if let (Some((shape, t)), Ok(mut c)) = (template, self.shapes.lock()) {
            c.put(shape, t);
        }
        a
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
            Analysis::Scope { scope: Scope::Keys { map: m, keys }, read, insert, merge, .. } => {
                let map = &self.maps[m];
                let mut shards = Vec::new();
                for k in &keys {
                    let key = resolve(map.key_type(), k, params)?;
                    let s = match self.shard_for(m, &key, insert, resolved)? {
                        KeyShard::At(s) => s,
                        KeyShard::Absent => continue,
                        KeyShard::Lookup(t) => return Ok(t),
                    };
                    if !shards.contains(&s) {
                        shards.push(s);
                    }
                }
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
                    _ if insert => {
                        Err(feature("pgmux: an INSERT whose rows belong to several shards must be split per shard"))
                    }
                    _ if self.allow_cross_shard_writes => {
                        shards.sort_unstable();
                        Ok(ShardTarget::Write(Some(shards)))
                    }
                    _ => Err(feature("pgmux: a write spanning shards is refused (allow_cross_shard_writes = false)")),
                }
            }
        }
    }
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
