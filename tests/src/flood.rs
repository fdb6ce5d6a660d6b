//! A hostile host's flood of silent connections against a TLS listener (trellisd's 15012), and
//! the percentile the suites compare a well-behaved client's calls by. Used by
//! `control/tests/admission.rs` (on loopback) and `tests/tests/exhaustion.rs` (in the lab).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpSocket, TcpStream};

/// How many silent connections of each kind, and where they come from.
#[derive(Debug, Clone, Copy)]
pub struct Flood {
    /// Connections that finish TLS (with no client certificate) and send nothing.
    pub silent_tls: usize,
    /// Connections that never start TLS.
    pub silent_tcp: usize,
    /// The flood's own source address (`None`: whatever the route picks).
    pub from: Option<IpAddr>,
}

/// What became of the flood.
#[derive(Debug)]
pub struct Flooded {
    pub tls_opened: usize,
    pub tcp_opened: usize,
    /// Connections the server had not closed by the deadline.
    pub tls_still_open: usize,
    pub tcp_still_open: usize,
}

async fn dial(server: SocketAddr, from: Option<IpAddr>) -> Option<TcpStream> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .ok()?;
    if let Some(from) = from {
        socket.bind(SocketAddr::new(from, 0)).ok()?;
    }
    tokio::time::timeout(Duration::from_secs(5), socket.connect(server))
        .await
        .ok()?
        .ok()
}

/// Runs `flood` against `server`: the silent TLS connections first (then `tls_done` fires),
/// then bare TCP, 64 dials at a time (then `all_done` fires); then waits for the server to close
/// each connection, at most `close_within` after the last dial.
pub async fn flood(
    server: SocketAddr,
    flood: Flood,
    tls: Arc<rustls::ClientConfig>,
    tls_done: tokio::sync::oneshot::Sender<()>,
    all_done: tokio::sync::oneshot::Sender<()>,
    close_within: Duration,
) -> Flooded {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut silent_tls = Vec::new();
    for _ in 0..flood.silent_tls {
        let Some(tcp) = dial(server, flood.from).await else {
            continue;
        };
        let name = rustls_pki_types::ServerName::try_from("trellis.invalid").expect("a DNS name");
        if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await {
            silent_tls.push(tls);
        }
    }
    let _ = tls_done.send(());
    let silent_tcp: Vec<TcpStream> = futures::stream::iter((0..flood.silent_tcp).map(|_| dial(server, flood.from)))
        .buffer_unordered(64)
        .filter_map(|tcp| async move { tcp })
        .collect()
        .await;
    let _ = all_done.send(());
    let (tls_opened, tcp_opened) = (silent_tls.len(), silent_tcp.len());
    let deadline = tokio::time::Instant::now() + close_within;
    let still_open =
        |closed: Vec<Result<(), tokio::time::error::Elapsed>>| closed.iter().filter(|c| c.is_err()).count();
    let tcp_still_open = still_open(
        futures::future::join_all(
            silent_tcp
                .into_iter()
                .map(|c| tokio::time::timeout_at(deadline, until_closed(c))),
        )
        .await,
    );
    let tls_still_open = still_open(
        futures::future::join_all(
            silent_tls
                .into_iter()
                .map(|c| tokio::time::timeout_at(deadline, until_closed(c))),
        )
        .await,
    );
    Flooded {
        tls_opened,
        tcp_opened,
        tls_still_open,
        tcp_still_open,
    }
}

/// Reads until the server closes the connection.
pub async fn until_closed(mut conn: impl AsyncRead + Unpin) {
    let mut buf = [0u8; 64];
    while let Ok(n) = conn.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// The 99th percentile of `took` (the largest of fewer than 100).
pub fn p99(mut took: Vec<Duration>) -> Duration {
    assert!(!took.is_empty(), "no sample to take a percentile of");
    took.sort();
    took[(took.len() * 99).div_ceil(100) - 1]
}

/// Whether `flooded` is within twice `undisturbed` plus 50 ms: the flood's own client shares the
/// machine's two cores with the server, while the failures guarded against (starved accepts,
/// handshakes or descriptors) cost seconds or fail the call outright.
pub fn within_twice(flooded: Duration, undisturbed: Duration) -> bool {
    flooded <= undisturbed * 2 + Duration::from_millis(50)
}
