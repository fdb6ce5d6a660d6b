//! Builds the plan's network with iproute2: namespaces, the cluster bridges, veth pairs,
//! addresses and routes; in a federation also the wan, etcd's namespace and each cluster's
//! gateway namespace with its nftables edge. Everything is made inside namespaces the lab
//! creates; the host's own network is never touched.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use super::plan::{self, ClusterPlan, FederationPlan, GatewayPlan, Host, NodePlan, Plan, PodPlan};
use super::state::{self, State};

/// Runs `ip <args>`, failing with the command and its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n <ns> <args>`.
fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Whether network namespace `ns` exists.
pub fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// Creates namespace `ns` with `lo` up, recording it first so a failure can remove it. A
/// namespace that already exists belongs to someone else and is refused, not adopted.
fn add_netns(state: &State, ns: &str) -> anyhow::Result<()> {
    if netns_exists(ns) {
        bail!(
            "network namespace {ns} already exists and this lab did not make it: another lab uses the \
             name, or a crashed one left it behind (remove it with `ip netns del {ns}`)"
        );
    }
    state.record_netns(ns)?;
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"])
}

/// Deletes namespace `ns` (and with it its interfaces); one that is already gone is fine.
pub fn delete_netns(ns: &str) -> anyhow::Result<()> {
    if netns_exists(ns) {
        ip(&["netns", "del", ns])?;
    }
    Ok(())
}

/// Runs `sysctl -w <setting>` inside namespace `ns`.
fn sysctl_in(ns: &str, setting: &str) -> anyhow::Result<()> {
    ip(&["netns", "exec", ns, "sysctl", "-q", "-w", setting])
}

/// Builds every namespace, link, address and route of the plan.
pub fn build(plan: &Plan, state: &State) -> anyhow::Result<()> {
    add_netns(state, &plan.underlay)?;
    if let Some(f) = &plan.federation {
        build_wan(plan, f, state).context("building the wan")?;
    }
    for cluster in &plan.clusters {
        build_cluster(plan, cluster, state).with_context(|| format!("building cluster {}", cluster.name))?;
    }
    Ok(())
}

/// The wan bridge and etcd's namespace on it.
fn build_wan(plan: &Plan, f: &FederationPlan, state: &State) -> anyhow::Result<()> {
    let u = plan.underlay.as_str();
    ip_in(u, &["link", "add", &f.bridge, "type", "bridge"])?;
    ip_in(u, &["link", "set", &f.bridge, "up"])?;
    attach(u, &f.bridge, &f.etcd, state).context("etcd's namespace")
}

fn build_cluster(plan: &Plan, cluster: &ClusterPlan, state: &State) -> anyhow::Result<()> {
    let u = plan.underlay.as_str();
    ip_in(u, &["link", "add", &cluster.bridge, "type", "bridge"])?;
    ip_in(u, &["link", "set", &cluster.bridge, "up"])?;
    attach(u, &cluster.bridge, &cluster.cp, state)?;
    let edge = match (&plan.federation, plan.gateway(cluster)) {
        (Some(f), Some(gw)) => {
            build_gateway(plan, f, cluster, gw, state).context("its east-west gateway")?;
            Some(gw)
        }
        _ => None,
    };
    for node in &cluster.nodes {
        attach(u, &cluster.bridge, &node.host, state)?;
        sysctl_in(&node.host.netns, "net.ipv4.ip_forward=1")?;
        for pod in &node.pods {
            build_pod(node, pod, state).with_context(|| format!("pod {}/{}", pod.namespace, pod.name))?;
        }
    }
    // Every host of the cluster network reaches each node's pods through that node.
    let gw_host = edge.map(|g| &g.host);
    let hosts = std::iter::once(&cluster.cp)
        .chain(gw_host)
        .chain(cluster.nodes.iter().map(|n| &n.host));
    for host in hosts {
        for (cidr, via, _) in cluster.pod_routes().filter(|(_, via, _)| *via != host.ip) {
            ip_in(
                &host.netns,
                &["route", "add", &format!("{cidr}/24"), "via", &via.to_string()],
            )?;
        }
    }
    // The control plane and the nodes reach the wan (etcd, other clusters' gateways) through
    // the gateway; nothing else does, and nothing routes the other way.
    if let (Some(f), Some(gw)) = (&plan.federation, edge) {
        let wan = format!("{}/24", f.network);
        let via = gw.host.ip.to_string();
        for host in std::iter::once(&cluster.cp).chain(cluster.nodes.iter().map(|n| &n.host)) {
            ip_in(&host.netns, &["route", "add", &wan, "via", &via])?;
        }
    }
    Ok(())
}

