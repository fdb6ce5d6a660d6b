//! trellisd's side of the federation: once the manifest directory holds this cluster's
//! `Federation` (written by `trellis federation join`), run the etcd sync with what the cluster
//! publishes (its record, its trust bundle, its global services and their ready endpoints), and
//! stop it, removing the cluster's keys, when the membership goes (`trellis federation leave`).
//!
//! What to publish is a pure function of the inventory ([`publication`]); the loop here does the
//! file reads and starts and stops the sync.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::slice::key_of;
use trellis_federation::records::{
    ClusterRecord, EndpointRecord, EndpointsRecord, Gateway, GatewayGroup, ServicePort, ServiceRecord, GATEWAY_NODE,
};
use trellis_federation::sync::{self, EtcdConfig, Publication, SyncState};
use trellis_federation::view::Federation;
use trellis_identity::{SpiffeId, TrustBundle};
use trellis_mesh::inventory::{FederationObj, Inventory, Protocol, WorkloadObj};
use trellis_mesh::model::{
    is_enrolled, selects, ClusterInfo, ClusterWeights, EndpointChunk, Entry, Remote, RemoteEndpoints, ServerSlice,
};

use crate::discovery::Discovered;
use crate::metrics::Metrics;

/// The label that exports a Service to the federation.
pub const GLOBAL: &str = "trellis.io/global";
/// The largest etcd credential file read.
const MAX_CREDENTIAL_BYTES: u64 = 1024 * 1024;

/// The federation as `/status` shows it.
#[derive(Debug, Clone, Default)]
pub struct FederationStatus {
    /// The membership in force, if the cluster joined.
    pub membership: Option<Arc<FederationObj>>,
    /// Why the membership in the manifests is not in force (bad credentials, two of them, ...).
    pub error: Option<String>,
    /// The sync's state while it runs.
    pub sync: Option<SyncState>,
    /// What the federation holds that this cluster cannot use, with why: a member's endpoints
    /// it cannot reach, a traffic record that fails its checks.
    pub problems: Vec<String>,
}

/// The membership for `cluster` in `inv`: none, the one, or why it cannot be used.
pub fn membership(inv: &Inventory, cluster: &str) -> Result<Option<Arc<FederationObj>>, String> {
    let mut all = inv.federations.values();
    let Some((first, _)) = all.next() else { return Ok(None) };
    if all.next().is_some() {
        let names: Vec<&String> = inv.federations.keys().collect();
        return Err(format!(
            "more than one Federation ({names:?}): remove all but one; not joining"
        ));
    }
    if first.cluster != cluster {
        return Err(format!(
            "Federation {:?} is for cluster {:?}, and this trellisd runs cluster {cluster:?}; not joining",
            first.name, first.cluster
        ));
    }
    Ok(Some(first.clone()))
}

