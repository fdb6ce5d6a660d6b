//! The CA's gRPC face (`trellis.identity.v1.CertificateService`): join tokens in, node SVIDs
//! out; CSRs from authenticated nodes in, workload SVIDs out, when the authorization hook
//! agrees. Every decision is logged with node, identity and reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use trellis_api::identity::v1::certificate_service_server::{CertificateService, CertificateServiceServer};
use trellis_api::identity::v1::{
    CertificateResponse, JoinRequest, SignRequest, TrustBundleRequest, TrustBundleResponse,
};

use crate::bundle::{BundleSet, TrustBundle};
use crate::ca::{CaError, CertificateAuthority, IssuedChain};
use crate::csr::{validate_csr, MAX_CSR_BYTES};
use crate::id::{check_name, IdKind, SpiffeId};
use crate::manager::CertManager;
use crate::svid::to_unix;
use crate::tls::{server_config, tls_incoming, PeerInfo};
use crate::token::{JoinTokens, TokenError};
use crate::verify::{ExpectedPeer, SpiffeClientVerifier};

/// Decides whether a node may receive a workload identity. The control plane supplies "the
/// identity has a workload scheduled on that node now".
pub trait IssuanceAuthorizer: Send + Sync + 'static {
    /// `Ok` to issue; `Err` with the reason to refuse (`PERMISSION_DENIED`).
    fn authorize(&self, node: &str, id: &SpiffeId) -> Result<(), String>;
}

impl<F> IssuanceAuthorizer for F
where
    F: Fn(&str, &SpiffeId) -> Result<(), String> + Send + Sync + 'static,
{
    fn authorize(&self, node: &str, id: &SpiffeId) -> Result<(), String> {
        self(node, id)
    }
}

