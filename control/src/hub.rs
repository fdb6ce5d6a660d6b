//! The control loop: discovery snapshots in, mesh model out. Bursts of changes are coalesced
//! for a few milliseconds; a single change goes straight through. Nothing is built before
//! discovery is synced, so a source that could not read everything yet never makes nodes drop
//! what they hold.
//!
//! Model versions are wall-clock milliseconds, strictly increasing ([`Versions`]): a restarted
//! trellisd starts above every version it sent before, so a node can tell a restart (a higher
//! version, then a snapshot) from a replay (a version at or below what it holds).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use trellis_api::config::v1::resource::Kind as Variant;

use crate::discovery::Discovered;
use crate::metrics::Metrics;
use crate::stream::Published;
use trellis_mesh::model::{build, with_remote, ClusterInfo, MeshModel, Remote};

/// Changes arriving within this window after the first are applied together.
pub const COALESCE: Duration = Duration::from_millis(5);

/// The source of model versions: Unix milliseconds of the build, bumped by one where two builds
/// share a millisecond (or the clock stepped back while running), so versions only grow.
///
/// Across a restart nothing is persisted: a version is above those of the previous run as long
/// as the wall clock did not step back by more than the restart took. The hub builds at most
/// once per [`COALESCE`], so versions never run ahead of the clock. Milliseconds (about 2^41 today)
/// stay exact in a Prometheus gauge and in JSON read as a double.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Versions {
    last: u64,
}

impl Versions {
    /// The version for a model built at `now`.
    pub fn next(&mut self, now: SystemTime) -> u64 {
        let millis = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last = millis.max(self.last.saturating_add(1));
        self.last
    }
}

/// The latest model and what discovery reported with it.
#[derive(Clone)]
pub struct Hub {
    pub model: watch::Receiver<Arc<Published>>,
    pub discovered: watch::Receiver<Arc<Discovered>>,
}

/// Rebuilds the model after every discovery change and publishes it with a new version, until
/// discovery stops.
pub fn spawn(
    cluster: ClusterInfo,
    mut discovered: watch::Receiver<Arc<Discovered>>,
    mut remote: watch::Receiver<Arc<Remote>>,
    metrics: Arc<Metrics>,
) -> Hub {
    let (tx, model) = watch::channel(Arc::new(Published::default()));
    let hub = Hub {
        model,
        discovered: discovered.clone(),
    };
    tokio::spawn(async move {
        let mut versions = Versions::default();
        let mut version = 0u64;
        let mut previous: Option<Arc<MeshModel>> = None;
        let mut last_inventory: Option<Arc<Discovered>> = None;
        let mut federation = Arc::new(Remote::default());
        // What `previous` was merged with.
        let mut merged = federation.clone();
        loop {
            tokio::select! {
                changed = discovered.changed() => if changed.is_err() { return },
                // The federation's sender is gone with its task: carry on with what it last said.
                changed = remote.changed(), if remote.has_changed().is_ok() => if changed.is_err() { continue },
            }
            let seen = Instant::now();
            tokio::time::sleep(COALESCE).await;
            let snapshot = discovered.borrow_and_update().clone();
            let remote_now = remote.borrow_and_update().clone();
            let federation_changed = !Arc::ptr_eq(&remote_now, &merged);
            federation = remote_now;
            metrics.discovery_problems.set(snapshot.problems.len() as i64);
            // Until discovery has seen everything once, its inventory may lack what exists: no
            // node gets a model built from it.
            if !snapshot.synced {
                continue;
            }
            // A new problem alone (a refused file) changes nothing the nodes hold.
            let same_inventory = last_inventory
                .as_ref()
                .is_some_and(|l| l.inventory == snapshot.inventory);
            if same_inventory && !federation_changed {
                continue;
            }
            let (model, changed) = if same_inventory {
                // Only the federation moved: the namespaces are carried as they are.
                let Some(prev) = previous.clone() else { continue };
                let mut model = (*prev).clone();
                model.federation = federation.entries.clone();
                // Endpoint chunks compare by pointer, weights by value: a `traffic/` change
                // alone reaches the services it names.
                let changed = with_remote(&mut model, &cluster.name, &federation, Some(&*merged));
                (model, Some((version, Arc::new(changed))))
            } else {
                let started = Instant::now();
                let prior = last_inventory
                    .as_ref()
                    .zip(previous.as_deref())
                    .map(|(i, m)| (&i.inventory, m));
                let (mut model, mut changed) = build(&snapshot.inventory, &cluster, prior);
                model.federation = federation.entries.clone();
                changed.extend(with_remote(&mut model, &cluster.name, &federation, None));
                metrics.model_build_seconds.observe(started.elapsed().as_secs_f64());
                metrics.workloads.set(snapshot.inventory.workloads.len() as i64);
                metrics.services.set(snapshot.inventory.services.len() as i64);
                let changed = prior.map(|_| (version, Arc::new(changed)));
                (model, changed)
            };
            let model = Arc::new(model);
            version = versions.next(SystemTime::now());
            metrics.model_version.set(version as i64);
            previous = Some(model.clone());
            merged = federation.clone();
            last_inventory = Some(snapshot.clone());
            let published = Published {
                version,
                model,
                at: Some(seen),
                changed,
            };
            if tx.send(Arc::new(published)).is_err() {
                return;
            }
        }
    });
    hub
}

