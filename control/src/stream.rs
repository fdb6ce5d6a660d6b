//! The node-scoped config stream (`trellis.config.v1.ConfigService/Stream`).
//!
//! A node authenticates with its node SVID over mTLS, sends `Subscribe{node, role,
//! resume_from}`, and receives a full snapshot (or, when it resumes from the version the server
//! last sent it, only what changed since), then versioned upserts and removals as the model
//! changes. It acknowledges or rejects every update. Versions are the model's: monotonic,
//! possibly skipping numbers for changes that do not concern the node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trellis_api::config::v1 as pb;
use trellis_identity::tls::PeerInfo;
use trellis_identity::{IdKind, TrustDomain};

use crate::metrics::Metrics;
use crate::wire::{RawUpdate, StreamHandler, UpdateStream};
use trellis_mesh::model::{advance, diff, node_slice, Entry, MeshModel, Role, ServerSlice};

/// How long a new stream may take to send its Subscribe message.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshots being written at once. Each holds a whole encoded slice in memory until the node
/// acknowledges it, so this bounds trellisd's memory when many nodes (re)connect together.
const CONCURRENT_SNAPSHOTS: usize = 16;
/// How long a snapshot may hold its slot waiting for the node's acknowledgement.
const SNAPSHOT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// The update that brings a node from what it holds (`resume_from`) to `slice`.
    fn first_update(&self, node: &str, role: Role, resume_from: u64, version: u64, slice: &ServerSlice) -> RawUpdate {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.last_sent.get(&(node.to_string(), role)) {
            Some((sent, held)) if resume_from != 0 && *sent == resume_from => {
                let (upserts, removals) = diff(held, slice);
                RawUpdate {
                    version,
                    snapshot: false,
                    upserts,
                    removals,
                }
            }
            _ => RawUpdate {
                version,
                snapshot: true,
                upserts: slice.values().cloned().collect::<Vec<Arc<Entry>>>(),
                removals: Vec::new(),
            },
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
        let caller_node = match &caller {
            Some(id) if id.trust_domain() == &self.trust_domain => match id.kind() {
                IdKind::Node(n) => n.to_string(),
                _ => return Err(Status::unauthenticated(format!("{id} is not a node identity"))),
            },
            Some(id) => {
                return Err(Status::unauthenticated(format!(
                    "{id} is not a node of {}",
                    self.trust_domain
                )))
            }
            None => {
                return Err(Status::unauthenticated(
                    "the config stream needs mTLS with a valid node SVID",
                ))
            }
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(SUBSCRIBE_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Subscribe message within 10 s"))??;
        let subscribe = match first.and_then(|m| m.kind) {
            Some(pb::stream_request::Kind::Subscribe(s)) => s,
            _ => return Err(Status::invalid_argument("the first message must be Subscribe")),
        };
        if subscribe.node != caller_node {
            tracing::warn!(caller = %caller_node, asked = %subscribe.node, "refused subscription for another node");
            return Err(Status::permission_denied(format!(
                "node {caller_node} may not subscribe as {}",
                subscribe.node
            )));
        }
        let role = match pb::Role::try_from(subscribe.role) {
            Ok(pb::Role::Ztunnel) => Role::Ztunnel,
            Ok(pb::Role::Waypoint) => Role::Waypoint,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "role {} is not ROLE_ZTUNNEL or ROLE_WAYPOINT",
                    subscribe.role
                )))
            }
        };

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
            this.serve_node(
                caller_node.clone(),
                role,
                subscribe.resume_from,
                session_id,
                inbound,
                tx,
            )
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
    async fn serve_node(
        &self,
        node: String,
        role: Role,
        resume_from: u64,
        session: u64,
        inbound: Streaming<pb::StreamRequest>,
        tx: mpsc::Sender<Result<RawUpdate, Status>>,
    ) {
        let mut held = Held::default();
        self.pump(&node, role, resume_from, session, inbound, tx, &mut held)
            .await;
        // Remember what the node holds, so that it can resume after a reconnect.
        if held.sent != 0 && !held.unsent {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.last_sent.insert((node, role), (held.sent, held.slice));
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &self,
        node: &str,
        role: Role,
        resume_from: u64,
        session: u64,
        mut inbound: Streaming<pb::StreamRequest>,
        tx: mpsc::Sender<Result<RawUpdate, Status>>,
        held: &mut Held,
    ) {
        let mut model = self.model.clone();
        let published = model.borrow_and_update().clone();
        held.slice = node_slice(&published.model, node, role);
        held.version = published.version;
        let first = self.first_update(node, role, resume_from, published.version, &held.slice);
        let kind = if first.snapshot { "snapshot" } else { "resume" };
        // A snapshot holds a slot until the node has it (acknowledged) or a timeout.
        let mut slot: Option<(OwnedSemaphorePermit, tokio::time::Instant)> = None;
        if first.snapshot {
            let Ok(permit) = self.snapshots.clone().acquire_owned().await else {
                return;
            };
            slot = Some((permit, tokio::time::Instant::now() + SNAPSHOT_ACK_TIMEOUT));
        }
        let mut pending: BTreeMap<u64, Option<Instant>> = BTreeMap::new();
        if !self.send(session, &tx, first, held, kind).await {
            return;
        }
        pending.insert(published.version, published.at);
        loop {
            let slot_deadline = slot.as_ref().map(|(_, d)| *d);
            tokio::select! {
                changed = model.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let published = model.borrow_and_update().clone();
                    let (upserts, removals) = match &published.changed {
                        // Only some namespaces changed since the model this slice was cut from.
                        Some((from, namespaces)) if *from == held.version => {
                            advance(&published.model, node, role, &mut held.slice, namespaces)
                        }
                        _ => {
                            let next = node_slice(&published.model, node, role);
                            let changes = diff(&held.slice, &next);
                            held.slice = next;
                            changes
                        }
                    };
                    held.version = published.version;
                    if upserts.is_empty() && removals.is_empty() {
                        continue;
                    }
                    held.unsent = true;
                    let update = RawUpdate { version: published.version, snapshot: false, upserts, removals };
                    if !self.send(session, &tx, update, held, "delta").await {
                        return;
                    }
                    pending.insert(published.version, published.at);
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
                    slot = None;
                    let at = pending.remove(&ack.version).flatten();
                    pending.retain(|v, _| *v > ack.version);
                    if ack.error.is_empty() {
                        if let Some(at) = at {
                            self.metrics.push_latency.observe(at.elapsed().as_secs_f64());
                        }
                        self.update_status(session, |s| s.acked_version = s.acked_version.max(ack.version));
                    } else {
                        tracing::warn!(%node, version = ack.version, error = %ack.error, "node rejected a config version");
                        self.metrics.push_errors.inc();
                        self.update_status(session, |s| s.last_error = ack.error.clone());
                    }
                }
                _ = async { tokio::time::sleep_until(slot_deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if slot_deadline.is_some() => {
                    tracing::warn!(%node, "no acknowledgement of the snapshot within 10 s");
                    slot = None;
                }
                _ = tx.closed() => return,
            }
        }
    }

    /// Sends one update; false when the node is gone.
    async fn send(
        &self,
        session: u64,
        tx: &mpsc::Sender<Result<RawUpdate, Status>>,
        update: RawUpdate,
        held: &mut Held,
        kind: &'static str,
    ) -> bool {
        let version = update.version;
        if tx.send(Ok(update)).await.is_err() {
            return false;
        }
        held.sent = version;
        held.unsent = false;
        self.metrics
            .pushes
            .get_or_create(&crate::metrics::PushLabels { kind })
            .inc();
        let resources = held.slice.len();
        self.update_status(session, |status| {
            status.sent_version = version;
            status.resources = resources;
        });
        true
    }
}

/// What one stream has cut for its node: the slice, the model version it was cut from, the
/// last version actually sent, and whether the slice holds changes not sent yet.
#[derive(Default)]
struct Held {
    slice: ServerSlice,
    version: u64,
    sent: u64,
    unsent: bool,
}
