//! The mesh model: pure functions from what discovery found to what the mesh is (enrolment,
//! identities, service endpoints, waypoint bindings, policies) and to the slice of it each
//! node needs. No I/O here; every rule is unit-tested with plain data.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_identity::{SpiffeId, TrustDomain};

pub use trellis_api::slice::{apply, check, key_of, ResKey, Slice};

use trellis_api::addr;

use crate::inventory::{Inventory, ObjectKey, PolicyAction, Protocol, WorkloadObj};

/// Namespace (or pod, to override) label that enrols workloads: value `ambient`; a pod label
/// `none` opts one pod out.
pub const DATAPLANE_MODE: &str = "trellis.io/dataplane-mode";
/// Namespace or service label naming the waypoint that handles its L7 traffic.
pub const USE_WAYPOINT: &str = "trellis.io/use-waypoint";
/// Workload annotation: where tunnels to it are dialled, `node` (default) or `pod`.
pub const TUNNEL_ADDRESS: &str = "trellis.io/tunnel-address";
/// Istio's pod annotation marking a pod whose traffic Istio's ztunnel captures.
pub const ISTIO_REDIRECTION: &str = "ambient.istio.io/redirection";
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

/// A resource as trellisd holds it: its key, the message, and its protobuf encoding, made once
/// per change, so that sending it to a hundred nodes copies bytes instead of re-encoding.
#[derive(Debug, PartialEq)]
pub struct Entry {
    pub key: ResKey,
    pub resource: pb::Resource,
    pub encoded: Vec<u8>,
}

impl Entry {
    pub fn new(key: ResKey, resource: pb::Resource) -> Self {
        let encoded = prost::Message::encode_to_vec(&resource);
        Self { key, resource, encoded }
    }
}

/// One node's view as the server holds it.
pub type ServerSlice = BTreeMap<ResKey, Arc<Entry>>;

/// One other cluster's endpoints of one service. Shared: while they do not change, one
/// federation state and the next hold the same pointer, which is how unchanged services are
/// told apart cheaply.
pub type EndpointChunk = Arc<Vec<pb::Endpoint>>;

/// Endpoints of global services in other clusters, by (namespace, name) of the service: one
/// chunk per cluster.
pub type RemoteEndpoints = BTreeMap<(String, String), Vec<EndpointChunk>>;

/// Traffic shifting: cluster name → weight, by (namespace, name) of a global service, as the
/// federation's `traffic/<ns>/<name>` records say (already checked).
pub type ClusterWeights = BTreeMap<(String, String), BTreeMap<String, u32>>;

/// What the federation adds to the model: cluster-scoped resources (RemoteCluster,
/// TrustBundle), the other clusters' endpoints of global services, and their cluster weights.
#[derive(Debug, Clone, Default)]
pub struct Remote {
    pub entries: ServerSlice,
    pub endpoints: RemoteEndpoints,
    pub weights: ClusterWeights,
}

impl Remote {
    /// Whether `other` holds the same: equal entries and weights, and the very same endpoint
    /// chunks.
    pub fn same(&self, other: &Remote) -> bool {
        self.entries == other.entries
            && self.weights == other.weights
            && self.endpoints.len() == other.endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(&other.endpoints)
                .all(|((k, a), (l, b))| k == l && same_chunks(a, b))
    }
}

