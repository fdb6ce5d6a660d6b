//! The lab's address plan: a pure function from a [`Topology`] to every network namespace,
//! interface, address and route the lab will have. Nothing here touches the system.
//!
//! Cluster `c` (1-based, file order) has the cluster network 10.c.0.0/24 on bridge `br-<cluster>`
//! in the underlay namespace: trellisd at 10.c.0.2, node `n` at 10.c.0.(10+n). Node `n` owns the
//! pod CIDR 10.c.n.0/24; its i-th pod (0-based, file order) is 10.c.n.(10+i). The k-th service of
//! the cluster has VIP 10.(100+c).0.(10+k).
//!
//! Two or more clusters are a federation ([`FederationPlan`]): a "wan" bridge `br-wan`
//! (10.200.0.0/24) in the underlay, etcd on it at 10.200.0.2, and per cluster an east-west
//! gateway namespace at 10.c.0.3 on the cluster network and 10.200.0.(10+c) on the wan. The
//! gateway is the cluster's only way out: every host of the cluster routes the wan through it,
//! it masquerades what leaves, and it forwards only tunnels (15008/tcp, 15009/udp) and etcd
//! (2379/tcp) from the cluster to the wan. Nothing routes from the wan into a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{bail, Context};

use super::spec::{self, Run, Topology};

/// trellisd's certificate and config-stream port.
pub const CA_PORT: u16 = 15012;
/// trellisd's loopback admin port (inside its namespace).
pub const ADMIN_PORT: u16 = 15014;
/// ztunnel's metrics port.
pub const METRICS_PORT: u16 = 15020;
/// ztunnel's readiness port.
pub const READY_PORT: u16 = 15021;
/// HBONE over HTTP/2 (TCP): what a gateway accepts from other clusters.
pub const HBONE_PORT: u16 = 15008;
/// HBONE over QUIC (UDP).
pub const QUIC_PORT: u16 = 15009;
/// etcd's client port.
pub const ETCD_PORT: u16 = 2379;
/// The node name every cluster's east-west gateway runs as (its SVID names it).
pub const GATEWAY_NODE: &str = trellis_federation::records::GATEWAY_NODE;
/// The nftables table that makes a gateway namespace its cluster's edge.
pub const EDGE_TABLE: &str = "trellis_lab_edge";
/// A gateway's interface on the wan (its cluster-side one is `eth0`).
pub const WAN_IF: &str = "wan0";
/// The wan's network, a /24.
const WAN_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);

/// Most clusters in one lab (cluster VIPs use 10.(100+c)).
const MAX_CLUSTERS: usize = 99;
/// Most nodes per cluster, pods per node and services per cluster.
const MAX_PER_PARENT: usize = 200;

/// Everything the lab builds, named and addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub lab: String,
    /// The namespace holding the bridges: `tl-<lab>-u`.
    pub underlay: String,
    pub clusters: Vec<ClusterPlan>,
    /// Namespaces (the Kubernetes kind), present in every cluster.
    pub namespaces: Vec<spec::Namespace>,
    /// The wan, etcd and the gateways: present with two or more clusters.
    pub federation: Option<FederationPlan>,
}

/// What a lab of several clusters adds: the wan between them, etcd on it, and each cluster's
/// east-west gateway on both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationPlan {
    /// The wan's bridge in the underlay namespace: `br-wan`.
    pub bridge: String,
    /// The wan's network address (a /24): 10.200.0.0.
    pub network: Ipv4Addr,
    /// etcd's namespace `tl-<lab>-etcd`: `eth0` 10.200.0.2/24 on the wan, underlay end `wetcd`.
    pub etcd: Host,
    /// One per cluster, in cluster order.
    pub gateways: Vec<GatewayPlan>,
}

/// A cluster's east-west gateway and network edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPlan {
    /// The cluster's name.
    pub cluster: String,
    /// `tl-<lab>-<cluster>-gw`: `eth0` 10.c.0.3/24 on the cluster bridge, underlay end `c<c>gw`.
    pub host: Host,
    /// Its [`WAN_IF`] address on the wan: 10.200.0.(10+c).
    pub wan_ip: Ipv4Addr,
    /// The underlay end of [`WAN_IF`], on the wan bridge: `w<c>gw`.
    pub wan_uplink: String,
    /// The cluster's addresses, which it masquerades towards the wan: 10.c.0.0/16.
    pub cluster_cidr: Ipv4Addr,
}

