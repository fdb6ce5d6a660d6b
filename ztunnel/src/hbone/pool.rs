//! The HBONE client: opens CONNECT tunnels over pooled HTTP/2 connections.
//!
//! One pool entry per (source identity, destination node, destination identity), as DESIGN.md
//! says: the TLS client certificate is the source workload's SVID and the server must present
//! the destination's identity, so neither can be shared across those keys. An entry holds as
//! many connections as its tunnels need at [`MAX_STREAMS`] each; connections idle for
//! [`IDLE_TIMEOUT`] are closed by a reaper.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use trellis_identity::tls::client_config;
use trellis_identity::verify::{ExpectedPeer, SpiffeServerVerifier};
use trellis_identity::{BundleSet, CertManager, SpiffeId};

use super::{
    dial, sni_for, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, MAX_FRAME, MAX_HEADERS, MAX_STREAMS,
    STREAM_WINDOW,
};

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no valid SVID for {0} (is trellisd reachable, and the workload on this node?)")]
    NoCertificate(SpiffeId),
    #[error("cannot reach node {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("TLS with node {0} failed: {1}")]
    Tls(SocketAddr, io::Error),
    #[error("HTTP/2 with node {0} failed: {1}")]
    Protocol(SocketAddr, h2::Error),
    /// The tunnel failed after the client's first bytes were sent with the CONNECT, without an
    /// answer proving they were never delivered: replaying them elsewhere could deliver twice.
    #[error("HTTP/2 with node {0} failed after the first bytes were sent: {1}")]
    Interrupted(SocketAddr, h2::Error),
    #[error("denied by the destination's policy (401)")]
    Denied,
    #[error("the destination node could not reach the workload (503)")]
    Unreachable,
    #[error("the destination node answered {0}")]
    Status(StatusCode),
}

impl OpenError {
    /// Whether the endpoint itself failed, so that it should be ejected and the next one tried.
    /// A policy denial is an answer, not a failure.
    pub fn endpoint_failed(&self) -> bool {
        !matches!(self, Self::Denied | Self::NoCertificate(_))
    }

    /// Whether the connection may be retried on another endpoint: the destination has not
    /// received the client's bytes, or has answered that it never delivered them.
    pub fn retryable(&self) -> bool {
        self.endpoint_failed() && !matches!(self, Self::Interrupted(..))
    }
}

/// Where a tunnel goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub source: SpiffeId,
    /// The destination node's HBONE address.
    pub node: SocketAddr,
    pub destination: SpiffeId,
}

/// An open tunnel. The pooled connection counts it as in flight until this is dropped.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    _in_flight: InFlight,
}

struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

