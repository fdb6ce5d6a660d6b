//! Builds the plan's network with iproute2: namespaces, the cluster bridges, veth pairs,
//! addresses and routes. Everything is made inside namespaces the lab creates; the host's own
//! network is never touched.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use super::plan::{ClusterPlan, Host, NodePlan, Plan, PodPlan};
use super::state::State;

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

/// Builds every namespace, link, address and route of the plan.
pub fn build(plan: &Plan, state: &State) -> anyhow::Result<()> {
    add_netns(state, &plan.underlay)?;
    for cluster in &plan.clusters {
        build_cluster(plan, cluster, state).with_context(|| format!("building cluster {}", cluster.name))?;
    }
    Ok(())
}

fn build_cluster(plan: &Plan, cluster: &ClusterPlan, state: &State) -> anyhow::Result<()> {
    let u = plan.underlay.as_str();
    ip_in(u, &["link", "add", &cluster.bridge, "type", "bridge"])?;
    ip_in(u, &["link", "set", &cluster.bridge, "up"])?;
    attach(plan, cluster, &cluster.cp, state)?;
    for node in &cluster.nodes {
        attach(plan, cluster, &node.host, state)?;
        ip(&[
            "netns",
            "exec",
            &node.host.netns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ])?;
        for pod in &node.pods {
            build_pod(node, pod, state).with_context(|| format!("pod {}/{}", pod.namespace, pod.name))?;
        }
    }
    // Every host of the cluster network reaches each node's pods through that node.
    for host in std::iter::once(&cluster.cp).chain(cluster.nodes.iter().map(|n| &n.host)) {
        for (cidr, via, _) in cluster.pod_routes().filter(|(_, via, _)| *via != host.ip) {
            ip_in(
                &host.netns,
                &["route", "add", &format!("{cidr}/24"), "via", &via.to_string()],
            )?;
        }
    }
    Ok(())
}

/// Makes `host`'s namespace and plugs its `eth0` into the cluster bridge.
fn attach(plan: &Plan, cluster: &ClusterPlan, host: &Host, state: &State) -> anyhow::Result<()> {
    let u = plan.underlay.as_str();
    add_netns(state, &host.netns)?;
    plug(u, &host.uplink, &host.netns, &format!("{}/24", host.ip))?;
    ip_in(u, &["link", "set", &host.uplink, "master", &cluster.bridge, "up"])
}

/// A veth pair from `outer` (named `link` there) to `inner` (named `eth0`, with `address`, up).
fn plug(outer: &str, link: &str, inner: &str, address: &str) -> anyhow::Result<()> {
    ip_in(
        outer,
        &[
            "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", inner,
        ],
    )?;
    ip_in(inner, &["addr", "add", address, "dev", "eth0"])?;
    ip_in(inner, &["link", "set", "eth0", "up"])
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
