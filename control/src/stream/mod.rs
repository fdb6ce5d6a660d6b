//! The node-scoped config stream (`trellis.config.v1.ConfigService/Stream`).
//!
//! A node authenticates with its node SVID over mTLS (a waypoint with its own SVID: see
//! [`auth`]), sends `Subscribe{node, role, resume_from}`, and receives a full snapshot (or, when
//! it resumes from the version the server last sent it, only what changed since), then
//! versioned upserts and removals as the model changes. It acknowledges or rejects every update.
//! Versions are the model's: monotonic, across trellisd restarts too (`hub::Versions`), possibly
//! skipping numbers for changes that do not concern the node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_api::config::v1 as pb;
use trellis_identity::tls::PeerInfo;
use trellis_identity::TrustDomain;

use crate::metrics::Metrics;
use crate::wire::{RawUpdate, StreamHandler, UpdateStream};

pub mod auth;
mod session;
pub use auth::Subscriber;
pub use session::{Acked, Session, SNAPSHOT_ACK_TIMEOUT};
use trellis_mesh::model::{MeshModel, Role, ServerSlice};

/// How long a new stream may take to send its Subscribe message.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshots being written at once. Each holds a whole encoded slice in memory until the node
/// acknowledges it, so this bounds trellisd's memory when many nodes (re)connect together.
const CONCURRENT_SNAPSHOTS: usize = 16;

/// One published version of the model.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub version: u64,
    pub model: Arc<MeshModel>,
    /// When the change that produced it was seen (for push latency).
    pub at: Option<Instant>,
    /// The version this one was built from and the namespaces that differ from it.
    pub changed: Option<(u64, Arc<std::collections::BTreeSet<String>>)>,
}

/// What the admin endpoint shows about a connected node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub role: String,
    pub connected_since_unix: i64,
    pub sent_version: u64,
    pub acked_version: u64,
    pub last_error: String,
    pub resources: usize,
}

/// Per-node memory of the last slice sent, so a reconnecting node can resume.
#[derive(Default)]
struct Sessions {
    last_sent: BTreeMap<(String, Role), (u64, ServerSlice)>,
    connected: BTreeMap<u64, NodeStatus>,
    next_id: u64,
}

/// The config stream service.
#[derive(Clone)]
pub struct ConfigStream {
    trust_domain: TrustDomain,
    model: watch::Receiver<Arc<Published>>,
    sessions: Arc<Mutex<Sessions>>,
    metrics: Arc<Metrics>,
    snapshots: Arc<Semaphore>,
}

impl ConfigStream {
    pub fn new(trust_domain: TrustDomain, model: watch::Receiver<Arc<Published>>, metrics: Arc<Metrics>) -> Self {
        Self {
            trust_domain,
            model,
            sessions: Arc::default(),
            metrics,
            snapshots: Arc::new(Semaphore::new(CONCURRENT_SNAPSHOTS)),
        }
    }

    /// The service for tonic's router.
    pub fn server(self) -> crate::wire::ConfigServiceServer<Self> {
        crate::wire::ConfigServiceServer::new(self)
    }

    /// Nodes connected right now.
    pub fn connected(&self) -> Vec<NodeStatus> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.connected.values().cloned().collect()
    }

    fn update_status(&self, id: u64, f: impl FnOnce(&mut NodeStatus)) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(status) = sessions.connected.get_mut(&id) {
            f(status);
        }
    }
}

