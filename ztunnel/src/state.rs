//! What this node knows of the mesh, derived from the config stream: the workloads on this node,
//! the services it may reach with their endpoints, and the policies that guard its workloads.
//!
//! [`ProxyState::from_slice`] is a pure function of the node's slice; the proxy looks things up
//! in it and never mutates it. A new slice yields a new state, swapped in whole.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_api::addr;
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::slice::Slice;
use trellis_identity::{SpiffeId, TrustDomain};

use crate::policy::Policy;

/// A workload scheduled on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalWorkload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub cluster: String,
    pub ip: IpAddr,
    pub identity: SpiffeId,
    pub labels: BTreeMap<String, String>,
    /// Whether its traffic is captured and tunnelled.
    pub enrolled: bool,
    /// This node's tunnel address, as trellisd gave it.
    pub node_address: Option<IpAddr>,
    /// Where it runs, for the locality of the endpoints it calls.
    pub region: String,
    pub zone: String,
}

/// One backend of a service, on any node.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub name: String,
    /// The endpoint's cluster, region and zone.
    pub cluster: String,
    pub region: String,
    pub zone: String,
    pub ip: IpAddr,
    pub node: String,
    /// Where that node accepts HBONE tunnels (port 15008); `None` if trellisd did not say.
    pub node_address: Option<IpAddr>,
    /// The identity the endpoint must present (enrolled endpoints only).
    pub identity: Option<SpiffeId>,
    pub enrolled: bool,
    pub healthy: bool,
    /// Set when the endpoint stands for the pods of another network behind that cluster's
    /// east-west gateway (`ip` and `node_address` are then the gateway's).
    pub gateway: Option<Arc<GatewayHop>>,
}

/// An east-west gateway in front of another network's pods.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayHop {
    /// Where the gateway accepts HBONE.
    pub address: SocketAddr,
    /// The identity it must present.
    pub identity: SpiffeId,
    /// How many pods stand behind it for this endpoint.
    pub weight: u32,
}

/// A service this node may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.<domain>`: what a tunnel through a gateway is addressed to.
    pub hostname: String,
    /// Exported to the federation: only these are reachable through this cluster's gateway.
    pub global: bool,
    pub vips: Vec<IpAddr>,
    /// Service port → target port.
    pub ports: BTreeMap<u16, u16>,
    pub endpoints: Vec<Endpoint>,
    /// Traffic shifting: cluster → weight; empty means by locality.
    pub weights: BTreeMap<String, u32>,
}

/// Where an intercepted connection is going.
#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    /// A service VIP: pick an endpoint, then dial `target_port` on it.
    Service { service: Arc<Service>, target_port: u16 },
    /// A known workload address, dialled as is.
    Workload {
        endpoint: Box<Endpoint>,
        service: Option<Arc<Service>>,
    },
    /// Outside the mesh as far as this node knows: connect directly.
    Passthrough,
    /// Inside the mesh's pod networks, but no workload is known there (not propagated yet, or
    /// gone): refused, because it may be an enrolled pod that must not be called in plaintext.
    Unknown,
}

/// An IP network (`10.1.0.0/16`), for the pod networks of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a network like 10.1.0.0/16"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix {prefix:?} in {s:?} is not a number from 0 to {max}"))?;
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// This node's view of the mesh at one config version.
#[derive(Debug, Clone, Default)]
pub struct ProxyState {
    pub version: u64,
    /// Workloads on this node, by address.
    pub local: HashMap<IpAddr, Arc<LocalWorkload>>,
    services: Vec<Arc<Service>>,
    by_vip: HashMap<SocketAddr, (Arc<Service>, u16)>,
    by_endpoint: HashMap<IpAddr, (Endpoint, Arc<Service>)>,
    by_name: HashMap<(String, String), Arc<Service>>,
    /// Every workload of the mesh on another node, by address.
    remote: HashMap<IpAddr, Endpoint>,
    /// The mesh's pod networks: an address there that no workload holds is refused.
    mesh_networks: Vec<Cidr>,
    /// Policies by namespace.
    policies: HashMap<String, Vec<Arc<Policy>>>,
    /// Resources that could not be used, with the reason (shown in the config dump).
    pub problems: Vec<String>,
}

