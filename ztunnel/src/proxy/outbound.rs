//! Outbound capture (15001): connections of this node's enrolled workloads, redirected here by
//! nftables with their original destination kept.
//!
//! A service VIP is balanced over its healthy endpoints by locality or by the service's cluster
//! weights ([`crate::lb`]); an endpoint whose connect fails, or does not succeed within the
//! connect timeout, is ejected (with its node or gateway when that is what failed) and the next
//! one is tried at once, invisibly to the client. Enrolled endpoints are
//! reached through an HBONE tunnel to their node, presenting the source workload's SVID; others
//! are dialled directly. A denied or failed connection is reset, so the client sees
//! "connection reset".
//!
//! The client's first bytes, when it has sent some by the time its connection is accepted,
//! leave with the CONNECT rather than after the 200: one round trip between nodes less per
//! connection. A copy is kept until the answer; a retry replays it only when no byte can have
//! reached a workload (the tunnel never opened, or the destination answered 503, 400 or
//! REFUSED_STREAM).

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::{reset, Proxy};
use crate::hbone::copy::{copy_plain, splice, Moved, OnBytes};
use crate::hbone::original_dst;
use crate::hbone::pool::{Key, OpenError, Tunnel, Via};
use crate::hbone::tunnel::Protocol;
use crate::hbone::{baggage, dial, forwarded_for, PORT};
use crate::lb::{self, Locality, Tier};
use crate::metrics::ConnLabels;
use crate::state::{Destination, Endpoint, LocalWorkload, Service};

/// Accepts captured connections until the drain starts.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    super::accept_loop(listener, proxy, "outbound", handle).await
}

/// Most client bytes sent with the CONNECT: a request line and headers, a TLS ClientHello.
const EARLY_LIMIT: usize = 16 * 1024;

/// Most parallel inner connections from one source to one service through a gateway: the
/// gateway puts each on a node of its choosing, so a few spread the load over the far cluster
/// while each stays pooled.
const MAX_LANES: u32 = 4;
/// Turns new connections through gateways over the lanes.
static LANE: AtomicUsize = AtomicUsize::new(0);

/// How one attempt ended.
enum Attempt {
    Tunnel(Tunnel, Protocol),
    Direct(TcpStream),
}

