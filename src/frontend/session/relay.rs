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
use crate::protocol::prepared;
use crate::protocol::tracker::{self, Ctx};
use crate::sql::effects;
use crate::sql::marks::Marks;

/// What one relay stretch (a server connection attached, from checkout
/// to release) keeps beside the tracker: facts of this connection's use
/// that end with it, so an idle session holds none of them.
#[derive(Default)]
pub(super) struct Stretch {
    /// The client keeps this server connection (session state pgmux
    /// cannot replay: LISTEN, temporary tables, session advisory locks,
    /// ...): no transaction boundary releases it.
    pub pinned: bool,
    /// Client messages left in the buffer for after the current batch.
    pub held: bool,
    /// The client bytes sent so far, while no byte of the answer reached
    /// the client (None: a lost server connection ends the session).
    pub replay: Option<super::route::Replay>,
    /// The connection is its shard's primary (not a replica's): batches
    /// for the shard may be pipelined on it.
    pub primary: bool,
    /// The batch at the front of the buffer was routed to this connection
    /// (sharded): its first statement is known to belong here.
    pub routed: bool,
}

impl Session {
    /// The client's transaction is over (transaction mode). Server bytes
    /// left unread are not the client's (see `forward_server`): the pool
    /// drops such a connection rather than reuse it.
    fn releasable(&self) -> bool {
        self.tracker.idle() && !self.crelay.mid_message() && !self.srelay.mid_message()
    }

