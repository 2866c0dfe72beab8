//! The session's routing step: which backend the next transaction goes to,
//! the answers pgmux gives without a server (a refused batch, a deferred
//! `BEGIN`, the end of a transaction that never reached a server), and the
//! checkout that retries a read elsewhere when a replica fails before any
//! byte of its answer reached the client.

use std::sync::Arc;

use crate::frontend::buffers;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::lost::lost_error;
use super::{pool_error, Session, Txn};
use crate::backend::pool::{Checkout, Pool, PoolError};
use crate::backend::server::{is_server_owned, ServerConn, ServerError};
use crate::config::{PoolMode, TransactionRouting};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::{first_message, peek_header, HEADER_LEN, MAX_MESSAGE_LEN};
use crate::protocol::messages as msg;
use crate::protocol::messages::TxStatus;
use crate::protocol::prepared;
use crate::router::route::{Decision, Target};
use crate::sql::scan;

/// An extended-protocol batch larger than this is routed on what has come.
const BATCH_WAIT_LIMIT: usize = 1 << 20;

/// A `BEGIN` pgmux answered itself, to send along with the transaction's
/// first statement once that has chosen the backend
/// (`transaction_routing = "first_statement"`).
pub(super) struct Deferred {
    pub sql: String,
    /// A statement of it was refused: only its end is accepted now.
    pub failed: bool,
}

/// A read on a replica, kept for a retry elsewhere while no byte of its
/// answer has reached the client.
pub(super) struct Replay {
    /// The client's bytes sent to the server (a spare buffer, given back
    /// when the replay is dropped).
    pub sent: BytesMut,
    /// Statement names those bytes created (a retry creates them again).
    pub names: Vec<String>,
}

impl Replay {
    pub fn new() -> Replay {
        Replay { sent: buffers::take(), names: Vec::new() }
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.sent));
    }
}

/// What to do with the transaction at the front of the buffer.
pub(super) enum Plan {
    /// Check out a connection of this backend (`None`: the session's pool).
    Go { target: Option<Target>, decision: Decision },
    /// Answer an error in place of the batch.
    Refuse(PgError),
    /// pgmux consumed the message and answers it with these bytes.
    Answer(BytesMut),
    /// A read for every shard, merged.
    Scatter(Box<crate::shard::merge::MergePlan>),
    /// The same, as an extended-protocol batch.
    ScatterExtended(Box<crate::shard::merge::MergePlan>),
    /// A write run on several shards, in parts; `extended`: an
    /// extended-protocol batch.
    ScatterWrite { split: Box<crate::shard::split::Split>, kind: super::write::WriteKind, extended: bool },
    /// COPY FROM STDIN split over the shards (the statement's text; sent
    /// over the extended protocol).
    CopyIn(Box<crate::shard::copy::CopyIn>, String, bool),
    /// `SELECT pgmux.unique_id()` (the column's name; `true`: an
    /// extended-protocol batch).
    UniqueId(String, bool),
    /// An UPDATE that assigns the shard key (`true`: an extended-protocol
    /// batch).
    Rekey(Box<crate::shard::rekey::Rekey>, bool),
    /// The end of a transaction that may span shards (`true`: COMMIT).
    EndMulti(bool),
    /// An extended batch of statements for several shards (spread.rs).
    Spread(Box<super::spread::Spread>),
}

pub(super) fn command_reply(tag: &str, status: TxStatus) -> BytesMut {
    let mut out = BytesMut::new();
    let at = msg::start_message(&mut out, b'C');
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(b"\0");
    msg::finish_message(&mut out, at);
    msg::ready_for_query(&mut out, status);
    out
}

