//! A tunnel as a byte stream, so that TLS and HTTP/2 can run inside it: the inner connection
//! of a tunnel through an east-west gateway (DESIGN.md, Data plane).
//!
//! The source ztunnel opens an outer tunnel to the remote cluster's gateway (mutual TLS with
//! the gateway's identity), addressed to a global service; the gateway splices it to the TCP
//! port 15008 of a node that serves that service. Inside it the source runs a second TLS
//! session with the destination *workload's* identity and HTTP/2 on top, as it would over TCP
//! to that node: the gateway relays ciphertext and holds no key that could read it. The inner
//! connection is pooled like any other, so that a new connection through the gateway costs one
//! CONNECT on an open inner connection, not a new handshake.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::Tunnel;

/// An open tunnel read and written as a byte stream. Received window is given back as the
/// bytes are read, so the outer stream's flow control holds the inner connection back.
pub struct TunnelIo {
    tunnel: Tunnel,
    /// Received bytes not read yet.
    unread: Bytes,
    finished: bool,
}

impl TunnelIo {
    pub fn new(tunnel: Tunnel) -> Self {
        Self {
            tunnel,
            unread: Bytes::new(),
            finished: false,
        }
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.tunnel.recv.poll_recv(cx)) {
                Some(Ok(data)) => self.unread = data,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        self.tunnel.recv.release(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.finished {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel finished")));
        }
        self.tunnel.send.reserve(buf.len());
        let granted = ready!(self.tunnel.send.poll_room(cx))?;
        if granted == 0 {
            // Room was asked for and none granted yet: poll_room registered no wake-up.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = granted.min(buf.len());
        self.tunnel.send.send(Bytes::copy_from_slice(&buf[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sent data is queued on the outer connection, which its own task writes out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.finished {
            self.finished = true;
            self.tunnel.send.finish()?;
        }
        Poll::Ready(Ok(()))
    }
}
