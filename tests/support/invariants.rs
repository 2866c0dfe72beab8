//! A workload that checks pgmux's invariants while a fault test breaks
//! things around it. Each session loops: a write (it must run on a server
//! not in recovery: never on a replica), a read of its own writes (never
//! older than the last write that succeeded on the same connection:
//! read-your-writes is per session, and a new connection is a new one),
//! and a statement that must start a transaction of its own (never inside
//! one another client left open). Operations may fail during an outage —
//! they are counted — but an invariant broken is the test's failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::{connect_str, text};

/// What the sessions did.
#[derive(Debug, Default)]
pub struct Tally {
    pub writes: u64,
    pub reads: u64,
    pub failed: u64,
    /// Sessions that ended (pgmux closed them) and were opened again.
    pub reconnects: u64,
}

pub struct Checker {
    stop: Arc<AtomicBool>,
    sessions: Vec<JoinHandle<Result<Tally, String>>>,
}

/// The table the sessions write to (create it on the primary first).
pub const TABLE: &str = "CREATE TABLE invariants (s int, n int)";

fn value(m: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    m.iter().find_map(|x| match x {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

async fn session(url: String, s: usize, stop: Arc<AtomicBool>) -> Result<Tally, String> {
    let mut tally = Tally::default();
    let started = std::time::Instant::now();
    let mut client = None;
    let (mut seq, mut written) = (0, 0);
    // The last few events, for the failure message.
    let mut log = std::collections::VecDeque::new();
    let note = |log: &mut std::collections::VecDeque<String>, what: String| {
        if log.len() == 8 {
            log.pop_front();
        }
        log.push_back(format!("{:?} {what}", started.elapsed()));
    };
    while !stop.load(Ordering::SeqCst) {
        let c = match &client {
            Some(c) => c,
            None => match connect_str(&url).await {
                Ok(c) => {
                    // A new session: read-your-writes starts over.
                    if seq > 0 {
                        tally.reconnects += 1;
                        note(&mut log, "reconnected".into());
                    }
                    written = 0;
                    client.insert(c)
                }
                Err(_) => {
                    tally.failed += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        seq += 1;
        let write = format!("INSERT INTO invariants VALUES ({s}, {seq}) RETURNING pg_is_in_recovery()::text");
        match c.simple_query(&write).await {
            Ok(m) if value(&m).as_deref() == Some("false") => {
                written = seq;
                note(&mut log, format!("write {seq} ok"));
                tally.writes += 1;
            }
            Ok(m) => return Err(format!("session {s}: a write ran on a server in recovery: {m:?}")),
            Err(e) => {
                note(&mut log, format!("write {seq} failed: {}", text(&e)));
                tally.failed += 1
            }
        }
        match c.simple_query(&format!("SELECT coalesce(max(n), 0) FROM invariants WHERE s = {s}")).await {
            Ok(m) => {
                let n: i64 = value(&m).and_then(|v| v.parse().ok()).unwrap_or(-1);
                if n < written {
                    let tail = Vec::from(log).join("\n");
                    return Err(format!("session {s}: stale read: saw {n} after writing {written}\n{tail}"));
                }
                tally.reads += 1;
            }
            Err(e) => {
                note(&mut log, format!("read failed: {}", text(&e)));
                tally.failed += 1
            }
        }
        match c.simple_query("SELECT (now() = statement_timestamp())::text").await {
            Ok(m) if value(&m).as_deref() == Some("true") => {}
            Ok(m) => return Err(format!("session {s}: ran inside a transaction it did not start: {m:?}")),
            Err(e) => {
                note(&mut log, format!("check failed: {}", text(&e)));
                tally.failed += 1;
            }
        }
        if client.as_ref().is_some_and(|c| c.is_closed()) {
            client = None;
        }
    }
    Ok(tally)
}

impl Checker {
    /// Start `n` sessions against the connection string `url`.
    pub fn start(url: &str, n: usize) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = (0..n).map(|s| tokio::spawn(session(url.to_string(), s, stop.clone()))).collect();
        Checker { stop, sessions }
    }

    /// Stop the sessions; panics on a broken invariant.
    pub async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Tally::default();
        for s in self.sessions {
            let t = s.await.expect("a checker session panicked").unwrap_or_else(|e| panic!("invariant broken: {e}"));
            all.writes += t.writes;
            all.reads += t.reads;
            all.failed += t.failed;
            all.reconnects += t.reconnects;
        }
        all
    }
}
