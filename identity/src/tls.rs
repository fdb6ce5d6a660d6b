//! TLS 1.3 plumbing shared by every Trellis mTLS endpoint: rustls configs with the aws-lc-rs
//! provider, and the glue that runs tonic over our own rustls streams so that handlers can see
//! the peer's verified SPIFFE ID.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::ResolvesClientCert;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::ResolvesServerCert;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;

use crate::id::SpiffeId;
use crate::limits::{first_bytes, nofile_limit, Admitted, FdReserve, Gate, Limits};
use crate::verify::{peer_id, peer_not_after};

/// How long a peer may take to finish the TLS handshake, a wait for a handshake permit included.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a peer that finished its TLS handshake may take to start its first request (the
/// HTTP/2 preface): longer, and it is closed.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The one crypto provider of the tree: aws-lc-rs.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS 1.3-only server config with ALPN `h2`.
pub fn server_config(
    certs: Arc<dyn ResolvesServerCert>,
    clients: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session would skip the SPIFFE verifier, letting a peer keep an
    // identity past its SVID's expiry or its trust domain's removal.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A TLS 1.3-only client config with ALPN `h2`, presenting `certs` if given.
pub fn client_config(
    server: Arc<dyn ServerCertVerifier>,
    certs: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<ClientConfig, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server);
    let mut config = match certs {
        Some(certs) => builder.with_client_cert_resolver(certs),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Who is on the other end of an accepted connection; tonic puts it in every request's
/// extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The verified SPIFFE ID, when the client presented a certificate.
    pub id: Option<SpiffeId>,
    /// When the client's certificate expires: an identity is only good until then, however long
    /// the connection lives.
    pub not_after: Option<std::time::SystemTime>,
}

impl PeerInfo {
    /// The peer's SPIFFE ID if its certificate is still valid now.
    pub fn current_id(&self) -> Option<&SpiffeId> {
        match self.not_after {
            Some(t) if std::time::SystemTime::now() < t => self.id.as_ref(),
            _ => None,
        }
    }
}

/// Most TLS handshakes in flight at once on one listener (see [`Limits::max_handshakes`]).
pub const MAX_PENDING_HANDSHAKES: usize = 512;

/// A server-side TLS connection that tells tonic who the peer is, and that ends when the peer's
/// certificate expires: the client then reconnects with its renewed certificate, and no request
/// is ever served under a lapsed identity.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TlsConn {
    fn new(inner: tokio_rustls::server::TlsStream<TcpStream>, peer: PeerInfo) -> Self {
        let expires = peer.not_after.map(|t| {
            let left = t.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            Box::pin(tokio::time::sleep(left))
        });
        Self { inner, peer, expires }
    }

    /// True once the peer's certificate has expired.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.expires.as_mut().is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Ok(())); // end of stream: the connection closes
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "peer certificate expired",
            )));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Accepts TCP connections on `listener` within [`Limits::CONTROL`] (fitted to the descriptor
/// limit), runs the TLS handshake of each in its own task (bounded by [`HANDSHAKE_TIMEOUT`],
/// waiting for a handshake permit included), and yields for
/// `tonic::transport::Server::serve_with_incoming` the connections whose peer then starts its
/// request within [`FIRST_REQUEST_TIMEOUT`]. Refused, failed and silent connections are logged
/// and closed; they never stop the listener.
pub fn tls_incoming(listener: TcpListener, config: Arc<ServerConfig>) -> ReceiverStream<io::Result<Admitted<TlsConn>>> {
    let limits = Limits::CONTROL.fitted(nofile_limit(), 1);
    tls_incoming_limited(listener, config, Gate::new(limits))
}

/// [`tls_incoming`] with the admission limits of `gate`.
pub fn tls_incoming_limited(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    gate: Gate,
) -> ReceiverStream<io::Result<Admitted<TlsConn>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        let mut reserve = FdReserve::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // The server went away: stop listening so the port is freed.
                _ = tx.closed() => return,
            };
            let (tcp, remote_addr) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    reserve.on_accept_error(&listener, &e).await;
                    continue;
                }
            };
            let mut slot = match gate.admit(remote_addr.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    tracing::debug!(peer = %remote_addr, error = %why, "connection refused");
                    continue; // dropping `tcp` closes it
                }
            };
            // Small config updates and RPC replies must not wait on Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            let (acceptor, gate, tx) = (acceptor.clone(), gate.clone(), tx.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                    let _permit = gate.handshake_permit().await;
                    acceptor.accept(tcp).await
                })
                .await;
                slot.established();
                let mut tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::info!(peer = %remote_addr, error = %e, "TLS handshake refused"),
                    Err(_) => return tracing::info!(peer = %remote_addr, "TLS handshake timed out"),
                };
                if !first_bytes(&mut tls, FIRST_REQUEST_TIMEOUT).await {
                    return tracing::info!(peer = %remote_addr, "no request after the TLS handshake: closed");
                }
                let id = peer_id(tls.get_ref().1);
                let not_after = peer_not_after(tls.get_ref().1);
                let conn = TlsConn::new(
                    tls,
                    PeerInfo {
                        remote_addr,
                        id,
                        not_after,
                    },
                );
                let _ = tx.send(Ok(Admitted::new(conn, slot))).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A tonic channel to `addr` that dials TCP, runs TLS with `config`, and reconnects lazily.
pub fn tls_channel(addr: SocketAddr, config: Arc<ClientConfig>) -> tonic::transport::Channel {
    let connector = TlsConnector::from(config);
    let connect = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            // The verifier checks the SPIFFE ID; the name only fills SNI.
            let name = rustls_pki_types::ServerName::try_from("trellis.invalid")
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_static("http://trellis.invalid")
        .connect_timeout(Duration::from_secs(5))
        // Config snapshots run to megabytes: let them stream without waiting on window updates.
        .initial_stream_window_size(Some(2 * 1024 * 1024))
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        .connect_with_connector_lazy(connect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn a_peer_identity_lapses_with_its_certificate() {
        let id = SpiffeId::parse("spiffe://td/trellis/node/n1").unwrap();
        let peer = |not_after| PeerInfo {
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            id: Some(id.clone()),
            not_after: Some(not_after),
        };
        let hour = Duration::from_secs(3600);
        assert_eq!(peer(SystemTime::now() + hour).current_id(), Some(&id));
        assert_eq!(peer(SystemTime::now() - hour).current_id(), None);
    }

    #[test]
    fn sessions_are_never_resumed() {
        let bundles = crate::BundleSet::new();
        let verifier = crate::verify::SpiffeServerVerifier::new(bundles.clone(), crate::verify::ExpectedPeer::Any);
        let client = client_config(verifier, None).unwrap();
        assert!(format!("{:?}", client.resumption).contains("NoClientSessionStorage"));
        let clients = crate::verify::SpiffeClientVerifier::new(bundles, crate::verify::ExpectedPeer::Any);
        let resolver = Arc::new(rustls::server::ResolvesServerCertUsingSni::new());
        let server = server_config(resolver, clients).unwrap();
        assert_eq!(server.send_tls13_tickets, 0);
        assert!(!server.session_storage.can_cache());
    }
}
