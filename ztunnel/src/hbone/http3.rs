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

use std::future::Future;

use bytes::{Buf, Bytes, BytesMut};
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

use super::h3wire;
use super::pool::OpenError;
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

/// The congestion controller of tunnel connections (`--quic-congestion`). ARCHITECTURE.md
/// records the measurement behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (RFC 9438), loss-based: what Linux TCP uses, so QUIC and TCP tunnels share a link
    /// as equals.
    #[default]
    Cubic,
    /// BBR, model-based: keeps the pipe full through random loss, at the cost of fairness to
    /// loss-based flows; quinn's implementation is still marked experimental.
    Bbr,
}

/// What a ztunnel's QUIC sockets and connections are tuned with (its flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicTuning {
    pub congestion: Congestion,
    /// The UDP socket buffers asked for, each way, in bytes.
    pub socket_buffer: usize,
    /// Asked of the peer (the ACK frequency extension, which quinn speaks): how many
    /// ack-eliciting packets it may take before it must acknowledge; `None`: QUIC's own rule
    /// (every other packet).
    pub ack_threshold: Option<u32>,
    /// Asked of the peer with it: the longest it may hold an acknowledgement back.
    pub max_ack_delay: Option<Duration>,
}

/// The default of `--quic-socket-buffer`: a 50 ms path at 1 Gbit/s holds 6.25 MB in flight,
/// and a burst of received datagrams must wait there until quinn reads them.
pub const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

impl Default for QuicTuning {
    fn default() -> Self {
        Self {
            congestion: Congestion::default(),
            socket_buffer: SOCKET_BUFFER,
            ack_threshold: None,
            max_ack_delay: None,
        }
    }
}

/// What the kernel granted a socket, against what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub asked: usize,
    pub receive: usize,
    pub send: usize,
}

impl Granted {
    /// Linux reports twice the size it was given (it counts its own overhead), so a buffer is
    /// short only when what it reports is below what was asked.
    pub fn capped(&self) -> bool {
        self.receive < self.asked || self.send < self.asked
    }
}

/// Sizes `socket`'s buffers to `asked` bytes each way: within `net.core.{r,w}mem_max` as any
/// process may, beyond it when ztunnel holds CAP_NET_ADMIN (`SO_{RCV,SND}BUFFORCE`). Says what
/// it got, and how to raise the cap when it fell short; also whether quinn-udp may batch
/// datagrams (GSO when sending, GRO when receiving).
pub fn size_socket(socket: &std::net::UdpSocket, asked: usize, role: &'static str) -> Granted {
    use std::os::fd::AsRawFd;
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(asked);
    let _ = sock.set_send_buffer_size(asked);
    let granted = |sock: &socket2::SockRef<'_>| Granted {
        asked,
        receive: sock.recv_buffer_size().unwrap_or(0),
        send: sock.send_buffer_size().unwrap_or(0),
    };
    let mut got = granted(&sock);
    if got.capped() {
        let value = libc::c_int::try_from(asked).unwrap_or(libc::c_int::MAX);
        for option in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: a valid descriptor, and a c_int option value of the right length.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        got = granted(&sock);
    }
    let batching = quinn::udp::UdpSocketState::new(socket.into())
        .map(|state| (state.max_gso_segments(), state.gro_segments()))
        .unwrap_or((1, 1));
    if got.capped() {
        tracing::warn!(
            role,
            asked,
            receive = got.receive,
            send = got.send,
            "the kernel capped the QUIC socket's buffers: fast or long links will drop datagrams; raise net.core.rmem_max and net.core.wmem_max to at least {asked}, or run ztunnel with CAP_NET_ADMIN"
        );
    } else {
        tracing::info!(
            role,
            receive = got.receive,
            send = got.send,
            gso_segments = batching.0,
            gro_segments = batching.1,
            "QUIC socket sized"
        );
    }
    got
}

