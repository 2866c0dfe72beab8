//! One backend's sampling task: its control connection (re-established on
//! failure), the one query of a sample, reading its row (LSNs, recovery,
//! the insert position's record end), and what a sample or a failure does
//! to the backend's state (reachable, banned, the primary's LSN history).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lag::push_primary_lsn;
use super::{Backend, MonitorConfig, Shared};

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

pub(super) async fn sample_loop(shared: Arc<Shared>, idx: usize) {
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
}
