//! What the lab tells its user: the summary after `lab up`, and `lab status` (processes, etcd
//! and the gateways of a federation, each node's traffic counters, the clients' last calls, each
//! cluster's `trellis status`).

use std::net::SocketAddr;
use std::time::Duration;

use trellis_admin::client::get_blocking;

use super::netns::{accepts, in_netns};
use super::plan::{self, ClusterPlan, Plan, PodRun};
use super::procs;
use super::state::State;
use super::up;

/// The node counters `lab status` adds up (DESIGN.md, Observability).
const COUNTERS: [(&str, &str); 3] = [
    ("trellis_tcp_connections_opened_total", "connections opened"),
    ("trellis_tcp_sent_bytes_total", "bytes sent"),
    ("trellis_tcp_received_bytes_total", "bytes received"),
];

/// The summary printed after `lab up`.
pub fn summary(plan: &Plan, state: &State) -> String {
    let mut out = format!("lab {} is up\n", plan.lab);
    for c in &plan.clusters {
        out.push_str(&format!(
            "cluster {} (trust domain {}): trellisd {} in {}\n",
            c.name,
            c.trust_domain(),
            SocketAddr::from((c.cp.ip, plan::CA_PORT)),
            c.cp.netns
        ));
        for n in &c.nodes {
            out.push_str(&format!(
                "  node {:<10} {:<15} pods {}/24  netns {}\n",
                n.name, n.host.ip, n.pod_cidr, n.host.netns
            ));
            for p in &n.pods {
                let run = match &p.run {
                    None => String::new(),
                    Some(PodRun::Server { version, port }) => format!("server {version} on :{port}"),
                    Some(PodRun::Client { url, .. }) => format!("client of {url}"),
                };
                out.push_str(&format!(
                    "    pod {:<24} {:<15} {run:<28} netns {}\n",
                    format!("{}/{}", p.namespace, p.name),
                    p.ip,
                    p.netns
                ));
            }
        }
        for s in &c.services {
            out.push_str(&format!(
                "  service {:<20} {}:{} -> :{}\n",
                format!("{}/{}", s.namespace, s.name),
                s.vip,
                s.port,
                s.target_port
            ));
        }
    }
    if let Some(f) = &plan.federation {
        out.push_str(&format!(
            "federation: etcd {} in {} (certificates in {})\n",
            f.etcd_url(),
            f.etcd.netns,
            state.etcd_pki().display()
        ));
        for c in &plan.clusters {
            if let Some(gw) = plan.gateway(c) {
                out.push_str(&format!(
                    "  cluster {:<8} network {}{}: gateway {} (wan {}) netns {}\n",
                    c.name,
                    c.network,
                    locality(c),
                    gw.host.ip,
                    gw.wan_hbone(),
                    gw.host.netns
                ));
            }
        }
    }
    let lab_flag = lab_flag(plan, state);
    out.push_str(&format!("logs: {}\n", state.dir.join("logs").display()));
    out.push_str(&format!("status:   trellis lab status{lab_flag}\n"));
    out.push_str(&format!("teardown: trellis lab down{lab_flag}\n"));
    for c in &plan.clusters {
        out.push_str(&format!(
            "enrol a namespace of cluster {}: export TRELLIS_MANIFESTS={}; trellis namespace label <namespace> trellis.io/dataplane-mode=ambient\n",
            c.name,
            state.manifests(&c.name).display()
        ));
    }
    out
}

/// A cluster's region and zone, when it has them: `, region r, zone z`.
fn locality(c: &ClusterPlan) -> String {
    let mut out = String::new();
    for (what, value) in [("region", &c.region), ("zone", &c.zone)] {
        if !value.is_empty() {
            out.push_str(&format!(", {what} {value}"));
        }
    }
    out
}

/// The `--name` (and `--state-dir`, when not the default) flags that find this lab again.
fn lab_flag(plan: &Plan, state: &State) -> String {
    let mut flags = format!(" --name {}", plan.lab);
    if state.dir != super::default_state_dir(&plan.lab) {
        flags.push_str(&format!(" --state-dir {}", state.dir.display()));
    }
    flags
}

