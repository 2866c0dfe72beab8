//! Server connection pools, one per (database, user).
//!
//! A pool is a LIFO stack of idle connections guarded by a FIFO semaphore
//! with `pool_size` permits: a checkout holds a permit, so at most
//! `pool_size` connections are ever in use or being opened, and waiters are
//! served in arrival order. A janitor closes connections idle past
//! `server_idle_timeout` or older than `server_lifetime`, and keeps
//! `min_pool_size` open.
//!
//! A [`Checkout`] dropped without [`Checkout::release`] closes its
//! connection: a connection in an unknown state is never reused.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::server::{Login, ServerConn, ServerError};
use crate::config::{HostPort, PoolSettings};
use crate::protocol::settings::Interner;
use crate::protocol::statements::Invalidations;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// Most statement hashes a pool remembers as known-good.
pub const KNOWN_STATEMENTS: usize = 100_000;

/// Most (parameter, client value) spellings a pool remembers.
pub const KNOWN_SPELLINGS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("query_wait_timeout: no server connection became available within {0:?}")]
    WaitTimeout(Duration),
    #[error("pool is closed")]
    Closed,
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Counters for SHOW POOLS / SHOW STATS.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub checkouts: AtomicU64,
    pub connects: AtomicU64,
    pub waiting: AtomicUsize,
    /// Connections being opened now.
    pub connecting: AtomicUsize,
    pub queries: AtomicU64,
    pub xacts: AtomicU64,
    /// Bytes from clients to servers, and back.
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Time in queries and transactions, in µs.
    pub query_us: AtomicU64,
    pub xact_us: AtomicU64,
    /// Time spent waiting for a connection, in µs.
    pub wait_us: AtomicU64,
    /// When each client waiting now started to (by arrival number).
    waiters: Mutex<std::collections::BTreeMap<u64, Instant>>,
    arrivals: AtomicU64,
}

/// A client waiting for a connection, counted while it waits (also when
/// it gives up or goes away).
struct Waiting<'a> {
    stats: &'a PoolStats,
    me: u64,
    started: Instant,
}

impl<'a> Waiting<'a> {
    fn new(stats: &'a PoolStats) -> Self {
        let started = Instant::now();
        let me = stats.arrivals.fetch_add(1, Ordering::Relaxed);
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        stats.waiters.lock().unwrap_or_else(|e| e.into_inner()).insert(me, started);
        Waiting { stats, me, started }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.stats.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.me);
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PoolStats {
    /// How long the longest-waiting client has waited.
    pub fn max_wait(&self) -> Duration {
        let w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        w.values().next().map(Instant::elapsed).unwrap_or_default()
    }
}

pub struct Pool {
    pub database: String,
    pub user: String,
    pub settings: PoolSettings,
    pub addr: HostPort,
    login: Mutex<Login>,
    /// Boxed: a connection (its TLS state inline) is large, and moves in
    /// and out of the pool on every transaction.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    /// The session settings its clients logged in with, shared.
    pub interned: Interner,
    permits: Arc<Semaphore>,
    /// Open connections (idle + checked out + connecting).
    total: AtomicUsize,
    /// ParameterStatus values of the last login, for client welcomes.
    welcome: Mutex<Option<Vec<(String, String)>>>,
    /// The server's spelling of a reported parameter's value as a client
    /// wrote it in its startup packet: (lowercase name, client value) →
    /// what the server reports (`utf8` → `UTF8`).
    spellings: Mutex<HashMap<(String, String), String>>,
    /// Identities of statements some server of this pool prepared
    /// successfully, as of an epoch of `invalidations`.
    known: Mutex<(u64, HashSet<u64>)>,
    /// The statement invalidations of the database this pool's servers
    /// hold (shared with the other pools on it; see
    /// [`crate::backend::pools::Pools::invalidations`]).
    invalidations: std::sync::OnceLock<Arc<Invalidations>>,
    pub stats: PoolStats,
    pub metrics: crate::ops::metrics::PoolMetrics,
    /// Open connections (for SHOW SERVERS), by id.
    servers: Mutex<std::collections::BTreeMap<u64, ServerInfo>>,
    /// Bumped by RECONNECT: older connections close instead of going idle.
    generation: AtomicU64,
    /// PAUSE: new checkouts wait while true.
    paused: tokio::sync::watch::Sender<bool>,
    /// Replaced by a reload: it keeps no connections.
    pub(super) retired: std::sync::atomic::AtomicBool,
    /// How connections ask for TLS.
    tls: Arc<crate::protocol::tls::ServerTls>,
}

/// One open server connection, as SHOW SERVERS lists it.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub id: u64,
    pub pid: i32,
    pub since: std::time::SystemTime,
}

