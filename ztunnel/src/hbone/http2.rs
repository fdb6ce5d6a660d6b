//! HBONE over HTTP/2 and TLS 1.3 on 15008: the [`Transport`] the pool dials within a cluster,
//! and the tunnel halves of h2's streams (the server side uses them too).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Request, StatusCode};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use trellis_identity::verify::VerifiedChain;
use trellis_identity::BundleSet;

use super::pool::OpenError;
use super::tunnel::{status_only, Answer, BoxFuture, Connection, RecvHalf, Reply, SendHalf, StreamFailure, Transport};
use super::{dial, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME, MAX_HEADERS, STREAM_WINDOW, TLS_BUFFER_LIMIT};

/// Dials HTTP/2 connections: TCP, TLS 1.3 with ALPN `h2`, the HTTP/2 preface.
#[derive(Debug, Default, Clone, Copy)]
pub struct Http2;

impl Transport for Http2 {
    fn connect(
        &self,
        node: SocketAddr,
        server_name: ServerName<'static>,
        tls: Arc<ClientConfig>,
        trusted: BundleSet,
    ) -> BoxFuture<'static, Result<Arc<dyn Connection>, OpenError>> {
        Box::pin(async move {
            let tcp = dial(node).await.map_err(|e| OpenError::Connect(node, e))?;
            handshake(tcp, node, server_name, tls, trusted).await
        })
    }
}

/// Runs TLS 1.3 (ALPN `h2`, asking for the certificate named by `server_name`) and the HTTP/2
/// preface over `io`, within [`HANDSHAKE_TIMEOUT`]: over TCP to a node, or over a tunnel to an
/// east-west gateway (the tunnel inside a tunnel, [`super::nested`]). `node` names the far end
/// in errors. The connection and its tunnels end at once if the server's chain stops verifying
/// against `trusted` (its trust domain left the federation, or its roots were replaced).
pub async fn handshake<IO>(
    io: IO,
    node: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    trusted: BundleSet,
) -> Result<Arc<dyn Connection>, OpenError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = async {
        let mut tls = TlsConnector::from(tls)
            .connect(server_name, io)
            .await
            .map_err(|e| OpenError::Tls(node, e))?;
        tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        let verified = VerifiedChain::of(tls.get_ref().1, true).ok_or_else(|| {
            OpenError::Tls(
                node,
                io::Error::new(io::ErrorKind::InvalidData, "the server presented no certificate"),
            )
        })?;
        let h2 = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(MAX_HEADERS)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| OpenError::Protocol(node, h2_io(e)))?;
        Ok::<_, OpenError>((h2, verified))
    };
    let ((send, connection), verified) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| OpenError::Tls(node, io::Error::new(io::ErrorKind::TimedOut, "handshake timed out")))??;
    let mut connection = connection;
    let ping = std::sync::Mutex::new(connection.ping_pong());
    let closed = Arc::new(AtomicBool::new(false));
    let on_close = closed.clone();
    let driver = tokio::spawn(async move {
        let mut trust = trusted.changes();
        tokio::pin!(connection);
        loop {
            tokio::select! {
                ended = &mut connection => {
                    if let Err(e) = ended {
                        tracing::debug!(%node, error = %e, "HBONE connection ended");
                    }
                    break;
                }
                changed = trust.changed() => {
                    if changed.is_err() {
                        // The bundles' owner is gone (shutting down): run to the end as is.
                        if let Err(e) = connection.await {
                            tracing::debug!(%node, error = %e, "HBONE connection ended");
                        }
                        break;
                    }
                    if let Err(why) = verified.recheck(&trusted) {
                        tracing::warn!(%node, reason = %why, "the server is no longer trusted: connection and its tunnels closed");
                        break;
                    }
                }
            }
        }
        on_close.store(true, Ordering::Release);
    });
    Ok(Arc::new(Http2Connection {
        node,
        send,
        closed,
        ping,
        dead: watch::channel(false).0,
        driver: driver.abort_handle(),
    }) as Arc<dyn Connection>)
}

/// A client HTTP/2 connection; its driver runs in its own task until the connection ends.
struct Http2Connection {
    node: SocketAddr,
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// The connection's PING sender, taken by one probe at a time.
    ping: std::sync::Mutex<Option<h2::PingPong>>,
    /// Turns true when the connection is killed: opens waiting for an answer give up.
    dead: watch::Sender<bool>,
    driver: tokio::task::AbortHandle,
}

