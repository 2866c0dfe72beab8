//! Where a transaction goes: the primary, or a replica that is healthy,
//! within the lag bounds, and — read-your-writes — known to have replayed
//! the client's last write. Decided once per transaction, from its first
//! message, before a server connection is checked out.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lru::LruCache;

use crate::pool::Pool;
use crate::replicas::monitor::Monitor;
use crate::router::classify::{Classifier, Hint, Kind};
use crate::statements::{ClientStatements, Statement};

/// What a transaction does, judged by its first statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Only reads: a replica may serve it.
    Read,
    /// Primary, but changes no data (session settings, COMMIT, hinted read).
    Other,
    /// Primary, and may write: read-your-writes applies afterwards.
    Write,
}

/// Read routing of one (database, user).
pub struct Routing {
    pub replicas: Vec<Arc<Pool>>,
    pub monitor: Arc<Monitor>,
    pub classifier: Arc<Classifier>,
    next: AtomicUsize,
    /// Read-or-not by statement shape (literals blanked): simple-protocol
    /// queries that differ only in their values are classified once.
    shapes: Mutex<LruCache<String, Decision>>,
}

/// Statement shapes remembered per (database, user).
const SHAPES: usize = 10_000;

fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

impl Routing {
    pub fn new(replicas: Vec<Arc<Pool>>, monitor: Arc<Monitor>, classifier: Arc<Classifier>) -> Self {
        let cap = NonZeroUsize::new(SHAPES).unwrap_or(NonZeroUsize::MIN);
        Routing { replicas, monitor, classifier, next: AtomicUsize::new(0), shapes: Mutex::new(LruCache::new(cap)) }
    }

    /// What the transaction starting with the whole message `msg` (tag,
    /// length, body) does: a simple query, a Parse, or a Bind of a named
    /// statement, classified (with hints) by its SQL; anything else may
    /// write.
    pub fn decide(&self, msg: &[u8], stmts: &ClientStatements) -> Decision {
        let Some((&tag, rest)) = msg.split_first() else { return Decision::Write };
        let body = rest.get(4..).unwrap_or_default();
        let sql: &[u8] = match tag {
            b'Q' => cstr(body).0,
            b'P' => cstr(cstr(body).1).0,
            b'B' => {
                let stmt = cstr(cstr(body).1).0;
                match std::str::from_utf8(stmt).ok().and_then(|n| Statement::lookup(stmts, n)) {
                    Some(s) => return self.decide_sql(s.query()),
                    None => return Decision::Write,
                }
            }
            _ => return Decision::Write,
        };
        self.decide_sql(sql)
    }

    fn decide_sql(&self, sql: &[u8]) -> Decision {
        let Ok(sql) = std::str::from_utf8(sql) else { return Decision::Write };
        // EXPLAIN (ANALYZE 0|1) is the one place a literal decides.
        if crate::sqlhead::mentions(sql, b"explain") {
            return self.classify(sql);
        }
        let shape = crate::sqlhead::literal_shape(sql);
        if let Some(d) = self.shapes.lock().ok().and_then(|mut c| c.get(&shape).copied()) {
            return d;
        }
        let d = self.classify(sql);
        if let Ok(mut c) = self.shapes.lock() {
            c.put(shape, d);
        }
        d
    }

    fn classify(&self, sql: &str) -> Decision {
        let Ok(c) = self.classifier.classify(sql) else { return Decision::Write };
        let reads = matches!(c.kind, Kind::Read | Kind::BeginReadOnly);
        match (c.hint, &c.kind) {
            (Some(Hint::Replica), _) => Decision::Read,
            (Some(Hint::Primary), _) if reads => Decision::Other,
            (_, Kind::SessionState(_) | Kind::SetLocal | Kind::TxnEnd) => Decision::Other,
            (_, _) if reads => Decision::Read,
            _ => Decision::Write,
        }
    }

    /// A replica for a read, round robin among the eligible ones; `None`
    /// means the primary. After a write (`last_write`), only replicas that
    /// have replayed the primary's WAL as sampled after that write qualify
    /// — no extra round trip, the monitor's samples suffice.
    pub fn replica_for_read(&self, last_write: Option<Instant>) -> Option<usize> {
        let mut eligible = self.monitor.eligible_replicas();
        if let Some(written) = last_write {
            let primary = self.monitor.primary();
            match (primary.sampled_at, primary.current_lsn) {
                (Some(at), Some(lsn)) if at > written => {
                    let caught_up = self.monitor.replicas_at(lsn);
                    eligible.retain(|i| caught_up.contains(i));
                }
                _ => return None,
            }
        }
        if eligible.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % eligible.len();
        Some(eligible[i])
    }
}
