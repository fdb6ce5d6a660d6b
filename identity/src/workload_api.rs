//! The SPIFFE Workload API (X.509 profile) on a Unix socket: a workload asks "who am I?" and
//! receives its SVID, key and bundles, then a fresh message every time any of them changes.
//!
//! Who the caller is comes from an [`Attestor`], which maps the kernel's peer credentials of
//! the socket (pid, uid, gid) to a SPIFFE ID. ztunnel attests by the caller's network namespace
//! (its pod); tests and single-workload hosts can attest by uid.
//!
//! Status codes follow the standard: a request without the `workload.spiffe.io: true` header
//! is `INVALID_ARGUMENT`; a caller with no identity is `PERMISSION_DENIED`; an identity whose
//! SVID is not there yet is `UNAVAILABLE` (clients retry). JWT-SVIDs are `UNIMPLEMENTED`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use trellis_api::spiffe_workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use trellis_api::spiffe_workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};

use crate::bundle::BundleSet;
use crate::id::SpiffeId;
use crate::manager::CertManager;

/// How long a request waits for an attested identity's SVID before answering `UNAVAILABLE`.
const SVID_WAIT: Duration = Duration::from_secs(5);

/// The kernel's word on who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

/// Maps a caller to the identity it is entitled to, if any.
pub trait Attestor: Send + Sync + 'static {
    fn attest(&self, caller: &Caller) -> Option<SpiffeId>;
}

/// Attests by user id: each uid is one workload (single-tenant hosts, tests).
#[derive(Debug, Default, Clone)]
pub struct UidAttestor(pub HashMap<u32, SpiffeId>);

impl Attestor for UidAttestor {
    fn attest(&self, caller: &Caller) -> Option<SpiffeId> {
        self.0.get(&caller.uid).cloned()
    }
}

/// The Workload API service.
#[derive(Clone)]
pub struct WorkloadApi {
    manager: CertManager,
    bundles: BundleSet,
    attestor: Arc<dyn Attestor>,
    /// Ends every open stream when the server that owns the sender goes away.
    stop: watch::Receiver<()>,
    stop_sender: Arc<watch::Sender<()>>,
}

/// Change counters a stream watches.
struct Feeds {
    svids: watch::Receiver<u64>,
    bundles: watch::Receiver<u64>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl WorkloadApi {
    /// Serves SVIDs held by `manager` and the federated bundles of `bundles` to callers that
    /// `attestor` recognises.
    pub fn new(manager: CertManager, bundles: BundleSet, attestor: Arc<dyn Attestor>) -> Self {
        let (stop_sender, stop) = watch::channel(());
        Self {
            manager,
            bundles,
            attestor,
            stop,
            stop_sender: Arc::new(stop_sender),
        }
    }

    /// The change feeds a stream must hold *before* it renders its first message, so that no
    /// change between rendering and watching is lost.
    fn feeds(&self) -> Feeds {
        Feeds {
            svids: self.manager.changes(),
            bundles: self.bundles.changes(),
        }
    }

    fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
        match request.metadata().get("workload.spiffe.io").map(|v| v.to_str()) {
            Some(Ok("true")) => Ok(()),
            _ => Err(Status::invalid_argument(
                "security header missing: send metadata workload.spiffe.io: true",
            )),
        }
    }

