//! Transparent capture with nftables, in the node's network namespace.
//!
//! ztunnel owns one table, `ip trellis`, and rewrites it whole (one atomic `nft -f`
//! transaction) whenever the set of enrolled local workloads changes; [`ruleset`] renders it
//! as a pure function. Pod mode:
//! - TCP *from* an enrolled pod is redirected to 15001 (the original destination stays
//!   readable with `SO_ORIGINAL_DST`);
//! - TCP *to* an enrolled pod that did not come through a tunnel is redirected to 15006;
//!   tunnels arrive on the node's own address at 15008 and are delivered by ztunnel itself
//!   (locally generated packets never pass prerouting), so they are not captured again;
//! - a packet claiming an enrolled pod's address on any interface but that pod's own is
//!   dropped (reverse-path check), so nothing can borrow a pod's identity by spoofing its IP.
//!
//! Non-enrolled pods match no rule. Only new connections are captured ([`NEW_TCP`]): a connection
//! that was open before its pod was enrolled runs on untouched.
//!
//! Host mode (a VM or bare-metal host is the one workload, and its own node) captures the host's
//! own traffic instead:
//! - outbound TCP is redirected to 15001, except ztunnel's own sockets (marked), loopback, the
//!   host calling itself, and the control plane (so ztunnel always reaches trellisd);
//! - inbound TCP to the host's addresses is redirected to 15006 (plaintext, authorized as an
//!   unauthenticated source), except ztunnel's own ports and SSH (22), so an operator is never
//!   locked out of the machine by the mesh. Tunnels on 15008 are delivered by ztunnel with a
//!   marked socket, which no rule matches.
//!
//! The rules stay when ztunnel stops: enrolled pods then fail closed rather than leak
//! plaintext. `trellis lab down` (or deleting the table) removes them.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use crate::hbone::SOCKET_MARK;

/// Where captured traffic goes, and ztunnel's own ports that host mode leaves alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub outbound: u16,
    pub inbound_plain: u16,
    pub hbone: u16,
    pub metrics: u16,
    pub readiness: u16,
}

/// Matches the first packet of a TCP connection (a SYN alone). nat chains see only the first
/// packet conntrack has of each flow, and for a connection that was open before the rules (or
/// before conntrack ran here at all) that is a packet from its middle: redirecting it would send
/// a stranger's segment to a ztunnel port, which answers with a reset. So capture starts with new
/// connections, and open ones run on untouched, as in Istio ambient.
const NEW_TCP: &str = "tcp flags & (fin|syn|rst|ack) == syn";

/// Inbound ports host mode never captures besides ztunnel's own: SSH.
const HOST_INBOUND_EXEMPT: [u16; 1] = [22];

/// What to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Pods behind this node: capture these enrolled pod addresses.
    Pods(BTreeSet<Ipv4Addr>),
    /// The host itself is the one workload; `control` (trellisd, if any) is never captured.
    Host { control: Option<SocketAddrV4> },
}

/// The nftables table ztunnel owns.
pub const TABLE: &str = "trellis";

