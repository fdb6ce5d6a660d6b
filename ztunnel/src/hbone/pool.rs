//! The HBONE client: opens tunnels over pooled connections.
//!
//! One pool entry per (source identity, destination node, destination identity), as DESIGN.md
//! says, and per [`Protocol`]: the TLS client certificate is the source workload's SVID and the
//! server must present the destination's identity, so neither can be shared across those keys.
//! An entry holds as many connections as its tunnels need at [`Key::tunnels_per_connection`] each
//! ([`MAX_STREAMS`], or one for an inner connection over QUIC); connections
//! idle for [`IDLE_TIMEOUT`] are closed by a reaper.
//!
//! **Dials are shared.** An open that finds no connection with a free stream joins a dial in
//! flight for its key, up to [`MAX_STREAMS`] opens per dial, and starts one only when there is
//! none to join: N opens at once to a cold key cost ⌈N / [`MAX_STREAMS`]⌉ handshakes, not N.
//! Each joined open is promised one stream of the connection to come. The dial runs in a task
//! of its own, so it completes for the others when the open that started it gives up; a failed
//! dial is reported to every open waiting on it and then forgotten, so the next open dials again.
//!
//! **Rotation.** A connection takes new tunnels only while the SVID it was dialled with is still
//! the source's current one ([`super::expiry`]): once renewed, new tunnels go to a connection
//! dialled with the new SVID, while the old one carries its open tunnels to their end and is
//! closed when it carries none. An open refused by a connection that heard GOAWAY (or had its
//! stream refused unprocessed) goes once more to a fresh connection.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::ClientConfig;
use tokio::sync::watch;
use trellis_identity::tls::client_config;
use trellis_identity::verify::{ExpectedPeer, SpiffeServerVerifier};
use trellis_identity::{BundleSet, CertManager, HeldSvid, SpiffeId};

use super::expiry::{self, PooledConn};
use super::http2::Http2;
use super::tunnel::{self, Answer, Connection, Protocol, RecvHalf, SendHalf, StreamFailure, Transport};
use super::{sni_for, IDLE_TIMEOUT, MAX_STREAMS};

/// The deadline of [`Pool::open`], for callers without one of their own.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no valid SVID for {0} (is trellisd reachable, and the workload on this node?)")]
    NoCertificate(SpiffeId),
    #[error("cannot reach node {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("TLS with node {0} failed: {1}")]
    Tls(SocketAddr, io::Error),
    #[error("the tunnel protocol with node {0} failed: {1}")]
    Protocol(SocketAddr, io::Error),
    /// The tunnel failed after the client's first bytes were sent with the CONNECT, without an
    /// answer proving they were never delivered: replaying them elsewhere could deliver twice.
    #[error("the tunnel protocol with node {0} failed after the first bytes were sent: {1}")]
    Interrupted(SocketAddr, io::Error),
    #[error("denied by the destination's policy (401)")]
    Denied,
    #[error("the destination node could not reach the workload (503)")]
    Unreachable,
    #[error("the destination node answered {0}")]
    Status(StatusCode),
    /// No connection to the node (or gateway) came up within the attempt's deadline: nothing
    /// was sent on it.
    #[error("node {0} did not answer within the connect timeout")]
    TimedOut(SocketAddr),
    /// The connection stopped answering altogether (no answer to the CONNECT, none to a PING
    /// after it): the node is gone or cut off, and is taken as not having received the CONNECT.
    #[error("node {0} stopped answering (no answer to the CONNECT or to a PING)")]
    Unanswered(SocketAddr),
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

    /// Whether the node (or gateway) itself failed, rather than the workload behind it: then
    /// every endpoint reached through it is ejected with it.
    pub fn hop_failed(&self) -> bool {
        matches!(
            self,
            Self::Connect(..) | Self::Tls(..) | Self::Protocol(..) | Self::TimedOut(_) | Self::Unanswered(_)
        )
    }

    /// The error an answer other than 200 means.
    fn refusal(status: StatusCode) -> Self {
        match status {
            StatusCode::UNAUTHORIZED => Self::Denied,
            StatusCode::SERVICE_UNAVAILABLE => Self::Unreachable,
            other => Self::Status(other),
        }
    }
}

