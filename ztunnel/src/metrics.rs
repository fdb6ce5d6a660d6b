//! ztunnel's Prometheus metrics (prefix `trellis_`, names of DESIGN.md Observability), served
//! on 15020.
//!
//! Byte counters follow Istio's convention, from the server's point of view, at both
//! reporters: `received_bytes` is what the client sent (the request direction), `sent_bytes`
//! what the server sent back. They move while the connection is open, not only at its close.
//!
//! Label values come only from what this node knows: its own state (workloads, services,
//! endpoints) and the peer's verified SPIFFE ID, never from what a peer claims (the `baggage`
//! and `forwarded` headers go to the access log only). [`PeerIndex`] names a verified peer.
//! Even so, a peer picks which of the known values show up (a federated CA can mint any ID
//! in its trust domain), so every labelled family is capped at [`LABEL_SET_LIMIT`] distinct
//! label sets; further sets are counted under one overflow set (`other`) and in
//! `trellis_metric_label_sets_dropped_total{family}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use trellis_admin::limit::{LabelSetLimit, OVERFLOW};
use trellis_identity::{IdKind, SpiffeId};

use crate::hbone::copy::OnBytes;
use crate::state::{LocalWorkload, ProxyState};

/// Most distinct label sets kept per family. A node's honest traffic needs about (local
/// workloads × peers it talks to) sets per family; 1024 leaves room for a busy node while
/// capping a scrape at about 5 × 1024 connection series (≈ 4 MB of text) whatever peers do.
pub const LABEL_SET_LIMIT: usize = 1024;

/// The value of a source label this node cannot vouch for.
pub const UNKNOWN: &str = "unknown";

/// Labels of every TCP metric.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `source` or `destination`: which ztunnel of the two reports.
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_cluster: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: String,
}

/// Labels of an authorization decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub source_principal: String,
}

impl ConnLabels {
    /// The overflow set: the reporter and the security policy (two values each) are kept.
    fn overflow(&self) -> Self {
        let other = || OVERFLOW.to_string();
        Self {
            reporter: self.reporter,
            source_workload: other(),
            source_workload_namespace: other(),
            source_principal: other(),
            source_cluster: other(),
            destination_workload: other(),
            destination_workload_namespace: other(),
            destination_principal: other(),
            destination_service: other(),
            destination_cluster: other(),
            connection_security_policy: self.connection_security_policy.clone(),
        }
    }
}

impl DecisionLabels {
    /// The overflow set: the decision is kept.
    fn overflow(&self) -> Self {
        Self {
            decision: self.decision.clone(),
            destination_workload: OVERFLOW.into(),
            destination_workload_namespace: OVERFLOW.into(),
            source_principal: OVERFLOW.into(),
        }
    }
}

/// The source half of [`ConnLabels`] at the destination, from the verified peer identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceLabels {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub cluster: String,
}

/// Which workloads the node's state says carry each identity: its own workloads and every
/// service endpoint it knows. Built once per config version.
#[derive(Debug, Default)]
pub struct PeerIndex {
    /// Identity → (workload, cluster), or `None` when several workloads share it.
    by_identity: HashMap<SpiffeId, Option<(String, String)>>,
}

impl PeerIndex {
    pub fn build(state: &ProxyState) -> Self {
        let mut by_identity: HashMap<SpiffeId, Option<(String, String)>> = HashMap::new();
        let mut add = |id: &SpiffeId, name: &str, cluster: &str| {
            let entry = by_identity
                .entry(id.clone())
                .or_insert_with(|| Some((name.to_string(), cluster.to_string())));
            if entry.as_ref().is_some_and(|(n, c)| n != name || c != cluster) {
                *entry = None;
            }
        };
        for w in state.local.values() {
            add(&w.identity, &w.name, &w.cluster);
        }
        for service in state.services() {
            for ep in &service.endpoints {
                if let Some(id) = &ep.identity {
                    add(id, &ep.name, &ep.cluster);
                }
            }
        }
        for ep in state.remote_workloads() {
            if let Some(id) = &ep.identity {
                add(id, &ep.name, &ep.cluster);
            }
        }
        Self { by_identity }
    }

    /// The source labels of a tunnel from `peer` (verified by TLS) to `destination`: the
    /// principal is the peer's ID; the namespace comes from a workload ID's path; the workload
    /// (and its cluster) only when exactly one known workload carries that ID; the cluster
    /// also when the peer shares the destination's trust domain (one per cluster). Anything
    /// else is [`UNKNOWN`].
    pub fn source(&self, peer: &SpiffeId, destination: &LocalWorkload) -> SourceLabels {
        let namespace = match peer.kind() {
            IdKind::Workload { namespace, .. } => namespace.to_string(),
            _ => UNKNOWN.to_string(),
        };
        let known = self.by_identity.get(peer).and_then(Option::as_ref);
        let same_cluster = peer.trust_domain() == destination.identity.trust_domain();
        let cluster = match known {
            Some((_, cluster)) => cluster.clone(),
            None if same_cluster => destination.cluster.clone(),
            None => UNKNOWN.to_string(),
        };
        SourceLabels {
            workload: known.map_or_else(|| UNKNOWN.to_string(), |(name, _)| name.clone()),
            namespace,
            principal: peer.to_string(),
            cluster,
        }
    }
}

