//! The lab's address plan: a pure function from a [`Topology`] to every network namespace,
//! interface, address and route the lab will have. Nothing here touches the system.
//!
//! Cluster `c` (1-based, file order) has the cluster network 10.c.0.0/24 on bridge `br-<cluster>`
//! in the underlay namespace: trellisd at 10.c.0.2, node `n` at 10.c.0.(10+n). Node `n` owns the
//! pod CIDR 10.c.n.0/24; its i-th pod (0-based, file order) is 10.c.n.(10+i). The k-th service of
//! the cluster has VIP 10.(100+c).0.(10+k).

use std::collections::{BTreeMap, BTreeSet};
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
        if c.nodes == 0 || c.nodes as usize > MAX_PER_PARENT {
            bail!(
                "cluster {}: nodes must be 1 to {MAX_PER_PARENT}, not {}",
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
            run,
        });
    }
    let plan = Plan {
        lab: lab.to_string(),
        underlay: format!("tl-{lab}-u"),
        clusters,
        namespaces: topo.namespaces.clone(),
    };
    let mut seen = BTreeSet::new();
    for ns in plan.netns() {
        if !seen.insert(ns.clone()) {
            bail!("two entries would share the network namespace {ns}: rename a pod, namespace or cluster");
        }
    }
    Ok(plan)
}

impl Plan {
    /// Every network namespace, in creation order (underlay, then per cluster: control plane,
    /// nodes, pods).
    pub fn netns(&self) -> Vec<String> {
        let mut all = vec![self.underlay.clone()];
        for c in &self.clusters {
            all.push(c.cp.netns.clone());
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
        assert_eq!(n2.pods[0].ip, Ipv4Addr::new(10, 1, 2, 10));
        assert_eq!(east.services[0].vip, Ipv4Addr::new(10, 101, 0, 10));
        assert_eq!(east.services[0].target_port, 8080);
        assert_eq!(
            n1.pods[1].run,
            Some(PodRun::Client {
                url: "http://10.101.0.10/".into(),
                interval_ms: 1000
            })
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
