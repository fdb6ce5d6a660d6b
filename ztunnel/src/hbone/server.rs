//! The HBONE server on 15008: TLS 1.3 with the client's workload SVID required, the
//! destination workload's certificate chosen by SNI or, for a client that sends none (Istio's
//! ztunnel), by the address the connection was made to (a pod's own address, redirected here by
//! the node's capture), then HTTP/2 with bounded streams.
//! What each CONNECT means is the [`Handler`]'s business (see `proxy::inbound`).
//!
//! Hostile peers cost little: connections are admitted within [`Limits::HBONE`] per listener and
//! per source address (excess is closed at accept), a handshake (TLS and HTTP/2 preface
//! together, a wait for one of the listener's handshake permits included) must finish within
//! [`SERVER_HANDSHAKE_TIMEOUT`], one source runs at most its share of handshakes, a connection
//! carries at most [`MAX_STREAMS`] tunnels, one with no tunnel for [`IDLE_TIMEOUT`] is closed,
//! and a connection whose client's certificate expires takes no new tunnel (GOAWAY) while its
//! open ones run to their end ([`super::expiry`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use http::Request;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::LazyConfigAcceptor;
use trellis_identity::limits::{nofile_limit, FdReserve, Gate, Limits};
use trellis_identity::tls::server_config;
use trellis_identity::verify::{peer_id, peer_not_after, ExpectedPeer, SpiffeClientVerifier, VerifiedChain};
use trellis_identity::{BundleSet, CertManager, IdKind, SpiffeId};

use super::http2::H2Reply;
use super::tunnel::Reply;
use super::{expiry, sni_for, CONNECTION_WINDOW, IDLE_TIMEOUT, MAX_FRAME, MAX_HEADERS, MAX_STREAMS, STREAM_WINDOW};

/// How long a client may take to finish TLS and send its HTTP/2 preface, a wait for a handshake
/// permit included. Node-to-node handshakes take milliseconds; the pool's own dial allows
/// [`super::HANDSHAKE_TIMEOUT`].
pub const SERVER_HANDSHAKE_TIMEOUT: std::time::Duration = trellis_identity::tls::HANDSHAKE_TIMEOUT;

/// The certificates this node serves on 15008: one per identity of its enrolled workloads,
/// found by the SNI a client sends ([`sni_for`]) or by the workload address a connection was
/// made to.
pub struct LocalCerts {
    certs: CertManager,
    by_sni: RwLock<HashMap<String, SpiffeId>>,
    by_addr: RwLock<HashMap<IpAddr, SpiffeId>>,
}

/// Which identity one connection is served as, and the workload address it was made to (when it
/// was made to a workload's own address rather than the node's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub identity: SpiffeId,
    pub to_workload: Option<IpAddr>,
}

impl std::fmt::Debug for LocalCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCerts").finish_non_exhaustive()
    }
}

impl LocalCerts {
    pub fn new(certs: CertManager) -> Arc<Self> {
        Arc::new(Self {
            certs,
            by_sni: RwLock::new(HashMap::new()),
            by_addr: RwLock::new(HashMap::new()),
        })
    }

    /// The enrolled workloads' own addresses and identities: a connection made to one of these
    /// addresses is served as that identity when its client sends no SNI this node knows.
    pub fn set_addresses(&self, addrs: impl IntoIterator<Item = (IpAddr, SpiffeId)>) {
        *self.by_addr.write().unwrap_or_else(|p| p.into_inner()) = addrs.into_iter().collect();
    }

    /// The identity a connection is served as ([`served_as`]), from the SNI its client sent and
    /// the address it was made to (its original destination, before the capture's redirect).
    pub fn choose(&self, sni: Option<&str>, dst: Option<IpAddr>) -> Result<Served, String> {
        let named = sni.and_then(|s| self.identity(s));
        let at = dst.and_then(|ip| {
            let map = self.by_addr.read().unwrap_or_else(|p| p.into_inner());
            map.get(&ip).map(|id| (ip, id.clone()))
        });
        served_as(sni, named, at)
    }

