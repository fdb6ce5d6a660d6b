//! HBONE over QUIC, the server on 15009/udp (DESIGN.md, Data plane): TLS 1.3 inside QUIC with
//! the same client verifier and the same certificate choice by SNI as 15008 ([`super::server`]),
//! ALPN `h3`, then HTTP/3 `CONNECT` (RFC 9114 §4.4) answered by the same [`Handler`] as HTTP/2's,
//! so the routing, the policy and the answers (200, 400, 401, 503) are one code path.
//!
//! What QUIC adds, and how a hostile peer is held:
//! - no 0-RTT: a replayed `CONNECT` with early data could deliver its bytes twice;
//! - address validation: once [`RETRY_ABOVE`] handshakes are in flight, a new client must first
//!   echo a Retry token ([`needs_retry`]), so a flood from spoofed addresses costs one stateless
//!   packet each; the per-listener and per-source limits of 15008 ([`Limits::HBONE`]) apply too;
//! - at most [`MAX_STREAMS`] tunnels per connection (QUIC's stream limit, so excess streams are
//!   never opened), a request stream that sends no complete `HEADERS` within
//!   [`SERVER_HANDSHAKE_TIMEOUT`] is stopped, garbage datagrams are dropped by quinn;
//! - the connection lifetime rules of 15008: no tunnel for [`IDLE_TIMEOUT`] closes it (GOAWAY),
//!   an expired client certificate stops new tunnels, trust withdrawn closes it at once.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use h3::server::RequestStream;
use http::StatusCode;
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;
use tokio::sync::watch;
use trellis_identity::limits::{Gate, Limits};
use trellis_identity::verify::VerifiedChain;
use trellis_identity::BundleSet;

use super::server::{ConnInfo, Handler, LocalCerts, SERVER_HANDSHAKE_TIMEOUT};
use super::tunnel::{status_only, BoxFuture, RecvHalf, Reply, SendHalf};
use super::{expiry, CONNECTION_WINDOW, IDLE_TIMEOUT, MAX_FRAME, MAX_HEADERS, MAX_STREAMS, STREAM_WINDOW};

/// The HBONE-over-QUIC port (DESIGN.md), UDP.
pub const PORT: u16 = 15009;
/// The ALPN identifier of HTTP/3.
pub const ALPN: &[u8] = b"h3";
/// Handshakes in flight from which a client whose address is not yet validated gets a Retry.
pub const RETRY_ABOVE: usize = 32;
/// Unidirectional streams a peer may open: HTTP/3's control stream and QPACK's two, and room for
/// the reserved (grease) stream types peers send to keep the extension point open.
pub const MAX_UNI_STREAMS: u32 = 8;
/// A QUIC connection with no packet at all for this long is gone; clients keep their pooled
/// connections alive well below it (and below common NAT and firewall UDP timeouts).
pub const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How much one tunnel may hand quinn per send: a whole read of the byte pump.
const SEND_ROOM: usize = MAX_FRAME as usize;

/// Whether a new connection must first prove it owns its source address (a Retry round trip):
/// never once it has (it echoed a token), otherwise only when the listener is busy, so a normal
/// client pays no extra round trip.
pub fn needs_retry(validated: bool, handshaking: usize) -> bool {
    !validated && handshaking >= RETRY_ABOVE
}

/// Transport parameters of a tunnel connection, either side: the flow-control windows of 15008,
/// so that one tunnel can fill a fast link, and the stream bounds.
pub fn transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .max_idle_timeout(Some(quinn::IdleTimeout::from(VarInt::from_u32(
            QUIC_IDLE_TIMEOUT.as_millis() as u32,
        ))));
    transport
}

/// The QUIC server config: 15008's TLS config (its verifier and certificate resolver) with ALPN
/// `h3` and no early data.
pub fn server_config(tls: &ServerConfig) -> Result<quinn::ServerConfig, String> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| format!("QUIC TLS config: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    // A tunnel's source is checked per connection; it does not move.
    config.migration(false);
    Ok(config)
}