fn same_chunks(a: &[EndpointChunk], b: &[EndpointChunk]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

/// No weights: a service that follows locality.
static NO_WEIGHTS: BTreeMap<String, u32> = BTreeMap::new();

/// Sets what the federation says of this cluster's global services: each global Service of
/// `model` gets its own cluster's endpoints followed by `remote`'s for the same namespace and
/// name (namespace sameness: one global service across clusters, as Cilium has it, exported by
/// the label in each cluster that takes part), and the cluster weights of its `traffic/` record
/// (none without one). A service that is not global here gets neither. `before` is what `model`
/// was last given, when nothing else changed since: a service whose chunks are the same
/// pointers as then, and whose weights are equal, is left as it is. Returns the namespaces
/// whose services changed.
pub fn with_remote(model: &mut MeshModel, cluster: &str, remote: &Remote, before: Option<&Remote>) -> BTreeSet<String> {
    let mut changed = BTreeSet::new();
    for (ns, n) in model.namespaces.iter_mut() {
        let mut updates = Vec::new();
        for (key, entry) in &n.services {
            let Some(Variant::Service(s)) = &entry.resource.kind else {
                continue;
            };
            let id = (key.namespace.clone(), key.name.clone());
            let others = match s.global {
                true => remote.endpoints.get(&id).map(Vec::as_slice).unwrap_or_default(),
                false => &[],
            };
            let weights = match s.global {
                true => remote.weights.get(&id).unwrap_or(&NO_WEIGHTS),
                false => &NO_WEIGHTS,
            };
            if let Some(before) = before {
                let then = before.endpoints.get(&id).map(Vec::as_slice).unwrap_or_default();
                let then_weights = before.weights.get(&id).unwrap_or(&NO_WEIGHTS);
                if s.global && same_chunks(then, others) && then_weights == weights {
                    continue;
                }
            }
            let local = s.endpoints.iter().filter(|e| e.cluster == cluster);
            let endpoints: Vec<pb::Endpoint> = local.chain(others.iter().flat_map(|c| c.iter())).cloned().collect();
            if endpoints != s.endpoints || *weights != s.cluster_weights {
                let mut s = s.clone();
                s.endpoints = endpoints;
                s.cluster_weights = weights.clone();
                let resource = pb::Resource {
                    kind: Some(Variant::Service(s)),
                };
                updates.push((key.clone(), Arc::new(Entry::new(entry.key.clone(), resource))));
            }
        }
        if !updates.is_empty() {
            let n = Arc::make_mut(n);
            n.services.extend(updates);
            changed.insert(ns.clone());
        }
    }
    changed
}

/// The resources of one namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NsModel {
    pub workloads: BTreeMap<ObjectKey, Arc<Entry>>,
    /// Where every workload of the namespace lives and who it is, one entry shared by every
    /// node (`None` for a namespace without workloads).
    pub addresses: Option<Arc<Entry>>,
    pub services: BTreeMap<ObjectKey, Arc<Entry>>,
    pub policies: BTreeMap<ObjectKey, Arc<Entry>>,
    pub waypoints: BTreeMap<ObjectKey, Arc<Entry>>,
    pub routes: BTreeMap<ObjectKey, Arc<Entry>>,
}

/// The whole mesh of one cluster, as trellisd serves it: namespace by namespace, so that an
/// unchanged namespace is carried from one version to the next as a single shared pointer.
#[derive(Debug, Clone, Default)]
pub struct MeshModel {
    pub namespaces: BTreeMap<String, Arc<NsModel>>,
    /// Workloads scheduled on each node.
    pub by_node: BTreeMap<String, Vec<Arc<Entry>>>,
    /// Cluster-scoped resources from the federation (RemoteCluster, TrustBundle), every node's.
    pub federation: ServerSlice,
}

fn node_of(entry: &Entry) -> Option<&str> {
    match &entry.resource.kind {
        Some(Variant::Workload(w)) => Some(&w.node),
        _ => None,
    }
}

impl MeshModel {
    /// Whether a workload with SPIFFE ID `identity` is scheduled on `node`: what the CA may
    /// issue to that node.
    pub fn runs_on(&self, node: &str, identity: &str) -> bool {
        self.by_node.get(node).is_some_and(|entries| {
            entries.iter().any(|e| match &e.resource.kind {
                Some(Variant::Workload(w)) => w.identity == identity,
                _ => false,
            })
        })
    }

    pub fn workload(&self, key: &ObjectKey) -> Option<&Arc<Entry>> {
        self.namespaces.get(&key.namespace)?.workloads.get(key)
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&Arc<Entry>> {
        self.namespaces.get(&key.namespace)?.services.get(key)
    }

    pub fn workloads(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<Entry>)> {
        self.namespaces.values().flat_map(|n| n.workloads.iter())
    }

    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<Entry>)> {
        self.namespaces.values().flat_map(|n| n.services.iter())
    }

    pub fn policies(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<Entry>)> {
        self.namespaces.values().flat_map(|n| n.policies.iter())
    }

    pub fn waypoints(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<Entry>)> {
        self.namespaces.values().flat_map(|n| n.waypoints.iter())
    }

    pub fn routes(&self) -> impl Iterator<Item = (&ObjectKey, &Arc<Entry>)> {
        self.namespaces.values().flat_map(|n| n.routes.iter())
    }
}

/// Whether every label of `selector` is on `labels` (an empty selector selects everything).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn selects_proto(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
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

/// Where tunnels to `w` are dialled (on 15008): its node's address, or its own when its node
/// expects tunnels at the pod's address.
pub fn tunnel_address(w: &WorkloadObj) -> Option<std::net::IpAddr> {
    match w.tunnel_to_pod {
        true => Some(w.ip),
        false => w.node_ip,
    }
}

fn node_address(w: &WorkloadObj) -> Vec<u8> {
    tunnel_address(w).map(addr::to_bytes).unwrap_or_default()
}

