//! Inbound tunnels (15008): each CONNECT is checked, authorized and delivered to a local pod.
//!
//! Answers (DESIGN.md): 200 tunnel open, 400 malformed (not a CONNECT, a bad authority, an
//! address that is no enrolled workload of this node, or one whose identity is not the one the
//! connection was opened for), 401 denied by policy, 503 the pod is unreachable.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, StatusCode};

use super::Proxy;
use crate::hbone::copy::splice;
use crate::hbone::server::{BoxFuture, ConnInfo, Handler};
pub use crate::hbone::tunnel::status_only;
use crate::hbone::tunnel::Reply;
use crate::hbone::{dial, parse_baggage};
use crate::metrics::{ConnLabels, DecisionLabels};
use crate::policy::{authorize, Decision, Source};
use crate::state::{LocalWorkload, ProxyState};

/// The 15008 handler.
pub struct Inbound {
    pub proxy: Arc<Proxy>,
}

impl Handler for Inbound {
    fn handle<R: Reply>(self: Arc<Self>, conn: Arc<ConnInfo>, request: Request<()>, reply: R) -> BoxFuture {
        Box::pin(async move { self.tunnel(conn, request, reply).await })
    }
}

/// Decides which local workload a CONNECT is for, or the status that refuses it.
pub fn route(
    method: &Method,
    authority: Option<&str>,
    state: &ProxyState,
    conn: &ConnInfo,
) -> Result<(Arc<LocalWorkload>, SocketAddr), (StatusCode, String)> {
    if method != Method::CONNECT {
        return Err((StatusCode::BAD_REQUEST, format!("{method} is not CONNECT")));
    }
    let authority = authority.ok_or((StatusCode::BAD_REQUEST, "CONNECT without :authority".to_string()))?;
    let addr: SocketAddr = match authority.parse() {
        Ok(addr) => addr,
        Err(_) if conn.to_workload.is_some() => {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(":authority {authority:?} names no address, but the connection was made to a workload's"),
            ))
        }
        Err(_) => return route_to_service(authority, state, conn),
    };
    if let Some(to) = conn.to_workload.filter(|to| *to != addr.ip()) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "the connection was made to {to}, so its tunnels go to {to}, not {}",
                addr.ip()
            ),
        ));
    }
    let workload = state.enrolled_local(addr.ip()).ok_or((
        StatusCode::BAD_REQUEST,
        format!("{} is not an enrolled workload on this node", addr.ip()),
    ))?;
    if workload.identity != conn.served {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "{} is {}, but the connection was opened for {}",
                addr.ip(),
                workload.identity,
                conn.served
            ),
        ));
    }
    Ok((workload.clone(), addr))
}

/// A CONNECT through an east-west gateway names a service, `<name>.<namespace>[.svc...]:<port>`
/// ([`crate::hbone::nested`]): it goes to a healthy pod of that service on this node that has
/// the identity the connection was opened for, on the service port's target port.
fn route_to_service(
    authority: &str,
    state: &ProxyState,
    conn: &ConnInfo,
) -> Result<(Arc<LocalWorkload>, SocketAddr), (StatusCode, String)> {
    let (namespace, name, port) = service_authority(authority).ok_or((
        StatusCode::BAD_REQUEST,
        format!(":authority {authority:?} is neither <ip>:<port> nor <service>.<namespace>:<port>"),
    ))?;
    let service = state
        .service(&namespace, &name)
        .ok_or((StatusCode::BAD_REQUEST, format!("no service {namespace}/{name} here")))?;
    let target = *service.ports.get(&port).ok_or((
        StatusCode::BAD_REQUEST,
        format!("service {namespace}/{name} has no port {port}"),
    ))?;
    let here: Vec<&Arc<LocalWorkload>> = service
        .endpoints
        .iter()
        .filter(|e| e.healthy && e.gateway.is_none())
        .filter_map(|e| state.enrolled_local(e.ip))
        .filter(|w| w.identity == conn.served)
        .collect();
    if here.is_empty() {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no ready pod of {namespace}/{name} with identity {} on this node",
                conn.served
            ),
        ));
    }
    static TURN: AtomicUsize = AtomicUsize::new(0);
    let workload = here[TURN.fetch_add(1, Ordering::Relaxed) % here.len()];
    Ok((workload.clone(), SocketAddr::new(workload.ip, target)))
}