/// Transport parameters of a tunnel connection, either side: the flow-control windows of 15008,
/// so that one tunnel can fill a fast link, the stream bounds, and the congestion controller.
pub fn transport(tuning: QuicTuning) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    match tuning.congestion {
        Congestion::Cubic => {
            transport.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
    };
    if tuning.ack_threshold.is_some() || tuning.max_ack_delay.is_some() {
        let mut ack = quinn::AckFrequencyConfig::default();
        if let Some(threshold) = tuning.ack_threshold {
            ack.ack_eliciting_threshold(VarInt::from_u32(threshold));
        }
        ack.max_ack_delay(tuning.max_ack_delay);
        transport.ack_frequency_config(Some(ack));
    }
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
pub fn server_config(tls: &ServerConfig, tuning: QuicTuning) -> Result<quinn::ServerConfig, String> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| format!("QUIC TLS config: {e}"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport(tuning)));
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
    tuning: QuicTuning,
) {
    size_socket(&socket, tuning.socket_buffer, "server");
    let endpoint = match server_config(&tls, tuning).and_then(|config| {
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
            transport: super::tunnel::Protocol::Http3,
        },
        not_after: Some(leaf.not_after),
        verified,
    })
}

/// HTTP/3's H3_NO_ERROR as a QUIC close code: a clean close.
fn no_error() -> VarInt {
    VarInt::from_u32(h3wire::H3_NO_ERROR as u32)
}

/// How long a connection whose last tunnel ended stays open before the server closes it, so
/// that the tunnels' last bytes are acknowledged (a close abandons what is unacknowledged);
/// a client that closes first ends it sooner.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Tells the client to open no more tunnels (GOAWAY on the control stream), waiting no longer
/// than a handshake may: a client that gives the control stream no credit cannot hold it.
async fn goaway(h3: &mut h3::server::Connection<h3_quinn::Connection, Bytes>) {
    let _ = tokio::time::timeout(SERVER_HANDSHAKE_TIMEOUT, h3.shutdown(0)).await;
}

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
    let close = |why: &str| quic.close(no_error(), why.as_bytes());
    loop {
        let open = Arc::strong_count(&tunnels) - 1;
        if closing && open == 0 {
            let _ = tokio::time::timeout(CLOSE_LINGER, quic.closed()).await;
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
                goaway(&mut h3).await;
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
                goaway(&mut h3).await;
            }
            _ = idle, if open == 0 || closing => {
                if !closing {
                    closing = true;
                    goaway(&mut h3).await;
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
    type Send = TaskSend;
    type Recv = H3Recv;

    fn refuse(mut self, status: StatusCode) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            // A client that gives the stream no credit holds nothing: the answer is given up.
            let _ = tokio::time::timeout(SERVER_HANDSHAKE_TIMEOUT, async {
                if self.stream.send_response(status_only(status)).await.is_ok() {
                    let _ = self.stream.finish().await;
                }
            })
            .await;
        })
    }

    fn open(mut self) -> BoxFuture<'static, io::Result<(TaskSend, H3Recv)>> {
        Box::pin(async move {
            tokio::time::timeout(
                SERVER_HANDSHAKE_TIMEOUT,
                self.stream.send_response(status_only(StatusCode::OK)),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client took no answer in time"))?
            .map_err(h3_io)?;
            let (send, recv) = self.stream.split();
            Ok((TaskSend::spawn(send), H3Recv(recv)))
        })
    }
}

/// Writes one tunnel's stream for a [`TaskSend`]: the stream's own async writes, driven by the
/// task, so that what the pump hands over leaves without the pump polling again.
trait StreamWriter: Send + 'static {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, io::Result<()>>;
    fn finish(&mut self) -> BoxFuture<'_, ()>;
    fn reset(&mut self);
}

impl StreamWriter for SendSide {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.send_data(data).await.map_err(h3_io) })
    }
    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = RequestStream::finish(self).await;
        })
    }
    fn reset(&mut self) {
        self.stop_stream(Code::H3_REQUEST_CANCELLED);
    }
}

