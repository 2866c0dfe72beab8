//! Where a transaction goes: the primary, or a replica that is healthy,
//! within the lag bounds, and — read-your-writes — known to have replayed
//! the client's last write. Decided once per transaction, from its first
//! messages, before a server connection is checked out.
//!
//! Writes go to the primary unless it is down or in recovery and a replica
//! was promoted (`follow_promotion`); a primary that reports it is in
//! recovery is never sent a write. Reads are spread over the candidates by
//! `load_balancing`, with the primary a candidate per `primary_reads`.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lru::LruCache;

use crate::backend::pool::Pool;
use crate::backend::replicas::monitor::Monitor;
use crate::config::{Database, LoadBalancing, PrimaryReads, ReadYourWrites, TransactionRouting};
use crate::protocol::error::{sqlstate, PgError};
use crate::protocol::messages::split_nul as cstr;
use crate::protocol::statements::{ClientStatements, Statement};
use crate::sql::classify::{Classifier, Hint, Kind, SessionKind};

/// What a transaction does, judged by its first statements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Only reads: a replica may serve it.
    Read,
    /// Primary, but changes no data (session settings, COMMIT, hinted read).
    Other,
    /// Primary, and may write: read-your-writes applies afterwards.
    Write,
    /// A lone `BEGIN` / `START TRANSACTION` (read-write): the primary, or
    /// deferred to its first statement (`transaction_routing`).
    Begin,
}

/// A backend of the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica(usize),
}

/// The routing choices of one database (`[databases.NAME]`).
#[derive(Clone, Debug)]
pub struct RouteOptions {
    pub balance: LoadBalancing,
    pub primary_reads: PrimaryReads,
    pub read_your_writes: ReadYourWrites,
    pub transaction_routing: TransactionRouting,
    pub follow_promotion: bool,
    /// Per replica, for `LoadBalancing::Weighted`.
    pub weights: Vec<u32>,
}

impl RouteOptions {
    pub fn of(db: &Database) -> Self {
        RouteOptions {
            balance: db.load_balancing,
            primary_reads: db.primary_reads,
            read_your_writes: db.read_your_writes,
            transaction_routing: db.transaction_routing,
            follow_promotion: db.follow_promotion,
            weights: db.replicas.iter().map(|r| r.weight).collect(),
        }
    }
}

/// Read routing of one (database, user).
pub struct Routing {
    pub name: String,
    pub primary: Arc<Pool>,
    pub replicas: Vec<Arc<Pool>>,
    pub monitor: Arc<Monitor>,
    pub classifier: Arc<Classifier>,
    pub options: RouteOptions,
    next: AtomicUsize,
    /// The promoted replica writes went to: kept while it is up and out of
    /// recovery, even if the old primary comes back (no split brain).
    followed: Mutex<Option<usize>>,
    /// Read-or-not by statement shape (literals blanked): simple-protocol
    /// queries that differ only in their values are classified once.
    shapes: Mutex<LruCache<String, Decision>>,
}

/// Statement shapes remembered per (database, user).
const SHAPES: usize = 10_000;

impl Routing {
    pub fn new(
        name: &str,
        primary: Arc<Pool>,
        replicas: Vec<Arc<Pool>>,
        monitor: Arc<Monitor>,
        classifier: Arc<Classifier>,
        options: RouteOptions,
    ) -> Self {
        let cap = NonZeroUsize::new(SHAPES).unwrap_or(NonZeroUsize::MIN);
        Routing {
            name: name.to_string(),
            primary,
            replicas,
            monitor,
            classifier,
            options,
            next: AtomicUsize::new(0),
            followed: Mutex::new(None),
            shapes: Mutex::new(LruCache::new(cap)),
        }
    }

    pub fn pool(&self, t: Target) -> &Arc<Pool> {
        match t {
            Target::Primary => &self.primary,
            Target::Replica(i) => self.replicas.get(i).unwrap_or(&self.primary),
        }
    }

