//! Endpoint choice for a service VIP, and passive ejection, as pure functions over plain data.
//!
//! Healthy endpoints are taken round-robin from a per-service cursor. An endpoint whose connect
//! fails is ejected for a backoff that doubles with each consecutive failure (1 s up to 30 s);
//! the caller retries at once on the next candidate. If every healthy endpoint is ejected, the
//! ejected ones are tried anyway rather than failing outright (as Envoy's panic threshold does).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::Endpoint;

const BASE_EJECTION: Duration = Duration::from_secs(1);
const MAX_EJECTION: Duration = Duration::from_secs(30);

/// Consecutive failures and ejection deadline of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub failures: u32,
    pub until: Instant,
}

/// Orders `endpoints` for one connection: healthy, non-ejected ones first, starting at `cursor`
/// and wrapping; then healthy ejected ones, soonest back first. Unhealthy endpoints are left out.
pub fn candidates<'a>(
    endpoints: &'a [Endpoint],
    ejections: &HashMap<IpAddr, Ejection>,
    cursor: usize,
    now: Instant,
) -> Vec<&'a Endpoint> {
    let healthy: Vec<&Endpoint> = endpoints.iter().filter(|e| e.healthy).collect();
    if healthy.is_empty() {
        return Vec::new();
    }
    let start = cursor % healthy.len();
    let rotated = healthy[start..].iter().chain(&healthy[..start]).copied();
    let ejected_at = |e: &Endpoint| ejections.get(&e.ip).filter(|ej| ej.until > now).map(|ej| ej.until);
    let (mut ready, mut ejected): (Vec<_>, Vec<_>) = rotated.partition(|e| ejected_at(e).is_none());
    ejected.sort_by_key(|e| ejected_at(e));
    ready.append(&mut ejected);
    ready
}

/// The ejection after one more failure.
pub fn eject(previous: Option<Ejection>, now: Instant) -> Ejection {
    let failures = previous.map_or(1, |p| p.failures.saturating_add(1));
    let backoff = BASE_EJECTION
        .saturating_mul(1u32 << (failures - 1).min(5))
        .min(MAX_EJECTION);
    Ejection {
        failures,
        until: now + backoff,
    }
}

/// The balancer's shared, mutable part: cursors and ejections.
#[derive(Debug, Default)]
pub struct Balancer {
    cursor: AtomicUsize,
    ejections: Mutex<HashMap<IpAddr, Ejection>>,
}

impl Balancer {
    /// The order in which to try `endpoints` for a new connection.
    pub fn pick<'a>(&self, endpoints: &'a [Endpoint]) -> Vec<&'a Endpoint> {
        let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
        let ejections = self.ejections.lock().unwrap_or_else(|p| p.into_inner());
        candidates(endpoints, &ejections, cursor, Instant::now())
    }

    /// Records a failed connect to `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let mut ejections = self.ejections.lock().unwrap_or_else(|p| p.into_inner());
        let previous = ejections.get(&ip).copied();
        ejections.insert(ip, eject(previous, Instant::now()));
    }

    /// Records a successful connect to `ip`, clearing its ejection.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut ejections = self.ejections.lock().unwrap_or_else(|p| p.into_inner());
        if !ejections.is_empty() {
            ejections.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8, healthy: bool) -> Endpoint {
        Endpoint {
            name: format!("ep-{last}"),
            cluster: "east".into(),
            ip: IpAddr::from([10, 0, 0, last]),
            node: "n".into(),
            node_address: None,
            identity: None,
            enrolled: false,
            healthy,
            gateway: None,
        }
    }

    fn ips(list: &[&Endpoint]) -> Vec<u8> {
        list.iter()
            .map(|e| match e.ip {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect()
    }

    #[test]
    fn round_robin_skips_unhealthy_endpoints() {
        let eps = [ep(1, true), ep(2, false), ep(3, true)];
        let now = Instant::now();
        let none = HashMap::new();
        assert_eq!(ips(&candidates(&eps, &none, 0, now)), [1, 3]);
        assert_eq!(ips(&candidates(&eps, &none, 1, now)), [3, 1]);
        assert_eq!(ips(&candidates(&eps, &none, 2, now)), [1, 3]);
    }

    #[test]
    fn an_ejected_endpoint_goes_last_until_its_backoff_ends() {
        let eps = [ep(1, true), ep(2, true), ep(3, true)];
        let now = Instant::now();
        let ejections = HashMap::from([(eps[0].ip, eject(None, now))]);
        assert_eq!(ips(&candidates(&eps, &ejections, 0, now)), [2, 3, 1]);
        assert_eq!(
            ips(&candidates(&eps, &ejections, 0, now + Duration::from_secs(2))),
            [1, 2, 3]
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let now = Instant::now();
        let mut e = eject(None, now);
        assert_eq!(e.until - now, Duration::from_secs(1));
        e = eject(Some(e), now);
        assert_eq!(e.until - now, Duration::from_secs(2));
        for _ in 0..10 {
            e = eject(Some(e), now);
        }
        assert_eq!(e.until - now, MAX_EJECTION);
    }

    #[test]
    fn no_healthy_endpoint_means_no_candidate() {
        assert!(candidates(&[ep(1, false)], &HashMap::new(), 0, Instant::now()).is_empty());
    }
}