/// The CA's rule: a node may receive a workload identity only while an enrolled workload with
/// that identity is scheduled on it, and its own node identity always.
///
/// A workload that is not enrolled is not proxied: its node's ztunnel never presents its
/// identity, so the identity is refused (fail closed), as Istio's ztunnel fetches certificates
/// only for the workloads it proxies. A waypoint's own SVID will need a path of its own.
pub fn authorizer(
    model: watch::Receiver<Arc<Published>>,
) -> impl Fn(&str, &trellis_identity::SpiffeId) -> Result<(), String> {
    move |node: &str, id: &trellis_identity::SpiffeId| {
        if let trellis_identity::IdKind::Node(name) = id.kind() {
            return if name == node {
                Ok(())
            } else {
                Err(format!("{id} is another node's identity"))
            };
        }
        let published = model.borrow().clone();
        may_issue(&published.model, node, id)
    }
}

/// Whether `node` may receive the workload identity `id` under `model` (see [`authorizer`]).
pub fn may_issue(model: &MeshModel, node: &str, id: &trellis_identity::SpiffeId) -> Result<(), String> {
    let id_text = id.to_string();
    let mut scheduled = false;
    for entry in model.by_node.get(node).map(Vec::as_slice).unwrap_or_default() {
        if let Some(Variant::Workload(w)) = &entry.resource.kind {
            if w.identity == id_text {
                if w.enrolled {
                    return Ok(());
                }
                scheduled = true;
            }
        }
    }
    if scheduled {
        Err(format!(
            "the workloads with {id} on {node} are not enrolled in the mesh (label their namespace or pod trellis.io/dataplane-mode=ambient)"
        ))
    } else {
        Err(format!("no workload with {id} is scheduled on {node}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster that never joins: the federation's sender is gone at once.
    fn no_federation() -> watch::Receiver<Arc<Remote>> {
        watch::channel(Arc::new(Remote::default())).1
    }
    use trellis_identity::TrustDomain;

    #[tokio::test]
    async fn no_model_is_built_before_discovery_is_synced() {
        let cluster = ClusterInfo {
            name: "east".into(),
            trust_domain: TrustDomain::new("east.trellis.local").unwrap(),
            network: "east".into(),
            domain: "cluster.local".into(),
        };
        let inventory = trellis_mesh::manifest::parse_file(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {trellis.io/dataplane-mode: ambient}\n",
        )
        .unwrap();
        let (tx, rx) = watch::channel(Arc::new(Discovered::default()));
        let metrics = Arc::new(Metrics::default());
        let mut hub = spawn(cluster, rx, no_federation(), metrics.clone());
        let partial = Discovered {
            inventory: inventory.clone(),
            problems: vec!["/m/sub: cannot list: Too many open files (os error 24)".into()],
            synced: false,
        };
        tx.send(Arc::new(partial)).unwrap();
        tokio::time::sleep(COALESCE * 20).await;
        assert_eq!(hub.model.borrow().version, 0, "nothing built from a partial inventory");
        assert_eq!(
            metrics.discovery_problems.get(),
            1,
            "its problems are counted all the same"
        );
        let synced = Discovered {
            inventory,
            problems: Vec::new(),
            synced: true,
        };
        tx.send(Arc::new(synced)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), hub.model.wait_for(|p| p.version > 0))
            .await
            .expect("a model once synced")
            .unwrap();
    }

    /// `trellis traffic shift` changes only the federation's traffic map: no endpoint chunk
    /// moves, so the hub's cheap path (pointer-equal chunks) must still re-merge and publish.
    #[tokio::test]
    async fn a_traffic_record_alone_reaches_the_published_service() {
        let cluster = ClusterInfo {
            name: "east".into(),
            trust_domain: TrustDomain::new("east.trellis.local").unwrap(),
            network: "east".into(),
            domain: "cluster.local".into(),
        };
        let inventory = trellis_mesh::manifest::parse_file(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop, labels: {trellis.io/global: \"true\"}}\nspec: {selector: {app: cart}, ports: [{port: 80, targetPort: 8080}]}\n",
        )
        .unwrap();
        let (tx, rx) = watch::channel(Arc::new(Discovered::default()));
        let (remote_tx, remote_rx) = watch::channel(Arc::new(Remote::default()));
        let mut hub = spawn(cluster, rx, remote_rx, Arc::new(Metrics::default()));
        tx.send(Arc::new(Discovered {
            inventory,
            problems: Vec::new(),
            synced: true,
        }))
        .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), hub.model.wait_for(|p| p.version > 0))
            .await
            .expect("a first model")
            .unwrap()
            .version;
        let weights: std::collections::BTreeMap<String, u32> =
            [("east".to_string(), 90), ("west".to_string(), 10)].into();
        let shifted = Remote {
            weights: [(("shop".to_string(), "cart".to_string()), weights.clone())].into(),
            ..Remote::default()
        };
        remote_tx.send(Arc::new(shifted)).unwrap();
        let published: Arc<Published> =
            tokio::time::timeout(Duration::from_secs(5), hub.model.wait_for(|p| p.version > first))
                .await
                .expect("a model with the weights")
                .unwrap()
                .clone();
        let cart = published
            .model
            .service(&trellis_mesh::inventory::ObjectKey::new("shop", "cart"))
            .expect("the service");
        let Some(Variant::Service(cart)) = &cart.resource.kind else {
            panic!("not a service")
        };
        assert_eq!(cart.cluster_weights, weights);
        assert!(
            published
                .changed
                .as_ref()
                .is_some_and(|(from, ns)| *from == first && ns.contains("shop")),
            "the nodes are sent the namespace as a delta: {:?}",
            published.changed
        );
    }

    #[test]
    fn only_an_enrolled_workload_on_the_node_makes_its_identity_issuable() {
        let cluster = ClusterInfo {
            name: "east".into(),
            trust_domain: TrustDomain::new("east.trellis.local").unwrap(),
            network: "east".into(),
            domain: "cluster.local".into(),
        };
        let model = |mode: &str| {
            let text = format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{trellis.io/dataplane-mode: {mode}}}}}\n---\napiVersion: trellis.io/v1\nkind: Workload\nmetadata: {{name: cart-1, namespace: shop}}\nspec: {{serviceAccount: cart, node: node-1, ip: 10.1.1.5}}\n"
            );
            build(&trellis_mesh::manifest::parse_file(&text).unwrap(), &cluster, None).0
        };
        let cart = trellis_identity::SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/cart").unwrap();
        assert_eq!(may_issue(&model("ambient"), "node-1", &cart), Ok(()));
        let refused = may_issue(&model("none"), "node-1", &cart).unwrap_err();
        assert!(refused.contains("not enrolled"), "{refused}");
        let elsewhere = may_issue(&model("ambient"), "node-2", &cart).unwrap_err();
        assert!(elsewhere.contains("no workload with"), "{elsewhere}");
    }

    #[test]
    fn versions_only_grow_even_when_builds_share_a_millisecond_or_the_clock_steps_back() {
        let t0 = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let mut v = Versions::default();
        assert_eq!(v.next(t0), 1_700_000_000_000);
        assert_eq!(v.next(t0), 1_700_000_000_001, "same millisecond");
        assert_eq!(
            v.next(t0 - Duration::from_secs(60)),
            1_700_000_000_002,
            "clock stepped back"
        );
        assert_eq!(v.next(t0 + Duration::from_secs(1)), 1_700_000_001_000);
    }

    #[test]
    fn a_restarted_hub_starts_above_every_version_of_the_previous_run() {
        let t0 = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let mut first_run = Versions::default();
        // A busy run: a build every COALESCE for ten minutes.
        let mut last = 0;
        let mut t = t0;
        while t < t0 + Duration::from_secs(600) {
            last = first_run.next(t);
            t += COALESCE;
        }
        // Restarted a second later, with no memory of the first run.
        let mut second_run = Versions::default();
        assert!(second_run.next(t + Duration::from_secs(1)) > last);
    }

    /// Two hubs in sequence, as two trellisd processes would run: the second one's first
    /// version is above the first one's last.
    #[tokio::test]
    async fn model_versions_stay_monotonic_across_a_hub_restart() {
        let cluster = ClusterInfo {
            name: "east".into(),
            trust_domain: TrustDomain::new("east.trellis.local").unwrap(),
            network: "east".into(),
            domain: "cluster.local".into(),
        };
        let synced = |mode: &str| {
            Discovered {
            inventory: trellis_mesh::manifest::parse_file(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {{trellis.io/dataplane-mode: {mode}}}\n"
            ))
            .unwrap(),
            problems: Vec::new(),
            synced: true,
        }
        };
        let mut last_of_first = 0;
        {
            let (tx, rx) = watch::channel(Arc::new(Discovered::default()));
            let mut hub = spawn(cluster.clone(), rx, no_federation(), Arc::new(Metrics::default()));
            for mode in ["ambient", "none", "ambient"] {
                tx.send(Arc::new(synced(mode))).unwrap();
                let v = tokio::time::timeout(
                    Duration::from_secs(5),
                    hub.model.wait_for(|p| p.version > last_of_first),
                )
                .await
                .unwrap()
                .unwrap()
                .version;
                last_of_first = v;
            }
        }
        let (tx, rx) = watch::channel(Arc::new(Discovered::default()));
        let mut hub = spawn(cluster, rx, no_federation(), Arc::new(Metrics::default()));
        tx.send(Arc::new(synced("ambient"))).unwrap();
        let first_of_second = tokio::time::timeout(Duration::from_secs(5), hub.model.wait_for(|p| p.version > 0))
            .await
            .unwrap()
            .unwrap()
            .version;
        assert!(
            first_of_second > last_of_first,
            "restart went from {last_of_first} to {first_of_second}"
        );
    }
}