/// One cluster: its bridge, control-plane host, nodes and services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPlan {
    pub name: String,
    /// 1-based position in the file.
    pub index: u8,
    /// The cluster network's bridge in the underlay namespace.
    pub bridge: String,
    /// trellisd's namespace.
    pub cp: Host,
    pub nodes: Vec<NodePlan>,
    pub services: Vec<ServicePlan>,
    /// The network it joins the federation with (default: its name).
    pub network: String,
    /// Its region and zone in the federation (empty: none).
    pub region: String,
    pub zone: String,
    /// Flags appended to trellisd's and each ztunnel's command line (the topology's).
    pub trellisd_args: Vec<String>,
    pub ztunnel_args: Vec<String>,
}

/// A namespace on the cluster network: `eth0` with `ip`/24, and the veth end `uplink` in the
/// underlay enslaved to the cluster bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub uplink: String,
}

/// One node and the pods behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// `node-<n>`.
    pub name: String,
    pub index: u8,
    pub host: Host,
    /// The network address of the node's pod CIDR (a /24).
    pub pod_cidr: Ipv4Addr,
    /// The address every node-side pod veth carries (10.c.n.1), the pods' default gateway.
    pub gateway: Ipv4Addr,
    pub pods: Vec<PodPlan>,
    /// Flags appended to this node's ztunnel after the cluster's (`nodeZtunnelArgs`).
    pub ztunnel_args: Vec<String>,
}

/// One pod: its namespace, address, the node-side veth name and what it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    pub name: String,
    pub namespace: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The veth end in the node's namespace: `p<i>`.
    pub node_link: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub run: Option<PodRun>,
}

/// A pod's process with every name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRun {
    Server {
        version: String,
        port: u16,
    },
    /// `url` has service hosts replaced by their VIP.
    Client {
        url: String,
        interval_ms: u64,
    },
}

/// A service and its VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub selector: BTreeMap<String, String>,
    /// Exported to the federation (label `trellis.io/global: "true"`).
    pub global: bool,
}

impl ClusterPlan {
    /// Routes every other host of the cluster needs: each node's pod CIDR via that node.
    pub fn pod_routes(&self) -> impl Iterator<Item = (Ipv4Addr, Ipv4Addr, &str)> {
        self.nodes.iter().map(|n| (n.pod_cidr, n.host.ip, n.name.as_str()))
    }

    /// The trust domain trellisd defaults to.
    pub fn trust_domain(&self) -> String {
        format!("{}.trellis.local", self.name)
    }
}

impl FederationPlan {
    /// etcd's client URL: `https://10.200.0.2:2379`.
    pub fn etcd_url(&self) -> String {
        format!("https://{}:{ETCD_PORT}", self.etcd.ip)
    }
}

impl GatewayPlan {
    /// Where other clusters tunnel to: `10.200.0.(10+c):15008` (`federation join --gateway`).
    pub fn wan_hbone(&self) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(self.wan_ip, HBONE_PORT)
    }

    /// The nftables ruleset (`nft -f`) of the gateway's namespace: what leaves the cluster for
    /// the wan is masqueraded; forwarded are replies, and new connections from the cluster to
    /// the wan for tunnels and etcd only; everything else, the wan into the cluster included,
    /// is dropped.
    pub fn edge_rules(&self) -> String {
        let mut r = String::new();
        let cidr = format!("{}/16", self.cluster_cidr);
        let _ = writeln!(r, "table ip {EDGE_TABLE} {{");
        let _ = writeln!(r, "  chain postrouting {{");
        let _ = writeln!(r, "    type nat hook postrouting priority srcnat; policy accept;");
        let _ = writeln!(r, "    ip saddr {cidr} oifname \"{WAN_IF}\" masquerade");
        let _ = writeln!(r, "  }}");
        let _ = writeln!(r, "  chain forward {{");
        let _ = writeln!(r, "    type filter hook forward priority filter; policy drop;");
        let _ = writeln!(r, "    ct state established,related accept");
        let _ = writeln!(
            r,
            "    iifname \"eth0\" oifname \"{WAN_IF}\" ip saddr {cidr} ct state new tcp dport {{ {HBONE_PORT}, {ETCD_PORT} }} accept"
        );
        let _ = writeln!(
            r,
            "    iifname \"eth0\" oifname \"{WAN_IF}\" ip saddr {cidr} ct state new udp dport {QUIC_PORT} accept"
        );
        let _ = writeln!(r, "  }}");
        let _ = writeln!(r, "}}");
        r
    }
}

