//! Moves bytes between a TCP socket and a tunnel (an HTTP/2 `CONNECT` stream today; any
//! [`SendHalf`]/[`RecvHalf`] pair), with backpressure both ways: data is sent only when the
//! peer's window has room, and window is given back only once the bytes are written to the
//! socket. Half-closes travel end to end (TCP FIN becomes END_STREAM and back); an error on either
//! side resets the other.
//!
//! The pump is generic over the halves, so the server's h2 streams run it with no indirection;
//! the pool's boxed halves cost one virtual call per chunk, never per byte.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::idle::{self, Activity, IdleTimeouts};
use super::tunnel::{recv, send_all, RecvHalf, SendHalf};

/// Read buffer of a new tunnel: small, so that thousands of quiet connections cost little.
const FIRST_CHUNK: usize = 16 * 1024;
/// Read buffer of a busy tunnel: a whole [`super::MAX_FRAME`] DATA frame, so bulk transfers move
/// a quarter megabyte per read, frame and `writev`.
const LARGEST_CHUNK: usize = super::MAX_FRAME as usize;

/// Called with every chunk that crosses, for live byte counters.
pub trait OnBytes: Send + Sync {
    /// Bytes read from the TCP side and sent into the tunnel.
    fn upstream(&self, n: u64);
    /// Bytes received from the tunnel and written to the TCP side.
    fn downstream(&self, n: u64);
}

/// Bytes moved each way once a tunnel ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// TCP → tunnel.
    pub upstream: u64,
    /// Tunnel → TCP.
    pub downstream: u64,
}

/// Runs the tunnel until both directions are closed, or one fails (then the other is reset),
/// or the tunnel stays silent past `timeouts` (then both are reset: [`idle`]). `early` counts
/// bytes that already crossed before the pump started (the client's first bytes, sent with the
/// `CONNECT`): they count as activity, not in the returned [`Moved`].
pub async fn splice<S: SendHalf, R: RecvHalf>(
    tcp: TcpStream,
    mut send: S,
    mut recv: R,
    counters: &dyn OnBytes,
    timeouts: IdleTimeouts,
    early: u64,
) -> (Moved, io::Result<()>) {
    let (rd, mut wr) = tcp.into_split();
    let mut moved = Moved::default();
    let activity = Activity::default();
    activity.add(early);
    let result = {
        let up = tcp_to_tunnel(rd, &mut send, counters, &activity, &mut moved.upstream);
        let down = tunnel_to_tcp(&mut recv, &mut wr, counters, &activity, &mut moved.downstream);
        tokio::select! {
            result = async { tokio::try_join!(up, down) } => result.map(|_| ()),
            silent = idle::watch(timeouts, &activity) => Err(io::Error::new(io::ErrorKind::TimedOut, silent)),
        }
    };
    if result.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::TimedOut) {
        send.reset();
        let _ = socket2::SockRef::from(wr.as_ref()).set_linger(Some(std::time::Duration::ZERO));
    }
    (moved, result)
}

async fn tcp_to_tunnel<S: SendHalf>(
    mut rd: OwnedReadHalf,
    send: &mut S,
    counters: &dyn OnBytes,
    activity: &Activity,
    total: &mut u64,
) -> io::Result<()> {
    let mut chunk_size = FIRST_CHUNK;
    let mut buf = BytesMut::with_capacity(chunk_size);
    loop {
        if buf.capacity() < chunk_size / 4 {
            buf = BytesMut::with_capacity(chunk_size);
        }
        let room = buf.capacity();
        let n = match rd.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                send.reset();
                return Err(e);
            }
        };
        if n == 0 {
            return send.finish();
        }
        if n == room {
            // The read filled the buffer: more is waiting, so read in bigger gulps from now on.
            chunk_size = (chunk_size * 4).min(LARGEST_CHUNK);
        }
        let chunk = buf.split().freeze();
        send_all(send, chunk, |len| {
            *total += len;
            activity.add(len);
            counters.upstream(len);
        })
        .await?;
    }
}

async fn tunnel_to_tcp<R: RecvHalf>(
    from: &mut R,
    wr: &mut OwnedWriteHalf,
    counters: &dyn OnBytes,
    activity: &Activity,
    total: &mut u64,
) -> io::Result<()> {
    while let Some(data) = recv(from).await {
        let data = match data {
            Ok(data) => data,
            Err(e) => {
                // The peer reset the stream: reset our side too, so the application sees it.
                let _ = socket2::SockRef::from(wr.as_ref()).set_linger(Some(std::time::Duration::ZERO));
                return Err(e);
            }
        };
        wr.write_all(&data).await?;
        let len = data.len();
        from.release(len);
        *total += len as u64;
        activity.add(len as u64);
        counters.downstream(len as u64);
    }
    wr.shutdown().await
}

/// Copies between two plain sockets (traffic outside the mesh), counting as it goes; the
/// client's side is `client`.
pub async fn copy_plain(
    client: TcpStream,
    upstream: TcpStream,
    counters: &dyn OnBytes,
) -> (Moved, std::io::Result<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        count: &(dyn Fn(u64) + Sync),
        total: &mut u64,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return to.shutdown().await;
            }
            to.write_all(&buf[..n]).await?;
            *total += n as u64;
            count(n as u64);
        }
    }
    let (client_rd, client_wr) = client.into_split();
    let (up_rd, up_wr) = upstream.into_split();
    let mut moved = Moved::default();
    let up = |n| counters.upstream(n);
    let down = |n| counters.downstream(n);
    let result = tokio::try_join!(
        pump(client_rd, up_wr, &up, &mut moved.upstream),
        pump(up_rd, client_wr, &down, &mut moved.downstream)
    )
    .map(|_| ());
    (moved, result)
}
