//! Transactions that span shards (`allow_cross_shard_writes = true`).
//!
//! The session keeps one server connection per shard the transaction has
//! touched, each inside a transaction opened with the client's own
//! `BEGIN`. Every batch runs on the connection of its shard; a read
//! without a key runs on all of them (and sees the transaction's own
//! writes). The end commits every part: with two-phase commit
//! ([`crate::shard::twophase`], `two_phase_commit = true`) all or nothing,
//! otherwise one after the other (best effort: a failure part-way rolls
//! back the parts not yet committed, and says which were). An error on any
//! shard fails the whole transaction, as in PostgreSQL.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::{Session, Txn, CLEANUP_TIMEOUT};
use crate::backend::pool::Checkout;
use crate::backend::server::ServerConn;
use crate::config::PoolMode;
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::messages as msg;
use crate::protocol::messages::TxStatus;
use crate::router::route::{Decision, Target};
use crate::shard::twophase::{self, server_error};
use crate::shard::ShardRouter;

/// A transaction that may span shards.
pub(super) struct Multi {
    /// The client's `BEGIN`, run on each shard the transaction joins.
    pub begin: String,
    /// The shards joined, with their connections (idle in the
    /// transaction while the client is not using them).
    pub conns: Vec<(usize, Checkout)>,
    /// A statement failed: only the end is accepted, and it rolls back.
    pub failed: bool,
    /// A savepoint was set: it exists on the shards joined so far only,
    /// so no other shard may join.
    pub savepoint: bool,
    /// `begin` is known to begin a transaction (pgmux's own, or it did on
    /// a shard): it may go with a part's first request instead of a round
    /// trip before it — a BEGIN that failed would leave that request
    /// outside the transaction.
    pub begins: bool,
}

impl Multi {
    /// Boxed: a session keeps room only for a pointer to this rare state.
    pub fn new(begin: impl Into<String>) -> Box<Multi> {
        let begin = begin.into();
        let begins = begin.eq_ignore_ascii_case("BEGIN");
        Box::new(Multi { begin, conns: Vec::new(), failed: false, savepoint: false, begins })
    }
}

/// Give a connection back after pgmux's own statements on it: reused when
/// they left it idle, closed otherwise.
fn put_back(mut c: Checkout) {
    if c.conn().status == TxStatus::Idle {
        c.release();
    }
}

async fn rollback_all(parts: &mut [(usize, Checkout)]) {
    for (shard, c) in parts.iter_mut() {
        if c.conn().status != TxStatus::Idle {
            if let Err(e) = c.conn().run("ROLLBACK").await {
                tracing::debug!(shard, "rollback of a transaction part: {e}");
            }
        }
    }
}

/// Commit each part in turn; on a failure, roll back the rest.
async fn commit_in_turn(sh: &ShardRouter, parts: &mut [(usize, Checkout)]) -> Result<(), PgError> {
    let mut done = Vec::new();
    for at in 0..parts.len() {
        let (shard, c) = &mut parts[at];
        if let Err(e) = c.conn().run("COMMIT").await {
            rollback_all(&mut parts[at + 1..]).await;
            let err = server_error(e);
            return Err(match done.is_empty() {
                true => err,
                false => err.with_detail(format!(
                    "pgmux: the transaction was committed on shard(s) {} already (two_phase_commit is off)",
                    done.join(", ")
                )),
            });
        }
        done.push(sh.backends[*shard].name.clone());
    }
    Ok(())
}

impl Session {
    /// Transactions of this session may span shards.
    pub(super) fn cross(&self) -> bool {
        self.mode == PoolMode::Transaction && self.sharding.as_ref().is_some_and(|s| s.cross_shard())
    }

    /// A batch of a transaction that may span shards is answered: the
    /// next one is routed anew.
    pub(super) fn answered_in_transaction(&self, conn: &ServerConn) -> bool {
        self.tracker.flight.status != TxStatus::Idle
            && self.tracker.flight.pending == 0
            && !self.tracker.flight.unsynced
            && !self.tracker.flight.copy_in
            && !self.crelay.mid_message()
            && !self.srelay.mid_message()
            && conn.rbuf.is_empty()
            && self.tracker.settled()
            && self.cross()
    }

    /// The connection of shard `i` for the next batch: with a transaction
    /// spanning shards, its part there (joined with the transaction's
    /// `BEGIN` if new); otherwise a new connection, from a replica for a
    /// read where the shard's routing allows.
    pub(super) async fn shard_conn(&mut self, sh: &ShardRouter, i: usize, read: bool) -> Result<Checkout, PgError> {
        let mut c = self.shard_conn_ahead(sh, i, read).await?;
        if let Err(e) = c.conn().settle().await {
            put_back(c);
            return Err(server_error(e));
        }
        Ok(c)
    }

