//! Replica health and lag monitor for lag-aware read routing.
//!
//! One [`Monitor`] watches the primary and the replicas of one database. Every
//! backend gets its own sampling task (so a slow or dead backend never delays the
//! others) holding one persistent control connection, re-established on failure
//! (bounded by [`MonitorConfig::connect_timeout`], which also bounds each query).
//! Every [`MonitorConfig::check_interval`] it runs one simple query that reports
//! `pg_is_in_recovery()`, the primary's `pg_current_wal_insert_lsn()` and a replica's
//! replay/receive LSNs. A failed sample marks the backend unreachable and bans it
//! for [`MonitorConfig::ban_time`]; a banned backend is not probed until its ban
//! expires (the proxy may also [`Monitor::ban`] a replica itself).
//!
//! Lag is derived when a state is read, from the latest samples:
//! * byte lag = latest primary `current_lsn` − replica `replay_lsn` (saturating);
//! * time lag = how long ago the primary was first *seen* past the replica's replay
//!   LSN, from a bounded ring buffer of primary `(Instant, LSN)` samples holding
//!   only LSN changes (see [`time_lag`]). An idle primary therefore gives 0 for a
//!   caught-up replica, and a stuck replica's lag grows with wall time once the
//!   primary has moved past it. The resolution is one check interval.
//!
//! Without any primary sample yet, lags are unknown (`None`) and a replica is only
//! eligible when no lag limit is configured. If the primary goes away, the last
//! known primary LSN keeps being used, so caught-up replicas stay eligible.
//!
//! Here: the monitor's state and what reads it (eligibility, bans). The
//! sampling task of a backend is in `sample.rs`, the primary's LSN history
//! and the time lag read from it in `lag.rs`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

mod lag;
mod sample;
pub use lag::time_lag;
use sample::sample_loop;
pub use sample::{insert_end, parse_lsn};

/// A PostgreSQL server to watch.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub host: String,
    pub port: u16,
}

/// How and how often to sample, and when a replica is too far behind.
#[derive(Clone, Debug)]
pub struct MonitorConfig {
    pub check_interval: Duration,
    /// Replicas further behind the primary (in WAL bytes) are not eligible.
    pub max_lag_bytes: Option<u64>,
    /// Replicas further behind the primary (in time) are not eligible.
    pub max_lag: Option<Duration>,
    /// How long a failed backend is excluded before it is probed again.
    pub ban_time: Duration,
    /// Bounds connecting (with authentication) and each sample query.
    pub connect_timeout: Duration,
    pub user: String,
    pub password: String,
    pub dbname: String,
    /// TLS to the servers (`server_tls_mode`).
    pub tls: std::sync::Arc<crate::protocol::tls::ServerTls>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            check_interval: Duration::from_millis(500),
            max_lag_bytes: None,
            max_lag: None,
            ban_time: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            user: "postgres".into(),
            password: String::new(),
            dbname: "postgres".into(),
            tls: std::sync::Arc::new(crate::protocol::tls::ServerTls::plain()),
        }
    }
}

/// What the monitor knows about one backend (lags are derived when read).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendState {
    /// The last sample succeeded.
    pub reachable: bool,
    pub in_recovery: Option<bool>,
    /// `pg_current_wal_lsn()` (not in recovery only).
    pub current_lsn: Option<u64>,
    /// The end of the last record inserted (see [`insert_end`]): every
    /// transaction committed before the sample began ends at or before it.
    pub insert_lsn: Option<u64>,
    /// `pg_last_wal_replay_lsn()` / `pg_last_wal_receive_lsn()` (replicas).
    pub replay_lsn: Option<u64>,
    pub receive_lsn: Option<u64>,
    /// Replicas only: see the module docs.
    pub lag_bytes: Option<u64>,
    pub lag: Option<Duration>,
    /// Set while banned (a past instant means the ban has expired).
    pub banned_until: Option<Instant>,
    pub last_error: Option<String>,
    /// When the last successful sample began: its values are at least this
    /// fresh (read-your-writes compares it with a commit time).
    pub sampled_at: Option<Instant>,
    /// When the last failed sample began.
    pub failed_at: Option<Instant>,
}

impl BackendState {
    fn banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|t| t > now)
    }
}