impl StreamWriter for quinn::SendStream {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let mut frame = [h3wire::frame_header(h3wire::DATA, data.len()), data];
            self.write_all_chunks(&mut frame).await.map_err(quic_io)
        })
    }
    fn finish(&mut self) -> BoxFuture<'_, ()> {
        let _ = quinn::SendStream::finish(self);
        Box::pin(std::future::ready(()))
    }
    fn reset(&mut self) {
        let _ = quinn::SendStream::reset(self, VarInt::from_u32(h3wire::H3_REQUEST_CANCELLED as u32));
    }
}

enum SendCmd {
    /// Bytes to send, with the room they hold until they have left.
    Data(Bytes, tokio::sync::OwnedSemaphorePermit),
    Finish,
    Reset,
}

/// How many bytes one tunnel may have handed over and not yet sent: two reads of the pump, so
/// one is written while the next is read.
const SEND_BUFFER: usize = 2 * SEND_ROOM;

/// The sending half of an HTTP/3 tunnel, either side. h3's and quinn's writes are `async fn`s
/// that make progress only while polled, so a task of the tunnel's own drives them: the pump
/// gets room for [`SEND_BUFFER`] bytes, hands them over, and they leave whether or not it polls
/// again (the contract of [`SendHalf::send`]). The stream's flow control holds the task, and the
/// room it has not given back holds the pump: backpressure end to end.
pub struct TaskSend {
    commands: tokio::sync::mpsc::UnboundedSender<SendCmd>,
    room: tokio_util::sync::PollSemaphore,
    granted: Option<tokio::sync::OwnedSemaphorePermit>,
    failed: Arc<std::sync::OnceLock<String>>,
    ended: bool,
    /// Told of a reset (or a drop without an end), so that it does not wait behind a write
    /// blocked on flow control.
    cut: Arc<tokio::sync::Notify>,
}

impl TaskSend {
    fn spawn(mut writer: impl StreamWriter) -> Self {
        let (commands, mut queue) = tokio::sync::mpsc::unbounded_channel();
        let room = Arc::new(tokio::sync::Semaphore::new(SEND_BUFFER));
        let failed = Arc::new(std::sync::OnceLock::new());
        let cut = Arc::new(tokio::sync::Notify::new());
        let (closing, failure, cutting) = (room.clone(), failed.clone(), cut.clone());
        tokio::spawn(async move {
            while let Some(command) = queue.recv().await {
                match command {
                    SendCmd::Data(data, _room) => {
                        let wrote = tokio::select! {
                            wrote = writer.write(data) => Some(wrote),
                            _ = cutting.notified() => None,
                        };
                        match wrote {
                            None => return writer.reset(),
                            Some(Err(e)) => {
                                let _ = failure.set(e.to_string());
                                closing.close();
                                return;
                            }
                            Some(Ok(())) => {}
                        }
                    }
                    SendCmd::Finish => return writer.finish().await,
                    SendCmd::Reset => return writer.reset(),
                }
            }
            // Dropped without an end: the far end must not take a cut-short stream for a whole one.
            writer.reset();
        });
        Self {
            commands,
            room: tokio_util::sync::PollSemaphore::new(room),
            granted: None,
            failed,
            ended: false,
            cut,
        }
    }

    fn broken(&self) -> io::Error {
        let why = self.failed.get().map_or("tunnel stream closed", String::as_str);
        io::Error::new(io::ErrorKind::BrokenPipe, why.to_string())
    }
}

impl SendHalf for TaskSend {
    fn reserve(&mut self, _n: usize) {}

    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.failed.get().is_some() || self.ended {
            return Poll::Ready(Err(self.broken()));
        }
        if self.granted.is_none() {
            match ready!(self.room.poll_acquire_many(cx, SEND_ROOM as u32)) {
                Some(permit) => self.granted = Some(permit),
                None => return Poll::Ready(Err(self.broken())),
            }
        }
        Poll::Ready(Ok(self.granted.as_ref().map_or(0, |p| p.num_permits())))
    }

    fn send(&mut self, data: Bytes) -> io::Result<()> {
        let mut granted = self.granted.take().ok_or_else(|| self.broken())?;
        let permit = if data.len() < granted.num_permits() {
            let part = granted.split(data.len()).ok_or_else(|| self.broken())?;
            self.granted = Some(granted);
            part
        } else {
            granted
        };
        self.commands
            .send(SendCmd::Data(data, permit))
            .map_err(|_| self.broken())
    }

    fn finish(&mut self) -> io::Result<()> {
        self.ended = true;
        self.commands.send(SendCmd::Finish).map_err(|_| self.broken())
    }

    fn reset(&mut self) {
        self.ended = true;
        let _ = self.commands.send(SendCmd::Reset);
        self.cut.notify_one();
    }
}