/// Counts a handshake in flight until dropped.
struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A QUIC connection whose handshake finished, before its first request.
struct Established {
    quic: quinn::Connection,
    h3: h3::server::Connection<h3_quinn::Connection, Bytes>,
    info: ConnInfo,
    not_after: Option<SystemTime>,
    verified: VerifiedChain,
}

/// Accepts HBONE-over-QUIC connections on `socket` until `drain` turns true; then tells every
/// open connection to finish its tunnels and accept no more (GOAWAY). `tls` is 15008's config.
pub async fn serve<H: Handler>(
    socket: std::net::UdpSocket,
    tls: Arc<ServerConfig>,
    local: Arc<LocalCerts>,
    handler: Arc<H>,
    drain: watch::Receiver<bool>,
    trusted: BundleSet,
) {
    let endpoint = match server_config(&tls).and_then(|config| {
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| format!("QUIC endpoint: {e}"))
    }) {
        Ok(endpoint) => endpoint,
        Err(why) => {
            tracing::error!(error = %why, "HBONE over QUIC is not served");
            return;
        }
    };
    let gate = Gate::new(Limits::HBONE);
    let handshaking = Arc::new(AtomicUsize::new(0));
    let mut stop = drain.clone();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = stop.wait_for(|d| *d) => {
                endpoint.set_server_config(None);
                return;
            }
        };
        let Some(incoming) = incoming else { return };
        let peer_addr = incoming.remote_address();
        if needs_retry(incoming.remote_address_validated(), handshaking.load(Ordering::Relaxed)) {
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let mut slot = match gate.admit(peer_addr.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::debug!(peer = %peer_addr, error = %why, "HBONE QUIC connection refused");
                incoming.refuse();
                continue;
            }
        };
        let counted = Handshaking::new(&handshaking);
        let (local, handler, drain, trusted, gate) = (
            local.clone(),
            handler.clone(),
            drain.clone(),
            trusted.clone(),
            gate.clone(),
        );
        tokio::spawn(async move {
            let handshake = async {
                let _permit = gate.handshake_permit().await;
                let quic = incoming.accept().map_err(|e| format!("QUIC: {e}"))?.await;
                let quic = quic.map_err(|e| format!("QUIC handshake: {e}"))?;
                established(quic, peer_addr, &local).await
            };
            let handshake = tokio::time::timeout(SERVER_HANDSHAKE_TIMEOUT, handshake).await;
            drop(counted);
            slot.established();
            let _slot = slot;
            match handshake {
                Ok(Ok(conn)) => run(conn, handler, drain, trusted).await,
                Ok(Err(why)) => tracing::info!(peer = %peer_addr, error = %why, "HBONE QUIC connection refused"),
                Err(_) => tracing::info!(peer = %peer_addr, "HBONE QUIC handshake timed out"),
            }
        });
    }
}

/// Who the client is and which identity serves it, then HTTP/3's SETTINGS exchange.
async fn established(
    quic: quinn::Connection,
    peer_addr: SocketAddr,
    local: &LocalCerts,
) -> Result<Established, String> {
    let sni = quic
        .handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.server_name);
    let chosen = local.choose(sni.as_deref(), None)?;
    let chain = quic
        .peer_identity()
        .and_then(|chain| chain.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("the client presented no certificate")?;
    let leaf = chain.first().ok_or("the client presented no certificate")?;
    let leaf = trellis_identity::svid::leaf_info(leaf).map_err(|e| format!("the client's certificate: {e}"))?;
    let verified = VerifiedChain::of_chain(&chain, false).ok_or("the client presented no certificate")?;
    let h3 = h3::server::builder()
        .max_field_section_size(u64::from(MAX_HEADERS))
        .build(h3_quinn::Connection::new(quic.clone()))
        .await
        .map_err(|e| format!("HTTP/3 set-up: {e}"))?;
    Ok(Established {
        quic,
        h3,
        info: ConnInfo {
            peer_addr,
            peer_id: leaf.id,
            served: chosen.identity,
            to_workload: None,
        },
        not_after: Some(leaf.not_after),
        verified,
    })
}

/// HTTP/3's H3_NO_ERROR, the code of a clean close.
const H3_NO_ERROR: u32 = 0x100;

