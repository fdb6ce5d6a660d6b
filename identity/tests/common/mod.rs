//! Test fixtures: a real CA in a temp directory, served over real TLS on loopback.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use rustls_pki_types::PrivatePkcs8KeyDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use trellis_identity::issuance::{CaServer, CaService, IssuanceAuthorizer};
use trellis_identity::manager::{CertificateSource, Issued};
use trellis_identity::{
    BundleSet, CaClient, CertManager, CertificateAuthority, HeldSvid, IssuancePolicy, JoinTokens, ManagerConfig,
    SpiffeId, Svid, TrustBundle, TrustDomain,
};

pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A policy with short TTLs so tests can watch rotation.
pub fn short_policy(ttl: Duration) -> IssuancePolicy {
    IssuancePolicy {
        default_ttl: ttl,
        max_ttl: ttl,
        min_ttl: Duration::from_secs(1),
    }
}

pub fn fast_retries() -> ManagerConfig {
    ManagerConfig {
        ttl: Duration::ZERO,
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(400),
    }
}

/// A CA with its directory, tokens and a running issuance server.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub td: TrustDomain,
    pub ca: Arc<CertificateAuthority>,
    pub tokens: Arc<JoinTokens>,
    pub server: Option<CaServer>,
    pub addr: SocketAddr,
    pub control: CertManager,
    authorizer: Arc<dyn IssuanceAuthorizer>,
}

impl Cluster {
    pub async fn start(trust_domain: &str, policy: IssuancePolicy, authorizer: Arc<dyn IssuanceAuthorizer>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = td(trust_domain);
        let ca = Arc::new(CertificateAuthority::load_or_create(dir.path(), &td, policy).unwrap());
        let tokens = Arc::new(JoinTokens::open(&dir.path().join("join-tokens.json")).unwrap());
        let control = CertManager::new(ca.clone(), ManagerConfig::default());
        let control_id = SpiffeId::control(&td);
        control.ensure(&control_id);
        control
            .wait_for(&control_id, Duration::from_secs(5))
            .await
            .expect("control SVID");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cluster = Self {
            dir,
            td,
            ca,
            tokens,
            server: None,
            addr,
            control,
            authorizer,
        };
        cluster.serve(listener);
        cluster
    }

    fn serve(&mut self, listener: TcpListener) {
        let service = CaService::new(self.ca.clone(), self.tokens.clone(), self.authorizer.clone());
        self.server = Some(CaServer::start(listener, service, &self.control).unwrap());
    }

    /// Stops the issuance server (the CA is "down").
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    /// Serves again on the same address.
    pub async fn restart(&mut self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.td.clone(), self.ca.roots().to_vec())
    }

    pub fn bundles(&self) -> BundleSet {
        BundleSet::with(self.bundle())
    }

    /// A client without a certificate, as a node has before it joins.
    pub fn anonymous_client(&self) -> CaClient {
        CaClient::new(self.addr, &self.td, self.bundles(), None).unwrap()
    }

    /// Joins `node` with a fresh token; the manager holds (and renews) its node SVID.
    pub async fn join_node(&self, node: &str, config: ManagerConfig) -> CertManager {
        let token = self.tokens.create(node, Duration::from_secs(60)).unwrap();
        trellis_identity::caclient::join_node(self.addr, &self.td, self.bundles(), node, &token, config)
            .await
            .expect("join")
    }

    /// A client presenting `node`'s SVID held by `manager`.
    pub fn node_client(&self, manager: &CertManager, node: &str) -> CaClient {
        let node_id = SpiffeId::node(&self.td, node).unwrap();
        CaClient::new(self.addr, &self.td, self.bundles(), Some(manager.resolver(&node_id))).unwrap()
    }
}

/// An authorizer that lets every node have every workload identity.
pub fn allow_all() -> Arc<dyn IssuanceAuthorizer> {
    Arc::new(|_: &str, _: &SpiffeId| Ok(()))
}

/// A fresh SVID for `id` signed by `ca`, as the manager would fetch it.
pub fn issue(ca: &CertificateAuthority, id: &SpiffeId) -> HeldSvid {
    let (csr, key) = trellis_identity::csr::new_csr(id).unwrap();
    let issued = ca.sign(csr.as_bytes(), id, Duration::ZERO).unwrap();
    let svid = Svid::new(issued.chain, PrivatePkcs8KeyDer::from(key)).unwrap();
    HeldSvid::new(svid, ca.roots().to_vec()).unwrap()
}

/// One call a manager made to an [`InProcessCa`].
#[derive(Debug, Clone)]
pub struct CaCall {
    pub id: SpiffeId,
    /// On tokio's clock (paused in the timing tests).
    pub at: Instant,
    /// On the wall clock, which certificates are stamped with.
    pub wall: SystemTime,
    /// Whether the CA answered with a certificate.
    pub answered: bool,
}

/// A real CA (real keys, real certificates) called in-process instead of over TLS, so that a
/// manager can run on tokio's paused clock: with real sockets the paused clock would jump
/// ahead whenever the runtime waits on the network. Records every call and can be taken down.
pub struct InProcessCa {
    pub ca: Arc<CertificateAuthority>,
    up: AtomicBool,
    calls: watch::Sender<Vec<CaCall>>,
    _dir: tempfile::TempDir,
}

impl InProcessCa {
    /// A CA for `trust_domain` with the default policy (24 h SVIDs, longer asked for ≥ 60 s).
    pub fn new(trust_domain: &str) -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            CertificateAuthority::load_or_create(dir.path(), &td(trust_domain), IssuancePolicy::default()).unwrap();
        Arc::new(Self {
            ca: Arc::new(ca),
            up: AtomicBool::new(true),
            calls: watch::channel(Vec::new()).0,
            _dir: dir,
        })
    }

    /// Takes the CA down (every call fails) or brings it back.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<CaCall> {
        self.calls.borrow().clone()
    }

    /// The calls so far for `id`, oldest first.
    pub fn calls_for(&self, id: &SpiffeId) -> Vec<CaCall> {
        self.calls().into_iter().filter(|c| &c.id == id).collect()
    }

    /// Waits until `n` calls have been made (on the paused clock, time runs ahead to them).
    pub async fn wait_for_calls(&self, n: usize) -> Vec<CaCall> {
        let mut calls = self.calls.subscribe();
        let calls = calls.wait_for(|c| c.len() >= n).await.unwrap().clone();
        calls
    }
}

impl CertificateSource for InProcessCa {
    fn issue<'a>(&'a self, id: &'a SpiffeId, csr_pem: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Issued, String>> {
        Box::pin(async move {
            let up = self.up.load(Ordering::SeqCst);
            let result = if up {
                CertificateSource::issue(self.ca.as_ref(), id, csr_pem, ttl).await
            } else {
                Err("the CA is down".to_string())
            };
            self.calls.send_modify(|calls| {
                calls.push(CaCall {
                    id: id.clone(),
                    at: Instant::now(),
                    wall: SystemTime::now(),
                    answered: result.is_ok(),
                })
            });
            result
        })
    }
}
