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

use crate::config::{HostPort, PoolSettings};
use crate::server::{Login, ServerConn, ServerError};

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// Most statement hashes a pool remembers as known-good.
pub const KNOWN_STATEMENTS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("query_wait_timeout: no server connection became available within {0:?}")]
    WaitTimeout(Duration),
    #[error("pool is closed")]
    Closed,
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Counters for SHOW POOLS / metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub checkouts: AtomicU64,
    pub connects: AtomicU64,
    pub waiting: AtomicUsize,
}

pub struct Pool {
    pub database: String,
    pub user: String,
    pub settings: PoolSettings,
    pub addr: HostPort,
    login: Mutex<Login>,
    idle: Mutex<Vec<ServerConn>>,
    permits: Arc<Semaphore>,
    /// Open connections (idle + checked out + connecting).
    total: AtomicUsize,
    /// ParameterStatus values of the last login, for client welcomes.
    welcome: Mutex<Option<Vec<(String, String)>>>,
    /// Hashes of statements some server of this pool prepared successfully.
    known: Mutex<HashSet<u64>>,
    pub stats: PoolStats,
}

/// A server connection lent to one client.
pub struct Checkout {
    conn: Option<ServerConn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(database: String, user: String, addr: HostPort, settings: PoolSettings, login: Login) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            database,
            user,
            permits: Arc::new(Semaphore::new(settings.size)),
            settings,
            addr,
            login: Mutex::new(login),
            idle: Mutex::new(Vec::new()),
            total: AtomicUsize::new(0),
            welcome: Mutex::new(None),
            known: Mutex::new(HashSet::new()),
            stats: PoolStats::default(),
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
    pub fn learn_statement(&self, hash: u64) {
        if let Ok(mut k) = self.known.lock() {
            if k.len() >= KNOWN_STATEMENTS {
                k.clear();
            }
            k.insert(hash);
        }
    }

    pub fn knows_statement(&self, hash: u64) -> bool {
        self.known.lock().map(|k| k.contains(&hash)).unwrap_or(false)
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

    /// Wait (FIFO, up to `query_wait_timeout`) for a connection.
    pub async fn get(self: &Arc<Self>) -> Result<Checkout, PoolError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                let r =
                    tokio::time::timeout(self.settings.query_wait_timeout, self.permits.clone().acquire_owned()).await;
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
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
        let conn = self.connect().await?;
        Ok(Checkout { conn: Some(conn), pool: self.clone(), _permit: permit })
    }

    fn pop_idle(&self) -> Option<ServerConn> {
        self.idle.lock().ok()?.pop()
    }

    async fn connect(&self) -> Result<ServerConn, ServerError> {
        let login = self.login.lock().map(|l| l.clone()).unwrap_or_default();
        let id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        match ServerConn::connect(id, &self.addr, &login, self.settings.connect_timeout).await {
            Ok(conn) => {
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut w) = self.welcome.lock() {
                    *w = Some(conn.reported.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
                }
                tracing::debug!(server = id, pid = conn.backend_pid, pool = %self.name(), "server connection opened");
                Ok(conn)
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

    fn forget(&self, conn: ServerConn) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(server = conn.id, pool = %self.name(), "server connection closed");
        tokio::spawn(conn.terminate());
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.database, self.user)
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
            // hand such a connection to another client.
            if conn.created.elapsed() >= self.pool.settings.lifetime || !conn.rbuf.is_empty() || conn.is_broken() {
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
        let s = &pool.settings;
        let expired: Vec<ServerConn> = match pool.idle.lock() {
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

/// All pools, created on first use.
#[derive(Default)]
pub struct Pools {
    map: Mutex<HashMap<(String, String), Arc<Pool>>>,
}

impl Pools {
    pub fn get_or_create(&self, database: &str, user: &str, make: impl FnOnce() -> Arc<Pool>) -> Arc<Pool> {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry((database.to_string(), user.to_string())).or_insert_with(make).clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.map.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }
}