impl Session {
    /// Decide the transaction at the front of the buffer (a whole first
    /// message is there). The session setting `pgmux.route` = 'primary' |
    /// 'replica' | 'auto' overrides the classification.
    pub(super) fn plan(&mut self) -> Plan {
        if self.mode != PoolMode::Transaction || (self.routing.is_none() && self.sharding.is_none()) {
            return Plan::Go { target: None, decision: Decision::Write };
        }
        let Some((tag, body)) = first_message(&self.rbuf) else {
            return Plan::Go { target: None, decision: Decision::Write };
        };
        let query = (tag == b'Q')
            .then(|| String::from_utf8_lossy(body.split(|&b| b == 0).next().unwrap_or_default()).into_owned());
        if let Some(plan) = self.plan_in_transaction(query.as_deref()) {
            return plan;
        }
        if let Some(sh) = self.sharding.clone() {
            if let Some(plan) = self.shard_step(&sh, query.as_deref()) {
                return plan;
            }
        }
        let Some(r) = self.routing.clone() else { return Plan::Go { target: None, decision: Decision::Write } };
        self.plan_read_or_write(&r, query)
    }

    /// A transaction pgmux holds open for the client (a deferred BEGIN, a
    /// transaction across shards): its end, or its failure.
    fn plan_in_transaction(&mut self, query: Option<&str>) -> Option<Plan> {
        if let (Some(d), Some(end)) = (self.deferred(), query.and_then(scan::transaction_end)) {
            // The transaction never reached a server: nothing to commit.
            let tag = if d.failed { "ROLLBACK" } else { end.tag() };
            self.txn = Txn::None;
            self.consume_first();
            return Some(Plan::Answer(command_reply(tag, TxStatus::Idle)));
        }
        if let Some(m) = self.multi() {
            let sql = match &query {
                Some(q) => Some(q.to_string()),
                None if self.batch_executes() => self.batch_sql(),
                None => None,
            };
            if let Some(end) = sql.as_deref().and_then(scan::transaction_end) {
                return Some(Plan::EndMulti(end == scan::TxnEnd::Commit));
            }
            // A savepoint may undo the failure of a transaction on one shard.
            let undo = m.conns.len() == 1 && sql.as_deref().is_some_and(scan::is_savepoint);
            if m.failed && !undo {
                return Some(Plan::Refuse(PgError::error(
                    sqlstate::IN_FAILED_SQL_TRANSACTION,
                    "current transaction is aborted, commands ignored until end of transaction block",
                )));
            }
        }
        if self.deferred().is_some_and(|d| d.failed) {
            return Some(Plan::Refuse(PgError::error(
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            )));
        }
        None
    }

    /// Read or write: the classifier's decision, the session's settings
    /// and hints over it, and the backend it goes to.
    fn plan_read_or_write(&mut self, r: &Arc<crate::router::route::Routing>, query: Option<String>) -> Plan {
        let mut decision = match r.decide(&self.rbuf, &self.stmts) {
            Ok(d) => d,
            Err(e) => return Plan::Refuse(e),
        };
        let read_only = self.wanted.get("default_transaction_read_only").is_some_and(|v| v == "on");
        if decision == Decision::Begin && read_only {
            decision = Decision::Read;
        }
        if decision == Decision::Read
            && self.deferred().is_some_and(|d| !d.sql.to_ascii_lowercase().contains("read only"))
            && r.options.transaction_routing != TransactionRouting::FirstStatement
        {
            // A sharded transaction (its BEGIN deferred to find the
            // shard) runs on the shard's primary.
            decision = Decision::Other;
        }
        if decision == Decision::Begin
            && self.between_transactions()
            && r.options.transaction_routing == TransactionRouting::FirstStatement
        {
            if let Some(sql) = query {
                self.txn = Txn::Deferred(Deferred { sql, failed: false });
                self.consume_first();
                return Plan::Answer(command_reply("BEGIN", TxStatus::InBlock));
            }
        }
        match self.wanted.get("pgmux.route").map(|v| v.to_ascii_lowercase()).as_deref() {
            Some("primary") => decision = if decision == Decision::Read { Decision::Other } else { decision },
            Some("replica") => decision = Decision::Read,
            _ => {}
        }
        let target = match decision {
            Decision::Read => r.read_target(self.last_write),
            Decision::Write | Decision::Begin => r.write_target(true),
            Decision::Other => r.write_target(false),
        };
        match target {
            Ok(t) => Plan::Go { target: Some(t), decision },
            Err(e) => Plan::Refuse(e),
        }
    }