/// The whole `ip trellis` table for `plan`, as an `nft -f` script that replaces any previous one.
pub fn ruleset(plan: &Plan, ports: Ports) -> String {
    let mut out = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    match plan {
        Plan::Pods(pods) => {
            out.push_str("  set enrolled {\n    type ipv4_addr\n");
            if !pods.is_empty() {
                let list: Vec<String> = pods.iter().map(ToString::to_string).collect();
                out.push_str(&format!("    elements = {{ {} }}\n", list.join(", ")));
            }
            out.push_str("  }\n");
            out.push_str(
                "  chain antispoof {\n    type filter hook prerouting priority raw; policy accept;\n    \
                 ip saddr @enrolled fib saddr . iif oif missing counter drop\n  }\n",
            );
            out.push_str(&format!(
                "  chain capture {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
                 ip saddr @enrolled {NEW_TCP} counter redirect to :{}\n    \
                 ip daddr @enrolled {NEW_TCP} counter redirect to :{}\n  }}\n",
                ports.outbound, ports.inbound_plain
            ));
        }
        Plan::Host { control } => {
            let control = control
                .map(|c| format!("ip daddr {} tcp dport {} return\n    ", c.ip(), c.port()))
                .unwrap_or_default();
            out.push_str(&format!(
                "  chain capture_out {{\n    type nat hook output priority -100; policy accept;\n    \
                 meta mark {SOCKET_MARK:#x} return\n    ip daddr 127.0.0.0/8 return\n    \
                 fib daddr type local return\n    {control}\
                 {NEW_TCP} counter redirect to :{}\n  }}\n",
                ports.outbound
            ));
            let mut exempt: BTreeSet<u16> = HOST_INBOUND_EXEMPT.into_iter().collect();
            exempt.extend([
                ports.outbound,
                ports.inbound_plain,
                ports.hbone,
                ports.metrics,
                ports.readiness,
            ]);
            let exempt: Vec<String> = exempt.iter().map(ToString::to_string).collect();
            out.push_str(&format!(
                "  chain capture_in {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
                 fib daddr type local tcp dport != {{ {} }} {NEW_TCP} counter redirect to :{}\n  }}\n",
                exempt.join(", "),
                ports.inbound_plain
            ));
        }
    }
    out.push_str("}\n");
    out
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot run nft (install nftables, and run ztunnel as root or with CAP_NET_ADMIN): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
}

/// Installs `script` with one `nft -f -` transaction.
pub async fn apply(script: &str) -> Result<(), CaptureError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(CaptureError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await.map_err(CaptureError::Spawn)?;
    }
    let output = child.wait_with_output().await.map_err(CaptureError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(CaptureError::Refused(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORTS: Ports = Ports {
        outbound: 15001,
        inbound_plain: 15006,
        hbone: 15008,
        metrics: 15020,
        readiness: 15021,
    };

    #[test]
    fn pod_rules_name_only_enrolled_pods() {
        let pods = BTreeSet::from(["10.1.1.10".parse().unwrap(), "10.1.1.12".parse().unwrap()]);
        let rules = ruleset(&Plan::Pods(pods), PORTS);
        assert!(rules.contains("elements = { 10.1.1.10, 10.1.1.12 }"), "{rules}");
        let syn = "tcp flags & (fin|syn|rst|ack) == syn";
        assert!(rules.contains(&format!("ip saddr @enrolled {syn} counter redirect to :15001")));
        assert!(rules.contains(&format!("ip daddr @enrolled {syn} counter redirect to :15006")));
        assert!(
            rules.starts_with("table ip trellis\ndelete table ip trellis\n"),
            "replaces the old table"
        );
        assert!(!rules.contains("10.1.1.11"));
    }

    #[test]
    fn no_enrolled_pod_means_an_empty_set() {
        let rules = ruleset(&Plan::Pods(BTreeSet::new()), PORTS);
        assert!(!rules.contains("elements"), "{rules}");
    }

    #[test]
    fn host_mode_skips_ztunnels_own_sockets_ports_and_control_plane() {
        let control = Some("10.1.0.2:15012".parse().unwrap());
        let rules = ruleset(&Plan::Host { control }, PORTS);
        assert!(rules.contains("type nat hook output"));
        let out = rules.split("chain capture_in").next().unwrap();
        let returns = [
            "meta mark 0x74720001 return",
            "ip daddr 10.1.0.2 tcp dport 15012 return",
        ];
        for r in returns {
            let at = out.find(r).unwrap_or_else(|| panic!("{r} missing: {rules}"));
            assert!(
                at < out.find("redirect to :15001").unwrap(),
                "{r} must come before the redirect"
            );
        }
        assert!(rules.contains(
            "fib daddr type local tcp dport != { 22, 15001, 15006, 15008, 15020, 15021 } \
             tcp flags & (fin|syn|rst|ack) == syn counter redirect to :15006"
        ));
        assert!(rules.contains("tcp flags & (fin|syn|rst|ack) == syn counter redirect to :15001"));
        assert!(!ruleset(&Plan::Host { control: None }, PORTS).contains("15012"));
    }
}
