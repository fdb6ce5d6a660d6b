//! The loopback admin endpoint: `/status` (what `trellis status` prints), `/config_dump` (the
//! whole model), `/metrics` (Prometheus text). HTTP/1.1, GET only.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use trellis_api::config::v1::resource::Kind as Variant;

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::ClusterInfo;
use crate::stream::ConfigStream;

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct Admin {
    pub hub: Hub,
    pub stream: ConfigStream,
    pub metrics: Arc<Metrics>,
    pub cluster: ClusterInfo,
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
            .filter(|(_, (ns, _))| ns.labels.get(crate::model::DATAPLANE_MODE).map(String::as_str) == Some("ambient"))
            .map(|(name, _)| name)
            .collect();
        let mut nodes = serde_json::Map::new();
        for (node, entries) in &published.model.by_node {
            let workloads: Vec<serde_json::Value> = entries
                .iter()
                .filter_map(|r| match r.resource.kind.as_ref() {
                    Some(Variant::Workload(w)) => Some(json!({
                        "name": format!("{}/{}", w.namespace, w.name),
                        "address": w.addresses.first(),
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
        })
    }

    /// Every resource of the model, as the nodes receive them.
    pub fn config_dump(&self) -> serde_json::Value {
        let published = self.hub.model.borrow().clone();
        let m = &published.model;
        let dump = |items: &mut dyn Iterator<Item = (&crate::discovery::ObjectKey, &Arc<crate::model::Entry>)>| {
            items
                .map(|(k, e)| (k.to_string(), json!(format!("{:?}", e.resource))))
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "version": published.version,
            "workloads": dump(&mut m.workloads()),
            "services": dump(&mut m.services()),
            "policies": dump(&mut m.policies()),
            "waypoints": dump(&mut m.waypoints()),
            "routes": dump(&mut m.routes()),
        })
    }

    fn handle(&self, path: &str) -> (StatusCode, &'static str, String) {
        match path {
            "/status" => (StatusCode::OK, "application/json", self.status().to_string()),
            "/config_dump" => (StatusCode::OK, "application/json", self.config_dump().to_string()),
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.render(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /status, /config_dump or /metrics\n".to_string(),
            ),
        }
    }
}

/// A response: status, content type, body.
pub type Reply = (StatusCode, &'static str, String);

/// Answers one request from its method, path and query.
pub type Route = Arc<dyn Fn(&Method, &str, Option<&str>) -> Reply + Send + Sync>;

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

/// Serves `route` over HTTP/1.1 on `listener` until the task is aborted; accept errors (out of
/// descriptors, say) are retried after a short pause. trellisd's and ztunnel's small HTTP
/// endpoints all run on this.
pub async fn serve_routes(listener: TcpListener, route: Route) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let route = route.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, content_type, body) = route(req.method(), req.uri().path(), req.uri().query());
                let response = Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default();
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
