//! One node's config stream as a state machine (the quinn-proto shape): it is fed the model
//! versions trellisd publishes, the node's acknowledgements and the time, and answers with the
//! updates to send. No sockets, no clock reads: the driver in [`super`] does the I/O.
//!
//! The rules:
//! - The first update is a snapshot, unless the node resumes from exactly the version this
//!   server last sent it; then only the difference.
//! - Each later model version yields a delta of what changed for this node, or nothing.
//! - A snapshot holds one of trellisd's snapshot slots until the node acknowledges anything or
//!   the acknowledgement deadline passes (bounding memory when many nodes reconnect at once).
//! - What the node holds is remembered at the end only if everything cut was also sent, so a
//!   resume never skips a change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_api::config::v1 as pb;
use trellis_mesh::model::{advance, diff, node_slice, Entry, Role, ServerSlice};

use super::Published;
use crate::wire::RawUpdate;

/// How long a snapshot may hold its slot waiting for the node's acknowledgement.
pub const SNAPSHOT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the node did with one version, as the driver reports it to metrics and status.
#[derive(Debug, Clone, PartialEq)]
pub enum Acked {
    /// Applied; the time from the change to the acknowledgement, when known.
    Applied { version: u64, latency: Option<Duration> },
    /// Refused, with the node's reason.
    Rejected { version: u64, error: String },
}

/// One node's stream.
#[derive(Debug)]
pub struct Session {
    node: String,
    role: Role,
    /// The slice as cut for the node, and the model version it was cut from.
    slice: ServerSlice,
    version: u64,
    /// The last version handed to the driver to send, and whether `slice` holds changes not
    /// handed over yet.
    sent: u64,
    unsent: bool,
    /// Versions sent and not acknowledged yet, with when the change that made them was seen.
    pending: BTreeMap<u64, Option<Instant>>,
    /// While a snapshot waits for its acknowledgement: until when it may hold its slot.
    slot_until: Option<Instant>,
}

impl Session {
    /// Starts the stream of `node` at `published`: the session and the first update.
    /// `resumable` is what this server last sent the node, if it remembers it.
    pub fn start(
        node: &str,
        role: Role,
        resume_from: u64,
        resumable: Option<(u64, &ServerSlice)>,
        published: &Published,
        now: Instant,
    ) -> (Self, RawUpdate) {
        let slice = node_slice(&published.model, node, role);
        let first = match resumable {
            Some((sent, held)) if resume_from != 0 && sent == resume_from => {
                let (upserts, removals) = diff(held, &slice);
                RawUpdate {
                    version: published.version,
                    snapshot: false,
                    upserts,
                    removals,
                }
            }
            _ => RawUpdate {
                version: published.version,
                snapshot: true,
                upserts: slice.values().cloned().collect::<Vec<Arc<Entry>>>(),
                removals: Vec::new(),
            },
        };
        let session = Self {
            node: node.to_string(),
            role,
            slice,
            version: published.version,
            sent: 0,
            unsent: true,
            pending: BTreeMap::new(),
            slot_until: first.snapshot.then_some(now + SNAPSHOT_ACK_TIMEOUT),
        };
        (session, first)
    }

    /// A new model version: the delta to send, or `None` when nothing changed for this node.
    pub fn on_model(&mut self, published: &Published) -> Option<RawUpdate> {
        let (upserts, removals) = match &published.changed {
            // Only some namespaces changed since the model this slice was cut from.
            Some((from, namespaces)) if *from == self.version => {
                advance(&published.model, &self.node, self.role, &mut self.slice, namespaces)
            }
            _ => {
                let next = node_slice(&published.model, &self.node, self.role);
                let changes = diff(&self.slice, &next);
                self.slice = next;
                changes
            }
        };
        self.version = published.version;
        if upserts.is_empty() && removals.is_empty() {
            return None;
        }
        self.unsent = true;
        Some(RawUpdate {
            version: published.version,
            snapshot: false,
            upserts,
            removals,
        })
    }

