//! When to renew an SVID, when to retry after a failure, and when a held one must be dropped:
//! pure rules over plain data with `now` passed in, so the timing is tested without clocks or
//! sockets. The manager's renewal task is a thin driver around [`Renewal`].
//!
//! Two clocks meet here. A certificate's validity is wall-clock time (`SystemTime`: what peers
//! check it against); the task sleeps on tokio's monotonic clock (`tokio::time::Instant`: what
//! tests pause and advance). When a certificate arrives, its renewal point and its expiry are
//! converted once into monotonic deadlines (their distance from the wall clock's `now`, added
//! to the monotonic `now` read at the same moment); from then on only the monotonic clock
//! moves the schedule. The wall clock is re-read at least every [`WALL_CLOCK_CHECK`], and a
//! re-read may only bring a deadline *earlier* (the host was suspended, which stops the
//! monotonic clock, or the clock was stepped forward), never later. So renewal is never pushed
//! past expiry, and a paused test clock is never overruled by the real one.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// Renewal happens at half of the lifetime, moved by up to this fraction of the lifetime
/// either way, so that many nodes started together do not renew together.
pub const JITTER_FRACTION: f64 = 0.05;

/// Longest wait without re-reading the wall clock.
pub const WALL_CLOCK_CHECK: Duration = Duration::from_secs(60);

/// How long to wait, from `now`, before renewing a certificate valid from `not_before` to
/// `not_after`. `jitter` is a sample in `[-1.0, 1.0]`. Returns zero when renewal is due.
pub fn renewal_delay(not_before: SystemTime, not_after: SystemTime, now: SystemTime, jitter: f64) -> Duration {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let fraction = 0.5 + JITTER_FRACTION * jitter.clamp(-1.0, 1.0);
    let renew_at = not_before + lifetime.mul_f64(fraction);
    renew_at.duration_since(now).unwrap_or_default()
}

pub use trellis_api::stream::retry_delay;

/// The wall-clock point `at` on the monotonic clock, given both clocks read together as
/// `wall_now` and `now`. A point already past maps to `now`.
pub fn to_monotonic(at: SystemTime, wall_now: SystemTime, now: Instant) -> Instant {
    now + at.duration_since(wall_now).unwrap_or_default()
}

/// The validity window of a certificate, on the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What the renewal task of one identity does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask the CA for a new SVID now.
    Fetch,
    /// The held SVID has expired: stop serving it, then ask again.
    Drop,
    /// Nothing to do before this point: sleep until then, re-read the clocks, ask again.
    Wait(Instant),
}

/// A held certificate with its deadlines on the monotonic clock.
#[derive(Debug, Clone, Copy)]
struct Held {
    validity: Validity,
    /// Sampled once per certificate, so that re-reads of the wall clock and retries do not
    /// move its renewal point.
    jitter: f64,
    renew_at: Instant,
    expires_at: Instant,
}

/// The renewal schedule of one identity: fed with events (a certificate is held, a CA call
/// failed, the held one was dropped) and the clocks, it says what to do next.
#[derive(Debug, Clone)]
pub struct Renewal {
    retry_min: Duration,
    retry_max: Duration,
    /// Consecutive failed CA calls since the last certificate arrived.
    failures: u32,
    /// When to call the CA again after the last failure; `None` when not backing off.
    retry_at: Option<Instant>,
    held: Option<Held>,
}

impl Renewal {
    /// A schedule with nothing held: the first fetch is due at once. After failures it backs
    /// off from `retry_min` up to `retry_max`.
    pub fn new(retry_min: Duration, retry_max: Duration) -> Self {
        Self {
            retry_min,
            retry_max,
            failures: 0,
            retry_at: None,
            held: None,
        }
    }

    /// A certificate valid over `validity` is now held (just issued, or found in the store),
    /// with the clocks read together as `wall_now` and `now`. Ends any backoff. `jitter` is a
    /// sample in `[-1.0, 1.0]`.
    pub fn held(&mut self, validity: Validity, wall_now: SystemTime, now: Instant, jitter: f64) {
        let renew_at = now + renewal_delay(validity.not_before, validity.not_after, wall_now, jitter);
        self.held = Some(Held {
            validity,
            jitter,
            renew_at,
            expires_at: to_monotonic(validity.not_after, wall_now, now),
        });
        self.failures = 0;
        self.retry_at = None;
    }