    /// [`Session::shard_conn`], a new part's `BEGIN` queued to go with its
    /// first request when the transaction's `BEGIN` is known to work.
    async fn shard_conn_ahead(&mut self, sh: &ShardRouter, i: usize, read: bool) -> Result<Checkout, PgError> {
        let Some(m) = self.multi_mut() else {
            self.use_shard(sh, i);
            let target = match (&sh.backends[i].routing, read) {
                (Some(r), true) => r.read_target(self.last_write)?,
                (Some(r), false) => r.write_target(true)?,
                (None, _) => Target::Primary,
            };
            let decision = if read { Decision::Read } else { Decision::Write };
            return Ok(self.checkout(Some(target), decision).await?.0);
        };
        if let Some(at) = m.conns.iter().position(|(s, _)| *s == i) {
            let (_, mut c) = m.conns.remove(at);
            self.use_shard(sh, i);
            self.cancel.set(c.conn().cancel_key());
            self.tracker.reset(TxStatus::InBlock);
            return Ok(c);
        }
        if m.savepoint && !m.conns.is_empty() {
            return Err(PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!("pgmux: this transaction set a savepoint; shard {} cannot join it", sh.backends[i].name),
            )
            .with_hint("Set savepoints after every shard the transaction uses has been used."));
        }
        let (begin, ahead) = (m.begin.clone(), m.begins);
        let (mut c, _) = {
            self.use_shard(sh, i);
            let target = match &sh.backends[i].routing {
                Some(r) => r.write_target(true)?,
                None => Target::Primary,
            };
            self.checkout(Some(target), Decision::Write).await?
        };
        if ahead {
            c.conn().begin_ahead(&begin);
        } else if let Err(e) = c.conn().run_expecting(&begin, TxStatus::InBlock).await {
            put_back(c);
            return Err(server_error(e));
        } else if let Some(m) = self.multi_mut() {
            m.begins = true;
        }
        self.tracker.reset(TxStatus::InBlock);
        Ok(c)
    }

    /// The connections of shards `only` (None: every shard), as
    /// [`Session::shard_conn`] gives them. On a failure the ones taken go
    /// back.
    pub(super) async fn shard_conns(
        &mut self,
        sh: &ShardRouter,
        only: Option<&[usize]>,
        read: bool,
    ) -> Result<Vec<(usize, Checkout)>, PgError> {
        let mut conns = self.shard_conns_ahead(sh, only, read).await?;
        // The parts' BEGINs answered together.
        let settled = futures_util::future::join_all(conns.iter_mut().map(|(_, c)| c.conn().settle())).await;
        if let Some(e) = settled.into_iter().find_map(Result::err) {
            self.fail_multi();
            for (i, c) in conns {
                self.give_back(i, c, TxStatus::InBlock);
            }
            return Err(server_error(e));
        }
        Ok(conns)
    }

    /// [`Session::shard_conns`], new parts' `BEGIN`s queued to go with
    /// their first request ([`ServerConn::send`], answered first by
    /// [`ServerConn::settle`]).
    pub(super) async fn shard_conns_ahead(
        &mut self,
        sh: &ShardRouter,
        only: Option<&[usize]>,
        read: bool,
    ) -> Result<Vec<(usize, Checkout)>, PgError> {
        let mut conns = Vec::new();
        for i in (0..sh.backends.len()).filter(|i| only.is_none_or(|s| s.contains(i))) {
            match self.shard_conn_ahead(sh, i, read).await {
                Ok(c) => conns.push((i, c)),
                Err(e) => {
                    for (i, c) in conns {
                        self.give_back(i, c, TxStatus::InBlock);
                    }
                    return Err(e);
                }
            }
        }
        Ok(conns)
    }

    /// Return shard `i`'s connection after a batch that left transaction
    /// status `status`: to the transaction spanning shards, or to its pool
    /// when idle (closed otherwise).
    pub(super) fn give_back(&mut self, i: usize, c: Checkout, status: TxStatus) {
        if let Some(m) = self.multi_mut() {
            // The only part back from an error (ROLLBACK TO SAVEPOINT) is
            // no longer failed; with several parts a failure stays.
            m.failed = status == TxStatus::Failed || (m.failed && !m.conns.is_empty());
            m.conns.push((i, c));
        } else if status == TxStatus::Idle {
            c.release();
        }
    }

    /// A batch left shard `i`'s connection inside a transaction: keep it
    /// (a transaction begun by the batch itself starts here).
    pub(super) fn rejoin(&mut self, i: usize, c: Checkout, status: TxStatus) {
        if self.multi().is_none() {
            self.txn = Txn::AcrossShards(Multi::new("BEGIN"));
        }
        self.give_back(i, c, status);
    }

    /// Mark the transaction spanning shards failed (a shard's part was
    /// lost); `true` if there is one.
    pub(super) fn fail_multi(&mut self) -> bool {
        self.multi_mut().map(|m| m.failed = true).is_some()
    }

    /// Before routing a statement of a transaction spanning shards: the
    /// refusal of a savepoint it cannot keep, if that is what it is.
    pub(super) fn check_savepoint(&mut self, sql: Option<&str>) -> Option<PgError> {
        let m = self.multi_mut()?;
        if !sql.is_some_and(crate::sql::scan::is_savepoint) {
            return None;
        }
        if m.conns.len() > 1 {
            return Some(PgError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "pgmux: savepoints are not supported in a transaction that spans shards",
            ));
        }
        m.savepoint = true;
        None
    }

    /// End the transaction spanning shards (commit, or roll back); the
    /// command tag to answer.
    pub(super) async fn finish_multi(&mut self, commit: bool) -> Result<&'static str, PgError> {
        let Some(mut m) = self.take_multi() else { return Ok(if commit { "COMMIT" } else { "ROLLBACK" }) };
        for (_, c) in &mut m.conns {
            c.conn().status = TxStatus::InBlock;
        }
        let result = match self.sharding.clone() {
            Some(sh) if commit && !m.failed => match m.conns.len() {
                0 => Ok("COMMIT"),
                1 => m.conns[0].1.conn().run("COMMIT").await.map(|()| "COMMIT").map_err(server_error),
                _ if sh.two_phase() => {
                    let coordinator = m.conns[0].0;
                    let done = twophase::commit(&mut m.conns, sh.commit_log(coordinator, false)).await;
                    if done.is_ok() {
                        sh.commit_log(coordinator, true);
                    }
                    done.map(|()| "COMMIT")
                }
                _ => commit_in_turn(&sh, &mut m.conns).await.map(|()| "COMMIT"),
            },
            _ => {
                rollback_all(&mut m.conns).await;
                Ok("ROLLBACK")
            }
        };
        for (_, c) in m.conns {
            put_back(c);
        }
        result
    }

    /// The client left: roll back every part (closing what does not come
    /// back to idle in time).
    pub(super) async fn leave_multi(&mut self) {
        if self.multi().is_some() {
            let _ = tokio::time::timeout(CLEANUP_TIMEOUT, self.finish_multi(false)).await;
        }
    }

    /// Answer the `COMMIT` / `ROLLBACK` at the front of the buffer (a Query,
    /// or an extended-protocol batch) by ending the transaction on every
    /// shard. `false`: the client went away.
    pub(super) async fn end_multi(&mut self, commit: bool) -> bool {
        let Some(batch) = self.skip_to_sync().await else { return false };
        let result = self.finish_multi(commit).await;
        let mut out = BytesMut::new();
        let mut failed = false;
        let complete = |out: &mut BytesMut, failed: &mut bool| match &result {
            Ok(tag) => {
                let at = msg::start_message(out, b'C');
                out.extend_from_slice(tag.as_bytes());
                out.extend_from_slice(b"\0");
                msg::finish_message(out, at);
            }
            Err(e) => {
                e.encode(out);
                *failed = true;
            }
        };
        for (tag, kind) in batch {
            match tag {
                _ if failed && tag != b'S' => {}
                b'Q' => complete(&mut out, &mut failed),
                b'E' => complete(&mut out, &mut failed),
                b'P' => out.extend_from_slice(b"1\0\0\0\x04"),
                b'B' => out.extend_from_slice(b"2\0\0\0\x04"),
                b'D' if kind == b'S' => out.extend_from_slice(b"t\0\0\0\x06\0\0n\0\0\0\x04"),
                b'D' => out.extend_from_slice(b"n\0\0\0\x04"),
                b'C' => out.extend_from_slice(b"3\0\0\0\x04"),
                _ => {}
            }
            if matches!(tag, b'Q' | b'S') {
                msg::ready_for_query(&mut out, TxStatus::Idle);
            }
        }
        self.stream.write_all(&out).await.is_ok()
    }
}
