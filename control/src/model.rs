//! The mesh model: pure functions from what discovery found to what the mesh is (enrolment,
//! identities, service endpoints, waypoint bindings, policies) and to the slice of it each
//! node needs. No I/O here; every rule is unit-tested with plain data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_identity::{SpiffeId, TrustDomain};

use crate::discovery::{Inventory, ObjectKey, PolicyAction, WorkloadObj};

/// Namespace (or pod, to override) label that enrols workloads: value `ambient`; a pod label
/// `none` opts one pod out.
pub const DATAPLANE_MODE: &str = "trellis.io/dataplane-mode";
/// Namespace or service label naming the waypoint that handles its L7 traffic.
pub const USE_WAYPOINT: &str = "trellis.io/use-waypoint";
/// Service label exporting it to the federation.
pub const GLOBAL: &str = "trellis.io/global";

/// Facts about this cluster the model needs.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub name: String,
    pub trust_domain: TrustDomain,
    pub network: String,
    /// DNS suffix of service hostnames, e.g. `cluster.local`.
    pub domain: String,
}

/// Identifies a resource in the config stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResKey {
    pub kind: pb::Kind,
    pub name: String,
}

impl ResKey {
    fn new(kind: pb::Kind, key: &ObjectKey) -> Self {
        Self {
            kind,
            name: key.to_string(),
        }
    }

    pub fn to_proto(&self) -> pb::ResourceKey {
        pb::ResourceKey {
            kind: self.kind as i32,
            name: self.name.clone(),
        }
    }
}

/// One node's view: every resource it should hold, by key.
pub type Slice = BTreeMap<ResKey, Arc<pb::Resource>>;

/// The whole mesh of one cluster, as trellisd serves it.
#[derive(Debug, Clone, Default)]
pub struct MeshModel {
    pub workloads: BTreeMap<ObjectKey, Arc<pb::Resource>>,
    pub services: BTreeMap<ObjectKey, Arc<pb::Resource>>,
    pub policies: BTreeMap<ObjectKey, Arc<pb::Resource>>,
    pub waypoints: BTreeMap<ObjectKey, Arc<pb::Resource>>,
    pub routes: BTreeMap<ObjectKey, Arc<pb::Resource>>,
    /// Workloads scheduled on each node.
    pub by_node: BTreeMap<String, Vec<ObjectKey>>,
    /// SPIFFE IDs of the workloads scheduled on each node: what the CA may issue to it.
    pub identities_by_node: BTreeMap<String, BTreeSet<String>>,
    /// Policy selectors, to find the policies that apply to a node's workloads.
    policy_scope: BTreeMap<ObjectKey, BTreeMap<String, String>>,
    /// Workload labels, for the same purpose.
    workload_labels: BTreeMap<ObjectKey, BTreeMap<String, String>>,
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a workload is enrolled: its own label wins, then its namespace's.
pub fn is_enrolled(workload: &WorkloadObj, namespace_labels: Option<&BTreeMap<String, String>>) -> bool {
    match workload.labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some("ambient") => true,
        Some(_) => false,
        None => namespace_labels.and_then(|l| l.get(DATAPLANE_MODE)).map(String::as_str) == Some("ambient"),
    }
}

