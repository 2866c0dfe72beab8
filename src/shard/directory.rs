//! The key directory of a `directory` shard map: a table `(map, key,
//! shard)` in PostgreSQL on a configured backend, shared by every pgmux.
//!
//! - Lookups are cached in a bounded LRU (absent keys too). A trigger on
//!   the table notifies `pgmux_directory` on every change; a listener task
//!   per directory drops the changed keys from the cache (and the whole
//!   cache whenever it reconnects, as notifications may have been missed).
//! - A key first seen on INSERT is assigned to the least-loaded shard (key
//!   count per shard divided by its weight) with `INSERT ... ON CONFLICT DO
//!   NOTHING RETURNING`: two pgmux instances racing on a new key agree on
//!   the row that won.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

/// How long a lookup of a key being moved waits before it fails.
const MOVE_WAIT: Duration = Duration::from_secs(30);

/// The notification channel of every directory table.
pub const CHANNEL: &str = "pgmux_directory";

/// Where a directory lives and what it maps to.
#[derive(Clone, Debug)]
pub struct DirectoryConfig {
    pub map: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
    pub table: String,
    /// Shard names in shard order, with their weights for new keys.
    pub shards: Vec<(String, u32)>,
    pub cache_size: usize,
    pub connect_timeout: Duration,
    /// TLS to its server (`server_tls_mode`).
    pub tls: Arc<crate::protocol::tls::ServerTls>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("shard directory {0}: {1}")]
    Unavailable(String, String),
    #[error("shard directory {0}: key {1} is on unknown shard {2:?}")]
    UnknownShard(String, String, String),
}

/// One directory (one map).
pub struct Directory {
    cfg: DirectoryConfig,
    /// key → shard index (None: known to be absent).
    cache: Mutex<LruCache<String, Option<usize>>>,
    /// Bumped by every invalidation: a lookup that raced one is not cached.
    generation: AtomicU64,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    listener: Mutex<Option<JoinHandle<()>>>,
    listening: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Directory {
    /// Start the directory's listener on the current tokio runtime.
    pub fn start(cfg: DirectoryConfig) -> Arc<Directory> {
        let cap = NonZeroUsize::new(cfg.cache_size).unwrap_or(NonZeroUsize::MIN);
        let dir = Arc::new(Directory {
            cfg,
            cache: Mutex::new(LruCache::new(cap)),
            generation: AtomicU64::new(0),
            client: tokio::sync::Mutex::new(None),
            listener: Mutex::new(None),
            listening: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        });
        let task = tokio::spawn(listen(Arc::downgrade(&dir)));
        *dir.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        dir
    }

    pub fn map(&self) -> &str {
        &self.cfg.map
    }

    /// The cached shard of `key`: `Some(None)` when it is known to be absent.
    /// Nothing is cached until the listener runs (invalidations would be
    /// missed otherwise).
    pub fn cached(&self, key: &str) -> Option<Option<usize>> {
        let found = match self.listening.load(Ordering::SeqCst) {
            true => self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(key).copied(),
            false => None,
        };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Cache lookups so far: (hits, misses).
    pub fn cache_counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    fn invalidate(&self, key: Option<&str>) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match key {
            Some(k) => {
                cache.pop(k);
            }
            None => cache.clear(),
        }
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> DirectoryError {
        DirectoryError::Unavailable(self.cfg.map.clone(), e.to_string())
    }

    fn config(&self) -> tokio_postgres::Config {
        let c = &self.cfg;
        let mut pg = tokio_postgres::Config::new();
        pg.host(&c.host).port(c.port).user(&c.user).password(&c.password).dbname(&c.dbname);
        pg.application_name("pgmux-directory").connect_timeout(c.connect_timeout);
        pg
    }

    /// The shard of `key`, from the cache or the table; with `assign`, a
    /// key not in the table is given the least-loaded shard first.
    pub async fn lookup(&self, key: &str, assign: bool) -> Result<Option<usize>, DirectoryError> {
        if let Some(hit) = self.cached(key).filter(|hit| hit.is_some() || !assign) {
            return Ok(hit);
        }
        // A key being moved (`pgmux shard move`) waits until it has moved.
        let deadline = tokio::time::Instant::now() + MOVE_WAIT;
        loop {
            match self.lookup_once(key, assign).await? {
                Some(found) => return Ok(found),
                None if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                None => {
                    return Err(self.unavailable(format!("key {key} is being moved to another shard; try again")));
                }
            }
        }
    }

    /// The directory's connection (made, and the table set up, if needed).
    async fn connected(&self) -> Result<tokio::sync::MutexGuard<'_, Option<tokio_postgres::Client>>, DirectoryError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let config = self.config();
            let connect = tokio::time::timeout(self.cfg.connect_timeout, self.cfg.tls.pg_connect(&config, None));
            let (client, _conn) =
                connect.await.map_err(|_| self.unavailable("connect timed out"))?.map_err(|e| self.unavailable(e))?;
            setup(&client, &self.cfg.table).await.map_err(|e| self.unavailable(e))?;
            *guard = Some(client);
        }
        Ok(guard)
    }

    /// Per shard name: its keys, and how many of them are being moved.
    pub async fn key_counts(&self) -> Result<HashMap<String, (i64, i64)>, DirectoryError> {
        let guard = self.connected().await?;
        let client = guard.as_ref().ok_or_else(|| self.unavailable("no connection"))?;
        let sql = format!(
            "SELECT shard, count(*), count(*) FILTER (WHERE moving) FROM {} WHERE map = $1 GROUP BY shard",
            self.cfg.table
        );
        let rows = client.query(&sql, &[&self.cfg.map]).await.map_err(|e| self.unavailable(e))?;
        Ok(rows.iter().map(|r| (r.get::<_, String>(0), (r.get::<_, i64>(1), r.get::<_, i64>(2)))).collect())
    }

