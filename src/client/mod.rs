//! One client session after login: the relay between the client socket and
//! the server connection it holds, and the pooling decisions.
//!
//! Frames are relayed as bytes. The session looks at tags only, plus the
//! bodies of ReadyForQuery (transaction status) and ParameterStatus
//! (tracked settings). In transaction mode the server connection goes back
//! to the pool when every Query/Sync sent has been answered by a
//! ReadyForQuery and the last one says idle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tls::ClientStream;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cancel::CancelSlot;
use crate::config::PoolMode;
use crate::flight::Flight;
use crate::pool::{Pool, PoolError};
use crate::prepared::{self, ClientStatements, Ctx, Tracker};
use crate::protocol::error::{sqlstate, PgError, Severity};
use crate::protocol::frame::{peek_header, Flow, FrameError, Relay, HEADER_LEN, MAX_MESSAGE_LEN};
use crate::router::route::{Decision, Routing};
use crate::server::{is_server_owned, ServerConn, ServerError};
use crate::sqlhead;

mod abandon;
mod account;
mod copy;
mod life;
mod multi;
mod route;
mod scatter;
mod settings;
mod shard;
mod welcome;

/// Client bytes of a replica read kept for a retry elsewhere, at most.
const REPLAY_LIMIT: usize = 1 << 20;

/// What pgmux records for a server setting a client changed in a way it
/// cannot read back: never equal to a real value, so the connection is
/// re-synced on its next checkout.
const UNKNOWN_SETTING: &str = "\u{0}unknown";

/// How long pgmux waits to bring an abandoned server connection back to
/// idle (finish the query, roll back) before closing it instead.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How a relay stretch ended.
enum Relayed {
    /// Transaction boundary: the server connection is clean and idle.
    Released,
    /// A batch answered inside a transaction that may span shards: the
    /// connection stays with the transaction.
    Batch,
    /// Terminate or EOF from the client.
    ClientGone,
    /// The server connection broke.
    ServerGone(String),
    /// The client broke the protocol.
    ClientError(PgError),
    /// A query outlived `query_timeout`.
    QueryTimeout,
}

enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Timeout,
}

pub struct Session {
    stream: ClientStream,
    rbuf: BytesMut,
    pool: Arc<Pool>,
    mode: PoolMode,
    /// Settings this client chose (startup packet, then its own SETs).
    wanted: BTreeMap<String, String>,
    /// The startup packet's settings: what DISCARD ALL returns to.
    startup: BTreeMap<String, String>,
    /// Protocol-level prepared statements are tracked (transaction mode).
    track: bool,
    stmts: ClientStatements,
    tracker: Tracker,
    /// SET/RESETs sent, waiting for the server to confirm them.
    pending_settings: Vec<sqlhead::SettingChange>,
    settings_failed: bool,
    /// Read routing to replicas, when the database (or the current shard)
    /// has it.
    routing: Option<Arc<Routing>>,
    /// The shards of a sharded database.
    sharding: Option<Arc<crate::shard::ShardRouter>>,
    /// The shard whose pools `pool` and `routing` are (sharded databases).
    shard_at: usize,
    /// Directory keys looked up for the current transaction.
    resolved: crate::shard::Resolved,
    /// Client messages left in the buffer for after the current batch.
    held: bool,
    /// When this client's last writing transaction ended.
    last_write: Option<Instant>,
    /// A BEGIN answered by pgmux, waiting for the first statement.
    deferred: Option<route::Deferred>,
    /// A transaction that may span shards, with its parts.
    multi: Option<multi::Multi>,
    /// The client keeps its server connection (session state pgmux cannot
    /// replay: LISTEN, temporary tables, session advisory locks, ...).
    pinned: bool,
    /// A read on a replica: the client bytes sent so far, while no byte of
    /// the answer reached the client (None: no retry possible).
    replay: Option<route::Replay>,
    /// ParameterStatus values this client has been told.
    told: BTreeMap<String, String>,
    cancel: Arc<CancelSlot>,
    crelay: Relay,
    srelay: Relay,
    flight: Flight,
    account: account::Account,
    /// This client's entry in the client list.
    client: Option<Arc<crate::clients::ClientInfo>>,
    /// Turns true when pgmux shuts down.
    draining: Option<tokio::sync::watch::Receiver<bool>>,
    /// Follows config reloads.
    refresh: Option<life::Refresh>,
}

