//! The session's state machine: [`Step`] says where serving the client
//! stands between two client batches, [`Session::serve`] is the one loop
//! that moves from each step to the next (the steps on the way to or
//! holding a server connection in its inner loop, `attached`, boxed once
//! per transaction), and each step is handled by its own function. What a
//! step leaves for the next travels in the enum, not in flags: an attached
//! connection's relay facts (pinned, the replay) in its `Attached`, the
//! transaction pgmux holds between batches in the session's `Txn`.
//!
//! ```text
//! Idle ──whole batch──▶ Batch ──routed──▶ Checkout ──server──▶ Relay ──▶ Ended
//!  ▲                      │ answered / refused                            │
//!  └──────────────────────┴───────── transaction boundary, retry ◀────────┘
//! ```

use std::time::Instant;

use bytes::Buf;
use tokio::io::AsyncWriteExt;

use super::relay::Stretch;
use super::{frame_error, lost, route, Relayed, Session};
use crate::backend::pool::Checkout;
use crate::config::PoolMode;
use crate::frontend::registry::ClientState;
use crate::protocol::error::{sqlstate, PgError, Severity};
use crate::protocol::frame::{peek_header, HEADER_LEN, MAX_MESSAGE_LEN};
use crate::protocol::prepared;
use crate::router::route::{Decision, Target};

/// Where serving the client stands.
enum Step {
    /// No server connection: wait for the client's next whole batch (in
    /// session mode the connection reserved at login waits with it;
    /// `retry`: the batch buffered is the re-run of a read whose server
    /// died).
    Idle { retry: bool },
    /// A whole batch is buffered: pgmux answers it, refuses it, or routes
    /// it.
    Batch { retry: bool },
    /// Routed: check out a server connection for it.
    Checkout { target: Option<Target>, decision: Decision, may_retry: bool },
    /// Attached to a server connection: relay until a transaction boundary
    /// or the end of either side. (Boxed, as `Ended`: the steps of an idle
    /// session's loop are as large as the largest of them.)
    Relay(Box<Attached>),
    /// The relay stretch ended, this way.
    Ended(Box<Attached>, Relayed),
    /// Serve no more.
    Done,
}

/// A server connection serving this client's transaction.
struct Attached {
    server: Checkout,
    /// What the relay keeps while it is attached (pinned, replay).
    stretch: Stretch,
    /// The replica it is on (a read), if any.
    replica: Option<usize>,
    decision: Decision,
    /// A lost server costs the client this batch only (transaction mode,
    /// nothing of the transaction held by pgmux).
    kept: bool,
    /// A read that may run again elsewhere if its server dies first.
    may_retry: bool,
}

impl Step {
    /// What the client list shows for this step.
    fn client_state(&self) -> Option<ClientState> {
        match self {
            Step::Idle { .. } => Some(ClientState::Idle),
            Step::Checkout { .. } => Some(ClientState::Waiting),
            Step::Relay(_) => Some(ClientState::Active),
            Step::Batch { .. } | Step::Ended(..) | Step::Done => None,
        }
    }
}

impl Session {
    /// Serve the client: the state machine's one loop.
    pub(super) async fn serve(&mut self) {
        let mut step = Step::Idle { retry: false };
        loop {
            if let Some(state) = step.client_state() {
                self.set_state(state);
            }
            step = match step {
                Step::Idle { retry } => self.idle(retry).await,
                Step::Batch { retry } => self.batch(retry).await,
                // Boxed, once per transaction: the attached steps' state
                // would otherwise sit in every idle session's task.
                attached @ (Step::Checkout { .. } | Step::Relay(_) | Step::Ended(..)) => {
                    Box::pin(self.attached(attached)).await
                }
                Step::Done => return,
            };
        }
    }

    /// The steps with a server connection (or on the way to one), until
    /// the session is back without one.
    async fn attached(&mut self, mut step: Step) -> Step {
        loop {
            step = match step {
                Step::Checkout { target, decision, may_retry } => self.take_server(target, decision, may_retry).await,
                Step::Relay(mut at) => {
                    let outcome = self.relay(at.server.conn(), &mut at.stretch).await;
                    self.cancel.clear();
                    Step::Ended(at, outcome)
                }
                Step::Ended(at, outcome) => self.ended(at, outcome).await,
                // The caller's loop shows it in the client list.
                other => return other,
            };
            if !matches!(step, Step::Checkout { .. } | Step::Relay(_) | Step::Ended(..)) {
                return step;
            }
            if let Some(state) = step.client_state() {
                self.set_state(state);
            }
        }
    }

