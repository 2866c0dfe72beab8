//! What a statement text means for sharding, before any key is read: a
//! routing hint, a COPY into a sharded table, a write to a reference
//! table, or its scope (the keys that pick its shard, every shard, or no
//! sharded table) with, for a read, how its rows merge; or why it is
//! refused. Cached by text, and by shape (literals blanked) when its key
//! literals sit at known positions.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::key::{self, KeyExpr, Scope};
use super::{copy, merge, schema, ShardRouter};
use crate::sql::classify::{Hint, Kind};

/// The analysis of one statement text, cached.
#[derive(Clone, Debug)]
pub(super) enum Analysis {
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
    /// A schema change: on every shard.
    Schema(super::schema::Change),
    /// `SELECT pgmux.unique_id()`: answered by pgmux (the column's name).
    UniqueId(String),
    /// An UPDATE that assigns the shard key (see [`super::rekey`]).
    Rekey {
        scope: Scope,
        rekey: Box<super::rekey::Rekey>,
    },
    Refused(String),
    Hinted(Hint),
    CopyIn(Box<copy::CopyIn>),
}

impl ShardRouter {
    pub(super) fn analyze(&self, sql: &str) -> Analysis {
        let classified = match self.classifier.classify(sql) {
            Ok(c) => c,
            Err(e) => return Analysis::Refused(e.to_string()),
        };
        let read = matches!(classified.kind, Kind::Read);
        if let Some(h @ (Hint::Shard(_) | Hint::Key(_))) = classified.hint {
            return Analysis::Hinted(h);
        }
        let Ok(stmts) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
            if let Some(change) = schema::unparsed_change(sql) {
                return Analysis::Schema(change);
            }
            if let Some(t) = self.sharded_word(sql) {
                // Its shards cannot be known: never the wrong one.
                return Analysis::Refused(format!(
                    "this statement names the sharded table {t} but pgmux's parser cannot read it: \
                     name its shard with /* pgmux: shard=N */ or SET pgmux.shard"
                ));
            }
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
        if let Some(column) = super::ids::unique_id_call(stmt) {
            return Analysis::UniqueId(column);
        }
        if let Some(change) = schema::change(stmt, sql) {
            return Analysis::Schema(change);
        }
        match copy::copy_in(stmt) {
            Some(Ok(c)) if self.tables.tables.contains_key(&c.table) => return Analysis::CopyIn(Box::new(c)),
            Some(Err(why)) => return Analysis::Refused(why),
            _ => {}
        }
        let insert = matches!(stmt, sqlparser::ast::Statement::Insert(_));
        if let Some(a) = self.write_analysis(stmt) {
            return a;
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

    /// A sharded table a statement the parser cannot read names (a word
    /// of its text, folded as PostgreSQL folds names).
    fn sharded_word(&self, sql: &str) -> Option<String> {
        use sqlparser::tokenizer::{Token, Tokenizer};
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().unwrap_or_default();
        tokens.into_iter().find_map(|t| match t {
            Token::Word(w) => {
                let name = if w.quote_style.is_some() { w.value } else { w.value.to_lowercase() };
                self.tables.tables.contains_key(&name).then_some(name)
            }
            _ => None,
        })
    }

    /// What a write is when its target decides it: a change of a reference
    /// table (every shard), an UPDATE that moves rows to the shard of
    /// their new key, or one of the writes refused across shards.
    fn write_analysis(&self, stmt: &sqlparser::ast::Statement) -> Option<Analysis> {
        if let Some(t) = key::write_target(stmt).filter(|t| self.tables.reference.contains(t)) {
            if self.allow_cross_shard_writes {
                return Some(Analysis::Everywhere);
            }
            return Some(Analysis::Refused(format!(
                "{t} is a reference table (the same rows on every shard): change it on each shard directly \
                 (or set allow_cross_shard_writes)"
            )));
        }
        if let Some((table, key)) = key::sets_key(stmt, &self.tables) {
            return Some(match super::rekey::Rekey::new(stmt, table, key) {
                Ok(r) => Analysis::Rekey { scope: key::scope(stmt, &self.tables), rekey: Box::new(r) },
                Err(why) => Analysis::Refused(why),
            });
        }
        if key::conflict_sets_key(stmt, &self.tables) {
            return Some(Analysis::Refused(
                "an INSERT ... ON CONFLICT DO UPDATE that sets the shard key is not supported across shards \
                 (the row would stay on the shard of its old key): UPDATE it on its own"
                    .into(),
            ));
        }
        if let Some(read) = key::insert_select(stmt) {
            if let Some(why) = self.insert_select_refused(stmt, &read) {
                return Some(Analysis::Refused(why.into()));
            }
        }
        None
    }

    /// Why an `INSERT ... SELECT` into a sharded table cannot run, if it
    /// cannot: its rows go to the shard of the constant key its select
    /// list gives them, so it may read only reference tables (the same
    /// rows on every shard).
    fn insert_select_refused(&self, stmt: &sqlparser::ast::Statement, read: &[String]) -> Option<&'static str> {
        let into_sharded = key::write_target(stmt).is_some_and(|t| self.tables.tables.contains_key(&t));
        // (Scope::Columns: the key's place is read first, then asked again.)
        let keyed =
            matches!(key::scope(stmt, &self.tables), Scope::Keys { .. } | Scope::Made { .. } | Scope::Columns(_));
        let reference_only = read.iter().all(|t| self.tables.reference.contains(t));
        match (into_sharded, keyed && reference_only) {
            (true, false) => Some(
                "an INSERT ... SELECT into a sharded table needs its shard key as a constant (or $n) of the \
                 select list, and may read reference tables only",
            ),
            _ => None,
        }
    }

    /// Whether `sql` only reads, as the router classifies it.
    pub fn reads(&self, sql: &str) -> bool {
        matches!(self.analysis(sql), Analysis::Scope { read: true, .. })
    }

    /// The analysis of `sql`: cached by its text, or by its shape (literals
    /// blanked) with the key literals taken from this text by position.
    pub(super) fn analysis(&self, sql: &str) -> Analysis {
        self.forget_stale_analyses();
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
        // Too long to keep, or waiting for the table's columns.
        if sql.len() > crate::sql::classify::MAX_CACHED_LEN
            || matches!(a, Analysis::Scope { scope: Scope::Columns(_), .. })
        {
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
                Analysis::Scope {
                    scope: Scope::Unsharded | Scope::All { .. } | Scope::Mixed(_) | Scope::Made { .. },
                    ..
                } => a.clone(),
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
}
