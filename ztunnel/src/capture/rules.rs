//! The `ip trellis` table as plain data: what the kernel should hold for a [`Plan`] ([`desired`]),
//! rendered as one `nft -f` transaction ([`Table::script`]) and summarised as a [`Snapshot`] to
//! compare with what is read back ([`Table::snapshot`]).
//!
//! Every capture rule has a *guard* twin in a filter chain that runs after it: the same match,
//! `reject with tcp reset` instead of `redirect`. A packet the capture rule redirected no longer
//! matches its twin (it is now addressed to ztunnel), so the guard only ever sees what capture
//! missed, and refuses it instead of letting it through in plaintext. Both live in the same
//! table and change in the same transaction.
//!
//! Each rule carries a comment, `<id>:<hash of its text>`, by which a read back recognises it: a
//! rule edited in place, or left by another config, does not pass for the desired one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use sha2::{Digest, Sha256};

use super::installed::{ChainShape, Snapshot};
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

/// The set of enrolled pod addresses (pod mode).
pub const ENROLLED: &str = "enrolled";

/// Matches the first packet of a TCP connection (a SYN alone). nat chains see only the first
/// packet conntrack has of each flow, and for a connection that was open before the rules (or
/// before conntrack ran here at all) that is a packet from its middle: redirecting it would send
/// a stranger's segment to a ztunnel port, which answers with a reset. So capture starts with new
/// connections, and open ones run on untouched, as in Istio ambient. The guards match the same
/// packets, so they leave open connections alone too.
const NEW_TCP: &str = "tcp flags & (fin|syn|rst|ack) == syn";

/// Inbound ports host mode never captures besides ztunnel's own: SSH.
const HOST_INBOUND_EXEMPT: [u16; 1] = [22];

/// nftables priorities, as numbers (how a read back reports them).
const PRIORITY_RAW: i64 = -300;
const PRIORITY_DSTNAT: i64 = -100;
const PRIORITY_FILTER: i64 = 0;

/// One rule: its nft text and the id that names it within its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: &'static str,
    pub text: String,
}

impl Rule {
    fn new(id: &'static str, text: impl Into<String>) -> Self {
        Self { id, text: text.into() }
    }

    /// The comment that identifies exactly this rule in a read back: its id and a hash of its text.
    pub fn tag(&self) -> String {
        let hash = hex::encode(Sha256::digest(self.text.as_bytes()));
        format!("{}:{}", self.id, &hash[..12])
    }
}

/// A base chain of the table (policy always `accept`: the rules decide).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    /// `filter` or `nat`.
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: i64,
    pub rules: Vec<Rule>,
}

/// The whole table ztunnel wants installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Sets of IPv4 addresses, by name.
    pub sets: BTreeMap<&'static str, BTreeSet<Ipv4Addr>>,
    pub chains: Vec<Chain>,
}

impl Table {
    /// An `nft -f` script that replaces any previous `ip trellis` table with this one, in one
    /// transaction: the kernel holds either the old table or the new one, never a mix.
    pub fn script(&self) -> String {
        let mut out = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
        for (name, elements) in &self.sets {
            let _ = writeln!(out, "  set {name} {{\n    type ipv4_addr");
            if !elements.is_empty() {
                let list: Vec<String> = elements.iter().map(ToString::to_string).collect();
                let _ = writeln!(out, "    elements = {{ {} }}", list.join(", "));
            }
            out.push_str("  }\n");
        }
        for chain in &self.chains {
            let _ = writeln!(
                out,
                "  chain {} {{\n    type {} hook {} priority {}; policy accept;",
                chain.name, chain.kind, chain.hook, chain.priority
            );
            for rule in &chain.rules {
                let _ = writeln!(out, "    {} comment \"{}\"", rule.text, rule.tag());
            }
            out.push_str("  }\n");
        }
        out.push_str("}\n");
        out
    }

    /// What a read back of this table, once installed, must show.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sets: self
                .sets
                .iter()
                .map(|(name, elements)| (name.to_string(), elements.iter().map(ToString::to_string).collect()))
                .collect(),
            chains: self
                .chains
                .iter()
                .map(|c| {
                    let shape = ChainShape {
                        kind: c.kind.into(),
                        hook: c.hook.into(),
                        priority: c.priority,
                        policy: "accept".into(),
                        rules: c.rules.iter().map(Rule::tag).collect(),
                    };
                    (c.name.to_string(), shape)
                })
                .collect(),
        }
    }
}

/// The table for `plan`: a pure function of the plan and ztunnel's ports.
pub fn desired(plan: &Plan, ports: Ports) -> Table {
    match plan {
        Plan::Pods(pods) => pod_table(pods, ports),
        Plan::Host { control } => host_table(*control, ports),
    }
}