/// `lab status`: one report, built from probes made inside the lab's namespaces.
pub fn status(plan: &Plan, state: &State) -> String {
    let mut out = format!("lab {} (state {})\nprocesses:\n", plan.lab, state.dir.display());
    for p in state.recorded_processes() {
        let alive = if procs::is_ours(&p) {
            "alive".to_string()
        } else {
            format!(
                "dead (restart: trellis lab up --file {}{})",
                state.spec().display(),
                lab_flag(plan, state)
            )
        };
        out.push_str(&format!("  {:<36} pid {:<8} {alive}\n", p.name, p.pid));
    }
    if plan.federation.is_some() {
        out.push_str(&federation_status(plan, state));
    }
    for c in &plan.clusters {
        out.push_str(&format!("cluster {}:\n  nodes:\n", c.name));
        for n in &c.nodes {
            let metrics = SocketAddr::from((n.host.ip, plan::METRICS_PORT));
            let scraped = in_netns(&n.host.netns, || {
                get_blocking(metrics, "/metrics", Duration::from_secs(3))
            });
            let line = match scraped {
                Ok(Ok((200, body))) => COUNTERS
                    .iter()
                    .map(|(metric, label)| format!("{label} {}", number(sum_samples(&body, metric))))
                    .collect::<Vec<_>>()
                    .join(", "),
                Ok(Ok((status, _))) => format!("metrics unavailable: http://{metrics}/metrics answered {status}"),
                Ok(Err(e)) => format!("metrics unavailable: {e}"),
                Err(e) => format!("metrics unavailable: {e}"),
            };
            out.push_str(&format!("    {:<10} {:<15} {line}\n", n.name, n.host.ip));
        }
        let clients: Vec<_> = c
            .nodes
            .iter()
            .flat_map(|n| &n.pods)
            .filter(|p| matches!(p.run, Some(PodRun::Client { .. })))
            .collect();
        if !clients.is_empty() {
            out.push_str("  clients (last call):\n");
        }
        for p in clients {
            let last = procs::log_tail(&state.log(&up::pod_process_name(plan, p)), 1);
            let last = if last.is_empty() {
                "(no call yet)".to_string()
            } else {
                last
            };
            out.push_str(&format!("    {:<24} {last}\n", format!("{}/{}", p.namespace, p.name)));
        }
        let admin = SocketAddr::from(([127, 0, 0, 1], plan::ADMIN_PORT));
        out.push_str(&format!("  trellis status (trellisd in {}):\n", c.cp.netns));
        let text = match in_netns(&c.cp.netns, || crate::status::fetch(admin)) {
            Ok(Ok(value)) => crate::status::render(&value),
            Ok(Err(e)) => format!("{e}\n"),
            Err(e) => format!("cannot enter {}: {e}\n", c.cp.netns),
        };
        for line in text.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// The federation part of `lab status`: whether etcd accepts connections and each gateway is
/// ready (the members' sync state is in each cluster's `trellis status`).
fn federation_status(plan: &Plan, state: &State) -> String {
    let Some(f) = &plan.federation else {
        return String::new();
    };
    let etcd = SocketAddr::from((f.etcd.ip, plan::ETCD_PORT));
    let reach = match in_netns(&f.etcd.netns, || accepts(etcd)) {
        Ok(true) => "accepts connections".to_string(),
        Ok(false) => format!(
            "does not accept connections (see {})",
            state.log(up::ETCD_NAME).display()
        ),
        Err(e) => format!("cannot enter {}: {e}", f.etcd.netns),
    };
    let mut out = format!("federation:\n  etcd {:<30} {reach}\n", f.etcd_url());
    for c in &plan.clusters {
        let Some(gw) = plan.gateway(c) else {
            continue;
        };
        let ready = SocketAddr::from((gw.host.ip, plan::READY_PORT));
        let probe = in_netns(&gw.host.netns, || {
            get_blocking(ready, "/healthz/ready", Duration::from_secs(3))
        });
        let line = match probe {
            Ok(Ok((200, _))) => "ready".to_string(),
            Ok(Ok((status, _))) => format!("not ready: http://{ready}/healthz/ready answered {status}"),
            Ok(Err(e)) => format!("not ready: {e}"),
            Err(e) => format!("cannot enter {}: {e}", gw.host.netns),
        };
        out.push_str(&format!(
            "  gateway {:<8} {:<10} wan {:<20} {line}\n",
            c.name,
            gw.host.ip.to_string(),
            gw.wan_hbone().to_string()
        ));
    }
    out
}

/// The sum of every sample of counter `metric` in a Prometheus text exposition.
pub fn sum_samples(exposition: &str, metric: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?;
            let value_part = if let Some(labels) = rest.strip_prefix('{') {
                labels.rsplit_once('}')?.1
            } else if rest.starts_with(' ') {
                rest
            } else {
                return None; // another metric whose name starts with this one
            };
            value_part.split_whitespace().next()?.parse::<f64>().ok()
        })
        .fold(0.0, |sum, v| sum + v)
}

/// A counter's value as a person reads it: whole numbers without a fraction.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_of_one_counter_are_added_up() {
        let text = "# HELP trellis_tcp_sent_bytes_total Bytes.\n\
            # TYPE trellis_tcp_sent_bytes_total counter\n\
            trellis_tcp_sent_bytes_total{source_workload=\"a\",destination_service=\"x}y\"} 100\n\
            trellis_tcp_sent_bytes_total{source_workload=\"b\"} 23 1700000000\n\
            trellis_tcp_sent_bytes_total_extra 1000\n\
            trellis_tcp_sent_bytes_total 7\n\
            trellis_tcp_received_bytes_total 5\n";
        assert_eq!(sum_samples(text, "trellis_tcp_sent_bytes_total"), 130.0);
        assert_eq!(number(sum_samples(text, "trellis_tcp_connections_opened_total")), "0");
        assert_eq!(number(2.5), "2.5");
    }
}