/// What this cluster publishes: its record, `bundle_json`, and every Service labelled
/// `trellis.io/global=true` with its ready, enrolled endpoints.
pub fn publication(
    inv: &Inventory,
    membership: &FederationObj,
    cluster: &ClusterInfo,
    bundle_json: &str,
) -> Publication {
    let record = ClusterRecord {
        name: cluster.name.clone(),
        trust_domain: cluster.trust_domain.to_string(),
        network: membership.network.clone(),
        region: membership.region.clone(),
        zone: membership.zone.clone(),
        gateway: membership.gateway.map(|(address, hbone_port, quic_port)| Gateway {
            address,
            hbone_port,
            quic_port,
            node: GATEWAY_NODE.into(),
        }),
    };
    let mut services = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    for (key, (svc, _)) in &inv.services {
        if svc.labels.get(GLOBAL).map(String::as_str) != Some("true") || svc.selector.is_empty() {
            continue;
        }
        let ports = svc
            .ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                port: p.port,
                target_port: p.target_port,
                app_protocol: match p.protocol {
                    Protocol::Tcp => String::new(),
                    Protocol::Http => "http".into(),
                    Protocol::Http2 => "http2".into(),
                    Protocol::Grpc => "grpc".into(),
                },
            })
            .collect();
        let hostname = format!("{}.{}.svc.{}", key.name, key.namespace, cluster.domain);
        let id = (key.namespace.clone(), key.name.clone());
        services.insert(
            id.clone(),
            ServiceRecord {
                ports,
                hostnames: vec![hostname],
            },
        );
        let ns_labels = inv.namespaces.get(&key.namespace).map(|(n, _)| &n.labels);
        let ready: Vec<(SpiffeId, &WorkloadObj)> = inv
            .workloads
            .values()
            .map(|(w, _)| w)
            .filter(|w| w.key.namespace == key.namespace && w.ready && is_enrolled(w, ns_labels))
            .filter(|w| selects(&svc.selector, &w.labels))
            .filter_map(|w| {
                let identity = SpiffeId::workload(&cluster.trust_domain, &w.key.namespace, &w.service_account).ok()?;
                Some((identity, &**w))
            })
            .collect();
        // Behind a gateway the pods' addresses stay in the cluster: only how many answer to
        // each identity leaves it.
        let record = if membership.gateway.is_some() {
            let mut counts: BTreeMap<String, u32> = BTreeMap::new();
            for (identity, _) in &ready {
                *counts.entry(identity.to_string()).or_default() += 1;
            }
            EndpointsRecord {
                endpoints: Vec::new(),
                behind_gateway: counts
                    .into_iter()
                    .map(|(identity, count)| GatewayGroup { identity, count })
                    .collect(),
            }
        } else {
            EndpointsRecord {
                endpoints: ready
                    .iter()
                    .filter_map(|(identity, w)| {
                        Some(EndpointRecord {
                            address: w.ip,
                            identity: identity.to_string(),
                            node: w.node.clone(),
                            node_address: trellis_mesh::model::tunnel_address(w)?,
                            zone: w.zone.clone(),
                        })
                    })
                    .collect(),
                behind_gateway: Vec::new(),
            }
        };
        endpoints.insert(id, record);
    }
    Publication {
        cluster: record,
        bundle_json: bundle_json.to_string(),
        services,
        endpoints,
    }
}

/// The cluster-scoped resources every node gets from the federation: a TrustBundle for every
/// other granted trust domain whose bundle is in etcd, and a RemoteCluster for every other live
/// member (this cluster's own bundle comes from its CA, never from etcd).
pub fn remote_entries(federation: &Federation, cluster: &ClusterInfo) -> ServerSlice {
    let mut out = ServerSlice::new();
    // Trust follows the granted bundles, live member or not (see `trellis_federation::view`).
    for (td, (name, b)) in &federation.trusted {
        if name == &cluster.name || td == &cluster.trust_domain {
            continue;
        }
        let resource = pb::Resource {
            kind: Some(Variant::TrustBundle(pb::TrustBundle {
                trust_domain: td.to_string(),
                x509_authorities: b.x509_authorities.iter().map(|c| c.to_vec()).collect(),
                sequence: b.sequence,
                refresh_hint_seconds: b.refresh_hint_secs,
            })),
        };
        if let Some(key) = key_of(&resource) {
            out.insert(key.clone(), Arc::new(Entry::new(key, resource)));
        }
    }
    for (name, m) in &federation.members {
        if name == &cluster.name || m.trust_domain == cluster.trust_domain {
            continue;
        }
        let gateway = m.record.gateway.as_ref();
        let remote = pb::Resource {
            kind: Some(Variant::RemoteCluster(pb::RemoteCluster {
                name: name.clone(),
                trust_domain: m.trust_domain.to_string(),
                network: m.record.network.clone(),
                locality: Some(pb::Locality {
                    region: m.record.region.clone(),
                    zone: m.record.zone.clone(),
                }),
                gateway_address: gateway
                    .map(|g| trellis_api::addr::to_bytes(g.address))
                    .unwrap_or_default(),
                gateway_hbone_port: gateway.map_or(0, |g| u32::from(g.hbone_port)),
                gateway_quic_port: gateway.and_then(|g| g.quic_port).map_or(0, u32::from),
                healthy: true,
            })),
        };
        if let Some(key) = key_of(&remote) {
            out.insert(key.clone(), Arc::new(Entry::new(key, remote)));
        }
    }
    out
}