    pub(super) async fn relay(&mut self, conn: &mut ServerConn, st: &mut Stretch) -> Relayed {
        if let Some(end) = self.forward_client(conn, st).await {
            return end;
        }
        loop {
            if self.mode == PoolMode::Transaction && !st.pinned && self.releasable() {
                return Relayed::Released;
            }
            if !st.pinned && self.answered_in_transaction(conn) {
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
                // A timer only when there is a deadline: a disabled
                // branch's future is still built, and a Sleep takes the
                // runtime's handle (a shared count) each time.
                _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } }, if deadline.is_some() => Event::Timeout,
            };
            let end = match ev {
                Event::Timeout => return Relayed::QueryTimeout,
                Event::Client(Ok(0)) | Event::Client(Err(_)) => return Relayed::ClientGone,
                Event::Client(Ok(_)) => self.forward_client(conn, st).await,
                Event::Server(Ok(0)) => {
                    return Relayed::ServerGone("server closed the connection unexpectedly".to_string().into())
                }
                Event::Server(Err(e)) => return Relayed::ServerGone(e.to_string().into()),
                Event::Server(Ok(_)) => match self.forward_server(conn, st).await {
                    // The client's messages waited for a statement check.
                    None if self.tracker.take_resume() => self.forward_client(conn, st).await,
                    // A batch held back: send it once this one is answered,
                    // unless the transaction ended (it is routed anew).
                    None if st.held
                        && !self.cross()
                        && self.tracker.flight.pending == 0
                        && !self.tracker.flight.copy_in
                        && (self.tracker.flight.status != TxStatus::Idle || st.pinned) =>
                    {
                        self.forward_client(conn, st).await
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
    async fn forward_client(&mut self, conn: &mut ServerConn, st: &mut Stretch) -> Option<Relayed> {
        if self.tracker.holding() {
            // A batch runs again first (its answer is held back).
            return None;
        }
        st.held = false;
        let outstanding =
            self.tracker.flight.pending > 0 && !self.tracker.flight.unsynced && !self.tracker.flight.copy_in;
        let mut gate = self.gate((st.pinned, st.primary), std::mem::take(&mut st.routed), outstanding);
        let mut guard = self.shard_guard();
        let track = self.track;
        let tracker = &mut self.tracker;
        let mut cx = Ctx::new(&mut self.stmts, &mut conn.prepared, self.pool.settings.max_prepared_statements);
        cx.log = Some(self.pool.invalidations());
        let txn_mode = self.mode == PoolMode::Transaction;
        let slow_log = self.account.slow_log();
        let needs_body = |t: u8| (track && t != b'd') || ((txn_mode || slow_log) && matches!(t, b'Q' | b'P'));
        let mut notes = ClientNotes::default();
        let scanned = self.crelay.scan(&self.rbuf, MAX_MESSAGE_LEN, needs_body, |tag, body| {
            let Some(vetted) = gate.admit(tag) else {
                notes.held = true;
                return Flow::Stop;
            };
            if let Some(stop) = refused_message(tag) {
                notes.stop = Some(stop);
                return Flow::Stop;
            }
            if tag == b'P' && track {
                notes.created(body, cx.stmts);
            }
            let veto = guard.as_mut().filter(|_| !vetted).and_then(|g| g.check(tag, body, cx.stmts));
            // The one pass over a statement's text (see sql::marks).
            let text = matches!(tag, b'Q' | b'P').then(|| statement_text(tag, body));
            // Only the tracker and transaction mode read the marks.
            cx.marks = text.filter(|_| track || txn_mode).map(Marks::of);
            let flow = tracker.client(tag, body, track.then_some(&mut cx), veto);
            let marks = cx.marks.take();
            if let (true, Some(sql)) = (slow_log, text) {
                notes.statement = Some(account::statement_text(sql));
            }
            if let (true, Some(sql), Some(marks)) = (txn_mode && flow != Flow::Drop, text, marks) {
                notes.effects(sql, marks, cx.server);
            }
            flow
        });
        let events = std::mem::take(&mut cx.events);
        let ClientNotes { named, stop, held, .. } = self.apply_client_notes(conn, st, notes);
        let scan = match scanned {
            Ok(scan) => scan,
            Err(e) => return Some(Relayed::ClientError(Box::new(frame_error(e)))),
        };
        self.account.prepared(&events, &self.pool);
        let out = scan.rewritten.as_deref().unwrap_or(&self.rbuf[..scan.consumed]);
        // Bytes a failed write may have sent in part count as sent.
        let written = match out.len() {
            0 => Ok(()),
            n => conn.stream.write_all(out).await.map(|()| self.account.sent(n, self.tracker.flight.pending)),
        };
        self.keep_for_replay(st, scan.consumed, named);
        self.rbuf.advance(scan.consumed);
        if let Err(e) = written {
            return Some(Relayed::ServerGone(e.to_string().into()));
        }
        st.held = held;
        if let Some(answers) = self.tracker.due() {
            st.replay = None;
            if self.stream.write_all(&answers).await.is_err() {
                return Some(Relayed::ClientGone);
            }
        }
        stop
    }

    /// What the client's messages did to the session, once they are sent
    /// on: settings to follow, a reset or a pin the connection needs, the
    /// statement for the slow-query log. The rest of the notes is returned.
    fn apply_client_notes(&mut self, conn: &mut ServerConn, st: &mut Stretch, mut notes: ClientNotes) -> ClientNotes {
        if let Some(s) = notes.statement.take() {
            self.account.statement(s);
        }
        conn.needs_reset |= notes.full_reset;
        if notes.pin && !st.pinned {
            tracing::debug!(pool = %self.pool.name(), "client pinned to its server connection");
            st.pinned = true;
        }
        self.note_settings(conn, std::mem::take(&mut notes.changes));
        notes
    }

    /// Keep the `consumed` bytes just sent (and the statement names they
    /// create) for a re-run elsewhere, while nothing of the answer came.
    fn keep_for_replay(&self, st: &mut Stretch, consumed: usize, named: Vec<String>) {
        if let Some(replay) = &mut st.replay {
            if replay.sent.len() + consumed > REPLAY_LIMIT {
                st.replay = None;
            } else {
                replay.sent.extend_from_slice(&self.rbuf[..consumed]);
                replay.names.extend(named);
            }
        }
    }

    /// Pass server messages to the client, noting ReadyForQuery status and
    /// ParameterStatus changes.
    async fn forward_server(&mut self, conn: &mut ServerConn, st: &mut Stretch) -> Option<Relayed> {
        if st.replay.is_some() {
            if let Some(lost) = lost::goodbye_before_ready(&conn.rbuf) {
                // A server shutting down: its goodbye (and any part of an
                // answer before it) is not the answer.
                return Some(Relayed::ServerGone(Box::new(lost)));
            }
        }
        let track = self.track;
        let tracker = &mut self.tracker;
        let mut cx = Ctx::new(&mut self.stmts, &mut conn.prepared, self.pool.settings.max_prepared_statements);
        cx.log = Some(self.pool.invalidations());
        let txn_mode = self.mode == PoolMode::Transaction;
        let needs_body = |t: u8| {
            if track {
                t != b'D' && t != b'd'
            } else {
                matches!(t, b'Z' | b'S' | b'E' | b'N' | b'A') || (txn_mode && t == b'C')
            }
        };
        let mut notes = ServerNotes { base: conn.rbuf.as_ptr() as usize, ..Default::default() };
        let watch_settings = !self.pending_settings.is_empty();
        let account = &self.account;
        // In transaction mode the client's part ends with the transaction:
        // what the server sends after it (a FATAL on shutdown) is not the
        // client's, and the connection is not reused (see Pool::release).
        let stop_at_idle = txn_mode && !st.pinned;
        let pids = (conn.backend_pid, self.key_pid);
        let scanned = self.srelay.scan(&conn.rbuf, MAX_MESSAGE_LEN, needs_body, |tag, body| {
            if notes.ended {
                return Flow::Stop;
            }
            if let Some(own) = (tag == b'A').then(|| super::welcome::own_notification(body, pids)).flatten() {
                return Flow::Replace(own); // asynchronous: nothing of pgmux's is due at it
            }
            if notes.goodbye(tag, body, stop_at_idle) {
                return Flow::Stop;
            }
            let (flow, event) = tracker.server(tag, body, needs_body(tag), track.then_some(&mut cx));
            if tag == b'E' {
                account.error(crate::ops::metrics::error_code(body).unwrap_or("XX000"));
            }
            notes.message(tag, body, event, watch_settings);
            notes.ended = stop_at_idle && tag == b'Z' && tracker.idle();
            flow
        });
        let events = std::mem::take(&mut cx.events);
        let scan = match scanned {
            Ok(scan) => scan,
            Err(e) => return Some(Relayed::ServerGone(format!("invalid message from server: {e}").into())),
        };
        self.invalidate(conn, &events);
        let (readies, idle, gone) = (notes.readies, notes.idle, notes.gone.take());
        self.apply_server_notes(conn, notes);
        let out = scan.rewritten.as_deref().unwrap_or(&conn.rbuf[..scan.consumed]);
        if !out.is_empty() {
            st.replay = None;
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
            return self.run_again(conn, st, again).await;
        }
        gone.map(|lost| Relayed::ServerGone(Box::new(lost)))
    }

    /// What the server's messages did to the session: settings settled,
    /// statements the server now has, DISCARD ALL, ParameterStatus values
    /// (the client's wanted and told settings follow them).
    fn apply_server_notes(&mut self, conn: &mut ServerConn, notes: ServerNotes) {
        self.settle_settings(&notes.settle);
        for h in notes.learned {
            self.pool.learn_statement(h);
        }
        if notes.discarded {
            // DISCARD ALL: session settings are back to the startup ones.
            conn.applied.clear();
            self.wanted = self.startup.clone();
        }
        for (at, len) in notes.changed {
            let body = conn.rbuf[at..at + len].to_vec();
            if let Some((k, v)) = conn.note_status(&body) {
                if !is_server_owned(&k) {
                    let lk = k.to_ascii_lowercase();
                    self.wanted.set(lk.clone(), v.clone());
                    self.told.set(lk, v);
                }
            }
        }
    }

    /// Statements the server found stale, or DDL relayed: every connection
    /// to the database drops them (this one at once).
    fn invalidate(&mut self, conn: &mut ServerConn, events: &tracker::CacheEvents) {
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
    async fn run_again(&mut self, conn: &mut ServerConn, st: &mut Stretch, again: tracker::Again) -> Option<Relayed> {
        match again.resend {
            Some(mut resend) if !self.crelay.mid_message() => {
                tracing::debug!(pool = %self.pool.name(), "a stale prepared statement: its batch runs again");
                if let Some(replay) = &mut st.replay {
                    // Sent last: they are sent again below.
                    let kept = replay.sent.len().saturating_sub(resend.len());
                    replay.sent.truncate(kept);
                }
                resend.extend_from_slice(&self.rbuf);
                self.rbuf = resend;
                self.forward_client(conn, st).await
            }
            _ => {
                st.replay = None;
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

/// What the scan of a client's messages noted, for after it.
#[derive(Default)]
struct ClientNotes {
    /// Settings the statements change (settled on the server's answer).
    changes: Vec<effects::SettingChange>,
    full_reset: bool,
    pin: bool,
    /// Statement names the batch creates (a retry elsewhere forgets them).
    named: Vec<String>,
    /// The last statement's text, for the slow-query log.
    statement: Option<String>,
    /// How the relay ends after these messages, if it does.
    stop: Option<Relayed>,
    /// A batch was held back (sharded: routed after the one in flight).
    held: bool,
}

impl ClientNotes {
    /// A Parse of a name this client has not used.
    fn created(&mut self, body: &[u8], stmts: &prepared::ClientStatements) {
        let name = body.split(|&b| b == 0).next().unwrap_or_default();
        let name = String::from_utf8_lossy(name);
        if !name.is_empty() && !stmts.map.contains_key(name.as_ref()) {
            self.named.push(name.into_owned());
        }
    }

    /// A statement's effects on the session (transaction mode), known to
    /// be worth a look from its marks.
    fn effects(&mut self, sql: &[u8], marks: Marks, server: &mut prepared::ServerStatements) {
        if !marks.effects() {
            return;
        }
        let effects = effects::marked_effects(&String::from_utf8_lossy(sql), marks);
        if effects.names {
            // Statements prepared from here on resolve names differently:
            // they are this connection's alone.
            server.context = prepared::private_context();
        }
        self.changes.extend(effects.changes);
        self.full_reset |= effects.full_reset;
        self.pin |= effects.pins;
    }
}

/// A client message that may not come here, and how the relay ends then.
fn refused_message(tag: u8) -> Option<Relayed> {
    match tag {
        b'Q' | b'F' | b'S' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'd' | b'c' | b'f' => None,
        b'X' => Some(Relayed::ClientGone),
        _ => Some(Relayed::ClientError(Box::new(PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("invalid frontend message type {tag}"),
        )))),
    }
}

/// What the scan of a server's messages noted, for after it.
#[derive(Default)]
struct ServerNotes {
    /// Where the scanned buffer starts (ParameterStatus bodies are noted
    /// by their offset in it).
    base: usize,
    /// ParameterStatus bodies: (offset, length).
    changed: Vec<(usize, usize)>,
    discarded: bool,
    /// Statements now prepared on the server.
    learned: Vec<u64>,
    readies: u64,
    /// ReadyForQuery messages ending a transaction.
    idle: u64,
    /// What settles pending SET/RESETs (when there are any).
    settle: Vec<Settle>,
    /// The client's transaction ended (transaction mode): stop there.
    ended: bool,
    /// The server is going away (its FATAL), and how.
    gone: Option<lost::Lost>,
}

impl ServerNotes {
    /// A FATAL from the server: in transaction mode it ends the connection,
    /// not the client's session (stop before it, `true`); else it goes to
    /// the client as it is, and ends its session.
    fn goodbye(&mut self, tag: u8, body: &[u8], stop_at_idle: bool) -> bool {
        if stop_at_idle && (tag == b'E' || tag == b'N') {
            self.gone = lost::goodbye(tag, body);
            return self.gone.is_some();
        }
        if tag == b'E' {
            self.gone = lost::goodbye(tag, body).filter(|l| l.fatal.is_some()).map(|l| lost::Lost { told: true, ..l });
        }
        false
    }

    /// One message relayed, with what the tracker made of it.
    fn message(&mut self, tag: u8, body: &[u8], event: tracker::Event, watch_settings: bool) {
        match tag {
            b'Z' => {
                self.readies += 1;
                self.idle += u64::from(TxStatus::of_ready(body) == TxStatus::Idle);
            }
            b'S' => self.changed.push((body.as_ptr() as usize - self.base, body.len())),
            _ => {}
        }
        if watch_settings {
            match tag {
                b'E' => self.settle.push(Settle::Error),
                b'C' if body == b"ROLLBACK\0" => self.settle.push(Settle::Rollback),
                b'Z' => self.settle.push(Settle::Ready(TxStatus::of_ready(body))),
                _ => {}
            }
        }
        match event {
            tracker::Event::DiscardAll => self.discarded = true,
            tracker::Event::Prepared(h) => self.learned.push(h),
            tracker::Event::Skipped(_) | tracker::Event::None => {}
        }
    }
}