/// One failed dial is reported to every open that waited on it. `io::Error` is not `Clone`:
/// a clone keeps its kind and message.
impl Clone for OpenError {
    fn clone(&self) -> Self {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            Self::NoCertificate(id) => Self::NoCertificate(id.clone()),
            Self::Connect(node, e) => Self::Connect(*node, io(e)),
            Self::Tls(node, e) => Self::Tls(*node, io(e)),
            Self::Protocol(node, e) => Self::Protocol(*node, io(e)),
            Self::Interrupted(node, e) => Self::Interrupted(*node, io(e)),
            Self::Denied => Self::Denied,
            Self::Unreachable => Self::Unreachable,
            Self::Status(status) => Self::Status(*status),
            Self::TimedOut(node) => Self::TimedOut(*node),
            Self::Unanswered(node) => Self::Unanswered(*node),
        }
    }
}

/// Where a tunnel goes, and over what.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub source: SpiffeId,
    /// The destination node's HBONE address (through a gateway: the gateway's).
    pub node: SocketAddr,
    pub destination: SpiffeId,
    pub protocol: Protocol,
    /// Set for a connection inside a tunnel through an east-west gateway.
    pub via: Option<Via>,
}

impl Key {
    /// How many tunnels one connection of this key carries at once. An inner connection through
    /// a gateway rides on one outer stream; over QUIC it carries one tunnel at a time, so that a
    /// packet lost on the wan stalls only that tunnel (its own QUIC stream), not every tunnel
    /// multiplexed on one inner HTTP/2 connection. An idle one is reused by the next tunnel, so
    /// sequential connections still cost no handshake. Over TCP the outer connection is one
    /// ordered byte stream anyway: inner connections multiplex like any other.
    pub fn tunnels_per_connection(&self) -> usize {
        match (&self.via, self.protocol) {
            (Some(_), Protocol::Http3) => 1,
            _ => MAX_STREAMS as usize,
        }
    }
}

/// The outer tunnel of a connection through an east-west gateway ([`super::nested`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Via {
    /// The identity the gateway presents.
    pub gateway: SpiffeId,
    /// The global service the outer tunnel asks for, `<hostname>:<port>`: the gateway chooses
    /// a node that serves it.
    pub authority: String,
    /// Which of the parallel inner connections to that service this is: each lands on a node
    /// of the gateway's choosing, so several spread the load over the far cluster.
    pub lane: u8,
}

/// The header of an outer CONNECT naming the identity the inner connection asks for, so that
/// the gateway picks a node that serves it.
pub const DESTINATION_HEADER: &str = "trellis-destination-identity";

/// An open tunnel. The pooled connection counts it as in flight until this is dropped.
pub struct Tunnel {
    pub send: Box<dyn SendHalf>,
    pub recv: Box<dyn RecvHalf>,
    _in_flight: InFlight,
}

impl Tunnel {
    /// Sends all of `data`, waiting for the destination's window as needed.
    pub async fn send_all(&mut self, data: Bytes) -> io::Result<()> {
        tunnel::send_all(&mut self.send, data, |_| {}).await
    }

    /// The next bytes from the destination, `None` once it has finished. Their window is given
    /// back at once: a caller that forwards them elsewhere drives `recv` itself and releases
    /// only what it has written on, as [`super::copy::splice`] does.
    pub async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        let next = tunnel::recv(&mut self.recv).await;
        if let Some(Ok(data)) = &next {
            self.recv.release(data.len());
        }
        next
    }

    /// Ends the sending direction; the destination's workload reads end of file.
    pub fn finish(&mut self) -> io::Result<()> {
        self.send.finish()
    }
}

/// One stream slot of a pooled connection, held by a tunnel (or by an open about to make one).
struct InFlight(Arc<Pooled>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}

struct Pooled {
    conn: Arc<dyn Connection>,
    /// The source's SVID when the connection was dialled: the one it presented, or an older
    /// one if a renewal raced the handshake (then the connection retires early, which is safe).
    presented: Arc<HeldSvid>,
    /// Tunnels in flight, including those promised to opens that waited on its dial.
    active: AtomicUsize,
    /// How many tunnels it carries at once ([`Key::tunnels_per_connection`]).
    room: usize,
    idle_since: Mutex<Instant>,
}

