//! ztunnel's Prometheus metrics (prefix `trellis_`, names of DESIGN.md Observability), served
//! on 15020.
//!
//! Byte counters follow Istio's convention, from the server's point of view, at both
//! reporters: `received_bytes` is what the client sent (the request direction), `sent_bytes`
//! what the server sent back. They move while the connection is open, not only at its close.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::hbone::copy::OnBytes;

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
    pub cert_expiry: Family<IdentityLabels, Gauge>,
    pub config_version: Gauge,
    pub config_connected: Gauge,
    pub captured_workloads: Gauge,
    pub capture_in_sync: Gauge,
    pub capture_apply_failures: Counter,
    pub capture_readback_failures: Counter,
    pub capture_drift: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            failures: Family::default(),
            decisions: Family::default(),
            cert_expiry: Family::default(),
            config_version: Gauge::default(),
            config_connected: Gauge::default(),
            captured_workloads: Gauge::default(),
            capture_in_sync: Gauge::default(),
            capture_apply_failures: Counter::default(),
            capture_readback_failures: Counter::default(),
            capture_drift: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("tcp_connections_opened", "TCP connections opened", m.opened.clone());
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
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        trellis_admin::render(&self.registry)
    }

    /// Counts a connection open and returns the handles that count its bytes and its close.
    /// `tcp_is_client`: whether the TCP side of the tunnel is the client (source reporter).
    pub fn connection(&self, labels: ConnLabels, tcp_is_client: bool) -> ConnMetrics {
        self.opened.get_or_create(&labels).inc();
        ConnMetrics {
            sent: self.sent.get_or_create(&labels).clone(),
            received: self.received.get_or_create(&labels).clone(),
            closed: self.closed.get_or_create(&labels).clone(),
            tcp_is_client,
        }
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
