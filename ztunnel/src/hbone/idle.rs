//! When a tunnel that moves no bytes is closed.
//!
//! Two rules, both on bytes moved either way (a tunnel's pod socket and its stream are held for
//! nothing while it is quiet):
//! - a tunnel that has moved no byte at all [`IdleTimeouts::unused`] after it opened is closed:
//!   a CONNECT that is never used holds a pod socket and a descriptor for an attacker (issue 12's
//!   flood of silent streams), and no real client opens a connection and stays silent that long
//!   while the server stays silent too;
//! - a tunnel that carried bytes and then none, either way, for [`IdleTimeouts::idle`] is
//!   closed, as Envoy's (and so Istio's) TCP proxy does with its one-hour default. Long-lived
//!   connections that talk now and then (databases, websockets) stay up; one that should outlive
//!   an hour of silence needs TCP keep-alives, which count as nothing here, or a larger value.
//!
//! [`IdleWatch`] is the rule, fed the byte count and `now`; [`watch`] is the task that sleeps
//! between its checks. Activity is counted, not timestamped, so the data path pays one relaxed
//! atomic add per chunk and never reads the clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How long a tunnel may move no bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IdleTimeouts {
    /// A tunnel that moved no byte since it opened closes this long after opening.
    pub unused: Duration,
    /// A tunnel that moved no byte for this long closes; `None`: never.
    pub idle: Option<Duration>,
}

impl Default for IdleTimeouts {
    fn default() -> Self {
        Self {
            unused: Duration::from_secs(30),
            idle: Some(Duration::from_secs(3600)),
        }
    }
}

/// Why a tunnel was closed for silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Silent {
    #[error("tunnel moved no byte within {0:?} of opening")]
    Unused(Duration),
    #[error("tunnel moved no byte for {0:?}")]
    Idle(Duration),
}

/// What the watchdog does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check again at this instant.
    CheckAt(Instant),
    /// Close the tunnel.
    Close(Silent),
}

/// The state of one tunnel's watchdog: the byte count at its last check, and since when that
/// count has not changed.
#[derive(Debug, Clone)]
pub struct IdleWatch {
    timeouts: IdleTimeouts,
    opened: Instant,
    seen: u64,
    quiet_since: Instant,
}

/// Checks of the idle rule per timeout: a tunnel closes between `idle` and `idle` plus an
/// eighth after its last byte.
const CHECKS_PER_TIMEOUT: u32 = 8;

impl IdleWatch {
    pub fn new(timeouts: IdleTimeouts, opened: Instant) -> Self {
        Self {
            timeouts,
            opened,
            seen: 0,
            quiet_since: opened,
        }
    }

    /// The first check: when the unused rule falls due.
    pub fn first_check(&self) -> Instant {
        self.opened + self.timeouts.unused
    }

    /// Given the bytes `moved` so far (both ways) at `now`, close or say when to look again.
    pub fn check(&mut self, moved: u64, now: Instant) -> Verdict {
        if moved == 0 {
            if now >= self.opened + self.timeouts.unused {
                return Verdict::Close(Silent::Unused(self.timeouts.unused));
            }
            return Verdict::CheckAt(self.opened + self.timeouts.unused);
        }
        if moved != self.seen {
            self.seen = moved;
            self.quiet_since = now;
        }
        let Some(idle) = self.timeouts.idle else {
            // Used, and no idle rule: nothing more to check. Look again in a day, which costs
            // one timer per long-lived tunnel and nothing else.
            return Verdict::CheckAt(now + Duration::from_secs(86_400));
        };
        if now >= self.quiet_since + idle {
            return Verdict::Close(Silent::Idle(idle));
        }
        Verdict::CheckAt((now + idle / CHECKS_PER_TIMEOUT).min(self.quiet_since + idle).max(now))
    }
}

/// Bytes moved either way through one tunnel, bumped by the pump.
#[derive(Debug, Default)]
pub struct Activity(AtomicU64);

impl Activity {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn moved(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Resolves when the tunnel counted by `activity` must close for silence.
pub async fn watch(timeouts: IdleTimeouts, activity: &Activity) -> Silent {
    let mut watch = IdleWatch::new(timeouts, Instant::now());
    let mut at = watch.first_check();
    loop {
        tokio::time::sleep_until(at).await;
        match watch.check(activity.moved(), Instant::now()) {
            Verdict::Close(why) => return why,
            Verdict::CheckAt(next) => at = next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn timeouts() -> IdleTimeouts {
        IdleTimeouts {
            unused: 30 * S,
            idle: Some(3600 * S),
        }
    }

    #[test]
    fn a_tunnel_that_never_moves_a_byte_closes_when_the_unused_timeout_falls_due() {
        let t0 = Instant::now();
        let mut w = IdleWatch::new(timeouts(), t0);
        assert_eq!(w.first_check(), t0 + 30 * S);
        assert_eq!(w.check(0, t0 + 10 * S), Verdict::CheckAt(t0 + 30 * S));
        assert_eq!(w.check(0, t0 + 30 * S), Verdict::Close(Silent::Unused(30 * S)));
    }

    #[test]
    fn a_used_tunnel_outlives_the_unused_timeout_and_closes_after_an_idle_hour() {
        let t0 = Instant::now();
        let mut w = IdleWatch::new(timeouts(), t0);
        let Verdict::CheckAt(next) = w.check(4, t0 + 30 * S) else {
            panic!("a used tunnel stays open")
        };
        assert_eq!(
            next,
            t0 + 30 * S + 450 * S,
            "the next check is an eighth of the hour later"
        );
        // Bytes keep moving: it stays.
        assert!(matches!(w.check(100, t0 + 1000 * S), Verdict::CheckAt(_)));
        // Then silence: open until an hour after the last change was seen, closed from then on.
        assert!(matches!(w.check(100, t0 + 4000 * S), Verdict::CheckAt(_)));
        assert_eq!(
            w.check(100, t0 + 4599 * S),
            Verdict::CheckAt(t0 + 4600 * S),
            "never checks past the deadline"
        );
        assert_eq!(w.check(100, t0 + 4600 * S), Verdict::Close(Silent::Idle(3600 * S)));
    }

    #[test]
    fn without_an_idle_timeout_a_used_tunnel_is_never_closed() {
        let t0 = Instant::now();
        let mut w = IdleWatch::new(
            IdleTimeouts {
                idle: None,
                ..timeouts()
            },
            t0,
        );
        for day in 1..=30u32 {
            assert!(matches!(w.check(1, t0 + 86_400 * S * day), Verdict::CheckAt(_)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_fires_on_tokio_time() {
        let activity = Activity::default();
        let started = Instant::now();
        assert_eq!(watch(timeouts(), &activity).await, Silent::Unused(30 * S));
        assert_eq!(started.elapsed(), 30 * S);
        activity.add(1);
        let started = Instant::now();
        assert_eq!(watch(timeouts(), &activity).await, Silent::Idle(3600 * S));
        let took = started.elapsed();
        assert!(
            took >= 3600 * S && took <= 3600 * S + 450 * S,
            "closed {took:?} after the last byte"
        );
    }
}