/// The cluster weights of every service with a `traffic/<ns>/<name>` record (traffic
/// shifting), for [`trellis_mesh::model::with_remote`], which gives them to that service only
/// where it is global. A record that fails its checks is left out (its service follows
/// locality), with a line in the returned problems. The view refuses such a value when it
/// arrives and keeps the key's last good one, so this is the last guard, not the first.
pub fn traffic_weights(federation: &Federation) -> (ClusterWeights, Vec<String>) {
    let mut weights = ClusterWeights::new();
    let mut problems = Vec::new();
    for ((ns, name), record) in &federation.traffic {
        match record.check() {
            Ok(()) => {
                weights.insert((ns.clone(), name.clone()), record.weights.clone());
            }
            Err(why) => problems.push(format!(
                "{}: {why}; ignored: {ns}/{name} follows locality",
                trellis_federation::keys::traffic(ns, name)
            )),
        }
    }
    (weights, problems)
}

/// Endpoint lists already converted, by (cluster, namespace, name), with the record and the
/// member's record they were made from: [`remote_endpoints`] reuses one (the same pointer) while
/// both are unchanged, so a change in one cluster's service costs that service, not the
/// federation.
#[derive(Debug, Default)]
pub struct Converted(BTreeMap<ServiceOf, (Arc<EndpointsRecord>, ClusterRecord, EndpointChunk)>);

/// (cluster, namespace, name) of a service.
type ServiceOf = (String, String, String);

/// How this cluster's nodes reach one member's endpoints.
enum Reach<'a> {
    /// Through their nodes: the member is on this cluster's network.
    Direct,
    /// Through the member's gateway, which presents this identity.
    Gateway(&'a Gateway, SpiffeId),
}

/// The endpoints other live members publish for each global service, as this cluster's nodes
/// dial them: a member on `network` (this cluster's) by its pods' addresses through their nodes;
/// a member with a gateway through that gateway, one endpoint per identity standing for all the
/// pods behind it. A member on another network without a gateway cannot be reached: its
/// endpoints are left out, with a line in the returned problems. `cache` keeps what is
/// unchanged from one call to the next.
pub fn remote_endpoints(
    federation: &Federation,
    cluster: &ClusterInfo,
    network: &str,
    cache: &mut Converted,
) -> (RemoteEndpoints, Vec<String>) {
    let mut out = RemoteEndpoints::new();
    let mut problems = Vec::new();
    let mut kept = Converted::default();
    for (name, m) in &federation.members {
        if name == &cluster.name || m.trust_domain == cluster.trust_domain {
            continue;
        }
        let gateway = match &m.record.gateway {
            Some(g) => match g.identity(&m.trust_domain) {
                Ok(id) => Some((g, id)),
                Err(e) => {
                    problems.push(format!("cluster {name}: {e}; its gateway is not used"));
                    None
                }
            },
            None => None,
        };
        for ((ns, svc), record) in &m.endpoints {
            if !m.services.contains_key(&(ns.clone(), svc.clone())) {
                continue;
            }
            let reach = if !record.endpoints.is_empty() {
                if m.record.network != network {
                    problems.push(format!(
                        "cluster {name} lists pods of {ns}/{svc} on network {}, not this cluster's {network}, and has no gateway here; not reachable",
                        m.record.network
                    ));
                    continue;
                }
                Reach::Direct
            } else if record.behind_gateway.is_empty() {
                continue;
            } else {
                match &gateway {
                    Some((g, id)) => Reach::Gateway(g, id.clone()),
                    None => {
                        problems.push(format!(
                            "cluster {name} counts endpoints of {ns}/{svc} behind a gateway it does not publish; not reachable"
                        ));
                        continue;
                    }
                }
            };
            let key = (name.clone(), ns.clone(), svc.clone());
            let chunk = match cache.0.remove(&key) {
                Some((r, c, chunk)) if Arc::ptr_eq(&r, record) && c == m.record => chunk,
                _ => Arc::new(convert(name, ns, &m.record, record, &reach)),
            };
            out.entry((ns.clone(), svc.clone())).or_default().push(chunk.clone());
            kept.0.insert(key, (record.clone(), m.record.clone(), chunk));
        }
    }
    *cache = kept;
    (out, problems)
}