    /// Serves exactly these identities from now on.
    pub fn set(&self, ids: impl IntoIterator<Item = SpiffeId>) {
        let map = ids.into_iter().map(|id| (sni_for(&id), id)).collect();
        *self.by_sni.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// The identity an SNI asks for, if this node serves it.
    pub fn identity(&self, sni: &str) -> Option<SpiffeId> {
        self.by_sni.read().unwrap_or_else(|p| p.into_inner()).get(sni).cloned()
    }
}

/// Which identity serves a connection, given the SNI it sent, the identity that SNI names on this
/// node, and the workload (address and identity) the connection was made to, if any:
/// - a known SNI chooses (between Trellis nodes the SNI is the hashed identity, [`sni_for`]);
/// - otherwise the workload address chooses (a foreign HBONE client sends no SNI and dials the
///   pod's own address);
/// - a connection made to a workload's address that asks, by SNI, for another identity is
///   refused: the address and the name must agree.
pub fn served_as(sni: Option<&str>, named: Option<SpiffeId>, at: Option<(IpAddr, SpiffeId)>) -> Result<Served, String> {
    match (named, at) {
        (Some(named), Some((ip, own))) if named != own => Err(format!(
            "the client asked for {named}, but the connection was made to {ip}, which is {own}"
        )),
        (Some(identity), at) => Ok(Served {
            identity,
            to_workload: at.map(|(ip, _)| ip),
        }),
        (None, Some((ip, identity))) => Ok(Served {
            identity,
            to_workload: Some(ip),
        }),
        (None, None) => Err(match sni {
            Some(name) => format!("the client asked for {name:?}, which this node does not serve"),
            None => "the client sent no server name and the connection was made to no workload of this node".into(),
        }),
    }
}

impl ResolvesServerCert for LocalCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = self.identity(hello.server_name()?)?;
        self.certs.current(&id).map(|held| held.certified_key())
    }
}

/// Serves one identity's current certificate, whatever the client asks for: the choice was made
/// before the handshake ([`LocalCerts::choose`]). With none chosen the handshake fails with an
/// alert, so a refused client learns it from TLS rather than from a closed socket.
struct Chosen {
    certs: CertManager,
    identity: Option<SpiffeId>,
}

impl std::fmt::Debug for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chosen")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Chosen {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = self.identity.as_ref()?;
        self.certs.current(id).map(|held| held.certified_key())
    }
}

/// The server's TLS config: only workload identities of trusted trust domains may connect.
pub fn tls_config(local: Arc<LocalCerts>, bundles: BundleSet) -> Arc<ServerConfig> {
    let workloads_only = ExpectedPeer::Rule(Arc::new(|id: &SpiffeId| match id.kind() {
        IdKind::Workload { .. } => Ok(()),
        _ => Err(format!("{id} is not a workload identity")),
    }));
    let verifier = SpiffeClientVerifier::new(bundles, workloads_only);
    let config = server_config(local, verifier).unwrap_or_else(|e| unreachable!("TLS 1.3 is always available: {e}"));
    Arc::new(config)
}

/// Who is on the other end of one tunnel connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer_addr: SocketAddr,
    /// The client's verified workload identity.
    pub peer_id: SpiffeId,
    /// The identity this connection was opened for (from SNI, or from the workload address it
    /// was made to).
    pub served: SpiffeId,
    /// The workload address the connection was made to, when it was made to a workload's own
    /// address (a foreign HBONE client's way) rather than the node's: its tunnels may only go to
    /// that workload.
    pub to_workload: Option<IpAddr>,
    /// What carries the connection's tunnels.
    pub transport: super::tunnel::Protocol,
}

/// A boxed future, as [`Handler::handle`] returns.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What to do with each CONNECT, on whichever transport it came ([`Reply`]).
pub trait Handler: Send + Sync + 'static {
    fn handle<R: Reply>(self: Arc<Self>, conn: Arc<ConnInfo>, request: Request<()>, reply: R) -> BoxFuture;
}

/// Accepts HBONE connections on `listener` until `drain` turns true; then tells every open
/// connection to finish its tunnels and accept no more (GOAWAY).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    local: Arc<LocalCerts>,
    handler: Arc<H>,
    drain: watch::Receiver<bool>,
    trusted: BundleSet,
) {
    serve_gated(listener, gate(), config, local, handler, drain, trusted).await
}

