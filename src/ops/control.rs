//! What an operator does to a running pgmux (the admin console's
//! commands, signals): pause and resume databases, kill or reconnect
//! them, ban replicas, and shut down gracefully.

use std::time::Duration;

use crate::backend::pool::Pool;
use crate::frontend::registry::ClientState;
use crate::proxy::Proxy;

/// Whether pool `key` (a backend group: `db`, `db/shard`, `db#replica1`,
/// `db/shard#replica1`) belongs to database `db`.
fn of_database(key: &str, db: &str) -> bool {
    key.strip_prefix(db).is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('#'))
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no database \"{0}\"")]
    NoDatabase(String),
    #[error("no replica \"{0}\" (SHOW REPLICAS lists them)")]
    NoReplica(String),
    #[error("timed out after {0:?} waiting for transactions to finish")]
    Timeout(Duration),
}

impl Proxy {
    fn check_database(&self, db: Option<&str>) -> Result<(), ControlError> {
        match db {
            Some(d) if !self.config().databases.contains_key(d) => Err(ControlError::NoDatabase(d.to_string())),
            _ => Ok(()),
        }
    }

    /// The pools of database `db` (None: all).
    pub fn pools_of(&self, db: Option<&str>) -> Vec<std::sync::Arc<Pool>> {
        self.pools.all().into_iter().filter(|p| db.is_none_or(|d| of_database(&p.database, d))).collect()
    }

    /// Whether pool `key`'s database is paused.
    pub(crate) fn is_paused(&self, key: &str) -> bool {
        let paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        paused.iter().any(|d| d == "*" || of_database(key, d))
    }

    /// PAUSE: hold new transactions of `db` (None: every database), then
    /// wait up to `wait` for those running to finish.
    pub async fn pause(&self, db: Option<&str>, wait: Duration) -> Result<(), ControlError> {
        self.check_database(db)?;
        self.paused.lock().unwrap_or_else(|e| e.into_inner()).insert(db.unwrap_or("*").to_string());
        let pools = self.pools_of(db);
        for p in &pools {
            p.pause(true);
        }
        let deadline = tokio::time::Instant::now() + wait;
        while pools.iter().any(|p| p.in_use() > 0) {
            if tokio::time::Instant::now() >= deadline {
                return Err(ControlError::Timeout(wait));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// RESUME: let held transactions of `db` (None: all) go on.
    pub fn resume(&self, db: Option<&str>) -> Result<(), ControlError> {
        self.check_database(db)?;
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        match db {
            Some(d) => paused.remove(d),
            None => {
                paused.clear();
                true
            }
        };
        let all = paused.contains("*");
        drop(paused);
        for p in self.pools_of(db) {
            if !all && !self.is_paused(&p.database) {
                p.pause(false);
            }
        }
        Ok(())
    }

    /// KILL: drop every client of `db` and its server connections.
    pub fn kill(&self, db: &str) -> Result<usize, ControlError> {
        self.check_database(Some(db))?;
        let clients: Vec<_> = self.sessions.all().into_iter().filter(|c| c.database == db).collect();
        for c in &clients {
            c.kill();
        }
        for p in self.pools_of(Some(db)) {
            p.reconnect();
        }
        Ok(clients.len())
    }

    /// RECONNECT: replace the server connections of `db` (None: all),
    /// idle ones now and the others when their transaction ends.
    pub fn reconnect(&self, db: Option<&str>) -> Result<(), ControlError> {
        self.check_database(db)?;
        for p in self.pools_of(db) {
            p.reconnect();
        }
        Ok(())
    }

    /// BAN / UNBAN a replica by its name in SHOW REPLICAS.
    pub fn ban(&self, replica: &str, on: bool) -> Result<(), ControlError> {
        for (_, m) in self.monitors() {
            if m.hold(replica, on) {
                return Ok(());
            }
        }
        Err(ControlError::NoReplica(replica.to_string()))
    }

    /// Begin a graceful shutdown: stop accepting clients; sessions end at
    /// their next transaction boundary.
    pub fn request_shutdown(&self) {
        self.draining.send_replace(true);
        // Idle sessions wait on their sockets only: wake them to leave.
        self.sessions.nudge_all();
    }

    /// Resolves when a shutdown was requested.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Shut down: stop accepting, wait up to `timeout` for the clients to
    /// finish their transactions and leave, then kill the rest.
    pub async fn drain(&self, timeout: Duration) {
        self.request_shutdown();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.sessions.all();
            if left.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let busy = left.iter().filter(|c| c.state() != ClientState::Idle).count();
                tracing::warn!(clients = left.len(), busy, "shutdown timeout: closing the remaining clients");
                self.kill_all().await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// End every client session now (waiting up to a second for them to
    /// say goodbye).
    pub async fn kill_all(&self) {
        for c in self.sessions.all() {
            c.kill();
        }
        for _ in 0..50 {
            if self.sessions.all().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::of_database;

    #[test]
    fn pools_belong_to_their_database() {
        assert!(of_database("shop", "shop"));
        assert!(of_database("shop/s0", "shop"));
        assert!(of_database("shop#replica1", "shop"));
        assert!(of_database("shop/s0#replica2", "shop"));
        assert!(!of_database("shopping", "shop"));
        assert!(!of_database("sho", "shop"));
    }
}