/// One backend's raw state plus when its last sampling round started.
#[derive(Default)]
struct Slot {
    state: BackendState,
    /// Start of the last finished round (sampled, failed or skipped while banned).
    round_started: Option<Instant>,
}

struct Inner {
    /// Index 0 is the primary, `1 + i` is replica `i`.
    slots: Vec<Slot>,
    /// Primary `(when first seen, current LSN)`, LSN strictly increasing.
    ring: VecDeque<(Instant, u64)>,
}

struct Shared {
    cfg: MonitorConfig,
    backends: Vec<Backend>,
    inner: Mutex<Inner>,
    /// Bumped after every round of every backend (wakes [`Monitor::wait_sample`]).
    rounds: watch::Sender<()>,
    stopped: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Health and lag of a primary and its replicas; see the module docs.
pub struct Monitor {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Monitor {
    /// Spawn one sampling task per backend on the current tokio runtime (panics
    /// outside one). The tasks stop when the returned handle is dropped or on
    /// [`Monitor::stop`].
    pub fn start(primary: Backend, replicas: Vec<Backend>, cfg: MonitorConfig) -> Arc<Monitor> {
        let backends: Vec<Backend> = std::iter::once(primary).chain(replicas).collect();
        let slots = backends.iter().map(|_| Slot::default()).collect();
        let shared = Arc::new(Shared {
            cfg,
            backends,
            inner: Mutex::new(Inner { slots, ring: VecDeque::new() }),
            rounds: watch::Sender::new(()),
            stopped: AtomicBool::new(false),
        });
        let tasks = (0..shared.backends.len()).map(|idx| tokio::spawn(sample_loop(shared.clone(), idx))).collect();
        Arc::new(Monitor { shared, tasks: Mutex::new(tasks) })
    }

    /// Stop sampling (idempotent); states keep their last values.
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        for task in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            task.abort();
        }
        self.shared.rounds.send_replace(());
    }

    pub fn primary(&self) -> BackendState {
        self.shared.lock().slots[0].state.clone()
    }

    /// State of replica `i` with derived lags. Panics if `i` is out of range.
    pub fn replica(&self, i: usize) -> BackendState {
        let inner = self.shared.lock();
        replica_state(&inner, i, Instant::now())
    }

    /// Every backend (the primary first) with what the monitor knows.
    pub fn snapshot(&self) -> Vec<(Backend, BackendState)> {
        let states = std::iter::once(self.primary()).chain((0..self.replica_count()).map(|i| self.replica(i)));
        self.shared.backends.iter().cloned().zip(states).collect()
    }

    /// Whether a backend is banned now.
    pub fn is_banned(state: &BackendState) -> bool {
        state.banned(Instant::now())
    }

    pub fn replica_count(&self) -> usize {
        self.shared.backends.len() - 1
    }

    /// Replicas eligible for reads now: reachable, in recovery, not banned and
    /// within `max_lag_bytes` and `max_lag` (an unknown lag fails a set limit).
    pub fn eligible_replicas(&self) -> Vec<usize> {
        let inner = self.shared.lock();
        let now = Instant::now();
        let cfg = &self.shared.cfg;
        (0..inner.slots.len() - 1).filter(|&i| eligible(cfg, &replica_state(&inner, i, now), now)).collect()
    }

    /// Eligible replicas whose replay LSN has reached `lsn` (read-your-writes).
    pub fn replicas_at(&self, lsn: u64) -> Vec<usize> {
        let inner = self.shared.lock();
        let now = Instant::now();
        let cfg = &self.shared.cfg;
        (0..inner.slots.len() - 1)
            .filter(|&i| {
                let st = replica_state(&inner, i, now);
                eligible(cfg, &st, now) && st.replay_lsn.is_some_and(|r| r >= lsn)
            })
            .collect()
    }

    /// The latest sampled primary LSN (no round trip). Note that it may predate a
    /// write that just committed; compare `primary().sampled_at` with the commit
    /// time when that matters.
    pub fn primary_lsn(&self) -> Option<u64> {
        self.shared.lock().slots[0].state.current_lsn
    }

