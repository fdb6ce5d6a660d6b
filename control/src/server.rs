//! Starting trellisd: discovery, the model hub, the CA and the config stream on one TLS port,
//! and the loopback admin endpoint. Used by the binary and by tests alike.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_api::identity::v1::certificate_service_server::CertificateServiceServer;
use trellis_identity::issuance::{control_plane_tls, CaService};
use trellis_identity::tls::tls_incoming;
use trellis_identity::{CertManager, CertificateAuthority, IssuancePolicy, JoinTokens, ManagerConfig, SpiffeId};

use crate::discovery::directory::ManifestDirectory;
use crate::discovery::{Discovered, DiscoverySource};
use crate::hub::{self, Hub};
use crate::metrics::Metrics;
use crate::stream::ConfigStream;
use trellis_mesh::model::ClusterInfo;

/// What trellisd needs to start.
#[derive(Debug, Clone)]
pub struct Options {
    pub cluster: ClusterInfo,
    pub ca_dir: PathBuf,
    pub policy: IssuancePolicy,
    pub manifests: PathBuf,
    pub grpc_listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

/// A running trellisd.
pub struct ControlPlane {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub hub: Hub,
    pub stream: ConfigStream,
    pub metrics: Arc<Metrics>,
    pub ca: Arc<CertificateAuthority>,
    pub tokens: Arc<JoinTokens>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _discovery: watch::Receiver<Arc<Discovered>>,
    _control_certs: CertManager,
}

impl ControlPlane {
    /// Starts every part; fails with a message naming what could not start.
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        let td = opts.cluster.trust_domain.clone();
        let ca = Arc::new(
            CertificateAuthority::load_or_create(&opts.ca_dir, &td, opts.policy)
                .context("the cluster CA cannot start")?,
        );
        let tokens = Arc::new(JoinTokens::open(&opts.ca_dir.join("join-tokens.json"))?);
        let control_certs = CertManager::new(ca.clone(), ManagerConfig::default());
        let control_id = SpiffeId::control(&td);
        control_certs.ensure(&control_id);
        control_certs
            .wait_for(&control_id, Duration::from_secs(10))
            .await
            .context("could not issue trellisd's own SVID")?;

        let metrics = Arc::new(Metrics::default());
        anyhow::ensure!(
            opts.manifests.is_dir(),
            "manifest directory {} does not exist (create it, or point --manifests elsewhere)",
            opts.manifests.display()
        );
        let (discovery_tx, discovery_rx) = watch::channel(Arc::new(Discovered::default()));
        let source: Box<dyn DiscoverySource> = Box::new(ManifestDirectory::new(&opts.manifests));
        let discovery_task = tokio::spawn(source.run(discovery_tx));
        let (federation, remote) = crate::federate::spawn(
            opts.cluster.clone(),
            ca.roots().to_vec(),
            discovery_rx.clone(),
            metrics.clone(),
        );
        let hub = hub::spawn(opts.cluster.clone(), discovery_rx.clone(), remote, metrics.clone());

        let stream = ConfigStream::new(td.clone(), hub.model.clone(), metrics.clone());
        let ca_service = CaService::new(ca.clone(), tokens.clone(), Arc::new(hub::authorizer(hub.model.clone())));
        let tls = control_plane_tls(&ca, &control_certs)?;
        let listener = TcpListener::bind(opts.grpc_listen)
            .await
            .with_context(|| format!("cannot listen on {}", opts.grpc_listen))?;
        let grpc_addr = listener.local_addr()?;
        let incoming = tls_incoming(listener, Arc::new(tls));
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .max_connection_age(Duration::from_secs(3600))
            .add_service(CertificateServiceServer::new(ca_service))
            .add_service(stream.clone().server());
        let grpc_task = tokio::spawn(async move {
            if let Err(e) = grpc.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });

        let admin_listener = TcpListener::bind(opts.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", opts.admin_listen))?;
        let admin_addr = admin_listener.local_addr()?;
        let admin_task = tokio::spawn(crate::admin::serve(
            admin_listener,
            crate::admin::Admin {
                hub: hub.clone(),
                stream: stream.clone(),
                metrics: metrics.clone(),
                cluster: opts.cluster.clone(),
                federation,
            },
        ));
        tracing::info!(%grpc_addr, %admin_addr, manifests = %opts.manifests.display(), "trellisd serving");
        Ok(Self {
            grpc_addr,
            admin_addr,
            hub,
            stream,
            metrics,
            ca,
            tokens,
            tasks: vec![discovery_task, grpc_task, admin_task],
            _discovery: discovery_rx,
            _control_certs: control_certs,
        })
    }

    /// Waits until the model reflects discovery at least once (the first scan is done).
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut model = self.hub.model.clone();
        tokio::time::timeout(timeout, model.wait_for(|p| p.version > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
