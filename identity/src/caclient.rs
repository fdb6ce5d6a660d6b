//! A node's client for the cluster CA: redeems a join token for the node SVID, then asks for
//! workload SVIDs over mTLS with it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rustls::client::ResolvesClientCert;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;
use trellis_api::identity::v1::certificate_service_client::CertificateServiceClient;
use trellis_api::identity::v1::{CertificateResponse, JoinRequest, SignRequest};

use crate::bundle::BundleSet;
use crate::csr::new_csr;
use crate::id::{SpiffeId, TrustDomain};
use crate::manager::{CertManager, CertificateSource, HeldSvid, Issued, ManagerConfig};
use crate::svid::Svid;
use crate::tls::{client_config, tls_channel};
use crate::verify::{ExpectedPeer, SpiffeServerVerifier};

/// How long one CA call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a CA call failed.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("the CA at {addr} answered {code:?}: {message}")]
    Status {
        addr: SocketAddr,
        code: tonic::Code,
        message: String,
    },
    #[error("the CA at {addr} returned an unusable certificate: {why}")]
    BadResponse { addr: SocketAddr, why: String },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("building a CSR failed: {0}")]
    Csr(#[from] rcgen::Error),
}

/// A client of `trellis.identity.v1.CertificateService`.
#[derive(Clone)]
pub struct CaClient {
    addr: SocketAddr,
    client: CertificateServiceClient<Channel>,
}

impl CaClient {
    /// A client for the CA at `addr`, which must present `spiffe://<td>/trellis/control`
    /// verified by `bundles`. `node_certs` is the node SVID to present (none for Join).
    pub fn new(
        addr: SocketAddr,
        trust_domain: &TrustDomain,
        bundles: BundleSet,
        node_certs: Option<Arc<dyn ResolvesClientCert>>,
    ) -> Result<Self, CaClientError> {
        let verifier = SpiffeServerVerifier::new(bundles, ExpectedPeer::Exact(SpiffeId::control(trust_domain)));
        let config = client_config(verifier, node_certs)?;
        Ok(Self {
            addr,
            client: CertificateServiceClient::new(tls_channel(addr, Arc::new(config))),
        })
    }

    fn status(&self, s: tonic::Status) -> CaClientError {
        CaClientError::Status {
            addr: self.addr,
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    /// Redeems `token` for the SVID of `node` (a fresh P-256 key is generated here).
    pub async fn join(&self, token: &str, node: &str, trust_domain: &TrustDomain) -> Result<HeldSvid, CaClientError> {
        let id = SpiffeId::node(trust_domain, node).map_err(|e| CaClientError::BadResponse {
            addr: self.addr,
            why: e.to_string(),
        })?;
        let (csr, key) = new_csr(&id)?;
        let mut request = tonic::Request::new(JoinRequest {
            token: token.to_string(),
            node: node.to_string(),
            csr: csr.into_bytes(),
        });
        request.set_timeout(CALL_TIMEOUT);
        let response = self.client.clone().join(request).await.map_err(|s| self.status(s))?;
        let issued = self.issued(response.into_inner())?;
        let svid = Svid::new(issued.chain, PrivatePkcs8KeyDer::from(key)).map_err(|e| self.bad(e))?;
        if svid.id != id {
            return Err(self.bad(format!("got {} instead of {id}", svid.id)));
        }
        HeldSvid::new(svid, issued.roots).map_err(|e| self.bad(e))
    }

    /// Asks for a chain for `id` over `csr_pem`.
    pub async fn sign(&self, id: &SpiffeId, csr_pem: &str, ttl: Duration) -> Result<Issued, CaClientError> {
        let mut request = tonic::Request::new(SignRequest {
            spiffe_id: id.to_string(),
            csr: csr_pem.as_bytes().to_vec(),
            ttl_seconds: ttl.as_secs(),
        });
        request.set_timeout(CALL_TIMEOUT);
        let response = self.client.clone().sign(request).await.map_err(|s| self.status(s))?;
        self.issued(response.into_inner())
    }

    fn bad(&self, why: impl ToString) -> CaClientError {
        CaClientError::BadResponse {
            addr: self.addr,
            why: why.to_string(),
        }
    }

    fn issued(&self, response: CertificateResponse) -> Result<Issued, CaClientError> {
        if response.cert_chain.is_empty() {
            return Err(self.bad("empty chain"));
        }
        Ok(Issued {
            chain: response.cert_chain.into_iter().map(CertificateDer::from).collect(),
            roots: response.trust_anchors.into_iter().map(CertificateDer::from).collect(),
        })
    }
}

impl CertificateSource for CaClient {
    fn issue<'a>(&'a self, id: &'a SpiffeId, csr_pem: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Issued, String>> {
        Box::pin(async move { self.sign(id, csr_pem, ttl).await.map_err(|e| e.to_string()) })
    }
}

/// Bootstraps a node: redeems `token` at the CA at `addr` for the node SVID of `node`, and
/// returns a manager that holds it, keeps it renewed, and asks the same CA (authenticated by
/// that node SVID) for any identity passed to [`CertManager::ensure`].
pub async fn join_node(
    addr: SocketAddr,
    trust_domain: &TrustDomain,
    bundles: BundleSet,
    node: &str,
    token: &str,
    config: ManagerConfig,
) -> Result<CertManager, CaClientError> {
    let anonymous = CaClient::new(addr, trust_domain, bundles.clone(), None)?;
    let held = anonymous.join(token, node, trust_domain).await?;
    node_manager(addr, trust_domain, bundles, held, config)
}

/// A manager for a node that already holds its node SVID (`held`: from Join, or saved by an
/// earlier run): it keeps that SVID renewed and asks the CA at `addr`, authenticated by it, for
/// any identity passed to [`CertManager::ensure`].
pub fn node_manager(
    addr: SocketAddr,
    trust_domain: &TrustDomain,
    bundles: BundleSet,
    held: HeldSvid,
    config: ManagerConfig,
) -> Result<CertManager, CaClientError> {
    let node_id = held.svid.id.clone();
    let manager = CertManager::with_source_from(config, |resolver| {
        let client = CaClient::new(addr, trust_domain, bundles, Some(resolver(&node_id)))?;
        Ok::<_, CaClientError>(Arc::new(client) as Arc<dyn CertificateSource>)
    })?;
    manager.insert(held);
    manager.ensure(&node_id);
    Ok(manager)
}
