//! The guard of a transaction bound to one shard: each statement sent in
//! it is routed again, and one for another shard (or for several) is
//! refused in its place instead of running on the wrong one.

use std::sync::Arc;

use super::Session;
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::messages::{self as msg, split_nul as cstr};
use crate::protocol::statements::Statement;
use crate::shard::{ShardRouter, ShardTarget};

/// The parameter values of a Bind body: (value, binary); none if the
/// Bind is malformed (the server refuses it).
pub(super) fn bind_params(body: &[u8]) -> Vec<(Option<&[u8]>, bool)> {
    msg::parse_bind(body).map(|b| b.params).unwrap_or_default()
}

/// Checks, in a transaction on one shard, that each statement sent
/// belongs there: a statement for another shard (or for all of them) is
/// refused instead of running on the wrong one.
pub(super) struct ShardGuard {
    router: Arc<ShardRouter>,
    resolved: crate::shard::Resolved,
    shard: usize,
    session_shard: Option<String>,
    /// The last unnamed Parse's text (its Bind carries the key).
    unnamed: Option<String>,
}

impl ShardGuard {
    pub(super) fn check(
        &mut self,
        tag: u8,
        body: &[u8],
        stmts: &crate::protocol::statements::ClientStatements,
    ) -> Option<PgError> {
        let ss = self.session_shard.as_deref();
        let target = match tag {
            b'Q' => self.router.route(&String::from_utf8_lossy(cstr(body).0), &[], ss, &mut self.resolved),
            b'P' => {
                let (name, after) = cstr(body);
                if name.is_empty() {
                    self.unnamed = Some(String::from_utf8_lossy(cstr(after).0).into_owned());
                }
                return None;
            }
            b'B' => {
                let stmt = cstr(cstr(body).1).0;
                let sql = if stmt.is_empty() {
                    self.unnamed.clone()?
                } else {
                    let s = std::str::from_utf8(stmt).ok().and_then(|n| Statement::lookup(stmts, n))?;
                    String::from_utf8_lossy(s.query()).into_owned()
                };
                self.router.route(&sql, &bind_params(body), ss, &mut self.resolved)
            }
            _ => return None,
        };
        self.refusal(target)
    }

    /// Why a statement routed to `target` cannot run in this transaction
    /// (None: it can).
    fn refusal(&self, target: Result<ShardTarget, PgError>) -> Option<PgError> {
        let here = &self.router.backends[self.shard].name;
        let cannot_join = |what: &str| {
            PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("pgmux: this transaction runs on shard {here}; {what} cannot join it"),
            )
        };
        Some(match target {
            // The database makes the key: this shard will do.
            Ok(ShardTarget::Any | ShardTarget::Made) => return None,
            Ok(ShardTarget::One(i)) if i == self.shard => return None,
            Ok(ShardTarget::One(i)) => cannot_join(&format!("a statement for shard {}", self.router.backends[i].name))
                .with_hint("Transactions spanning shards are not supported: one transaction per shard."),
            Ok(ShardTarget::UniqueId(_)) => cannot_join("pgmux.unique_id() (answered by pgmux)")
                .with_hint("Take ids before BEGIN, or use pgmux_next_id() in the database."),
            Ok(ShardTarget::Columns(table)) => {
                cannot_join(&format!("an INSERT into {table} (whose columns are not known yet) without a column list"))
                    .with_hint("Name the columns, or run it once outside a transaction.")
            }
            Ok(ShardTarget::Schema(_)) => cannot_join("a schema change (for every shard)")
                .with_hint("Change the schema outside the transaction, or set allow_cross_shard_writes."),
            Ok(ShardTarget::Lookup { key, .. }) => {
                cannot_join(&format!("key {key}, not in the shard directory cache,"))
                    .with_hint("Start a transaction with a statement for that key.")
            }
            Ok(ShardTarget::Write(_) | ShardTarget::Everywhere | ShardTarget::Split(_) | ShardTarget::Rekey(_)) => {
                cannot_join("a write to several shards")
            }
            Ok(ShardTarget::CopyIn(_)) => cannot_join("a COPY into a sharded table"),
            Ok(ShardTarget::All(_)) => cannot_join("a read across shards"),
            Err(e) => e,
        })
    }
}

impl Session {
    pub(super) fn shard_guard(&self) -> Option<ShardGuard> {
        let router = self.sharding.clone()?;
        let session_shard = self.wanted.get("pgmux.shard").cloned();
        let resolved = self.resolved.clone();
        Some(ShardGuard { router, resolved, shard: self.shard_at, session_shard, unnamed: None })
    }
}