/// `<namespace>/<name>` of the waypoint named by `trellis.io/use-waypoint` on the object or,
/// failing that, its namespace; empty for none (or the value `none`).
fn waypoint_for(
    own: &BTreeMap<String, String>,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> String {
    let name = own
        .get(USE_WAYPOINT)
        .or_else(|| namespace_labels.and_then(|l| l.get(USE_WAYPOINT)));
    match name.map(String::as_str) {
        None | Some("") | Some("none") => String::new(),
        Some(n) => format!("{namespace}/{n}"),
    }
}

fn locality(region: &str, zone: &str) -> Option<pb::Locality> {
    (!region.is_empty() || !zone.is_empty()).then(|| pb::Locality {
        region: region.to_string(),
        zone: zone.to_string(),
    })
}

/// Keeps the previous `Arc` when the new resource is equal, so unchanged resources stay
/// pointer-equal across rebuilds and slices diff cheaply.
fn intern(
    previous: Option<&BTreeMap<ObjectKey, Arc<pb::Resource>>>,
    key: &ObjectKey,
    fresh: pb::Resource,
) -> Arc<pb::Resource> {
    match previous.and_then(|p| p.get(key)) {
        Some(old) if **old == fresh => old.clone(),
        _ => Arc::new(fresh),
    }
}

/// Builds the mesh model from an inventory. `previous` lets unchanged resources keep their
/// identity.
pub fn build(inv: &Inventory, cluster: &ClusterInfo, previous: Option<&MeshModel>) -> MeshModel {
    let mut model = MeshModel::default();
    let ns_labels = |ns: &str| inv.namespaces.get(ns).map(|(n, _)| &n.labels);

    for (key, (w, _)) in &inv.workloads {
        let labels = ns_labels(&key.namespace);
        let identity = SpiffeId::workload(&cluster.trust_domain, &key.namespace, &w.service_account)
            .map(|id| id.to_string())
            .unwrap_or_default();
        let resource = pb::Resource {
            kind: Some(Variant::Workload(pb::Workload {
                uid: format!("{}/{key}", cluster.name),
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                cluster: cluster.name.clone(),
                network: cluster.network.clone(),
                addresses: vec![w.ip.to_string()],
                labels: w.labels.clone().into_iter().collect(),
                ready: w.ready,
                enrolled: is_enrolled(w, labels),
                identity: identity.clone(),
                waypoint: waypoint_for(&w.labels, &key.namespace, labels),
                locality: locality(&w.region, &w.zone),
            })),
        };
        model
            .workloads
            .insert(key.clone(), intern(previous.map(|p| &p.workloads), key, resource));
        model.by_node.entry(w.node.clone()).or_default().push(key.clone());
        model
            .identities_by_node
            .entry(w.node.clone())
            .or_default()
            .insert(identity);
        model.workload_labels.insert(key.clone(), w.labels.clone());
    }

    for (key, (s, _)) in &inv.services {
        let labels = ns_labels(&key.namespace);
        // A service without a selector has no discovered endpoints (as in Kubernetes).
        let endpoints = if s.selector.is_empty() {
            Vec::new()
        } else {
            inv.workloads
                .range(ObjectKey::new(&key.namespace, "")..)
                .take_while(|(k, _)| k.namespace == key.namespace)
                .filter(|(_, (w, _))| selects(&s.selector, &w.labels))
                .map(|(wk, (w, _))| pb::Endpoint {
                    workload_uid: format!("{}/{wk}", cluster.name),
                    address: w.ip.to_string(),
                    node: w.node.clone(),
                    healthy: w.ready,
                    locality: locality(&w.region, &w.zone),
                    identity: SpiffeId::workload(&cluster.trust_domain, &wk.namespace, &w.service_account)
                        .map(|id| id.to_string())
                        .unwrap_or_default(),
                    enrolled: is_enrolled(w, labels),
                })
                .collect()
        };
        let resource = pb::Resource {
            kind: Some(Variant::Service(pb::Service {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                hostname: format!("{}.{}.svc.{}", key.name, key.namespace, cluster.domain),
                vips: s.vips.iter().map(|v| v.to_string()).collect(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| pb::ServicePort {
                        name: p.name.clone(),
                        port: p.port.into(),
                        target_port: p.target_port.into(),
                        protocol: p.protocol.clone(),
                    })
                    .collect(),
                endpoints,
                global: s.labels.get(GLOBAL).map(String::as_str) == Some("true"),
                waypoint: waypoint_for(&s.labels, &key.namespace, labels),
            })),
        };
        model
            .services
            .insert(key.clone(), intern(previous.map(|p| &p.services), key, resource));
    }

    for (key, (p, _)) in &inv.policies {
        let resource = pb::Resource {
            kind: Some(Variant::AuthorizationPolicy(pb::AuthorizationPolicy {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                action: match p.action {
                    PolicyAction::Allow => pb::Action::Allow as i32,
                    PolicyAction::Deny => pb::Action::Deny as i32,
                },
                selector: p.selector.clone().into_iter().collect(),
                rules: p
                    .rules
                    .iter()
                    .map(|r| pb::PolicyRule {
                        principals: r.principals.clone(),
                        namespaces: r.namespaces.clone(),
                        ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                        not_principals: r.not_principals.clone(),
                        not_namespaces: r.not_namespaces.clone(),
                    })
                    .collect(),
            })),
        };
        model
            .policies
            .insert(key.clone(), intern(previous.map(|p| &p.policies), key, resource));
        model.policy_scope.insert(key.clone(), p.selector.clone());
    }

    for (key, (w, _)) in &inv.waypoints {
        let resource = pb::Resource {
            kind: Some(Variant::Waypoint(pb::Waypoint {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                addresses: w.addresses.iter().map(|a| a.to_string()).collect(),
                hbone_port: 15008,
                identity: SpiffeId::workload(&cluster.trust_domain, &key.namespace, &w.service_account)
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
            })),
        };
        model
            .waypoints
            .insert(key.clone(), intern(previous.map(|p| &p.waypoints), key, resource));
    }

    for (key, (r, _)) in &inv.routes {
        let resource = pb::Resource {
            kind: Some(Variant::HttpRoute(pb::HttpRoute {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                parents: r.parents.iter().map(|p| p.to_string()).collect(),
                hostnames: r.hostnames.clone(),
                rules: r
                    .rules
                    .iter()
                    .map(|rule| pb::HttpRouteRule {
                        matches: rule
                            .matches
                            .iter()
                            .map(|m| pb::HttpRouteMatch {
                                path_prefix: m.path_prefix.clone(),
                                path_exact: m.path_exact.clone(),
                                method: m.method.clone(),
                                headers: m.headers.clone().into_iter().collect(),
                            })
                            .collect(),
                        backends: rule
                            .backends
                            .iter()
                            .map(|b| pb::BackendRef {
                                service: b.service.name.clone(),
                                namespace: b.service.namespace.clone(),
                                port: b.port.into(),
                                weight: b.weight,
                                cluster: String::new(),
                            })
                            .collect(),
                        timeout_ms: rule.timeout_ms,
                        retries: rule.retries,
                    })
                    .collect(),
            })),
        };
        model
            .routes
            .insert(key.clone(), intern(previous.map(|p| &p.routes), key, resource));
    }
    model
}

/// What a subscriber does with its slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Ztunnel,
    Waypoint,
}