/// Pod mode:
/// - TCP *from* an enrolled pod is redirected to 15001, TCP *to* one (not through a tunnel) to
///   15006; tunnels arrive on the node's address at 15008 and are delivered by ztunnel's own
///   sockets, which never pass prerouting or forward;
/// - a tunnel addressed to an enrolled pod's own address on 15008 (how Istio's ztunnel and other
///   HBONE peers dial) is redirected to ztunnel's 15008, never to the plaintext port nor to
///   the pod;
/// - a new connection of an enrolled pod that reaches `forward` was not redirected: rejected;
/// - a packet claiming an enrolled pod's address on any interface but that pod's own is dropped
///   (reverse-path check), so nothing can borrow a pod's identity by spoofing its IP.
fn pod_table(pods: &BTreeSet<Ipv4Addr>, ports: Ports) -> Table {
    let from = format!("ip saddr @{ENROLLED} {NEW_TCP} counter");
    let to_hbone = format!("ip daddr @{ENROLLED} tcp dport {} {NEW_TCP} counter", ports.hbone);
    let to = format!("ip daddr @{ENROLLED} {NEW_TCP} counter");
    Table {
        sets: BTreeMap::from([(ENROLLED, pods.clone())]),
        chains: vec![
            Chain {
                name: "antispoof",
                kind: "filter",
                hook: "prerouting",
                priority: PRIORITY_RAW,
                rules: vec![Rule::new(
                    "antispoof",
                    format!("ip saddr @{ENROLLED} fib saddr . iif oif missing counter drop"),
                )],
            },
            Chain {
                name: "capture",
                kind: "nat",
                hook: "prerouting",
                priority: PRIORITY_DSTNAT,
                rules: vec![
                    Rule::new("outbound", format!("{from} redirect to :{}", ports.outbound)),
                    Rule::new("inbound-hbone", format!("{to_hbone} redirect to :{}", ports.hbone)),
                    Rule::new("inbound", format!("{to} redirect to :{}", ports.inbound_plain)),
                ],
            },
            Chain {
                name: "guard",
                kind: "filter",
                hook: "forward",
                priority: PRIORITY_FILTER,
                rules: vec![
                    Rule::new("guard-outbound", format!("{from} reject with tcp reset")),
                    Rule::new("guard-inbound-hbone", format!("{to_hbone} reject with tcp reset")),
                    Rule::new("guard-inbound", format!("{to} reject with tcp reset")),
                ],
            },
        ],
    }
}

