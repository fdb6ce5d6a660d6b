//! trellisd's Prometheus metrics (prefix `trellis_`), served on the admin endpoint as Prometheus
//! text ([`trellis_admin::render`]).
//!
//! Every label value here is a compile-time constant (`&'static str`), so no family can grow
//! past the handful of series its code names, whatever nodes send. A label taken from input
//! (a node name, a cluster) must go through [`trellis_admin::limit::LabelSetLimit`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of a push: `snapshot`, `resume` or `delta`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    pub kind: &'static str,
}

/// Every metric trellisd exports.
pub struct Metrics {
    pub registry: Registry,
    pub connected_nodes: Gauge,
    pub pushes: Family<PushLabels, Counter>,
    pub push_errors: Counter,
    pub push_latency: Histogram,
    pub model_version: Gauge,
    pub model_build_seconds: Histogram,
    pub discovery_problems: Gauge,
    pub workloads: Gauge,
    pub services: Gauge,
    pub federation_joined: Gauge,
    pub federation_synced: Gauge,
    pub federation_stale: Gauge,
    pub federation_members: Gauge,
    pub federation_refused_keys: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let connected_nodes = Gauge::default();
        let pushes = Family::<PushLabels, Counter>::default();
        let push_errors = Counter::default();
        let push_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let model_version = Gauge::default();
        let model_build_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let discovery_problems = Gauge::default();
        let workloads = Gauge::default();
        let services = Gauge::default();
        let federation_joined = Gauge::default();
        let federation_synced = Gauge::default();
        let federation_stale = Gauge::default();
        let federation_members = Gauge::default();
        let federation_refused_keys = Gauge::default();
        registry.register(
            "federation_joined",
            "1 while this cluster's membership is in force",
            federation_joined.clone(),
        );
        registry.register(
            "federation_synced",
            "1 once the federation was read in full and while it is not stale",
            federation_synced.clone(),
        );
        registry.register(
            "federation_stale",
            "1 while etcd is unreachable or the watch broke (the last view is served)",
            federation_stale.clone(),
        );
        registry.register(
            "federation_members",
            "Member clusters accepted, this one included",
            federation_members.clone(),
        );
        registry.register(
            "federation_refused_keys",
            "etcd keys refused (bad key, value or claim); /status and the log name each",
            federation_refused_keys.clone(),
        );
        registry.register(
            "config_connected_nodes",
            "Nodes subscribed to the config stream",
            connected_nodes.clone(),
        );
        registry.register("config_pushes", "Config updates sent to nodes", pushes.clone());
        registry.register(
            "config_push_errors",
            "Config updates a node rejected",
            push_errors.clone(),
        );
        registry.register(
            "config_push_latency_seconds",
            "From a discovered change to the node's acknowledgement",
            push_latency.clone(),
        );
        registry.register("config_version", "Current model version", model_version.clone());
        registry.register(
            "config_model_build_seconds",
            "Time to rebuild the mesh model after a change",
            model_build_seconds.clone(),
        );
        registry.register(
            "discovery_problems",
            "Discovery sources' current problems (bad files)",
            discovery_problems.clone(),
        );
        registry.register("discovery_workloads", "Workloads discovered", workloads.clone());
        registry.register("discovery_services", "Services discovered", services.clone());
        Self {
            registry,
            connected_nodes,
            pushes,
            push_errors,
            push_latency,
            model_version,
            model_build_seconds,
            discovery_problems,
            workloads,
            services,
            federation_joined,
            federation_synced,
            federation_stale,
            federation_members,
            federation_refused_keys,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        trellis_admin::render(&self.registry)
    }
}