/// `(namespace, name, port)` of an authority naming a service: `<name>.<namespace>:<port>`,
/// optionally followed by `.svc` and a cluster domain before the port.
pub fn service_authority(authority: &str) -> Option<(String, String, u16)> {
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let mut labels = host.split('.');
    let (name, namespace) = (labels.next()?, labels.next()?);
    match labels.next() {
        None | Some("svc") => {}
        Some(_) => return None,
    }
    let label = |l: &str| trellis_identity::id::check_name(l).is_ok();
    if !label(name) || !label(namespace) || !labels.all(label) {
        return None;
    }
    Some((namespace.to_string(), name.to_string(), port))
}

impl Inbound {
    async fn tunnel<R: Reply>(&self, conn: Arc<ConnInfo>, request: Request<()>, reply: R) {
        let _open = self.proxy.drain.track();
        let started = Instant::now();
        let state = self.proxy.state();
        let authority = request.uri().authority().map(|a| a.as_str().to_string());
        let (workload, addr) = match route(request.method(), authority.as_deref(), &state, &conn) {
            Ok(found) => found,
            Err((status, why)) => {
                tracing::warn!(peer = %conn.peer_addr, source = %conn.peer_id, %status, error = %why, "tunnel refused");
                reply.refuse(status).await;
                return;
            }
        };
        // What the peer says about itself (`baggage`, `forwarded`) is only logged; the labels
        // come from its verified identity and this node's state (metrics.rs).
        let claimed = request
            .headers()
            .get("baggage")
            .and_then(|v| v.to_str().ok())
            .map(parse_baggage)
            .unwrap_or_default();
        let forwarded = request
            .headers()
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let src = self.proxy.metrics.peers(&state).source(&conn.peer_id, &workload);
        let labels = ConnLabels {
            reporter: "destination",
            source_workload: src.workload,
            source_workload_namespace: src.namespace,
            source_principal: src.principal,
            source_cluster: src.cluster,
            destination_workload: workload.name.clone(),
            destination_workload_namespace: workload.namespace.clone(),
            destination_principal: workload.identity.to_string(),
            destination_service: String::new(),
            destination_cluster: workload.cluster.clone(),
            connection_security_policy: "mutual_tls".into(),
        };
        let source = Source {
            principal: Some(&conn.peer_id),
            port: addr.port(),
        };
        let decision = authorize(state.policies(&workload.namespace), &workload.labels, &source);
        self.proxy.metrics.decision(DecisionLabels {
            decision: if decision == Decision::Allow { "allow" } else { "deny" }.into(),
            destination_workload: workload.name.clone(),
            destination_workload_namespace: workload.namespace.clone(),
            source_principal: labels.source_principal.clone(),
        });
        if let Decision::Deny(why) = decision {
            tracing::warn!(source = %conn.peer_id, destination = %addr, workload = %workload.name, reason = %why, "tunnel denied (401)");
            self.proxy.metrics.failure(&labels);
            reply.refuse(StatusCode::UNAUTHORIZED).await;
            return;
        }
        let tcp = match dial(addr).await {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(source = %conn.peer_id, destination = %addr, error = %e, "workload unreachable (503)");
                self.proxy.metrics.failure(&labels);
                reply.refuse(StatusCode::SERVICE_UNAVAILABLE).await;
                return;
            }
        };
        let (send, recv) = match reply.open().await {
            Ok(halves) => halves,
            Err(e) => {
                tracing::debug!(error = %e, "the client left before the tunnel opened");
                return;
            }
        };
        self.proxy.metrics.tunnel("destination", conn.transport);
        let counters = self.proxy.metrics.connection(labels, false);
        let (moved, result) = splice(tcp, send, recv, &counters, self.proxy.idle, 0).await;
        tracing::info!(
            target: "access",
            reporter = "destination",
            src = %conn.peer_addr,
            forwarded = ?forwarded,
            claimed_source = ?claimed,
            src_identity = %conn.peer_id,
            transport = %conn.transport,
            dst = %addr,
            dst_workload = %workload.name,
            dst_identity = %workload.identity,
            request_bytes = moved.downstream,
            response_bytes = moved.upstream,
            duration_ms = started.elapsed().as_millis() as u64,
            result = %super::outcome(&result),
            "connection closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use trellis_identity::SpiffeId;

    fn state_with(ip: &str, id: &SpiffeId, enrolled: bool) -> ProxyState {
        let mut state = ProxyState::default();
        let w = LocalWorkload {
            name: "cart-1".into(),
            namespace: "shop".into(),
            service_account: "cart".into(),
            cluster: "east".into(),
            ip: ip.parse().unwrap(),
            identity: id.clone(),
            labels: BTreeMap::new(),
            enrolled,
            node_address: None,
            region: String::new(),
            zone: String::new(),
        };
        state.local.insert(w.ip, Arc::new(w));
        state
    }

    #[test]
    fn connect_is_routed_only_to_an_enrolled_local_workload_of_the_served_identity() {
        let cart = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/cart").unwrap();
        let web = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/web").unwrap();
        let conn = |served: &SpiffeId| ConnInfo {
            peer_addr: "10.1.0.12:40000".parse().unwrap(),
            peer_id: web.clone(),
            served: served.clone(),
            to_workload: None,
            transport: crate::hbone::tunnel::Protocol::Http2,
        };
        let state = state_with("10.1.1.10", &cart, true);
        let ok = route(&Method::CONNECT, Some("10.1.1.10:8080"), &state, &conn(&cart)).unwrap();
        assert_eq!(ok.1, "10.1.1.10:8080".parse::<SocketAddr>().unwrap());
        let status = |m: &Method, a: Option<&str>, st: &ProxyState, served: &SpiffeId| {
            route(m, a, st, &conn(served)).unwrap_err().0
        };
        assert_eq!(
            status(&Method::GET, Some("10.1.1.10:8080"), &state, &cart),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(status(&Method::CONNECT, None, &state, &cart), StatusCode::BAD_REQUEST);
        assert_eq!(
            status(&Method::CONNECT, Some("cart:80"), &state, &cart),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(&Method::CONNECT, Some("10.9.9.9:80"), &state, &cart),
            StatusCode::BAD_REQUEST,
            "not local"
        );
        assert_eq!(
            status(&Method::CONNECT, Some("10.1.1.10:8080"), &state, &web),
            StatusCode::BAD_REQUEST,
            "wrong identity"
        );
        let plain = state_with("10.1.1.10", &cart, false);
        assert_eq!(
            status(&Method::CONNECT, Some("10.1.1.10:8080"), &plain, &cart),
            StatusCode::BAD_REQUEST,
            "not enrolled"
        );
    }

    #[test]
    fn a_connection_made_to_a_workloads_address_carries_tunnels_to_that_workload_only() {
        let cart = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/cart").unwrap();
        let web = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/web").unwrap();
        let mut state = state_with("10.1.1.10", &cart, true);
        let twin = state_with("10.1.1.11", &cart, true);
        state.local.extend(twin.local.clone());
        let conn = ConnInfo {
            peer_addr: "10.1.0.12:40000".parse().unwrap(),
            peer_id: web,
            served: cart.clone(),
            to_workload: Some("10.1.1.10".parse().unwrap()),
            transport: crate::hbone::tunnel::Protocol::Http2,
        };
        assert!(route(&Method::CONNECT, Some("10.1.1.10:8080"), &state, &conn).is_ok());
        let refused = |authority: &str| route(&Method::CONNECT, Some(authority), &state, &conn).unwrap_err().0;
        assert_eq!(
            refused("10.1.1.11:8080"),
            StatusCode::BAD_REQUEST,
            "another pod of the same identity"
        );
        assert_eq!(refused("cart.shop:80"), StatusCode::BAD_REQUEST, "a service name");
    }
}