    /// Carry out a plan pgmux answers itself (anything but [`Plan::Go`]).
    /// `false`: the client went away.
    pub(super) async fn carry_out(&mut self, plan: Plan) -> bool {
        let started = std::time::Instant::now();
        let spans = matches!(
            plan,
            Plan::Scatter(_)
                | Plan::ScatterExtended(_)
                | Plan::CopyIn(..)
                | Plan::ScatterWrite { .. }
                | Plan::EndMulti(_)
                | Plan::Spread(_)
        );
        let going = match plan {
            Plan::Go { .. } => true,
            Plan::Answer(out) => self.stream.write_all(&out).await.is_ok(),
            Plan::Refuse(e) => self.refuse(&e).await,
            // Boxed: every session's task is as large as its largest
            // state, and these are rare and large.
            Plan::Scatter(plan) => Box::pin(self.scatter(&plan)).await,
            Plan::ScatterExtended(plan) => Box::pin(self.scatter_extended(&plan)).await,
            Plan::CopyIn(copy, sql, extended) => Box::pin(self.copy_into_shards(*copy, sql, extended)).await,
            Plan::ScatterWrite { split, kind, extended } => {
                Box::pin(self.across_shards(super::write::Across::Parts(&split, kind), extended)).await
            }
            Plan::UniqueId(column, extended) => Box::pin(self.unique_id(&column, extended)).await,
            Plan::Rekey(rekey, extended) => {
                Box::pin(self.across_shards(super::write::Across::Rekey(&rekey), extended)).await
            }
            Plan::EndMulti(commit) => Box::pin(self.end_multi(commit)).await,
            Plan::Spread(spread) => Box::pin(self.run_spread(spread)).await,
        };
        if let (true, Some(sh)) = (spans, &self.sharding) {
            self.account.scatter(&sh.name, started, self.multi().is_none());
        }
        going
    }

    /// Whether routing waits for more of an extended-protocol batch: it is
    /// routed at its first Execute, Sync or Flush, when every Parse and
    /// Bind before it can be classified (up to [`BATCH_WAIT_LIMIT`] bytes);
    /// sharded, whole (spread.rs) unless nothing follows an Execute yet
    /// (a COPY may wait for its answer before sending more).
    pub(super) fn batch_incomplete(&self) -> bool {
        if (self.routing.is_none() && self.sharding.is_none()) || self.mode != PoolMode::Transaction {
            return false;
        }
        let mut rest: &[u8] = &self.rbuf;
        if !matches!(rest.first(), Some(b'P' | b'B' | b'D' | b'C')) || rest.len() >= BATCH_WAIT_LIMIT {
            return false;
        }
        let whole = self.sharding.is_some();
        let mut executed = false;
        while let Some((tag, body)) = first_message(rest) {
            let waits = matches!(tag, b'P' | b'B' | b'D' | b'C') || (whole && tag == b'E');
            if !waits {
                return false;
            }
            executed = tag == b'E';
            rest = &rest[HEADER_LEN + body.len()..];
        }
        !(executed && rest.is_empty())
    }

    pub(super) fn consume_first(&mut self) {
        if let Ok(Some((_, len))) = peek_header(&self.rbuf, MAX_MESSAGE_LEN) {
            self.rbuf.advance(HEADER_LEN + len);
        }
    }

    /// Answer `err` in place of the batch at the front of the buffer: a
    /// Query, or extended-protocol messages up to their Sync (read as they
    /// come), as PostgreSQL answers a failed batch. The session stays.
    /// `false`: the client went away.
    pub(super) async fn refuse(&mut self, err: &PgError) -> bool {
        self.account.error(&err.code);
        if self.stream.write_all(&err.to_bytes()).await.is_err() || self.skip_to_sync().await.is_none() {
            return false;
        }
        let mut out = BytesMut::new();
        msg::ready_for_query(&mut out, self.failed_status());
        self.stream.write_all(&out).await.is_ok()
    }