async fn run<H: Handler>(conn: Established, handler: Arc<H>, mut drain: watch::Receiver<bool>, trusted: BundleSet) {
    let Established {
        quic,
        mut h3,
        info,
        not_after,
        verified,
    } = conn;
    let info = Arc::new(info);
    let mut trust = trusted.changes();
    let mut trust_open = true;
    let expiry = tokio::time::sleep(expiry::admits_for(not_after, SystemTime::now()));
    tokio::pin!(expiry);
    let mut expired = false;
    let tunnels = Arc::new(());
    let mut closing = false;
    let close = |why: &str| quic.close(VarInt::from_u32(H3_NO_ERROR), why.as_bytes());
    loop {
        let open = Arc::strong_count(&tunnels) - 1;
        if closing && open == 0 {
            close("done");
            return;
        }
        let idle = tokio::time::sleep(if closing {
            Duration::from_millis(100)
        } else {
            IDLE_TIMEOUT
        });
        tokio::select! {
            next = h3.accept(), if !closing => match next {
                Ok(Some(resolver)) => {
                    let refuse = expired || !expiry::admits_tunnels(not_after, SystemTime::now());
                    let (handler, info, held) = (handler.clone(), info.clone(), tunnels.clone());
                    tokio::spawn(async move {
                        let resolved = tokio::time::timeout(SERVER_HANDSHAKE_TIMEOUT, resolver.resolve_request()).await;
                        match resolved {
                            Ok(Ok((_, mut stream))) if refuse => {
                                // Not processed: the client retries with its renewed SVID.
                                stream.stop_stream(Code::H3_REQUEST_REJECTED);
                            }
                            Ok(Ok((request, stream))) => handler.handle(info, request, H3Reply { stream }).await,
                            Ok(Err(e)) => tracing::debug!(peer = %info.peer_addr, error = %e, "HBONE QUIC request malformed"),
                            Err(_) => tracing::debug!(peer = %info.peer_addr, "HBONE QUIC request sent no headers in time"),
                        }
                        drop(held);
                    });
                    if refuse && !expired {
                        expired = true;
                        closing = true;
                    }
                }
                Ok(None) => closing = true,
                Err(e) => {
                    if !e.is_h3_no_error() {
                        tracing::debug!(peer = %info.peer_addr, error = %e, "HBONE QUIC connection error");
                    }
                    return;
                }
            },
            _ = &mut expiry, if !expired => {
                expired = true;
                closing = true;
                tracing::info!(peer = %info.peer_addr, identity = %info.peer_id, tunnels = open, "client certificate expired: no new tunnels (GOAWAY), open ones run on");
                let _ = h3.shutdown(0).await;
            }
            changed = trust.changed(), if trust_open => {
                trust_open = changed.is_ok();
                if let (true, Err(why)) = (trust_open, verified.recheck(&trusted)) {
                    tracing::warn!(peer = %info.peer_addr, identity = %info.peer_id, tunnels = open, reason = %why, "the peer is no longer trusted: connection and its tunnels closed");
                    quic.close(VarInt::from_u32(0x102), b"peer no longer trusted");
                    return;
                }
            }
            _ = async { drop(drain.wait_for(|d| *d).await) }, if !closing => {
                closing = true;
                let _ = h3.shutdown(0).await;
            }
            _ = idle, if open == 0 || closing => {
                if !closing {
                    closing = true;
                    let _ = h3.shutdown(0).await;
                }
            }
            _ = quic.closed() => return,
        }
    }
}

type Stream = RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;
type SendSide = RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type RecvSide = RequestStream<h3_quinn::RecvStream, Bytes>;

/// The server's side of a `CONNECT` on an HTTP/3 connection (15009).
pub struct H3Reply {
    pub stream: Stream,
}

impl Reply for H3Reply {
    type Send = H3Send;
    type Recv = H3Recv;

    fn refuse(mut self, status: StatusCode) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if self.stream.send_response(status_only(status)).await.is_ok() {
                let _ = self.stream.finish().await;
            }
        })
    }

    fn open(mut self) -> BoxFuture<'static, io::Result<(H3Send, H3Recv)>> {
        Box::pin(async move {
            self.stream
                .send_response(status_only(StatusCode::OK))
                .await
                .map_err(h3_io)?;
            let (send, recv) = self.stream.split();
            Ok((H3Send::new(send), H3Recv(recv)))
        })
    }
}