/// Labels of the tunnels-by-transport counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `source` (this node opened the tunnel) or `destination` (it accepted it).
    pub reporter: &'static str,
    /// `h2` (HTTP/2 over TCP, 15008) or `h3` (HTTP/3 over QUIC, 15009).
    pub transport: &'static str,
}

/// Labels of the dropped-label-set counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub family: &'static str,
}

/// Labels naming one identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

/// Every metric ztunnel exports.
pub struct Metrics {
    pub registry: Registry,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent: Family<ConnLabels, Counter>,
    pub received: Family<ConnLabels, Counter>,
    pub failures: Family<ConnLabels, Counter>,
    pub decisions: Family<DecisionLabels, Counter>,
    /// Observations folded into a family's overflow set, by family.
    pub dropped: Family<FamilyLabels, Counter>,
    /// Label sets of opened, closed, sent and received (one set per connection, for all four).
    conn_limit: LabelSetLimit<ConnLabels>,
    failure_limit: LabelSetLimit<ConnLabels>,
    decision_limit: LabelSetLimit<DecisionLabels>,
    peers: Mutex<Option<(Weak<ProxyState>, Arc<PeerIndex>)>>,
    /// Bounded by the SVIDs this node holds (cleared and rewritten on each change).
    pub cert_expiry: Family<IdentityLabels, Gauge>,
    pub config_version: Gauge,
    pub config_connected: Gauge,
    pub captured_workloads: Gauge,
    pub capture_in_sync: Gauge,
    pub capture_apply_failures: Counter,
    pub capture_readback_failures: Counter,
    pub capture_drift: Counter,
    /// Tunnels opened, by transport (two label sets per reporter: no limit needed).
    pub tunnels: Family<TransportLabels, Counter>,
    /// QUIC dials that failed and were retried over HTTP/2.
    pub quic_fallbacks: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_limit(LABEL_SET_LIMIT)
    }
}

impl Metrics {
    /// Metrics whose labelled families keep at most `limit` distinct label sets each.
    pub fn with_limit(limit: usize) -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let dropped = Family::<FamilyLabels, Counter>::default();
        let dropped_in = |family| dropped.get_or_create(&FamilyLabels { family }).clone();
        let conn_limit = LabelSetLimit::new(limit, ConnLabels::overflow, dropped_in("tcp_connections"));
        let failure_limit = LabelSetLimit::new(limit, ConnLabels::overflow, dropped_in("tcp_connection_failures"));
        let decision_limit = LabelSetLimit::new(limit, DecisionLabels::overflow, dropped_in("authorization_decisions"));
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            failures: Family::default(),
            decisions: Family::default(),
            dropped,
            conn_limit,
            failure_limit,
            decision_limit,
            peers: Mutex::new(None),
            cert_expiry: Family::default(),
            config_version: Gauge::default(),
            config_connected: Gauge::default(),
            captured_workloads: Gauge::default(),
            capture_in_sync: Gauge::default(),
            capture_apply_failures: Counter::default(),
            capture_readback_failures: Counter::default(),
            capture_drift: Counter::default(),
            tunnels: Family::default(),
            quic_fallbacks: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register(
            "tunnels_opened",
            "HBONE tunnels opened, by transport (h2: HTTP/2 over TCP on 15008, h3: HTTP/3 over QUIC on 15009)",
            m.tunnels.clone(),
        );
        registry.register(
            "quic_fallbacks",
            "HBONE-over-QUIC dials that failed (UDP blocked, handshake timed out) and were retried over HTTP/2",
            m.quic_fallbacks.clone(),
        );
        registry.register("tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register(
            "tcp_sent_bytes",
            "Bytes the server sent back to the client",
            m.sent.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes the client sent to the server",
            m.received.clone(),
        );
        registry.register(
            "tcp_connection_failures",
            "Connections that could not be opened (no endpoint, refused, denied, unreachable)",
            m.failures.clone(),
        );
        registry.register(
            "authorization_decisions",
            "L4 authorization decisions at the destination (decision=allow|deny)",
            m.decisions.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Unix time at which each held SVID expires",
            m.cert_expiry.clone(),
        );
        registry.register(
            "config_version",
            "Config version applied (from trellisd, or from --config-file)",
            m.config_version.clone(),
        );
        registry.register(
            "config_connected",
            "1 while the config stream to trellisd is up and delivering, 0 while it is down (the last config stays in force); \
             always 0 with --config-file, which has no stream (config_version counts the file's reloads)",
            m.config_connected.clone(),
        );
        registry.register(
            "captured_workloads",
            "Enrolled workloads whose traffic this node captures",
            m.captured_workloads.clone(),
        );
        registry.register(
            "capture_rules_in_sync",
            "1 while the capture rules read back from the kernel equal the desired ones (readiness waits for it), else 0",
            m.capture_in_sync.clone(),
        );
        registry.register(
            "capture_apply_failures",
            "nft runs installing the capture rules that failed or timed out (each is retried with backoff)",
            m.capture_apply_failures.clone(),
        );
        registry.register(
            "capture_readback_failures",
            "nft runs reading the capture rules back that failed or timed out",
            m.capture_readback_failures.clone(),
        );
        registry.register(
            "capture_drift",
            "Read backs that found the installed capture rules different from the desired ones (then reinstalled)",
            m.capture_drift.clone(),
        );
        registry.register(
            "metric_label_sets_dropped",
            "Observations whose label set was new after its family reached its limit of distinct label sets; \
             they are counted under the family's overflow series (unbounded labels set to \"other\")",
            m.dropped.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        trellis_admin::render(&self.registry)
    }

