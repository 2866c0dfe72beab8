//! The byte relay of a session holding a server connection: client
//! messages forwarded in one write (noting settings, pins, prepared
//! statements, the shard guard), server messages passed back (noting
//! ReadyForQuery status, ParameterStatus, errors, what is answered), until
//! a transaction boundary or the end of either side.

use bytes::Buf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::settings::Settle;
use super::{account, frame_error, lost, Event, Relayed, Session, REPLAY_LIMIT};
use crate::backend::server::{is_server_owned, ServerConn};
use crate::config::PoolMode;
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::frame::{Flow, MAX_MESSAGE_LEN};
use crate::protocol::messages::TxStatus;
use crate::protocol::prepared::{self, Ctx};
use crate::sql::effects;
use crate::sql::marks::Marks;

impl Session {
    /// The client's transaction is over (transaction mode). Server bytes
    /// left unread are not the client's (see `forward_server`): the pool
    /// drops such a connection rather than reuse it.
    fn releasable(&self) -> bool {
        self.tracker.idle() && !self.crelay.mid_message() && !self.srelay.mid_message()
    }

    pub(super) async fn relay(&mut self, conn: &mut ServerConn) -> Relayed {
        if let Some(end) = self.forward_client(conn).await {
            return end;
        }
        loop {
            if self.mode == PoolMode::Transaction && !self.pinned && self.releasable() {
                return Relayed::Released;
            }
            if self.answered_in_transaction(conn) {
                return Relayed::Batch;
            }
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(16 * 1024);
            }
            let deadline = match (self.pool.settings.query_timeout, self.account.query_started()) {
                (Some(limit), Some(sent)) if !self.tracker.flight.copy_in => {
                    Some(tokio::time::Instant::from_std(sent + limit))
                }
                _ => None,
            };
            let ev = tokio::select! {
                r = self.stream.read_buf(&mut self.rbuf) => Event::Client(r),
                r = conn.fill() => Event::Server(r),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => Event::Timeout,
            };
            let end = match ev {
                Event::Timeout => return Relayed::QueryTimeout,
                Event::Client(Ok(0)) | Event::Client(Err(_)) => return Relayed::ClientGone,
                Event::Client(Ok(_)) => self.forward_client(conn).await,
                Event::Server(Ok(0)) => {
                    return Relayed::ServerGone("server closed the connection unexpectedly".to_string().into())
                }
                Event::Server(Err(e)) => return Relayed::ServerGone(e.to_string().into()),
                Event::Server(Ok(_)) => match self.forward_server(conn).await {
                    // The client's messages waited for a statement check.
                    None if self.tracker.take_resume() => self.forward_client(conn).await,
                    // A batch held back: send it once this one is answered,
                    // unless the transaction ended (it is routed anew).
                    None if self.held
                        && !self.cross()
                        && self.tracker.flight.pending == 0
                        && !self.tracker.flight.copy_in
                        && (self.tracker.flight.status != TxStatus::Idle || self.pinned) =>
                    {
                        self.forward_client(conn).await
                    }
                    end => end,
                },
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Pass complete client messages (and streamed bodies) to the server in
    /// one write.
    async fn forward_client(&mut self, conn: &mut ServerConn) -> Option<Relayed> {
        if self.tracker.holding() {
            // A batch runs again first (its answer is held back).
            return None;
        }
        self.held = false;
        let outstanding =
            self.tracker.flight.pending > 0 && !self.tracker.flight.unsynced && !self.tracker.flight.copy_in;
        let mut guard = self.shard_guard();
        let mut stop: Option<Relayed> = None;
        let track = self.track;
        let tracker = &mut self.tracker;
        let mut cx = Ctx::new(&mut self.stmts, &mut conn.prepared, self.pool.settings.max_prepared_statements);
        cx.log = Some(self.pool.invalidations());
        let txn_mode = self.mode == PoolMode::Transaction;
        let mut changes = Vec::new();
        let mut full_reset = false;
        let mut named = Vec::new();
        let mut pin = false;
        let slow_log = self.account.slow_log();
        let needs_body = |t: u8| (track && t != b'd') || ((txn_mode || slow_log) && matches!(t, b'Q' | b'P'));
        let mut statement = None;
        // Sharded: one batch at a time (the next may belong to another
        // shard and is routed after this one's transaction ends).
        let hold = self.sharding.is_some() && txn_mode && !self.pinned;
        // A batch still unanswered counts as this call's first.
        let mut batch_done = hold && outstanding;
        let mut held = false;
        let scanned = self.crelay.scan(&self.rbuf, MAX_MESSAGE_LEN, needs_body, |tag, body| {
            if hold && batch_done && matches!(tag, b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'F' | b'H') {
                held = true;
                return Flow::Stop;
            }
            batch_done |= matches!(tag, b'Q' | b'S');
            if !matches!(tag, b'Q' | b'F' | b'S' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'd' | b'c' | b'f') {
                stop = Some(if tag == b'X' {
                    Relayed::ClientGone
                } else {
                    Relayed::ClientError(PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        format!("invalid frontend message type {tag}"),
                    ))
                });
                return Flow::Stop;
            }
            if tag == b'P' && track {
                // A retry elsewhere forgets the names this batch created.
                let name = body.split(|&b| b == 0).next().unwrap_or_default();
                let name = String::from_utf8_lossy(name);
                if !name.is_empty() && !cx.stmts.map.contains_key(name.as_ref()) {
                    named.push(name.into_owned());
                }
            }
            let veto = guard.as_mut().and_then(|g| g.check(tag, body, cx.stmts));
            // The one pass over a statement's text (see sql::marks).
            let text = matches!(tag, b'Q' | b'P').then(|| statement_text(tag, body));
            cx.marks = text.map(Marks::of);
            let flow = tracker.client(tag, body, track.then_some(&mut cx), veto);
            let marks = cx.marks.take();
            if let (true, Some(sql)) = (slow_log, text) {
                statement = Some(account::statement_text(sql));
            }
            if let (true, Some(sql), Some(marks)) = (txn_mode && flow != Flow::Drop, text, marks) {
                if !marks.effects() {
                    return flow;
                }
                let effects = effects::marked_effects(&String::from_utf8_lossy(sql), marks);
                if effects.names {
                    // Statements prepared from here on resolve names
                    // differently: they are this connection's alone.
                    cx.server.context = prepared::private_context();
                }
                changes.extend(effects.changes);
                full_reset |= effects.full_reset;
                pin |= effects.pins;
            }
            flow
        });
        let events = std::mem::take(&mut cx.events);
        if let Some(s) = statement {
            self.account.statement(s);
        }
        conn.needs_reset |= full_reset;
        if pin && !self.pinned {
            tracing::debug!(pool = %self.pool.name(), "client pinned to its server connection");
            self.pinned = true;
        }
        self.note_settings(conn, changes);
        let scan = match scanned {
            Ok(scan) => scan,
            Err(e) => return Some(Relayed::ClientError(frame_error(e))),
        };
        self.account.prepared(&events, &self.pool);
        let out = scan.rewritten.as_deref().unwrap_or(&self.rbuf[..scan.consumed]);
        // Bytes a failed write may have sent in part count as sent.
        let written = match out.len() {
            0 => Ok(()),
            n => conn.stream.write_all(out).await.map(|()| self.account.sent(n, self.tracker.flight.pending)),
        };
        if let Some(replay) = &mut self.replay {
            if replay.sent.len() + scan.consumed > REPLAY_LIMIT {
                self.replay = None;
            } else {
                replay.sent.extend_from_slice(&self.rbuf[..scan.consumed]);
                replay.names.extend(named);
            }
        }
        self.rbuf.advance(scan.consumed);
        if let Err(e) = written {
            return Some(Relayed::ServerGone(e.to_string().into()));
        }
        self.held = held;
        if let Some(answers) = self.tracker.due() {
            self.replay = None;
            if self.stream.write_all(&answers).await.is_err() {
                return Some(Relayed::ClientGone);
            }
        }
        stop
    }

    /// Pass server messages to the client, noting ReadyForQuery status and
    /// ParameterStatus changes.
    async fn forward_server(&mut self, conn: &mut ServerConn) -> Option<Relayed> {
        if self.replay.is_some() {
            if let Some(lost) = lost::goodbye_before_ready(&conn.rbuf) {
                // A server shutting down: its goodbye (and any part of an
                // answer before it) is not the answer.
                return Some(Relayed::ServerGone(lost));
            }
        }
        let mut changed: Vec<(usize, usize)> = Vec::new();
        let mut discarded = false;
        let mut learned = Vec::new();
        let base = conn.rbuf.as_ptr() as usize;
        let track = self.track;
        let tracker = &mut self.tracker;
        let mut cx = Ctx::new(&mut self.stmts, &mut conn.prepared, self.pool.settings.max_prepared_statements);
        cx.log = Some(self.pool.invalidations());
        let txn_mode = self.mode == PoolMode::Transaction;
        let watch_settings = !self.pending_settings.is_empty();
        let mut settle: Vec<Settle> = Vec::new();
        let needs_body = |t: u8| {
            if track {
                t != b'D' && t != b'd'
            } else {
                matches!(t, b'Z' | b'S' | b'E' | b'N' | b'A') || (txn_mode && t == b'C')
            }
        };
        let (mut readies, mut idle) = (0u64, 0u64);
        let account = &self.account;
        // In transaction mode the client's part ends with the transaction:
        // what the server sends after it (a FATAL on shutdown) is not the
        // client's, and the connection is not reused (see Pool::release).
        let stop_at_idle = txn_mode && !self.pinned;
        let mut ended = false;
        let mut gone = None;
        let pids = (conn.backend_pid, self.key_pid);
        let scanned = self.srelay.scan(&conn.rbuf, MAX_MESSAGE_LEN, needs_body, |tag, body| {
            if ended {
                return Flow::Stop;
            }
            if let Some(own) = (tag == b'A').then(|| super::welcome::own_notification(body, pids)).flatten() {
                return Flow::Replace(own); // asynchronous: nothing of pgmux's is due at it
            }
            if stop_at_idle && (tag == b'E' || tag == b'N') {
                // A FATAL ends the connection, not the client's session.
                gone = lost::goodbye(tag, body);
                if gone.is_some() {
                    return Flow::Stop;
                }
            } else if tag == b'E' {
                // Session mode or pinned: the server's FATAL goes to the
                // client as it is, and ends its session.
                gone = lost::goodbye(tag, body).filter(|l| l.fatal.is_some()).map(|l| lost::Lost { told: true, ..l });
            }
            let (flow, event) = tracker.server(tag, body, needs_body(tag), track.then_some(&mut cx));
            match tag {
                b'Z' => {
                    readies += 1;
                    idle += u64::from(TxStatus::of_ready(body) == TxStatus::Idle);
                }
                b'E' => account.error(crate::ops::metrics::error_code(body).unwrap_or("XX000")),
                _ => {}
            }
            if tag == b'S' {
                changed.push((body.as_ptr() as usize - base, body.len()));
            }
            if watch_settings {
                match tag {
                    b'E' => settle.push(Settle::Error),
                    b'C' if body == b"ROLLBACK\0" => settle.push(Settle::Rollback),
                    b'Z' => settle.push(Settle::Ready(TxStatus::of_ready(body))),
                    _ => {}
                }
            }
            match event {
                prepared::Event::DiscardAll => discarded = true,
                prepared::Event::Prepared(h) => learned.push(h),
                prepared::Event::Skipped(_) | prepared::Event::None => {}
            }
            ended = stop_at_idle && tag == b'Z' && tracker.idle();
            flow
        });
        let events = std::mem::take(&mut cx.events);
        let scan = match scanned {
            Ok(scan) => scan,
            Err(e) => return Some(Relayed::ServerGone(format!("invalid message from server: {e}").into())),
        };
        self.invalidate(conn, &events);
        self.settle_settings(&settle);
        for h in learned {
            self.pool.learn_statement(h);
        }
        if discarded {
            // DISCARD ALL: session settings are back to the startup ones.
            conn.applied.clear();
            self.wanted = self.startup.clone();
        }
        for (at, len) in changed {
            let body = conn.rbuf[at..at + len].to_vec();
            if let Some((k, v)) = conn.note_status(&body) {
                if !is_server_owned(&k) {
                    let lk = k.to_ascii_lowercase();
                    self.wanted.set(lk.clone(), v.clone());
                    self.told.set(lk, v);
                }
            }
        }
        let out = scan.rewritten.as_deref().unwrap_or(&conn.rbuf[..scan.consumed]);
        if !out.is_empty() {
            self.replay = None;
        }
        self.account.answered(out.len(), readies, idle, self.tracker.flight.pending);
        let sent = out.is_empty() || self.stream.write_all(out).await.is_ok();
        conn.rbuf.advance(scan.consumed);
        if !sent {
            return Some(Relayed::ClientGone);
        }
        if self.tracker.take_sync() && conn.stream.write_all(b"S\0\0\0\x04").await.is_err() {
            return Some(Relayed::ServerGone("server connection lost".to_string().into()));
        }
        if let Some(again) = self.tracker.take_rerun() {
            return self.run_again(conn, again).await;
        }
        gone.map(Relayed::ServerGone)
    }

    /// Statements the server found stale, or DDL relayed: every connection
    /// to the database drops them (this one at once).
    fn invalidate(&mut self, conn: &mut ServerConn, events: &prepared::CacheEvents) {
        if events.stale.is_empty() && !events.schema_changed {
            return;
        }
        let log = self.pool.invalidations();
        for &(ident, reshaped) in &events.stale {
            log.statement(ident, reshaped);
        }
        if events.schema_changed {
            log.all();
        }
        conn.prepared.catch_up(log);
        self.account.prepared(events, &self.pool);
    }

    /// Send a batch whose statement was stale again, ahead of the client's
    /// later messages; when that cannot be, give the client the server's
    /// answer to it.
    async fn run_again(&mut self, conn: &mut ServerConn, again: prepared::Again) -> Option<Relayed> {
        match again.resend {
            Some(mut resend) if !self.crelay.mid_message() => {
                tracing::debug!(pool = %self.pool.name(), "a stale prepared statement: its batch runs again");
                if let Some(replay) = &mut self.replay {
                    // Sent last: they are sent again below.
                    let kept = replay.sent.len().saturating_sub(resend.len());
                    replay.sent.truncate(kept);
                }
                resend.extend_from_slice(&self.rbuf);
                self.rbuf = resend;
                self.forward_client(conn).await
            }
            _ => {
                self.replay = None;
                self.stream.write_all(&again.answer).await.err().map(|_| Relayed::ClientGone)
            }
        }
    }
}

/// The statement text of a Query or Parse body (Parse: the statement
/// name comes first).
fn statement_text(tag: u8, body: &[u8]) -> &[u8] {
    let cstr = |b: &[u8]| -> usize { memchr::memchr(0, b).unwrap_or(b.len()) };
    let body = if tag == b'P' { body.get(cstr(body) + 1..).unwrap_or_default() } else { body };
    &body[..cstr(body)]
}