    /// One lookup: `None` while the key is being moved.
    async fn lookup_once(&self, key: &str, assign: bool) -> Result<Option<Option<usize>>, DirectoryError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let guard = self.connected().await?;
        let client = guard.as_ref().ok_or_else(|| self.unavailable("no connection"))?;
        let t = &self.cfg.table;
        let mut shard: Option<String> = None;
        if assign {
            let names: Vec<&str> = self.cfg.shards.iter().map(|s| s.0.as_str()).collect();
            let weights: Vec<i32> = self.cfg.shards.iter().map(|s| s.1.min(i32::MAX as u32) as i32).collect();
            let sql = format!(
                "WITH counts AS (SELECT s.shard, s.weight, \
                   (SELECT count(*) FROM {t} d WHERE d.map = $1 AND d.shard = s.shard) AS n \
                   FROM unnest($3::text[], $4::int[]) AS s(shard, weight) WHERE s.weight > 0), \
                 pick AS (SELECT shard FROM counts ORDER BY n::float8 / weight, shard LIMIT 1) \
                 INSERT INTO {t} (map, key, shard) SELECT $1, $2, shard FROM pick \
                 ON CONFLICT (map, key) DO NOTHING RETURNING shard"
            );
            let rows =
                client.query(&sql, &[&self.cfg.map, &key, &names, &weights]).await.map_err(|e| self.unavailable(e))?;
            shard = rows.first().map(|r| r.get::<_, String>(0));
        }
        if shard.is_none() {
            let sql = format!("SELECT shard, moving FROM {t} WHERE map = $1 AND key = $2");
            let rows = client.query(&sql, &[&self.cfg.map, &key]).await.map_err(|e| self.unavailable(e))?;
            if rows.first().is_some_and(|r| r.get::<_, bool>(1)) {
                return Ok(None);
            }
            shard = rows.first().map(|r| r.get::<_, String>(0));
        }
        drop(guard);
        let index =
            match &shard {
                None => None,
                Some(name) => Some(self.cfg.shards.iter().position(|s| s.0 == *name).ok_or_else(|| {
                    DirectoryError::UnknownShard(self.cfg.map.clone(), key.to_string(), name.clone())
                })?),
            };
        if self.generation.load(Ordering::SeqCst) == generation {
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).put(key.to_string(), index);
        }
        Ok(Some(index))
    }

    /// Stop listening (idempotent).
    pub fn stop(&self) {
        if let Some(task) = self.listener.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        self.listening.store(false, Ordering::SeqCst);
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Create the table, its index and the notifying trigger if missing.
async fn setup(client: &tokio_postgres::Client, table: &str) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7426157);
             CREATE TABLE IF NOT EXISTS {table} (map text NOT NULL, key text NOT NULL, shard text NOT NULL,
                 PRIMARY KEY (map, key));
             ALTER TABLE {table} ADD COLUMN IF NOT EXISTS moving boolean NOT NULL DEFAULT false;
             CREATE INDEX IF NOT EXISTS {table}_shard ON {table} (map, shard);
             CREATE OR REPLACE FUNCTION {table}_notify() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
               IF TG_OP = 'DELETE' THEN
                 PERFORM pg_notify('{CHANNEL}', OLD.map || E'\\t' || OLD.key);
               ELSE
                 PERFORM pg_notify('{CHANNEL}', NEW.map || E'\\t' || NEW.key);
                 IF TG_OP = 'UPDATE' THEN
                   PERFORM pg_notify('{CHANNEL}', OLD.map || E'\\t' || OLD.key);
                 END IF;
               END IF;
               RETURN NULL;
             END $f$;
             DROP TRIGGER IF EXISTS {table}_notify ON {table};
             CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION {table}_notify();
             COMMIT;"
        ))
        .await
}

/// Keep a LISTEN connection; drop changed keys from the cache.
async fn listen(dir: std::sync::Weak<Directory>) {
    loop {
        let Some(d) = dir.upgrade() else { return };
        let config = d.config();
        let timeout = d.cfg.connect_timeout;
        let table = d.cfg.table.clone();
        let tls = d.cfg.tls.clone();
        drop(d);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let connected = tokio::time::timeout(timeout, tls.pg_connect(&config, Some(tx))).await;
        let (client, pump) = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!("shard directory listener: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let ready = async {
            setup(&client, &table).await?;
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await
        };
        if let Err(e) = ready.await {
            tracing::warn!("shard directory listener: {e}");
            pump.abort();
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if let Some(d) = dir.upgrade() {
            // Anything may have changed while nobody listened.
            d.invalidate(None);
            d.listening.store(true, Ordering::SeqCst);
        }
        while let Some(msg) = rx.recv().await {
            let AsyncMessage::Notification(n) = msg else { continue };
            let Some(d) = dir.upgrade() else { return };
            if let Some((map, key)) = n.payload().split_once('\t') {
                if map == d.cfg.map {
                    d.invalidate(Some(key));
                }
            }
        }
        pump.abort();
        if let Some(d) = dir.upgrade() {
            d.listening.store(false, Ordering::SeqCst);
            d.invalidate(None);
        }
        drop(client);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
