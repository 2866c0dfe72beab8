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

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::backend::pool::{Pool, PoolError};
use crate::backend::server::ServerError;
use crate::config::PoolMode;
use crate::frontend::cancel::CancelSlot;
use crate::protocol::error::{sqlstate, PgError, Severity};
use crate::protocol::frame::{peek_header, FrameError, Relay, HEADER_LEN, MAX_MESSAGE_LEN};
use crate::protocol::prepared::{self, ClientStatements};
use crate::protocol::tls::ClientStream;
use crate::protocol::tracker::Tracker;
use crate::router::route::{Decision, Routing};
use crate::sql::effects;

mod abandon;
mod account;
mod copy;
mod life;
mod lost;
mod multi;
mod relay;
mod route;
mod scatter;
mod settings;
mod shard;
mod welcome;

/// Client bytes kept for a retry (or a clean refusal) after a lost
/// server connection, at most.
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
    ServerGone(lost::Lost),
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
    pending_settings: Vec<effects::SettingChange>,
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
    /// The client bytes sent so far, while no byte of the answer reached
    /// the client (None: a lost server connection ends the session).
    replay: Option<route::Replay>,
    /// ParameterStatus values this client has been told (the server's
    /// spelling).
    told: BTreeMap<String, String>,
    cancel: Arc<CancelSlot>,
    /// The pid of the BackendKeyData this client was given.
    key_pid: i32,
    /// Session mode: the server connection checked out at login, whose
    /// pid is the client's key, until its first transaction takes it.
    reserved: Option<crate::backend::pool::Checkout>,
    crelay: Relay,
    srelay: Relay,

    account: account::Account,
    /// This client's entry in the client list.
    client: Option<Arc<crate::frontend::registry::ClientInfo>>,
    /// Turns true when pgmux shuts down.
    draining: Option<tokio::sync::watch::Receiver<bool>>,
    /// Follows config reloads.
    refresh: Option<Box<life::Refresh>>,
}

impl Session {
    pub fn new(
        stream: ClientStream,
        rbuf: BytesMut,
        pool: Arc<Pool>,
        wanted: BTreeMap<String, String>,
        metrics: Arc<crate::ops::metrics::Metrics>,
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
            cancel: Arc::default(),
            key_pid: 0,
            reserved: None,
            crelay: Relay::default(),
            srelay: Relay::default(),
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
    /// (By reference: a future owning the session would hold it twice.)
    pub async fn run(&mut self) {
        self.serve_until_killed().await;
        if let Some(server) = self.reserved.take() {
            // Taken at login and never used: as clean as it came.
            server.release();
        }
        self.leave_multi().await;
    }

    async fn serve(&mut self) {
        // A read whose server connection died before answering runs again,
        // once: a statement that kills its server is not run forever.
        let mut retrying = false;
        loop {
            if self.must_leave() {
                return self.goodbye().await;
            }
            // Idle: no server connection until a whole message is here (a
            // routed extended-protocol batch: up to its Execute/Sync/Flush);
            // in session mode the one reserved at login waits for it.
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
                let ctx = prepared::naming_context(&self.wanted);
                let known = |h| pool.knows_statement(prepared::identity(h, ctx));
                if let Some((n, reply)) = prepared::answer_parse_batch(&self.rbuf, &mut self.stmts, known) {
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
            // This batch is the re-run of one that died: it gets no other.
            let may_retry = !std::mem::take(&mut retrying);
            self.set_state(crate::frontend::registry::ClientState::Waiting);
            let checked = match self.sharding.clone() {
                Some(sh) if self.multi.is_some() => {
                    Box::pin(self.shard_conn(&sh, self.shard_at, false)).await.map(|c| (c, None))
                }
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
            let deferred = self.deferred.is_some();
            if let Err(e) = self.begin_deferred(&mut server).await {
                let err = PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("server connection lost: {e}"));
                return Self::fatal(&mut self.stream, &err).await;
            }
            // Until a byte of the answer reaches the client, a lost server
            // costs it this batch only: a replica read runs elsewhere,
            // anything else is answered with an error and the session
            // goes on (the client is idle: transaction mode, no open
            // transaction pgmux holds for it).
            let kept = self.mode == PoolMode::Transaction && !self.pinned && self.multi.is_none() && !deferred;
            self.replay = (replica.is_some() || kept).then(route::Replay::default);
            self.set_state(crate::frontend::registry::ClientState::Active);
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
                    self.set_state(crate::frontend::registry::ClientState::Idle);
                    if self.multi.is_some() {
                        // One part ended by a statement of its own: the
                        // others cannot be committed with it.
                        tracing::warn!(
                            "a transaction spanning shards ended on one shard only; rolling back the others"
                        );
                        let _ = Box::pin(self.finish_multi(false)).await;
                    }
                }
                Relayed::Batch => self.rejoin(self.shard_at, server, self.tracker.flight.status),
                Relayed::ServerGone(lost::Lost { why, .. }) if replay.is_some() && replica.is_none() => {
                    tracing::warn!(pool = %server.pool().name(), "server connection lost before an answer: {why}");
                    drop(server);
                    if let Some(replay) = replay {
                        if decision == Decision::Read && may_retry {
                            retrying = true;
                            self.restore(replay);
                        } else if !Box::pin(self.lost_before_answer(replay, &why)).await {
                            return;
                        }
                    }
                }
                Relayed::ServerGone(lost::Lost { why, .. }) if replay.is_some() && replica.is_some() => {
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
                Relayed::ClientGone => return Box::pin(self.abandon(server)).await,
                Relayed::QueryTimeout => {
                    let (addr, pid, secret) = server.conn().cancel_key();
                    tracing::warn!(pool = %server.pool().name(), "query_timeout: canceling the query, closing its client");
                    tokio::spawn(async move { crate::backend::server::send_cancel(&addr, pid, secret).await });
                    drop(server);
                    let err =
                        PgError::fatal(sqlstate::QUERY_CANCELED, "canceling statement due to query_timeout (pgmux)");
                    return Self::fatal(&mut self.stream, &err).await;
                }
                Relayed::ServerGone(lost::Lost { why, .. }) if kept && self.keeps_session() => {
                    tracing::warn!(pool = %server.pool().name(), "server connection lost mid-answer: {why}");
                    drop(server);
                    if !Box::pin(self.lost_mid_answer(&why)).await {
                        return;
                    }
                }
                Relayed::ServerGone(lost) => {
                    tracing::warn!(pool = %self.pool.name(), "server connection lost mid-transaction: {}", lost.why);
                    drop(server);
                    return match lost.client_error() {
                        Some(err) => Self::fatal(&mut self.stream, &err).await,
                        None => {
                            let _ = self.stream.shutdown().await;
                        }
                    };
                }
                Relayed::ClientError(err) => {
                    let _ = self.stream.write_all(&err.to_bytes()).await;
                    return Box::pin(self.abandon(server)).await;
                }
            }
        }
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