impl Drop for TaskSend {
    fn drop(&mut self) {
        if !self.ended {
            self.cut.notify_one();
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

// ---------------------------------------------------------------------------------------------
// The client: one QUIC connection per pool key, a raw quinn stream per tunnel, framed by
// [`super::h3wire`] (a correct plain CONNECT; see there why not h3's client).

/// How often a pooled client connection sends a keep-alive when it is otherwise silent: well
/// below [`QUIC_IDLE_TIMEOUT`] and below the 30 s UDP timeouts common in NATs and firewalls.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Dials HBONE-over-QUIC connections from one client endpoint per address family (one UDP
/// socket each, bound when first needed, marked like every socket ztunnel opens, so that
/// host-mode capture lets it pass).
#[derive(Default)]
pub struct Http3 {
    /// IPv4's and IPv6's.
    endpoints: [std::sync::OnceLock<Result<quinn::Endpoint, String>>; 2],
    tuning: std::sync::Mutex<QuicTuning>,
}

impl Http3 {
    /// Tunes the client socket (if not bound yet) and the connections dialled from now on.
    pub fn set_tuning(&self, tuning: QuicTuning) {
        *self.tuning.lock().unwrap_or_else(|p| p.into_inner()) = tuning;
    }

    fn tuning(&self) -> QuicTuning {
        *self.tuning.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint that dials `node`'s address family.
    fn endpoint(&self, node: SocketAddr) -> Result<quinn::Endpoint, String> {
        let (slot, any) = if node.is_ipv4() {
            (
                &self.endpoints[0],
                std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
            )
        } else {
            (
                &self.endpoints[1],
                std::net::IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
            )
        };
        slot.get_or_init(|| {
            let socket = std::net::UdpSocket::bind((any, 0))
                .map_err(|e| format!("binding the QUIC client socket ({any}): {e}"))?;
            let _ = socket2::SockRef::from(&socket).set_mark(super::SOCKET_MARK);
            size_socket(&socket, self.tuning().socket_buffer, "client");
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("QUIC client socket: {e}"))?;
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|e| format!("QUIC client endpoint: {e}"))
        })
        .clone()
    }
}

impl super::tunnel::Transport for Http3 {
    fn connect(
        &self,
        node: SocketAddr,
        server_name: rustls::pki_types::ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
        trusted: BundleSet,
    ) -> BoxFuture<'static, Result<Arc<dyn super::tunnel::Connection>, OpenError>> {
        let endpoint = self.endpoint(node);
        let tuning = self.tuning();
        Box::pin(async move {
            let fail = |e: String| OpenError::Tls(node, io::Error::other(e));
            let endpoint = endpoint.map_err(fail)?;
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| fail(e.to_string()))?;
            let mut config = quinn::ClientConfig::new(Arc::new(crypto));
            let mut transport = transport(tuning);
            transport.keep_alive_interval(Some(KEEP_ALIVE));
            config.transport_config(Arc::new(transport));
            let name = server_name.to_str().into_owned();
            let handshake = async {
                let connecting = endpoint
                    .connect_with(config, node, &name)
                    .map_err(|e| fail(e.to_string()))?;
                let quic = connecting.await.map_err(|e| fail(format!("QUIC handshake: {e}")))?;
                let chain = quic
                    .peer_identity()
                    .and_then(|chain| chain.downcast::<Vec<CertificateDer<'static>>>().ok())
                    .ok_or_else(|| fail("the server presented no certificate".into()))?;
                let verified = VerifiedChain::of_chain(&chain, true)
                    .ok_or_else(|| fail("the server presented no certificate".into()))?;
                // HTTP/3's control stream, opened first and never closed (RFC 9114 §6.2.1).
                let mut control = quic
                    .open_uni()
                    .await
                    .map_err(|e| OpenError::Protocol(node, io::Error::other(e)))?;
                control
                    .write_all(&h3wire::control_stream(u64::from(MAX_HEADERS)))
                    .await
                    .map_err(|e| OpenError::Protocol(node, io::Error::other(e)))?;
                Ok::<_, OpenError>((quic, control, verified))
            };
            let (quic, control, verified) =
                tokio::time::timeout(QUIC_HANDSHAKE_TIMEOUT, handshake)
                    .await
                    .map_err(|_| {
                        OpenError::Tls(
                            node,
                            io::Error::new(io::ErrorKind::TimedOut, "QUIC handshake timed out"),
                        )
                    })??;
            let goaway = Arc::new(std::sync::atomic::AtomicBool::new(false));
            tokio::spawn(drive(quic.clone(), control, node, verified, trusted, goaway.clone()));
            Ok(Arc::new(Http3Connection {
                node,
                quic,
                killed: std::sync::atomic::AtomicBool::new(false),
                goaway,
            }) as Arc<dyn super::tunnel::Connection>)
        })
    }
}

/// How long a client waits for a QUIC handshake: short, because a path that drops UDP shows
/// only as silence, and the link falls back to HTTP/2 over TCP after it.
pub const QUIC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads what the server sends on its unidirectional streams, so they never block on flow
/// control: its control stream frame by frame (a GOAWAY sets `goaway`: no new tunnels here, open
/// ones run on), the others (QPACK's, reserved types) only drained; closes the connection once
/// the server's chain no longer verifies against `trusted`. Holds the control stream open.
async fn drive(
    quic: quinn::Connection,
    _control: quinn::SendStream,
    node: SocketAddr,
    verified: VerifiedChain,
    trusted: BundleSet,
    goaway: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut trust = trusted.changes();
    let mut trust_open = true;
    loop {
        tokio::select! {
            uni = quic.accept_uni() => match uni {
                Ok(recv) => {
                    tokio::spawn(follow_uni(recv, node, goaway.clone()));
                }
                Err(e) => {
                    tracing::debug!(%node, error = %e, "HBONE QUIC connection ended");
                    return;
                }
            },
            changed = trust.changed(), if trust_open => {
                trust_open = changed.is_ok();
                if let (true, Err(why)) = (trust_open, verified.recheck(&trusted)) {
                    tracing::warn!(%node, reason = %why, "the server is no longer trusted: connection and its tunnels closed");
                    quic.close(VarInt::from_u32(0x102), b"server no longer trusted");
                    return;
                }
            }
        }
    }
}

/// One varint from `recv`; `None` at its end or on an error.
async fn read_varint(recv: &mut quinn::RecvStream) -> Option<u64> {
    let mut buf = [0u8; 8];
    recv.read_exact(&mut buf[..1]).await.ok()?;
    let len = h3wire::varint_len(buf[0]);
    recv.read_exact(&mut buf[1..len]).await.ok()?;
    h3wire::get_varint(&buf[..len]).map(|(v, _)| v)
}

/// Follows one unidirectional stream of the server: the control stream frame by frame, watching
/// for GOAWAY; any other stream is read to its end and dropped.
async fn follow_uni(mut recv: quinn::RecvStream, node: SocketAddr, goaway: Arc<std::sync::atomic::AtomicBool>) {
    let mut sink = [0u8; 4096];
    if read_varint(&mut recv).await == Some(h3wire::CONTROL_STREAM) {
        loop {
            let Some(kind) = read_varint(&mut recv).await else {
                return;
            };
            let Some(mut left) = read_varint(&mut recv).await else {
                return;
            };
            if kind == h3wire::GOAWAY && !goaway.swap(true, Ordering::AcqRel) {
                tracing::debug!(%node, "HBONE QUIC server sent GOAWAY: no new tunnels on this connection");
            }
            while left > 0 {
                let n = left.min(sink.len() as u64) as usize;
                if recv.read_exact(&mut sink[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
        }
    }
    while let Ok(Some(_)) = recv.read(&mut sink).await {}
}

/// A client HBONE-over-QUIC connection; closed when the pool lets go of it.
struct Http3Connection {
    node: SocketAddr,
    quic: quinn::Connection,
    /// Closed by [`super::tunnel::Connection::kill`]: the node stopped answering.
    killed: std::sync::atomic::AtomicBool,
    /// The server said GOAWAY: no new tunnels here.
    goaway: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Http3Connection {
    fn drop(&mut self) {
        // The connection's task holds a handle too; without this it would live on to its idle
        // timeout with no tunnel to carry.
        self.quic.close(no_error(), b"not needed");
    }
}

/// A request stream's sending side that is reset if dropped before it is handed on.
struct ResetOnDrop(Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(mut stream) = self.0.take() {
            let _ = stream.reset(VarInt::from_u32(h3wire::H3_REQUEST_CANCELLED as u32));
        }
    }
}

fn quic_io(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
}

impl super::tunnel::Connection for Http3Connection {
    fn open<'a>(
        &'a self,
        request: http::Request<()>,
        early: &'a Bytes,
    ) -> BoxFuture<'a, Result<super::tunnel::Answer, super::tunnel::StreamFailure>> {
        use super::tunnel::{Answer, StreamFailure};
        Box::pin(async move {
            let node = self.node;
            let gone = |e: io::Error| StreamFailure::ConnectionGone(OpenError::Protocol(node, e));
            let failed = |e: io::Error| {
                StreamFailure::Failed(if early.is_empty() {
                    OpenError::Protocol(node, e)
                } else {
                    OpenError::Interrupted(node, e)
                })
            };
            let authority = request
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or(StreamFailure::Failed(OpenError::Status(StatusCode::BAD_REQUEST)))?;
            let headers: Vec<(String, Vec<u8>)> = request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
                .collect();
            let (send, recv) = self.quic.open_bi().await.map_err(|e| gone(quic_io(e)))?;
            // Until handed to the tunnel, a stream given up on is reset, never finished: the
            // server must not take a cut-short CONNECT for a whole one.
            let mut send = ResetOnDrop(Some(send));
            let fields = h3wire::connect_fields(&authority, &headers);
            let mut chunks = vec![h3wire::frame_header(h3wire::HEADERS, fields.len()), fields];
            if !early.is_empty() {
                chunks.push(h3wire::frame_header(h3wire::DATA, early.len()));
                chunks.push(early.clone());
            }
            let (mut written, mut accepted) = (0, 0);
            while written < chunks.len() {
                let stream = send.0.as_mut().ok_or_else(|| failed(quic_io("stream gone")))?;
                match stream.write_chunks(&mut chunks[written..]).await {
                    Ok(wrote) => {
                        written += wrote.chunks;
                        accepted += wrote.bytes;
                    }
                    // Nothing left yet: as if never sent. Part of it taken: it may arrive.
                    Err(e) if accepted == 0 => return Err(gone(quic_io(e))),
                    Err(e) => return Err(failed(quic_io(e))),
                }
            }
            let mut recv = QuicRecv::new(recv);
            let status = tokio::select! {
                status = recv.answer() => status,
                _ = self.quic.closed() => Err(AnswerError::Gone(quic_io("connection closed"))),
            };
            let status = match status {
                Ok(status) => status,
                Err(AnswerError::Rejected) => {
                    return Err(gone(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        "request rejected unprocessed",
                    )))
                }
                // Only our own kill (the node answered no probe) means "unanswered"; a close by
                // the server after it may have delivered the early bytes does not.
                Err(AnswerError::Gone(e)) if self.killed.load(Ordering::Acquire) => {
                    tracing::debug!(%node, error = %e, "HBONE QUIC connection closed before the answer");
                    return Err(StreamFailure::Failed(OpenError::Unanswered(node)));
                }
                Err(AnswerError::Gone(e)) => return Err(failed(e)),
            };
            match StatusCode::from_u16(status) {
                Ok(StatusCode::OK) => {
                    let send = send.0.take().ok_or_else(|| failed(quic_io("stream gone")))?;
                    Ok(Answer::Open(Box::new(TaskSend::spawn(send)), Box::new(recv)))
                }
                Ok(status) => Ok(Answer::Refused(status)),
                Err(_) => Err(failed(quic_io(format!("answer status {status}")))),
            }
        })
    }

    fn is_closed(&self) -> bool {
        self.quic.close_reason().is_some() || self.goaway.load(Ordering::Acquire)
    }

    fn alive(&self, within: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            // A reserved unidirectional stream (RFC 9114 §6.2.3: the peer ignores it) carrying one
            // byte: its acknowledgement (or the peer stopping it) proves the peer is there.
            let probe = async {
                let mut probe = self.quic.open_uni().await.ok()?;
                let mut kind = BytesMut::new();
                h3wire::put_varint(&mut kind, 0x21)?;
                probe.write_all(&kind).await.ok()?;
                probe.finish().ok()?;
                probe.stopped().await.ok()
            };
            matches!(tokio::time::timeout(within, probe).await, Ok(Some(_)))
        })
    }

    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.quic.close(no_error(), b"unresponsive");
    }
}

