//! What one TLS listener lets strangers hold: connections per listener and per source address,
//! handshakes in flight per listener and per source, file descriptors kept back for `accept`.
//!
//! The rule is [`Admission`], plain counters with no I/O: a connection is admitted while its
//! listener holds fewer than [`Limits::max_conns`] and its source address fewer than
//! [`Limits::max_conns_per_source`]; while it handshakes it also counts against
//! [`Limits::max_handshakes_per_source`], so one address never takes more than its share of the
//! listener's handshake permits and silent peers cannot starve other clients' handshakes.
//! Refused connections are accepted and closed at once, so the kernel's backlog never fills with
//! them. [`Gate`] shares an `Admission` between a listener's tasks and hands out [`Slot`]s that
//! give their place back when dropped; [`Admitted`] ties a slot to a connection's lifetime.
//!
//! Around it: [`raise_nofile_limit`] lifts the soft descriptor limit to the hard one at start,
//! [`FdReserve`] keeps one spare descriptor so a listener out of descriptors can still accept and
//! close, and [`first_bytes`] waits (bounded) for a peer's first request bytes after TLS.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors kept free for everything that is not an accepted connection (files, dials,
/// the spare of [`FdReserve`], logs).
pub const FD_RESERVE: u64 = 256;

/// How many connections and handshakes one listener admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections on the listener, handshaking or established.
    pub max_conns: usize,
    /// Open connections from one source IP address.
    pub max_conns_per_source: usize,
    /// TLS handshakes in flight on the listener (a tokio semaphore: excess waits, bounded by the
    /// handshake timeout).
    pub max_handshakes: usize,
    /// TLS handshakes in flight from one source IP address (excess is closed at once).
    pub max_handshakes_per_source: usize,
}

impl Limits {
    /// trellisd's gRPC port: ztunnels connect from one address per node, each with one or two
    /// connections; 256 per address leaves room for NAT and for nodes restarting. One address
    /// runs at most a quarter of the 512 handshakes, so silent peers there leave the rest free.
    pub const CONTROL: Limits = Limits {
        max_conns: 16_384,
        max_conns_per_source: 256,
        max_handshakes: crate::tls::MAX_PENDING_HANDSHAKES,
        max_handshakes_per_source: 128,
    };

    /// A node's HBONE port (15008): every tunnel from one node arrives from that node's address,
    /// over one pooled connection per (source identity, destination identity) and one more per
    /// 100 tunnels, so a source may hold many.
    pub const HBONE: Limits = Limits {
        max_conns: 16_384,
        max_conns_per_source: 1024,
        max_handshakes: crate::tls::MAX_PENDING_HANDSHAKES,
        max_handshakes_per_source: 128,
    };

    /// The same limits, with `max_conns` lowered so that connections never use more than the
    /// descriptors left after [`FD_RESERVE`] (given the soft limit `nofile` and `fds_per_conn`
    /// descriptors per connection).
    pub fn fitted(self, nofile: u64, fds_per_conn: u64) -> Limits {
        let room = nofile.saturating_sub(FD_RESERVE) / fds_per_conn.max(1);
        let max_conns = self.max_conns.min(room.max(1) as usize);
        Limits {
            max_conns,
            max_conns_per_source: self.max_conns_per_source.min(max_conns),
            ..self
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the listener holds its maximum of {0} connections")]
    ListenerFull(usize),
    #[error("this source address holds its maximum of {0} connections")]
    SourceFull(usize),
    #[error("this source address has its maximum of {0} handshakes in flight")]
    SourceHandshakes(usize),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PerSource {
    conns: usize,
    handshakes: usize,
}

/// The admission counters of one listener. No I/O, no clock: callers report what happens.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    conns: usize,
    sources: HashMap<IpAddr, PerSource>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            conns: 0,
            sources: HashMap::new(),
        }
    }

    /// A new connection from `source`, about to handshake: counted if admitted.
    pub fn admit(&mut self, source: IpAddr) -> Result<(), Refusal> {
        let l = self.limits;
        if self.conns >= l.max_conns {
            return Err(Refusal::ListenerFull(l.max_conns));
        }
        let s = self.sources.get(&source).copied().unwrap_or_default();
        if s.conns >= l.max_conns_per_source {
            return Err(Refusal::SourceFull(l.max_conns_per_source));
        }
        if s.handshakes >= l.max_handshakes_per_source {
            return Err(Refusal::SourceHandshakes(l.max_handshakes_per_source));
        }
        self.conns += 1;
        let s = self.sources.entry(source).or_default();
        s.conns += 1;
        s.handshakes += 1;
        Ok(())
    }