    fn attest<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .ok_or_else(|| Status::permission_denied("caller credentials unavailable"))?;
        let caller = Caller {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        };
        self.attestor.attest(&caller).ok_or_else(|| {
            tracing::info!(?caller, "Workload API: caller has no identity");
            Status::permission_denied("no identity issued to this caller")
        })
    }

    /// The full X509SVIDResponse for `id`, or `None` when its SVID is not held.
    fn svid_response(&self, id: &SpiffeId) -> Option<X509svidResponse> {
        let held = self.manager.current(id)?;
        let svid = X509svid {
            spiffe_id: id.to_string(),
            x509_svid: held.svid.chain.iter().flat_map(|c| c.iter().copied()).collect(),
            x509_svid_key: held.svid.key.secret_pkcs8_der().to_vec(),
            bundle: held.roots.iter().flat_map(|c| c.iter().copied()).collect(),
            hint: String::new(),
        };
        let federated_bundles = self.federated(id);
        Some(X509svidResponse {
            svids: vec![svid],
            crl: Vec::new(),
            federated_bundles,
        })
    }

    /// Bundles of every trusted trust domain except `id`'s own, keyed `spiffe://<td>`.
    fn federated(&self, id: &SpiffeId) -> HashMap<String, Vec<u8>> {
        self.bundles
            .all()
            .into_iter()
            .filter(|b| &b.trust_domain != id.trust_domain())
            .map(|b| {
                let der = b.x509_authorities.iter().flat_map(|c| c.iter().copied()).collect();
                (b.trust_domain.id_string(), der)
            })
            .collect()
    }

    fn bundles_response(&self, id: &SpiffeId) -> X509BundlesResponse {
        let mut bundles = self.federated(id);
        if let Some(held) = self.manager.current(id) {
            let own = held.roots.iter().flat_map(|c| c.iter().copied()).collect();
            bundles.insert(id.trust_domain().id_string(), own);
        }
        X509BundlesResponse {
            crl: Vec::new(),
            bundles,
        }
    }

    /// Streams `render()` now and again after every change of SVIDs or bundles, skipping
    /// repeats, until the client goes away.
    fn watch<T, F>(&self, feeds: Feeds, first: T, render: F) -> ResponseStream<T>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(&Self) -> Option<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let Feeds { mut svids, mut bundles } = feeds;
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    r = svids.changed() => if r.is_err() { return },
                    r = bundles.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = stop.changed() => return,
                }
                let next = match render(&this) {
                    Some(next) => next,
                    None => {
                        let _ = tx
                            .send(Err(Status::unavailable("the SVID is not available right now; retry")))
                            .await;
                        return;
                    }
                };
                if next != last {
                    last = next.clone();
                    if tx.send(Ok(next)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Self::check_header(&request)?;
        let id = self.attest(&request)?;
        if self.manager.wait_for(&id, SVID_WAIT).await.is_none() {
            return Err(Status::unavailable(format!(
                "the SVID for {id} is not ready yet; retry"
            )));
        }
        let feeds = self.feeds();
        let first = self
            .svid_response(&id)
            .ok_or_else(|| Status::unavailable(format!("the SVID for {id} is not ready yet; retry")))?;
        tracing::debug!(identity = %id, "Workload API: streaming X.509-SVID");
        Ok(Response::new(
            self.watch(feeds, first, move |api| api.svid_response(&id)),
        ))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Self::check_header(&request)?;
        let id = self.attest(&request)?;
        let feeds = self.feeds();
        let first = self.bundles_response(&id);
        Ok(Response::new(
            self.watch(feeds, first, move |api| Some(api.bundles_response(&id))),
        ))
    }

    async fn fetch_jwtsvid(&self, request: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        Self::check_header(&request)?;
        Err(Status::unimplemented("Trellis issues X.509-SVIDs only"))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Self::check_header(&request)?;
        Err(Status::unimplemented("Trellis issues X.509-SVIDs only"))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Self::check_header(&request)?;
        Err(Status::unimplemented("Trellis issues X.509-SVIDs only"))
    }
}

/// A Workload API socket being served.
pub struct WorkloadApiServer {
    pub path: PathBuf,
    task: tokio::task::JoinHandle<()>,
    /// Dropping it (with the server) ends every open stream.
    stop: Arc<watch::Sender<()>>,
}

impl WorkloadApiServer {
    /// Binds `path` (replacing a stale socket), makes it reachable by every local user (the
    /// attestor decides who gets what), and serves `api` on it.
    pub fn start(path: &Path, api: WorkloadApi) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        let stop = api.stop_sender.clone();
        let incoming = UnixListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(api))
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "Workload API server stopped");
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
            task,
            stop,
        })
    }
}

impl Drop for WorkloadApiServer {
    fn drop(&mut self) {
        self.task.abort();
        self.stop.send_replace(());
        let _ = std::fs::remove_file(&self.path);
    }
}