/// Why no answer came.
enum AnswerError {
    /// The server reset the stream with H3_REQUEST_REJECTED: not processed, may go elsewhere.
    Rejected,
    Gone(io::Error),
}

/// The receiving half of a client tunnel: the answer's HEADERS, then DATA frames whose payloads
/// are handed on without copying; frames of other types are skipped (RFC 9114 §9).
pub struct QuicRecv {
    stream: quinn::RecvStream,
    /// Bytes of the frame header being read.
    header: Vec<u8>,
    /// The frame being read: its type and the payload bytes still to come.
    frame: Option<(u64, u64)>,
}

impl QuicRecv {
    fn new(stream: quinn::RecvStream) -> Self {
        Self {
            stream,
            header: Vec::with_capacity(16),
            frame: None,
        }
    }

    /// Reads the next frame header; `None` at a clean end of stream between frames.
    fn poll_header(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<(u64, u64)>>> {
        loop {
            // Type, then length: each varint's length is in its first byte.
            let need = match self.header.first() {
                None => 1,
                Some(first) => {
                    let type_len = h3wire::varint_len(*first);
                    match self.header.get(type_len) {
                        None => type_len + 1,
                        Some(len_first) => type_len + h3wire::varint_len(*len_first),
                    }
                }
            };
            if self.header.len() == need && need > 1 {
                if let Some((kind, n)) = h3wire::get_varint(&self.header) {
                    if let Some((len, m)) = h3wire::get_varint(&self.header[n..]) {
                        if n + m == need {
                            self.header.clear();
                            return Poll::Ready(Ok(Some((kind, len))));
                        }
                    }
                }
            }
            let want = need - self.header.len();
            let read = {
                let chunk = self.stream.read_chunk(want, true);
                tokio::pin!(chunk);
                ready!(chunk.poll(cx))
            };
            match read {
                Ok(Some(chunk)) => self.header.extend_from_slice(&chunk.bytes),
                Ok(None) if self.header.is_empty() => return Poll::Ready(Ok(None)),
                Ok(None) => return Poll::Ready(Err(quic_io("stream ended inside a frame header"))),
                Err(e) => return Poll::Ready(Err(read_error(e))),
            }
        }
    }

    /// The answer's `:status`, from the first HEADERS frame.
    async fn answer(&mut self) -> Result<u16, AnswerError> {
        loop {
            let header = std::future::poll_fn(|cx| self.poll_header(cx)).await;
            let (kind, len) = match header {
                Ok(Some(header)) => header,
                Ok(None) => return Err(AnswerError::Gone(quic_io("the stream ended with no answer"))),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(AnswerError::Rejected),
                Err(e) => return Err(AnswerError::Gone(e)),
            };
            if kind == h3wire::DATA {
                return Err(AnswerError::Gone(quic_io("DATA before the answer's HEADERS")));
            }
            if len > u64::from(MAX_HEADERS) {
                return Err(AnswerError::Gone(quic_io("answer frame too large")));
            }
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload).await.map_err(|e| match e {
                quinn::ReadExactError::ReadError(e) => match read_error(e) {
                    e if e.kind() == io::ErrorKind::ConnectionRefused => AnswerError::Rejected,
                    e => AnswerError::Gone(e),
                },
                quinn::ReadExactError::FinishedEarly(_) => AnswerError::Gone(quic_io("stream ended inside a frame")),
            })?;
            if kind == h3wire::HEADERS {
                let status = h3wire::response_status(&payload).map_err(|e| AnswerError::Gone(quic_io(e)))?;
                // Interim answers (RFC 9114 §4.1) come before the final one: read on.
                if !(100..200).contains(&status) {
                    return Ok(status);
                }
            }
        }
    }
}