/// A server connection lent to one client.
pub struct Checkout {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(
        database: String,
        user: String,
        addr: HostPort,
        settings: PoolSettings,
        login: Login,
        metrics: crate::ops::metrics::PoolMetrics,
        tls: Arc<crate::protocol::tls::ServerTls>,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            database,
            user,
            permits: Arc::new(Semaphore::new(settings.size)),
            settings,
            addr,
            login: Mutex::new(login),
            idle: Mutex::new(Vec::new()),
            interned: Interner::default(),
            total: AtomicUsize::new(0),
            welcome: Mutex::new(None),
            spellings: Mutex::new(HashMap::new()),
            known: Mutex::new((0, HashSet::new())),
            invalidations: std::sync::OnceLock::new(),
            stats: PoolStats::default(),
            metrics,
            servers: Mutex::new(Default::default()),
            generation: AtomicU64::new(0),
            paused: tokio::sync::watch::Sender::new(false),
            retired: std::sync::atomic::AtomicBool::new(false),
            tls,
        });
        tokio::spawn(janitor(Arc::downgrade(&pool)));
        pool
    }

    /// Let the pool log in with SCRAM keys recovered from a client login.
    pub fn learn_scram(&self, creds: crate::protocol::auth::ScramCredentials) {
        if let Ok(mut l) = self.login.lock() {
            if l.password.is_none() {
                l.scram = Some(creds);
            }
        }
    }

    /// Remember that a statement prepared fine (bounded: forgotten
    /// wholesale past [`KNOWN_STATEMENTS`]; it is only a shortcut).
    pub fn learn_statement(&self, ident: u64) {
        let epoch = self.invalidations().epoch();
        if let Ok(mut k) = self.known.lock() {
            if k.1.len() >= KNOWN_STATEMENTS || k.0 != epoch {
                *k = (epoch, HashSet::new());
            }
            k.1.insert(ident);
        }
    }

    /// Whether a statement prepared fine since the last invalidation.
    pub fn knows_statement(&self, ident: u64) -> bool {
        let epoch = self.invalidations().epoch();
        self.known.lock().map(|k| k.0 == epoch && k.1.contains(&ident)).unwrap_or(false)
    }

    /// Share the statement invalidations of the pool's database (once,
    /// right after the pool is made).
    pub fn share_invalidations(&self, log: Arc<Invalidations>) {
        let _ = self.invalidations.set(log);
    }

    /// The statement invalidations of this pool's database.
    pub fn invalidations(&self) -> &Invalidations {
        self.invalidations.get_or_init(Default::default)
    }

    /// The server's spelling of `value` for the reported parameter `name`
    /// (lowercase), when a server of this pool was asked before.
    pub fn spelling(&self, name: &str, value: &str) -> Option<String> {
        let s = self.spellings.lock().ok()?;
        s.get(&(name.to_string(), value.to_string())).cloned()
    }

    /// Remember a server's spelling of a client's value (bounded:
    /// forgotten wholesale past [`KNOWN_SPELLINGS`]).
    pub fn learn_spelling(&self, name: &str, value: &str, spelled: &str) {
        if let Ok(mut s) = self.spellings.lock() {
            if s.len() >= KNOWN_SPELLINGS {
                s.clear();
            }
            s.insert((name.to_string(), value.to_string()), spelled.to_string());
        }
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Connections lent to clients now.
    pub fn in_use(&self) -> usize {
        self.settings.size.saturating_sub(self.permits.available_permits())
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Wait (FIFO, up to `query_wait_timeout`) for a connection; while
    /// the pool is paused, for its resumption first.
    pub async fn get(self: &Arc<Self>) -> Result<Checkout, PoolError> {
        if *self.paused.borrow() {
            let waiting = Waiting::new(&self.stats);
            let mut rx = self.paused.subscribe();
            let resumed = tokio::time::timeout(self.settings.query_wait_timeout, rx.wait_for(|p| !*p)).await;
            drop(waiting);
            resumed
                .map_err(|_| PoolError::WaitTimeout(self.settings.query_wait_timeout))?
                .map_err(|_| PoolError::Closed)?;
        }
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => {
                self.metrics.wait_seconds.observe(0.0);
                p
            }
            Err(_) => {
                let waiting = Waiting::new(&self.stats);
                let r =
                    tokio::time::timeout(self.settings.query_wait_timeout, self.permits.clone().acquire_owned()).await;
                let waited = waiting.started.elapsed();
                drop(waiting);
                self.metrics.wait_seconds.observe(waited.as_secs_f64());
                self.stats.wait_us.fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
                r.map_err(|_| PoolError::WaitTimeout(self.settings.query_wait_timeout))?
                    .map_err(|_| PoolError::Closed)?
            }
        };
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        while let Some(mut conn) = self.pop_idle() {
            if conn.created.elapsed() < self.settings.lifetime && !conn.is_broken() {
                return Ok(Checkout { conn: Some(conn), pool: self.clone(), _permit: permit });
            }
            self.forget(conn);
        }
        // Boxed: a login's state (TLS, SCRAM) would otherwise make every
        // session's task larger, and a new connection is rare.
        let conn = Box::pin(self.connect()).await?;
        Ok(Checkout { conn: Some(conn), pool: self.clone(), _permit: permit })
    }

    fn pop_idle(&self) -> Option<Box<ServerConn>> {
        self.idle.lock().ok()?.pop()
    }

    async fn connect(&self) -> Result<Box<ServerConn>, ServerError> {
        let login = self.login.lock().map(|l| l.clone()).unwrap_or_default();
        let id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        self.stats.connecting.fetch_add(1, Ordering::Relaxed);
        let connected = ServerConn::connect(id, &self.addr, &login, self.settings.connect_timeout, &self.tls).await;
        self.stats.connecting.fetch_sub(1, Ordering::Relaxed);
        match connected {
            Ok(mut conn) => {
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                conn.generation = self.generation.load(Ordering::Relaxed);
                let info = ServerInfo { id, pid: conn.backend_pid, since: std::time::SystemTime::now() };
                self.servers.lock().unwrap_or_else(|e| e.into_inner()).insert(id, info);
                if let Ok(mut w) = self.welcome.lock() {
                    *w = Some(conn.reported.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
                }
                tracing::debug!(server = id, pid = conn.backend_pid, pool = %self.name(), "server connection opened");
                Ok(Box::new(conn))
            }
            Err(e) => {
                self.total.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(pool = %self.name(), error = %e, "server connection failed");
                Err(e)
            }
        }
    }

    /// ParameterStatus values to greet a client with; opens a connection the
    /// first time so that they are the server's real values.
    pub async fn welcome_params(self: &Arc<Self>) -> Result<Vec<(String, String)>, PoolError> {
        if let Some(w) = self.welcome.lock().ok().and_then(|w| w.clone()) {
            return Ok(w);
        }
        let c = self.get().await?;
        c.release();
        Ok(self.welcome.lock().ok().and_then(|w| w.clone()).unwrap_or_default())
    }

    fn forget(&self, conn: Box<ServerConn>) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        self.servers.lock().unwrap_or_else(|e| e.into_inner()).remove(&conn.id);
        tracing::debug!(server = conn.id, pool = %self.name(), "server connection closed");
        tokio::spawn(conn.terminate());
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.database, self.user)
    }

    /// Open connections, each with whether it is idle now.
    pub fn servers(&self) -> Vec<(ServerInfo, bool)> {
        let idle: HashSet<u64> = self.idle.lock().map(|v| v.iter().map(|c| c.id).collect()).unwrap_or_default();
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers.values().map(|s| (s.clone(), idle.contains(&s.id))).collect()
    }

    /// RECONNECT: close idle connections now, and the others when they
    /// are given back.
    pub fn reconnect(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.close_idle();
    }

    /// PAUSE (true) or RESUME (false) new checkouts.
    pub fn pause(&self, on: bool) {
        self.paused.send_replace(on);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Close every idle connection now (e.g. on shutdown).
    pub fn close_idle(&self) {
        let conns: Vec<_> = self.idle.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        for c in conns {
            self.forget(c);
        }
    }
}