    /// The driver sent `version`, built from a change seen at `seen`.
    pub fn on_sent(&mut self, version: u64, seen: Option<Instant>) {
        self.sent = version;
        self.unsent = false;
        self.pending.insert(version, seen);
    }

    /// The node acknowledged (or refused) `ack.version` at `now`. Any acknowledgement frees the
    /// snapshot slot: the node has read the snapshot.
    pub fn on_ack(&mut self, ack: &pb::Ack, now: Instant) -> Acked {
        self.slot_until = None;
        let seen = self.pending.remove(&ack.version).flatten();
        self.pending.retain(|v, _| *v > ack.version);
        if ack.error.is_empty() {
            Acked::Applied {
                version: ack.version,
                latency: seen.map(|at| now.saturating_duration_since(at)),
            }
        } else {
            Acked::Rejected {
                version: ack.version,
                error: ack.error.clone(),
            }
        }
    }

    /// Until when the snapshot may keep its slot; `None` when it holds none.
    pub fn slot_deadline(&self) -> Option<Instant> {
        self.slot_until
    }

    /// Whether the snapshot slot must be given back at `now` (deadline passed, or acknowledged).
    pub fn release_slot(&mut self, now: Instant) -> bool {
        match self.slot_until {
            Some(until) if now >= until => {
                self.slot_until = None;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Resources in the node's slice.
    pub fn resources(&self) -> usize {
        self.slice.len()
    }

    /// What to remember when the stream ends, so the node can resume: the version it was last
    /// sent and that slice; `None` if something cut was never sent (a resume would miss it).
    pub fn into_resumable(self) -> Option<(u64, ServerSlice)> {
        (self.sent != 0 && !self.unsent).then_some((self.sent, self.slice))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use trellis_identity::TrustDomain;
    use trellis_mesh::inventory::Inventory;
    use trellis_mesh::manifest::parse_file;
    use trellis_mesh::model::{build, ClusterInfo};

    fn cluster() -> ClusterInfo {
        ClusterInfo {
            name: "east".into(),
            trust_domain: TrustDomain::new("east.trellis.local").unwrap(),
            network: "east".into(),
            domain: "cluster.local".into(),
        }
    }

    fn mesh(workloads: &[(&str, &str)]) -> Inventory {
        let mut text = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.io/dataplane-mode: ambient}}\n",
        );
        for (name, node) in workloads {
            text.push_str(&format!(
                "---\napiVersion: trellis.io/v1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{node: {node}, ip: 10.1.1.{}}}\n",
                text.len() % 200 + 1
            ));
        }
        parse_file(&text).unwrap()
    }

    fn publish(version: u64, inv: &Inventory, previous: Option<(&Inventory, &Published)>) -> Published {
        let (model, changed) = build(inv, &cluster(), previous.map(|(i, p)| (i, &*p.model)));
        Published {
            version,
            model: Arc::new(model),
            at: None,
            changed: previous.map(|(_, p)| (p.version, Arc::new(changed))),
        }
    }

    /// The workloads an update upserts.
    fn names(update: &RawUpdate) -> BTreeSet<String> {
        (update.upserts.iter())
            .filter(|e| e.key.kind == pb::Kind::Workload)
            .map(|e| e.key.name.to_string())
            .collect()
    }

    #[test]
    fn a_new_node_gets_a_snapshot_that_holds_a_slot_until_acknowledged() {
        let now = Instant::now();
        let inv = mesh(&[("a", "node-1"), ("b", "node-2")]);
        let v1 = publish(1, &inv, None);
        let (mut s, first) = Session::start("node-1", Role::Ztunnel, 0, None, &v1, now);
        assert!(first.snapshot);
        assert_eq!(names(&first), BTreeSet::from(["shop/a".to_string()]));
        assert_eq!(s.slot_deadline(), Some(now + SNAPSHOT_ACK_TIMEOUT));
        assert!(!s.release_slot(now + Duration::from_secs(1)), "still waiting");
        s.on_sent(1, None);
        let acked = s.on_ack(
            &pb::Ack {
                version: 1,
                error: String::new(),
            },
            now,
        );
        assert_eq!(
            acked,
            Acked::Applied {
                version: 1,
                latency: None
            }
        );
        assert!(s.release_slot(now), "acknowledged: the slot goes back");
    }

    #[test]
    fn a_silent_node_loses_its_snapshot_slot_at_the_deadline() {
        let now = Instant::now();
        let v1 = publish(1, &mesh(&[("a", "node-1")]), None);
        let (mut s, _) = Session::start("node-1", Role::Ztunnel, 0, None, &v1, now);
        assert!(s.release_slot(now + SNAPSHOT_ACK_TIMEOUT));
        assert_eq!(s.slot_deadline(), None);
    }

    #[test]
    fn a_resume_from_the_last_sent_version_gets_only_the_difference() {
        let now = Instant::now();
        let inv1 = mesh(&[("a", "node-1")]);
        let v1 = publish(1, &inv1, None);
        let (mut s, _) = Session::start("node-1", Role::Ztunnel, 0, None, &v1, now);
        s.on_sent(1, None);
        let (sent, held) = s.into_resumable().expect("everything was sent");

        let inv2 = mesh(&[("a", "node-1"), ("c", "node-1")]);
        let v2 = publish(2, &inv2, Some((&inv1, &v1)));
        let (_, resumed) = Session::start("node-1", Role::Ztunnel, sent, Some((sent, &held)), &v2, now);
        assert!(!resumed.snapshot);
        assert_eq!(names(&resumed), BTreeSet::from(["shop/c".to_string()]));

        let (_, stale) = Session::start("node-1", Role::Ztunnel, 7, Some((sent, &held)), &v2, now);
        assert!(stale.snapshot, "a version this server never sent means a snapshot");
    }

    #[test]
    fn model_versions_become_deltas_only_when_the_node_is_concerned() {
        let now = Instant::now();
        let inv1 = mesh(&[("a", "node-1")]);
        let v1 = publish(1, &inv1, None);
        let (mut s, _) = Session::start("node-1", Role::Ztunnel, 0, None, &v1, now);
        s.on_sent(1, None);

        // A policy that selects none of node-1's workloads does not concern it.
        let mut inv2 = inv1.clone();
        inv2.policies = parse_file(
            "apiVersion: trellis.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: payments, namespace: shop}\nspec: {selector: {matchLabels: {app: payments}}}\n",
        )
        .unwrap()
        .policies;
        let v2 = publish(2, &inv2, Some((&inv1, &v1)));
        assert!(s.on_model(&v2).is_none(), "another workload's policy is not sent");

        let inv3 = mesh(&[("b", "node-2")]);
        let v3 = publish(3, &inv3, Some((&inv2, &v2)));
        let delta = s.on_model(&v3).expect("its workload left");
        assert_eq!(
            delta.removals.iter().map(|k| k.name.to_string()).collect::<Vec<_>>(),
            ["shop/a"]
        );
        assert!(s.into_resumable().is_none(), "cut but not sent: no resume from it");
    }

    #[test]
    fn acknowledgements_measure_latency_and_report_refusals() {
        let now = Instant::now();
        let v1 = publish(1, &mesh(&[("a", "node-1")]), None);
        let (mut s, _) = Session::start("node-1", Role::Ztunnel, 0, None, &v1, now);
        s.on_sent(1, Some(now));
        s.on_sent(2, Some(now));
        let later = now + Duration::from_millis(30);
        assert_eq!(
            s.on_ack(
                &pb::Ack {
                    version: 1,
                    error: String::new()
                },
                later
            ),
            Acked::Applied {
                version: 1,
                latency: Some(Duration::from_millis(30))
            }
        );
        assert_eq!(
            s.on_ack(
                &pb::Ack {
                    version: 2,
                    error: "bad".into()
                },
                later
            ),
            Acked::Rejected {
                version: 2,
                error: "bad".into()
            }
        );
    }
}