impl Session {
    pub fn new(
        stream: ClientStream,
        rbuf: BytesMut,
        pool: Arc<Pool>,
        wanted: BTreeMap<String, String>,
        cancel: Arc<CancelSlot>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let track = pool.settings.mode == PoolMode::Transaction && pool.settings.max_prepared_statements > 0;
        Session {
            stream,
            rbuf,
            mode: pool.settings.mode,
            track,
            stmts: ClientStatements::new(pool.settings.max_client_prepared_statements),
            tracker: Tracker::default(),
            pending_settings: Vec::new(),
            settings_failed: false,
            routing: None,
            sharding: None,
            shard_at: 0,
            resolved: Default::default(),
            held: false,
            last_write: None,
            deferred: None,
            multi: None,
            pinned: false,
            replay: None,
            startup: wanted.clone(),
            pool,
            wanted,
            told: BTreeMap::new(),
            cancel,
            crelay: Relay::default(),
            srelay: Relay::default(),
            flight: Flight::new(),
            account: account::Account::new(metrics),
            client: None,
            draining: None,
            refresh: None,
        }
    }

    /// Tell the client an error and drop the connection.
    pub async fn fatal(stream: &mut ClientStream, err: &PgError) {
        let _ = stream.write_all(&err.to_bytes()).await;
        let _ = stream.shutdown().await;
    }

    /// Route reads of this session by `routing` (None: all to the primary).
    pub fn set_routing(&mut self, routing: Option<Arc<Routing>>) {
        self.routing = routing;
    }

    /// Route statements over the shards of a sharded database.
    pub fn set_sharding(&mut self, sharding: Arc<crate::shard::ShardRouter>) {
        self.sharding = Some(sharding);
    }

    /// Refuse the session with an error.
    pub async fn close_with(mut self, err: &PgError) {
        Self::fatal(&mut self.stream, err).await
    }

    /// Serve the client until it leaves.
    pub async fn run(mut self) {
        self.serve_until_killed().await;
        self.leave_multi().await;
    }

