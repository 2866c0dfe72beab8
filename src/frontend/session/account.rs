//! What a session counts, for `/metrics` and `SHOW STATS`: queries
//! (ReadyForQuery answers) and their latency, transactions (answers that
//! end idle) and theirs, bytes each way, errors by SQLSTATE class, the
//! prepared statement cache — on the handles of the pool whose connection
//! the session holds.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::pool::Pool;
use crate::ops::metrics::Metrics;
use crate::protocol::tracker::CacheEvents;

pub(super) struct Account {
    pub metrics: Arc<Metrics>,
    /// The pool of the connection held now.
    pool: Option<Arc<Pool>>,
    /// When each unanswered query (Query, Sync) was sent, oldest first:
    /// a pipelined batch's answers can arrive in one read, each is timed.
    sent_at: VecDeque<Instant>,
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
pub(super) fn statement_text(sql: &[u8]) -> String {
    let sql = String::from_utf8_lossy(&sql[..sql.len().min(STATEMENT_LOG_LEN * 4)]);
    let mut text: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() > STATEMENT_LOG_LEN {
        text = text.chars().take(STATEMENT_LOG_LEN).collect::<String>() + "...";
    }
    text
}

impl Account {
    pub fn new(metrics: Arc<Metrics>) -> Account {
        Account { metrics, pool: None, sent_at: VecDeque::new(), xact_started: Instant::now(), slow: None, sql: None }
    }

    /// Log queries slower than `threshold` (zero: none).
    pub fn log_slow(&mut self, threshold: Duration) {
        self.slow = (!threshold.is_zero()).then_some(threshold);
    }

    /// When the oldest query still unanswered was sent.
    pub fn query_started(&self) -> Option<Instant> {
        self.sent_at.front().copied()
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
        self.sent_at.clear();
        self.xact_started = Instant::now();
    }

    /// `bytes` went to the server; `pending` answers are awaited.
    pub fn sent(&mut self, bytes: usize, pending: usize) {
        if let Some(p) = &self.pool {
            p.metrics.sent.inc_by(bytes as u64);
            p.stats.sent.fetch_add(bytes as u64, Relaxed);
        }
        if self.sent_at.len() < pending {
            let now = Instant::now();
            self.sent_at.resize(pending, now);
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
        for _ in 0..readies {
            let took = now - self.sent_at.pop_front().unwrap_or(now);
            m.query_seconds.observe(took.as_secs_f64());
            s.query_us.fetch_add(took.as_micros() as u64, Relaxed);
            if self.slow.is_some_and(|limit| took >= limit) {
                tracing::warn!(
                    duration_ms = took.as_millis() as u64,
                    database = %p.database,
                    user = %p.user,
                    statement = self.sql.as_deref().unwrap_or("?"),
                    "slow query"
                );
            }
        }
        // Answers pgmux itself consumed (a skipped Sync) are not awaited.
        while self.sent_at.len() > pending {
            self.sent_at.pop_front();
        }
        if idle > 0 {
            m.xacts.inc_by(idle);
            s.xacts.fetch_add(idle, Relaxed);
            // Transactions pipelined behind the first ended with it.
            let took = now - self.xact_started;
            m.xact_seconds.observe(took.as_secs_f64());
            for _ in 1..idle {
                m.xact_seconds.observe(0.0);
            }
            s.xact_us.fetch_add(took.as_micros() as u64, Relaxed);
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
            (&m.prepared_checks, e.checks),
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