/// The gateway's namespace on both the cluster bridge (`eth0`) and the wan ([`plan::WAN_IF`]),
/// forwarding, and its nftables edge (the ruleset is kept in the state directory).
fn build_gateway(
    plan: &Plan,
    f: &FederationPlan,
    cluster: &ClusterPlan,
    gw: &GatewayPlan,
    state: &State,
) -> anyhow::Result<()> {
    let u = plan.underlay.as_str();
    let ns = gw.host.netns.as_str();
    attach(u, &cluster.bridge, &gw.host, state)?;
    plug_named(u, &gw.wan_uplink, ns, plan::WAN_IF, &format!("{}/24", gw.wan_ip))?;
    ip_in(u, &["link", "set", &gw.wan_uplink, "master", &f.bridge, "up"])?;
    sysctl_in(ns, "net.ipv4.ip_forward=1")?;
    let rules = state.edge_rules(&cluster.name);
    state::write(&rules, &gw.edge_rules())?;
    ip(&["netns", "exec", ns, "nft", "-f", &rules.to_string_lossy()])
        .context("installing the gateway's nftables edge (is nftables installed?)")
}

/// Makes `host`'s namespace and plugs its `eth0` into `bridge` (in the underlay `u`).
fn attach(u: &str, bridge: &str, host: &Host, state: &State) -> anyhow::Result<()> {
    add_netns(state, &host.netns)?;
    plug(u, &host.uplink, &host.netns, &format!("{}/24", host.ip))?;
    ip_in(u, &["link", "set", &host.uplink, "master", bridge, "up"])
}

/// A veth pair from `outer` (named `link` there) to `inner` (named `eth0`, with `address`, up).
fn plug(outer: &str, link: &str, inner: &str, address: &str) -> anyhow::Result<()> {
    plug_named(outer, link, inner, "eth0", address)
}

/// A veth pair from `outer` (named `link` there) to `inner` (named `name`, with `address`, up).
fn plug_named(outer: &str, link: &str, inner: &str, name: &str, address: &str) -> anyhow::Result<()> {
    ip_in(
        outer,
        &[
            "link", "add", link, "type", "veth", "peer", "name", name, "netns", inner,
        ],
    )?;
    ip_in(inner, &["addr", "add", address, "dev", name])?;
    ip_in(inner, &["link", "set", name, "up"])
}

/// Makes a pod's namespace behind its node, routed the way Calico does it: a /32 on the pod,
/// the same gateway address on every node-side veth, a host route per pod on the node.
fn build_pod(node: &NodePlan, pod: &PodPlan, state: &State) -> anyhow::Result<()> {
    let (n, p) = (node.host.netns.as_str(), pod.netns.as_str());
    let gw = node.gateway.to_string();
    add_netns(state, p)?;
    plug(n, &pod.node_link, p, &format!("{}/32", pod.ip))?;
    ip_in(p, &["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
    ip_in(p, &["route", "add", "default", "via", &gw, "dev", "eth0"])?;
    ip_in(n, &["addr", "add", &format!("{gw}/32"), "dev", &pod.node_link])?;
    ip_in(n, &["link", "set", &pod.node_link, "up"])?;
    ip_in(n, &["route", "add", &format!("{}/32", pod.ip), "dev", &pod.node_link])
}