impl ProxyState {
    /// Builds the state of `node` from its slice at `version`. Resources that fail to parse are
    /// skipped and reported in [`problems`](Self::problems), never fatal.
    pub fn from_slice(node: &str, version: u64, slice: &Slice) -> Self {
        let mut state = ProxyState {
            version,
            ..Default::default()
        };
        for resource in slice.values() {
            match &resource.kind {
                Some(Variant::Workload(w)) if w.node == node => match local_workload(w) {
                    Ok(local) => {
                        state.local.insert(local.ip, Arc::new(local));
                    }
                    Err(e) => state.problems.push(format!("workload {}/{}: {e}", w.namespace, w.name)),
                },
                Some(Variant::WorkloadAddresses(book)) => {
                    for w in book.workloads.iter().filter(|w| w.node != node) {
                        match remote_workload(book, w) {
                            Ok(remote) => {
                                state.remote.insert(remote.ip, remote);
                            }
                            Err(e) => state
                                .problems
                                .push(format!("workload {}/{}: {e}", book.namespace, w.name)),
                        }
                    }
                }
                Some(Variant::Service(s)) => match service(s) {
                    Ok((svc, problems)) => {
                        state.problems.extend(problems);
                        state.add_service(Arc::new(svc));
                    }
                    Err(e) => state.problems.push(format!("service {}/{}: {e}", s.namespace, s.name)),
                },
                Some(Variant::AuthorizationPolicy(p)) => {
                    // A policy ztunnel cannot enforce as written denies everything it selects
                    // (fail closed): skipping it would let a broken DENY policy allow.
                    let policy = Policy::from_pb(p).unwrap_or_else(|e| {
                        state.problems.push(format!(
                            "policy {}/{}: {e}; denying what it selects",
                            p.namespace, p.name
                        ));
                        Policy::unusable(p, &e)
                    });
                    state
                        .policies
                        .entry(policy.namespace.clone())
                        .or_default()
                        .push(Arc::new(policy));
                }
                _ => {}
            }
        }
        state
    }

    fn add_service(&mut self, svc: Arc<Service>) {
        for vip in &svc.vips {
            for (&port, &target) in &svc.ports {
                self.by_vip.insert(SocketAddr::new(*vip, port), (svc.clone(), target));
            }
        }
        self.by_name
            .insert((svc.namespace.clone(), svc.name.clone()), svc.clone());
        // A gateway's address is no workload's: a pod calling it is not calling the service.
        for ep in svc.endpoints.iter().filter(|e| e.gateway.is_none()) {
            self.by_endpoint
                .entry(ep.ip)
                .or_insert_with(|| (ep.clone(), svc.clone()));
        }
        self.services.push(svc);
    }

    /// The same state, refusing unknown addresses inside `networks` (the mesh's pod networks).
    pub fn with_mesh_networks(mut self, networks: &[Cidr]) -> Self {
        self.mesh_networks = networks.to_vec();
        self
    }

    /// Classifies an intercepted connection's original destination.
    pub fn destination(&self, dst: SocketAddr) -> Destination {
        if let Some((service, target_port)) = self.by_vip.get(&dst) {
            return Destination::Service {
                service: service.clone(),
                target_port: *target_port,
            };
        }
        if let Some((endpoint, service)) = self.by_endpoint.get(&dst.ip()) {
            return Destination::Workload {
                endpoint: Box::new(endpoint.clone()),
                service: Some(service.clone()),
            };
        }
        if let Some(local) = self.local.get(&dst.ip()) {
            return Destination::Workload {
                endpoint: Box::new(Endpoint {
                    name: local.name.clone(),
                    cluster: local.cluster.clone(),
                    region: local.region.clone(),
                    zone: local.zone.clone(),
                    ip: local.ip,
                    node: String::new(),
                    node_address: local.node_address,
                    identity: Some(local.identity.clone()),
                    enrolled: local.enrolled,
                    healthy: true,
                    gateway: None,
                }),
                service: None,
            };
        }
        if let Some(endpoint) = self.remote.get(&dst.ip()) {
            return Destination::Workload {
                endpoint: Box::new(endpoint.clone()),
                service: None,
            };
        }
        if self.mesh_networks.iter().any(|n| n.contains(dst.ip())) {
            return Destination::Unknown;
        }
        Destination::Passthrough
    }