    /// What the transaction starting with `msgs` (whole messages: tag,
    /// length, body) does. Every Query, Parse and Bind of a named statement
    /// up to the first Sync or Query counts: one that may write makes the
    /// whole batch a write. Anything else first may write.
    pub fn decide(&self, msgs: &[u8], stmts: &ClientStatements) -> Result<Decision, PgError> {
        let mut verdict: Option<Decision> = None;
        let mut rest = msgs;
        while let Some((&tag, after)) = rest.split_first() {
            let Some(len) = after.get(..4).map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize) else {
                break;
            };
            let Some(body) = after.get(4..len.max(4)) else { break };
            rest = after.get(len.max(4)..).unwrap_or_default();
            let d = match tag {
                b'Q' => self.decide_sql(cstr(body).0)?,
                b'P' => self.decide_sql(cstr(cstr(body).1).0)?,
                b'B' => {
                    let stmt = cstr(cstr(body).1).0;
                    if stmt.is_empty() {
                        continue;
                    }
                    match std::str::from_utf8(stmt).ok().and_then(|n| Statement::lookup(stmts, n)) {
                        Some(s) => self.decide_sql(s.query())?,
                        None => Decision::Write,
                    }
                }
                b'S' | b'H' => break,
                b'D' | b'E' | b'C' => continue,
                _ => Decision::Write,
            };
            verdict = Some(match (verdict, d) {
                (None, d) => d,
                (Some(a), b) if a == b => a,
                (Some(Decision::Read | Decision::Other), Decision::Read | Decision::Other) => Decision::Other,
                _ => Decision::Write,
            });
            if tag == b'Q' {
                break;
            }
        }
        Ok(verdict.unwrap_or(Decision::Write))
    }

    fn decide_sql(&self, sql: &[u8]) -> Result<Decision, PgError> {
        let Ok(sql) = std::str::from_utf8(sql) else { return Ok(Decision::Write) };
        // EXPLAIN (ANALYZE 0|1) is the one place a literal decides, and a
        // pgmux setting's value must be checked each time.
        if crate::sql::scan::mentions(sql, b"explain") || crate::sql::scan::mentions(sql, b"pgmux") {
            return self.classify(sql);
        }
        let shape = crate::sql::scan::literal_shape(sql);
        if let Some(d) = self.shapes.lock().ok().and_then(|mut c| c.get(&shape).copied()) {
            return Ok(d);
        }
        let d = self.classify(sql)?;
        if let Ok(mut c) = self.shapes.lock() {
            c.put(shape, d);
        }
        Ok(d)
    }

    fn classify(&self, sql: &str) -> Result<Decision, PgError> {
        let c =
            self.classifier.classify(sql).map_err(|e| PgError::error(sqlstate::SYNTAX_ERROR, format!("pgmux: {e}")))?;
        let reads = matches!(c.kind, Kind::Read | Kind::BeginReadOnly);
        Ok(match (c.hint, &c.kind) {
            (_, Kind::SessionState(SessionKind::Set { name, value })) if name == "pgmux.route" => {
                if !["primary", "replica", "auto"].contains(&value.to_ascii_lowercase().as_str()) {
                    return Err(PgError::error(
                        sqlstate::INVALID_PARAMETER_VALUE,
                        format!("invalid value for parameter \"pgmux.route\": \"{value}\""),
                    )
                    .with_hint("Available values: primary, replica, auto."));
                }
                Decision::Other
            }
            (Some(Hint::Replica), _) => Decision::Read,
            (Some(Hint::Primary), _) if reads => Decision::Other,
            (_, Kind::SessionState(_) | Kind::SetLocal | Kind::TxnEnd) => Decision::Other,
            (_, Kind::Begin) if c.statements == 1 => Decision::Begin,
            (_, _) if reads => Decision::Read,
            _ => Decision::Write,
        })
    }

    /// Where writes (and anything else for the primary) go now. With
    /// `refuse_standby`, a primary that reports it is in recovery (and no
    /// promoted replica to follow) is an error rather than a target.
    pub fn write_target(&self, refuse_standby: bool) -> Result<Target, PgError> {
        let p = self.monitor.primary();
        let standby = p.reachable && p.in_recovery == Some(true);
        if self.options.follow_promotion {
            let mut followed = self.followed.lock().unwrap_or_else(|e| e.into_inner());
            let still = followed.filter(|&i| {
                let r = self.monitor.replica(i);
                r.reachable && r.in_recovery == Some(false)
            });
            let down = !p.reachable && p.last_error.is_some();
            let now = still.or_else(|| if down || standby { self.monitor.promoted_replica() } else { None });
            if now != *followed {
                if let Some(i) = now {
                    tracing::warn!(database = %self.name, replica = i + 1, "primary lost; writes follow the promoted replica");
                }
                *followed = now;
            }
            if let Some(i) = now {
                return Ok(Target::Replica(i));
            }
        }
        if standby && refuse_standby {
            return Err(PgError::error(
                sqlstate::READ_ONLY_SQL_TRANSACTION,
                format!(
                    "pgmux: the primary of database \"{}\" reports that it is in recovery; writes are refused",
                    self.name
                ),
            )
            .with_hint(
                "Promote a server and point the primary of this database at it, or set follow_promotion = true.",
            ));
        }
        Ok(Target::Primary)
    }

    /// The backend for a read. After a write (`last_write`, with
    /// read-your-writes on), only replicas that have replayed the primary's
    /// WAL as sampled after that write qualify — the monitor's samples
    /// suffice, no extra round trip.
    pub fn read_target(&self, last_write: Option<Instant>) -> Result<Target, PgError> {
        let o = &self.options;
        let mut cands: Vec<Target> = self.monitor.eligible_replicas().into_iter().map(Target::Replica).collect();
        if o.balance == LoadBalancing::Weighted {
            cands.retain(|t| self.weight(*t) > 0);
        }
        let mut held_back = false;
        if let (ReadYourWrites::Session, Some(written)) = (o.read_your_writes, last_write) {
            let all_count = cands.len();
            let primary = self.monitor.primary();
            match (primary.sampled_at, primary.insert_lsn.or(primary.current_lsn)) {
                (Some(at), Some(lsn)) if at > written => {
                    let caught_up = self.monitor.replicas_at(lsn);
                    cands.retain(|t| matches!(t, Target::Replica(i) if caught_up.contains(i)));
                }
                _ => cands.clear(),
            }
            held_back = cands.len() < all_count;
            // Down since the write: a probe that began after it failed. (A
            // failure seen before it is older news than the write itself,
            // which the primary took: then the primary serves the read.)
            let down = !primary.reachable && primary.failed_at.is_some_and(|f| f > written);
            if cands.is_empty() && down && self.write_target(false)? == Target::Primary {
                // The primary is down (and no promoted replica took over)
                // and no replica is known to have this session's last
                // write: refuse rather than answer from before it.
                return Err(PgError::error(
                    sqlstate::CONNECTION_FAILURE,
                    format!(
                        "pgmux: the primary of \"{}\" is down and no replica is known to have replayed this \
                         session's last write; retry once the primary is back",
                        self.name
                    ),
                ));
            }
        }
        let primary_too = match o.primary_reads {
            PrimaryReads::AlwaysEligible => true,
            PrimaryReads::Fallback => cands.is_empty(),
            PrimaryReads::Never => cands.is_empty() && held_back,
        };
        if primary_too {
            cands.push(self.write_target(false)?);
        }
        if cands.is_empty() {
            return Err(PgError::error(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("pgmux: no replica of database \"{}\" can serve reads now (primary_reads = never)", self.name),
            ));
        }
        Ok(self.balance(&cands))
    }

    fn weight(&self, t: Target) -> u32 {
        match t {
            Target::Primary => 1,
            Target::Replica(i) => self.options.weights.get(i).copied().unwrap_or(1),
        }
    }

    /// One of `cands` (not empty) by the load-balancing rule.
    fn balance(&self, cands: &[Target]) -> Target {
        let n = cands.len();
        let i = match self.options.balance {
            LoadBalancing::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            LoadBalancing::Random => rand::random_range(0..n),
            LoadBalancing::LeastConnections => {
                // Ties go round robin, so an idle database still spreads.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).min_by_key(|&k| self.pool(cands[k]).in_use()).unwrap_or(0)
            }
            LoadBalancing::Weighted => {
                let total: u64 = cands.iter().map(|&t| u64::from(self.weight(t))).sum();
                let mut pick = rand::random_range(0..total.max(1));
                cands
                    .iter()
                    .position(|&t| {
                        let w = u64::from(self.weight(t));
                        if pick < w {
                            return true;
                        }
                        pick -= w;
                        false
                    })
                    .unwrap_or(0)
            }
        };
        cands[i.min(n - 1)]
    }
}
