//! The control loop: discovery snapshots in, mesh model out. Bursts of changes are coalesced
//! for a few milliseconds; a single change goes straight through. Nothing is built before
//! discovery is synced, so a source that could not read everything yet never makes nodes drop
//! what they hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::discovery::Discovered;
use crate::metrics::Metrics;
use crate::stream::Published;
use trellis_mesh::model::{build, ClusterInfo, MeshModel};

/// Changes arriving within this window after the first are applied together.
pub const COALESCE: Duration = Duration::from_millis(5);

/// The latest model and what discovery reported with it.
#[derive(Clone)]
pub struct Hub {
    pub model: watch::Receiver<Arc<Published>>,
    pub discovered: watch::Receiver<Arc<Discovered>>,
}

/// Rebuilds the model after every discovery change and publishes it with a new version, until
/// discovery stops.
pub fn spawn(cluster: ClusterInfo, mut discovered: watch::Receiver<Arc<Discovered>>, metrics: Arc<Metrics>) -> Hub {
    let (tx, model) = watch::channel(Arc::new(Published::default()));
    let hub = Hub {
        model,
        discovered: discovered.clone(),
    };
    tokio::spawn(async move {
        let mut version = 0u64;
        let mut previous: Option<Arc<MeshModel>> = None;
        let mut last_inventory: Option<Arc<Discovered>> = None;
        loop {
            if discovered.changed().await.is_err() {
                return;
            }
            let seen = Instant::now();
            tokio::time::sleep(COALESCE).await;
            let snapshot = discovered.borrow_and_update().clone();
            metrics.discovery_problems.set(snapshot.problems.len() as i64);
            // Until discovery has seen everything once, its inventory may lack what exists: no
            // node gets a model built from it.
            if !snapshot.synced {
                continue;
            }
            // A new problem alone (a refused file) changes nothing the nodes hold.
            if last_inventory
                .as_ref()
                .is_some_and(|l| l.inventory == snapshot.inventory)
            {
                continue;
            }
            let started = Instant::now();
            let prior = last_inventory
                .as_ref()
                .zip(previous.as_deref())
                .map(|(i, m)| (&i.inventory, m));
            let (model, changed) = build(&snapshot.inventory, &cluster, prior);
            let model = Arc::new(model);
            metrics.model_build_seconds.observe(started.elapsed().as_secs_f64());
            metrics.workloads.set(snapshot.inventory.workloads.len() as i64);
            metrics.services.set(snapshot.inventory.services.len() as i64);
            let changed = prior.map(|_| (version, Arc::new(changed)));
            version += 1;
            metrics.model_version.set(version as i64);
            previous = Some(model.clone());
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

/// The CA's rule: a node may receive a workload identity only while a workload with that
/// identity is scheduled on it, and its own node identity always.
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
        if published.model.runs_on(node, &id.to_string()) {
            Ok(())
        } else {
            Err(format!("no workload with {id} is scheduled on {node}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let mut hub = spawn(cluster, rx, metrics.clone());
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
        tokio::time::timeout(Duration::from_secs(5), hub.model.wait_for(|p| p.version == 1))
            .await
            .expect("a model once synced")
            .unwrap();
    }
}
