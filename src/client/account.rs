//! What a session counts, for `/metrics` and `SHOW STATS`: queries
//! (ReadyForQuery answers) and their latency, transactions (answers that
//! end idle) and theirs, bytes each way, errors by SQLSTATE class, the
//! prepared statement cache — on the handles of the pool whose connection
//! the session holds.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::prepared::CacheEvents;

pub(super) struct Account {
    pub metrics: Arc<Metrics>,
    /// The pool of the connection held now.
    pool: Option<Arc<Pool>>,
    /// When the oldest unanswered query was sent.
    query_started: Option<Instant>,
    /// When the current transaction began (its connection's checkout, or
    /// the end of the previous one on it).
    xact_started: Instant,
    /// Queries slower than this are logged (`log_slow_queries`).
    slow: Option<Duration>,
    /// The text of the last statement sent (when slow queries are logged).
    sql: Option<String>,
}

/// How much of a statement's text a slow-query line shows.
const STATEMENT_LOG_LEN: usize = 200;

/// A Query's or Parse's statement text, truncated for the log (never its
/// parameters: they travel in Bind messages, which are not read here).
pub(super) fn statement_text(tag: u8, body: &[u8]) -> String {
    let mut parts = body.split(|b| *b == 0);
    let sql = if tag == b'P' { parts.nth(1) } else { parts.next() }.unwrap_or_default();
    let sql = String::from_utf8_lossy(&sql[..sql.len().min(STATEMENT_LOG_LEN * 4)]);
    let mut text: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() > STATEMENT_LOG_LEN {
        text = text.chars().take(STATEMENT_LOG_LEN).collect::<String>() + "...";
    }
    text
}

impl Account {
    pub fn new(metrics: Arc<Metrics>) -> Account {
        Account { metrics, pool: None, query_started: None, xact_started: Instant::now(), slow: None, sql: None }
    }

    /// Log queries slower than `threshold` (zero: none).
    pub fn log_slow(&mut self, threshold: Duration) {
        self.slow = (!threshold.is_zero()).then_some(threshold);
    }

    /// When the oldest query still unanswered was sent.
    pub fn query_started(&self) -> Option<Instant> {
        self.query_started
    }

    pub fn slow_log(&self) -> bool {
        self.slow.is_some()
    }

    /// The statement just sent.
    pub fn statement(&mut self, sql: String) {
        self.sql = Some(sql);
    }

    /// A connection of `pool` is this session's now.
    pub fn start(&mut self, pool: &Arc<Pool>) {
        self.pool = Some(pool.clone());
        self.query_started = None;
        self.xact_started = Instant::now();
    }

    /// `bytes` went to the server; `pending` answers are awaited.
    pub fn sent(&mut self, bytes: usize, pending: usize) {
        if let Some(p) = &self.pool {
            p.metrics.sent.inc_by(bytes as u64);
            p.stats.sent.fetch_add(bytes as u64, Relaxed);
        }
        if pending > 0 && self.query_started.is_none() {
            self.query_started = Some(Instant::now());
        }
    }

    /// `bytes` came back, with `readies` ReadyForQuery (`idle` of them
    /// ending a transaction); `pending` answers are still awaited.
    pub fn answered(&mut self, bytes: usize, readies: u64, idle: u64, pending: usize) {
        let Some(p) = &self.pool else { return };
        let (m, s) = (&p.metrics, &p.stats);
        m.received.inc_by(bytes as u64);
        s.received.fetch_add(bytes as u64, Relaxed);
        if readies == 0 {
            return;
        }
        let now = Instant::now();
        m.queries.inc_by(readies);
        s.queries.fetch_add(readies, Relaxed);
        if let Some(t) = self.query_started {
            m.query_seconds.observe((now - t).as_secs_f64());
            s.query_us.fetch_add((now - t).as_micros() as u64, Relaxed);
            if self.slow.is_some_and(|limit| now - t >= limit) {
                tracing::warn!(
                    duration_ms = (now - t).as_millis() as u64,
                    database = %p.database,
                    user = %p.user,
                    statement = self.sql.as_deref().unwrap_or("?"),
                    "slow query"
                );
            }
        }
        self.query_started = (pending > 0).then_some(now);
        if idle > 0 {
            m.xacts.inc_by(idle);
            s.xacts.fetch_add(idle, Relaxed);
            m.xact_seconds.observe((now - self.xact_started).as_secs_f64());
            s.xact_us.fetch_add((now - self.xact_started).as_micros() as u64, Relaxed);
            self.xact_started = now;
        }
    }

    pub fn prepared(&self, e: &CacheEvents, pool: &Pool) {
        let m = &pool.metrics;
        for (counter, n) in [
            (&m.prepared_hits, e.hits),
            (&m.prepared_misses, e.misses),
            (&m.prepared_evictions, e.evictions),
            (&m.prepared_stale, e.stale.len() as u64),
            (&m.prepared_reruns, e.reruns),
        ] {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }

    /// A statement run across the shards of `database` (route `scatter`)
    /// since `started`; `ends`: it ended its transaction.
    pub fn scatter(&self, database: &str, started: Instant, ends: bool) {
        let m = self.metrics.pool("scatter", database);
        m.queries.inc();
        let took = started.elapsed().as_secs_f64();
        m.query_seconds.observe(took);
        if ends {
            m.xacts.inc();
            m.xact_seconds.observe(took);
        }
    }

    /// An error sent to the client.
    pub fn error(&self, sqlstate: &str) {
        self.metrics.error(sqlstate);
    }
}
