//! The clients connected now, for `SHOW CLIENTS` and `KILL`, and the log
//! line of each connection's open and close.
//!
//! A session updates its own state (idle, waiting for a server connection,
//! active on one) with one atomic store; the registry is locked only when a
//! client comes, goes, or is listed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

/// What a client is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientState {
    Idle = 0,
    Waiting = 1,
    Active = 2,
}

impl ClientState {
    pub fn name(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// One connected client.
pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub since: SystemTime,
    started: Instant,
    state: AtomicU8,
    kill: Notify,
    /// The session's wait for its client's next bytes, woken at shutdown
    /// (a session between transactions then leaves).
    nudge: AtomicWaker,
}

impl ClientInfo {
    pub fn set(&self, state: ClientState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// Ask the session to end (KILL).
    pub fn kill(&self) {
        self.kill.notify_one();
    }

    /// Wake the session if it waits for its client (pgmux is shutting
    /// down: it leaves if it is between transactions).
    pub fn nudge(&self) {
        self.nudge.wake();
    }

    /// The session waits for its client with this waker (see
    /// [`ClientInfo::nudge`]).
    pub fn wait_nudge(&self, waker: &std::task::Waker) {
        self.nudge.register(waker);
    }

    /// Resolves once [`ClientInfo::kill`] was called.
    pub async fn killed(&self) {
        self.kill.notified().await
    }
}

#[derive(Default)]
pub struct Clients {
    map: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
    next: AtomicU64,
}

/// A registered client; dropping it unregisters it and logs the close.
pub struct Registered<'a> {
    clients: &'a Clients,
    pub info: Arc<ClientInfo>,
}

impl Clients {
    /// Register a logged-in client (and log it).
    pub fn register(&self, addr: SocketAddr, user: &str, database: &str, application_name: &str) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            addr,
            user: user.to_string(),
            database: database.to_string(),
            application_name: application_name.to_string(),
            since: SystemTime::now(),
            started: Instant::now(),
            state: AtomicU8::new(ClientState::Idle as u8),
            kill: Notify::new(),
            nudge: AtomicWaker::new(),
        });
        tracing::info!(client = id, %addr, user, database, application_name, "client connected");
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(id, info.clone());
        Registered { clients: self, info }
    }

    /// Wake every session that waits for its client (shutdown).
    pub fn nudge_all(&self) {
        for c in self.map.lock().unwrap_or_else(|e| e.into_inner()).values() {
            c.nudge();
        }
    }

    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.clients.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.info.id);
        let i = &self.info;
        let secs = i.started.elapsed().as_secs_f64();
        tracing::info!(client = i.id, addr = %i.addr, user = %i.user, database = %i.database, duration_s = secs, "client disconnected");
    }
}