/// The admission gate of 15008: connection and handshake limits, per source and in all.
pub fn gate() -> Gate {
    Gate::new(Limits::HBONE.fitted(nofile_limit(), 2))
}

/// [`serve`] admitting connections through `gate`, which listeners on the same port (one per
/// data-plane shard) share.
pub async fn serve_gated<H: Handler>(
    listener: TcpListener,
    gate: Gate,
    config: Arc<ServerConfig>,
    local: Arc<LocalCerts>,
    handler: Arc<H>,
    drain: watch::Receiver<bool>,
    trusted: BundleSet,
) {
    let mut reserve = FdReserve::new();
    let mut stop = drain.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|d| *d) => return,
        };
        let (tcp, peer_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "HBONE accept failed");
                reserve.on_accept_error(&listener, &e).await;
                continue;
            }
        };
        let mut slot = match gate.admit(peer_addr.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::debug!(peer = %peer_addr, error = %why, "HBONE connection refused");
                continue; // dropping `tcp` closes it
            }
        };
        let _ = tcp.set_nodelay(true);
        // Where the client dialled: a pod's own address when the capture redirected it here.
        let dst = super::original_dst(&tcp, peer_addr)
            .or_else(|_| tcp.local_addr())
            .ok()
            .map(|a| a.ip());
        let (config, local, handler, drain) = (config.clone(), local.clone(), handler.clone(), drain.clone());
        let trusted = trusted.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            let handshake = async {
                let _permit = gate.handshake_permit().await;
                let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                let chosen = local.choose(start.client_hello().server_name(), dst);
                let mut config = (*config).clone();
                config.cert_resolver = Arc::new(Chosen {
                    certs: local.certs.clone(),
                    identity: chosen.as_ref().ok().map(|c| c.identity.clone()),
                });
                let tls = start.into_stream(Arc::new(config)).await;
                let chosen = chosen?;
                let mut tls = tls.map_err(|e| format!("TLS: {e}"))?;
                tls.get_mut().1.set_buffer_limit(Some(super::TLS_BUFFER_LIMIT));
                let (_, session) = tls.get_ref();
                let peer_id = peer_id(session).ok_or("the client presented no SPIFFE ID")?;
                let not_after = peer_not_after(session);
                let verified = VerifiedChain::of(session, false).ok_or("the client presented no certificate")?;
                let connection = h2::server::Builder::new()
                    .initial_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .max_frame_size(MAX_FRAME)
                    .max_header_list_size(MAX_HEADERS)
                    .max_concurrent_streams(MAX_STREAMS)
                    .max_pending_accept_reset_streams(MAX_STREAMS as usize)
                    .max_local_error_reset_streams(Some(64))
                    .handshake::<_, Bytes>(tls)
                    .await
                    .map_err(|e| format!("HTTP/2 preface: {e}"))?;
                Ok::<_, String>((
                    connection,
                    ConnInfo {
                        peer_addr,
                        peer_id,
                        served: chosen.identity,
                        to_workload: chosen.to_workload,
                        transport: super::tunnel::Protocol::Http2,
                    },
                    not_after,
                    verified,
                ))
            };
            let handshake = tokio::time::timeout(SERVER_HANDSHAKE_TIMEOUT, handshake).await;
            slot.established();
            // The slot counts the connection against its listener and source until it closes.
            let _slot = slot;
            match handshake {
                Ok(Ok((connection, info, not_after, verified))) => {
                    run(connection, Arc::new(info), not_after, verified, handler, drain, trusted).await
                }
                Ok(Err(why)) => tracing::info!(peer = %peer_addr, error = %why, "HBONE connection refused"),
                Err(_) => tracing::info!(peer = %peer_addr, "HBONE handshake timed out"),
            }
        });
    }
}

type Connection = h2::server::Connection<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Bytes>;

