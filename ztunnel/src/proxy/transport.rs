//! Which transport carries a tunnel, per link (issue 15, item 3): HTTP/3 over QUIC (15009/udp)
//! or HTTP/2 over TLS over TCP (15008).
//!
//! The rule ([`choose`], pure): a link to another cluster (its gateway, or its nodes on a shared
//! network) uses [`TransportPolicy::remote`], QUIC by default, since long lossy links are where
//! QUIC's per-stream loss recovery pays; a link inside the cluster uses
//! [`TransportPolicy::local`], HTTP/2 by default; a per-cluster setting overrides both. When a
//! QUIC dial to a node or gateway fails (UDP blocked or dropped: the handshake times out), the
//! connection is retried over HTTP/2 at once, and that destination gets HTTP/2 for
//! [`TransportPolicy::fallback_for`]; then QUIC is tried again.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::hbone::tunnel::Protocol;

/// The transport settings, from the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportPolicy {
    /// Links inside this cluster.
    pub local: Protocol,
    /// Links to other clusters.
    pub remote: Protocol,
    /// Per remote cluster, overriding `remote`.
    pub clusters: BTreeMap<String, Protocol>,
    /// How long a destination whose QUIC dial failed is reached over HTTP/2 before QUIC is tried
    /// again.
    pub fallback_for: Duration,
}

impl Default for TransportPolicy {
    fn default() -> Self {
        Self {
            local: Protocol::Http2,
            remote: Protocol::Http3,
            clusters: BTreeMap::new(),
            fallback_for: Duration::from_secs(300),
        }
    }
}

/// The transport of a link from cluster `here` to an endpoint in cluster `there`, given when a
/// QUIC dial to that destination last failed.
pub fn choose(
    policy: &TransportPolicy,
    here: &str,
    there: &str,
    quic_failed: Option<Instant>,
    now: Instant,
) -> Protocol {
    let wanted = match policy.clusters.get(there) {
        Some(set) if there != here => *set,
        _ if there.is_empty() || there == here => policy.local,
        _ => policy.remote,
    };
    let fell_back = quic_failed.is_some_and(|at| now.saturating_duration_since(at) < policy.fallback_for);
    match wanted {
        Protocol::Http3 if fell_back => Protocol::Http2,
        wanted => wanted,
    }
}

/// The policy and the destinations whose QUIC dials failed lately.
#[derive(Debug, Default)]
pub struct Links {
    policy: RwLock<TransportPolicy>,
    quic_failed: Mutex<HashMap<IpAddr, Instant>>,
}

impl Links {
    pub fn set_policy(&self, policy: TransportPolicy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// The transport for a link to `to` (a node or gateway) in cluster `there`.
    pub fn choose(&self, here: &str, there: &str, to: IpAddr, now: Instant) -> Protocol {
        let policy = self.policy.read().unwrap_or_else(|p| p.into_inner());
        let failed = self
            .quic_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to)
            .copied();
        choose(&policy, here, there, failed, now)
    }

    /// A QUIC dial to `to` failed: HTTP/2 for a while.
    pub fn quic_failed(&self, to: IpAddr, now: Instant) {
        let mut failed = self.quic_failed.lock().unwrap_or_else(|p| p.into_inner());
        let keep = self.policy.read().unwrap_or_else(|p| p.into_inner()).fallback_for;
        failed.retain(|_, at| now.saturating_duration_since(*at) < keep);
        failed.insert(to, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_across_clusters_http2_inside_overridable_per_cluster() {
        let now = Instant::now();
        let mut policy = TransportPolicy::default();
        assert_eq!(
            choose(&policy, "east", "east", None, now),
            Protocol::Http2,
            "inside the cluster"
        );
        assert_eq!(
            choose(&policy, "east", "", None, now),
            Protocol::Http2,
            "no cluster: local"
        );
        assert_eq!(
            choose(&policy, "east", "west", None, now),
            Protocol::Http3,
            "to another cluster"
        );
        policy.clusters.insert("west".into(), Protocol::Http2);
        policy.clusters.insert("east".into(), Protocol::Http3);
        assert_eq!(
            choose(&policy, "east", "west", None, now),
            Protocol::Http2,
            "west overridden"
        );
        assert_eq!(
            choose(&policy, "east", "east", None, now),
            Protocol::Http2,
            "a setting for one's own cluster is no remote override"
        );
        policy.local = Protocol::Http3;
        assert_eq!(
            choose(&policy, "east", "east", None, now),
            Protocol::Http3,
            "local set to QUIC"
        );
    }

    #[test]
    fn a_failed_quic_dial_falls_back_to_http2_for_a_while_then_quic_again() {
        let policy = TransportPolicy::default();
        let at = Instant::now();
        assert_eq!(choose(&policy, "east", "west", Some(at), at), Protocol::Http2);
        let later = at + policy.fallback_for - Duration::from_millis(1);
        assert_eq!(choose(&policy, "east", "west", Some(at), later), Protocol::Http2);
        let after = at + policy.fallback_for;
        assert_eq!(
            choose(&policy, "east", "west", Some(at), after),
            Protocol::Http3,
            "QUIC tried again"
        );
        assert_eq!(
            choose(&policy, "east", "east", Some(at), at),
            Protocol::Http2,
            "HTTP/2 links are not affected"
        );
    }

    #[test]
    fn links_remember_failures_per_destination() {
        let links = Links::default();
        let (a, b): (IpAddr, IpAddr) = ("10.2.0.20".parse().unwrap(), "10.3.0.20".parse().unwrap());
        let now = Instant::now();
        links.quic_failed(a, now);
        assert_eq!(links.choose("east", "west", a, now), Protocol::Http2);
        assert_eq!(links.choose("east", "west", b, now), Protocol::Http3, "another gateway");
    }
}