    /// Ban replica `i` for `ban_time` from now (e.g. after a connect/query failure
    /// seen by the proxy). Panics if `i` is out of range.
    pub fn ban(&self, i: usize, why: &str) {
        let backend = &self.shared.backends[1 + i];
        tracing::info!(replica = %backend.name, why, "replica banned");
        let mut inner = self.shared.lock();
        let st = &mut inner.slots[1 + i].state;
        st.banned_until = Some(Instant::now() + self.shared.cfg.ban_time);
        st.last_error = Some(why.to_string());
    }

    /// BAN (`on`) a replica by name until UNBAN; false if no replica has
    /// that name.
    pub fn hold(&self, name: &str, on: bool) -> bool {
        let Some(idx) = self.shared.backends.iter().skip(1).position(|b| b.name == name) else { return false };
        let mut inner = self.shared.lock();
        let st = &mut inner.slots[1 + idx].state;
        if on {
            tracing::info!(replica = name, "replica banned by the operator");
            st.banned_until = Some(Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
            st.last_error = Some("banned by the operator (UNBAN lifts it)".into());
        } else {
            tracing::info!(replica = name, "replica unbanned by the operator");
            st.banned_until = None;
            st.last_error = None;
        }
        true
    }

    /// Index of a reachable replica that reports `pg_is_in_recovery() = false`.
    pub fn promoted_replica(&self) -> Option<usize> {
        let inner = self.shared.lock();
        let promoted = |s: &Slot| s.state.reachable && s.state.in_recovery == Some(false);
        inner.slots[1..].iter().position(promoted)
    }

    /// Resolves once every backend has finished a sampling round (a sample, a
    /// failure, or a skip while banned) that started after this call; at once if
    /// the monitor is stopped.
    pub async fn wait_sample(&self) {
        let mut rx = self.shared.rounds.subscribe();
        let t0 = Instant::now();
        loop {
            if self.shared.stopped.load(Ordering::SeqCst) {
                return;
            }
            if self.shared.lock().slots.iter().all(|s| s.round_started.is_some_and(|t| t >= t0)) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Replica `i`'s state with `lag_bytes` and `lag` filled in from the primary samples.
fn replica_state(inner: &Inner, i: usize, now: Instant) -> BackendState {
    let mut st = inner.slots[1 + i].state.clone();
    let primary_lsn = inner.ring.back().map(|&(_, lsn)| lsn);
    if let (Some(replay), Some(current)) = (st.replay_lsn, primary_lsn) {
        st.lag_bytes = Some(current.saturating_sub(replay));
        st.lag = time_lag(&inner.ring, replay, now);
    }
    st
}

fn eligible(cfg: &MonitorConfig, st: &BackendState, now: Instant) -> bool {
    let within = |limit: Option<u64>, lag: Option<u64>| limit.is_none_or(|max| lag.is_some_and(|l| l <= max));
    st.reachable
        && st.in_recovery == Some(true)
        && !st.banned(now)
        && within(cfg.max_lag_bytes, st.lag_bytes)
        && cfg.max_lag.is_none_or(|max| st.lag.is_some_and(|l| l <= max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eligibility_rules() {
        let now = Instant::now();
        let cfg =
            MonitorConfig { max_lag_bytes: Some(1000), max_lag: Some(Duration::from_secs(1)), ..Default::default() };
        let ok = BackendState {
            reachable: true,
            in_recovery: Some(true),
            lag_bytes: Some(1000),
            lag: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        assert!(eligible(&cfg, &ok, now));
        let expired_ban = BackendState { banned_until: Some(now), ..ok.clone() };
        assert!(eligible(&cfg, &expired_ban, now));
        let bad = [
            BackendState { reachable: false, ..ok.clone() },
            BackendState { in_recovery: Some(false), ..ok.clone() },
            BackendState { in_recovery: None, ..ok.clone() },
            BackendState { banned_until: Some(now + Duration::from_secs(1)), ..ok.clone() },
            BackendState { lag_bytes: Some(1001), ..ok.clone() },
            BackendState { lag_bytes: None, ..ok.clone() },
            BackendState { lag: Some(Duration::from_millis(1001)), ..ok.clone() },
            BackendState { lag: None, ..ok.clone() },
        ];
        for st in bad {
            assert!(!eligible(&cfg, &st, now), "{st:?}");
        }
        let unlimited = MonitorConfig::default();
        assert!(eligible(&unlimited, &BackendState { lag_bytes: None, lag: None, ..ok }, now));
    }
}