    /// The transaction status after an error pgmux answered: a
    /// transaction pgmux knows of has failed.
    pub(super) fn failed_status(&mut self) -> TxStatus {
        let multi = self.fail_multi();
        match (self.deferred_mut(), multi) {
            (Some(d), _) => {
                d.failed = true;
                TxStatus::Failed
            }
            (None, true) => TxStatus::Failed,
            (None, false) => TxStatus::Idle,
        }
    }

    /// Consume a Query, or extended-protocol messages up to their Sync
    /// (read as they come): (tag, first body byte) of each. `None`: the
    /// client went away or broke the protocol (it was told).
    pub(super) async fn skip_to_sync(&mut self) -> Option<Vec<(u8, u8)>> {
        let mut seen = Vec::new();
        loop {
            match first_message(&self.rbuf) {
                Some((tag, body)) => {
                    seen.push((tag, body.first().copied().unwrap_or(0)));
                    self.consume_first();
                    if matches!(tag, b'Q' | b'S') {
                        return Some(seen);
                    }
                }
                None => {
                    if let Err(e) = peek_header(&self.rbuf, MAX_MESSAGE_LEN) {
                        let _ = self.stream.write_all(&super::frame_error(e).to_bytes()).await;
                        return None;
                    }
                    self.rbuf.reserve(8192);
                    if !matches!(self.stream.read_buf(&mut self.rbuf).await, Ok(n) if n > 0) {
                        return None;
                    }
                }
            }
        }
    }

    /// A server connection for the planned backend, made this client's
    /// (settings, cancel target, a deferred BEGIN run). A replica that
    /// fails is banned and the read goes to another replica or the
    /// primary. Returns the connection and the replica it is on.
    pub(super) async fn checkout(
        &mut self,
        mut target: Option<Target>,
        decision: Decision,
    ) -> Result<(Checkout, Option<usize>), PgError> {
        let mut tries = self.routing.as_ref().map_or(0, |r| r.replicas.len());
        loop {
            let pool: Arc<Pool> = match (&self.routing, target) {
                (Some(r), Some(t)) => r.pool(t).clone(),
                _ => self.pool.clone(),
            };
            let replica = match target {
                Some(Target::Replica(i)) if decision == Decision::Read => Some(i),
                _ => None,
            };
            // Session mode: the connection taken at login (its pid is the
            // client's key) serves the first transaction.
            let got = match (self.reserved.take(), replica) {
                (Some(server), None) => Ok(server),
                _ => pool.get().await,
            };
            let failure = match got {
                Ok(mut server) => match self.attach(&mut server).await {
                    Ok(()) => return Ok((server, replica)),
                    Err(ServerError::Query(body)) => {
                        server.release();
                        return Err(PgError::error_from_server(&body));
                    }
                    Err(e) => PoolError::Server(e),
                },
                Err(e) => e,
            };
            let (Some(i), Some(r), true) = (replica, self.routing.clone(), tries > 0) else {
                return Err(pool_error(failure, self.mode == PoolMode::Transaction));
            };
            tries -= 1;
            r.monitor.ban(i, &failure.to_string());
            pool.close_idle();
            target = Some(r.read_target(self.last_write)?);
        }
    }

    /// Make a freshly checked-out connection this client's: its settings,
    /// its statements' naming context, the statement invalidations made
    /// since it was last used, its cancel target.
    async fn attach(&mut self, server: &mut Checkout) -> Result<(), ServerError> {
        let pool = server.pool().clone();
        let conn = server.conn();
        if conn.applied != self.wanted || conn.needs_reset {
            // Boxed: rare, and its state would make every session's task
            // larger.
            Box::pin(self.resync(conn)).await?;
        }
        if self.track {
            conn.prepared.context = prepared::naming_context(&self.wanted);
            conn.prepared.catch_up(pool.invalidations());
        }
        self.cancel.set(conn.cancel_key());
        self.tracker.reset(TxStatus::Idle);
        Ok(())
    }

