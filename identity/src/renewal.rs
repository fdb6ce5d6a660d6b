//! When to renew an SVID and how long to wait after a failure: pure functions, so the timing
//! rules are tested without clocks or sockets.

use std::time::{Duration, SystemTime};

/// Renewal happens at half of the lifetime, moved by up to this fraction of the lifetime
/// either way, so that many nodes started together do not renew together.
pub const JITTER_FRACTION: f64 = 0.05;

/// How long to wait, from `now`, before renewing a certificate valid from `not_before` to
/// `not_after`. `jitter` is a sample in `[-1.0, 1.0]`. Returns zero when renewal is due.
pub fn renewal_delay(not_before: SystemTime, not_after: SystemTime, now: SystemTime, jitter: f64) -> Duration {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let fraction = 0.5 + JITTER_FRACTION * jitter.clamp(-1.0, 1.0);
    let renew_at = not_before + lifetime.mul_f64(fraction);
    renew_at.duration_since(now).unwrap_or_default()
}

pub use trellis_api::stream::retry_delay;

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

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
}