impl Checkout {
    pub fn conn(&mut self) -> &mut ServerConn {
        // A checkout always holds a connection until release/drop.
        self.conn.as_mut().expect("checkout holds a connection")
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Give a clean, idle connection back for reuse.
    pub fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            // Unread server bytes mean a reply is still in flight: never
            // hand such a connection to another client. (A connection
            // that breaks from now on is found at its next checkout.)
            let stale = conn.generation != self.pool.generation.load(Ordering::Relaxed)
                || self.pool.retired.load(Ordering::Relaxed);
            // (A BEGIN of pgmux's own sent ahead and not settled: neither.)
            let clean = conn.rbuf.is_empty() && matches!(conn.ahead, crate::backend::server::Ahead::None);
            if stale || conn.created.elapsed() >= self.pool.settings.lifetime || !clean {
                self.pool.forget(conn);
                return;
            }
            conn.last_used = Instant::now();
            match self.pool.idle.lock() {
                Ok(mut idle) => idle.push(conn),
                Err(_) => self.pool.forget(conn),
            }
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.forget(conn);
        }
    }
}

async fn janitor(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.retired.load(Ordering::Relaxed) {
            pool.close_idle();
            return;
        }
        let s = &pool.settings;
        let expired: Vec<Box<ServerConn>> = match pool.idle.lock() {
            Ok(mut idle) => {
                let mut keep = Vec::with_capacity(idle.len());
                let mut out = Vec::new();
                let mut open = pool.total();
                // Oldest-used first: the stack bottom.
                for c in idle.drain(..) {
                    let too_old = c.created.elapsed() >= s.lifetime;
                    let too_idle = c.last_used.elapsed() >= s.idle_timeout && open > s.min_size;
                    if too_old || too_idle {
                        open -= 1;
                        out.push(c);
                    } else {
                        keep.push(c);
                    }
                }
                *idle = keep;
                out
            }
            Err(_) => return,
        };
        for c in expired {
            pool.forget(c);
        }
        while pool.total() < s.min_size {
            let Ok(permit) = pool.permits.clone().try_acquire_owned() else { break };
            match pool.connect().await {
                Ok(conn) => Checkout { conn: Some(conn), pool: pool.clone(), _permit: permit }.release(),
                Err(_) => break,
            }
        }
    }
}
