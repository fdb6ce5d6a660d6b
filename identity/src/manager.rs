//! The certificate manager: holds SVIDs for the identities a process serves, renews each at
//! half life (with jitter), retries with backoff while the CA is unreachable, never hands out
//! an expired certificate, and plugs into rustls as a certificate resolver.
//!
//! When to renew, retry or drop is decided by [`Renewal`] (pure, in `renewal`); the task
//! here only reads the clocks, calls the CA and sleeps on tokio's clock, so tests drive it
//! with a paused clock. A held SVID expires on both clocks: its wall-clock `not_after`, and
//! the same point mapped onto tokio's clock when it was stored (see `renewal`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::ca::CertificateAuthority;
use crate::csr::new_csr;
use crate::id::SpiffeId;
use crate::renewal::{to_monotonic, Action, Renewal, Validity};
use crate::svid::Svid;
use crate::tls::provider;

/// A chain returned by a CA, with the roots of its trust domain.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
}

/// Where SVIDs come from: the remote CA (a node's `CaClient`) or the local one (trellisd).
pub trait CertificateSource: Send + Sync + 'static {
    /// Asks for a chain for `id`, signed over `csr_pem`, living `ttl` (zero: CA default).
    fn issue<'a>(&'a self, id: &'a SpiffeId, csr_pem: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Issued, String>>;
}

impl CertificateSource for CertificateAuthority {
    fn issue<'a>(&'a self, id: &'a SpiffeId, csr_pem: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Issued, String>> {
        Box::pin(async move {
            let issued = self.sign(csr_pem.as_bytes(), id, ttl).map_err(|e| e.to_string())?;
            Ok(Issued {
                chain: issued.chain,
                roots: self.roots().to_vec(),
            })
        })
    }
}

/// Timing knobs of the manager.
#[derive(Debug, Clone, Copy)]
pub struct ManagerConfig {
    /// TTL to ask for (zero: the CA's default).
    pub ttl: Duration,
    /// First retry delay after a failure.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::ZERO,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// One held SVID, ready for rustls.
#[derive(Debug)]
pub struct HeldSvid {
    pub svid: Svid,
    /// Roots of the SVID's trust domain, as the CA reported them.
    pub roots: Vec<CertificateDer<'static>>,
    certified: Arc<CertifiedKey>,
}

impl HeldSvid {
    /// Pairs an SVID with its roots; fails if rustls cannot use the key, the key does not match
    /// the leaf, or there are no roots.
    pub fn new(svid: Svid, roots: Vec<CertificateDer<'static>>) -> Result<Self, rustls::Error> {
        let key = provider().key_provider.load_private_key(svid.private_key())?;
        let certified = CertifiedKey::new(svid.chain.clone(), key);
        certified.keys_match()?;
        if roots.is_empty() {
            return Err(rustls::Error::General("no trust anchors came with the SVID".into()));
        }
        Ok(Self {
            svid,
            roots,
            certified: Arc::new(certified),
        })
    }

    /// The rustls view of the SVID.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

/// A stored SVID and its expiry on tokio's clock.
#[derive(Debug)]
struct Entry {
    held: Arc<HeldSvid>,
    expires_at: Instant,
}

impl Entry {
    /// Valid on both clocks: the wall clock (what peers check) and tokio's (which tests drive,
    /// and which keeps running if the wall clock is stepped back).
    fn is_valid(&self, wall_now: SystemTime, now: Instant) -> bool {
        self.held.svid.is_valid_at(wall_now) && now < self.expires_at
    }
}

#[derive(Debug)]
struct Store {
    certs: RwLock<HashMap<SpiffeId, Entry>>,
    changes: watch::Sender<u64>,
}

impl Store {
    fn valid(&self, id: &SpiffeId) -> Option<Arc<HeldSvid>> {
        let (wall_now, now) = (SystemTime::now(), Instant::now());
        let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
        certs
            .get(id)
            .filter(|e| e.is_valid(wall_now, now))
            .map(|e| e.held.clone())
    }

