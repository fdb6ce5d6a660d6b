//! "What a node gets" is one rule: moving a node's slice forward change by change (what
//! trellisd does for connected nodes) must give exactly the slice a fresh cut of the same mesh
//! gives (what a node that just connected receives), and the upserts and removals it reports
//! must bring a subscriber's copy to that same slice.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;
use trellis_api::config::v1 as pb;
use trellis_api::slice::{apply, Slice};
use trellis_identity::{Principal, TrustDomain};
use trellis_mesh::inventory::{
    Inventory, NamespaceObj, ObjectKey, PolicyAction, PolicyObj, PolicyRuleObj, PortObj, Protocol, ServiceObj,
    WaypointObj, WorkloadObj,
};
use trellis_mesh::model::{advance, build, node_slice, to_client, ClusterInfo, Role, ServerSlice};

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const APPS: [&str; 2] = ["x", "y"];

/// The mesh as plain choices; turned into an [`Inventory`] for each step.
#[derive(Debug, Clone, Default)]
struct Mesh {
    /// Namespace → enrolled.
    namespaces: BTreeMap<usize, bool>,
    /// (namespace, index) → (node, app, ready, opted out).
    workloads: BTreeMap<(usize, u8), (usize, usize, bool, bool)>,
    /// (namespace, app) → port.
    services: BTreeMap<(usize, usize), u16>,
    /// (namespace, app) → deny (else allow).
    policies: BTreeMap<(usize, usize), bool>,
    /// Namespaces with a waypoint.
    waypoints: BTreeMap<usize, ()>,
}

#[derive(Debug, Clone)]
enum Change {
    Namespace(usize, Option<bool>),
    Workload((usize, u8), Option<(usize, usize, bool, bool)>),
    Service((usize, usize), Option<u16>),
    Policy((usize, usize), Option<bool>),
    Waypoint(usize, bool),
}

fn change() -> impl Strategy<Value = Change> {
    let ns = 0..NAMESPACES.len();
    let app = 0..APPS.len();
    prop_oneof![
        1 => (ns.clone(), proptest::option::of(any::<bool>())).prop_map(|(n, e)| Change::Namespace(n, e)),
        3 => (
            (ns.clone(), 0u8..4),
            proptest::option::of((0..NODES.len(), app.clone(), any::<bool>(), proptest::bool::weighted(0.2)))
        )
            .prop_map(|(k, w)| Change::Workload(k, w)),
        1 => ((ns.clone(), app.clone()), proptest::option::of(prop_oneof![Just(80u16), Just(8080)]))
            .prop_map(|(k, p)| Change::Service(k, p)),
        1 => ((ns.clone(), app), proptest::option::of(any::<bool>())).prop_map(|(k, d)| Change::Policy(k, d)),
        1 => (ns, any::<bool>()).prop_map(|(n, on)| Change::Waypoint(n, on)),
    ]
}

fn set<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => map.insert(key, v),
        None => map.remove(&key),
    };
}

impl Mesh {
    fn apply(&mut self, change: &Change) {
        match change.clone() {
            Change::Namespace(n, e) => set(&mut self.namespaces, n, e),
            Change::Workload(k, w) => set(&mut self.workloads, k, w),
            Change::Service(k, p) => set(&mut self.services, k, p),
            Change::Policy(k, d) => set(&mut self.policies, k, d),
            Change::Waypoint(n, on) => set(&mut self.waypoints, n, on.then_some(())),
        }
    }