    /// Counts a connection open and returns the handles that count its bytes and its close.
    /// `tcp_is_client`: whether the TCP side of the tunnel is the client (source reporter).
    pub fn connection(&self, labels: ConnLabels, tcp_is_client: bool) -> ConnMetrics {
        let labels = self.conn_limit.admit(labels);
        self.opened.get_or_create(&labels).inc();
        ConnMetrics {
            sent: self.sent.get_or_create(&labels).clone(),
            received: self.received.get_or_create(&labels).clone(),
            closed: self.closed.get_or_create(&labels).clone(),
            tcp_is_client,
        }
    }
}

impl Metrics {
    /// Counts a QUIC dial retried over HTTP/2.
    pub fn quic_fallback(&self) {
        self.quic_fallbacks.inc();
    }

    /// Counts a tunnel opened over `transport`.
    pub fn tunnel(&self, reporter: &'static str, transport: crate::hbone::tunnel::Protocol) {
        let transport = match transport {
            crate::hbone::tunnel::Protocol::Http2 => "h2",
            crate::hbone::tunnel::Protocol::Http3 => "h3",
        };
        self.tunnels
            .get_or_create(&TransportLabels { reporter, transport })
            .inc();
    }

    /// Counts a connection that could not be opened.
    pub fn failure(&self, labels: &ConnLabels) {
        let labels = self.failure_limit.admit(labels.clone());
        self.failures.get_or_create(&labels).inc();
    }

    /// Counts an authorization decision.
    pub fn decision(&self, labels: DecisionLabels) {
        let labels = self.decision_limit.admit(labels);
        self.decisions.get_or_create(&labels).inc();
    }

    /// The [`PeerIndex`] of `state`, built at its first use and kept while `state` is current.
    pub fn peers(&self, state: &Arc<ProxyState>) -> Arc<PeerIndex> {
        let mut cached = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((of, index)) = cached.as_ref() {
            if of.upgrade().is_some_and(|s| Arc::ptr_eq(&s, state)) {
                return index.clone();
            }
        }
        let index = Arc::new(PeerIndex::build(state));
        *cached = Some((Arc::downgrade(state), index.clone()));
        index
    }
}

/// Live counters of one connection; counts the close when dropped.
pub struct ConnMetrics {
    sent: Counter,
    received: Counter,
    closed: Counter,
    tcp_is_client: bool,
}

impl OnBytes for ConnMetrics {
    fn upstream(&self, n: u64) {
        if self.tcp_is_client {
            self.received.inc_by(n);
        } else {
            self.sent.inc_by(n);
        }
    }

