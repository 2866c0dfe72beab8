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
        if let Some(t) = key::write_target(stmt).filter(|t| self.tables.reference.contains(t)) {
            if self.allow_cross_shard_writes {
                return Analysis::Everywhere;
            }
            return Analysis::Refused(format!(
                "{t} is a reference table (the same rows on every shard): change it on each shard directly \
                 (or set allow_cross_shard_writes)"
            ));
        }
        if let Some((table, key)) = key::sets_key(stmt, &self.tables) {
            return match super::rekey::Rekey::new(stmt, table, key) {
                Ok(r) => Analysis::Rekey { scope: key::scope(stmt, &self.tables), rekey: Box::new(r) },
                Err(why) => Analysis::Refused(why),
            };
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