    fn inventory(&self) -> Inventory {
        let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut inv = Inventory::default();
        let mut line = 0;
        let mut next = || {
            line += 1;
            line
        };
        for (&n, &enrolled) in &self.namespaces {
            let l = if enrolled {
                labels(&[("trellis.io/dataplane-mode", "ambient")])
            } else {
                BTreeMap::new()
            };
            inv.add_namespace(
                NamespaceObj {
                    name: NAMESPACES[n].into(),
                    labels: l,
                },
                next(),
            )
            .unwrap();
        }
        for (&(n, i), &(node, app, ready, opted_out)) in &self.workloads {
            let mut l: BTreeMap<String, String> = labels(&[("app", APPS[app])]);
            if opted_out {
                l.insert("trellis.io/dataplane-mode".into(), "none".into());
            }
            let obj = WorkloadObj {
                key: ObjectKey::new(NAMESPACES[n], &format!("w{i}")),
                labels: l,
                service_account: format!("sa-{}", APPS[app]),
                node: NODES[node].into(),
                ip: IpAddr::V4(Ipv4Addr::new(10, n as u8, node as u8, i)),
                node_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 255, 0, node as u8))),
                tunnel_to_pod: false,
                ready,
                region: String::new(),
                zone: String::new(),
            };
            inv.add_workload(obj, next()).unwrap();
        }
        for (&(n, app), &port) in &self.services {
            let obj = ServiceObj {
                key: ObjectKey::new(NAMESPACES[n], APPS[app]),
                labels: BTreeMap::new(),
                selector: labels(&[("app", APPS[app])]),
                ports: vec![PortObj {
                    name: "p".into(),
                    port,
                    target_port: port,
                    protocol: Protocol::Tcp,
                }],
                vips: vec![IpAddr::V4(Ipv4Addr::new(10, 96, n as u8, app as u8))],
            };
            inv.add_service(obj, next()).unwrap();
        }
        for (&(n, app), &deny) in &self.policies {
            let obj = PolicyObj {
                key: ObjectKey::new(NAMESPACES[n], &format!("p-{}", APPS[app])),
                action: if deny { PolicyAction::Deny } else { PolicyAction::Allow },
                selector: labels(&[("app", APPS[app])]),
                rules: vec![PolicyRuleObj {
                    principals: vec![Principal::parse("ns/a/sa/sa-x").unwrap()],
                    namespaces: vec![],
                    not_principals: vec![],
                    not_namespaces: vec![],
                    ports: vec![],
                }],
            };
            inv.add_policy(obj, next()).unwrap();
        }
        for &n in self.waypoints.keys() {
            let obj = WaypointObj {
                key: ObjectKey::new(NAMESPACES[n], "wp"),
                addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 97, 0, n as u8))],
                service_account: "wp".into(),
            };
            inv.add_waypoint(obj, next()).unwrap();
        }
        inv
    }
}

fn cluster() -> ClusterInfo {
    ClusterInfo {
        name: "east".into(),
        trust_domain: TrustDomain::new("east.trellis.local").unwrap(),
        network: "east".into(),
        domain: "cluster.local".into(),
    }
}

/// A subscriber's copy after applying `upserts` and `removals` as one update.
fn applied(
    client: &mut Slice,
    upserts: &[std::sync::Arc<trellis_mesh::model::Entry>],
    removals: &[trellis_api::slice::ResKey],
) {
    let update = pb::ConfigUpdate {
        version: 1,
        snapshot: false,
        upserts: upserts.iter().map(|e| e.resource.clone()).collect(),
        removals: removals.iter().map(|k| k.to_proto()).collect(),
    };
    apply(client, update).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn advancing_a_slice_change_by_change_equals_a_fresh_cut(
        start in proptest::collection::vec(change(), 0..12),
        changes in proptest::collection::vec(change(), 1..20),
        node in 0..NODES.len(),
        waypoint_role in any::<bool>(),
    ) {
        let role = if waypoint_role { Role::Waypoint } else { Role::Ztunnel };
        let node = NODES[node];
        let cluster = cluster();
        let mut mesh = Mesh::default();
        start.iter().for_each(|c| mesh.apply(c));

        let mut inv = mesh.inventory();
        let (mut model, _) = build(&inv, &cluster, None);
        let mut slice: ServerSlice = node_slice(&model, node, role);
        let mut client = to_client(&slice);

        for change in &changes {
            mesh.apply(change);
            let next_inv = mesh.inventory();
            let (next_model, changed) = build(&next_inv, &cluster, Some((&inv, &model)));
            let (upserts, removals) = advance(&next_model, node, role, &mut slice, &changed);
            applied(&mut client, &upserts, &removals);

            let fresh = node_slice(&build(&next_inv, &cluster, None).0, node, role);
            prop_assert_eq!(&slice, &fresh, "after {:?}", change);
            prop_assert_eq!(&client, &to_client(&fresh), "the subscriber's copy after {:?}", change);
            inv = next_inv;
            model = next_model;
        }
    }
}