#[tonic::async_trait]
impl StreamHandler for ConfigStream {
    async fn stream(&self, request: Request<Streaming<pb::StreamRequest>>) -> Result<Response<UpdateStream>, Status> {
        let caller = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.current_id().cloned());
        // Refuse what cannot be anybody before reading a byte of the stream.
        auth::identify(&self.trust_domain, caller.as_ref())?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(SUBSCRIBE_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Subscribe message within 10 s"))??;
        let subscribe = match first.and_then(|m| m.kind) {
            Some(pb::stream_request::Kind::Subscribe(s)) => s,
            _ => return Err(Status::invalid_argument("the first message must be Subscribe")),
        };
        let model = self.model.borrow().model.clone();
        let subscriber = auth::authorize(&self.trust_domain, caller.as_ref(), &subscribe, &model).inspect_err(|e| {
            let caller = caller.as_ref().map(ToString::to_string).unwrap_or_default();
            tracing::warn!(%caller, asked = %subscribe.node, role = subscribe.role, reason = %e.message(), "refused subscription");
        })?;
        let Subscriber {
            name: caller_node,
            role,
        } = subscriber.clone();

        let session_id = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.next_id += 1;
            let id = sessions.next_id;
            sessions.connected.insert(
                id,
                NodeStatus {
                    node: caller_node.clone(),
                    role: format!("{role:?}").to_lowercase(),
                    connected_since_unix: trellis_identity::svid::to_unix(SystemTime::now()),
                    sent_version: 0,
                    acked_version: 0,
                    last_error: String::new(),
                    resources: 0,
                },
            );
            id
        };
        self.metrics.connected_nodes.inc();
        tracing::info!(node = %caller_node, role = ?role, resume_from = subscribe.resume_from, "node subscribed");

        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            this.serve_node(subscriber, subscribe.resume_from, session_id, inbound, tx)
                .await;
            let mut sessions = this.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.connected.remove(&session_id);
            this.metrics.connected_nodes.dec();
            tracing::info!(node = %caller_node, "node unsubscribed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl ConfigStream {
    /// Drives one node's [`Session`]: feeds it model versions, acknowledgements and the time,
    /// sends what it answers, and remembers what the node holds when the stream ends.
    async fn serve_node(
        &self,
        subscriber: Subscriber,
        resume_from: u64,
        session_id: u64,
        mut inbound: Streaming<pb::StreamRequest>,
        tx: mpsc::Sender<Result<RawUpdate, Status>>,
    ) {
        let Subscriber { name: node, role } = subscriber.clone();
        let mut model = self.model.clone();
        let published = model.borrow_and_update().clone();
        let resumable = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.last_sent.get(&(node.clone(), role)).cloned()
        };
        let resumable = resumable.as_ref().map(|(v, slice)| (*v, slice));
        let (mut session, first) = Session::start(&node, role, resume_from, resumable, &published, Instant::now());
        // A snapshot holds a slot until the node has it (acknowledged) or a timeout.
        let mut slot = None;
        if first.snapshot {
            let Ok(permit) = self.snapshots.clone().acquire_owned().await else {
                return;
            };
            slot = Some(permit);
        }
        let kind = if first.snapshot { "snapshot" } else { "resume" };
        if self
            .send(session_id, &tx, first, &mut session, published.at, kind)
            .await
        {
            self.run(
                &subscriber,
                session_id,
                &mut session,
                &mut slot,
                &mut model,
                &mut inbound,
                &tx,
            )
            .await;
        }
        // Remember what the node holds, so that it can resume after a reconnect.
        if let Some(held) = session.into_resumable() {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.last_sent.insert((node, role), held);
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        subscriber: &Subscriber,
        session_id: u64,
        session: &mut Session,
        slot: &mut Option<OwnedSemaphorePermit>,
        model: &mut watch::Receiver<Arc<Published>>,
        inbound: &mut Streaming<pb::StreamRequest>,
        tx: &mpsc::Sender<Result<RawUpdate, Status>>,
    ) {
        let node = subscriber.name.as_str();
        loop {
            let slot_deadline = slot.as_ref().and(session.slot_deadline());
            tokio::select! {
                changed = model.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let published = model.borrow_and_update().clone();
                    if !auth::still_allowed(subscriber, &published.model) {
                        tracing::warn!(%node, "its Waypoint resource is gone; closing its stream");
                        let _ = tx.send(Err(Status::permission_denied(format!("{node} is no waypoint's identity any more")))).await;
                        return;
                    }
                    if let Some(update) = session.on_model(&published) {
                        if !self.send(session_id, tx, update, session, published.at, "delta").await {
                            return;
                        }
                    }
                }
                message = inbound.next() => {
                    let ack = match message {
                        Some(Ok(pb::StreamRequest { kind: Some(pb::stream_request::Kind::Ack(ack)) })) => ack,
                        Some(Ok(_)) => {
                            tracing::warn!(%node, "unexpected message on the config stream; closing it");
                            let _ = tx.send(Err(Status::invalid_argument("only Ack may follow Subscribe"))).await;
                            return;
                        }
                        Some(Err(_)) | None => return,
                    };
                    match session.on_ack(&ack, Instant::now()) {
                        Acked::Applied { version, latency } => {
                            if let Some(latency) = latency {
                                self.metrics.push_latency.observe(latency.as_secs_f64());
                            }
                            self.update_status(session_id, |s| s.acked_version = s.acked_version.max(version));
                        }
                        Acked::Rejected { version, error } => {
                            tracing::warn!(%node, version, %error, "node rejected a config version");
                            self.metrics.push_errors.inc();
                            self.update_status(session_id, |s| s.last_error = error);
                        }
                    }
                }
                _ = sleep_until_std(slot_deadline), if slot_deadline.is_some() => {
                    tracing::warn!(%node, "no acknowledgement of the snapshot within {} s", SNAPSHOT_ACK_TIMEOUT.as_secs());
                }
                _ = tx.closed() => return,
            }
            if slot.is_some() && session.release_slot(Instant::now()) {
                *slot = None;
            }
        }
    }

    /// Sends one update; false when the node is gone.
    async fn send(
        &self,
        session_id: u64,
        tx: &mpsc::Sender<Result<RawUpdate, Status>>,
        update: RawUpdate,
        session: &mut Session,
        seen: Option<Instant>,
        kind: &'static str,
    ) -> bool {
        let version = update.version;
        if tx.send(Ok(update)).await.is_err() {
            return false;
        }
        session.on_sent(version, seen);
        self.metrics
            .pushes
            .get_or_create(&crate::metrics::PushLabels { kind })
            .inc();
        let resources = session.resources();
        self.update_status(session_id, |status| {
            status.sent_version = version;
            status.resources = resources;
        });
        true
    }
}

/// Sleeps until a std deadline on tokio's clock.
async fn sleep_until_std(deadline: Option<Instant>) {
    let wait = deadline
        .map(|d| d.saturating_duration_since(Instant::now()))
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
}
