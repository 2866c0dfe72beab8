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

/// Read routing of one (database, user).
pub struct Routing {
    pub replicas: Vec<Arc<Pool>>,
    pub monitor: Arc<Monitor>,
    pub classifier: Arc<Classifier>,
    next: AtomicUsize,
    /// Read-or-not by statement shape (literals blanked): simple-protocol
    /// queries that differ only in their values are classified once.
    shapes: Mutex<LruCache<String, bool>>,
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

    /// Whether the transaction starting with the whole message `msg` (tag,
    /// length, body) only reads: a simple query, a Parse, or a Bind of a
    /// named statement, classified (with hints) by its SQL.
    pub fn is_read(&self, msg: &[u8], stmts: &ClientStatements) -> bool {
        let Some((&tag, rest)) = msg.split_first() else { return false };
        let body = rest.get(4..).unwrap_or_default();
        let sql: &[u8] = match tag {
            b'Q' => cstr(body).0,
            b'P' => cstr(cstr(body).1).0,
            b'B' => {
                let stmt = cstr(cstr(body).1).0;
                match std::str::from_utf8(stmt).ok().and_then(|n| Statement::lookup(stmts, n)) {
                    Some(s) => return self.sql_is_read(s.query()),
                    None => return false,
                }
            }
            _ => return false,
        };
        self.sql_is_read(sql)
    }

    fn sql_is_read(&self, sql: &[u8]) -> bool {
        let Ok(sql) = std::str::from_utf8(sql) else { return false };
        // EXPLAIN (ANALYZE 0|1) is the one place a literal decides.
        if sql.as_bytes().windows(7).any(|w| w.eq_ignore_ascii_case(b"explain")) {
            return self.classify_read(sql);
        }
        let shape = crate::sqlhead::literal_shape(sql);
        if let Some(read) = self.shapes.lock().ok().and_then(|mut c| c.get(&shape).copied()) {
            return read;
        }
        let read = self.classify_read(sql);
        if let Ok(mut c) = self.shapes.lock() {
            c.put(shape, read);
        }
        read
    }

    fn classify_read(&self, sql: &str) -> bool {
        match self.classifier.classify(sql) {
            Ok(c) => match c.hint {
                Some(Hint::Primary) => false,
                Some(Hint::Replica) => true,
                _ => matches!(c.kind, Kind::Read | Kind::BeginReadOnly),
            },
            Err(_) => false,
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
