//! The primary's WAL position over time (a bounded ring of `(Instant,
//! LSN)` samples, changes only) and the time lag of a replica read from
//! it (see the monitor's module docs).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// At most this many primary LSN changes are kept for the time-lag estimate...
const RING_MAX_SAMPLES: usize = 1200;
/// ...and none older than this (the newest one is always kept).
const RING_MAX_AGE: Duration = Duration::from_secs(600);

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
pub(super) fn push_primary_lsn(ring: &mut VecDeque<(Instant, u64)>, at: Instant, lsn: u64) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(t0: Instant, samples: &[(u64, u64)]) -> VecDeque<(Instant, u64)> {
        samples.iter().map(|&(ms, lsn)| (t0 + Duration::from_millis(ms), lsn)).collect()
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
}