    /// An admitted connection from `source` finished (or gave up) its handshake.
    pub fn handshake_over(&mut self, source: IpAddr) {
        if let Some(s) = self.sources.get_mut(&source) {
            s.handshakes = s.handshakes.saturating_sub(1);
        }
    }

    /// An admitted connection from `source` closed; `handshaking` if it never finished.
    pub fn closed(&mut self, source: IpAddr, handshaking: bool) {
        if handshaking {
            self.handshake_over(source);
        }
        self.conns = self.conns.saturating_sub(1);
        if let Some(s) = self.sources.get_mut(&source) {
            s.conns = s.conns.saturating_sub(1);
            if s.conns == 0 {
                self.sources.remove(&source);
            }
        }
    }

    /// Open connections on the listener.
    pub fn open(&self) -> usize {
        self.conns
    }

    /// Open connections and handshakes in flight from `source`.
    pub fn from_source(&self, source: IpAddr) -> (usize, usize) {
        let s = self.sources.get(&source).copied().unwrap_or_default();
        (s.conns, s.handshakes)
    }
}

/// A listener's [`Admission`], shared by its tasks, and its handshake permits.
#[derive(Debug, Clone)]
pub struct Gate {
    admission: Arc<Mutex<Admission>>,
    handshakes: Arc<Semaphore>,
    limits: Limits,
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        Self {
            admission: Arc::new(Mutex::new(Admission::new(limits))),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes.max(1))),
            limits,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `source`; the slot counts it until dropped.
    pub fn admit(&self, source: IpAddr) -> Result<Slot, Refusal> {
        self.lock().admit(source)?;
        Ok(Slot {
            gate: self.clone(),
            source,
            handshaking: true,
        })
    }

    /// One of the listener's handshake permits. Take it after `accept` and inside the handshake
    /// timeout, so a wait for it is bounded and a refused peer never holds one.
    pub async fn handshake_permit(&self) -> OwnedSemaphorePermit {
        self.handshakes
            .clone()
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("the handshake semaphore is never closed"))
    }

    /// Open connections on the listener.
    pub fn open(&self) -> usize {
        self.lock().open()
    }
}

/// One admitted connection's place in its listener's [`Admission`].
#[derive(Debug)]
pub struct Slot {
    gate: Gate,
    source: IpAddr,
    handshaking: bool,
}

impl Slot {
    /// The handshake is over: the connection stops counting against its source's handshakes.
    pub fn established(&mut self) {
        if std::mem::replace(&mut self.handshaking, false) {
            self.gate.lock().handshake_over(self.source);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.lock().closed(self.source, self.handshaking);
    }
}

/// A connection holding its [`Slot`]: the slot is given back when the connection is dropped.
pub struct Admitted<T> {
    inner: T,
    _slot: Slot,
}

impl<T> Admitted<T> {
    pub fn new(inner: T, slot: Slot) -> Self {
        Self { inner, _slot: slot }
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Admitted<T> {
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> T::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Admitted<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Admitted<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit and returns the soft limit now
/// in force. Call once at start, before any listener.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
    }
    Ok(limit.rlim_cur)
}

/// The soft `RLIMIT_NOFILE` in force (1024, the usual default, if it cannot be read).
pub fn nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: getrlimit only writes the struct passed.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur
}

/// One descriptor held in reserve for a listener: when `accept` fails for want of descriptors,
/// the spare is closed, the waiting connection accepted and closed at once, and the spare taken
/// again, so the backlog drains instead of spinning on `EMFILE`.
#[derive(Debug)]
pub struct FdReserve {
    spare: Option<std::fs::File>,
}

impl Default for FdReserve {
    fn default() -> Self {
        Self::new()
    }
}

impl FdReserve {
    pub fn new() -> Self {
        Self {
            spare: std::fs::File::open("/dev/null").ok(),
        }
    }

    /// True if `e` means the process or system is out of descriptors.
    pub fn is_exhaustion(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
    }