    async fn serve(&mut self) {
        loop {
            if self.must_leave() {
                return self.goodbye().await;
            }
            // Idle: no server connection until a whole message is here (a
            // routed extended-protocol batch: up to its Execute/Sync/Flush).
            loop {
                match peek_header(&self.rbuf, MAX_MESSAGE_LEN) {
                    Ok(Some((_, len))) if self.rbuf.len() >= HEADER_LEN + len && !self.batch_incomplete() => break,
                    Ok(Some((_, len))) if self.rbuf.len() >= HEADER_LEN + len => self.rbuf.reserve(8192),
                    // Grow with what arrives, not with what the header
                    // announces: a client cannot make pgmux allocate memory
                    // it has not sent.
                    Ok(Some((_, len))) => self.rbuf.reserve((HEADER_LEN + len - self.rbuf.len()).min(1 << 16)),
                    // Nothing buffered: read_idle waits without a buffer.
                    Ok(None) => {}
                    Err(e) => return Self::fatal(&mut self.stream, &frame_error(e)).await,
                }
                match self.read_idle().await {
                    None => return self.goodbye().await,
                    Some(Ok(0) | Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
            if self.rbuf[0] == b'X' {
                return;
            }
            // A reload since the last transaction: this one uses its pools.
            if let Err(e) = self.follow_reload() {
                return Self::fatal(&mut self.stream, &e).await;
            }
            if matches!(self.rbuf[0], b'd' | b'c' | b'f') {
                // COPY traffic after the COPY ended (it failed): PostgreSQL
                // ignores it outside COPY mode, so does pgmux.
                if let Ok(Some((_, len))) = peek_header(&self.rbuf, MAX_MESSAGE_LEN) {
                    self.rbuf.advance(HEADER_LEN + len);
                }
                continue;
            }
            if self.track && self.rbuf[0] == b'P' {
                let pool = &self.pool;
                if let Some((n, reply)) =
                    prepared::answer_parse_batch(&self.rbuf, &mut self.stmts, |h| pool.knows_statement(h))
                {
                    self.rbuf.advance(n);
                    self.pool.metrics.prepared_hits.inc();
                    if self.stream.write_all(&reply).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
            if let Err(e) = self.resolve_directory().await {
                if !self.refuse(&e).await {
                    return;
                }
                continue;
            }
            let (target, decision) = match self.plan() {
                route::Plan::Go { target, decision } => (target, decision),
                other => {
                    if !self.carry_out(other).await {
                        return;
                    }
                    continue;
                }
            };
            self.set_state(crate::clients::ClientState::Waiting);
            let checked = match self.sharding.clone() {
                Some(sh) if self.multi.is_some() => self.shard_conn(&sh, self.shard_at, false).await.map(|c| (c, None)),
                _ => self.checkout(target, decision).await,
            };
            let (mut server, replica) = match checked {
                Ok(s) => s,
                Err(e) if e.severity == Severity::Error => {
                    if !self.refuse(&e).await {
                        return;
                    }
                    continue;
                }
                Err(e) => return Self::fatal(&mut self.stream, &e).await,
            };
            if let Err(e) = self.begin_deferred(&mut server).await {
                let err = PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("server connection lost: {e}"));
                return Self::fatal(&mut self.stream, &err).await;
            }
            self.replay = replica.map(|_| route::Replay::default());
            self.set_state(crate::clients::ClientState::Active);
            self.account.start(server.pool());
            let outcome = self.relay(server.conn()).await;
            self.cancel.clear();
            let replay = self.replay.take();
            match outcome {
                Relayed::Released => {
                    if replica.is_none() && matches!(decision, Decision::Write | Decision::Begin) {
                        // Read-your-writes: later reads wait for replicas
                        // to replay past this point.
                        self.last_write = Some(Instant::now());
                    }
                    server.release();
                    self.set_state(crate::clients::ClientState::Idle);
                    if self.multi.is_some() {
                        // One part ended by a statement of its own: the
                        // others cannot be committed with it.
                        tracing::warn!(
                            "a transaction spanning shards ended on one shard only; rolling back the others"
                        );
                        let _ = self.finish_multi(false).await;
                    }
                }
                Relayed::Batch => self.rejoin(self.shard_at, server, self.flight.status),
                Relayed::ServerGone(why) if replay.is_some() && replica.is_some() => {
                    // Nothing of the answer reached the client: ban the
                    // replica and run the read elsewhere.
                    if let (Some(r), Some(i), Some(replay)) = (&self.routing, replica, replay) {
                        tracing::info!(pool = %server.pool().name(), "read retried elsewhere: {why}");
                        r.monitor.ban(i, &why);
                        server.pool().close_idle();
                        drop(server);
                        self.restore(replay);
                    }
                }
                Relayed::ClientGone => return self.abandon(server).await,
                Relayed::QueryTimeout => {
                    let (addr, pid, secret) = server.conn().cancel_key();
                    tracing::warn!(pool = %server.pool().name(), "query_timeout: canceling the query, closing its client");
                    tokio::spawn(async move { crate::server::send_cancel(&addr, pid, secret).await });
                    drop(server);
                    let err =
                        PgError::fatal(sqlstate::QUERY_CANCELED, "canceling statement due to query_timeout (pgmux)");
                    return Self::fatal(&mut self.stream, &err).await;
                }
                Relayed::ServerGone(why) => {
                    tracing::warn!(pool = %self.pool.name(), "server connection lost mid-transaction: {why}");
                    drop(server);
                    let err = PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("server connection lost: {why}"));
                    return Self::fatal(&mut self.stream, &err).await;
                }
                Relayed::ClientError(err) => {
                    let _ = self.stream.write_all(&err.to_bytes()).await;
                    return self.abandon(server).await;
                }
            }
        }
    }

    fn releasable(&self, conn: &ServerConn) -> bool {
        self.flight.idle()
            && !self.crelay.mid_message()
            && !self.srelay.mid_message()
            && conn.rbuf.is_empty()
            && self.tracker.idle()
    }

    async fn relay(&mut self, conn: &mut ServerConn) -> Relayed {
        if let Some(end) = self.forward_client(conn).await {
            return end;
        }
        loop {
            if self.mode == PoolMode::Transaction && !self.pinned && self.releasable(conn) {
                return Relayed::Released;
            }
            if self.answered_in_transaction(conn) {
                return Relayed::Batch;
            }
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(16 * 1024);
            }
            let deadline = match (self.pool.settings.query_timeout, self.account.query_started()) {
                (Some(limit), Some(sent)) if !self.flight.copy_in => Some(tokio::time::Instant::from_std(sent + limit)),
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
                Event::Server(Ok(0)) => return Relayed::ServerGone("server closed the connection unexpectedly".into()),
                Event::Server(Err(e)) => return Relayed::ServerGone(e.to_string()),
                Event::Server(Ok(_)) => match self.forward_server(conn).await {
                    // A batch held back: send it once this one is answered,
                    // unless the transaction ended (it is routed anew).
                    None if self.held
                        && !self.cross()
                        && self.flight.pending == 0
                        && !self.flight.copy_in
                        && (self.flight.status != b'I' || self.pinned) =>
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
        self.held = false;
        let outstanding = self.flight.pending > 0 && !self.flight.unsynced && !self.flight.copy_in;
        let mut guard = self.shard_guard();
        let flight = &mut self.flight;
        let mut stop: Option<Relayed> = None;
        let track = self.track;
        let tracker = &mut self.tracker;
        let mut cx = Ctx::new(&mut self.stmts, &mut conn.prepared, self.pool.settings.max_prepared_statements);
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
            let flow = match (track, veto) {
                (true, Some(err)) => tracker.refuse(tag, body, &mut cx, err),
                (true, None) => tracker.on_client(tag, body, &mut cx),
                (false, _) => Flow::Forward,
            };
            flight.client(tag, flow != Flow::Drop);
            if slow_log && matches!(tag, b'Q' | b'P') {
                statement = Some(account::statement_text(tag, body));
            }
            if txn_mode && matches!(tag, b'Q' | b'P') && flow != Flow::Drop {
                // Parse: statement name, then the query text.
                let mut parts = body.split(|b| *b == 0);
                let sql = if tag == b'P' { parts.nth(1) } else { parts.next() }.unwrap_or_default();
                let sql = String::from_utf8_lossy(sql);
                changes.extend(sqlhead::setting_changes(&sql));
                full_reset |= sqlhead::needs_full_reset(&sql);
                pin |= sqlhead::pins_session(&sql);
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
        if !out.is_empty() {
            if let Err(e) = conn.stream.write_all(out).await {
                return Some(Relayed::ServerGone(e.to_string()));
            }
            self.account.sent(out.len(), self.flight.pending);
        }
        if let Some(replay) = &mut self.replay {
            if replay.sent.len() + scan.consumed > REPLAY_LIMIT {
                self.replay = None;
            } else {
                replay.sent.extend_from_slice(&self.rbuf[..scan.consumed]);
                replay.names.extend(named);
            }
        }
        self.rbuf.advance(scan.consumed);
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
            if let Some(why) = route::fatal_first(&conn.rbuf) {
                // A replica shutting down: its goodbye is not the answer.
                return Some(Relayed::ServerGone(why));
            }
        }
        let flight = &mut self.flight;
        let mut changed: Vec<(usize, usize)> = Vec::new();
        let mut discarded = false;
        let mut learned = Vec::new();
        let base = conn.rbuf.as_ptr() as usize;
        let track = self.track;
        let tracker = &mut self.tracker;
        let mut cx = Ctx::new(&mut self.stmts, &mut conn.prepared, self.pool.settings.max_prepared_statements);
        let txn_mode = self.mode == PoolMode::Transaction;
        let watch_settings = !self.pending_settings.is_empty();
        let mut settle: Vec<(u8, u8)> = Vec::new();
        let needs_body = |t: u8| {
            if track {
                t != b'D' && t != b'd'
            } else {
                t == b'Z' || t == b'S' || t == b'E' || (txn_mode && t == b'C')
            }
        };
        let (mut readies, mut idle) = (0u64, 0u64);
        let account = &self.account;
        let scanned = self.srelay.scan(&conn.rbuf, MAX_MESSAGE_LEN, needs_body, |tag, body| {
            flight.server(tag, body);
            match tag {
                b'Z' => {
                    readies += 1;
                    idle += u64::from(body.first() == Some(&b'I'));
                }
                b'E' => account.error(crate::metrics::error_code(body).unwrap_or("XX000")),
                _ => {}
            }
            if tag == b'S' {
                changed.push((body.as_ptr() as usize - base, body.len()));
            }
            if watch_settings {
                match tag {
                    b'E' => settle.push((b'E', 0)),
                    b'C' if body == b"ROLLBACK\0" => settle.push((b'R', 0)),
                    b'Z' => settle.push((b'Z', body.first().copied().unwrap_or(b'I'))),
                    _ => {}
                }
            }
            if !track {
                return Flow::Forward;
            }
            let (flow, event) = tracker.on_server(tag, body, needs_body(tag), &mut cx);
            match event {
                prepared::Event::DiscardAll => discarded = true,
                prepared::Event::Prepared(h) => learned.push(h),
                prepared::Event::Skipped(n) => flight.pending = flight.pending.saturating_sub(n),
                prepared::Event::None => {}
            }
            flow
        });
        let scan = match scanned {
            Ok(scan) => scan,
            Err(e) => return Some(Relayed::ServerGone(format!("invalid message from server: {e}"))),
        };
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
                    self.wanted.insert(lk.clone(), v.clone());
                    self.told.insert(lk, v);
                }
            }
        }
        let out = scan.rewritten.as_deref().unwrap_or(&conn.rbuf[..scan.consumed]);
        if !out.is_empty() {
            self.replay = None;
        }
        self.account.answered(out.len(), readies, idle, self.flight.pending);
        let sent = out.is_empty() || self.stream.write_all(out).await.is_ok();
        conn.rbuf.advance(scan.consumed);
        if !sent {
            return Some(Relayed::ClientGone);
        }
        None
    }
}

fn frame_error(e: FrameError) -> PgError {
    PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("invalid message from client: {e}"))
}

/// What a client sees when no server connection could be had; with
/// `keep`, a failed connect is an ERROR and the session goes on.
pub fn pool_error(e: PoolError, keep: bool) -> PgError {
    let severity = if keep { Severity::Error } else { Severity::Fatal };
    match e {
        PoolError::WaitTimeout(_) => PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
        PoolError::Server(ServerError::Rejected(body)) if keep => PgError::error_from_server(&body),
        PoolError::Server(ServerError::Rejected(body)) => PgError::fatal_from_server(&body),
        PoolError::Server(e) => PgError::new(severity, sqlstate::CONNECTION_FAILURE, format!("pgmux: {e}")),
        PoolError::Closed => PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "pgmux is shutting down"),
    }
}
