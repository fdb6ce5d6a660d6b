//! The inventory: what exists in a cluster (namespaces, services, workloads, routes, policies,
//! waypoints), as plain data. Discovery sources fill it; the model reads it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use trellis_identity::Principal;

/// `<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceObj {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortObj {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub protocol: Protocol,
}

/// A service port's application protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Http,
    Http2,
    Grpc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceObj {
    pub key: ObjectKey,
    pub labels: BTreeMap<String, String>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<PortObj>,
    pub vips: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadObj {
    pub key: ObjectKey,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub node: String,
    pub ip: IpAddr,
    /// Where the workload's node accepts tunnels; unknown for manifests that leave it out.
    pub node_ip: Option<IpAddr>,
    /// Tunnels to it are dialled at its own address, not its node's (a foreign HBONE node, such
    /// as Istio's ztunnel, expects that): [`crate::model::TUNNEL_ADDRESS`].
    pub tunnel_to_pod: bool,
    pub ready: bool,
    pub region: String,
    pub zone: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatchObj {
    pub path_prefix: String,
    pub path_exact: String,
    pub method: String,
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteBackendObj {
    pub service: ObjectKey,
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRuleObj {
    pub matches: Vec<RouteMatchObj>,
    pub backends: Vec<RouteBackendObj>,
    pub timeout_ms: u64,
    pub retries: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteObj {
    pub key: ObjectKey,
    pub parents: Vec<ObjectKey>,
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRuleObj>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyAction {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRuleObj {
    pub principals: Vec<Principal>,
    pub namespaces: Vec<String>,
    pub not_principals: Vec<Principal>,
    pub not_namespaces: Vec<String>,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyObj {
    pub key: ObjectKey,
    pub action: PolicyAction,
    pub selector: BTreeMap<String, String>,
    pub rules: Vec<PolicyRuleObj>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointObj {
    pub key: ObjectKey,
    pub addresses: Vec<IpAddr>,
    pub service_account: String,
}

/// `kind: Federation` (cluster-scoped): this cluster's membership of the federation, written by
/// `trellis federation join`. Paths are read by trellisd; the etcd endpoints are `https://` URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationObj {
    pub name: String,
    /// Must be the cluster trellisd runs (`--cluster`): a copied file never joins as another.
    pub cluster: String,
    pub etcd_endpoints: Vec<String>,
    pub etcd_ca_file: String,
    pub etcd_cert_file: String,
    pub etcd_key_file: String,
    pub network: String,
    pub region: String,
    pub zone: String,
    /// The east-west gateway: address, HBONE (TCP) port, QUIC port.
    pub gateway: Option<(IpAddr, u16, Option<u16>)>,
}

/// Everything a source knows, each object with the line it was defined at. Objects are shared
/// (`Arc`): merging files and comparing snapshots touch pointers, not contents, for everything
/// that did not change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub namespaces: BTreeMap<String, (Arc<NamespaceObj>, u64)>,
    pub services: BTreeMap<ObjectKey, (Arc<ServiceObj>, u64)>,
    pub workloads: BTreeMap<ObjectKey, (Arc<WorkloadObj>, u64)>,
    pub routes: BTreeMap<ObjectKey, (Arc<RouteObj>, u64)>,
    pub policies: BTreeMap<ObjectKey, (Arc<PolicyObj>, u64)>,
    pub waypoints: BTreeMap<ObjectKey, (Arc<WaypointObj>, u64)>,
    pub federations: BTreeMap<String, (Arc<FederationObj>, u64)>,
}

fn insert_once<K: Ord + fmt::Display + Clone, V>(
    map: &mut BTreeMap<K, (Arc<V>, u64)>,
    kind: &str,
    key: K,
    value: V,
    line: u64,
) -> Result<(), String> {
    if let Some((_, first)) = map.get(&key) {
        return Err(format!("{kind} {key} is defined twice (first at line {first})"));
    }
    map.insert(key, (Arc::new(value), line));
    Ok(())
}

impl Inventory {
    pub fn add_namespace(&mut self, obj: NamespaceObj, line: u64) -> Result<(), String> {
        insert_once(&mut self.namespaces, "Namespace", obj.name.clone(), obj, line)
    }
    pub fn add_service(&mut self, obj: ServiceObj, line: u64) -> Result<(), String> {
        insert_once(&mut self.services, "Service", obj.key.clone(), obj, line)
    }
    pub fn add_workload(&mut self, obj: WorkloadObj, line: u64) -> Result<(), String> {
        insert_once(&mut self.workloads, "Workload", obj.key.clone(), obj, line)
    }
    pub fn add_route(&mut self, obj: RouteObj, line: u64) -> Result<(), String> {
        insert_once(&mut self.routes, "HTTPRoute", obj.key.clone(), obj, line)
    }
    pub fn add_policy(&mut self, obj: PolicyObj, line: u64) -> Result<(), String> {
        insert_once(&mut self.policies, "AuthorizationPolicy", obj.key.clone(), obj, line)
    }
    pub fn add_waypoint(&mut self, obj: WaypointObj, line: u64) -> Result<(), String> {
        insert_once(&mut self.waypoints, "Waypoint", obj.key.clone(), obj, line)
    }
    pub fn add_federation(&mut self, obj: FederationObj, line: u64) -> Result<(), String> {
        insert_once(&mut self.federations, "Federation", obj.name.clone(), obj, line)
    }

    /// Number of objects of every kind.
    pub fn len(&self) -> usize {
        self.namespaces.len()
            + self.services.len()
            + self.workloads.len()
            + self.routes.len()
            + self.policies.len()
            + self.waypoints.len()
            + self.federations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