    /// A CA call failed at `now`: returns how long to wait before the next one, which grows
    /// with consecutive failures. `jitter` is a sample in `[0.0, 1.0]`.
    pub fn failed(&mut self, now: Instant, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = retry_delay(self.failures, self.retry_min, self.retry_max, jitter);
        self.retry_at = Some(now + delay);
        delay
    }

    /// The held SVID was dropped after [`Action::Drop`].
    pub fn dropped(&mut self) {
        self.held = None;
    }

    /// Re-reads the wall clock (`wall_now`, read together with `now`): a deadline moves earlier
    /// if the wall clock ran ahead of the monotonic one since the certificate arrived, and
    /// never moves later.
    pub fn resync(&mut self, wall_now: SystemTime, now: Instant) {
        if let Some(held) = &mut self.held {
            let v = held.validity;
            let renew_at = now + renewal_delay(v.not_before, v.not_after, wall_now, held.jitter);
            held.renew_at = held.renew_at.min(renew_at);
            held.expires_at = held.expires_at.min(to_monotonic(v.not_after, wall_now, now));
        }
    }

    /// What to do at `now`. An expired SVID is dropped before anything else; a wait never
    /// outlasts the held SVID nor [`WALL_CLOCK_CHECK`].
    pub fn next(&self, now: Instant) -> Action {
        if self.held.is_some_and(|h| now >= h.expires_at) {
            return Action::Drop;
        }
        let fetch_at = match (self.retry_at, self.held) {
            (Some(retry_at), _) => retry_at,
            (None, Some(held)) => held.renew_at,
            (None, None) => return Action::Fetch,
        };
        if now >= fetch_at {
            return Action::Fetch;
        }
        let mut wake = fetch_at.min(now + WALL_CLOCK_CHECK);
        if let Some(held) = self.held {
            wake = wake.min(held.expires_at);
        }
        Action::Wait(wake)
    }

    /// When the held SVID is due for renewal, on the monotonic clock.
    pub fn renew_at(&self) -> Option<Instant> {
        self.held.map(|h| h.renew_at)
    }

    /// Consecutive failed CA calls since the last certificate arrived.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn renewal_is_due_at_half_life_within_the_jitter_band() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + 24 * HOUR;
        assert_eq!(renewal_delay(start, end, start, 0.0), 12 * HOUR);
        let early = renewal_delay(start, end, start, -1.0);
        let late = renewal_delay(start, end, start, 1.0);
        // 5% of a 24 h life is 72 minutes either way.
        assert_eq!(early, 12 * HOUR - 72 * HOUR / 60);
        assert_eq!(late, 12 * HOUR + 72 * HOUR / 60);
        let sampled = renewal_delay(start, end, start, 0.3);
        assert!(sampled > 12 * HOUR && sampled < late, "{sampled:?}");
        assert_eq!(renewal_delay(start, end, start + 20 * HOUR, 0.0), Duration::ZERO);
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        let full: Vec<_> = (1..=10).map(|n| retry_delay(n, min, max, 1.0)).collect();
        assert_eq!(full[0], min);
        assert_eq!(full[1], 2 * min);
        assert_eq!(full[3], 8 * min);
        assert_eq!(full[9], max);
        assert!(full.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(retry_delay(3, min, max, 0.0), 2 * min);
        assert_eq!(retry_delay(u32::MAX, min, max, 1.0), max);
    }

    /// Both clocks at one moment, and a 24 h certificate issued then.
    fn issued_now() -> (SystemTime, Instant, Validity) {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let validity = Validity {
            not_before: wall,
            not_after: wall + 24 * HOUR,
        };
        (wall, Instant::now(), validity)
    }

    fn schedule() -> Renewal {
        Renewal::new(100 * MS, 10 * 1000 * MS)
    }

    #[test]
    fn with_nothing_held_the_first_fetch_is_due_at_once() {
        assert_eq!(schedule().next(Instant::now()), Action::Fetch);
    }