async fn run<H: Handler>(
    mut connection: Connection,
    info: Arc<ConnInfo>,
    not_after: Option<SystemTime>,
    verified: VerifiedChain,
    handler: Arc<H>,
    mut drain: watch::Receiver<bool>,
    trusted: BundleSet,
) {
    // A peer no longer trusted (its cluster left the federation, or its bundle was replaced by
    // roots that did not sign its chain) loses the connection and its open tunnels at once:
    // trust withdrawn is not a graceful expiry.
    let mut trust = trusted.changes();
    let mut trust_open = true;
    // Expiry stops new tunnels, never open ones (see `expiry`): checked on tokio's clock by
    // this timer and on the wall clock at each CONNECT.
    let expiry = tokio::time::sleep(expiry::admits_for(not_after, SystemTime::now()));
    tokio::pin!(expiry);
    let mut expired = false;
    let tunnels = Arc::new(());
    let mut draining = false;
    loop {
        let idle = tokio::time::sleep(IDLE_TIMEOUT);
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((_, mut respond))) if expired || !expiry::admits_tunnels(not_after, SystemTime::now()) => {
                    // Crossed our GOAWAY on the wire (or the wall clock got there first):
                    // refused unprocessed, the client retries with its renewed SVID.
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    if !expired {
                        expired = true;
                        connection.graceful_shutdown();
                    }
                }
                Some(Ok((request, respond))) => {
                    let handler = handler.clone();
                    let info = info.clone();
                    let held = tunnels.clone();
                    let (parts, body) = request.into_parts();
                    let reply = H2Reply { respond, body };
                    tokio::spawn(async move {
                        handler.handle(info, Request::from_parts(parts, ()), reply).await;
                        drop(held);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(peer = %info.peer_addr, error = %e, "HBONE connection error");
                    return;
                }
                None => return,
            },
            _ = &mut expiry, if !expired => {
                expired = true;
                tracing::info!(peer = %info.peer_addr, identity = %info.peer_id, tunnels = Arc::strong_count(&tunnels) - 1, "client certificate expired: no new tunnels (GOAWAY), open ones run on");
                connection.graceful_shutdown();
            }
            changed = trust.changed(), if trust_open => {
                trust_open = changed.is_ok();
                if let (true, Err(why)) = (trust_open, verified.recheck(&trusted)) {
                    tracing::warn!(peer = %info.peer_addr, identity = %info.peer_id, tunnels = Arc::strong_count(&tunnels) - 1, reason = %why, "the peer is no longer trusted: connection and its tunnels closed");
                    return;
                }
            }
            _ = drain.wait_for(|d| *d), if !draining => {
                draining = true;
                connection.graceful_shutdown();
            }
            _ = idle, if Arc::strong_count(&tunnels) == 1 => {
                connection.graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_identity_comes_from_the_sni_or_else_from_the_workload_address() {
        let cart = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/cart").unwrap();
        let web = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/web").unwrap();
        let pod: IpAddr = "10.1.1.10".parse().unwrap();
        let sni = sni_for(&cart);
        let by_name = served_as(Some(&sni), Some(cart.clone()), None).unwrap();
        assert_eq!(
            (by_name.identity, by_name.to_workload),
            (cart.clone(), None),
            "node-addressed, by SNI"
        );
        let foreign = served_as(None, None, Some((pod, cart.clone()))).unwrap();
        assert_eq!(
            (foreign.identity, foreign.to_workload),
            (cart.clone(), Some(pod)),
            "no SNI, pod-addressed"
        );
        let odd_name = served_as(Some("cart.shop.svc"), None, Some((pod, cart.clone()))).unwrap();
        assert_eq!(
            odd_name.identity, cart,
            "an SNI this node does not know: the address chooses"
        );
        let both = served_as(Some(&sni), Some(cart.clone()), Some((pod, cart.clone()))).unwrap();
        assert_eq!(both.to_workload, Some(pod), "the tunnels stay bound to the pod dialled");
        let clash = served_as(Some(&sni_for(&web)), Some(web), Some((pod, cart))).unwrap_err();
        assert!(clash.contains("10.1.1.10"), "{clash}");
        let nothing = served_as(None, None, None).unwrap_err();
        assert!(nothing.contains("no server name"), "{nothing}");
    }
}