/// The issuance service.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    tokens: Arc<JoinTokens>,
    authorizer: Arc<dyn IssuanceAuthorizer>,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        tokens: Arc<JoinTokens>,
        authorizer: Arc<dyn IssuanceAuthorizer>,
    ) -> Self {
        Self { ca, tokens, authorizer }
    }

    fn response(&self, issued: IssuedChain) -> CertificateResponse {
        CertificateResponse {
            cert_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_anchors: self.ca.roots().iter().map(|c| c.to_vec()).collect(),
            not_after_unix: to_unix(issued.not_after),
        }
    }

    /// Runs a token operation (check or redeem) for `node` on the blocking pool.
    async fn with_tokens(
        &self,
        token: &str,
        node: &str,
        op: fn(&JoinTokens, &str, &str, SystemTime) -> Result<(), TokenError>,
    ) -> Result<Result<(), TokenError>, Status> {
        let tokens = self.tokens.clone();
        let (token, node) = (token.to_string(), node.to_string());
        tokio::task::spawn_blocking(move || op(&tokens, &token, &node, SystemTime::now()))
            .await
            .map_err(|e| Status::internal(format!("token check failed: {e}")))
    }

    /// Signs, mapping CA errors to gRPC statuses and logging the outcome.
    fn sign_logged(&self, node: &str, id: &SpiffeId, csr: &[u8], ttl: Duration) -> Result<CertificateResponse, Status> {
        match self.ca.sign(csr, id, ttl) {
            Ok(issued) => {
                tracing::info!(node, identity = %id, not_after = to_unix(issued.not_after), "issued SVID");
                Ok(self.response(issued))
            }
            Err(e @ (CaError::Csr(_) | CaError::ForeignTrustDomain { .. })) => {
                tracing::warn!(node, identity = %id, reason = %e, "refused CSR");
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e) => {
                tracing::error!(node, identity = %id, reason = %e, "signing failed");
                Err(Status::internal(e.to_string()))
            }
        }
    }
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<CertificateResponse>, Status> {
        let req = request.into_inner();
        let node = req.node.as_str();
        check_name(node).map_err(|e| {
            tracing::warn!(node, reason = %e, "refused join");
            Status::invalid_argument(e.to_string())
        })?;
        let id = SpiffeId::node(self.ca.trust_domain(), node).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The token is checked before anything costs the CA (a forged one never reaches the
        // signing key), and spent last, so that neither a typo in the CSR nor a CA fault burns
        // it; the chain is handed out only once it is spent. The token file is read and
        // written under a file lock: keep it off the async workers.
        let refused = |e: TokenError| {
            tracing::warn!(node, identity = %id, reason = %e, "refused join token");
            Status::unauthenticated(e.to_string())
        };
        self.with_tokens(&req.token, node, JoinTokens::check)
            .await?
            .map_err(refused)?;
        validate_csr(&req.csr, &id).map_err(|e| {
            tracing::warn!(node, identity = %id, reason = %e, "refused join CSR");
            Status::invalid_argument(e.to_string())
        })?;
        let signed = self.ca.sign(&req.csr, &id, Duration::ZERO).map_err(|e| {
            tracing::error!(node, identity = %id, reason = %e, "signing failed");
            Status::internal(e.to_string())
        })?;
        self.with_tokens(&req.token, node, JoinTokens::redeem)
            .await?
            .map_err(refused)?;
        tracing::info!(node, identity = %id, not_after = to_unix(signed.not_after), "issued node SVID on join");
        Ok(Response::new(self.response(signed)))
    }

    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<CertificateResponse>, Status> {
        let caller = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.current_id().cloned());
        let req = request.into_inner();
        let td = self.ca.trust_domain();
        let node = match &caller {
            Some(id) if id.trust_domain() == td => match id.kind() {
                IdKind::Node(node) => node.to_string(),
                _ => {
                    tracing::warn!(caller = %id, "refused sign: caller is not a node");
                    return Err(Status::unauthenticated(format!("{id} is not a node identity")));
                }
            },
            Some(id) => {
                tracing::warn!(caller = %id, "refused sign: caller from another trust domain");
                return Err(Status::unauthenticated(format!("{id} is not a node of {td}")));
            }
            None => {
                tracing::warn!("refused sign: no valid client certificate");
                return Err(Status::unauthenticated(
                    "sign needs mTLS with a valid node SVID; obtain one with Join",
                ));
            }
        };
        if req.csr.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!(
                "the CSR is {} bytes; the limit is {MAX_CSR_BYTES}",
                req.csr.len()
            )));
        }
        let id = SpiffeId::parse(&req.spiffe_id).map_err(|e| {
            tracing::warn!(node, identity = %req.spiffe_id, reason = %e, "refused sign");
            Status::invalid_argument(e.to_string())
        })?;
        // A node may renew its own node SVID, and otherwise ask only for workload identities;
        // the hook sees both, so the control plane can also retire a node.
        let own_node_id = caller.as_ref() == Some(&id);
        if !own_node_id && !matches!(id.kind(), IdKind::Workload { .. }) {
            tracing::warn!(node, identity = %id, reason = "not a workload identity", "denied");
            return Err(Status::permission_denied(format!("{id} is not a workload identity")));
        }
        if let Err(reason) = self.authorizer.authorize(&node, &id) {
            tracing::warn!(node, identity = %id, reason = %reason, "denied");
            return Err(Status::permission_denied(format!(
                "node {node} may not receive {id}: {reason}"
            )));
        }
        let ttl = Duration::from_secs(req.ttl_seconds);
        Ok(Response::new(self.sign_logged(&node, &id, &req.csr, ttl)?))
    }

    async fn get_trust_bundle(
        &self,
        _request: Request<TrustBundleRequest>,
    ) -> Result<Response<TrustBundleResponse>, Status> {
        let bundle = TrustBundle::new(self.ca.trust_domain().clone(), self.ca.roots().to_vec());
        Ok(Response::new(TrustBundleResponse {
            trust_domain: bundle.trust_domain.to_string(),
            bundle_json: bundle.to_json(),
        }))
    }
}

/// The TLS config of the control plane's port: the server presents `control_certs`'s SVID for
/// `spiffe://<td>/trellis/control`; clients may connect without a certificate (for Join), and
/// a certificate they do present must be an SVID of the CA's own trust domain.
pub fn control_plane_tls(
    ca: &CertificateAuthority,
    control_certs: &CertManager,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let td = ca.trust_domain();
    let bundles = BundleSet::with(TrustBundle::new(td.clone(), ca.roots().to_vec()));
    let verifier = SpiffeClientVerifier::optional(bundles, ExpectedPeer::TrustDomains(vec![td.clone()]));
    server_config(control_certs.resolver(&SpiffeId::control(td)), verifier)
}

/// A running issuance endpoint.
pub struct CaServer {
    pub local_addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl CaServer {
    /// Serves `service` on `listener` over TLS 1.3 with [`control_plane_tls`].
    pub fn start(listener: TcpListener, service: CaService, server_certs: &CertManager) -> anyhow::Result<Self> {
        let config = control_plane_tls(&service.ca, server_certs)?;
        let local_addr = listener.local_addr()?;
        let incoming = tls_incoming(listener, Arc::new(config));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .timeout(Duration::from_secs(30))
                // Bounds how long one connection rides on one handshake's identity.
                .max_connection_age(Duration::from_secs(300))
                .add_service(CertificateServiceServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "CA server stopped");
            }
        });
        Ok(Self {
            local_addr,
            shutdown: Some(tx),
            task,
        })
    }

    /// Stops accepting and ends the server.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
        let _ = self.task.await;
    }
}
