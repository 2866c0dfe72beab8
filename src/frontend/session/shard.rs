//! The session's sharding step: which shard the transaction at the front
//! of the buffer goes to (its key from the query text or the Bind, a hint,
//! `SET pgmux.shard`), a deferred `BEGIN` until that is known, and reads
//! that run on every shard with their rows merged.

use std::sync::Arc;

use super::guard::bind_params;
use super::route::{Deferred, Plan};
use super::write::WriteKind;
use super::{Session, Txn};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::first_message;
use crate::protocol::frame::HEADER_LEN;
use crate::protocol::messages::split_nul as cstr;
use crate::protocol::messages::TxStatus;
use crate::protocol::statements::Statement;
use crate::shard::schema::Change;
use crate::shard::split::Split;
use crate::shard::{ShardRouter, ShardTarget};

impl Session {
    pub(super) fn use_shard(&mut self, sh: &ShardRouter, i: usize) {
        let b = &sh.backends[i];
        self.pool = b.primary.clone();
        self.routing = b.routing.clone();
        self.shard_at = i;
    }

    /// `None`: routing goes on within the chosen shard (now `self.pool`
    /// and `self.routing`); `Some`: the plan for this batch.
    pub(super) fn shard_step(&mut self, sh: &Arc<ShardRouter>, query: Option<&str>) -> Option<Plan> {
        if let (Some(q), true) = (query, self.between_transactions()) {
            // A transaction's shard is that of its first statement.
            if sh.begins_transaction(q) {
                self.txn = Txn::Deferred(Deferred { sql: q.to_string(), failed: false });
                self.consume_first();
                return Some(Plan::Answer(super::route::command_reply("BEGIN", TxStatus::InBlock)));
            }
        }
        if self.cross() {
            // The transaction may span shards: its parts begin as it
            // reaches them.
            if let Some(d) = self.take_deferred() {
                self.txn = Txn::AcrossShards(super::multi::Multi::new(d.sql));
            }
            if self.multi().is_some() {
                let sql = query.map(str::to_string).or_else(|| self.batch_sql());
                if let Some(e) = self.check_savepoint(sql.as_deref()) {
                    return Some(Plan::Refuse(e));
                }
            }
        }
        if query.is_none() {
            // Statements of one batch for several shards: each on its own.
            if let Some(spread) = self.spread(sh) {
                return Some(Plan::Spread(spread));
            }
        }
        let target = match self.batch_target(sh) {
            Ok(t) => t,
            Err(e) => return Some(Plan::Refuse(e)),
        };
        self.target_plan(sh, target, query)
    }

