//! One client session after login: the relay between the client socket and
//! the server connection it holds, and the pooling decisions. [`serve`] is
//! its state machine (idle, a batch, checking out, relaying, the end of a
//! relay stretch; what an attached stretch keeps — pinned, the bytes to
//! replay — is its [`relay::Stretch`], gone with it); between batches the
//! session holds at most one transaction of pgmux's own ([`Txn`]: a
//! deferred BEGIN, or a transaction across shards). The other files are
//! what those steps call: `route.rs`
//! (where a batch goes), `relay.rs` (the byte relay), `settings.rs`,
//! `shard.rs` / `guard.rs` / `pipeline.rs` / `spread.rs` / `multi.rs` / `scatter.rs` / `write.rs` / `rekey.rs` /
//! `copy.rs` / `ids.rs` (sharding),
//! `lost.rs` / `abandon.rs` (a lost server, a departed client),
//! `welcome.rs`, `life.rs` (login to goodbye), `account.rs` (counting).
//!
//! Frames are relayed as bytes. The session looks at tags only, plus the
//! bodies of ReadyForQuery (transaction status) and ParameterStatus
//! (tracked settings). In transaction mode the server connection goes back
//! to the pool when every Query/Sync sent has been answered by a
//! ReadyForQuery and the last one says idle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::backend::pool::{Pool, PoolError};
use crate::backend::server::ServerError;
use crate::config::PoolMode;
use crate::frontend::cancel::CancelSlot;
use crate::protocol::error::{sqlstate, PgError, Severity};
use crate::protocol::frame::{FrameError, Relay};
use crate::protocol::prepared::ClientStatements;
use crate::protocol::settings::Settings;
use crate::protocol::tls::ClientStream;
use crate::protocol::tracker::Tracker;
use crate::router::route::Routing;
use crate::sql::effects;

mod abandon;
mod account;
mod copy;
mod guard;
mod ids;
mod life;
mod lost;
mod multi;
mod pipeline;
mod rekey;
mod relay;
mod route;
mod scatter;
mod serve;
mod settings;
mod shard;
mod spread;
mod welcome;
mod write;

pub use life::Refresh;

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
    /// The server connection broke. (Boxed, as the client's error: rare,
    /// and every step of an idle session has room for the largest.)
    ServerGone(Box<lost::Lost>),
    /// The client broke the protocol.
    ClientError(Box<PgError>),
    /// A query outlived `query_timeout`.
    QueryTimeout,
}

enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Timeout,
}

/// A transaction pgmux holds open for the client between its batches
/// (transaction mode): one at a time, and the session says which.
enum Txn {
    /// None: the next batch is routed afresh (and between batches the
    /// session may follow a reload or leave at shutdown).
    None,
    /// A BEGIN answered by pgmux, waiting for the first statement to say
    /// where the transaction runs.
    Deferred(route::Deferred),
    /// A transaction that may span shards, with its parts.
    AcrossShards(Box<multi::Multi>),
}

pub struct Session {
    stream: ClientStream,
    rbuf: BytesMut,
    pool: Arc<Pool>,
    mode: PoolMode,
    /// Settings this client chose (startup packet, then its own SETs).
    wanted: Settings,
    /// The startup packet's settings: what DISCARD ALL returns to.
    startup: Settings,
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
    /// When this client's last writing transaction ended.
    last_write: Option<Instant>,
    /// The transaction pgmux holds open for the client between batches.
    txn: Txn,
    /// ParameterStatus values this client has been told (the server's
    /// spelling).
    told: Settings,
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
    /// No transaction pgmux holds open for the client.
    fn between_transactions(&self) -> bool {
        matches!(self.txn, Txn::None)
    }

    /// The BEGIN pgmux answered, when the transaction waits for its first
    /// statement.
    fn deferred(&self) -> Option<&route::Deferred> {
        match &self.txn {
            Txn::Deferred(d) => Some(d),
            _ => None,
        }
    }

    fn deferred_mut(&mut self) -> Option<&mut route::Deferred> {
        match &mut self.txn {
            Txn::Deferred(d) => Some(d),
            _ => None,
        }
    }

    /// The deferred BEGIN, now to be sent (the session holds no other).
    fn take_deferred(&mut self) -> Option<route::Deferred> {
        match std::mem::replace(&mut self.txn, Txn::None) {
            Txn::Deferred(d) => Some(d),
            other => {
                self.txn = other;
                None
            }
        }
    }

    /// The transaction spanning shards, when there is one.
    fn multi(&self) -> Option<&multi::Multi> {
        match &self.txn {
            Txn::AcrossShards(m) => Some(m),
            _ => None,
        }
    }

    fn multi_mut(&mut self) -> Option<&mut multi::Multi> {
        match &mut self.txn {
            Txn::AcrossShards(m) => Some(m),
            _ => None,
        }
    }

    /// The transaction spanning shards, to end now.
    fn take_multi(&mut self) -> Option<Box<multi::Multi>> {
        match std::mem::replace(&mut self.txn, Txn::None) {
            Txn::AcrossShards(m) => Some(m),
            other => {
                self.txn = other;
                None
            }
        }
    }
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
        // Clients that log in alike share their settings (until one sets).
        let wanted = pool.interned.intern(wanted.into());
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
            last_write: None,
            txn: Txn::None,
            startup: wanted.clone(),
            pool,
            wanted,
            told: Settings::default(),
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
    pub async fn close_with(&mut self, err: &PgError) {
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
        // Boxed, as every rare step: a session's future is as large as
        // its largest state, for as long as the client stays.
        Box::pin(self.leave_multi()).await;
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

#[cfg(test)]
mod size_tests {
    /// Every idle client holds a Session: what only an attached stretch
    /// needs lives in the stretch (see `relay::Stretch`), not here.
    #[test]
    fn an_idle_session_stays_small() {
        let session = std::mem::size_of::<super::Session>();
        let tracker = std::mem::size_of::<crate::protocol::tracker::Tracker>();
        eprintln!("Session {session} B, of which Tracker {tracker} B");
        assert!(session <= 800, "Session grew to {session} bytes (800 before)");
    }
}