/// The slice of `model` that `node` needs: its own workloads, every service with its
/// endpoints, the policies that select one of its workloads, and the waypoints; a waypoint also
/// gets every policy and HTTPRoute. Never another node's workloads.
pub fn node_slice(model: &MeshModel, node: &str, role: Role) -> Slice {
    let mut slice = Slice::new();
    let own = model.by_node.get(node).map(Vec::as_slice).unwrap_or_default();
    for key in own {
        if let Some(r) = model.workloads.get(key) {
            slice.insert(ResKey::new(pb::Kind::Workload, key), r.clone());
        }
    }
    for (key, r) in &model.services {
        slice.insert(ResKey::new(pb::Kind::Service, key), r.clone());
    }
    for (key, r) in &model.policies {
        let applies = role == Role::Waypoint
            || own.iter().any(|w| {
                w.namespace == key.namespace
                    && model
                        .workload_labels
                        .get(w)
                        .is_some_and(|labels| model.policy_scope.get(key).is_some_and(|sel| selects(sel, labels)))
            });
        if applies {
            slice.insert(ResKey::new(pb::Kind::AuthorizationPolicy, key), r.clone());
        }
    }
    for (key, r) in &model.waypoints {
        slice.insert(ResKey::new(pb::Kind::Waypoint, key), r.clone());
    }
    if role == Role::Waypoint {
        for (key, r) in &model.routes {
            slice.insert(ResKey::new(pb::Kind::HttpRoute, key), r.clone());
        }
    }
    slice
}