    /// Handles a failed `accept`: on descriptor exhaustion sheds one waiting connection with
    /// the spare descriptor; otherwise pauses briefly so a persistent error does not spin.
    pub async fn on_accept_error(&mut self, listener: &TcpListener, e: &io::Error) {
        if !Self::is_exhaustion(e) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return;
        }
        self.spare = None;
        if let Ok(Ok((tcp, peer))) = tokio::time::timeout(Duration::from_millis(5), listener.accept()).await {
            tracing::warn!(%peer, "out of file descriptors: connection closed at accept");
            drop(tcp);
        }
        self.spare = std::fs::File::open("/dev/null").ok();
        if self.spare.is_none() {
            // Still out of descriptors: let connections close before trying again.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until a peer that finished its TLS handshake sends its first application bytes (an
/// HTTP/2 preface, say), for at most `within`. False if it sent none in time, or closed.
pub async fn first_bytes(tls: &mut tokio_rustls::server::TlsStream<TcpStream>, within: Duration) -> bool {
    let (_, session) = tls.get_mut();
    // Bytes that arrived with the handshake's last flight are already inside rustls.
    if let Ok(state) = session.process_new_packets() {
        if state.plaintext_bytes_to_read() > 0 {
            return true;
        }
    }
    let tcp = tls.get_ref().0;
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(within, tcp.peek(&mut byte)).await, Ok(Ok(n)) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn limits() -> Limits {
        Limits {
            max_conns: 10,
            max_conns_per_source: 4,
            max_handshakes: 8,
            max_handshakes_per_source: 2,
        }
    }

    #[test]
    fn one_source_gets_at_most_its_share_of_handshakes_and_others_still_get_in() {
        let mut a = Admission::new(limits());
        assert_eq!(a.admit(A), Ok(()));
        assert_eq!(a.admit(A), Ok(()));
        assert_eq!(a.admit(A), Err(Refusal::SourceHandshakes(2)));
        assert_eq!(a.admit(B), Ok(()), "another source is not held back");
        a.handshake_over(A);
        assert_eq!(a.admit(A), Ok(()), "a finished handshake frees its share");
        assert_eq!(a.from_source(A), (3, 2));
    }

    #[test]
    fn one_source_gets_at_most_its_connections() {
        let mut a = Admission::new(limits());
        for _ in 0..4 {
            a.admit(A).unwrap();
            a.handshake_over(A);
        }
        assert_eq!(a.admit(A), Err(Refusal::SourceFull(4)));
        a.closed(A, false);
        assert_eq!(a.admit(A), Ok(()));
    }

    #[test]
    fn the_listener_is_capped_across_sources() {
        let mut a = Admission::new(limits());
        for i in 0..10u8 {
            a.admit(IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, i))).unwrap();
        }
        assert_eq!(a.admit(B), Err(Refusal::ListenerFull(10)));
        a.closed(IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 0)), true);
        assert_eq!(a.admit(B), Ok(()));
        assert_eq!(a.open(), 10);
    }

    #[test]
    fn closing_forgets_a_source_and_never_underflows() {
        let mut a = Admission::new(limits());
        a.admit(A).unwrap();
        a.closed(A, true);
        assert_eq!(a.from_source(A), (0, 0));
        a.closed(A, true);
        a.handshake_over(B);
        assert_eq!(a.open(), 0);
        assert!(a.sources.is_empty());
    }

    #[test]
    fn fitted_limits_leave_the_descriptor_reserve() {
        let l = Limits::CONTROL.fitted(1024, 1);
        assert_eq!(l.max_conns, 1024 - FD_RESERVE as usize);
        assert_eq!(l.max_conns_per_source, 256);
        let l = Limits::CONTROL.fitted(1_048_576, 2);
        assert_eq!(l.max_conns, Limits::CONTROL.max_conns);
        let tiny = Limits::CONTROL.fitted(100, 1);
        assert_eq!((tiny.max_conns, tiny.max_conns_per_source), (1, 1));
    }

    #[test]
    fn slots_give_their_place_back() {
        let gate = Gate::new(limits());
        let mut s1 = gate.admit(A).unwrap();
        let _s2 = gate.admit(A).unwrap();
        assert!(gate.admit(A).is_err());
        s1.established();
        let s3 = gate.admit(A).unwrap();
        drop(s1);
        drop(s3);
        assert_eq!(gate.open(), 1);
    }
}
