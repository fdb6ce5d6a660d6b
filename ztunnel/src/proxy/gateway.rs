//! The east-west gateway (`ztunnel --gateway`): on the network edge of its cluster, it accepts
//! tunnels from other clusters' ztunnels and splices each to port 15008 of a node of its own
//! cluster that serves the global service the tunnel names ([`crate::hbone::nested`]).
//!
//! It terminates only the outer TLS (its own node identity, to any workload of a federated
//! trust domain) and relays the inner connection's ciphertext: it never holds a key of the
//! workloads behind it, so it cannot read application bytes, and the destination's policy sees
//! the source workload's own identity from the inner handshake. Only services exported with
//! `trellis.io/global=true` are reachable through it, and only on pods of its own cluster.
//!
//! Answers: 200 spliced, 400 malformed (not a CONNECT, an authority that names no service),
//! 404 no such global service, 503 no node of it answered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, StatusCode};
use trellis_identity::SpiffeId;

use super::inbound::service_authority;
use super::Proxy;
use crate::hbone::copy::splice;
use crate::hbone::pool::DESTINATION_HEADER;
use crate::hbone::server::{BoxFuture, ConnInfo, Handler};
use crate::hbone::tunnel::Reply;
use crate::hbone::{dial, PORT};
use crate::lb::Locality;
use crate::metrics::ConnLabels;
use crate::state::{Endpoint, ProxyState, Service};

/// The 15008 handler of a gateway.
pub struct Gateway {
    pub proxy: Arc<Proxy>,
}

impl Handler for Gateway {
    fn handle<R: Reply>(self: Arc<Self>, conn: Arc<ConnInfo>, request: Request<()>, reply: R) -> BoxFuture {
        Box::pin(async move { self.relay(conn, request, reply).await })
    }
}

/// The global service a gateway CONNECT asks for, and the identity its inner connection wants
/// (any, if the header is absent), or the status that refuses it.
pub fn route(
    method: &Method,
    authority: Option<&str>,
    wanted: Option<&str>,
    state: &ProxyState,
) -> Result<(Arc<Service>, Option<SpiffeId>), (StatusCode, String)> {
    if method != Method::CONNECT {
        return Err((StatusCode::BAD_REQUEST, format!("{method} is not CONNECT")));
    }
    let authority = authority.ok_or((StatusCode::BAD_REQUEST, "CONNECT without :authority".to_string()))?;
    let (namespace, name, _) = service_authority(authority).ok_or((
        StatusCode::BAD_REQUEST,
        format!(":authority {authority:?} is not <service>.<namespace>:<port>"),
    ))?;
    let wanted = match wanted {
        None => None,
        Some(id) => Some(
            SpiffeId::parse(id).map_err(|e| (StatusCode::BAD_REQUEST, format!("{DESTINATION_HEADER} {id:?}: {e}")))?,
        ),
    };
    match state.service(&namespace, &name) {
        Some(s) if s.global => Ok((s.clone(), wanted)),
        _ => Err((
            StatusCode::NOT_FOUND,
            format!("no global service {namespace}/{name} in this cluster"),
        )),
    }
}

/// The endpoints of `service` in `cluster` that the gateway may relay to: ready, enrolled pods
/// of its own cluster with the wanted identity (never another gateway: no second hop).
pub fn relayable<'a>(service: &'a Service, cluster: &str, wanted: Option<&SpiffeId>) -> Vec<&'a Endpoint> {
    service
        .endpoints
        .iter()
        .filter(|e| e.cluster == cluster && e.gateway.is_none() && e.enrolled && e.node_address.is_some())
        .filter(|e| wanted.is_none() || e.identity.as_ref() == wanted)
        .collect()
}

impl Gateway {
    async fn relay<R: Reply>(&self, conn: Arc<ConnInfo>, request: Request<()>, reply: R) {
        let _open = self.proxy.drain.track();
        let started = Instant::now();
        let state = self.proxy.state();
        let authority = request.uri().authority().map(|a| a.as_str().to_string());
        let wanted = request.headers().get(DESTINATION_HEADER).and_then(|v| v.to_str().ok());
        let (service, wanted) = match route(request.method(), authority.as_deref(), wanted, &state) {
            Ok(found) => found,
            Err((status, why)) => {
                tracing::warn!(peer = %conn.peer_addr, source = %conn.peer_id, %status, error = %why, "gateway tunnel refused");
                reply.refuse(status).await;
                return;
            }
        };
        let mut labels = ConnLabels {
            reporter: "gateway",
            source_principal: conn.peer_id.to_string(),
            destination_service: format!("{}.{}", service.name, service.namespace),
            destination_workload_namespace: service.namespace.clone(),
            destination_cluster: self.proxy.cluster.clone(),
            connection_security_policy: "mutual_tls".into(),
            ..Default::default()
        };
        let candidates: Vec<Endpoint> = relayable(&service, &self.proxy.cluster, wanted.as_ref())
            .into_iter()
            .cloned()
            .collect();
        let balancer = self.proxy.balancer(&service.namespace, &service.name);
        let here = Locality {
            cluster: &self.proxy.cluster,
            ..Locality::default()
        };
        // Half the sources' connect timeout: a dead node costs the source's attempt a retry
        // here, not the whole gateway's ejection.
        let within = self.proxy.connect_timeout / 2;
        let mut upstream = None;
        let picks = balancer.pick(&candidates, &here, &BTreeMap::new(), &self.proxy.hops, within);
        for endpoint in picks.iter().map(|p| p.endpoint) {
            let Some(node) = endpoint.node_address else { continue };
            let node = SocketAddr::new(node, PORT);
            let dialled = match tokio::time::timeout(within, dial(node)).await {
                Ok(dialled) => dialled,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer within the connect timeout",
                )),
            };
            match dialled {
                Ok(tcp) => {
                    balancer.succeeded(endpoint.ip);
                    self.proxy.hops.succeeded(node.ip());
                    upstream = Some((tcp, node));
                    break;
                }
                Err(e) => {
                    balancer.failed(endpoint.ip);
                    self.proxy.hops.failed(node.ip());
                    tracing::warn!(%node, service = %labels.destination_service, error = %e, "gateway: node unreachable; trying the next");
                }
            }
        }
        let Some((tcp, node)) = upstream else {
            tracing::warn!(source = %conn.peer_id, service = %labels.destination_service, "gateway: no node of the service answered (503)");
            self.proxy.metrics.failure(&labels);
            reply.refuse(StatusCode::SERVICE_UNAVAILABLE).await;
            return;
        };
        let (send, recv) = match reply.open().await {
            Ok(halves) => halves,
            Err(e) => {
                tracing::debug!(error = %e, "the client left before the gateway tunnel opened");
                return;
            }
        };
        labels.destination_workload = node.to_string();
        let counters = self.proxy.metrics.connection(labels.clone(), false);
        let (moved, result) = splice(tcp, send, recv, &counters, self.proxy.idle, 0).await;
        tracing::info!(
            target: "access",
            reporter = "gateway",
            src = %conn.peer_addr,
            src_identity = %conn.peer_id,
            service = %labels.destination_service,
            node = %node,
            request_bytes = moved.downstream,
            response_bytes = moved.upstream,
            duration_ms = started.elapsed().as_millis() as u64,
            result = %super::outcome(&result),
            "gateway tunnel closed"
        );
    }
}