    /// Wait for a whole message (a routed extended-protocol batch: up to
    /// its Execute/Sync/Flush) without a server connection.
    async fn idle(&mut self, retry: bool) -> Step {
        if self.must_leave() {
            Box::pin(self.goodbye()).await;
            return Step::Done;
        }
        loop {
            match peek_header(&self.rbuf, MAX_MESSAGE_LEN) {
                Ok(Some((_, len))) if self.rbuf.len() >= HEADER_LEN + len && !self.batch_incomplete() => break,
                Ok(Some((_, len))) if self.rbuf.len() >= HEADER_LEN + len => self.rbuf.reserve(8192),
                // Grow with what arrives, not with what the header
                // announces: a client cannot make pgmux allocate memory it
                // has not sent.
                Ok(Some((_, len))) => self.rbuf.reserve((HEADER_LEN + len - self.rbuf.len()).min(1 << 16)),
                // Nothing buffered: read_idle waits without a buffer.
                Ok(None) => {}
                Err(e) => return self.end_with(&frame_error(e)).await,
            }
            match self.read_idle().await {
                None => {
                    Box::pin(self.goodbye()).await;
                    return Step::Done;
                }
                Some(Ok(0) | Err(_)) => return Step::Done,
                Some(Ok(_)) => {}
            }
        }
        Step::Batch { retry }
    }

    /// A whole batch is here: what pgmux does with it.
    async fn batch(&mut self, retry: bool) -> Step {
        if self.rbuf[0] == b'X' {
            return Step::Done;
        }
        // A reload since the last transaction: this one uses its pools.
        if let Err(e) = self.follow_reload() {
            return self.end_with(&e).await;
        }
        if matches!(self.rbuf[0], b'd' | b'c' | b'f') {
            // COPY traffic after the COPY ended (it failed): PostgreSQL
            // ignores it outside COPY mode, so does pgmux.
            if let Ok(Some((_, len))) = peek_header(&self.rbuf, MAX_MESSAGE_LEN) {
                self.rbuf.advance(HEADER_LEN + len);
            }
            return Step::Idle { retry: false };
        }
        if self.track && self.rbuf[0] == b'P' {
            let pool = &self.pool;
            let ctx = prepared::naming_context(&self.wanted);
            let known = |h| pool.knows_statement(prepared::identity(h, ctx));
            if let Some((n, reply)) = prepared::answer_parse_batch(&self.rbuf, &mut self.stmts, known) {
                self.rbuf.advance(n);
                self.pool.metrics.prepared_hits.inc();
                return if self.stream.write_all(&reply).await.is_ok() {
                    Step::Idle { retry: false }
                } else {
                    Step::Done
                };
            }
        }
        if self.sharding.is_some() {
            if let Err(e) = Box::pin(self.resolve_directory()).await {
                return self.refused(&e).await;
            }
        }
        match self.plan() {
            // A re-run of a read whose server died gets no other.
            route::Plan::Go { target, decision } => Step::Checkout { target, decision, may_retry: !retry },
            other => match Box::pin(self.carry_out(other)).await {
                true => Step::Idle { retry: false },
                false => Step::Done,
            },
        }
    }

