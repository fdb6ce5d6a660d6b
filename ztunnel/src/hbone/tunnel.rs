//! What a tunnel is, whatever carries it: HTTP/2 over TLS today ([`super::http2`]), HTTP/3 over
//! QUIC beside it later. The pool ([`super::pool`]) and the byte pump ([`super::copy`]) see only
//! these types.
//!
//! A tunnel is a pair of halves that move [`Bytes`] without copying them, with the flow control
//! of the stream underneath made visible: a sender asks for room and sends no more than it was
//! granted, a receiver gives window back only once it has written the bytes on. That is what
//! lets the pump hold backpressure end to end (DESIGN.md, Data plane).
//!
//! A [`Transport`] dials one multiplexed [`Connection`] to a node; a connection opens many
//! tunnels, each a `CONNECT` answered by the destination ztunnel.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use super::pool::OpenError;

/// A boxed future that may borrow for `'a`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The sending half of a tunnel: bytes toward the far end.
pub trait SendHalf: Send {
    /// Asks for room to send `n` more bytes.
    fn reserve(&mut self, n: usize);
    /// Waits until some of the reserved room is granted and returns how much (0: none yet, ask
    /// again). Fails once the stream can carry nothing more (the peer reset or closed it).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>>;
    /// Sends `data`, no more than the room granted.
    fn send(&mut self, data: Bytes) -> io::Result<()>;
    /// Ends this direction cleanly: the far end reads end of stream (a TCP FIN crossing).
    fn finish(&mut self) -> io::Result<()>;
    /// Aborts the stream: the far end sees a reset, not an end.
    fn reset(&mut self);
}

/// The receiving half of a tunnel: bytes from the far end.
pub trait RecvHalf: Send {
    /// The next chunk, `None` at the end of the stream, an error if the peer reset it.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>>;
    /// Gives `n` received bytes of window back to the sender, once they have been written on.
    fn release(&mut self, n: usize);
}

impl<T: SendHalf + ?Sized> SendHalf for Box<T> {
    fn reserve(&mut self, n: usize) {
        (**self).reserve(n)
    }
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        (**self).poll_room(cx)
    }
    fn send(&mut self, data: Bytes) -> io::Result<()> {
        (**self).send(data)
    }
    fn finish(&mut self) -> io::Result<()> {
        (**self).finish()
    }
    fn reset(&mut self) {
        (**self).reset()
    }
}

impl<T: RecvHalf + ?Sized> RecvHalf for Box<T> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        (**self).poll_recv(cx)
    }
    fn release(&mut self, n: usize) {
        (**self).release(n)
    }
}

/// Sends all of `data` as the far end's window allows, calling `sent` with each part's length
/// once it has left. No byte is copied: parts are slices of `data`.
pub async fn send_all<S: SendHalf + ?Sized>(
    send: &mut S,
    mut data: Bytes,
    mut sent: impl FnMut(u64),
) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve(data.len());
        let granted = poll_fn(|cx| send.poll_room(cx)).await?;
        if granted == 0 {
            continue;
        }
        let part = data.split_to(granted.min(data.len()));
        let len = part.len() as u64;
        send.send(part)?;
        sent(len);
    }
    Ok(())
}

/// The next chunk from `recv` (see [`RecvHalf::poll_recv`]).
pub async fn recv<R: RecvHalf + ?Sized>(recv: &mut R) -> Option<io::Result<Bytes>> {
    poll_fn(|cx| recv.poll_recv(cx)).await
}

/// The server's side of one `CONNECT`, whatever carries it (an HTTP/2 stream on 15008, an
/// HTTP/3 stream on 15009): answered exactly once, by a refusal or by opening the tunnel.
pub trait Reply: Send + 'static {
    type Send: SendHalf + 'static;
    type Recv: RecvHalf + 'static;
    /// Answers `status` (not 200) with no body and ends the stream.
    fn refuse(self, status: StatusCode) -> BoxFuture<'static, ()>;
    /// Answers 200 and hands over the tunnel's halves; fails if the client already left.
    fn open(self) -> BoxFuture<'static, io::Result<(Self::Send, Self::Recv)>>;
}

/// An answer without headers or body.
pub fn status_only(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

/// The protocol a pooled connection speaks; part of the pool's key, so one (source, node,
/// destination) may have a connection of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Protocol {
    /// HTTP/2 over TLS on 15008.
    #[serde(rename = "h2")]
    Http2,
    /// HTTP/3 over QUIC on 15009/udp.
    #[serde(rename = "h3")]
    Http3,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "h2" | "http2" => Ok(Self::Http2),
            "h3" | "http3" | "quic" => Ok(Self::Http3),
            other => Err(format!(
                "{other:?} is no tunnel transport: h2 (HTTP/2 over TCP) or h3 (HTTP/3 over QUIC)"
            )),
        }
    }
}

impl Protocol {
    /// The ALPN identifier the TLS handshake negotiates.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Self::Http2 => b"h2",
            Self::Http3 => b"h3",
        }
    }

    /// The port a node or gateway serves this protocol on.
    pub fn port(self) -> u16 {
        match self {
            Self::Http2 => super::PORT,
            Self::Http3 => super::http3::PORT,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Http2 => "h2",
            Self::Http3 => "h3",
        })
    }
}

/// How the destination answered a `CONNECT`.
pub enum Answer {
    /// 200: the tunnel is open.
    Open(Box<dyn SendHalf>, Box<dyn RecvHalf>),
    /// Any other status: refused, and the early bytes dropped unread.
    Refused(StatusCode),
}

/// Why a connection opened no tunnel.
#[derive(Debug)]
pub enum StreamFailure {
    /// The connection was already unusable (closed, or told to go away) when the request was to
    /// leave, or the server refused the stream unprocessed (REFUSED_STREAM): nothing reached the
    /// destination, so another connection may be dialled for it.
    ConnectionGone(OpenError),
    /// The tunnel itself failed.
    Failed(OpenError),
}

/// One multiplexed connection to a node, carrying many tunnels.
pub trait Connection: Send + Sync + 'static {
    /// Sends the `CONNECT` `request` with the client's `early` bytes (possibly empty) right
    /// behind it, and waits for the answer.
    fn open<'a>(&'a self, request: Request<()>, early: &'a Bytes) -> BoxFuture<'a, Result<Answer, StreamFailure>>;
    /// Whether the connection takes no more tunnels (it closed, or the server is draining it).
    fn is_closed(&self) -> bool;
    /// Whether the far end answers a PING within `within`.
    fn alive(&self, within: std::time::Duration) -> BoxFuture<'_, bool>;
    /// Closes the connection now: its tunnels end, and opens waiting for an answer on it fail
    /// with [`OpenError::Unanswered`](super::pool::OpenError::Unanswered).
    fn kill(&self);
}

/// Dials connections of one [`Protocol`].
pub trait Transport: Send + Sync + 'static {
    /// Connects to `node`, authenticates with `tls` (whose ALPN is this protocol's) asking for
    /// the certificate named by `server_name`, and sets up the multiplexed connection, all within
    /// [`super::HANDSHAKE_TIMEOUT`]. The connection closes once the server's chain no longer
    /// verifies against `trusted`.
    fn connect(
        &self,
        node: SocketAddr,
        server_name: ServerName<'static>,
        tls: Arc<ClientConfig>,
        trusted: trellis_identity::BundleSet,
    ) -> BoxFuture<'static, Result<Arc<dyn Connection>, OpenError>>;
}