/// Whether a workload's annotations ask for tunnels to its own address: `trellis.io/tunnel-address`
/// is `pod` (or `node`, the default), and Istio's `ambient.istio.io/redirection: enabled` marks a
/// pod captured by Istio's ztunnel, which accepts tunnels only at the pod's address. An unknown
/// value of Trellis's annotation is an error, not a silent default.
pub fn tunnel_to_pod(annotations: &BTreeMap<String, String>) -> Result<bool, String> {
    let istio = annotations.get(ISTIO_REDIRECTION).is_some_and(|v| v == "enabled");
    match annotations.get(TUNNEL_ADDRESS).map(String::as_str) {
        Some("pod") => Ok(true),
        Some("node") => Ok(false),
        None => Ok(istio),
        Some(other) => Err(format!(
            "annotation {TUNNEL_ADDRESS}: {other:?} is neither \"pod\" nor \"node\""
        )),
    }
}

fn protocol(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Http => pb::Protocol::Http,
        Protocol::Http2 => pb::Protocol::Http2,
        Protocol::Grpc => pb::Protocol::Grpc,
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
    previous: Option<&BTreeMap<ObjectKey, Arc<Entry>>>,
    kind: pb::Kind,
    key: &ObjectKey,
    fresh: pb::Resource,
) -> Arc<Entry> {
    match previous.and_then(|p| p.get(key)) {
        Some(old) if old.resource == fresh => old.clone(),
        _ => Arc::new(Entry::new(res_key(kind, key), fresh)),
    }
}

/// The objects of one namespace in a map keyed by `ObjectKey`.
fn in_namespace<'a, V>(map: &'a BTreeMap<ObjectKey, V>, ns: &str) -> impl Iterator<Item = (&'a ObjectKey, &'a V)> + 'a {
    let ns = ns.to_string();
    map.range(ObjectKey::new(&ns, "")..)
        .take_while(move |(k, _)| k.namespace == ns)
}

/// Whether namespace `ns` is the same in both inventories.
fn same_namespace(a: &Inventory, b: &Inventory, ns: &str) -> bool {
    a.namespaces.get(ns) == b.namespaces.get(ns)
        && in_namespace(&a.workloads, ns).eq(in_namespace(&b.workloads, ns))
        && in_namespace(&a.services, ns).eq(in_namespace(&b.services, ns))
        && in_namespace(&a.policies, ns).eq(in_namespace(&b.policies, ns))
        && in_namespace(&a.waypoints, ns).eq(in_namespace(&b.waypoints, ns))
        && in_namespace(&a.routes, ns).eq(in_namespace(&b.routes, ns))
}

fn workload_identity(cluster: &ClusterInfo, key: &ObjectKey, w: &WorkloadObj) -> String {
    SpiffeId::workload(&cluster.trust_domain, &key.namespace, &w.service_account)
        .map(|id| id.to_string())
        .unwrap_or_default()
}

/// Every namespace that holds an object: one lookup per namespace, not per object.
fn namespaces(inv: &Inventory) -> BTreeSet<String> {
    fn collect<V>(map: &BTreeMap<ObjectKey, V>, all: &mut BTreeSet<String>) {
        let mut next = map.keys().next();
        while let Some(key) = next {
            all.insert(key.namespace.clone());
            // The first key after every key of this namespace.
            let after = ObjectKey::new(&format!("{}\u{0}", key.namespace), "");
            next = map.range(after..).next().map(|(k, _)| k);
        }
    }
    let mut all: BTreeSet<String> = inv.namespaces.keys().cloned().collect();
    collect(&inv.workloads, &mut all);
    collect(&inv.services, &mut all);
    collect(&inv.policies, &mut all);
    collect(&inv.waypoints, &mut all);
    collect(&inv.routes, &mut all);
    all
}

/// Builds the mesh model from an inventory, and says which namespaces changed. With the
/// previous inventory and model, namespaces whose objects did not change are carried over as
/// they are (one shared pointer each), and unchanged resources of changed namespaces keep their
/// identity (and their encoding).
pub fn build(
    inv: &Inventory,
    cluster: &ClusterInfo,
    previous: Option<(&Inventory, &MeshModel)>,
) -> (MeshModel, BTreeSet<String>) {
    let mut model = MeshModel::default();
    let mut changed = BTreeSet::new();
    for ns in namespaces(inv) {
        let old = previous.and_then(|(_, m)| m.namespaces.get(&ns));
        let carried = match (previous, old) {
            (Some((old_inv, _)), Some(old)) if same_namespace(inv, old_inv, &ns) => Some(old.clone()),
            _ => None,
        };
        let ns_model = carried.unwrap_or_else(|| {
            let fresh = build_namespace(inv, cluster, old.map(|o| &**o), &ns);
            match old {
                Some(old) if **old == fresh => old.clone(),
                _ => {
                    changed.insert(ns.clone());
                    Arc::new(fresh)
                }
            }
        });
        for entry in ns_model.workloads.values() {
            let Some(node) = node_of(entry) else { continue };
            match model.by_node.get_mut(node) {
                Some(list) => list.push(entry.clone()),
                None => {
                    model.by_node.insert(node.to_string(), vec![entry.clone()]);
                }
            }
        }
        model.namespaces.insert(ns, ns_model);
    }
    if let Some((_, old)) = previous {
        changed.extend(
            old.namespaces
                .keys()
                .filter(|ns| !model.namespaces.contains_key(*ns))
                .cloned(),
        );
    }
    (model, changed)
}