type Sending = BoxFuture<'static, (SendSide, Result<(), StreamError>)>;

/// The sending half of an HTTP/3 tunnel. h3 sends with an `async fn`, so the stream moves into
/// the send in flight and comes back when it is done; quinn's own flow control holds the send
/// until the peer has room, which is the backpressure the pump needs.
pub struct H3Send {
    stream: Option<SendSide>,
    sending: Option<Sending>,
    /// Finished or reset: nothing left to do when dropped.
    ended: bool,
}

impl H3Send {
    fn new(stream: SendSide) -> Self {
        Self {
            stream: Some(stream),
            sending: None,
            ended: false,
        }
    }

    /// Runs `last` on the stream once the send in flight (if any) is done, without waiting.
    fn then(&mut self, last: impl FnOnce(SendSide) -> BoxFuture<'static, ()> + Send + 'static) {
        self.ended = true;
        let (stream, sending) = (self.stream.take(), self.sending.take());
        tokio::spawn(async move {
            let stream = match (stream, sending) {
                (Some(stream), _) => stream,
                (None, Some(sending)) => match sending.await {
                    (stream, Ok(())) => stream,
                    (mut stream, Err(_)) => {
                        stream.stop_stream(Code::H3_REQUEST_CANCELLED);
                        return;
                    }
                },
                (None, None) => return,
            };
            last(stream).await;
        });
    }
}

impl SendHalf for H3Send {
    fn reserve(&mut self, _n: usize) {}

    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if let Some(sending) = self.sending.as_mut() {
            let (stream, sent) = ready!(sending.as_mut().poll(cx));
            self.sending = None;
            self.stream = Some(stream);
            if let Err(e) = sent {
                return Poll::Ready(Err(h3_io(e)));
            }
        }
        Poll::Ready(match self.stream {
            Some(_) => Ok(SEND_ROOM),
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed")),
        })
    }

    fn send(&mut self, data: Bytes) -> io::Result<()> {
        let mut stream = self
            .stream
            .take()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream busy or closed"))?;
        self.sending = Some(Box::pin(async move {
            let sent = stream.send_data(data).await;
            (stream, sent)
        }));
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.then(|mut stream| {
            Box::pin(async move {
                let _ = stream.finish().await;
            })
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.then(|mut stream| {
            stream.stop_stream(Code::H3_REQUEST_CANCELLED);
            Box::pin(std::future::ready(()))
        });
    }
}

impl Drop for H3Send {
    /// A half dropped without an end (the tunnel failed elsewhere) resets its stream: quinn would
    /// otherwise finish it, and the far end would read a clean end of data that is cut short.
    fn drop(&mut self) {
        if !self.ended && (self.stream.is_some() || self.sending.is_some()) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let _guard = runtime.enter();
                self.reset();
            }
        }
    }
}

/// The receiving half of an HTTP/3 tunnel. QUIC gives flow-control credit back as the bytes are
/// read, and the pump reads only once it has written the previous chunk on, so
/// [`RecvHalf::release`] has nothing to do.
pub struct H3Recv(RecvSide);

impl RecvHalf for H3Recv {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        Poll::Ready(match ready!(self.0.poll_recv_data(cx)) {
            Ok(Some(mut data)) => Some(Ok(data.copy_to_bytes(data.remaining()))),
            Ok(None) => None,
            Err(e) => Some(Err(h3_io(e))),
        })
    }

    fn release(&mut self, _n: usize) {}
}

/// An h3 stream error as an I/O error, keeping the reason in the message.
fn h3_io(e: StreamError) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_proves_its_address_only_when_the_listener_is_busy() {
        assert!(!needs_retry(false, 0), "a quiet listener: no extra round trip");
        assert!(!needs_retry(false, RETRY_ABOVE - 1));
        assert!(needs_retry(false, RETRY_ABOVE), "a busy one: Retry first");
        assert!(!needs_retry(true, RETRY_ABOVE * 10), "an echoed token is proof enough");
    }
}
