//! The loopback admin endpoint: `/status` (what `trellis status` and `trellis traffic status`
//! print), `/config_dump` (the whole model as JSON), `/metrics` (Prometheus text). HTTP/1.1,
//! GET only.

use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_admin::{serve_routes, Route, PROMETHEUS_TEXT};
use trellis_api::config::v1::resource::Kind as Variant;

use crate::federate::FederationStatus;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::stream::ConfigStream;
use trellis_mesh::model::ClusterInfo;

mod dump;
mod global;

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct Admin {
    pub hub: Hub,
    pub stream: ConfigStream,
    pub metrics: Arc<Metrics>,
    pub cluster: ClusterInfo,
    pub federation: watch::Receiver<FederationStatus>,
}

impl Admin {
    /// Enrolled namespaces, workloads per node, connected nodes, problems.
    pub fn status(&self) -> serde_json::Value {
        let published = self.hub.model.borrow().clone();
        let discovered = self.hub.discovered.borrow().clone();
        let enrolled: Vec<&String> = discovered
            .inventory
            .namespaces
            .iter()
            .filter(|(_, (ns, _))| {
                ns.labels.get(trellis_mesh::model::DATAPLANE_MODE).map(String::as_str) == Some("ambient")
            })
            .map(|(name, _)| name)
            .collect();
        let mut nodes = serde_json::Map::new();
        for (node, entries) in &published.model.by_node {
            let workloads: Vec<serde_json::Value> = entries
                .iter()
                .filter_map(|r| match r.resource.kind.as_ref() {
                    Some(Variant::Workload(w)) => Some(json!({
                        "name": format!("{}/{}", w.namespace, w.name),
                        "address": w.addresses.first().and_then(|a| trellis_api::addr::from_bytes(a).ok()).map(|ip| ip.to_string()),
                        "enrolled": w.enrolled,
                        "ready": w.ready,
                        "identity": w.identity,
                    })),
                    _ => None,
                })
                .collect();
            nodes.insert(node.clone(), workloads.into());
        }
        json!({
            "cluster": self.cluster.name,
            "trust_domain": self.cluster.trust_domain.to_string(),
            "version": published.version,
            "enrolled_namespaces": enrolled,
            "workloads_by_node": nodes,
            "services": published.model.services().count(),
            "policies": published.model.policies().count(),
            "connected_nodes": self.stream.connected(),
            "problems": discovered.problems,
            "federation": self.federation_status(),
            "global_services": self.global_services(&published.model),
        })
    }

    /// Per global service: its weights, each cluster's endpoints and health, and who serves
    /// now from this cluster's point of view (see [`global`]).
    pub fn global_services(&self, model: &trellis_mesh::model::MeshModel) -> serde_json::Value {
        let f = self.federation.borrow().clone();
        let region = f.membership.as_ref().map(|m| m.region.clone()).unwrap_or_default();
        let federation = f.sync.as_ref().map(|s| &*s.federation);
        global::global_services(model, &self.cluster.name, &region, federation)
    }

    /// The membership, the sync's state and every member as this cluster reads it (`trellis
    /// federation status`); `null` before joining.
    pub fn federation_status(&self) -> serde_json::Value {
        let f = self.federation.borrow().clone();
        let Some(m) = f.membership else {
            return json!({"joined": false, "error": f.error});
        };
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let sync = f.sync.unwrap_or_default();
        let members: Vec<serde_json::Value> = sync
            .federation
            .members
            .values()
            .map(|member| {
                json!({
                    "cluster": member.record.name,
                    "trust_domain": member.trust_domain.to_string(),
                    "network": member.record.network,
                    "region": member.record.region,
                    "zone": member.record.zone,
                    "gateway": member.record.gateway.as_ref().map(|g| format!("{}:{}", g.address, g.hbone_port)),
                    "bundle": member.bundle.is_some(),
                    "services": member.services.keys().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
                    "endpoints": member.endpoints.values().map(|e| e.endpoints.len()).sum::<usize>(),
                })
            })
            .collect();
        let problems: Vec<String> = sync
            .federation
            .problems
            .iter()
            .map(|(k, why)| format!("{k}: {why}"))
            .chain(f.problems.iter().cloned())
            .collect();
        json!({
            "joined": true,
            "error": f.error,
            "etcd": m.etcd_endpoints,
            "synced": sync.synced,
            "published": sync.published,
            "stale_since_unix": sync.stale_since.map(unix),
            "last_error": sync.last_error,
            "revision": sync.federation.revision,
            "relists": sync.relists,
            "members": members,
            "problems": problems,
        })
    }

    /// Every resource of the model, as the nodes receive them: kind → `namespace/name` → the
    /// resource as a JSON object (see [`dump`]).
    pub fn config_dump(&self) -> serde_json::Value {
        let published = self.hub.model.borrow().clone();
        let m = &published.model;
        json!({
            "version": published.version,
            "workloads": dump::by_key(m.workloads()),
            "services": dump::by_key(m.services()),
            "policies": dump::by_key(m.policies()),
            "waypoints": dump::by_key(m.waypoints()),
            "routes": dump::by_key(m.routes()),
        })
    }

    fn handle(&self, path: &str) -> (StatusCode, &'static str, String) {
        match path {
            "/status" => (StatusCode::OK, "application/json", self.status().to_string()),
            "/config_dump" => (StatusCode::OK, "application/json", self.config_dump().to_string()),
            "/metrics" => (StatusCode::OK, PROMETHEUS_TEXT, self.metrics.render()),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /status, /config_dump or /metrics\n".to_string(),
            ),
        }
    }
}

/// Serves `admin` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, admin: Admin) {
    let route: Route = Arc::new(move |method: &Method, path: &str, _: Option<&str>| {
        if method == Method::GET {
            admin.handle(path)
        } else {
            (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".to_string())
        }
    });
    serve_routes(listener, route).await
}