/// What changed from `old` to `new`: resources to upsert and keys to remove.
pub fn diff(old: &Slice, new: &Slice) -> (Vec<Arc<pb::Resource>>, Vec<ResKey>) {
    let upserts = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_none_or(|o| !Arc::ptr_eq(o, v) && o != *v))
        .map(|(_, v)| v.clone())
        .collect();
    let removals = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    (upserts, removals)
}

/// Applies an update to a slice, as a subscriber does; pure, for tests and clients.
pub fn apply(slice: &mut Slice, update: &pb::ConfigUpdate) -> Result<(), String> {
    if update.snapshot {
        slice.clear();
    }
    for key in &update.removals {
        let kind = pb::Kind::try_from(key.kind).map_err(|_| format!("unknown kind {}", key.kind))?;
        slice.remove(&ResKey {
            kind,
            name: key.name.clone(),
        });
    }
    for r in &update.upserts {
        let key = key_of(r).ok_or("a resource with no kind")?;
        slice.insert(key, Arc::new(r.clone()));
    }
    Ok(())
}

/// The key of a resource, read off its content.
pub fn key_of(r: &pb::Resource) -> Option<ResKey> {
    let (kind, ns, name) = match r.kind.as_ref()? {
        Variant::Workload(w) => (pb::Kind::Workload, &w.namespace, &w.name),
        Variant::Service(s) => (pb::Kind::Service, &s.namespace, &s.name),
        Variant::AuthorizationPolicy(p) => (pb::Kind::AuthorizationPolicy, &p.namespace, &p.name),
        Variant::Waypoint(w) => (pb::Kind::Waypoint, &w.namespace, &w.name),
        Variant::HttpRoute(h) => (pb::Kind::HttpRoute, &h.namespace, &h.name),
        Variant::RemoteCluster(c) => {
            return Some(ResKey {
                kind: pb::Kind::RemoteCluster,
                name: c.name.clone(),
            })
        }
        Variant::TrustBundle(b) => {
            return Some(ResKey {
                kind: pb::Kind::TrustBundle,
                name: b.trust_domain.clone(),
            })
        }
    };
    Some(ResKey::new(kind, &ObjectKey::new(ns, name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::manifest::parse_file;

    fn cluster() -> ClusterInfo {
        ClusterInfo {
            name: "east".into(),
            trust_domain: TrustDomain::new("east.trellis.local").unwrap(),
            network: "east-net".into(),
            domain: "cluster.local".into(),
        }
    }

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {trellis.io/dataplane-mode: ambient, trellis.io/use-waypoint: shop-wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop, labels: {trellis.io/global: "true"}}
spec: {selector: {app: cart}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {serviceAccount: cart, node: node-1, ip: 10.1.1.5}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: cart-2, namespace: shop, labels: {app: cart, trellis.io/dataplane-mode: none}}
spec: {serviceAccount: cart, node: node-2, ip: 10.1.2.5, ready: false}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: old, namespace: legacy, labels: {app: old}}
spec: {node: node-1, ip: 10.1.1.9}
---
apiVersion: trellis.io/v1
kind: AuthorizationPolicy
metadata: {name: only-web, namespace: shop}
spec: {selector: {matchLabels: {app: cart}}, rules: [{from: {principals: [ns/shop/sa/web]}}]}
---
apiVersion: trellis.io/v1
kind: AuthorizationPolicy
metadata: {name: payments, namespace: shop}
spec: {selector: {matchLabels: {app: payments}}}
"#;

    fn workload<'a>(model: &'a MeshModel, ns: &str, name: &str) -> &'a pb::Workload {
        match model.workloads[&ObjectKey::new(ns, name)].kind.as_ref() {
            Some(Variant::Workload(w)) => w,
            _ => panic!("not a workload"),
        }
    }

    #[test]
    fn enrolment_follows_the_namespace_label_and_a_pod_can_opt_out() {
        let model = build(&parse_file(MESH).unwrap(), &cluster(), None);
        let cart1 = workload(&model, "shop", "cart-1");
        assert!(cart1.enrolled);
        assert_eq!(cart1.identity, "spiffe://east.trellis.local/ns/shop/sa/cart");
        assert_eq!(cart1.waypoint, "shop/shop-wp");
        assert!(!workload(&model, "shop", "cart-2").enrolled, "pod label none opts out");
        let old = workload(&model, "legacy", "old");
        assert!(!old.enrolled, "unlabelled namespace");
        assert_eq!(old.service_account, "default");
    }

    #[test]
    fn services_get_vips_and_endpoints_by_selector() {
        let model = build(&parse_file(MESH).unwrap(), &cluster(), None);
        let Some(Variant::Service(cart)) = model.services[&ObjectKey::new("shop", "cart")].kind.as_ref() else {
            panic!()
        };
        assert_eq!(cart.hostname, "cart.shop.svc.cluster.local");
        assert_eq!(cart.vips, vec!["10.96.0.10"]);
        assert!(cart.global);
        let eps: Vec<_> = cart
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.healthy, e.enrolled))
            .collect();
        assert_eq!(eps, vec![("10.1.1.5", true, true), ("10.1.2.5", false, false)]);
    }

    #[test]
    fn a_node_gets_its_workloads_services_and_the_policies_that_select_them() {
        let model = build(&parse_file(MESH).unwrap(), &cluster(), None);
        let slice = node_slice(&model, "node-1", Role::Ztunnel);
        let names: Vec<_> = slice.keys().map(|k| (k.kind, k.name.as_str())).collect();
        assert!(names.contains(&(pb::Kind::Workload, "shop/cart-1")));
        assert!(names.contains(&(pb::Kind::Workload, "legacy/old")));
        assert!(
            !names.contains(&(pb::Kind::Workload, "shop/cart-2")),
            "another node's workload"
        );
        assert!(names.contains(&(pb::Kind::Service, "shop/cart")));
        assert!(names.contains(&(pb::Kind::AuthorizationPolicy, "shop/only-web")));
        assert!(
            !names.contains(&(pb::Kind::AuthorizationPolicy, "shop/payments")),
            "selects nothing here"
        );
        let empty = node_slice(&model, "node-9", Role::Ztunnel);
        assert!(empty.keys().all(|k| k.kind != pb::Kind::Workload));
        assert_eq!(
            model.identities_by_node["node-2"].iter().next().unwrap(),
            "spiffe://east.trellis.local/ns/shop/sa/cart"
        );
    }

    #[test]
    fn enrolling_a_namespace_changes_exactly_its_workloads_and_endpoints() {
        let inv = parse_file(MESH).unwrap();
        let before = build(&inv, &cluster(), None);
        let enrolled = MESH.replace(
            "metadata: {name: legacy}",
            "metadata: {name: legacy, labels: {trellis.io/dataplane-mode: ambient}}",
        );
        let after = build(&parse_file(&enrolled).unwrap(), &cluster(), Some(&before));
        let old = node_slice(&before, "node-1", Role::Ztunnel);
        let new = node_slice(&after, "node-1", Role::Ztunnel);
        let (upserts, removals) = diff(&old, &new);
        assert!(removals.is_empty());
        let keys: Vec<_> = upserts.iter().map(|r| key_of(r).unwrap().name).collect();
        assert_eq!(keys, vec!["legacy/old"], "only the legacy workload changed");
        let mut replayed = old.clone();
        apply(
            &mut replayed,
            &pb::ConfigUpdate {
                version: 2,
                snapshot: false,
                upserts: upserts.iter().map(|r| (**r).clone()).collect(),
                removals: removals.iter().map(ResKey::to_proto).collect(),
            },
        )
        .unwrap();
        assert_eq!(replayed, new);
    }

    #[test]
    fn a_workload_moving_nodes_moves_its_identity() {
        let before = build(&parse_file(MESH).unwrap(), &cluster(), None);
        let moved = MESH.replace("node: node-1, ip: 10.1.1.5", "node: node-3, ip: 10.1.1.5");
        let after = build(&parse_file(&moved).unwrap(), &cluster(), Some(&before));
        let cart = "spiffe://east.trellis.local/ns/shop/sa/cart";
        assert!(before.identities_by_node["node-1"].contains(cart));
        assert!(!after.identities_by_node["node-1"].contains(cart));
        assert!(after.identities_by_node["node-3"].contains(cart));
    }
}