impl Pooled {
    /// Whether the connection may carry a new tunnel, `current` being the source's SVID now
    /// (see [`expiry::takes_new_tunnels`]).
    fn takes_new_tunnels(&self, current: Option<&Arc<HeldSvid>>, now: SystemTime) -> bool {
        let facts = PooledConn {
            gone: self.conn.is_closed(),
            presented_until: self.presented.svid.not_after,
            presented_is_current: current.is_some_and(|c| Arc::ptr_eq(c, &self.presented)),
        };
        expiry::takes_new_tunnels(facts, now)
    }

    /// Takes a free stream slot, if there is one and the connection takes new tunnels.
    fn claim(self: &Arc<Self>, current: Option<&Arc<HeldSvid>>, now: SystemTime) -> Option<InFlight> {
        if !self.takes_new_tunnels(current, now) {
            return None;
        }
        let mut active = self.active.load(Ordering::Acquire);
        while active < self.room {
            match self
                .active
                .compare_exchange(active, active + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(InFlight(self.clone())),
                Err(now) => active = now,
            }
        }
        None
    }
}

/// The connections of one key, and the dials in flight for it.
#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Pooled>>,
    dials: Vec<Arc<Dial>>,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.conns.is_empty() && self.dials.is_empty()
    }
}

/// A dial in flight, shared by the opens waiting on it.
struct Dial {
    state: Mutex<DialState>,
    /// How many opens its connection will carry.
    room: usize,
    /// Turns true once `state` is no longer pending.
    done: watch::Sender<bool>,
}

enum DialState {
    /// Still dialling; `promised` opens wait for one stream each.
    Pending {
        promised: usize,
    },
    /// Connected; the promised streams are counted in the connection's `active`.
    Ready(Arc<Pooled>),
    Failed(OpenError),
}

impl Dial {
    fn new(room: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(DialState::Pending { promised: 1 }),
            room,
            done: watch::channel(false).0,
        })
    }

    /// Promises one more stream of the connection to come, if it has one left.
    fn join(self: &Arc<Self>) -> Option<Ticket> {
        match &mut *lock(&self.state) {
            DialState::Pending { promised } if *promised < self.room => {
                *promised += 1;
                Some(Ticket {
                    dial: self.clone(),
                    redeemed: false,
                })
            }
            _ => None,
        }
    }

    fn waiting(&self) -> usize {
        match &*lock(&self.state) {
            DialState::Pending { promised } => *promised,
            _ => 0,
        }
    }
}

/// An open's claim on a stream of a dial in flight. Dropped unredeemed (the open gave up), it
/// hands the stream back.
struct Ticket {
    dial: Arc<Dial>,
    redeemed: bool,
}