    /// Check out a server connection for the batch and get it ready.
    async fn take_server(&mut self, target: Option<Target>, decision: Decision, may_retry: bool) -> Step {
        let checked = match self.sharding.clone() {
            Some(sh) if self.multi().is_some() => {
                Box::pin(self.shard_conn(&sh, self.shard_at, false)).await.map(|c| (c, None))
            }
            _ => self.checkout(target, decision).await,
        };
        let (mut server, replica) = match checked {
            Ok(s) => s,
            Err(e) if e.severity == Severity::Error => return self.refused(&e).await,
            Err(e) => return self.end_with(&e).await,
        };
        let deferred = self.deferred().is_some();
        if let Err(e) = self.begin_deferred(&mut server).await {
            let err = PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("server connection lost: {e}"));
            return self.end_with(&err).await;
        }
        // Until a byte of the answer reaches the client, a lost server
        // costs it this batch only: a replica read runs elsewhere,
        // anything else is answered with an error and the session goes on
        // (the client is idle: transaction mode, no open transaction pgmux
        // holds for it).
        let kept = self.mode == PoolMode::Transaction && self.multi().is_none() && !deferred;
        let replay = (replica.is_some() || kept).then(route::Replay::new);
        let routed = self.sharding.is_some() && self.mode == PoolMode::Transaction;
        let stretch = Stretch { replay, primary: replica.is_none(), routed, ..Default::default() };
        self.account.start(server.pool());
        Step::Relay(Box::new(Attached { server, stretch, replica, decision, kept, may_retry }))
    }

    /// The relay stretch ended: give the connection back, retry, or end.
    async fn ended(&mut self, at: Box<Attached>, outcome: Relayed) -> Step {
        let Attached { mut server, stretch, replica, decision, kept, may_retry } = *at;
        match outcome {
            Relayed::Released => {
                if replica.is_none() && matches!(decision, Decision::Write | Decision::Begin) {
                    // Read-your-writes: later reads wait for replicas to
                    // replay past this point.
                    self.last_write = Some(Instant::now());
                }
                server.release();
                if self.multi().is_some() {
                    // One part ended by a statement of its own: the others
                    // cannot be committed with it.
                    tracing::warn!("a transaction spanning shards ended on one shard only; rolling back the others");
                    let _ = Box::pin(self.finish_multi(false)).await;
                }
                Step::Idle { retry: false }
            }
            Relayed::Batch => {
                self.rejoin(self.shard_at, server, self.tracker.flight.status);
                Step::Idle { retry: false }
            }
            Relayed::ServerGone(lost) => {
                let at = Attached { server, stretch, replica, decision, kept, may_retry };
                self.lost_server(at, *lost).await
            }
            Relayed::ClientGone => {
                Box::pin(self.abandon(server, stretch.pinned)).await;
                Step::Done
            }
            Relayed::QueryTimeout => {
                let (addr, pid, secret) = server.conn().cancel_key();
                tracing::warn!(pool = %server.pool().name(), "query_timeout: canceling the query, closing its client");
                tokio::spawn(async move { crate::backend::server::send_cancel(&addr, pid, secret).await });
                drop(server);
                let err = PgError::fatal(sqlstate::QUERY_CANCELED, "canceling statement due to query_timeout (pgmux)");
                self.end_with(&err).await
            }
            Relayed::ClientError(err) => {
                let err = *err;
                let _ = self.stream.write_all(&err.to_bytes()).await;
                Box::pin(self.abandon(server, stretch.pinned)).await;
                Step::Done
            }
        }
    }

    /// The server connection was lost: before any byte of the answer, the
    /// batch runs again (a read) or is answered with an error; mid-answer
    /// in transaction mode the client keeps its session; otherwise the
    /// session ends with the server's error.
    async fn lost_server(&mut self, at: Attached, lost: lost::Lost) -> Step {
        let Attached { server, stretch, replica, decision, kept, may_retry } = at;
        let Stretch { pinned, replay, .. } = stretch;
        let why = lost.why.clone();
        match (replay, replica) {
            (Some(replay), None) => {
                tracing::warn!(pool = %server.pool().name(), "server connection lost before an answer: {why}");
                drop(server);
                if decision == Decision::Read && may_retry {
                    self.restore(replay);
                    return Step::Idle { retry: true };
                }
                if Box::pin(self.lost_before_answer(replay, &why)).await {
                    Step::Idle { retry: false }
                } else {
                    Step::Done
                }
            }
            (Some(replay), Some(i)) => {
                // Nothing of the answer reached the client: ban the replica
                // and run the read elsewhere.
                if let Some(r) = &self.routing {
                    tracing::info!(pool = %server.pool().name(), "read retried elsewhere: {why}");
                    r.monitor.ban(i, &why);
                    server.pool().close_idle();
                }
                drop(server);
                self.restore(replay);
                Step::Idle { retry: false }
            }
            (None, _) if kept && !pinned && self.keeps_session() => {
                tracing::warn!(pool = %server.pool().name(), "server connection lost mid-answer: {why}");
                drop(server);
                if Box::pin(self.lost_mid_answer(&why)).await {
                    Step::Idle { retry: false }
                } else {
                    Step::Done
                }
            }
            (None, _) => {
                tracing::warn!(pool = %self.pool.name(), "server connection lost mid-transaction: {why}");
                drop(server);
                match lost.client_error() {
                    Some(err) => self.end_with(&err).await,
                    None => {
                        let _ = self.stream.shutdown().await;
                        Step::Done
                    }
                }
            }
        }
    }

    /// Refuse the batch with `e` (the session goes on unless the client left).
    async fn refused(&mut self, e: &PgError) -> Step {
        // Boxed: rare (see attached).
        if Box::pin(self.refuse(e)).await {
            Step::Idle { retry: false }
        } else {
            Step::Done
        }
    }

    /// Tell the client `e` and end the session.
    async fn end_with(&mut self, e: &PgError) -> Step {
        Box::pin(Self::fatal(&mut self.stream, e)).await;
        Step::Done
    }
}