    /// Bring the connection's settings to this client's, and tell the
    /// client the values that changed.
    async fn resync(&mut self, conn: &mut ServerConn) -> Result<(), ServerError> {
        conn.sync_params(&self.wanted).await?;
        let mut out = BytesMut::new();
        for (k, v) in &conn.reported {
            let lk = k.to_ascii_lowercase();
            if !is_server_owned(k) && self.told.get(&lk) != Some(v) {
                msg::parameter_status(&mut out, k, v);
                self.told.set(lk, v.clone());
            }
        }
        if !out.is_empty() {
            self.stream.write_all(&out).await?;
        }
        Ok(())
    }

    /// Put a failed read's bytes back in front of the buffer, as if they
    /// had not been sent.
    pub(super) fn restore(&mut self, mut replay: Replay) {
        for name in &replay.names {
            self.stmts.map.remove(name);
        }
        let mut buf = std::mem::take(&mut replay.sent);
        buf.extend_from_slice(&self.rbuf);
        buffers::give(std::mem::replace(&mut self.rbuf, buf));
        self.crelay = Default::default();
        self.srelay = Default::default();
    }

    /// The server connection was lost before any byte of its answer
    /// reached the client: every batch sent on it is answered with an
    /// error (it may or may not have run: never run twice) and the session
    /// goes on, as idle as it was. `false`: the client went away.
    pub(super) async fn lost_before_answer(&mut self, replay: Replay, why: &str) -> bool {
        let mut batches = 0;
        let mut rest: &[u8] = &replay.sent;
        let mut synced = true;
        while let Some((tag, body)) = first_message(rest) {
            synced = matches!(tag, b'Q' | b'S' | b'F');
            batches += usize::from(synced);
            rest = &rest[HEADER_LEN + body.len()..];
        }
        batches += usize::from(!synced);
        self.forget_lost_settings();
        self.restore(replay);
        let err = lost_error(why);
        for _ in 0..batches {
            if !self.refuse(&err).await {
                return false;
            }
        }
        true
    }

    /// Whether a session whose server connection was lost after part of
    /// an answer reached the client can go on: whole messages only went
    /// either way, no COPY, and no transaction the client knows of (the
    /// caller checks that no session state was pinned to that connection).
    pub(super) fn keeps_session(&self) -> bool {
        !self.srelay.mid_message()
            && !self.crelay.mid_message()
            && self.tracker.flight.status == TxStatus::Idle
            && !self.tracker.flight.copy_in
    }

    /// The server connection was lost after part of an answer reached the
    /// client (see [`Session::keeps_session`]): each batch in flight ends
    /// with an error, as a failed statement would. `false`: the client
    /// went away.
    pub(super) async fn lost_mid_answer(&mut self, why: &str) -> bool {
        let err = lost_error(why);
        let mut out = BytesMut::new();
        for _ in 0..self.tracker.flight.pending {
            out.extend_from_slice(&err.to_bytes());
            msg::ready_for_query(&mut out, TxStatus::Idle);
        }
        self.forget_lost_settings();
        if self.stream.write_all(&out).await.is_err() {
            return false;
        }
        // A batch without its Sync yet: the rest of it is skipped.
        !self.tracker.flight.unsynced || self.refuse(&err).await
    }

    /// SET/RESETs of batches that were lost never took effect.
    fn forget_lost_settings(&mut self) {
        self.pending_settings.clear();
        self.settings_failed = false;
    }

    /// Run the deferred `BEGIN` on a connection just checked out for the
    /// transaction's first statement.
    pub(super) async fn begin_deferred(&mut self, server: &mut Checkout) -> Result<(), ServerError> {
        if let Some(d) = self.take_deferred() {
            server.conn().run_expecting(&d.sql, TxStatus::InBlock).await?;
            self.tracker.reset(TxStatus::InBlock);
        }
        Ok(())
    }
}