struct Conn {
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

/// The pool of HBONE connections of one ztunnel.
pub struct Pool {
    certs: CertManager,
    bundles: BundleSet,
    conns: Mutex<HashMap<Key, Vec<Arc<Conn>>>>,
    tls: Mutex<HashMap<(SpiffeId, SpiffeId), Arc<ClientConfig>>>,
}

impl Pool {
    /// A pool presenting SVIDs from `certs` and checking servers against `bundles`; starts its
    /// idle reaper.
    pub fn new(certs: CertManager, bundles: BundleSet) -> Arc<Self> {
        let pool = Arc::new(Self {
            certs,
            bundles,
            conns: Mutex::new(HashMap::new()),
            tls: Mutex::new(HashMap::new()),
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    /// Opens a tunnel to `authority` (the destination workload's address) through `key.node`,
    /// with the extra request `headers`. `early` (the client's first bytes, possibly empty)
    /// leaves with the CONNECT instead of a round trip later; the destination ztunnel holds
    /// them until the workload is connected, and drops them with any answer but 200.
    pub async fn open(
        &self,
        key: &Key,
        authority: SocketAddr,
        headers: &[(&str, String)],
        early: &Bytes,
    ) -> Result<Tunnel, OpenError> {
        // A pooled connection may have just received GOAWAY: then dial once more.
        for attempt in 0..2 {
            let conn = self.connection(key, attempt > 0).await?;
            let in_flight = InFlight(conn.clone());
            let mut request = Request::builder().method(Method::CONNECT).uri(authority.to_string());
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            let request = request.body(()).map_err(|e| OpenError::Status(bad_request(e)))?;
            let sent = match conn.send.clone().ready().await {
                Ok(mut send) => send.send_request(request, false),
                Err(e) => Err(e),
            };
            let (response, mut send) = match sent {
                Ok(sent) => sent,
                Err(e) if attempt == 0 && (e.is_go_away() || e.is_io() || conn.closed.load(Ordering::Acquire)) => {
                    conn.closed.store(true, Ordering::Release);
                    continue;
                }
                Err(e) => return Err(OpenError::Protocol(key.node, e)),
            };
            // Within the stream's initial window (far above the few KiB read early), so h2
            // frames it with the HEADERS instead of buffering it. It fails only if the stream
            // has already ended, when its answer (a refusal, say) tells more than the failure.
            let unsent = if early.is_empty() {
                None
            } else {
                send.send_data(early.clone(), false).err()
            };
            let response = response.await.map_err(|e| failed_after_send(key.node, e, early))?;
            return match (response.status(), unsent) {
                (StatusCode::OK, Some(e)) => Err(OpenError::Protocol(key.node, e)),
                (StatusCode::OK, None) => Ok(Tunnel {
                    send,
                    recv: response.into_body(),
                    _in_flight: in_flight,
                }),
                (StatusCode::UNAUTHORIZED, _) => Err(OpenError::Denied),
                (StatusCode::SERVICE_UNAVAILABLE, _) => Err(OpenError::Unreachable),
                (other, _) => Err(OpenError::Status(other)),
            };
        }
        Err(OpenError::Connect(
            key.node,
            io::Error::other("connection closed twice in a row"),
        ))
    }

    /// A connection of `key` with a free stream slot, dialling one if there is none.
    async fn connection(&self, key: &Key, fresh: bool) -> Result<Arc<Conn>, OpenError> {
        if !fresh {
            let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            for conn in conns.get(key).into_iter().flatten() {
                if conn.closed.load(Ordering::Acquire) {
                    continue;
                }
                let active = conn.active.load(Ordering::Acquire);
                if active < MAX_STREAMS as usize
                    && conn
                        .active
                        .compare_exchange(active, active + 1, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    return Ok(conn.clone());
                }
            }
        }
        let conn = Arc::new(self.dial(key).await?);
        conn.active.store(1, Ordering::Release);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }

    async fn dial(&self, key: &Key) -> Result<Conn, OpenError> {
        if self.certs.wait_for(&key.source, Duration::from_secs(5)).await.is_none() {
            return Err(OpenError::NoCertificate(key.source.clone()));
        }
        let config = self.tls_config(&key.source, &key.destination);
        let tcp = dial(key.node).await.map_err(|e| OpenError::Connect(key.node, e))?;
        let name = rustls::pki_types::ServerName::try_from(sni_for(&key.destination))
            .map_err(|e| OpenError::Tls(key.node, io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let handshake = async {
            let mut tls = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| OpenError::Tls(key.node, e))?;
            tls.get_mut().1.set_buffer_limit(Some(super::TLS_BUFFER_LIMIT));
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_header_list_size(MAX_HEADERS)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| OpenError::Protocol(key.node, e))
        };
        let (send, connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| OpenError::Tls(key.node, io::Error::new(io::ErrorKind::TimedOut, "handshake timed out")))??;
        let closed = Arc::new(AtomicBool::new(false));
        let on_close = closed.clone();
        let node = key.node;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%node, error = %e, "HBONE connection ended");
            }
            on_close.store(true, Ordering::Release);
        });
        tracing::debug!(%node, source = %key.source, destination = %key.destination, "HBONE connection opened");
        Ok(Conn {
            send,
            active: AtomicUsize::new(0),
            closed,
            idle_since: Mutex::new(Instant::now()),
        })
    }

    fn tls_config(&self, source: &SpiffeId, destination: &SpiffeId) -> Arc<ClientConfig> {
        let mut configs = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        configs
            .entry((source.clone(), destination.clone()))
            .or_insert_with(|| {
                let verifier =
                    SpiffeServerVerifier::new(self.bundles.clone(), ExpectedPeer::Exact(destination.clone()));
                let mut config = client_config(verifier, Some(self.certs.resolver(source)))
                    .unwrap_or_else(|e| unreachable!("TLS 1.3 with aws-lc-rs is always available: {e}"));
                config.alpn_protocols = vec![b"h2".to_vec()];
                Arc::new(config)
            })
            .clone()
    }

    /// Open connections per key, for the config dump.
    pub fn snapshot(&self) -> Vec<(Key, usize, usize)> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.len(),
                    v.iter().map(|c| c.active.load(Ordering::Relaxed)).sum(),
                )
            })
            .collect()
    }

    /// Drops closed connections and those idle too long (which closes them).
    fn reap_once(&self, now: Instant) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|_, list| {
            list.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(*c.idle_since.lock().unwrap_or_else(|p| p.into_inner())) > IDLE_TIMEOUT;
                !c.closed.load(Ordering::Acquire) && !idle
            });
            !list.is_empty()
        });
        let mut tls = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        tls.retain(|(src, dst), _| conns.keys().any(|k| &k.source == src && &k.destination == dst));
    }
}

async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.reap_once(Instant::now());
    }
}

/// The error of a CONNECT whose answer never came. Early bytes were surely not delivered only
/// if the server refused the stream (REFUSED_STREAM: RFC 9113 §8.7 says it was not processed);
/// a connection that broke, or a GOAWAY, proves nothing about them.
fn failed_after_send(node: SocketAddr, e: h2::Error, early: &Bytes) -> OpenError {
    let unprocessed = e.reason() == Some(h2::Reason::REFUSED_STREAM);
    if early.is_empty() || unprocessed {
        OpenError::Protocol(node, e)
    } else {
        OpenError::Interrupted(node, e)
    }
}

fn bad_request(e: http::Error) -> StatusCode {
    tracing::warn!(error = %e, "could not build the CONNECT request");
    StatusCode::BAD_REQUEST
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
