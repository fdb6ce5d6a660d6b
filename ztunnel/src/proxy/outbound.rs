//! Outbound capture (15001): connections of this node's enrolled workloads, redirected here by
//! nftables with their original destination kept.
//!
//! A service VIP is balanced over its healthy endpoints; an endpoint whose connect fails is
//! ejected and the next one is tried at once (no byte of the client's has been read yet, so
//! the retry is invisible to it). Enrolled endpoints are reached through an HBONE tunnel to
//! their node, presenting the source workload's SVID; others are dialled directly. A denied or
//! failed connection is reset, so the client sees "connection reset".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::{original_dst, reset, Proxy};
use crate::hbone::copy::{copy_plain, splice, Moved};
use crate::hbone::pool::{Key, OpenError, Tunnel};
use crate::hbone::{baggage, dial, forwarded_for, PORT};
use crate::metrics::ConnLabels;
use crate::state::{Destination, Endpoint, LocalWorkload, Service};

/// Accepts captured connections until the drain starts.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    super::accept_loop(listener, proxy, "outbound", handle).await
}

/// How one attempt ended.
enum Attempt {
    Tunnel(Tunnel),
    Direct(TcpStream),
}

async fn handle(proxy: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) {
    let _open = proxy.drain.track();
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let dst = match original_dst(&tcp) {
        Ok(dst) => dst,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "connection on 15001 without an original destination (not redirected by capture); refused");
            return reset(tcp);
        }
    };
    let state = proxy.state();
    let Some(source) = state.enrolled_local(peer.ip()).cloned() else {
        tracing::warn!(%peer, %dst, "captured connection from an address that is no enrolled workload on this node; refused");
        return reset(tcp);
    };
    let (service, candidates, port): (Option<Arc<Service>>, Vec<Endpoint>, u16) = match state.destination(dst) {
        Destination::Service { service, target_port } => {
            let order = proxy
                .balancer(&service.namespace, &service.name)
                .pick(&service.endpoints);
            let order = order.into_iter().cloned().collect();
            (Some(service), order, target_port)
        }
        Destination::Workload { endpoint, service } => (service, vec![endpoint], dst.port()),
        Destination::Passthrough => return passthrough(&proxy, tcp, peer, dst, &source, started).await,
    };
    let mut labels = ConnLabels {
        reporter: "source",
        source_workload: source.name.clone(),
        source_workload_namespace: source.namespace.clone(),
        source_principal: source.identity.to_string(),
        source_cluster: source.cluster.clone(),
        destination_service: service
            .as_ref()
            .map(|s| format!("{}.{}", s.name, s.namespace))
            .unwrap_or_default(),
        ..Default::default()
    };
    if candidates.is_empty() {
        tracing::warn!(src = %peer, %dst, service = %labels.destination_service, "no healthy endpoint; connection reset");
        proxy.metrics.failures.get_or_create(&labels).inc();
        return reset(tcp);
    }
    let balancer = service.as_ref().map(|s| proxy.balancer(&s.namespace, &s.name));
    for endpoint in &candidates {
        let target = SocketAddr::new(endpoint.ip, port);
        labels.destination_workload = endpoint.name.clone();
        labels.destination_cluster = endpoint.cluster.clone();
        labels.destination_principal = endpoint.identity.as_ref().map(ToString::to_string).unwrap_or_default();
        labels.destination_workload_namespace = service.as_ref().map(|s| s.namespace.clone()).unwrap_or_default();
        labels.connection_security_policy = if endpoint.enrolled { "mutual_tls" } else { "none" }.into();
        match attempt(&proxy, &source, peer, endpoint, target).await {
            Ok(opened) => {
                if let Some(b) = &balancer {
                    b.succeeded(endpoint.ip);
                }
                let counters = proxy.metrics.connection(labels.clone(), true);
                let (moved, result) = match opened {
                    Attempt::Tunnel(t) => splice(tcp, t.send, t.recv, &counters).await,
                    Attempt::Direct(upstream) => copy_plain(tcp, upstream, &counters).await,
                };
                return access_log(&labels, peer, dst, target, moved, result, started);
            }
            Err(e) if !e.endpoint_failed() => {
                tracing::warn!(src = %peer, %dst, endpoint = %target, error = %e, "connection refused; reset");
                proxy.metrics.failures.get_or_create(&labels).inc();
                return reset(tcp);
            }
            Err(e) => {
                tracing::warn!(src = %peer, %dst, endpoint = %target, error = %e, "endpoint failed; ejected, trying the next");
                proxy.metrics.failures.get_or_create(&labels).inc();
                if let Some(b) = &balancer {
                    b.failed(endpoint.ip);
                }
            }
        }
    }
    tracing::warn!(src = %peer, %dst, "every endpoint failed; connection reset");
    reset(tcp)
}

async fn attempt(
    proxy: &Proxy,
    source: &LocalWorkload,
    peer: SocketAddr,
    endpoint: &Endpoint,
    target: SocketAddr,
) -> Result<Attempt, OpenError> {
    let (true, Some(identity), Some(node)) = (endpoint.enrolled, &endpoint.identity, endpoint.node_address) else {
        return dial(target)
            .await
            .map(Attempt::Direct)
            .map_err(|e| OpenError::Connect(target, e));
    };
    let key = Key {
        source: source.identity.clone(),
        node: SocketAddr::new(node, PORT),
        destination: identity.clone(),
    };
    let headers = [
        ("forwarded", forwarded_for(peer)),
        ("baggage", baggage(&source.cluster, &source.namespace, &source.name)),
    ];
    proxy.pool.open(&key, target, &headers).await.map(Attempt::Tunnel)
}

async fn passthrough(
    proxy: &Proxy,
    tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    source: &LocalWorkload,
    started: Instant,
) {
    let labels = ConnLabels {
        reporter: "source",
        source_workload: source.name.clone(),
        source_workload_namespace: source.namespace.clone(),
        source_principal: source.identity.to_string(),
        source_cluster: source.cluster.clone(),
        connection_security_policy: "none".into(),
        ..Default::default()
    };
    let upstream = match dial(dst).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(src = %peer, %dst, error = %e, "passthrough destination unreachable");
            proxy.metrics.failures.get_or_create(&labels).inc();
            return reset(tcp);
        }
    };
    let counters = proxy.metrics.connection(labels.clone(), true);
    let (moved, result) = copy_plain(tcp, upstream, &counters).await;
    access_log(&labels, peer, dst, dst, moved, result, started);
}

fn access_log(
    labels: &ConnLabels,
    peer: SocketAddr,
    dst: SocketAddr,
    endpoint: SocketAddr,
    moved: Moved,
    result: std::io::Result<()>,
    started: Instant,
) {
    tracing::info!(
        target: "access",
        reporter = "source",
        src = %peer,
        src_identity = %labels.source_principal,
        dst = %dst,
        endpoint = %endpoint,
        dst_service = %labels.destination_service,
        dst_workload = %labels.destination_workload,
        dst_identity = %labels.destination_principal,
        security = %labels.connection_security_policy,
        request_bytes = moved.upstream,
        response_bytes = moved.downstream,
        duration_ms = started.elapsed().as_millis() as u64,
        result = %super::outcome(&result),
        "connection closed"
    );
}