fn build_namespace(inv: &Inventory, cluster: &ClusterInfo, previous: Option<&NsModel>, ns: &str) -> NsModel {
    let mut model = NsModel::default();
    let labels = inv.namespaces.get(ns).map(|(n, _)| &n.labels);

    for (key, (w, _)) in in_namespace(&inv.workloads, ns) {
        let resource = pb::Resource {
            kind: Some(Variant::Workload(pb::Workload {
                uid: format!("{}/{key}", cluster.name),
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                cluster: cluster.name.clone(),
                network: cluster.network.clone(),
                addresses: vec![addr::to_bytes(w.ip)],
                labels: w.labels.clone().into_iter().collect(),
                ready: w.ready,
                enrolled: is_enrolled(w, labels),
                identity: workload_identity(cluster, key, w),
                waypoint: waypoint_for(&w.labels, &key.namespace, labels),
                locality: locality(&w.region, &w.zone),
                node_address: node_address(w),
            })),
        };
        let entry = intern(previous.map(|p| &p.workloads), pb::Kind::Workload, key, resource);
        model.workloads.insert(key.clone(), entry);
    }
    let book: Vec<pb::WorkloadAddress> = in_namespace(&inv.workloads, ns)
        .map(|(key, (w, _))| pb::WorkloadAddress {
            name: key.name.clone(),
            node: w.node.clone(),
            address: addr::to_bytes(w.ip),
            node_address: node_address(w),
            service_account: w.service_account.clone(),
            enrolled: is_enrolled(w, labels),
            ready: w.ready,
            waypoint: waypoint_for(&w.labels, &key.namespace, labels),
            locality: locality(&w.region, &w.zone),
        })
        .collect();
    if !book.is_empty() {
        let resource = pb::Resource {
            kind: Some(Variant::WorkloadAddresses(pb::WorkloadAddresses {
                namespace: ns.to_string(),
                cluster: cluster.name.clone(),
                trust_domain: cluster.trust_domain.as_str().to_string(),
                workloads: book,
            })),
        };
        model.addresses = Some(match previous.and_then(|p| p.addresses.as_ref()) {
            Some(old) if old.resource == resource => old.clone(),
            _ => Arc::new(Entry::new(
                ResKey::new(pb::Kind::WorkloadAddresses, &format!("{ns}/")),
                resource,
            )),
        });
    }
    for (key, (s, _)) in in_namespace(&inv.services, ns) {
        // A service without a selector has no discovered endpoints (as in Kubernetes).
        let endpoints = if s.selector.is_empty() {
            Vec::new()
        } else {
            in_namespace(&inv.workloads, ns)
                .filter(|(_, (w, _))| selects(&s.selector, &w.labels))
                .map(|(wk, (w, _))| pb::Endpoint {
                    workload_name: wk.name.clone(),
                    workload_namespace: wk.namespace.clone(),
                    cluster: cluster.name.clone(),
                    address: addr::to_bytes(w.ip),
                    node: w.node.clone(),
                    healthy: w.ready,
                    locality: locality(&w.region, &w.zone),
                    identity: workload_identity(cluster, wk, w),
                    enrolled: is_enrolled(w, labels),
                    node_address: node_address(w),
                    ..Default::default()
                })
                .collect()
        };
        let resource = pb::Resource {
            kind: Some(Variant::Service(pb::Service {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                hostname: format!("{}.{}.svc.{}", key.name, key.namespace, cluster.domain),
                vips: s.vips.iter().copied().map(addr::to_bytes).collect(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| pb::ServicePort {
                        name: p.name.clone(),
                        port: p.port.into(),
                        target_port: p.target_port.into(),
                        protocol: protocol(p.protocol) as i32,
                    })
                    .collect(),
                endpoints,
                global: s.labels.get(GLOBAL).map(String::as_str) == Some("true"),
                waypoint: waypoint_for(&s.labels, &key.namespace, labels),
                // Set by the federation's traffic record, when there is one.
                cluster_weights: Default::default(),
            })),
        };
        let entry = intern(previous.map(|p| &p.services), pb::Kind::Service, key, resource);
        model.services.insert(key.clone(), entry);
    }

    for (key, (p, _)) in in_namespace(&inv.policies, ns) {
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
                        principals: r.principals.iter().map(ToString::to_string).collect(),
                        namespaces: r.namespaces.clone(),
                        ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                        not_principals: r.not_principals.iter().map(ToString::to_string).collect(),
                        not_namespaces: r.not_namespaces.clone(),
                    })
                    .collect(),
            })),
        };
        let entry = intern(
            previous.map(|p| &p.policies),
            pb::Kind::AuthorizationPolicy,
            key,
            resource,
        );
        model.policies.insert(key.clone(), entry);
    }

    for (key, (w, _)) in in_namespace(&inv.waypoints, ns) {
        let resource = pb::Resource {
            kind: Some(Variant::Waypoint(pb::Waypoint {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                addresses: w.addresses.iter().copied().map(addr::to_bytes).collect(),
                hbone_port: 15008,
                identity: SpiffeId::workload(&cluster.trust_domain, &key.namespace, &w.service_account)
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
            })),
        };
        let entry = intern(previous.map(|p| &p.waypoints), pb::Kind::Waypoint, key, resource);
        model.waypoints.insert(key.clone(), entry);
    }

    for (key, (r, _)) in in_namespace(&inv.routes, ns) {
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
        let entry = intern(previous.map(|p| &p.routes), pb::Kind::HttpRoute, key, resource);
        model.routes.insert(key.clone(), entry);
    }
    model
}