/// A stream error as an I/O error; a reset with H3_REQUEST_REJECTED reads as `ConnectionRefused`.
fn read_error(e: quinn::ReadError) -> io::Error {
    match e {
        quinn::ReadError::Reset(code) if code.into_inner() == h3wire::H3_REQUEST_REJECTED => {
            io::Error::new(io::ErrorKind::ConnectionRefused, "request rejected")
        }
        e => quic_io(e),
    }
}

impl RecvHalf for QuicRecv {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            match self.frame {
                Some((_, 0)) => self.frame = None,
                Some((kind, left)) => {
                    let read = {
                        let chunk = self.stream.read_chunk(left.min(SEND_ROOM as u64) as usize, true);
                        tokio::pin!(chunk);
                        ready!(chunk.poll(cx))
                    };
                    match read {
                        Ok(Some(chunk)) => {
                            self.frame = Some((kind, left - chunk.bytes.len() as u64));
                            if kind == h3wire::DATA {
                                return Poll::Ready(Some(Ok(chunk.bytes)));
                            }
                        }
                        Ok(None) => return Poll::Ready(Some(Err(quic_io("stream ended inside a frame")))),
                        Err(e) => return Poll::Ready(Some(Err(read_error(e)))),
                    }
                }
                None => match ready!(self.poll_header(cx)) {
                    Ok(Some(frame)) => self.frame = Some(frame),
                    Ok(None) => return Poll::Ready(None),
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
            }
        }
    }

    fn release(&mut self, _n: usize) {}
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

    /// The first Initial the client sends toward a UDP socket bound at `listen` comes from the
    /// same address family: the client dials IPv4 and IPv6 nodes alike.
    async fn dials(listen: &str) -> SocketAddr {
        use super::super::tunnel::Transport;
        let far = tokio::net::UdpSocket::bind(listen)
            .await
            .expect("a UDP socket on loopback");
        let to = far.local_addr().expect("its address");
        let mut tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let client = Http3::default();
        let name = rustls::pki_types::ServerName::try_from("node.example").expect("a name");
        let dial = client.connect(to, name, Arc::new(tls), BundleSet::default());
        let dial = tokio::spawn(dial);
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), far.recv_from(&mut buf))
            .await
            .expect("an Initial within 5 s")
            .expect("a datagram");
        dial.abort();
        assert!(
            n >= 1200 && buf[0] & 0xf0 == 0xc0,
            "a QUIC v1 Initial, padded to 1200 bytes: {n} bytes"
        );
        from
    }

    #[tokio::test]
    async fn the_client_dials_ipv4_and_ipv6_nodes() {
        assert!(dials("127.0.0.1:0").await.is_ipv4());
        assert!(dials("[::1]:0").await.is_ipv6());
    }
}