/// One member's endpoints of one service, as this cluster's nodes dial them.
fn convert(name: &str, ns: &str, member: &ClusterRecord, record: &EndpointsRecord, reach: &Reach) -> Vec<pb::Endpoint> {
    let locality = |zone: &str| {
        Some(pb::Locality {
            region: member.region.clone(),
            zone: if zone.is_empty() {
                member.zone.clone()
            } else {
                zone.to_string()
            },
        })
    };
    match reach {
        Reach::Direct => record
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                workload_name: format!("{name}/{}", e.address),
                workload_namespace: ns.to_string(),
                cluster: name.to_string(),
                address: trellis_api::addr::to_bytes(e.address),
                node: e.node.clone(),
                healthy: true,
                locality: locality(&e.zone),
                identity: e.identity.clone(),
                enrolled: true,
                node_address: trellis_api::addr::to_bytes(e.node_address),
                ..Default::default()
            })
            .collect(),
        Reach::Gateway(g, gateway_id) => record
            .behind_gateway
            .iter()
            .map(|group| pb::Endpoint {
                workload_name: format!("{name}/gateway"),
                workload_namespace: ns.to_string(),
                cluster: name.to_string(),
                address: trellis_api::addr::to_bytes(g.address),
                node: g.node.clone(),
                healthy: true,
                locality: locality(""),
                identity: group.identity.clone(),
                enrolled: true,
                node_address: trellis_api::addr::to_bytes(g.address),
                gateway_identity: gateway_id.to_string(),
                gateway_port: u32::from(g.hbone_port),
                weight: group.count,
            })
            .collect(),
    }
}

/// Reads a credential file named by the membership: a regular file of sane size.
fn read_credential(what: &str, path: &str) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{what} {path}: {e}"))?;
    if !meta.is_file() || meta.len() > MAX_CREDENTIAL_BYTES {
        return Err(format!(
            "{what} {path}: not a regular file of at most {MAX_CREDENTIAL_BYTES} bytes"
        ));
    }
    std::fs::read(path).map_err(|e| format!("{what} {path}: {e}"))
}

fn etcd_config(m: &FederationObj) -> Result<EtcdConfig, String> {
    Ok(EtcdConfig {
        endpoints: m.etcd_endpoints.clone(),
        ca_pem: read_credential("etcd CA file", &m.etcd_ca_file)?,
        cert_pem: read_credential("etcd certificate file", &m.etcd_cert_file)?,
        key_pem: read_credential("etcd key file", &m.etcd_key_file)?,
    })
}