/// What a subscriber does with its slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Ztunnel,
    Waypoint,
}

/// What a node needs of one namespace `n`, handed to `out` entry by entry; `own` are the
/// node's workloads in that namespace. This is the one rule of what a node gets:
/// [`node_slice`] applies it to every namespace, [`advance`] to the namespaces that changed.
///
/// A ztunnel gets its own workloads in full, the namespace's address book (where every workload
/// lives and who it is: so that every enrolled destination is tunnelled, even one that backs no
/// service), every service with its endpoints, every waypoint, and the policies that select one
/// of its workloads; a waypoint also gets every policy and HTTPRoute. Never another node's
/// workloads' labels.
fn ns_part(n: &NsModel, own: &[&Arc<Entry>], role: Role, out: &mut impl FnMut(&Arc<Entry>)) {
    own.iter().for_each(|e| out(e));
    n.addresses.iter().for_each(&mut *out);
    n.services.values().for_each(&mut *out);
    for e in n.policies.values() {
        let applies = role == Role::Waypoint
            || match &e.resource.kind {
                Some(Variant::AuthorizationPolicy(p)) => own.iter().any(|w| match &w.resource.kind {
                    Some(Variant::Workload(w)) => selects_proto(&p.selector, &w.labels),
                    _ => false,
                }),
                _ => false,
            };
        if applies {
            out(e);
        }
    }
    n.waypoints.values().for_each(&mut *out);
    if role == Role::Waypoint {
        n.routes.values().for_each(&mut *out);
    }
}

/// The namespace of a workload entry.
fn namespace_of(entry: &Entry) -> Option<&str> {
    match &entry.resource.kind {
        Some(Variant::Workload(w)) => Some(&w.namespace),
        _ => None,
    }
}

/// The slice of `model` that `node` needs, cut fresh (see [`ns_part`] for the rule).
pub fn node_slice(model: &MeshModel, node: &str, role: Role) -> ServerSlice {
    let mut own_by_ns: BTreeMap<&str, Vec<&Arc<Entry>>> = BTreeMap::new();
    for e in model.by_node.get(node).map(Vec::as_slice).unwrap_or_default() {
        if let Some(ns) = namespace_of(e) {
            own_by_ns.entry(ns).or_default().push(e);
        }
    }
    let mut slice = model.federation.clone();
    for (ns, n) in &model.namespaces {
        let own = own_by_ns.get(ns.as_str()).map(Vec::as_slice).unwrap_or_default();
        ns_part(n, own, role, &mut |e| {
            slice.insert(e.key.clone(), e.clone());
        });
    }
    slice
}

/// The cluster-scoped kinds, which every node gets from [`MeshModel::federation`].
const FEDERATION_KINDS: [pb::Kind; 2] = [pb::Kind::RemoteCluster, pb::Kind::TrustBundle];

