//! Test fixtures: a real CA in a temp directory, served over real TLS on loopback.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use trellis_identity::issuance::{CaServer, CaService, IssuanceAuthorizer};
use trellis_identity::{
    BundleSet, CaClient, CertManager, CertificateAuthority, IssuancePolicy, JoinTokens, ManagerConfig, SpiffeId,
    TrustBundle, TrustDomain,
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