impl Ticket {
    async fn redeem(mut self) -> Result<InFlight, OpenError> {
        let mut done = self.dial.done.subscribe();
        // The sender lives in `self.dial`, so this ends only when the dial has.
        let _ = done.wait_for(|done| *done).await;
        self.redeemed = true;
        match &*lock(&self.dial.state) {
            DialState::Ready(conn) => Ok(InFlight(conn.clone())),
            DialState::Failed(e) => Err(e.clone()),
            DialState::Pending { .. } => unreachable!("a dial is done only once it is no longer pending"),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.redeemed {
            return;
        }
        let conn = match &mut *lock(&self.dial.state) {
            DialState::Pending { promised } => {
                *promised -= 1;
                return;
            }
            DialState::Ready(conn) => conn.clone(),
            DialState::Failed(_) => return,
        };
        drop(InFlight(conn));
    }
}

type Entries = Arc<Mutex<HashMap<Key, Entry>>>;

/// The pool of HBONE connections of one ztunnel.
pub struct Pool {
    /// Itself, for dials through a gateway, which open their outer tunnel on this pool.
    me: Weak<Pool>,
    certs: CertManager,
    bundles: BundleSet,
    http2: Arc<dyn Transport>,
    http3: Arc<super::http3::Http3>,
    entries: Entries,
    tls: Mutex<HashMap<(SpiffeId, SpiffeId, Protocol), Arc<ClientConfig>>>,
}

impl Pool {
    /// A pool presenting SVIDs from `certs` and checking servers against `bundles`; starts its
    /// idle reaper.
    pub fn new(certs: CertManager, bundles: BundleSet) -> Arc<Self> {
        let pool = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            certs,
            bundles,
            http2: Arc::new(Http2),
            http3: Arc::new(super::http3::Http3::default()),
            entries: Arc::default(),
            tls: Mutex::new(HashMap::new()),
        });
        tokio::spawn(reap(Arc::downgrade(&pool)));
        pool
    }

    /// Tunes the QUIC connections it dials from now on (and its socket, if not bound yet).
    pub fn set_quic_tuning(&self, tuning: super::http3::QuicTuning) {
        self.http3.set_tuning(tuning);
    }

    /// Opens a tunnel to `authority` (the destination workload's address) through `key.node`,
    /// with the extra request `headers`, within [`OPEN_TIMEOUT`]; see [`Pool::open_by`].
    pub async fn open(
        &self,
        key: &Key,
        authority: impl std::fmt::Display,
        headers: &[(&str, String)],
        early: &Bytes,
    ) -> Result<Tunnel, OpenError> {
        let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
        self.open_by(key, authority, headers, early, deadline).await
    }

    /// Opens a tunnel to `authority` (the destination workload's address) through `key.node`,
    /// with the extra request `headers`. `early` (the client's first bytes, possibly empty)
    /// leaves with the CONNECT instead of a round trip later; the destination ztunnel holds
    /// them until the workload is connected, and drops them with any answer but 200.
    ///
    /// **Deadline.** No connection by `deadline`: [`OpenError::TimedOut`] (nothing was sent).
    /// A CONNECT still unanswered a quarter of the way to the deadline has its connection
    /// probed with a PING; no answer to that either, and the connection is closed and every
    /// open waiting on it fails at once with [`OpenError::Unanswered`] (the node is gone).
    /// A connection that answers the PING but not the CONNECT by the deadline is slow, not
    /// gone: the open fails with [`OpenError::TimedOut`] if it sent no early bytes, and with
    /// [`OpenError::Interrupted`] (not to be replayed) if it did.
    pub async fn open_by(
        &self,
        key: &Key,
        authority: impl std::fmt::Display,
        headers: &[(&str, String)],
        early: &Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<Tunnel, OpenError> {
        let mut fresh = false;
        loop {
            let start = tokio::time::Instant::now();
            let in_flight = tokio::time::timeout_at(deadline, self.connection(key, fresh))
                .await
                .map_err(|_| OpenError::TimedOut(key.node))??;
            let mut request = Request::builder().method(Method::CONNECT).uri(authority.to_string());
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            let request = request.body(()).map_err(|e| OpenError::Status(bad_request(e)))?;
            let conn = in_flight.0.conn.clone();
            let answer = conn.open(request, early);
            tokio::pin!(answer);
            let probe_at = start + deadline.saturating_duration_since(start) / 4;
            let answer = tokio::select! {
                answer = &mut answer => answer,
                _ = tokio::time::sleep_until(probe_at) => {
                    let window = deadline.saturating_duration_since(probe_at) * 2 / 3;
                    let probed = conn.clone();
                    let node = key.node;
                    tokio::spawn(async move {
                        if !probed.alive(window).await {
                            tracing::warn!(%node, "HBONE connection answers neither a CONNECT nor a PING: closed, with every tunnel it carries");
                            probed.kill();
                        }
                    });
                    match tokio::time::timeout_at(deadline, &mut answer).await {
                        Ok(answer) => answer,
                        Err(_) if early.is_empty() => return Err(OpenError::TimedOut(key.node)),
                        Err(_) => {
                            let slow = io::Error::new(io::ErrorKind::TimedOut, "no answer to the CONNECT in time");
                            return Err(OpenError::Interrupted(key.node, slow));
                        }
                    }
                }
            };
            match answer {
                Ok(Answer::Open(send, recv)) => {
                    return Ok(Tunnel {
                        send,
                        recv,
                        _in_flight: in_flight,
                    })
                }
                Ok(Answer::Refused(status)) => return Err(OpenError::refusal(status)),
                // A pooled connection may have just received GOAWAY: then once more, on a
                // connection dialled since.
                Err(StreamFailure::ConnectionGone(_)) if !fresh => fresh = true,
                Err(StreamFailure::ConnectionGone(e) | StreamFailure::Failed(e)) => return Err(e),
            }
        }
    }

    /// A stream slot on a connection of `key`: on a pooled one with room that still presents the
    /// source's current SVID (unless `fresh`), else on a dial in flight, else on a new dial.
    async fn connection(&self, key: &Key, fresh: bool) -> Result<InFlight, OpenError> {
        let (current, now) = (self.certs.current(&key.source), SystemTime::now());
        let ticket = {
            let mut entries = lock(&self.entries);
            let joined = match entries.get(key) {
                Some(entry) => {
                    if !fresh {
                        if let Some(slot) = entry.conns.iter().find_map(|c| c.claim(current.as_ref(), now)) {
                            return Ok(slot);
                        }
                    }
                    entry.dials.iter().find_map(Dial::join)
                }
                None => None,
            };
            match joined {
                Some(ticket) => ticket,
                None => {
                    let dial = Dial::new(key.tunnels_per_connection());
                    entries.entry(key.clone()).or_default().dials.push(dial.clone());
                    self.start_dial(key, dial.clone());
                    Ticket { dial, redeemed: false }
                }
            }
        };
        ticket.redeem().await
    }

    /// Dials for `key` in a task of its own, and publishes the outcome to `dial`'s waiters.
    fn start_dial(&self, key: &Key, dial: Arc<Dial>) {
        let transport = match key.protocol {
            Protocol::Http2 => self.http2.clone(),
            Protocol::Http3 => self.http3.clone() as Arc<dyn Transport>,
        };
        // Through a gateway the inner connection is always HTTP/2, whatever carries the outer.
        let inner = if key.via.is_some() {
            Protocol::Http2
        } else {
            key.protocol
        };
        let tls = self.tls_config(&key.source, &key.destination, inner);
        let certs = self.certs.clone();
        let trusted = self.bundles.clone();
        let pool = self.me.clone();
        let outcome = Outcome {
            entries: self.entries.clone(),
            key: key.clone(),
            dial: Some(dial),
        };
        tokio::spawn(async move {
            let key = &outcome.key;
            let connected = async move {
                let Some(presented) = certs.wait_for(&key.source, Duration::from_secs(5)).await else {
                    return Err(OpenError::NoCertificate(key.source.clone()));
                };
                let name = rustls::pki_types::ServerName::try_from(sni_for(&key.destination))
                    .map_err(|e| OpenError::Tls(key.node, io::Error::new(io::ErrorKind::InvalidInput, e)))?;
                let conn = match &key.via {
                    None => transport.connect(key.node, name, tls, trusted).await?,
                    Some(via) => {
                        let pool = pool.upgrade().ok_or_else(|| {
                            OpenError::Connect(key.node, io::Error::other("ztunnel is shutting down"))
                        })?;
                        let outer = Key {
                            destination: via.gateway.clone(),
                            via: None,
                            ..key.clone()
                        };
                        let asks = [(DESTINATION_HEADER, key.destination.to_string())];
                        let deadline = tokio::time::Instant::now() + super::HANDSHAKE_TIMEOUT;
                        let tunnel = pool
                            .open_by(&outer, &via.authority, &asks, &Bytes::new(), deadline)
                            .await?;
                        super::http2::handshake(super::nested::TunnelIo::new(tunnel), key.node, name, tls, trusted)
                            .await?
                    }
                };
                Ok((conn, presented))
            }
            .await;
            match &connected {
                Ok(_) => {
                    tracing::debug!(node = %key.node, source = %key.source, destination = %key.destination, protocol = %key.protocol, "HBONE connection opened")
                }
                Err(e) => {
                    tracing::debug!(node = %key.node, destination = %key.destination, error = %e, "HBONE dial failed")
                }
            }
            outcome.publish(connected);
        });
    }

    fn tls_config(&self, source: &SpiffeId, destination: &SpiffeId, protocol: Protocol) -> Arc<ClientConfig> {
        let mut configs = lock(&self.tls);
        configs
            .entry((source.clone(), destination.clone(), protocol))
            .or_insert_with(|| {
                let verifier =
                    SpiffeServerVerifier::new(self.bundles.clone(), ExpectedPeer::Exact(destination.clone()));
                let mut config = client_config(verifier, Some(self.certs.resolver(source)))
                    .unwrap_or_else(|e| unreachable!("TLS 1.3 with aws-lc-rs is always available: {e}"));
                config.alpn_protocols = vec![protocol.alpn().to_vec()];
                Arc::new(config)
            })
            .clone()
    }

    /// Open connections per key, with the tunnels they carry, for the config dump.
    pub fn snapshot(&self) -> Vec<(Key, usize, usize)> {
        let entries = lock(&self.entries);
        entries
            .iter()
            .filter(|(_, entry)| !entry.conns.is_empty())
            .map(|(k, entry)| {
                (
                    k.clone(),
                    entry.conns.len(),
                    entry.conns.iter().map(|c| c.active.load(Ordering::Relaxed)).sum(),
                )
            })
            .collect()
    }

    /// How many opens wait on dials in flight for `key`.
    pub fn waiting(&self, key: &Key) -> usize {
        let entries = lock(&self.entries);
        entries
            .get(key)
            .map_or(0, |entry| entry.dials.iter().map(|d| d.waiting()).sum())
    }

    /// Drops connections without tunnels that were idle too long or take no new ones (closed,
    /// told to go away, or presenting an old SVID), which closes them. One that takes no new
    /// tunnels stays listed until its last tunnel has ended. `wall_now` is for certificates,
    /// `now` for idleness.
    fn reap_once(&self, now: Instant, wall_now: SystemTime) {
        let mut entries = lock(&self.entries);
        entries.retain(|key, entry| {
            let current = self.certs.current(&key.source);
            entry.conns.retain(|c| {
                let unused = c.active.load(Ordering::Acquire) == 0
                    && (now.duration_since(*lock(&c.idle_since)) > IDLE_TIMEOUT
                        || !c.takes_new_tunnels(current.as_ref(), wall_now));
                !unused
            });
            !entry.is_empty()
        });
        let mut tls = lock(&self.tls);
        tls.retain(|(src, dst, protocol), _| {
            entries
                .keys()
                .any(|k| &k.source == src && &k.destination == dst && k.protocol == *protocol)
        });
    }
}