/// Brings the cluster-scoped part of `slice` up to `model.federation` (a handful of entries: it
/// is compared whole on every change).
fn advance_federation(
    model: &MeshModel,
    slice: &mut ServerSlice,
    upserts: &mut Vec<Arc<Entry>>,
    removals: &mut Vec<ResKey>,
) {
    let held: Vec<ResKey> = slice
        .keys()
        .filter(|k| FEDERATION_KINDS.contains(&k.kind))
        .cloned()
        .collect();
    for key in held {
        if !model.federation.contains_key(&key) {
            slice.remove(&key);
            removals.push(key);
        }
    }
    for (key, entry) in &model.federation {
        let same = slice.get(key).is_some_and(|o| Arc::ptr_eq(o, entry) || **o == **entry);
        if !same {
            slice.insert(key.clone(), entry.clone());
            upserts.push(entry.clone());
        }
    }
}

/// The kinds a node slice holds.
const SLICE_KINDS: [pb::Kind; 6] = [
    pb::Kind::Workload,
    pb::Kind::WorkloadAddresses,
    pb::Kind::Service,
    pb::Kind::AuthorizationPolicy,
    pb::Kind::Waypoint,
    pb::Kind::HttpRoute,
];

/// Brings `slice` up to `model` when only the namespaces in `changed` differ from the model
/// it was cut from, and returns what changed: the work is proportional to those namespaces,
/// not to the mesh.
pub fn advance(
    model: &MeshModel,
    node: &str,
    role: Role,
    slice: &mut ServerSlice,
    changed: &BTreeSet<String>,
) -> (Vec<Arc<Entry>>, Vec<ResKey>) {
    let mut upserts = Vec::new();
    let mut removals = Vec::new();
    advance_federation(model, slice, &mut upserts, &mut removals);
    for ns in changed {
        let prefix = format!("{ns}/");
        let mut fresh = ServerSlice::new();
        if let Some(n) = model.namespaces.get(ns) {
            let own: Vec<&Arc<Entry>> = n.workloads.values().filter(|e| node_of(e) == Some(node)).collect();
            ns_part(n, &own, role, &mut |e| {
                fresh.insert(e.key.clone(), e.clone());
            });
        }
        let mut old = Vec::new();
        for kind in SLICE_KINDS {
            old.extend(
                slice
                    .range(ResKey::new(kind, &prefix)..)
                    .take_while(|(k, _)| k.kind == kind && k.name.starts_with(&prefix))
                    .map(|(k, _)| k.clone()),
            );
        }
        for key in old {
            if !fresh.contains_key(&key) {
                slice.remove(&key);
                removals.push(key);
            }
        }
        for (key, entry) in fresh {
            let same = slice.get(&key).is_some_and(|o| Arc::ptr_eq(o, &entry) || **o == *entry);
            if !same {
                slice.insert(key, entry.clone());
                upserts.push(entry);
            }
        }
    }
    (upserts, removals)
}

/// The key of a namespaced object of `kind`.
fn res_key(kind: pb::Kind, key: &ObjectKey) -> ResKey {
    ResKey::new(kind, &key.to_string())
}

/// What changed from `old` to `new`: entries to upsert and keys to remove.
pub fn diff(old: &ServerSlice, new: &ServerSlice) -> (Vec<Arc<Entry>>, Vec<ResKey>) {
    let upserts = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_none_or(|o| !Arc::ptr_eq(o, v) && o != *v))
        .map(|(_, v)| v.clone())
        .collect();
    let removals = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    (upserts, removals)
}