/// Follows discovery until it stops: joins, follows and leaves as the membership comes and goes.
/// The status, and the cluster-scoped resources for the model ([`remote_entries`]).
pub fn spawn(
    cluster: ClusterInfo,
    roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    mut discovered: watch::Receiver<Arc<Discovered>>,
    metrics: Arc<Metrics>,
) -> (watch::Receiver<FederationStatus>, watch::Receiver<Arc<Remote>>) {
    let (status_tx, status_rx) = watch::channel(FederationStatus::default());
    let (remote_tx, remote_rx) = watch::channel(Arc::new(Remote::default()));
    let bundle_json = TrustBundle::new(cluster.trust_domain.clone(), roots).to_json();
    tokio::spawn(async move {
        // The running sync: its membership, the publication it writes, its state, its task.
        type Running = (
            Arc<FederationObj>,
            watch::Sender<Option<Publication>>,
            watch::Receiver<SyncState>,
            tokio::task::JoinHandle<()>,
        );
        let mut running: Option<Running> = None;
        let mut refused: std::collections::BTreeSet<(String, String)> = Default::default();
        // What the federation holds that the mesh leaves out, as last logged.
        let mut left_out: Vec<String> = Vec::new();
        let mut converted = Converted::default();
        loop {
            let d = discovered.borrow_and_update().clone();
            if d.synced {
                let wanted = membership(&d.inventory, &cluster.name);
                let keep = matches!((&running, &wanted), (Some((m, _, _, _)), Ok(Some(w))) if m == w);
                if !keep {
                    if let Some((m, publication, _, task)) = running.take() {
                        // The sync removes this cluster's keys and ends once its publication goes;
                        // a new membership starts only after (its writes must not race the deletes).
                        drop(publication);
                        tracing::info!(federation = %m.name, "leaving the federation");
                        if tokio::time::timeout(std::time::Duration::from_secs(15), task)
                            .await
                            .is_err()
                        {
                            tracing::warn!("leaving took more than 15 s (etcd unreachable?); this cluster's keys may stay until its lease expires");
                        }
                    }
                    let error = match &wanted {
                        Err(e) => Some(e.clone()),
                        Ok(None) => None,
                        Ok(Some(m)) => match etcd_config(m) {
                            Err(e) => Some(e),
                            Ok(config) => {
                                let first = publication(&d.inventory, m, &cluster, &bundle_json);
                                let (tx, rx) = watch::channel(Some(first));
                                let (state, task) = sync::spawn(config, rx);
                                tracing::info!(etcd = ?m.etcd_endpoints, "joining the federation");
                                running = Some((m.clone(), tx, state, task));
                                None
                            }
                        },
                    };
                    if let Some(e) = &error {
                        tracing::warn!(error = %e, "federation membership not in force");
                    }
                    status_tx.send_modify(|s| {
                        s.error = error;
                        s.membership = running.as_ref().map(|(m, _, _, _)| m.clone());
                        s.sync = None;
                        s.problems.clear();
                    });
                } else if let Some((m, sender, _, _)) = &running {
                    let next = publication(&d.inventory, m, &cluster, &bundle_json);
                    sender.send_if_modified(|p| {
                        let changed = p.as_ref() != Some(&next);
                        *p = Some(next);
                        changed
                    });
                }
            }
            // Wake on a discovery change or a change of the sync's state.
            let sync_changed = async {
                match running.as_mut() {
                    Some((_, _, state, _)) => state.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = discovered.changed() => if changed.is_err() { return },
                alive = sync_changed => if !alive { running = None },
            }
            let remote = match &running {
                Some((m, _, state, _)) => {
                    let now = state.borrow().clone();
                    let (endpoints, mut problems) =
                        remote_endpoints(&now.federation, &cluster, &m.network, &mut converted);
                    let (weights, ignored) = traffic_weights(&now.federation);
                    problems.extend(ignored);
                    for p in problems.iter().filter(|p| !left_out.contains(p)) {
                        tracing::warn!(problem = %p, "federation state left out of the mesh");
                    }
                    left_out = problems;
                    let remote = Remote {
                        entries: remote_entries(&now.federation, &cluster),
                        endpoints,
                        weights,
                    };
                    let problems: std::collections::BTreeSet<(String, String)> =
                        now.federation.problems.iter().cloned().collect();
                    for (key, why) in problems.difference(&refused) {
                        tracing::warn!(%key, %why, "federation key refused; the last good state stays");
                    }
                    refused = problems;
                    metrics.federation_joined.set(1);
                    metrics
                        .federation_synced
                        .set(i64::from(now.synced && now.stale_since.is_none()));
                    metrics.federation_stale.set(i64::from(now.stale_since.is_some()));
                    metrics.federation_members.set(now.federation.members.len() as i64);
                    metrics.federation_refused_keys.set(refused.len() as i64);
                    status_tx.send_modify(|s| {
                        s.sync = Some(now);
                        s.problems = left_out.clone();
                    });
                    remote
                }
                // Not a member (or left): no other cluster's bundle is trusted any more.
                None => {
                    for gauge in [
                        &metrics.federation_joined,
                        &metrics.federation_synced,
                        &metrics.federation_stale,
                        &metrics.federation_members,
                        &metrics.federation_refused_keys,
                    ] {
                        gauge.set(0);
                    }
                    refused.clear();
                    left_out.clear();
                    status_tx.send_if_modified(|s| !std::mem::take(&mut s.problems).is_empty());
                    Remote::default()
                }
            };
            remote_tx.send_if_modified(|r| {
                let changed = !r.same(&remote);
                if changed {
                    *r = Arc::new(remote);
                }
                changed
            });
        }
    });
    (status_rx, remote_rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_mesh::manifest::parse_file;

    const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {trellis.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: demo, labels: {trellis.io/global: "true"}}
spec: {selector: {app: hello}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: demo}
spec: {selector: {app: hello}, ports: [{port: 81, targetPort: 8080}]}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: hello-1, namespace: demo, labels: {app: hello}}
spec: {serviceAccount: hello, node: node-1, nodeIP: 10.1.0.11, ip: 10.1.1.10, ready: true, zone: a}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: hello-2, namespace: demo, labels: {app: hello}}
spec: {serviceAccount: hello, node: node-2, ip: 10.1.2.10, ready: false}
---
apiVersion: trellis.io/v1
kind: Federation
metadata: {name: membership}
spec:
  cluster: east
  etcd: {endpoints: ["https://127.0.0.1:2379"], caFile: /ca.pem, certFile: /c.pem, keyFile: /k.pem}
  region: eu-1
  gateway: {address: 10.1.0.20}
"#;

    fn cluster() -> ClusterInfo {
        ClusterInfo {
            name: "east".into(),
            trust_domain: "east.trellis.local".parse().unwrap(),
            network: "east".into(),
            domain: "cluster.local".into(),
        }
    }

    #[test]
    fn only_global_services_are_published_with_their_ready_enrolled_endpoints() {
        let inv = parse_file(MANIFESTS).unwrap();
        let m = membership(&inv, "east").unwrap().unwrap();
        assert_eq!(m.gateway.map(|g| g.1), Some(15008), "the HBONE port defaults to 15008");
        let p = publication(&inv, &m, &cluster(), "{}");
        let key = ("demo".to_string(), "hello".to_string());
        assert_eq!(
            p.services.keys().collect::<Vec<_>>(),
            [&key],
            "an unlabelled service stays home"
        );
        assert_eq!(p.services[&key].hostnames, ["hello.demo.svc.cluster.local"]);
        // Behind its gateway the cluster counts its ready endpoints per identity, no addresses.
        let counted = &p.endpoints[&key];
        assert!(counted.endpoints.is_empty(), "{counted:?}");
        assert_eq!(
            counted.behind_gateway,
            [GatewayGroup {
                identity: "spiffe://east.trellis.local/ns/demo/sa/hello".into(),
                count: 1
            }],
            "the unready workload is left out"
        );
        // Without a gateway it lists its pods, with the nodes that tunnel to them.
        let flat = FederationObj {
            gateway: None,
            ..(*m).clone()
        };
        let p = publication(&inv, &flat, &cluster(), "{}");
        let eps = &p.endpoints[&key].endpoints;
        assert_eq!(eps.len(), 1, "the unready workload is left out");
        assert_eq!(eps[0].identity, "spiffe://east.trellis.local/ns/demo/sa/hello");
        assert_eq!(
            (
                eps[0].address.to_string(),
                eps[0].node_address.to_string(),
                eps[0].zone.as_str()
            ),
            ("10.1.1.10".into(), "10.1.0.11".into(), "a")
        );
        assert_eq!(p.cluster.region, "eu-1");
        assert_eq!(p.cluster.network, "east", "the network defaults to the cluster's name");
    }

    #[test]
    fn a_membership_for_another_cluster_or_two_of_them_is_refused() {
        let inv = parse_file(MANIFESTS).unwrap();
        let e = membership(&inv, "west").unwrap_err();
        assert!(e.contains("is for cluster \"east\""), "{e}");
        let two = format!(
            "{MANIFESTS}---\n{}",
            &MANIFESTS[MANIFESTS.find("apiVersion: trellis.io/v1\nkind: Federation").unwrap()..]
                .replace("name: membership", "name: other")
        );
        let inv = parse_file(&two).unwrap();
        assert!(membership(&inv, "east")
            .unwrap_err()
            .contains("more than one Federation"));
        let plain = parse_file("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n").unwrap();
        assert_eq!(membership(&plain, "east"), Ok(None));
    }

    #[test]
    fn a_membership_without_tls_is_refused_at_parse() {
        let text = MANIFESTS.replace("https://127.0.0.1:2379", "http://127.0.0.1:2379");
        let e = parse_file(&text).unwrap_err();
        assert!(e.message.contains("is not https://"), "{e}");
    }

    /// A federation as this cluster (east, network "east") reads it: west on another network
    /// behind its gateway, north on east's network without one, south on another network
    /// without one.
    fn members() -> Federation {
        use trellis_federation::view::Member;
        let member = |name: &str, network: &str, gateway: bool, record: EndpointsRecord| {
            let td: trellis_identity::TrustDomain = format!("{name}.trellis.local").parse().unwrap();
            let key = ("demo".to_string(), "hello".to_string());
            let service = ServiceRecord {
                ports: vec![ServicePort {
                    name: String::new(),
                    port: 80,
                    target_port: 8080,
                    app_protocol: String::new(),
                }],
                hostnames: vec![],
            };
            Member {
                record: ClusterRecord {
                    name: name.into(),
                    trust_domain: td.to_string(),
                    network: network.into(),
                    region: "eu-1".into(),
                    zone: String::new(),
                    gateway: gateway.then(|| Gateway {
                        address: "10.200.0.12".parse().unwrap(),
                        hbone_port: 15008,
                        quic_port: None,
                        node: GATEWAY_NODE.into(),
                    }),
                },
                trust_domain: td,
                bundle: None,
                services: BTreeMap::from([(key.clone(), service)]),
                endpoints: BTreeMap::from([(key, Arc::new(record))]),
            }
        };
        let pods = |name: &str| EndpointsRecord {
            endpoints: vec![EndpointRecord {
                address: "10.3.1.10".parse().unwrap(),
                identity: format!("spiffe://{name}.trellis.local/ns/demo/sa/hello"),
                node: "node-1".into(),
                node_address: "10.3.0.11".parse().unwrap(),
                zone: String::new(),
            }],
            behind_gateway: Vec::new(),
        };
        let counted = EndpointsRecord {
            endpoints: Vec::new(),
            behind_gateway: vec![GatewayGroup {
                identity: "spiffe://west.trellis.local/ns/demo/sa/hello".into(),
                count: 3,
            }],
        };
        Federation {
            members: BTreeMap::from([
                ("west".into(), member("west", "west", true, counted)),
                ("north".into(), member("north", "east", false, pods("north"))),
                ("south".into(), member("south", "south", false, pods("south"))),
            ]),
            ..Federation::default()
        }
    }

    #[test]
    fn traffic_records_become_weights_and_a_bad_one_is_ignored_naming_its_key() {
        use trellis_federation::records::TrafficRecord;
        let record = |w: &[(&str, u32)]| TrafficRecord {
            weights: w.iter().map(|(c, w)| (c.to_string(), *w)).collect(),
        };
        let hello = ("demo".to_string(), "hello".to_string());
        let federation = Federation {
            traffic: BTreeMap::from([
                (hello.clone(), record(&[("east", 90), ("west", 10)])),
                (("demo".to_string(), "broken".to_string()), record(&[("east", 0)])),
            ]),
            ..Federation::default()
        };
        let (weights, problems) = traffic_weights(&federation);
        assert_eq!(weights.keys().collect::<Vec<_>>(), [&hello]);
        assert_eq!(
            weights[&hello],
            BTreeMap::from([("east".to_string(), 90), ("west".to_string(), 10)])
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("/trellis/v1/traffic/demo/broken: every weight is 0")
                && problems[0].contains("demo/broken follows locality"),
            "{problems:?}"
        );
    }

    #[test]
    fn remote_endpoints_are_pods_on_this_network_and_gateways_elsewhere() {
        let mut cache = Converted::default();
        let federation = members();
        let (eps, problems) = remote_endpoints(&federation, &cluster(), "east", &mut cache);
        let key = ("demo".to_string(), "hello".to_string());
        let chunks = &eps[&key];
        let (again, _) = remote_endpoints(&federation, &cluster(), "east", &mut cache);
        assert!(
            chunks.iter().zip(&again[&key]).all(|(a, b)| Arc::ptr_eq(a, b)),
            "unchanged records: the same chunks, not converted again"
        );
        let (fresh, _) = remote_endpoints(&members(), &cluster(), "east", &mut cache);
        assert!(
            !chunks.iter().zip(&fresh[&key]).any(|(a, b)| Arc::ptr_eq(a, b)),
            "new records: converted again"
        );
        let hello: Vec<pb::Endpoint> = chunks.iter().flat_map(|c| c.iter().cloned()).collect();
        let north: Vec<_> = hello.iter().filter(|e| e.cluster == "north").collect();
        assert_eq!(north.len(), 1);
        assert!(
            north[0].gateway_identity.is_empty(),
            "same network: dialled through its node"
        );
        assert_eq!(north[0].node_address, vec![10, 3, 0, 11]);
        let west: Vec<_> = hello.iter().filter(|e| e.cluster == "west").collect();
        assert_eq!(west.len(), 1, "one endpoint per identity behind the gateway");
        assert_eq!(
            west[0].gateway_identity,
            "spiffe://west.trellis.local/trellis/node/east-west-gateway"
        );
        assert_eq!(
            (west[0].address.clone(), west[0].gateway_port, west[0].weight),
            (vec![10, 200, 0, 12], 15008, 3)
        );
        assert_eq!(west[0].identity, "spiffe://west.trellis.local/ns/demo/sa/hello");
        assert!(hello.iter().all(|e| e.cluster != "south"), "unreachable: left out");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("cluster south") && p.contains("not reachable")),
            "{problems:?}"
        );
    }
}
