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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// At most this many primary LSN changes are kept for the time-lag estimate...
const RING_MAX_SAMPLES: usize = 1200;
/// ...and none older than this (the newest one is always kept).
const RING_MAX_AGE: Duration = Duration::from_secs(600);

/// The single query of a sample (the LSN functions of a primary fail during
/// recovery). Besides the write position (for lag), the primary's *insert*
/// position: with `synchronous_commit = off` a commit returns before its
/// record is written, and read-your-writes must wait for replicas to replay
/// it. WAL page and segment sizes normalize the insert position.
const SAMPLE_SQL: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
    pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text, \
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END, \
    current_setting('wal_block_size'), pg_size_bytes(current_setting('wal_segment_size'))::text";

/// The end of the last WAL record inserted, from the insert position: at a
/// page start that position is past the page header (24 bytes; 40 on a
/// segment's first page), where no record ends.
pub fn insert_end(insert: u64, page: u64, segment: u64) -> u64 {
    if segment > 0 && insert % segment == 40 {
        insert - 40
    } else if page > 0 && insert % page == 24 {
        insert - 24
    } else {
        insert
    }
}

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

#[derive(Debug, thiserror::Error)]
enum SampleError {
    #[error("connect to {0} failed: {1}")]
    Connect(String, tokio_postgres::Error),
    #[error("{0} timed out after {1:?}")]
    Timeout(&'static str, Duration),
    #[error("sample query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("unexpected sample result: {0}")]
    Parse(String),
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

/// How far (in time) a replica that replayed up to `replay` is behind: `now` minus
/// the time of the first primary sample whose LSN is past `replay`; zero when the
/// newest primary LSN is not past it; `None` without samples. A `replay` older than
/// the whole ring gives the age of the oldest sample (a lower bound). `ring` must
/// be ordered by time with increasing LSNs.
pub fn time_lag(ring: &VecDeque<(Instant, u64)>, replay: u64, now: Instant) -> Option<Duration> {
    let &(_, newest) = ring.back()?;
    if newest <= replay {
        return Some(Duration::ZERO);
    }
    let first_past = ring.partition_point(|&(_, lsn)| lsn <= replay);
    Some(now.saturating_duration_since(ring[first_past].0))
}

/// Record a primary LSN sample taken at `at`: only changes are kept; an LSN going
/// backwards (a different primary) restarts the history; bounded in count and age.
fn push_primary_lsn(ring: &mut VecDeque<(Instant, u64)>, at: Instant, lsn: u64) {
    match ring.back() {
        Some(&(_, last)) if last == lsn => {}
        Some(&(_, last)) if last > lsn => {
            ring.clear();
            ring.push_back((at, lsn));
        }
        _ => ring.push_back((at, lsn)),
    }
    while ring.len() > RING_MAX_SAMPLES {
        ring.pop_front();
    }
    while ring.len() > 1 && ring.front().is_some_and(|&(t, _)| at.saturating_duration_since(t) > RING_MAX_AGE) {
        ring.pop_front();
    }
}

/// `"16/B374D848"` → `0x16_B374D848`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hex = |p: &str| (!p.is_empty() && p.len() <= 8).then(|| u32::from_str_radix(p, 16).ok()).flatten();
    Some((u64::from(hex(hi)?) << 32) | u64::from(hex(lo)?))
}

/// The raw result of one sample query.
#[derive(Debug, PartialEq)]
struct Sample {
    in_recovery: bool,
    current_lsn: Option<u64>,
    insert_lsn: Option<u64>,
    replay_lsn: Option<u64>,
    receive_lsn: Option<u64>,
}

async fn sample_loop(shared: Arc<Shared>, idx: usize) {
    let backend = &shared.backends[idx];
    let cfg = &shared.cfg;
    let mut client: Option<tokio_postgres::Client> = None;
    let mut ticker = tokio::time::interval(cfg.check_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let started = Instant::now();
        // A banned replica rests until its ban ends; the primary is always
        // probed, so its return (or demotion) is seen at once.
        let banned = idx != 0 && shared.lock().slots[idx].state.banned(started);
        let result = if banned { None } else { Some(sample(&mut client, backend, cfg).await) };
        let done = Instant::now();
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let st = &mut inner.slots[idx].state;
        match result {
            None => {}
            Some(Ok(s)) => {
                if !st.reachable {
                    tracing::info!(backend = %backend.name, "backend reachable");
                }
                st.reachable = true;
                st.in_recovery = Some(s.in_recovery);
                st.current_lsn = s.current_lsn;
                st.insert_lsn = s.insert_lsn;
                st.replay_lsn = s.replay_lsn;
                st.receive_lsn = s.receive_lsn;
                // A ban set while this sample was in flight (BAN, a failed
                // checkout) is newer news than the sample: it stays.
                st.banned_until = st.banned_until.filter(|&until| until > done);
                if st.banned_until.is_none() {
                    st.last_error = None;
                }
                st.sampled_at = Some(started);
                if let (0, Some(lsn)) = (idx, s.current_lsn) {
                    push_primary_lsn(&mut inner.ring, done, lsn);
                }
            }
            Some(Err(e)) => {
                client = None;
                if st.reachable || st.last_error.is_none() {
                    tracing::warn!(backend = %backend.name, error = %e, "backend unreachable, banned");
                }
                st.reachable = false;
                st.failed_at = Some(started);
                st.banned_until = Some(done + cfg.ban_time);
                st.last_error = Some(e.to_string());
            }
        }
        inner.slots[idx].round_started = Some(started);
        shared.rounds.send_replace(());
    }
}

/// One sample over the (re)established control connection.
async fn sample(
    client: &mut Option<tokio_postgres::Client>,
    backend: &Backend,
    cfg: &MonitorConfig,
) -> Result<Sample, SampleError> {
    let timeout = cfg.connect_timeout;
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = None;
        let mut pg = tokio_postgres::Config::new();
        pg.host(&backend.host).port(backend.port).user(&cfg.user).password(&cfg.password);
        pg.dbname(&cfg.dbname).application_name("pgmux-monitor").connect_timeout(timeout);
        let addr = format!("{}:{}", backend.host, backend.port);
        let connect = tokio::time::timeout(timeout, cfg.tls.pg_connect(&pg, None));
        let (c, _conn) = connect
            .await
            .map_err(|_| SampleError::Timeout("connect", timeout))?
            .map_err(|e| SampleError::Connect(addr, e))?;
        *client = Some(c);
    }
    let c = client.as_ref().ok_or_else(|| SampleError::Parse("no connection".into()))?;
    let msgs = tokio::time::timeout(timeout, c.simple_query(SAMPLE_SQL))
        .await
        .map_err(|_| SampleError::Timeout("sample query", timeout))??;
    let row = msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .ok_or_else(|| SampleError::Parse("no row".into()))?;
    let lsn = |i: usize| -> Result<Option<u64>, SampleError> {
        match row.try_get(i)? {
            None => Ok(None),
            Some(s) => parse_lsn(s).map(Some).ok_or_else(|| SampleError::Parse(format!("bad LSN {s:?}"))),
        }
    };
    let in_recovery = match row.try_get(0)? {
        Some("t") => true,
        Some("f") => false,
        other => return Err(SampleError::Parse(format!("pg_is_in_recovery() = {other:?}"))),
    };
    let size = |i: usize| -> u64 { row.try_get(i).ok().flatten().and_then(|s| s.parse().ok()).unwrap_or(0) };
    let insert_lsn = lsn(4)?.map(|l| insert_end(l, size(5), size(6)));
    Ok(Sample { in_recovery, current_lsn: lsn(1)?, insert_lsn, replay_lsn: lsn(2)?, receive_lsn: lsn(3)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(t0: Instant, samples: &[(u64, u64)]) -> VecDeque<(Instant, u64)> {
        samples.iter().map(|&(ms, lsn)| (t0 + Duration::from_millis(ms), lsn)).collect()
    }

    #[test]
    fn insert_position_to_record_end() {
        let seg = 16 << 20;
        assert_eq!(insert_end(3 * 8192 + 24, 8192, seg), 3 * 8192);
        assert_eq!(insert_end(2 * seg + 40, 8192, seg), 2 * seg);
        assert_eq!(insert_end(3 * 8192 + 100, 8192, seg), 3 * 8192 + 100);
        // A record can end 40 bytes into a page that has a short header.
        assert_eq!(insert_end(3 * 8192 + 40, 8192, seg), 3 * 8192 + 40);
    }

    #[test]
    fn parses_lsns() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn(" FFFFFFFF/FFFFFFFF\n"), Some(u64::MAX));
        for bad in ["", "16", "/1", "1/", "x/1", "1/2/3", "123456789/0", "-1/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn time_lag_without_samples_is_unknown() {
        assert_eq!(time_lag(&VecDeque::new(), 5, Instant::now()), None);
    }

    #[test]
    fn idle_primary_gives_zero_lag_for_caught_up_replica() {
        let t0 = Instant::now();
        let r = ring(t0, &[(0, 100), (500, 200)]);
        // An hour later, the primary still at 200: caught up means no lag.
        let now = t0 + Duration::from_secs(3600);
        assert_eq!(time_lag(&r, 200, now), Some(Duration::ZERO));
        assert_eq!(time_lag(&r, 250, now), Some(Duration::ZERO));
    }

    #[test]
    fn stuck_replica_lag_grows_with_wall_time() {
        let t0 = Instant::now();
        let r = ring(t0, &[(0, 100), (500, 200), (1000, 300), (1500, 400)]);
        // Replayed 200: the primary was first seen past it at 1000 ms.
        assert_eq!(time_lag(&r, 200, t0 + Duration::from_millis(1500)), Some(Duration::from_millis(500)));
        assert_eq!(time_lag(&r, 200, t0 + Duration::from_millis(9000)), Some(Duration::from_millis(8000)));
        // Between samples: first sample past 250 is at 1000 ms as well.
        assert_eq!(time_lag(&r, 250, t0 + Duration::from_millis(2000)), Some(Duration::from_millis(1000)));
        // Older than the whole ring: a lower bound (age of the oldest sample).
        assert_eq!(time_lag(&r, 50, t0 + Duration::from_millis(2000)), Some(Duration::from_millis(2000)));
        // A sample "in the future" of `now` (clock race) saturates to zero.
        assert_eq!(time_lag(&r, 350, t0 + Duration::from_millis(1000)), Some(Duration::ZERO));
    }

    #[test]
    fn ring_keeps_changes_only_and_is_bounded() {
        let t0 = Instant::now();
        let mut r = VecDeque::new();
        for i in 0..10u64 {
            push_primary_lsn(&mut r, t0 + Duration::from_millis(i), 100);
        }
        assert_eq!(r, ring(t0, &[(0, 100)]));
        push_primary_lsn(&mut r, t0 + Duration::from_millis(20), 150);
        assert_eq!(r, ring(t0, &[(0, 100), (20, 150)]));
        // Going backwards (a new primary) restarts the history.
        push_primary_lsn(&mut r, t0 + Duration::from_millis(30), 10);
        assert_eq!(r, ring(t0, &[(30, 10)]));
        for i in 0..3000u64 {
            push_primary_lsn(&mut r, t0 + Duration::from_millis(40 + i), 11 + i);
        }
        assert_eq!(r.len(), RING_MAX_SAMPLES);
        assert_eq!(r.back().map(|s| s.1), Some(3010));
        // Old entries age out, the newest always stays.
        let late = t0 + RING_MAX_AGE + Duration::from_secs(3600);
        push_primary_lsn(&mut r, late, 3010);
        assert_eq!(r, VecDeque::from([(t0 + Duration::from_millis(3039), 3010)]));
    }

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