    /// The service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.by_name.get(&(namespace.to_string(), name.to_string()))
    }

    /// The enrolled workload on this node at `ip`.
    pub fn enrolled_local(&self, ip: IpAddr) -> Option<&Arc<LocalWorkload>> {
        self.local.get(&ip).filter(|w| w.enrolled)
    }

    /// Policies of `namespace`.
    pub fn policies(&self, namespace: &str) -> &[Arc<Policy>] {
        self.policies.get(namespace).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every workload of the mesh on another node (from the namespaces' address books).
    pub fn remote_workloads(&self) -> impl Iterator<Item = &Endpoint> {
        self.remote.values()
    }

    /// Every service, for the config dump.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }
}

fn local_workload(w: &pb::Workload) -> Result<LocalWorkload, String> {
    let ip = addr::from_bytes(w.addresses.first().ok_or("no address")?).map_err(|e| format!("bad address: {e}"))?;
    let identity = SpiffeId::parse(&w.identity).map_err(|e| format!("bad identity: {e}"))?;
    let node_address = addr::optional(&w.node_address).map_err(|e| format!("bad node address: {e}"))?;
    Ok(LocalWorkload {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        cluster: w.cluster.clone(),
        ip,
        identity,
        labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        enrolled: w.enrolled,
        node_address,
        region: w.locality.as_ref().map(|l| l.region.clone()).unwrap_or_default(),
        zone: w.locality.as_ref().map(|l| l.zone.clone()).unwrap_or_default(),
    })
}

/// A workload on another node, from its namespace's address book, as an endpoint to dial
/// (tunnelled through its node when enrolled).
fn remote_workload(book: &pb::WorkloadAddresses, w: &pb::WorkloadAddress) -> Result<Endpoint, String> {
    let ip = addr::from_bytes(&w.address).map_err(|e| format!("bad address: {e}"))?;
    let node_address = addr::optional(&w.node_address).map_err(|e| format!("bad node address: {e}"))?;
    let identity = match w.service_account.as_str() {
        "" => None,
        sa => {
            let td = TrustDomain::new(&book.trust_domain).map_err(|e| format!("bad trust domain: {e}"))?;
            Some(SpiffeId::workload(&td, &book.namespace, sa).map_err(|e| format!("bad identity: {e}"))?)
        }
    };
    if w.enrolled && (identity.is_none() || node_address.is_none()) {
        return Err("enrolled, but without an identity or a node address to tunnel to".into());
    }
    Ok(Endpoint {
        name: w.name.clone(),
        cluster: book.cluster.clone(),
        region: w.locality.as_ref().map(|l| l.region.clone()).unwrap_or_default(),
        zone: w.locality.as_ref().map(|l| l.zone.clone()).unwrap_or_default(),
        ip,
        node: w.node.clone(),
        node_address,
        identity,
        enrolled: w.enrolled,
        healthy: w.ready,
        gateway: None,
    })
}

fn service(s: &pb::Service) -> Result<(Service, Vec<String>), String> {
    let mut problems = Vec::new();
    let vips = s
        .vips
        .iter()
        .map(|v| addr::from_bytes(v).map_err(|e| format!("bad VIP: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = BTreeMap::new();
    for p in &s.ports {
        let port = u16::try_from(p.port).map_err(|_| format!("bad port {}", p.port))?;
        let target = match p.target_port {
            0 => port,
            t => u16::try_from(t).map_err(|_| format!("bad target port {t}"))?,
        };
        ports.insert(port, target);
    }
    let mut endpoints = Vec::new();
    for e in &s.endpoints {
        match endpoint(e) {
            Ok(ep) => endpoints.push(ep),
            Err(why) => problems.push(format!(
                "service {}/{} endpoint {}/{}: {why}",
                s.namespace, s.name, e.workload_namespace, e.workload_name
            )),
        }
    }
    let svc = Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        global: s.global,
        vips,
        ports,
        endpoints,
        weights: s.cluster_weights.clone(),
    };
    Ok((svc, problems))
}

fn endpoint(e: &pb::Endpoint) -> Result<Endpoint, String> {
    let ip = addr::from_bytes(&e.address).map_err(|err| format!("bad address: {err}"))?;
    let node_address = addr::optional(&e.node_address).map_err(|err| format!("bad node address: {err}"))?;
    let identity = match e.identity.as_str() {
        "" => None,
        id => Some(SpiffeId::parse(id).map_err(|err| format!("bad identity: {err}"))?),
    };
    if e.enrolled && (identity.is_none() || node_address.is_none()) {
        return Err("enrolled, but without an identity or a node address to tunnel to".into());
    }
    let gateway = match e.gateway_identity.as_str() {
        "" => None,
        id => {
            let identity = SpiffeId::parse(id).map_err(|err| format!("bad gateway identity: {err}"))?;
            let port = u16::try_from(e.gateway_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("bad gateway port {}", e.gateway_port))?;
            if !e.enrolled {
                return Err("behind a gateway, but not enrolled: only tunnels cross gateways".into());
            }
            Some(Arc::new(GatewayHop {
                address: SocketAddr::new(node_address.unwrap_or(ip), port),
                identity,
                weight: e.weight.max(1),
            }))
        }
    };
    Ok(Endpoint {
        name: e.workload_name.clone(),
        cluster: e.cluster.clone(),
        region: e.locality.as_ref().map(|l| l.region.clone()).unwrap_or_default(),
        zone: e.locality.as_ref().map(|l| l.zone.clone()).unwrap_or_default(),
        ip,
        node: e.node.clone(),
        node_address,
        identity,
        enrolled: e.enrolled,
        healthy: e.healthy,
        gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::slice::key_of;

    #[test]
    fn a_local_workload_outside_any_service_is_still_reached_through_its_node() {
        let w = pb::Resource {
            kind: Some(Variant::Workload(pb::Workload {
                name: "cart-1".into(),
                namespace: "shop".into(),
                node: "node-1".into(),
                addresses: vec![addr::to_bytes("10.1.1.10".parse().unwrap())],
                enrolled: true,
                identity: "spiffe://east.trellis.local/ns/shop/sa/cart".into(),
                node_address: addr::to_bytes("10.1.0.11".parse().unwrap()),
                ..Default::default()
            })),
        };
        let slice: Slice = [(key_of(&w).unwrap(), Arc::new(w))].into();
        let state = ProxyState::from_slice("node-1", 1, &slice);
        match state.destination("10.1.1.10:8080".parse().unwrap()) {
            Destination::Workload {
                endpoint,
                service: None,
            } => {
                assert!(endpoint.enrolled);
                assert_eq!(
                    endpoint.node_address,
                    Some("10.1.0.11".parse().unwrap()),
                    "tunnelled, not dialled in plaintext"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    fn book(entries: &[(&str, &str, &str, bool)]) -> pb::Resource {
        pb::Resource {
            kind: Some(Variant::WorkloadAddresses(pb::WorkloadAddresses {
                namespace: "shop".into(),
                cluster: "east".into(),
                trust_domain: "east.trellis.local".into(),
                workloads: entries
                    .iter()
                    .map(|(name, node, ip, enrolled)| pb::WorkloadAddress {
                        name: name.to_string(),
                        node: node.to_string(),
                        address: addr::to_bytes(ip.parse().unwrap()),
                        node_address: addr::to_bytes("10.1.0.12".parse().unwrap()),
                        service_account: name.to_string(),
                        enrolled: *enrolled,
                        ready: true,
                        ..Default::default()
                    })
                    .collect(),
            })),
        }
    }

    #[test]
    fn an_enrolled_workload_on_another_node_backing_no_service_is_tunnelled() {
        let book = book(&[
            ("lone", "node-2", "10.1.2.13", true),
            ("plain", "node-2", "10.1.2.14", false),
        ]);
        let slice: Slice = [(key_of(&book).unwrap(), Arc::new(book))].into();
        let net: Cidr = "10.1.2.0/24".parse().unwrap();
        let state = ProxyState::from_slice("node-1", 1, &slice).with_mesh_networks(&[net]);
        match state.destination("10.1.2.13:8080".parse().unwrap()) {
            Destination::Workload {
                endpoint,
                service: None,
            } => {
                assert!(endpoint.enrolled);
                assert_eq!(endpoint.node_address, Some("10.1.0.12".parse().unwrap()));
                assert_eq!(
                    endpoint.identity.unwrap().to_string(),
                    "spiffe://east.trellis.local/ns/shop/sa/lone"
                );
            }
            other => panic!("{other:?}"),
        }
        match state.destination("10.1.2.14:8080".parse().unwrap()) {
            Destination::Workload { endpoint, .. } => {
                assert!(!endpoint.enrolled, "a known non-mesh pod is dialled as is")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            state.destination("10.1.2.99:8080".parse().unwrap()),
            Destination::Unknown,
            "unknown inside the pod network"
        );
        assert_eq!(
            state.destination("192.0.2.1:443".parse().unwrap()),
            Destination::Passthrough,
            "outside the mesh"
        );
    }

    #[test]
    fn networks_parse_strictly_and_match_by_prefix() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.255.3".parse().unwrap()) && !net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        for bad in ["10.1.0.0", "10.1.0.0/33", "x/8", "10.1.0.0/-1", "fd00::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(net.to_string(), "10.1.0.0/16");
    }

    #[test]
    fn a_policy_with_an_unknown_action_is_kept_as_deny_and_reported() {
        let p = pb::Resource {
            kind: Some(Variant::AuthorizationPolicy(pb::AuthorizationPolicy {
                name: "future".into(),
                namespace: "shop".into(),
                action: 7,
                ..Default::default()
            })),
        };
        let slice: Slice = [(key_of(&p).unwrap(), Arc::new(p))].into();
        let state = ProxyState::from_slice("node-1", 1, &slice);
        assert_eq!(state.policies("shop").len(), 1, "not skipped");
        assert!(
            state.problems.iter().any(|p| p.contains("shop/future")),
            "{:?}",
            state.problems
        );
        let decision = crate::policy::authorize(
            state.policies("shop"),
            &BTreeMap::new(),
            &crate::policy::Source {
                principal: None,
                port: 80,
            },
        );
        assert!(matches!(decision, crate::policy::Decision::Deny(_)), "{decision:?}");
    }
}