async fn handle(proxy: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) {
    let _open = proxy.drain.track();
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let dst = match original_dst(&tcp, peer) {
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
    let from = Locality {
        cluster: &source.cluster,
        region: &source.region,
        zone: &source.zone,
    };
    let mut balancer = None;
    let (service, candidates, port): (Option<Arc<Service>>, Vec<(Endpoint, Tier)>, u16) = match state.destination(dst) {
        Destination::Service { service, target_port } => {
            let order = balancer.insert(proxy.balancer(&service.namespace, &service.name)).pick(
                &service.endpoints,
                &from,
                &service.weights,
                &proxy.hops,
                proxy.connect_timeout,
            );
            let order = order.into_iter().map(|p| (p.endpoint.clone(), p.tier)).collect();
            (Some(service), order, target_port)
        }
        Destination::Workload { endpoint, service } => {
            let tier = lb::tier(&endpoint, &from);
            (service, vec![(*endpoint, tier)], dst.port())
        }
        Destination::Passthrough => return passthrough(&proxy, tcp, peer, dst, &source, started).await,
        Destination::Unknown => {
            // It may be an enrolled pod this node has not heard of yet: never plaintext.
            tracing::warn!(src = %peer, %dst, "no workload known at this address of the mesh's pod networks; refused rather than sent in plaintext");
            proxy.metrics.failure(&source_labels(&source));
            return reset(tcp);
        }
    };
    // A pod called by its address still reports to its service's balancer.
    let balancer = balancer.or_else(|| service.as_ref().map(|s| proxy.balancer(&s.namespace, &s.name)));
    let mut labels = ConnLabels {
        destination_service: service
            .as_ref()
            .map(|s| format!("{}.{}", s.name, s.namespace))
            .unwrap_or_default(),
        ..source_labels(&source)
    };
    if candidates.is_empty() {
        tracing::warn!(src = %peer, %dst, service = %labels.destination_service, "no healthy endpoint; connection reset");
        proxy.metrics.failure(&labels);
        return reset(tcp);
    }
    let early = match first_bytes(&tcp) {
        Ok(early) => early,
        Err(e) => {
            tracing::info!(src = %peer, %dst, error = %e, "client connection failed before it was proxied");
            return reset(tcp);
        }
    };
    for (attempts, (endpoint, tier)) in candidates.iter().enumerate() {
        let tried = Tried {
            tier: *tier,
            attempts: attempts + 1,
            transport: None,
        };
        let target = SocketAddr::new(endpoint.ip, port);
        labels.destination_workload = endpoint.name.clone();
        labels.destination_cluster = endpoint.cluster.clone();
        labels.destination_principal = endpoint.identity.as_ref().map(ToString::to_string).unwrap_or_default();
        labels.destination_workload_namespace = service.as_ref().map(|s| s.namespace.clone()).unwrap_or_default();
        labels.connection_security_policy = if endpoint.enrolled { "mutual_tls" } else { "none" }.into();
        // Behind a gateway the tunnel is addressed to the service, as this client called it.
        let through = match (&endpoint.gateway, &service) {
            (Some(_), Some(s)) => Some(format!("{}:{}", s.hostname, dst.port())),
            _ => None,
        };
        let deadline = tokio::time::Instant::now() + proxy.connect_timeout;
        match attempt(
            &proxy,
            &source,
            peer,
            endpoint,
            target,
            through.as_deref(),
            &early,
            deadline,
        )
        .await
        {
            Ok(opened) => {
                let opened_by = match &opened {
                    Attempt::Tunnel(_, protocol) => Some(*protocol),
                    Attempt::Direct(_) => None,
                };
                if let Some(protocol) = opened_by {
                    proxy.metrics.tunnel("source", protocol);
                }
                if let Some(b) = &balancer {
                    b.succeeded(endpoint.ip);
                }
                proxy.hops.succeeded(lb::hop(endpoint));
                let counters = proxy.metrics.connection(labels.clone(), true);
                counters.upstream(early.len() as u64);
                let (mut moved, result) = match opened {
                    Attempt::Tunnel(t, _) => {
                        splice(tcp, t.send, t.recv, &counters, proxy.idle, early.len() as u64).await
                    }
                    Attempt::Direct(upstream) => copy_plain(tcp, upstream, &counters).await,
                };
                moved.upstream += early.len() as u64;
                let tried = Tried {
                    transport: opened_by,
                    ..tried
                };
                return access_log(&labels, peer, dst, target, Some(tried), moved, result, started);
            }
            Err(e) if !e.endpoint_failed() => {
                tracing::warn!(src = %peer, %dst, endpoint = %target, error = %e, "connection refused; reset");
                proxy.metrics.failure(&labels);
                return reset(tcp);
            }
            Err(e) => {
                proxy.metrics.failure(&labels);
                if let Some(b) = &balancer {
                    b.failed(endpoint.ip);
                }
                if e.hop_failed() {
                    proxy.hops.failed(lb::hop(endpoint));
                }
                if !e.retryable() {
                    tracing::warn!(src = %peer, %dst, endpoint = %target, error = %e, "endpoint failed after the first bytes left; ejected, connection reset");
                    return reset(tcp);
                }
                tracing::warn!(src = %peer, %dst, endpoint = %target, error = %e, "endpoint failed; ejected, trying the next");
            }
        }
    }
    tracing::warn!(src = %peer, %dst, "every endpoint failed; connection reset");
    reset(tcp)
}

/// The bytes the client has sent so far, without waiting for any: most protocols speak first
/// (an HTTP request, a TLS ClientHello), and a server-first one loses nothing. The socket is
/// read directly, as tokio learns of a new socket's readiness only at its next poll.
fn first_bytes(tcp: &TcpStream) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(EARLY_LIMIT);
    match (&*socket2::SockRef::from(tcp)).read(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Ok(buf.freeze())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Bytes::new()),
        Err(e) => Err(e),
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    proxy: &Proxy,
    source: &LocalWorkload,
    peer: SocketAddr,
    endpoint: &Endpoint,
    target: SocketAddr,
    through: Option<&str>,
    early: &Bytes,
    deadline: tokio::time::Instant,
) -> Result<Attempt, OpenError> {
    let (true, Some(identity), Some(node)) = (endpoint.enrolled, &endpoint.identity, endpoint.node_address) else {
        let mut upstream = tokio::time::timeout_at(deadline, dial(target))
            .await
            .map_err(|_| OpenError::TimedOut(target))?
            .map_err(|e| OpenError::Connect(target, e))?;
        // Once connected, a failed write is the workload's answer, not a reason to retry.
        if let Err(e) = upstream.write_all(early).await {
            tracing::debug!(endpoint = %target, error = %e, "the first bytes could not be written");
        }
        return Ok(Attempt::Direct(upstream));
    };
    let (node, via, authority) = match (&endpoint.gateway, through) {
        (None, _) => (SocketAddr::new(node, PORT), None, target.to_string()),
        // The gateway's address names its HBONE port; its QUIC port is the protocol's.
        (Some(hop), Some(authority)) => {
            let lanes = hop.weight.clamp(1, MAX_LANES);
            let lane = (LANE.fetch_add(1, Ordering::Relaxed) % lanes as usize) as u8;
            let via = Via {
                gateway: hop.identity.clone(),
                authority: authority.to_string(),
                lane,
            };
            (hop.address, Some(via), authority.to_string())
        }
        (Some(_), None) => return Err(OpenError::Unreachable),
    };
    let headers = [
        ("forwarded", forwarded_for(peer)),
        ("baggage", baggage(&source.cluster, &source.namespace, &source.name)),
    ];
    let protocol = proxy
        .links
        .choose(&proxy.cluster, &endpoint.cluster, node.ip(), std::time::Instant::now());
    let key = |protocol: Protocol| Key {
        source: source.identity.clone(),
        node: match protocol {
            Protocol::Http2 => node,
            Protocol::Http3 => SocketAddr::new(node.ip(), protocol.port()),
        },
        destination: identity.clone(),
        protocol,
        via: via.clone(),
    };
    if protocol == Protocol::Http3 {
        // QUIC gets the attempt's deadline, as HTTP/2 would (a long link's handshake and CONNECT
        // fit as they do over TCP); a path that drops UDP answers nothing, and the link falls
        // back to HTTP/2 over TCP with the whole connect timeout of its own.
        let quic_deadline = deadline;
        match proxy
            .pool()
            .open_by(&key(protocol), &authority, &headers, early, quic_deadline)
            .await
        {
            Ok(tunnel) => return Ok(Attempt::Tunnel(tunnel, protocol)),
            Err(e) if e.hop_failed() && e.retryable() => {
                proxy.links.quic_failed(node.ip(), std::time::Instant::now());
                proxy.metrics.quic_fallback();
                tracing::warn!(to = %node.ip(), error = %e, "HBONE over QUIC failed; HTTP/2 over TCP for this destination for a while");
            }
            Err(e) => return Err(e),
        }
        let deadline = tokio::time::Instant::now() + proxy.connect_timeout;
        return proxy
            .pool()
            .open_by(&key(Protocol::Http2), authority, &headers, early, deadline)
            .await
            .map(|t| Attempt::Tunnel(t, Protocol::Http2));
    }
    proxy
        .pool()
        .open_by(&key(protocol), authority, &headers, early, deadline)
        .await
        .map(|t| Attempt::Tunnel(t, protocol))
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
        connection_security_policy: "none".into(),
        ..source_labels(source)
    };
    let upstream = match dial(dst).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::info!(src = %peer, %dst, error = %e, "passthrough destination unreachable");
            proxy.metrics.failure(&labels);
            return reset(tcp);
        }
    };
    let counters = proxy.metrics.connection(labels.clone(), true);
    let (moved, result) = copy_plain(tcp, upstream, &counters).await;
    access_log(&labels, peer, dst, dst, None, moved, result, started);
}