    #[test]
    fn a_held_certificate_is_renewed_at_half_life_on_the_monotonic_clock() {
        let (wall, now, validity) = issued_now();
        let mut s = schedule();
        s.held(validity, wall, now, 0.0);
        assert_eq!(s.renew_at(), Some(now + 12 * HOUR));
        // Waits are cut to re-read the wall clock, and nothing is due before half life.
        assert_eq!(s.next(now), Action::Wait(now + WALL_CLOCK_CHECK));
        let almost = now + 12 * HOUR - WALL_CLOCK_CHECK / 2;
        assert_eq!(s.next(almost), Action::Wait(now + 12 * HOUR));
        assert_eq!(s.next(now + 12 * HOUR), Action::Fetch);
    }

    #[test]
    fn jitter_moves_the_renewal_point_within_the_band_only() {
        let (wall, now, validity) = issued_now();
        let mut s = schedule();
        s.held(validity, wall, now, -1.0);
        assert_eq!(s.renew_at(), Some(now + 12 * HOUR - 72 * HOUR / 60));
        s.held(validity, wall, now, 7.0);
        assert_eq!(s.renew_at(), Some(now + 12 * HOUR + 72 * HOUR / 60));
    }

    #[test]
    fn failures_back_off_and_a_new_certificate_ends_the_backoff() {
        let (wall, now, validity) = issued_now();
        let mut s = schedule();
        let delays: Vec<_> = (0..4).map(|_| s.failed(now, 1.0)).collect();
        assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS, 800 * MS]);
        assert_eq!(s.failures(), 4);
        assert_eq!(s.next(now), Action::Wait(now + 800 * MS));
        assert_eq!(s.next(now + 800 * MS), Action::Fetch);

        s.held(validity, wall, now, 0.0);
        assert_eq!(s.failures(), 0);
        assert_eq!(s.next(now + HOUR), Action::Wait(now + HOUR + WALL_CLOCK_CHECK));
        assert_eq!(s.failed(now + 12 * HOUR, 1.0), 100 * MS, "the backoff starts afresh");
    }

    #[test]
    fn an_svid_that_could_not_be_renewed_is_dropped_at_expiry() {
        let (wall, now, validity) = issued_now();
        let mut s = schedule();
        s.held(validity, wall, now, 0.0);
        let expiry = now + 24 * HOUR;
        // The CA is down; the retry falls after expiry: the task wakes at expiry anyway.
        s.failed(expiry - 5 * MS, 1.0);
        s.failed(expiry - 5 * MS, 1.0);
        assert_eq!(s.next(expiry - 5 * MS), Action::Wait(expiry));
        assert_eq!(s.next(expiry), Action::Drop);
        s.dropped();
        assert_eq!(s.next(expiry), Action::Wait(expiry + 195 * MS), "then retries go on");
    }

    #[test]
    fn an_svid_already_expired_when_found_is_dropped_first() {
        let (wall, now, validity) = issued_now();
        let mut s = schedule();
        s.held(validity, wall + 25 * HOUR, now, 0.0);
        assert_eq!(s.next(now), Action::Drop);
        s.dropped();
        assert_eq!(s.next(now), Action::Fetch);
    }

    #[test]
    fn a_suspended_host_renews_as_soon_as_it_wakes() {
        let (wall, now, validity) = issued_now();
        let mut s = schedule();
        s.held(validity, wall, now, 0.0);
        // The monotonic clock stood still for 13 h of wall time.
        let woke = now + WALL_CLOCK_CHECK;
        s.resync(wall + 13 * HOUR, woke);
        assert_eq!(s.next(woke), Action::Fetch);
        // Past expiry, the SVID is dropped at once.
        s.resync(wall + 25 * HOUR, woke);
        assert_eq!(s.next(woke), Action::Drop);
    }

    #[test]
    fn a_wall_clock_that_stands_still_or_steps_back_does_not_delay_renewal() {
        let (wall, now, validity) = issued_now();
        let mut s = schedule();
        s.held(validity, wall, now, 0.0);
        // A paused test clock: monotonic time moves, wall time does not.
        for minutes in 1..=720 {
            let t = now + Duration::from_secs(60 * minutes);
            s.resync(wall, t);
        }
        assert_eq!(s.renew_at(), Some(now + 12 * HOUR));
        s.resync(wall - HOUR, now + HOUR);
        assert_eq!(s.renew_at(), Some(now + 12 * HOUR));
        assert_eq!(s.next(now + 12 * HOUR), Action::Fetch);
    }
}