impl Connection for Http2Connection {
    fn open<'a>(&'a self, request: Request<()>, early: &'a Bytes) -> BoxFuture<'a, Result<Answer, StreamFailure>> {
        Box::pin(async move {
            let node = self.node;
            let sent = match self.send.clone().ready().await {
                Ok(mut send) => send.send_request(request, false),
                Err(e) => Err(e),
            };
            let (response, mut send) = match sent {
                Ok(sent) => sent,
                // Just received GOAWAY, or broke: the request never left.
                Err(e) if e.is_go_away() || e.is_io() || self.closed.load(Ordering::Acquire) => {
                    self.closed.store(true, Ordering::Release);
                    return Err(StreamFailure::ConnectionGone(OpenError::Protocol(node, h2_io(e))));
                }
                Err(e) => return Err(StreamFailure::Failed(OpenError::Protocol(node, h2_io(e)))),
            };
            // Within the stream's initial window (far above the few KiB read early), so h2
            // frames it with the HEADERS instead of buffering it. It fails only if the stream
            // has already ended, when its answer (a refusal, say) tells more than the failure.
            let unsent = if early.is_empty() {
                None
            } else {
                send.send_data(early.clone(), false).err()
            };
            let mut dead = self.dead.subscribe();
            // Killed (which happens before its driver is aborted): the broken stream that
            // follows means the node stopped answering, not that the request failed there.
            let response = tokio::select! {
                biased;
                _ = dead.wait_for(|dead| *dead) => None,
                response = response => Some(response).filter(|_| !*self.dead.borrow()),
            };
            let Some(response) = response else {
                return Err(StreamFailure::Failed(OpenError::Unanswered(node)));
            };
            let response = response.map_err(|e| {
                if unprocessed(&e) {
                    // Refused before processing (the server's GOAWAY crossed it): as if never sent.
                    StreamFailure::ConnectionGone(OpenError::Protocol(node, h2_io(e)))
                } else {
                    StreamFailure::Failed(failed_after_send(node, e, early))
                }
            })?;
            match (response.status(), unsent) {
                (StatusCode::OK, Some(e)) => Err(StreamFailure::Failed(OpenError::Protocol(node, h2_io(e)))),
                (StatusCode::OK, None) => Ok(Answer::Open(Box::new(send), Box::new(response.into_body()))),
                (status, _) => Ok(Answer::Refused(status)),
            }
        })
    }

    fn alive(&self, within: std::time::Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let taken = self.ping.lock().unwrap_or_else(|p| p.into_inner()).take();
            // Another probe holds it, and will decide.
            let Some(mut ping) = taken else { return true };
            let answered = tokio::time::timeout(within, ping.ping(h2::Ping::opaque())).await;
            *self.ping.lock().unwrap_or_else(|p| p.into_inner()) = Some(ping);
            matches!(answered, Ok(Ok(_)))
        })
    }

    fn kill(&self) {
        self.closed.store(true, Ordering::Release);
        self.dead.send_replace(true);
        self.driver.abort();
    }

    fn is_closed(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        // A GOAWAY received (the server drains, or our certificate expired there) fails every
        // new request from now on: h2 reports it on readiness without sending anything.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Err(_)) = self.send.clone().poll_ready(&mut cx) {
            self.closed.store(true, Ordering::Release);
            return true;
        }
        false
    }
}

/// Whether the server refused the stream before processing it (RFC 9113 §8.7): the request may
/// go to another connection, early bytes and all.
fn unprocessed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// The error of a CONNECT whose answer never came. Early bytes were surely not delivered only
/// if the server refused the stream (REFUSED_STREAM: RFC 9113 §8.7 says it was not processed);
/// a connection that broke, or a GOAWAY, proves nothing about them.
fn failed_after_send(node: SocketAddr, e: h2::Error, early: &Bytes) -> OpenError {
    if early.is_empty() || unprocessed(&e) {
        OpenError::Protocol(node, h2_io(e))
    } else {
        OpenError::Interrupted(node, h2_io(e))
    }
}

impl SendHalf for SendStream<Bytes> {
    fn reserve(&mut self, n: usize) {
        self.reserve_capacity(n);
    }

    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Poll::Ready(match ready!(self.poll_capacity(cx)) {
            Some(Ok(granted)) => Ok(granted),
            Some(Err(e)) => Err(h2_io(e)),
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed")),
        })
    }

    fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.send_data(data, false).map_err(h2_io)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.send_data(Bytes::new(), true).map_err(h2_io)
    }

    fn reset(&mut self) {
        self.send_reset(h2::Reason::CANCEL);
    }
}

impl RecvHalf for RecvStream {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        self.poll_data(cx).map(|next| next.map(|data| data.map_err(h2_io)))
    }

    fn release(&mut self, n: usize) {
        let _ = self.flow_control().release_capacity(n);
    }
}

/// The server's side of a `CONNECT` on an HTTP/2 connection (15008).
pub struct H2Reply {
    pub respond: h2::server::SendResponse<Bytes>,
    pub body: RecvStream,
}

impl Reply for H2Reply {
    type Send = SendStream<Bytes>;
    type Recv = RecvStream;

    fn refuse(mut self, status: http::StatusCode) -> BoxFuture<'static, ()> {
        let _ = self.respond.send_response(status_only(status), true);
        Box::pin(std::future::ready(()))
    }

    fn open(mut self) -> BoxFuture<'static, io::Result<(Self::Send, Self::Recv)>> {
        let opened = self
            .respond
            .send_response(status_only(http::StatusCode::OK), false)
            .map(|send| (send, self.body))
            .map_err(h2_io);
        Box::pin(std::future::ready(opened))
    }
}

/// An h2 error as an I/O error, keeping the reason in the message.
pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_stream_proves_early_bytes_were_not_delivered() {
        let node: SocketAddr = "10.1.0.11:15008".parse().unwrap();
        let early = Bytes::from_static(b"GET /");
        let refused = failed_after_send(node, h2::Reason::REFUSED_STREAM.into(), &early);
        assert!(refused.retryable(), "{refused}");
        let broken = failed_after_send(node, h2::Reason::INTERNAL_ERROR.into(), &early);
        assert!(
            matches!(broken, OpenError::Interrupted(..)) && !broken.retryable(),
            "{broken}"
        );
        assert!(broken.endpoint_failed(), "the endpoint is still ejected");
        let nothing_sent = failed_after_send(node, h2::Reason::INTERNAL_ERROR.into(), &Bytes::new());
        assert!(nothing_sent.retryable(), "{nothing_sent}");
    }
}