/// Builds the plan of lab `lab` from `topo`, refusing anything inconsistent with a message that
/// names the entry at fault.
pub fn plan(lab: &str, topo: &Topology) -> anyhow::Result<Plan> {
    spec::check_short_name("lab", lab)?;
    if topo.clusters.is_empty() {
        bail!("clusters: the lab needs at least one cluster");
    }
    if topo.clusters.len() > MAX_CLUSTERS {
        bail!(
            "clusters: {} clusters; the lab holds at most {MAX_CLUSTERS}",
            topo.clusters.len()
        );
    }
    let mut namespaces = BTreeSet::new();
    for ns in &topo.namespaces {
        check_label("namespaces", "namespace", &ns.name)?;
        if !namespaces.insert(ns.name.as_str()) {
            bail!("namespaces: namespace {:?} is listed twice", ns.name);
        }
    }
    let mut clusters: Vec<ClusterPlan> = Vec::new();
    for (ci, c) in topo.clusters.iter().enumerate() {
        spec::check_short_name("cluster", &c.name).context("clusters")?;
        if clusters.iter().any(|p| p.name == c.name) {
            bail!("clusters: cluster {:?} is listed twice", c.name);
        }
        let what = format!("cluster {}", c.name);
        if let Some(network) = &c.network {
            check_label(&what, "network", network)?;
        }
        for (field, value) in [("region", &c.region), ("zone", &c.zone)] {
            if !value.is_empty() {
                check_label(&what, field, value)?;
            }
        }
        if c.nodes == 0 || c.nodes as usize > MAX_PER_PARENT {
            bail!(
                "cluster {}: nodes must be 1 to {MAX_PER_PARENT}, not {}",
                c.name,
                c.nodes
            );
        }
        if let Some(node) = c
            .node_ztunnel_args
            .keys()
            .find(|node| !(1..=c.nodes).any(|n| **node == format!("node-{n}")))
        {
            bail!(
                "cluster {}: nodeZtunnelArgs names {node:?}, which is not one of its nodes node-1 to node-{}",
                c.name,
                c.nodes
            );
        }
        let ci = u8::try_from(ci + 1).context("too many clusters")?;
        let net = |third: u8, last: u8| Ipv4Addr::new(10, ci, third, last);
        let nodes = (1..=c.nodes as u8)
            .map(|n| NodePlan {
                name: format!("node-{n}"),
                index: n,
                host: Host {
                    netns: format!("tl-{lab}-{}-node-{n}", c.name),
                    ip: net(0, 10 + n),
                    uplink: format!("c{ci}n{n}"),
                },
                pod_cidr: net(n, 0),
                gateway: net(n, 1),
                pods: Vec::new(),
                ztunnel_args: c
                    .node_ztunnel_args
                    .get(&format!("node-{n}"))
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        clusters.push(ClusterPlan {
            name: c.name.clone(),
            index: ci,
            bridge: format!("br-{}", c.name),
            cp: Host {
                netns: format!("tl-{lab}-{}-cp", c.name),
                ip: net(0, 2),
                uplink: format!("c{ci}cp"),
            },
            nodes,
            services: Vec::new(),
            network: c.network.clone().unwrap_or_else(|| c.name.clone()),
            region: c.region.clone(),
            zone: c.zone.clone(),
            trellisd_args: c.trellisd_args.clone(),
            ztunnel_args: c.ztunnel_args.clone(),
        });
    }
    let mut service_cluster = Vec::new();
    for s in &topo.services {
        let what = format!("service {}/{}", s.namespace, s.name);
        check_label(&what, "service", &s.name)?;
        if !namespaces.contains(s.namespace.as_str()) {
            bail!("{what}: namespace {:?} is not in namespaces", s.namespace);
        }
        if s.port == 0 || s.target_port == Some(0) {
            bail!("{what}: ports must be 1 to 65535");
        }
        service_cluster.push((cluster_of(&clusters, &what, &s.cluster)?, s));
    }
    for (ci, s) in service_cluster {
        let cluster = &mut clusters[ci];
        if cluster
            .services
            .iter()
            .any(|o| o.name == s.name && o.namespace == s.namespace)
        {
            bail!(
                "service {}/{}: listed twice in cluster {}",
                s.namespace,
                s.name,
                cluster.name
            );
        }
        if cluster.services.len() == MAX_PER_PARENT {
            bail!(
                "service {}/{}: cluster {} has more than {MAX_PER_PARENT} services",
                s.namespace,
                s.name,
                cluster.name
            );
        }
        let k = cluster.services.len() as u8;
        cluster.services.push(ServicePlan {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            vip: Ipv4Addr::new(10, 100 + cluster.index, 0, 10 + k),
            port: s.port,
            target_port: s.target_port.unwrap_or(s.port),
            selector: s.selector.clone(),
            global: s.global,
        });
    }
    for p in &topo.pods {
        let what = format!("pod {}/{}", p.namespace, p.name);
        check_label(&what, "pod", &p.name)?;
        if !namespaces.contains(p.namespace.as_str()) {
            bail!("{what}: namespace {:?} is not in namespaces", p.namespace);
        }
        let service_account = p.service_account.clone().unwrap_or_else(|| "default".into());
        check_label(&what, "serviceAccount", &service_account)?;
        let ci = cluster_of(&clusters, &what, &p.cluster)?;
        let run = match &p.run {
            None => None,
            Some(Run::Server { version, port }) => {
                if *port == 0 || version.is_empty() || version.chars().any(char::is_whitespace) {
                    bail!("{what}: run.server needs a version without spaces and a port of 1 to 65535");
                }
                Some(PodRun::Server {
                    version: version.clone(),
                    port: *port,
                })
            }
            Some(Run::Client { url, interval_ms }) => {
                if *interval_ms < 10 {
                    bail!("{what}: run.client.intervalMs must be at least 10");
                }
                Some(PodRun::Client {
                    url: resolve_url(url, &clusters[ci]).with_context(|| what.clone())?,
                    interval_ms: *interval_ms,
                })
            }
        };
        let cluster = &mut clusters[ci];
        let in_cluster = cluster.nodes.iter().flat_map(|n| &n.pods);
        if in_cluster
            .into_iter()
            .any(|o| o.name == p.name && o.namespace == p.namespace)
        {
            bail!("{what}: listed twice in cluster {}", cluster.name);
        }
        let cluster_name = cluster.name.clone();
        let node = cluster.nodes.iter_mut().find(|n| n.name == p.node).with_context(|| {
            format!(
                "{what}: node {:?} is not a node of cluster {cluster_name} (node-1..node-{})",
                p.node, topo.clusters[ci].nodes
            )
        })?;
        if node.pods.len() == MAX_PER_PARENT {
            bail!(
                "{what}: node {} of cluster {cluster_name} has more than {MAX_PER_PARENT} pods",
                node.name
            );
        }
        let i = node.pods.len();
        node.pods.push(PodPlan {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            netns: format!("tl-{lab}-{cluster_name}-{}-{}", p.namespace, p.name),
            ip: Ipv4Addr::new(10, cluster.index, node.index, 10 + i as u8),
            node_link: format!("p{i}"),
            service_account,
            labels: p.labels.clone(),
            annotations: p.annotations.clone(),
            run,
        });
    }
    let federation = federation(lab, &clusters)?;
    let plan = Plan {
        lab: lab.to_string(),
        underlay: format!("tl-{lab}-u"),
        clusters,
        namespaces: topo.namespaces.clone(),
        federation,
    };
    let mut seen = BTreeSet::new();
    for ns in plan.netns() {
        if !seen.insert(ns.clone()) {
            bail!("two entries would share the network namespace {ns}: rename a pod, namespace or cluster");
        }
    }
    Ok(plan)
}

/// The federation part of the plan: none for a single cluster.
fn federation(lab: &str, clusters: &[ClusterPlan]) -> anyhow::Result<Option<FederationPlan>> {
    if clusters.len() < 2 {
        return Ok(None);
    }
    let bridge = "br-wan".to_string();
    for (i, c) in clusters.iter().enumerate() {
        if c.bridge == bridge {
            bail!(
                "cluster {}: the name is reserved in a lab of several clusters (its bridge would be {bridge}, the wan's): rename it",
                c.name
            );
        }
        if let Some(other) = clusters[..i].iter().find(|o| o.network == c.network) {
            bail!(
                "cluster {}: network {:?} is cluster {}'s too, but each lab cluster has a network of its own \
                 (its pods are reached only through its gateway): give them different networks",
                c.name,
                c.network,
                other.name
            );
        }
    }
    let wan = |last: u8| Ipv4Addr::new(10, 200, 0, last);
    let gateways = clusters
        .iter()
        .map(|c| GatewayPlan {
            cluster: c.name.clone(),
            host: Host {
                netns: format!("tl-{lab}-{}-gw", c.name),
                ip: Ipv4Addr::new(10, c.index, 0, 3),
                uplink: format!("c{}gw", c.index),
            },
            wan_ip: wan(10 + c.index),
            wan_uplink: format!("w{}gw", c.index),
            cluster_cidr: Ipv4Addr::new(10, c.index, 0, 0),
        })
        .collect();
    Ok(Some(FederationPlan {
        bridge,
        network: WAN_NETWORK,
        etcd: Host {
            netns: format!("tl-{lab}-etcd"),
            ip: wan(2),
            uplink: "wetcd".into(),
        },
        gateways,
    }))
}

impl Plan {
    /// Cluster `c`'s east-west gateway, in a federation.
    pub fn gateway(&self, c: &ClusterPlan) -> Option<&GatewayPlan> {
        self.federation.as_ref()?.gateways.iter().find(|g| g.cluster == c.name)
    }

    /// Every network namespace, in creation order (underlay, etcd, then per cluster: control
    /// plane, gateway, nodes, pods).
    pub fn netns(&self) -> Vec<String> {
        let mut all = vec![self.underlay.clone()];
        if let Some(f) = &self.federation {
            all.push(f.etcd.netns.clone());
        }
        for c in &self.clusters {
            all.push(c.cp.netns.clone());
            if let Some(g) = self.gateway(c) {
                all.push(g.host.netns.clone());
            }
            all.extend(c.nodes.iter().map(|n| n.host.netns.clone()));
            all.extend(c.nodes.iter().flat_map(|n| n.pods.iter().map(|p| p.netns.clone())));
        }
        all
    }
}

/// The index of the cluster an entry names (the first one when it names none).
fn cluster_of(clusters: &[ClusterPlan], what: &str, name: &Option<String>) -> anyhow::Result<usize> {
    match name {
        None => Ok(0),
        Some(n) => clusters
            .iter()
            .position(|c| &c.name == n)
            .with_context(|| format!("{what}: cluster {n:?} is not in clusters")),
    }
}

fn check_label(what: &str, field: &str, name: &str) -> anyhow::Result<()> {
    if spec::is_label(name, 63) {
        Ok(())
    } else {
        bail!("{what}: {field} {name:?} is not valid: use lowercase letters, digits and '-' (at most 63)")
    }
}

/// Replaces a `<service>.<namespace>` host in an http:// URL with the service's VIP (the lab
/// has no DNS); an IPv4 host is kept.
fn resolve_url(url: &str, cluster: &ClusterPlan) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("run.client.url {url:?}: only http:// URLs are supported"))?;
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h, Some(p)),
        Some(_) => bail!("run.client.url {url:?}: the port is not a number of 1 to 65535"),
        None => (authority, None),
    };
    let ip = match host.parse::<Ipv4Addr>() {
        Ok(ip) => ip,
        Err(_) => {
            let (svc, ns) = host.split_once('.').with_context(|| {
                format!("run.client.url {url:?}: the host must be an IPv4 address or <service>.<namespace>")
            })?;
            cluster
                .services
                .iter()
                .find(|s| s.name == svc && s.namespace == ns)
                .with_context(|| {
                    format!(
                        "run.client.url {url:?}: no service {ns}/{svc} in cluster {}",
                        cluster.name
                    )
                })?
                .vip
        }
    };
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let path = if path.is_empty() { "/" } else { path };
    Ok(format!("http://{ip}{port}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Plan {
        plan("demo", &spec::parse("demo", spec::DEMO).unwrap()).unwrap()
    }

    fn err(text: &str) -> String {
        let topo = spec::parse("t", text).unwrap();
        format!("{:#}", plan("t", &topo).unwrap_err())
    }

    #[test]
    fn the_demo_gets_the_documented_addresses() {
        let p = demo();
        assert_eq!(p.underlay, "tl-demo-u");
        let east = &p.clusters[0];
        assert_eq!(east.bridge, "br-east");
        assert_eq!(
            (east.cp.netns.as_str(), east.cp.ip),
            ("tl-demo-east-cp", Ipv4Addr::new(10, 1, 0, 2))
        );
        assert_eq!(east.cp.uplink, "c1cp");
        let n2 = &east.nodes[1];
        assert_eq!(
            (n2.host.netns.as_str(), n2.host.ip),
            ("tl-demo-east-node-2", Ipv4Addr::new(10, 1, 0, 12))
        );
        assert_eq!(
            (n2.host.uplink.as_str(), n2.pod_cidr),
            ("c1n2", Ipv4Addr::new(10, 1, 2, 0))
        );
        assert_eq!(n2.gateway, Ipv4Addr::new(10, 1, 2, 1));
        let n1 = &east.nodes[0];
        let names: Vec<_> = n1
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.ip, p.node_link.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("hello-v1", Ipv4Addr::new(10, 1, 1, 10), "p0"),
                ("client", Ipv4Addr::new(10, 1, 1, 11), "p1")
            ]
        );
        assert_eq!(n1.pods[1].netns, "tl-demo-east-demo-client");
        assert!(n2.pods.is_empty());
        assert_eq!(east.services[0].vip, Ipv4Addr::new(10, 101, 0, 10));
        assert_eq!(east.services[0].target_port, 8080);
        assert!(east.services[0].global);
        assert_eq!(east.network, "east");
        let west = &p.clusters[1];
        assert_eq!((west.index, west.bridge.as_str()), (2, "br-west"));
        assert_eq!(west.nodes.len(), 1);
        let v2 = &west.nodes[0].pods[0];
        assert_eq!(
            (v2.name.as_str(), v2.netns.as_str(), v2.ip),
            ("hello-v2", "tl-demo-west-demo-hello-v2", Ipv4Addr::new(10, 2, 1, 10))
        );
        assert_eq!(west.services[0].vip, Ipv4Addr::new(10, 102, 0, 10));
        assert!(west.services[0].global);
        assert_eq!(
            n1.pods[1].run,
            Some(PodRun::Client {
                url: "http://10.101.0.10/".into(),
                interval_ms: 1000
            })
        );
    }

    #[test]
    fn node_ztunnel_args_go_to_the_node_they_name_and_a_stranger_is_refused() {
        let topo = spec::parse(
            "t",
            "clusters:\n  - {name: east, nodes: 2, ztunnelArgs: [-v], nodeZtunnelArgs: {node-2: [--transport-remote, h2]}}\nnamespaces: []\n",
        )
        .unwrap();
        let east = &plan("t", &topo).unwrap().clusters[0];
        assert_eq!(east.ztunnel_args, ["-v"]);
        assert!(east.nodes[0].ztunnel_args.is_empty());
        assert_eq!(east.nodes[1].ztunnel_args, ["--transport-remote", "h2"]);
        let refused = err("clusters:\n  - {name: east, nodes: 2, nodeZtunnelArgs: {node-3: [-v]}}\nnamespaces: []\n");
        assert!(
            refused.contains("nodeZtunnelArgs names \"node-3\", which is not one of its nodes node-1 to node-2"),
            "{refused}"
        );
    }

    #[test]
    fn every_interface_name_fits_the_kernel_limit() {
        let mut text = String::from("clusters:\n");
        for c in 0..99 {
            text.push_str(&format!("  - {{name: c{c:07}, nodes: 200}}\n"));
        }
        let p = plan("abcdefgh", &spec::parse("t", &text).unwrap()).unwrap();
        for c in &p.clusters {
            assert!(c.bridge.len() <= 15 && c.cp.uplink.len() <= 15);
            assert!(c.nodes.iter().all(|n| n.host.uplink.len() <= 15));
        }
        assert_eq!(p.clusters[98].nodes[199].host.ip, Ipv4Addr::new(10, 99, 0, 210));
        let f = p.federation.as_ref().unwrap();
        assert!(f.bridge.len() <= 15 && f.etcd.uplink.len() <= 15 && WAN_IF.len() <= 15);
        for g in &f.gateways {
            assert!(g.host.uplink.len() <= 15 && g.wan_uplink.len() <= 15);
        }
        let last = &f.gateways[98];
        assert_eq!(
            (last.host.uplink.as_str(), last.wan_uplink.as_str()),
            ("c99gw", "w99gw")
        );
        assert_eq!(last.wan_ip, Ipv4Addr::new(10, 200, 0, 109));
    }

    #[test]
    fn a_federation_gets_the_wan_etcd_and_a_gateway_per_cluster() {
        let p = demo();
        let f = p.federation.as_ref().expect("two clusters are a federation");
        assert_eq!((f.bridge.as_str(), f.network), ("br-wan", Ipv4Addr::new(10, 200, 0, 0)));
        assert_eq!(
            (f.etcd.netns.as_str(), f.etcd.ip, f.etcd.uplink.as_str()),
            ("tl-demo-etcd", Ipv4Addr::new(10, 200, 0, 2), "wetcd")
        );
        assert_eq!(f.etcd_url(), "https://10.200.0.2:2379");
        let gws: Vec<_> = f
            .gateways
            .iter()
            .map(|g| {
                (
                    g.cluster.as_str(),
                    g.host.netns.as_str(),
                    g.host.ip,
                    g.host.uplink.as_str(),
                    g.wan_ip,
                    g.wan_uplink.as_str(),
                )
            })
            .collect();
        assert_eq!(
            gws,
            [
                (
                    "east",
                    "tl-demo-east-gw",
                    Ipv4Addr::new(10, 1, 0, 3),
                    "c1gw",
                    Ipv4Addr::new(10, 200, 0, 11),
                    "w1gw"
                ),
                (
                    "west",
                    "tl-demo-west-gw",
                    Ipv4Addr::new(10, 2, 0, 3),
                    "c2gw",
                    Ipv4Addr::new(10, 200, 0, 12),
                    "w2gw"
                ),
            ]
        );
        assert_eq!(
            p.gateway(&p.clusters[1]).unwrap().wan_hbone().to_string(),
            "10.200.0.12:15008"
        );
        assert_eq!(
            p.gateway(&p.clusters[0]).unwrap().cluster_cidr,
            Ipv4Addr::new(10, 1, 0, 0)
        );
        assert_eq!(GATEWAY_NODE, "east-west-gateway");
        assert_eq!(
            p.netns(),
            [
                "tl-demo-u",
                "tl-demo-etcd",
                "tl-demo-east-cp",
                "tl-demo-east-gw",
                "tl-demo-east-node-1",
                "tl-demo-east-node-2",
                "tl-demo-east-demo-hello-v1",
                "tl-demo-east-demo-client",
                "tl-demo-west-cp",
                "tl-demo-west-gw",
                "tl-demo-west-node-1",
                "tl-demo-west-demo-hello-v2",
            ]
        );
    }

    #[test]
    fn a_single_cluster_has_no_federation() {
        let p = plan("t", &spec::parse("t", "clusters: [{name: wan, nodes: 1}]").unwrap()).unwrap();
        assert_eq!(p.federation, None);
        assert_eq!(p.gateway(&p.clusters[0]), None);
        assert_eq!(p.netns(), ["tl-t-u", "tl-t-wan-cp", "tl-t-wan-node-1"]);
    }

    #[test]
    fn the_edge_forwards_only_tunnels_and_etcd_to_the_wan() {
        let p = demo();
        let rules = p.gateway(&p.clusters[1]).unwrap().edge_rules();
        assert!(rules.starts_with("table ip trellis_lab_edge {\n"), "{rules}");
        assert!(
            rules.contains("ip saddr 10.2.0.0/16 oifname \"wan0\" masquerade"),
            "{rules}"
        );
        assert!(
            rules.contains("type filter hook forward priority filter; policy drop;"),
            "{rules}"
        );
        assert!(rules.contains("ct state established,related accept"), "{rules}");
        let new: Vec<&str> = rules.lines().filter(|l| l.contains("ct state new")).collect();
        assert_eq!(
            new,
            [
                "    iifname \"eth0\" oifname \"wan0\" ip saddr 10.2.0.0/16 ct state new tcp dport { 15008, 2379 } accept",
                "    iifname \"eth0\" oifname \"wan0\" ip saddr 10.2.0.0/16 ct state new udp dport 15009 accept",
            ],
            "{rules}"
        );
    }

    #[test]
    fn federation_settings_are_checked() {
        let text = "clusters: [{name: a, nodes: 1, network: n, region: eu-1, zone: eu-1a}, {name: b, nodes: 1}]";
        let p = plan("t", &spec::parse("t", text).unwrap()).unwrap();
        let a = &p.clusters[0];
        assert_eq!(
            (a.network.as_str(), a.region.as_str(), a.zone.as_str()),
            ("n", "eu-1", "eu-1a")
        );
        assert_eq!(p.clusters[1].network, "b");
        assert!(err("clusters: [{name: a, nodes: 1, network: N}]").contains("cluster a: network \"N\" is not valid"));
        assert!(err("clusters: [{name: a, nodes: 1, zone: 'z 1'}]").contains("cluster a: zone \"z 1\" is not valid"));
        let shared = err("clusters: [{name: a, nodes: 1, network: n}, {name: b, nodes: 1, network: n}]");
        assert!(
            shared.contains("cluster b: network \"n\" is cluster a's too"),
            "{shared}"
        );
        let shared = err("clusters: [{name: a, nodes: 1, network: b}, {name: b, nodes: 1}]");
        assert!(
            shared.contains("cluster b: network \"b\" is cluster a's too"),
            "{shared}"
        );
        let wan = err("clusters: [{name: a, nodes: 1}, {name: wan, nodes: 1}]");
        assert!(wan.contains("cluster wan: the name is reserved"), "{wan}");
    }

    #[test]
    fn a_gateway_namespace_colliding_with_a_pod_is_refused() {
        let text = "clusters: [{name: a, nodes: 1}, {name: a-b, nodes: 1}]\nnamespaces: [{name: b}]\n\
            pods: [{name: gw, namespace: b, cluster: a, node: node-1}]\n";
        assert!(err(text).contains("share the network namespace tl-t-a-b-gw"));
    }

    #[test]
    fn second_cluster_and_ips_in_urls() {
        let text = "clusters: [{name: a, nodes: 1}, {name: b, nodes: 1}]\nnamespaces: [{name: n}]\n\
            services: [{name: s, namespace: n, cluster: b, port: 80}]\n\
            pods: [{name: c, namespace: n, cluster: b, node: node-1, run: {client: {url: 'http://s.n:8080/x', intervalMs: 100}}},\n\
                   {name: d, namespace: n, node: node-1, run: {client: {url: 'http://10.2.1.10', intervalMs: 100}}}]\n";
        let p = plan("t", &spec::parse("t", text).unwrap()).unwrap();
        let b = &p.clusters[1];
        assert_eq!(b.services[0].vip, Ipv4Addr::new(10, 102, 0, 10));
        assert_eq!(b.nodes[0].pods[0].ip, Ipv4Addr::new(10, 2, 1, 10));
        assert_eq!(
            b.nodes[0].pods[0].run,
            Some(PodRun::Client {
                url: "http://10.102.0.10:8080/x".into(),
                interval_ms: 100
            })
        );
        let d = &p.clusters[0].nodes[0].pods[0];
        assert_eq!(
            d.run,
            Some(PodRun::Client {
                url: "http://10.2.1.10/".into(),
                interval_ms: 100
            })
        );
    }

    #[test]
    fn bad_references_and_duplicates_name_the_entry() {
        let head = "clusters: [{name: east, nodes: 2}]\nnamespaces: [{name: demo}]\n";
        let cases = [
            ("pods: [{name: p, namespace: demo, node: node-3}]", "pod demo/p: node \"node-3\""),
            ("pods: [{name: p, namespace: shop, node: node-1}]", "pod shop/p: namespace \"shop\""),
            ("pods: [{name: p, namespace: demo, cluster: west, node: node-1}]", "pod demo/p: cluster \"west\""),
            ("pods: [{name: p, namespace: demo, node: node-1}, {name: p, namespace: demo, node: node-2}]", "pod demo/p: listed twice"),
            ("services: [{name: s, namespace: demo, port: 80}, {name: s, namespace: demo, port: 81}]", "service demo/s: listed twice"),
            ("services: [{name: S, namespace: demo, port: 80}]", "service \"S\" is not valid"),
            ("pods: [{name: c, namespace: demo, node: node-1, run: {client: {url: 'http://nope.demo/', intervalMs: 100}}}]", "no service demo/nope"),
            ("pods: [{name: c, namespace: demo, node: node-1, run: {client: {url: 'https://x/', intervalMs: 100}}}]", "only http://"),
        ];
        for (tail, want) in cases {
            let e = err(&format!("{head}{tail}\n"));
            assert!(e.contains(want), "{tail}: {e}");
        }
        assert!(err("clusters: [{name: a, nodes: 1}, {name: a, nodes: 1}]").contains("cluster \"a\" is listed twice"));
        assert!(err("clusters: [{name: a, nodes: 201}]").contains("cluster a: nodes must be 1 to 200"));
        assert!(err("clusters: [{name: waytoolong, nodes: 1}]").contains("cluster name \"waytoolong\""));
        assert!(err("clusters: []").contains("at least one cluster"));
    }

    #[test]
    fn too_many_pods_on_a_node_is_refused() {
        let mut text = String::from("clusters: [{name: a, nodes: 1}]\nnamespaces: [{name: n}]\npods:\n");
        for i in 0..201 {
            text.push_str(&format!("  - {{name: p{i}, namespace: n, node: node-1}}\n"));
        }
        assert!(err(&text).contains("pod n/p200: node node-1 of cluster a has more than 200 pods"));
    }

    #[test]
    fn colliding_namespace_names_are_refused() {
        let text = "clusters: [{name: a, nodes: 1}]\nnamespaces: [{name: x}, {name: x-y}]\n\
            pods: [{name: y-z, namespace: x, node: node-1}, {name: z, namespace: x-y, node: node-1}]\n";
        assert!(err(text).contains("share the network namespace tl-t-a-x-y-z"));
    }
}