/// Host mode (a VM or bare-metal host is the one workload, and its own node):
/// - outbound TCP is redirected to 15001, except ztunnel's own sockets (marked), loopback, the
///   host calling itself, and the control plane (so ztunnel always reaches trellisd);
/// - inbound TCP to the host's addresses is redirected to 15006 (plaintext, authorized as an
///   unauthenticated source), except ztunnel's own ports and SSH (22), so an operator is never
///   locked out of the machine by the mesh. Tunnels on 15008 are delivered by ztunnel with a
///   marked socket, which no rule matches;
/// - the guards (filter output and input) reject what those redirects missed. A redirected
///   packet is addressed to 127.0.0.1 (outbound) or to 15006 (inbound), which they exempt. The
///   input guard also lets in whatever enters through `lo`: connections made on the host itself
///   (ztunnel delivering a tunnel to a local server, the host calling itself) had their first
///   packet seen by nat at *output*, so the prerouting redirect never applied to them.
fn host_table(control: Option<SocketAddrV4>, ports: Ports) -> Table {
    let mut exempt_out = vec![
        Rule::new("own-sockets", format!("meta mark {SOCKET_MARK:#x} return")),
        Rule::new("loopback", "ip daddr 127.0.0.0/8 return"),
        Rule::new("self", "fib daddr type local return"),
    ];
    if let Some(c) = control {
        exempt_out.push(Rule::new(
            "control",
            format!("ip daddr {} tcp dport {} return", c.ip(), c.port()),
        ));
    }
    let mut exempt_in: BTreeSet<u16> = HOST_INBOUND_EXEMPT.into_iter().collect();
    exempt_in.extend([
        ports.outbound,
        ports.inbound_plain,
        ports.hbone,
        ports.metrics,
        ports.readiness,
    ]);
    let exempt_in: Vec<String> = exempt_in.iter().map(ToString::to_string).collect();
    let inbound = format!(
        "fib daddr type local tcp dport != {{ {} }} {NEW_TCP} counter",
        exempt_in.join(", ")
    );
    let with = |mut rules: Vec<Rule>, last: Rule| {
        rules.push(last);
        rules
    };
    Table {
        sets: BTreeMap::new(),
        chains: vec![
            Chain {
                name: "capture_out",
                kind: "nat",
                hook: "output",
                priority: PRIORITY_DSTNAT,
                rules: with(
                    exempt_out.clone(),
                    Rule::new("outbound", format!("{NEW_TCP} counter redirect to :{}", ports.outbound)),
                ),
            },
            Chain {
                name: "capture_in",
                kind: "nat",
                hook: "prerouting",
                priority: PRIORITY_DSTNAT,
                rules: vec![Rule::new(
                    "inbound",
                    format!("{inbound} redirect to :{}", ports.inbound_plain),
                )],
            },
            Chain {
                name: "guard_out",
                kind: "filter",
                hook: "output",
                priority: PRIORITY_FILTER,
                rules: with(
                    exempt_out,
                    Rule::new("guard-outbound", format!("{NEW_TCP} counter reject with tcp reset")),
                ),
            },
            Chain {
                name: "guard_in",
                kind: "filter",
                hook: "input",
                priority: PRIORITY_FILTER,
                rules: vec![
                    Rule::new("local", "iif \"lo\" return"),
                    Rule::new("guard-inbound", format!("{inbound} reject with tcp reset")),
                ],
            },
        ],
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
    const SYN: &str = "tcp flags & (fin|syn|rst|ack) == syn";

    fn pods(ips: &[&str]) -> Plan {
        Plan::Pods(ips.iter().map(|ip| ip.parse().unwrap()).collect())
    }

    fn chain<'a>(table: &'a Table, name: &str) -> &'a Chain {
        table.chains.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn pod_rules_name_only_enrolled_pods() {
        let rules = desired(&pods(&["10.1.1.10", "10.1.1.12"]), PORTS).script();
        assert!(rules.contains("elements = { 10.1.1.10, 10.1.1.12 }"), "{rules}");
        assert!(rules.contains(&format!("ip saddr @enrolled {SYN} counter redirect to :15001")));
        assert!(rules.contains(&format!("ip daddr @enrolled {SYN} counter redirect to :15006")));
        let hbone = rules
            .find(&format!(
                "ip daddr @enrolled tcp dport 15008 {SYN} counter redirect to :15008"
            ))
            .expect("tunnels to a pod's own address go to ztunnel's 15008");
        assert!(
            hbone < rules.find("redirect to :15006").unwrap(),
            "before the plaintext inbound rule"
        );
        assert!(
            rules.starts_with("table ip trellis\ndelete table ip trellis\n"),
            "replaces the old table"
        );
        assert!(!rules.contains("10.1.1.11"));
    }

    #[test]
    fn no_enrolled_pod_means_an_empty_set() {
        let rules = desired(&Plan::Pods(BTreeSet::new()), PORTS).script();
        assert!(!rules.contains("elements"), "{rules}");
    }

    #[test]
    fn every_capture_rule_has_a_guard_that_rejects_what_it_missed() {
        let table = desired(&pods(&["10.1.1.10"]), PORTS);
        let capture = chain(&table, "capture");
        let guard = chain(&table, "guard");
        assert_eq!(
            (guard.kind, guard.hook),
            ("filter", "forward"),
            "after the nat prerouting"
        );
        for (redirect, reject) in capture.rules.iter().zip(&guard.rules) {
            let matched = redirect.text.split(" redirect").next().unwrap();
            assert_eq!(reject.text, format!("{matched} reject with tcp reset"));
        }
        assert_eq!(capture.rules.len(), guard.rules.len());

        let host = desired(&Plan::Host { control: None }, PORTS);
        for (capture, guard, hook) in [
            ("capture_out", "guard_out", "output"),
            ("capture_in", "guard_in", "input"),
        ] {
            let (capture, guard) = (chain(&host, capture), chain(&host, guard));
            assert_eq!((guard.kind, guard.hook, guard.priority), ("filter", hook, 0));
            let (redirect, exempt) = capture.rules.split_last().unwrap();
            let (reject, guard_exempt) = guard.rules.split_last().unwrap();
            let matched = redirect.text.split(" redirect").next().unwrap();
            assert_eq!(reject.text, format!("{matched} reject with tcp reset"));
            assert!(
                exempt.iter().all(|r| guard_exempt.contains(r)),
                "capture's exemptions, at least"
            );
            assert!(
                guard_exempt.iter().all(|r| r.text.ends_with(" return")),
                "and only exemptions"
            );
        }
    }

    #[test]
    fn rules_are_tagged_with_a_hash_of_their_text() {
        let a = desired(&pods(&[]), PORTS);
        let b = desired(
            &pods(&[]),
            Ports {
                outbound: 16001,
                ..PORTS
            },
        );
        let (ra, rb) = (&chain(&a, "capture").rules[0], &chain(&b, "capture").rules[0]);
        assert!(ra.tag().starts_with("outbound:") && rb.tag().starts_with("outbound:"));
        assert_ne!(ra.tag(), rb.tag(), "another port is another rule");
        assert!(a
            .script()
            .contains(&format!("redirect to :15001 comment \"{}\"", ra.tag())));
        assert_ne!(a.snapshot(), b.snapshot());
    }

    #[test]
    fn host_mode_skips_ztunnels_own_sockets_ports_and_control_plane() {
        let control = Some("10.1.0.2:15012".parse().unwrap());
        let rules = desired(&Plan::Host { control }, PORTS).script();
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
        assert!(rules.contains(&format!(
            "fib daddr type local tcp dport != {{ 22, 15001, 15006, 15008, 15020, 15021 }} {SYN} counter redirect to :15006"
        )));
        assert!(rules.contains(&format!("{SYN} counter redirect to :15001")));
        assert!(!desired(&Plan::Host { control: None }, PORTS).script().contains("15012"));
    }
}