    fn downstream(&self, n: u64) {
        if self.tcp_is_client {
            self.sent.inc_by(n);
        } else {
            self.received.inc_by(n);
        }
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.closed.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use trellis_api::config::v1 as pb;
    use trellis_api::config::v1::resource::Kind as Variant;
    use trellis_api::slice::key_of;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn cart() -> LocalWorkload {
        LocalWorkload {
            name: "cart-1".into(),
            namespace: "shop".into(),
            service_account: "cart".into(),
            cluster: "east".into(),
            ip: "10.1.1.10".parse().unwrap(),
            identity: id("spiffe://east.trellis.local/ns/shop/sa/cart"),
            labels: BTreeMap::new(),
            enrolled: true,
            node_address: None,
            region: String::new(),
            zone: String::new(),
        }
    }

    fn endpoint(name: &str, ip: [u8; 4], identity: &str) -> pb::Endpoint {
        pb::Endpoint {
            workload_name: name.into(),
            workload_namespace: "shop".into(),
            cluster: "east".into(),
            address: ip.to_vec(),
            node: "node-2".into(),
            node_address: vec![10, 1, 0, 12],
            identity: identity.into(),
            enrolled: true,
            healthy: true,
            ..Default::default()
        }
    }

    /// node-1's state: cart-1 is local; service front's endpoints are web-1 (an identity of its
    /// own) and two replicas of api sharing one.
    fn index() -> PeerIndex {
        let resources = [
            pb::Resource {
                kind: Some(Variant::Workload(pb::Workload {
                    name: "cart-1".into(),
                    namespace: "shop".into(),
                    service_account: "cart".into(),
                    node: "node-1".into(),
                    cluster: "east".into(),
                    addresses: vec![vec![10, 1, 1, 10]],
                    enrolled: true,
                    identity: cart().identity.to_string(),
                    ..Default::default()
                })),
            },
            pb::Resource {
                kind: Some(Variant::Service(pb::Service {
                    name: "front".into(),
                    namespace: "shop".into(),
                    endpoints: vec![
                        endpoint("web-1", [10, 1, 2, 10], "spiffe://east.trellis.local/ns/shop/sa/web"),
                        endpoint("api-1", [10, 1, 2, 11], "spiffe://east.trellis.local/ns/shop/sa/api"),
                        endpoint("api-2", [10, 1, 2, 12], "spiffe://east.trellis.local/ns/shop/sa/api"),
                    ],
                    ..Default::default()
                })),
            },
        ];
        let slice = resources
            .into_iter()
            .map(|r| (key_of(&r).unwrap(), Arc::new(r)))
            .collect();
        let state = ProxyState::from_slice("node-1", 1, &slice);
        assert!(state.problems.is_empty(), "{:?}", state.problems);
        PeerIndex::build(&state)
    }

    #[test]
    fn a_peer_known_as_one_workload_is_named_with_its_cluster() {
        let got = index().source(&id("spiffe://east.trellis.local/ns/shop/sa/web"), &cart());
        assert_eq!(
            got,
            SourceLabels {
                workload: "web-1".into(),
                namespace: "shop".into(),
                principal: "spiffe://east.trellis.local/ns/shop/sa/web".into(),
                cluster: "east".into(),
            }
        );
    }

    #[test]
    fn a_peer_whose_identity_several_or_no_workloads_carry_is_an_unknown_workload() {
        let shared = index().source(&id("spiffe://east.trellis.local/ns/shop/sa/api"), &cart());
        assert_eq!(shared.workload, UNKNOWN);
        assert_eq!(shared.namespace, "shop");
        assert_eq!(
            shared.cluster, "east",
            "same trust domain as the destination: same cluster"
        );
        let stranger = index().source(&id("spiffe://west.trellis.local/ns/attack/sa/x"), &cart());
        assert_eq!(
            stranger,
            SourceLabels {
                workload: UNKNOWN.into(),
                namespace: "attack".into(),
                principal: "spiffe://west.trellis.local/ns/attack/sa/x".into(),
                cluster: UNKNOWN.into(),
            }
        );
        let node = index().source(&id("spiffe://east.trellis.local/trellis/node/n1"), &cart());
        assert_eq!(node.namespace, UNKNOWN);
    }

    #[test]
    fn connection_label_sets_beyond_the_limit_fold_into_one_overflow_series() {
        let metrics = Metrics::with_limit(10);
        for i in 0..500 {
            let labels = ConnLabels {
                reporter: "destination",
                source_principal: format!("spiffe://west.trellis.local/ns/a/sa/x{i}"),
                connection_security_policy: "mutual_tls".into(),
                ..Default::default()
            };
            drop(metrics.connection(labels.clone(), false));
            metrics.failure(&labels);
            metrics.decision(DecisionLabels {
                decision: "allow".into(),
                destination_workload: "cart-1".into(),
                destination_workload_namespace: "shop".into(),
                source_principal: labels.source_principal.clone(),
            });
        }
        let text = metrics.render();
        let series = |name: &str| text.lines().filter(|l| l.starts_with(&format!("{name}{{"))).count();
        for family in [
            "trellis_tcp_connections_opened_total",
            "trellis_tcp_connections_closed_total",
            "trellis_tcp_connection_failures_total",
            "trellis_authorization_decisions_total",
        ] {
            assert_eq!(
                series(family),
                11,
                "{family}: ten admitted and one overflow series\n{text}"
            );
        }
        assert!(
            text.contains("trellis_metric_label_sets_dropped_total{family=\"tcp_connections\"} 490\n"),
            "{text}"
        );
        assert!(text.contains("source_principal=\"other\""), "{text}");
    }
}