/// A dialled connection and the SVID it was dialled with.
type Dialled = (Arc<dyn Connection>, Arc<HeldSvid>);

/// Where a dial's outcome goes. Dropped before publishing (the task panicked, or the runtime is
/// shutting down), it fails the dial, so that no open waits forever.
struct Outcome {
    entries: Entries,
    key: Key,
    dial: Option<Arc<Dial>>,
}

impl Outcome {
    /// Pools the connection with the promised streams counted, or records the failure without
    /// caching it; then wakes the waiters.
    fn publish(mut self, connected: Result<Dialled, OpenError>) {
        self.settle(connected);
    }

    fn settle(&mut self, connected: Result<Dialled, OpenError>) {
        let Some(dial) = self.dial.take() else { return };
        {
            let mut entries = lock(&self.entries);
            let mut state = lock(&dial.state);
            let promised = match &*state {
                DialState::Pending { promised } => *promised,
                _ => 0,
            };
            let entry = entries.entry(self.key.clone()).or_default();
            entry.dials.retain(|d| !Arc::ptr_eq(d, &dial));
            *state = match connected {
                Ok((conn, presented)) => {
                    let pooled = Arc::new(Pooled {
                        conn,
                        presented,
                        active: AtomicUsize::new(promised),
                        room: dial.room,
                        idle_since: Mutex::new(Instant::now()),
                    });
                    entry.conns.push(pooled.clone());
                    DialState::Ready(pooled)
                }
                Err(e) => DialState::Failed(e),
            };
            if entry.is_empty() {
                entries.remove(&self.key);
            }
        }
        dial.done.send_replace(true);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let abandoned = io::Error::other("the dial was abandoned");
        self.settle(Err(OpenError::Connect(self.key.node, abandoned)));
    }
}

async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.reap_once(Instant::now(), SystemTime::now());
    }
}

/// Locks `mutex`, shrugging off poisoning: every critical section here leaves its data whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn bad_request(e: http::Error) -> StatusCode {
    tracing::warn!(error = %e, "could not build the CONNECT request");
    StatusCode::BAD_REQUEST
}