    fn any(&self, id: &SpiffeId) -> Option<Arc<HeldSvid>> {
        let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
        certs.get(id).map(|e| e.held.clone())
    }

    fn put(&self, held: HeldSvid) -> Arc<HeldSvid> {
        let held = Arc::new(held);
        let expires_at = to_monotonic(held.svid.not_after, SystemTime::now(), Instant::now());
        self.certs.write().unwrap_or_else(|p| p.into_inner()).insert(
            held.svid.id.clone(),
            Entry {
                held: held.clone(),
                expires_at,
            },
        );
        self.changes.send_modify(|v| *v += 1);
        held
    }

    fn remove(&self, id: &SpiffeId) -> bool {
        let removed = self
            .certs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some();
        if removed {
            self.changes.send_modify(|v| *v += 1);
        }
        removed
    }
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    config: ManagerConfig,
    store: Arc<Store>,
    tasks: Mutex<HashMap<SpiffeId, tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()).values() {
            task.abort();
        }
    }
}

/// Holds and rotates SVIDs. Cheap to clone; the renewal tasks stop when the last clone drops.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl CertManager {
    pub fn new(source: Arc<dyn CertificateSource>, config: ManagerConfig) -> Self {
        Self::with_source_from(config, |_| Ok::<_, std::convert::Infallible>(source))
            .unwrap_or_else(|never| match never {})
    }

    /// A manager whose source is built with access to the manager's own resolvers: a node's
    /// CA client authenticates with the node SVID that this very manager holds and renews.
    pub fn with_source_from<E>(
        config: ManagerConfig,
        make_source: impl FnOnce(&dyn Fn(&SpiffeId) -> Arc<SvidResolver>) -> Result<Arc<dyn CertificateSource>, E>,
    ) -> Result<Self, E> {
        let (changes, _) = watch::channel(0);
        let store = Arc::new(Store {
            certs: RwLock::new(HashMap::new()),
            changes,
        });
        let resolver = |id: &SpiffeId| {
            Arc::new(SvidResolver {
                store: store.clone(),
                id: id.clone(),
            })
        };
        let source = make_source(&resolver)?;
        Ok(Self {
            inner: Arc::new(Inner {
                source,
                config,
                store,
                tasks: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Adds an SVID obtained elsewhere (a node's first SVID, from Join). Call
    /// [`ensure`](Self::ensure) to have it renewed.
    pub fn insert(&self, held: HeldSvid) {
        self.inner.store.put(held);
    }

    /// Starts serving `id`: fetches an SVID now (unless one is held) and keeps it renewed.
    pub fn ensure(&self, id: &SpiffeId) {
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.get(id).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let task = tokio::spawn(renew_loop(
            self.inner.source.clone(),
            self.inner.store.clone(),
            self.inner.config,
            id.clone(),
        ));
        tasks.insert(id.clone(), task);
    }

    /// Stops serving `id` and drops its SVID.
    pub fn forget(&self, id: &SpiffeId) {
        if let Some(task) = self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
            task.abort();
        }
        self.inner.store.remove(id);
    }

    /// The SVID for `id`, if one is held and valid right now.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<HeldSvid>> {
        self.inner.store.valid(id)
    }

    /// Every identity with a valid SVID right now, sorted.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let (wall_now, now) = (SystemTime::now(), Instant::now());
        let certs = self.inner.store.certs.read().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<_> = certs
            .values()
            .filter(|e| e.is_valid(wall_now, now))
            .map(|e| e.held.svid.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Waits until a valid SVID for `id` is held, up to `timeout`.
    pub async fn wait_for(&self, id: &SpiffeId, timeout: Duration) -> Option<Arc<HeldSvid>> {
        let mut changes = self.changes();
        let wait = async {
            loop {
                if let Some(held) = self.current(id) {
                    return held;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }

    /// A counter that moves whenever an SVID is added, renewed or dropped.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.store.changes.subscribe()
    }

    /// A rustls resolver (client and server side) that presents the current SVID of `id`, and
    /// nothing once it has expired.
    pub fn resolver(&self, id: &SpiffeId) -> Arc<SvidResolver> {
        Arc::new(SvidResolver {
            store: self.inner.store.clone(),
            id: id.clone(),
        })
    }
}

/// Fetches one SVID for `id`: new key, CSR, CA call, checks on what came back.
async fn fetch(source: &dyn CertificateSource, id: &SpiffeId, ttl: Duration) -> Result<HeldSvid, String> {
    let (csr, key) = new_csr(id).map_err(|e| format!("building the CSR failed: {e}"))?;
    let issued = source.issue(id, &csr, ttl).await?;
    let svid = Svid::new(issued.chain, PrivatePkcs8KeyDer::from(key))
        .map_err(|e| format!("the CA returned an unusable chain: {e}"))?;
    if &svid.id != id {
        return Err(format!("the CA returned an SVID for {} instead of {id}", svid.id));
    }
    if !svid.is_valid_at(SystemTime::now()) {
        return Err("the CA returned a certificate that is not valid now".into());
    }
    HeldSvid::new(svid, issued.roots).map_err(|e| format!("rustls cannot use the SVID: {e}"))
}

fn validity(held: &HeldSvid) -> Validity {
    Validity {
        not_before: held.svid.not_before,
        not_after: held.svid.not_after,
    }
}

/// Keeps `id` renewed: the driver around [`Renewal`]. It reads both clocks at every step,
/// sleeps on tokio's clock, and does the CA calls and store updates the schedule asks for.
async fn renew_loop(source: Arc<dyn CertificateSource>, store: Arc<Store>, config: ManagerConfig, id: SpiffeId) {
    let renewal_jitter = || rand::random::<f64>() * 2.0 - 1.0;
    let mut schedule = Renewal::new(config.retry_min, config.retry_max);
    // The stored SVID the schedule is about.
    let mut scheduled: Option<Arc<HeldSvid>> = None;
    loop {
        let (wall_now, now) = (SystemTime::now(), Instant::now());
        // An SVID stored by someone else (the node SVID from Join) is renewed like our own.
        if let Some(held) = store.any(&id) {
            if !scheduled.as_ref().is_some_and(|s| Arc::ptr_eq(s, &held)) {
                schedule.held(validity(&held), wall_now, now, renewal_jitter());
                scheduled = Some(held);
            }
        }
        schedule.resync(wall_now, now);
        match schedule.next(now) {
            Action::Wait(until) => tokio::time::sleep_until(until).await,
            Action::Drop => {
                store.remove(&id);
                schedule.dropped();
                scheduled = None;
                tracing::warn!(identity = %id, failures = schedule.failures(), "SVID expired before it could be renewed; no longer served");
            }
            Action::Fetch => match fetch(source.as_ref(), &id, config.ttl).await {
                Ok(held) => {
                    let failures = schedule.failures();
                    let held = store.put(held);
                    let (wall_now, now) = (SystemTime::now(), Instant::now());
                    schedule.held(validity(&held), wall_now, now, renewal_jitter());
                    let renew_in_s = schedule
                        .renew_at()
                        .map_or(0, |t| t.saturating_duration_since(now).as_secs());
                    if failures > 0 {
                        tracing::info!(identity = %id, after_failures = failures, renew_in_s, "SVID obtained");
                    } else {
                        tracing::debug!(identity = %id, renew_in_s, "SVID renewed");
                    }
                    scheduled = Some(held);
                }
                Err(error) => {
                    let delay = schedule.failed(Instant::now(), rand::random());
                    tracing::warn!(identity = %id, attempt = schedule.failures(), retry_in_ms = delay.as_millis() as u64, %error, "SVID request failed");
                }
            },
        }
    }
}

/// Presents the current SVID of one identity to rustls.
#[derive(Debug)]
pub struct SvidResolver {
    store: Arc<Store>,
    id: SpiffeId,
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.store.valid(&self.id).map(|h| h.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.valid(&self.id).map(|h| h.certified_key())
    }
}
