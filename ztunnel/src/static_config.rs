//! Configuration from a local file instead of trellisd: a host (VM, bare metal) that runs
//! without a control plane reads the same Kubernetes-shaped manifests trellisd reads
//! (Namespace, Workload, Service, AuthorizationPolicy) from one file, and cuts its node's slice
//! with trellisd's own model code, so both sources mean exactly the same thing.
//!
//! The file is polled; a change is applied whole, and a file that no longer parses is logged
//! and ignored (the last good config stays in force, as when trellisd is unreachable).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use trellis_api::stream::Applied;
use trellis_mesh::manifest::parse_file;
use trellis_mesh::model::{build, node_slice, to_client, ClusterInfo, Role, Slice};

/// How often the file is checked for changes.
const POLL: Duration = Duration::from_secs(1);

/// Reads `path` and returns the slice `node` needs, or what is wrong with the file.
pub fn load(path: &Path, node: &str, cluster: &ClusterInfo) -> Result<Slice, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let inventory = parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let (model, _) = build(&inventory, cluster, None);
    let slice = to_client(&node_slice(&model, node, Role::Ztunnel));
    // Every node learns every workload's address; what concerns this one is its own workloads
    // and the services it may call.
    let concerns = slice.values().any(|r| match &r.kind {
        Some(trellis_api::config::v1::resource::Kind::Workload(w)) => w.node == node,
        Some(trellis_api::config::v1::resource::Kind::Service(_)) => true,
        _ => false,
    });
    if !concerns {
        return Err(format!(
            "{}: nothing in it concerns node {node:?} (give its Workload `node: {node}`, or a Service)",
            path.display()
        ));
    }
    Ok(slice)
}

/// Publishes the file's config as version 1 (already loaded by the caller as `first`), then a
/// new version each time the file changes and still parses.
pub async fn follow(path: PathBuf, node: String, cluster: ClusterInfo, first: Slice, state: watch::Sender<Applied>) {
    let mut version = 1;
    let mut seen = stamp(&path);
    state.send_replace(Applied {
        version,
        slice: first,
        connected: false,
    });
    loop {
        tokio::time::sleep(POLL).await;
        if state.is_closed() {
            return;
        }
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match load(&path, &node, &cluster) {
            Ok(slice) => {
                version += 1;
                tracing::info!(file = %path.display(), version, resources = slice.len(), "static config reloaded");
                state.send_replace(Applied {
                    version,
                    slice,
                    connected: false,
                });
            }
            Err(e) => tracing::error!(error = %e, "static config not reloaded; the previous one stays in force"),
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::TrustDomain;

    fn cluster() -> ClusterInfo {
        ClusterInfo {
            name: "east".into(),
            trust_domain: TrustDomain::new("east.trellis.local").unwrap(),
            network: "east".into(),
            domain: "cluster.local".into(),
        }
    }

    const FILE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: legacy, labels: {trellis.io/dataplane-mode: ambient}}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: billing-vm, namespace: legacy, labels: {app: billing}}
spec: {node: vm-1, ip: 10.1.0.50, nodeIP: 10.1.0.50, serviceAccount: billing}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: other, namespace: legacy}
spec: {node: vm-2, ip: 10.1.0.51, serviceAccount: other}
";

    #[test]
    fn the_file_yields_this_hosts_workload_and_not_another_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.yaml");
        std::fs::write(&path, FILE).unwrap();
        let slice = load(&path, "vm-1", &cluster()).unwrap();
        let state = crate::state::ProxyState::from_slice("vm-1", 1, &slice);
        let own: Vec<_> = state.local.values().map(|w| (w.name.as_str(), w.enrolled)).collect();
        assert_eq!(own, [("billing-vm", true)], "{:?}", state.problems);
        assert_eq!(
            state.local.values().next().unwrap().identity.to_string(),
            "spiffe://east.trellis.local/ns/legacy/sa/billing"
        );
    }

    #[test]
    fn a_bad_file_says_where_and_a_foreign_one_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.yaml");
        std::fs::write(&path, "kind: Workload\nmetadata: [").unwrap();
        let e = load(&path, "vm-1", &cluster()).unwrap_err();
        assert!(e.contains("host.yaml"), "{e}");
        std::fs::write(&path, FILE).unwrap();
        let e = load(&path, "vm-9", &cluster()).unwrap_err();
        assert!(e.contains("nothing in it concerns node \"vm-9\""), "{e}");
        let e = load(&dir.path().join("missing.yaml"), "vm-1", &cluster()).unwrap_err();
        assert!(e.contains("missing.yaml"), "{e}");
    }
}