/// The source half of the labels, reported by this (the source) ztunnel.
fn source_labels(source: &LocalWorkload) -> ConnLabels {
    ConnLabels {
        reporter: "source",
        source_workload: source.name.clone(),
        source_workload_namespace: source.namespace.clone(),
        source_principal: source.identity.to_string(),
        source_cluster: source.cluster.clone(),
        ..Default::default()
    }
}

/// How a connection's endpoint was chosen: its tier, and the attempts it took.
#[derive(Debug, Clone, Copy)]
struct Tried {
    tier: Tier,
    attempts: usize,
    /// The tunnel's transport (none: sent in plaintext to a workload outside the mesh).
    transport: Option<Protocol>,
}

#[allow(clippy::too_many_arguments)]
fn access_log(
    labels: &ConnLabels,
    peer: SocketAddr,
    dst: SocketAddr,
    endpoint: SocketAddr,
    tried: Option<Tried>,
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
        dst_cluster = %labels.destination_cluster,
        locality = tried.map_or("", |t| t.tier.as_str()),
        attempts = tried.map_or(0, |t| t.attempts),
        transport = tried.and_then(|t| t.transport).map_or("none", |p| match p {
            Protocol::Http2 => "h2",
            Protocol::Http3 => "h3",
        }),
        dst_identity = %labels.destination_principal,
        security = %labels.connection_security_policy,
        request_bytes = moved.upstream,
        response_bytes = moved.downstream,
        duration_ms = started.elapsed().as_millis() as u64,
        result = %super::outcome(&result),
        "connection closed"
    );
}