    /// The plan for a batch routed to `target` (`None`: routing goes on
    /// within the chosen shard).
    fn target_plan(&mut self, sh: &Arc<ShardRouter>, target: ShardTarget, query: Option<&str>) -> Option<Plan> {
        // In a transaction spanning shards, the batch runs on its shard's part.
        let part = || Plan::Go { target: None, decision: crate::router::route::Decision::Write };
        let in_multi = self.multi().is_some();
        match target {
            ShardTarget::One(i) => {
                self.use_shard(sh, i);
                in_multi.then(part)
            }
            ShardTarget::Any => in_multi.then(part),
            ShardTarget::Made => {
                // In turn by statement run (a Parse alone stays where it is).
                if query.is_some() || self.batch_executes() {
                    self.use_shard(sh, sh.next_made());
                }
                in_multi.then(part)
            }
            t @ (ShardTarget::Write(_) | ShardTarget::Everywhere | ShardTarget::Split(_) | ShardTarget::Schema(_)) => {
                self.write_target_plan(sh, t, query, in_multi)
            }
            ShardTarget::UniqueId(column) => match query {
                Some(_) => Some(Plan::UniqueId(column, false)),
                None => Some(Plan::UniqueId(column, true)),
            },
            ShardTarget::Rekey(rekey) => match query {
                Some(_) => Some(Plan::Rekey(rekey, false)),
                None if self.batch_executes() => Some(Plan::Rekey(rekey, true)),
                None => None,
            },
            ShardTarget::Columns(table) => Some(Plan::Refuse(PgError::error(
                sqlstate::CONNECTION_FAILURE,
                format!("pgmux: the columns of {table} could not be read"),
            ))),
            ShardTarget::CopyIn(_) if self.deferred().is_some() || in_multi => Some(Plan::Refuse(PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "pgmux: COPY into a sharded table cannot run inside a transaction",
            ))),
            ShardTarget::CopyIn(c) => match query {
                Some(q) => Some(Plan::CopyIn(c, q.to_string(), false)),
                None if self.batch_executes() => {
                    let sql = self.batch_sql()?;
                    Some(Plan::CopyIn(c, sql, true))
                }
                // Parse / Describe alone: any shard answers them alike.
                None => None,
            },
            ShardTarget::Lookup { key, .. } => Some(Plan::Refuse(PgError::error(
                sqlstate::CONNECTION_FAILURE,
                format!("pgmux: the shard directory did not resolve key {key}"),
            ))),
            ShardTarget::All(_) if self.deferred().is_some() => Some(Plan::Refuse(PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "pgmux: a read across shards cannot run inside a transaction",
            ))),
            ShardTarget::All(plan) if query.is_some() => Some(Plan::Scatter(plan)),
            // Parse / Describe alone: any shard answers them alike.
            ShardTarget::All(_) if !self.batch_executes() => None,
            ShardTarget::All(plan) => Some(Plan::ScatterExtended(plan)),
        }
    }

    /// The plan for a write across shards (`target`).
    fn write_target_plan(
        &self,
        sh: &ShardRouter,
        target: ShardTarget,
        query: Option<&str>,
        in_multi: bool,
    ) -> Option<Plan> {
        let all = 0..sh.backends.len();
        match target {
            ShardTarget::Write(shards) => {
                let shards = shards.unwrap_or_else(|| all.clone().collect());
                self.write_plan(query, |sql| Split::same(sql, shards), WriteKind::Parts)
            }
            ShardTarget::Everywhere => self.write_plan(query, |sql| Split::same(sql, all), WriteKind::Copies),
            ShardTarget::Split(split) => self.write_plan(query, |_| *split, WriteKind::Parts),
            ShardTarget::Schema(_) if self.deferred().is_some() => Some(Plan::Refuse(
                PgError::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "pgmux: a schema change runs on every shard; it cannot join a transaction on one shard",
                )
                .with_hint("Change the schema outside a transaction, or set allow_cross_shard_writes."),
            )),
            ShardTarget::Schema(Change::Alone) if in_multi => Some(Plan::Refuse(PgError::error(
                sqlstate::ACTIVE_SQL_TRANSACTION,
                "pgmux: this schema change cannot run inside a transaction block",
            ))),
            ShardTarget::Schema(change) => {
                self.write_plan(query, |sql| Split::same(sql, all), WriteKind::Schema(change))
            }
            _ => None,
        }
    }

    /// The plan of a write across shards (`split` of its text): a Query, an
    /// extended-protocol batch that executes it, or (a Parse / Describe
    /// alone, which any shard answers alike) none.
    fn write_plan(&self, query: Option<&str>, split: impl FnOnce(&str) -> Split, kind: WriteKind) -> Option<Plan> {
        let (sql, extended) = match query {
            Some(q) => (q.to_string(), false),
            None if self.batch_executes() => (self.batch_sql()?, true),
            None => return None,
        };
        Some(Plan::ScatterWrite { split: Box::new(split(&sql)), kind, extended })
    }

    /// The statement text the batch at the front of the buffer executes.
    pub(super) fn batch_sql(&self) -> Option<String> {
        let mut rest: &[u8] = &self.rbuf;
        let mut parsed = None;
        while let Some((tag, body)) = first_message(rest) {
            rest = &rest[HEADER_LEN + body.len()..];
            match tag {
                b'P' => parsed = Some(String::from_utf8_lossy(cstr(cstr(body).1).0).into_owned()),
                b'B' => {
                    let stmt = cstr(cstr(body).1).0;
                    if stmt.is_empty() {
                        return parsed;
                    }
                    let s = std::str::from_utf8(stmt).ok().and_then(|n| Statement::lookup(&self.stmts, n))?;
                    return Some(String::from_utf8_lossy(s.query()).into_owned());
                }
                _ => {}
            }
        }
        parsed
    }

    /// Whether the batch at the front of the buffer has an Execute.
    pub(super) fn batch_executes(&self) -> bool {
        let mut rest: &[u8] = &self.rbuf;
        while let Some((tag, body)) = first_message(rest) {
            rest = &rest[HEADER_LEN + body.len()..];
            match tag {
                b'E' => return true,
                b'S' | b'Q' => return false,
                _ => {}
            }
        }
        false
    }

    /// The shard target of the batch at the front of the buffer: its
    /// first Query, Parse (with the Bind that follows) or Bind.
    fn batch_target(&mut self, sh: &ShardRouter) -> Result<ShardTarget, PgError> {
        let Session { rbuf, stmts, wanted, resolved, .. } = self;
        let session_shard = wanted.get("pgmux.shard").map(String::as_str);
        let mut rest: &[u8] = rbuf;
        let mut parsed: Option<(String, &[u8])> = None;
        while let Some((tag, body)) = first_message(rest) {
            rest = &rest[HEADER_LEN + body.len()..];
            match tag {
                b'Q' => return sh.route(&String::from_utf8_lossy(cstr(body).0), &[], session_shard, resolved),
                b'P' => {
                    let (name, after) = cstr(body);
                    parsed = Some((String::from_utf8_lossy(cstr(after).0).into_owned(), name));
                }
                b'B' => {
                    let stmt = cstr(cstr(body).1).0;
                    let params = bind_params(body);
                    let sql = match &parsed {
                        Some((sql, name)) if *name == stmt => sql.clone(),
                        _ => match std::str::from_utf8(stmt).ok().and_then(|n| Statement::lookup(stmts, n)) {
                            Some(s) => String::from_utf8_lossy(s.query()).into_owned(),
                            None => continue,
                        },
                    };
                    return sh.route(&sql, &params, session_shard, resolved);
                }
                b'S' | b'H' | b'E' => break,
                _ => {}
            }
        }
        match parsed {
            Some((sql, _)) => sh.route(&sql, &[], session_shard, resolved).or(Ok(ShardTarget::Any)),
            None => Ok(ShardTarget::Any),
        }
    }

    /// Look up (and for an INSERT assign) the directory keys the batch at
    /// the front of the buffer needs, and the columns of a table it inserts
    /// into without a column list, so that routing it finds them cached
    /// (and, on a database's first statement, install `pgmux_next_id`).
    /// A failure is the batch's error.
    pub(super) async fn resolve_directory(&mut self) -> Result<(), PgError> {
        let Some(sh) = self.sharding.clone() else { return Ok(()) };
        if !sh.ids_ready() {
            // Once per database, before its first statement.
            Box::pin(sh.install_ids()).await;
        }
        if self.mode != crate::config::PoolMode::Transaction {
            return Ok(());
        }
        if self.between_transactions() {
            // A new transaction: forget the last one's keys.
            self.resolved.clear();
        }
        // One key at a time (a multi-row INSERT may bring many); a key the
        // directory left unresolved ends it (routing then says so).
        let mut last = None;
        loop {
            match self.batch_target(&sh) {
                Ok(ShardTarget::Columns(table)) => {
                    if last.as_ref() == Some(&(usize::MAX, table.clone())) {
                        return Ok(());
                    }
                    last = Some((usize::MAX, table.clone()));
                    Box::pin(sh.table_columns(&table)).await?;
                }
                Ok(ShardTarget::Lookup { map, key, assign }) => {
                    if last.as_ref() == Some(&(map, key.clone())) {
                        return Ok(());
                    }
                    last = Some((map, key.clone()));
                    let mut resolved = std::mem::take(&mut self.resolved);
                    // Boxed: a directory query's state would otherwise
                    // make every session's task larger.
                    let looked = Box::pin(sh.lookup(map, &key, assign, &mut resolved)).await;
                    self.resolved = resolved;
                    looked?;
                }
                _ => return Ok(()),
            }
        }
    }
}