/// A subscriber's copy of a server slice (tests, tools).
pub fn to_client(slice: &ServerSlice) -> Slice {
    slice
        .iter()
        .map(|(k, e)| (k.clone(), Arc::new(e.resource.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_file;

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
        match model
            .workload(&ObjectKey::new(ns, name))
            .unwrap()
            .resource
            .kind
            .as_ref()
        {
            Some(Variant::Workload(w)) => w,
            _ => panic!("not a workload"),
        }
    }

    #[test]
    fn enrolment_follows_the_namespace_label_and_a_pod_can_opt_out() {
        let (model, _) = build(&parse_file(MESH).unwrap(), &cluster(), None);
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
    fn global_services_get_the_other_clusters_endpoints_and_lose_them_again() {
        let (mut model, _) = build(&parse_file(MESH).unwrap(), &cluster(), None);
        let endpoints = |model: &MeshModel| -> Vec<String> {
            let Some(Variant::Service(cart)) = &model.service(&ObjectKey::new("shop", "cart")).unwrap().resource.kind
            else {
                panic!()
            };
            cart.endpoints
                .iter()
                .map(|e| format!("{}/{}", e.cluster, e.workload_name))
                .collect()
        };
        let local = endpoints(&model);
        let west = pb::Endpoint {
            workload_name: "west/gateway".into(),
            cluster: "west".into(),
            ..Default::default()
        };
        let remote = Remote {
            endpoints: BTreeMap::from([(("shop".to_string(), "cart".to_string()), vec![Arc::new(vec![west])])]),
            ..Remote::default()
        };
        let changed = with_remote(&mut model, "east", &remote, None);
        assert_eq!(changed, BTreeSet::from(["shop".to_string()]));
        let mut want = local.clone();
        want.push("west/west/gateway".into());
        assert_eq!(endpoints(&model), want, "local first, then the other clusters'");
        assert!(
            with_remote(&mut model, "east", &remote, None).is_empty(),
            "the same endpoints again change nothing"
        );
        assert!(
            with_remote(&mut model, "east", &remote, Some(&remote)).is_empty(),
            "nor the same chunks, not even looked at"
        );
        let changed = with_remote(&mut model, "east", &Remote::default(), Some(&remote));
        assert_eq!(changed, BTreeSet::from(["shop".to_string()]));
        assert_eq!(endpoints(&model), local, "the remote cluster gone, its endpoints go");
    }

    fn weights_of(model: &MeshModel, ns: &str, name: &str) -> BTreeMap<String, u32> {
        match &model.service(&ObjectKey::new(ns, name)).unwrap().resource.kind {
            Some(Variant::Service(s)) => s.cluster_weights.clone(),
            _ => panic!("not a service"),
        }
    }

    #[test]
    fn a_traffic_record_alone_sets_and_clears_the_weights_of_a_global_service() {
        let text = format!(
            "{MESH}---\napiVersion: v1\nkind: Service\nmetadata: {{name: local, namespace: shop}}\nspec: {{selector: {{app: cart}}, ports: [{{port: 81, targetPort: 8080}}]}}\n"
        );
        let (mut model, _) = build(&parse_file(&text).unwrap(), &cluster(), None);
        let west = Arc::new(vec![pb::Endpoint {
            workload_name: "west/gateway".into(),
            cluster: "west".into(),
            ..Default::default()
        }]);
        let key = |name: &str| ("shop".to_string(), name.to_string());
        let endpoints = BTreeMap::from([(key("cart"), vec![west.clone()]), (key("local"), vec![west])]);
        let locality = Remote {
            endpoints,
            ..Remote::default()
        };
        with_remote(&mut model, "east", &locality, None);
        let split: BTreeMap<String, u32> = BTreeMap::from([("east".to_string(), 90), ("west".to_string(), 10)]);
        // The same chunks (pointers), only the weights moved: the hub's cheap path must see it.
        let shifted = Remote {
            weights: BTreeMap::from([(key("cart"), split.clone()), (key("local"), split.clone())]),
            ..locality.clone()
        };
        assert!(!shifted.same(&locality), "a weights-only change is a change");
        let changed = with_remote(&mut model, "east", &shifted, Some(&locality));
        assert_eq!(changed, BTreeSet::from(["shop".to_string()]));
        assert_eq!(weights_of(&model, "shop", "cart"), split);
        assert!(
            weights_of(&model, "shop", "local").is_empty(),
            "a service not global here follows no traffic record"
        );
        assert!(
            with_remote(&mut model, "east", &shifted, Some(&shifted)).is_empty(),
            "the same weights again change nothing"
        );
        // A rebuild of the namespace keeps them, once merged again.
        let (mut rebuilt, _) = build(&parse_file(&text).unwrap(), &cluster(), None);
        with_remote(&mut rebuilt, "east", &shifted, None);
        assert_eq!(weights_of(&rebuilt, "shop", "cart"), split);
        // --clear: the record goes, the service follows locality again.
        let changed = with_remote(&mut model, "east", &locality, Some(&shifted));
        assert_eq!(changed, BTreeSet::from(["shop".to_string()]));
        assert!(weights_of(&model, "shop", "cart").is_empty());
    }

    #[test]
    fn services_get_vips_and_endpoints_by_selector() {
        let (model, _) = build(&parse_file(MESH).unwrap(), &cluster(), None);
        let Some(Variant::Service(cart)) = model
            .service(&ObjectKey::new("shop", "cart"))
            .unwrap()
            .resource
            .kind
            .as_ref()
        else {
            panic!()
        };
        assert_eq!(cart.hostname, "cart.shop.svc.cluster.local");
        assert_eq!(cart.vips, vec![addr::to_bytes("10.96.0.10".parse().unwrap())]);
        assert!(cart.global);
        let eps: Vec<_> = cart
            .endpoints
            .iter()
            .map(|e| (addr::from_bytes(&e.address).unwrap().to_string(), e.healthy, e.enrolled))
            .collect();
        let want = [("10.1.1.5", true, true), ("10.1.2.5", false, false)];
        assert_eq!(eps, want.map(|(a, h, e)| (a.to_string(), h, e)));
        assert!(cart
            .endpoints
            .iter()
            .all(|e| e.cluster == "east" && e.workload_namespace == "shop"));
    }

    #[test]
    fn a_node_gets_its_workloads_services_and_the_policies_that_select_them() {
        let (model, _) = build(&parse_file(MESH).unwrap(), &cluster(), None);
        let slice = node_slice(&model, "node-1", Role::Ztunnel);
        let names: Vec<_> = slice.keys().map(|k| (k.kind, &*k.name)).collect();
        assert!(names.contains(&(pb::Kind::Workload, "shop/cart-1")));
        assert!(names.contains(&(pb::Kind::Workload, "legacy/old")));
        assert!(
            !names.contains(&(pb::Kind::Workload, "shop/cart-2")),
            "another node's workload in full"
        );
        let book = slice
            .values()
            .find(|e| e.key.kind == pb::Kind::WorkloadAddresses && &*e.key.name == "shop/");
        let Some(Variant::WorkloadAddresses(book)) = &book.expect("the namespace's address book").resource.kind else {
            panic!()
        };
        let cart2 = book
            .workloads
            .iter()
            .find(|w| w.name == "cart-2")
            .expect("every workload is known");
        assert_eq!((cart2.node.as_str(), cart2.enrolled), ("node-2", false));
        assert_eq!(book.trust_domain, "east.trellis.local");
        assert!(names.contains(&(pb::Kind::Service, "shop/cart")));
        assert!(names.contains(&(pb::Kind::AuthorizationPolicy, "shop/only-web")));
        assert!(
            !names.contains(&(pb::Kind::AuthorizationPolicy, "shop/payments")),
            "selects nothing here"
        );
        let empty = node_slice(&model, "node-9", Role::Ztunnel);
        assert!(empty.keys().all(|k| k.kind != pb::Kind::Workload));
        assert!(model.runs_on("node-2", "spiffe://east.trellis.local/ns/shop/sa/cart"));
        assert!(!model.runs_on("node-9", "spiffe://east.trellis.local/ns/shop/sa/cart"));
    }

    #[test]
    fn enrolling_a_namespace_changes_exactly_its_workloads_and_endpoints() {
        let inv = parse_file(MESH).unwrap();
        let (before, _) = build(&inv, &cluster(), None);
        let enrolled = MESH.replace(
            "metadata: {name: legacy}",
            "metadata: {name: legacy, labels: {trellis.io/dataplane-mode: ambient}}",
        );
        let after_inv = parse_file(&enrolled).unwrap();
        let (after, changed) = build(&after_inv, &cluster(), Some((&inv, &before)));
        assert_eq!(changed.iter().collect::<Vec<_>>(), vec!["legacy"]);
        // Advancing a slice over the changed namespaces equals cutting it afresh.
        let mut advanced = node_slice(&before, "node-1", Role::Ztunnel);
        let (adv_up, adv_rm) = advance(&after, "node-1", Role::Ztunnel, &mut advanced, &changed);
        assert_eq!(advanced, node_slice(&after, "node-1", Role::Ztunnel));
        assert_eq!(adv_up.len(), 2, "the workload and its namespace's address book");
        assert!(adv_rm.is_empty());
        let old = node_slice(&before, "node-1", Role::Ztunnel);
        let new = node_slice(&after, "node-1", Role::Ztunnel);
        let (upserts, removals) = diff(&old, &new);
        assert!(removals.is_empty());
        let keys: Vec<_> = upserts.iter().map(|e| e.key.name.to_string()).collect();
        assert_eq!(
            keys,
            vec!["legacy/old", "legacy/"],
            "only the legacy workload (and its address book) changed"
        );
        assert!(
            Arc::ptr_eq(&before.namespaces["shop"], &after.namespaces["shop"]),
            "an unchanged namespace is carried over"
        );
        let mut replayed = to_client(&old);
        apply(
            &mut replayed,
            pb::ConfigUpdate {
                version: 2,
                snapshot: false,
                upserts: upserts.iter().map(|e| e.resource.clone()).collect(),
                removals: removals.iter().map(ResKey::to_proto).collect(),
            },
        )
        .unwrap();
        assert_eq!(replayed, to_client(&new));
    }

    #[test]
    fn a_workload_moving_nodes_moves_its_identity() {
        let inv = parse_file(MESH).unwrap();
        let (before, _) = build(&inv, &cluster(), None);
        let moved = MESH.replace("node: node-1, ip: 10.1.1.5", "node: node-3, ip: 10.1.1.5");
        let (after, _) = build(&parse_file(&moved).unwrap(), &cluster(), Some((&inv, &before)));
        let cart = "spiffe://east.trellis.local/ns/shop/sa/cart";
        assert!(before.runs_on("node-1", cart));
        assert!(!after.runs_on("node-1", cart));
        assert!(after.runs_on("node-3", cart));
    }
}
