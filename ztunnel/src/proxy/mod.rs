//! The data plane's three listeners and what they share.
//!
//! - [`outbound`] (15001): captured connections of this node's enrolled workloads, sent through
//!   HBONE tunnels (or directly, to destinations outside the mesh).
//! - [`inbound`] (15008): tunnels from other ztunnels, authorized and delivered to local pods.
//! - [`gateway`] (15008 in gateway mode): tunnels from other clusters, relayed to a node of this
//!   cluster that serves the global service they name.
//! - [`inbound_plain`] (15006): plaintext connections to enrolled local pods from outside the
//!   mesh, authorized as an unauthenticated source and delivered.

pub mod gateway;
pub mod inbound;
pub mod inbound_plain;
pub mod outbound;
pub mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use trellis_identity::limits::FdReserve;
use trellis_identity::{BundleSet, CertManager};

use crate::hbone::idle::IdleTimeouts;
use crate::hbone::pool::Pool;
use crate::lb::{Balancer, Ejections};
use crate::metrics::Metrics;
use crate::state::ProxyState;

/// Everything the listeners share.
pub struct Proxy {
    pub node: String,
    pub cluster: String,
    pub state: watch::Receiver<Arc<ProxyState>>,
    pub certs: CertManager,
    pub bundles: BundleSet,
    /// One HBONE connection pool per shard (and one for the main runtime), indexed by
    /// [`crate::shard::slot`], each made on its own thread the first time it is needed: a pooled
    /// connection's driver then runs on the thread of the tunnels riding it.
    pools: [OnceLock<Arc<Pool>>; crate::shard::MAX + 1],
    /// QUIC settings for every pool, set once at start.
    quic_tuning: OnceLock<crate::hbone::http3::QuicTuning>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    /// When silent tunnels close.
    pub idle: IdleTimeouts,
    /// How long one attempt to open a connection to an endpoint may take (dial, handshakes,
    /// the CONNECT's answer) before the endpoint is ejected and the next one tried.
    pub connect_timeout: Duration,
    balancers: Mutex<HashMap<(String, String), Arc<Balancer>>>,
    /// Ejected nodes and gateways, shared by every service.
    pub hops: Ejections,
    /// Which transport each link uses ([`transport`]).
    pub links: transport::Links,
}

/// The default of `--connect-timeout-ms`: above a few round trips between clusters, well below
/// what a caller notices as a failover.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        cluster: String,
        state: watch::Receiver<Arc<ProxyState>>,
        certs: CertManager,
        bundles: BundleSet,
        metrics: Arc<Metrics>,
        idle: IdleTimeouts,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            cluster,
            state,
            certs,
            bundles,
            pools: std::array::from_fn(|_| OnceLock::new()),
            quic_tuning: OnceLock::new(),
            metrics,
            drain: Drain::default(),
            idle,
            connect_timeout,
            balancers: Mutex::new(HashMap::new()),
            hops: Ejections::default(),
            links: transport::Links::default(),
        })
    }

    /// The connection pool of the current thread's shard (made here on first use: it needs the
    /// thread's runtime).
    pub fn pool(&self) -> &Arc<Pool> {
        self.pools[crate::shard::slot()].get_or_init(|| {
            let pool = Pool::new(self.certs.clone(), self.bundles.clone());
            if let Some(tuning) = self.quic_tuning.get() {
                pool.set_quic_tuning(*tuning);
            }
            pool
        })
    }

    /// Every pool made so far, for the config dump.
    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.iter().filter_map(OnceLock::get)
    }

    /// Sets the QUIC settings of every pool; call once, before any traffic.
    pub fn set_quic_tuning(&self, tuning: crate::hbone::http3::QuicTuning) {
        let _ = self.quic_tuning.set(tuning);
        for pool in self.pools() {
            pool.set_quic_tuning(tuning);
        }
    }

    /// The current state (a cheap pointer copy).
    pub fn state(&self) -> Arc<ProxyState> {
        self.state.borrow().clone()
    }

    /// The balancer of one service, kept across config versions.
    pub fn balancer(&self, namespace: &str, name: &str) -> Arc<Balancer> {
        let mut balancers = self.balancers.lock().unwrap_or_else(|p| p.into_inner());
        balancers
            .entry((namespace.to_string(), name.to_string()))
            .or_default()
            .clone()
    }
}

/// Graceful shutdown: a signal listeners watch, and a count of connections still open.
#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
    open: Arc<AtomicUsize>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            signal: watch::channel(false).0,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Held by each proxied connection; the drain waits for all of them.
pub struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drain {
    /// Watch this to stop accepting.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    /// Counts one open connection until the guard drops.
    pub fn track(&self) -> Open {
        self.open.fetch_add(1, Ordering::AcqRel);
        Open(self.open.clone())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Stops the listeners, then waits until every connection has closed or `grace` passed.
    /// Returns how many were still open.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.signal.send_replace(true);
        let deadline = Instant::now() + grace;
        while self.open() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.open()
    }
}

/// Accepts on `listener` until the drain starts, running `handle` for each connection in its
/// own task. Accept errors are logged and retried; when the process is out of descriptors a
/// spare one is given up to accept-and-close the waiting connection, so the backlog drains and
/// the listener keeps answering once descriptors free up ([`FdReserve`]).
pub async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, proxy: Arc<Proxy>, what: &'static str, handle: F)
where
    F: Fn(Arc<Proxy>, tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut drain = proxy.drain.watch();
    let mut reserve = FdReserve::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.wait_for(|d| *d) => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                tokio::spawn(handle(proxy.clone(), tcp, peer));
            }
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                reserve.on_accept_error(&listener, &e).await;
            }
        }
    }
}

/// How a proxied connection ended, for the access log.
pub fn outcome(result: &std::io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".to_string(),
        Err(e) => e.to_string(),
    }
}

/// Resets `tcp` (RST instead of FIN), so the application sees its connection refused.
pub fn reset(tcp: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}
