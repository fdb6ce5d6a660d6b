//! The mesh end to end, in the network-namespace lab: real trellisd, real ztunnels in node
//! namespaces, real nftables capture, pods as namespaces behind their nodes. Each test builds
//! its own lab (distinct names, so they run in parallel) and tears it down when it ends.
//!
//! Addresses (see deploy/lab/README.md): nodes 10.1.0.11 and 10.1.0.12, trellisd 10.1.0.2;
//! node-1's pods alpha 10.1.1.10, beta 10.1.1.11, pcli 10.1.1.12; node-2's pods srv
//! 10.1.2.10, psrv 10.1.2.11; duo-1 10.1.1.13 and duo-2 10.1.2.12 behind one service; VIPs srv
//! 10.101.0.10, psrv 10.101.0.11, duo 10.101.0.12. ztunnel delivers tunnels
//! to a pod from the node's pod gateway 10.1.2.1, which is how a server tells meshed callers.

use std::time::{Duration, Instant};

use trellis_e2e::lab::{metric_sum, Lab};
use trellis_e2e::sniff::Sniffer;
use trellis_e2e::wait_until;

const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 2}
namespaces:
  - {name: mesh, ambient: true}
  - {name: plain, ambient: false}
services:
  - {name: srv, namespace: mesh, port: 80, targetPort: 8080, selector: {app: srv}}
  - {name: psrv, namespace: plain, port: 80, targetPort: 8080, selector: {app: psrv}}
  - {name: duo, namespace: mesh, port: 80, targetPort: 8080, selector: {app: duo}}
pods:
  - {name: alpha, namespace: mesh, node: node-1, serviceAccount: alpha}
  - {name: beta, namespace: mesh, node: node-1, serviceAccount: beta}
  - {name: pcli, namespace: plain, node: node-1, serviceAccount: pcli}
  - {name: srv, namespace: mesh, node: node-2, serviceAccount: srv, labels: {app: srv}, run: {server: {version: v1, port: 8080}}}
  - {name: psrv, namespace: plain, node: node-2, serviceAccount: psrv, labels: {app: psrv}, run: {server: {version: v1, port: 8080}}}
  - {name: duo-1, namespace: mesh, node: node-1, serviceAccount: duo, labels: {app: duo}, run: {server: {version: v1, port: 8080}}}
  - {name: duo-2, namespace: mesh, node: node-2, serviceAccount: duo, labels: {app: duo}, run: {server: {version: v2, port: 8080}}}
"#;

const SRV_VIP: &str = "http://10.101.0.10";
const DUO_VIP: &str = "http://10.101.0.12";
const NODE2_GATEWAY: &str = "10.1.2.1:";
const TRELLISD: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 1, 0, 2);

const DENY_ALPHA: &str = r#"
apiVersion: trellis.io/v1
kind: AuthorizationPolicy
metadata: {name: no-alpha, namespace: mesh}
spec:
  action: DENY
  selector: {matchLabels: {app: srv}}
  rules:
    - from: {principals: ["ns/mesh/sa/alpha"]}
      to: {ports: [8080]}
"#;

const ALPHA: &str = "spiffe://east.trellis.local/ns/mesh/sa/alpha";

fn marker(test: &str) -> String {
    format!("marker-{test}-{}", std::process::id())
}

/// What the mesh has recorded of alpha's calls to srv being denied.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Denials {
    /// node-2's ztunnel (srv's): "deny" decisions for alpha at srv.
    decided: f64,
    /// node-1's ztunnel (alpha's): alpha's connections to srv that could not be opened.
    failed: f64,
    /// node-1's log: tunnels refused with 401.
    refused_401: usize,
}

impl Denials {
    fn read(lab: &Lab) -> Self {
        let deny_at_srv = [
            ("decision", "deny"),
            ("source_principal", ALPHA),
            ("destination_workload", "srv"),
        ];
        let alpha_to_srv = [
            ("reporter", "source"),
            ("source_workload", "alpha"),
            ("destination_workload", "srv"),
        ];
        Self {
            decided: lab.metric("east", "node-2", "trellis_authorization_decisions_total", &deny_at_srv),
            failed: lab.metric("east", "node-1", "trellis_tcp_connection_failures_total", &alpha_to_srv),
            refused_401: lab
                .log("ztunnel-east-node-1")
                .lines()
                .filter(|l| l.contains("denied by the destination's policy (401)"))
                .count(),
        }
    }
}

/// Calls srv's VIP from alpha, each call on a path of its own (`/<probe>-<n>`), until one fails
/// or `timeout` passes. Returns the failed call's path, its error and how many calls it took.
fn call_until_refused(lab: &Lab, probe: &str, timeout: Duration) -> (String, String, usize) {
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    let deadline = Instant::now() + timeout;
    for n in 1.. {
        let path = format!("/{probe}-{n}");
        match lab.call(&alpha, &format!("{SRV_VIP}{path}"), 0) {
            Err(error) => return (path, error, n),
            Ok(body) if Instant::now() > deadline => panic!("alpha still reaches srv after {timeout:?}: {body}"),
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    unreachable!("the calls above end by returning or panicking")
}

/// Asserts that the failed call on `path` was refused by srv's policy, and nothing else: the
/// client's connection was reset (or closed) with no response, node-2's ztunnel decided "deny"
/// once more, node-1's ztunnel heard 401 for it, and the request never reached srv.
fn assert_denied_by_policy(lab: &Lab, before: Denials, path: &str, error: &str) {
    let error = error.trim_end();
    assert!(
        [
            "connection reset",
            "connection closed",
            "connection closed before the response"
        ]
        .iter()
        .any(|reason| error.ends_with(&format!(": {reason}"))),
        "the client's connection is reset without a response: {error}"
    );
    let after = Denials::read(lab);
    assert_eq!(
        after,
        Denials {
            decided: before.decided + 1.0,
            failed: before.failed + 1.0,
            refused_401: before.refused_401 + 1,
        },
        "exactly this call was denied at node-2 and refused with 401 at node-1"
    );
    let srv_log = lab.log("pod-east-mesh-srv");
    assert!(
        !srv_log.contains(&format!("{path} ")),
        "the denied request never reached srv:\n{srv_log}"
    );
}

/// How many times the log of ztunnel on `node` says its config stream broke.
fn config_stream_breaks(lab: &Lab, node: &str) -> usize {
    lab.log(&format!("ztunnel-east-{node}"))
        .matches("config stream broke")
        .count()
}

#[test]
fn pod_to_pod_across_nodes_is_mutual_tls_with_only_hbone_on_the_wire() {
    let lab = Lab::up("e2emtls", TOPOLOGY);
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    let sniffer = Sniffer::start(&lab.underlay_ns()).expect("sniffer in the underlay");
    let marker = marker("mtls");
    let via_vip = lab
        .call(&alpha, &format!("{SRV_VIP}/{marker}"), 4096)
        .expect("alpha → srv VIP");
    let via_pod_ip = lab
        .call(&alpha, &format!("http://10.1.2.10:8080/{marker}"), 0)
        .expect("alpha → srv pod IP");
    let wire = sniffer.stop();

    for body in [&via_vip, &via_pod_ip] {
        assert!(body.contains("hello from srv"), "{body}");
        assert!(body.contains(NODE2_GATEWAY), "delivered by node-2's ztunnel: {body}");
    }
    assert!(via_vip.contains("received 4096 bytes"), "{via_vip}");
    let data: Vec<_> = wire.iter().filter(|s| s.src != TRELLISD && s.dst != TRELLISD).collect();
    assert!(
        data.iter().any(|s| s.dport == 15008),
        "the calls crossed the wire on 15008"
    );
    let other: Vec<_> = data.iter().filter(|s| s.sport != 15008 && s.dport != 15008).collect();
    assert!(other.is_empty(), "only HBONE between nodes, saw {:?}", other.first());
    assert!(
        !wire.iter().any(|s| s.carries(marker.as_bytes())),
        "no application plaintext on the wire"
    );

    let node1 = lab.metrics("east", "node-1");
    let from_alpha = [
        ("reporter", "source"),
        ("source_principal", "spiffe://east.trellis.local/ns/mesh/sa/alpha"),
        ("destination_principal", "spiffe://east.trellis.local/ns/mesh/sa/srv"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        metric_sum(&node1, "trellis_tcp_connections_opened_total", &from_alpha),
        2.0,
        "{node1}"
    );
    let node2 = lab.metrics("east", "node-2");
    let at_srv = [
        ("reporter", "destination"),
        ("source_principal", "spiffe://east.trellis.local/ns/mesh/sa/alpha"),
        ("destination_workload", "srv"),
    ];
    assert_eq!(
        metric_sum(&node2, "trellis_tcp_connections_opened_total", &at_srv),
        2.0,
        "{node2}"
    );
}

#[test]
fn traffic_of_non_enrolled_pods_is_untouched() {
    let lab = Lab::up("e2eplain", TOPOLOGY);
    let pcli = lab.pod_ns("east", "plain", "pcli");
    let sniffer = Sniffer::start(&lab.underlay_ns()).expect("sniffer in the underlay");
    let marker = marker("plain");
    let body = lab
        .call(&pcli, &format!("http://10.1.2.11:8080/{marker}"), 0)
        .expect("pcli → psrv");
    let wire = sniffer.stop();

    assert!(
        body.contains("hello from psrv") && body.contains("to 10.1.1.12:"),
        "the server sees pcli itself: {body}"
    );
    assert!(
        wire.iter().any(|s| s.dport == 8080 && s.carries(marker.as_bytes())),
        "plaintext straight to the pod, as without a mesh"
    );
    let node1 = lab.metrics("east", "node-1");
    assert_eq!(
        metric_sum(&node1, "trellis_tcp_connections_opened_total", &[]),
        0.0,
        "{node1}"
    );
    let node2 = lab.metrics("east", "node-2");
    assert_eq!(
        metric_sum(&node2, "trellis_tcp_connections_opened_total", &[]),
        0.0,
        "{node2}"
    );
}

#[test]
fn enrolling_a_namespace_at_runtime_starts_capture_without_restarting_pods() {
    let lab = Lab::up("e2eenrol", TOPOLOGY);
    let pcli = lab.pod_ns("east", "plain", "pcli");
    let url = "http://10.1.2.11:8080/";
    let before = lab.call(&pcli, url, 0).expect("pcli → psrv before");
    assert!(before.contains("to 10.1.1.12:"), "not meshed yet: {before}");

    lab.label_namespace("east", "plain", "trellis.io/dataplane-mode=ambient");
    let after = lab.call_until(&pcli, url, Duration::from_secs(20), |r| {
        r.as_ref().is_ok_and(|b| b.contains(NODE2_GATEWAY))
    });
    let after = after.expect("pcli → psrv after enrolment");
    assert!(
        after.contains(NODE2_GATEWAY),
        "now tunnelled through node-2's ztunnel: {after}"
    );
    let node1 = lab.metrics("east", "node-1");
    let meshed = [
        ("reporter", "source"),
        ("source_workload", "pcli"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        metric_sum(&node1, "trellis_tcp_connections_opened_total", &meshed) >= 1.0,
        "{node1}"
    );
}

#[test]
fn a_deny_policy_blocks_exactly_the_principal_it_names() {
    let lab = Lab::up("e2edeny", TOPOLOGY);
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    let beta = lab.pod_ns("east", "mesh", "beta");
    lab.call(&alpha, SRV_VIP, 0).expect("alpha → srv before the policy");

    let version = lab.metric("east", "node-2", "trellis_config_version", &[]);
    let before = Denials::read(&lab);
    std::fs::write(lab.manifests("east").join("policy.yaml"), DENY_ALPHA).expect("writing the policy");
    wait_until(
        "node-2 applies a config with the policy",
        Duration::from_secs(20),
        || lab.metric("east", "node-2", "trellis_config_version", &[]) > version,
    );
    let (path, error, calls) = call_until_refused(&lab, "denied", Duration::from_secs(5));
    assert_eq!(calls, 1, "the first call once node-2 has the policy is denied");
    assert_denied_by_policy(&lab, before, &path, &error);

    let allowed = lab.call(&beta, SRV_VIP, 0).expect("beta is not named by the policy");
    assert!(allowed.contains("hello from srv"), "{allowed}");
    let node2 = lab.metrics("east", "node-2");
    let beta_at_srv = |decision| {
        let with = [
            ("decision", decision),
            ("source_principal", "spiffe://east.trellis.local/ns/mesh/sa/beta"),
            ("destination_workload", "srv"),
        ];
        metric_sum(&node2, "trellis_authorization_decisions_total", &with)
    };
    assert_eq!(beta_at_srv("allow"), 1.0, "{node2}");
    assert_eq!(beta_at_srv("deny"), 0.0, "{node2}");
}

#[test]
fn killing_trellisd_does_not_break_traffic_and_nodes_resync_when_it_returns() {
    let lab = Lab::up("e2ekill", TOPOLOGY);
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    lab.call(&alpha, SRV_VIP, 0).expect("alpha → srv with trellisd up");
    let breaks = [
        config_stream_breaks(&lab, "node-1"),
        config_stream_breaks(&lab, "node-2"),
    ];

    let killed = lab.kill_all_in(&lab.control_ns("east"));
    assert!(!killed.is_empty());
    wait_until(
        "both ztunnels see their config stream break",
        Duration::from_secs(20),
        || config_stream_breaks(&lab, "node-1") > breaks[0] && config_stream_breaks(&lab, "node-2") > breaks[1],
    );
    for i in 0..5 {
        let body = lab
            .call(&alpha, &format!("{SRV_VIP}/after-{i}"), 1000)
            .unwrap_or_else(|e| panic!("call {i} with trellisd dead: {e}"));
        assert!(
            body.contains("hello from srv") && body.contains(NODE2_GATEWAY),
            "{body}"
        );
    }

    // trellisd comes back on the same CA and manifests; a policy written since reaches node-2.
    let before = Denials::read(&lab);
    std::fs::write(lab.manifests("east").join("policy.yaml"), DENY_ALPHA).expect("writing the policy");
    lab.restart("trellisd-east", &lab.control_ns("east"));
    let (path, error, _) = call_until_refused(&lab, "resynced", Duration::from_secs(30));
    assert_denied_by_policy(&lab, before, &path, &error);
    lab.call(&lab.pod_ns("east", "mesh", "beta"), SRV_VIP, 0)
        .expect("beta still gets through");
}

#[test]
fn byte_counters_match_what_the_client_sent() {
    let lab = Lab::up("e2ebytes", TOPOLOGY);
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    let sent = 123_457usize;
    let body = lab.call(&alpha, SRV_VIP, sent).expect("alpha → srv");
    assert!(body.contains(&format!("received {sent} bytes")), "{body}");

    // The destination names alpha from its verified identity and its namespace's address book.
    let from_alpha = [
        ("source_workload", "alpha"),
        ("source_principal", ALPHA),
        ("destination_workload", "srv"),
    ];
    let counted = |node: &str, metric: &str, reporter: &str| {
        let mut with = from_alpha.to_vec();
        with.push(("reporter", reporter));
        metric_sum(&lab.metrics("east", node), metric, &with)
    };
    let request_at_source = counted("node-1", "trellis_tcp_received_bytes_total", "source");
    let request_at_destination = counted("node-2", "trellis_tcp_received_bytes_total", "destination");
    let response_at_source = counted("node-1", "trellis_tcp_sent_bytes_total", "source");
    let response_at_destination = counted("node-2", "trellis_tcp_sent_bytes_total", "destination");
    // The request is the body plus the HTTP request line and headers.
    assert!(
        (sent as f64..sent as f64 + 512.0).contains(&request_at_source),
        "client→server bytes at the source: {request_at_source}"
    );
    assert_eq!(
        request_at_source, request_at_destination,
        "both ztunnels count the same request bytes"
    );
    assert!(
        response_at_source >= body.len() as f64,
        "server→client bytes: {response_at_source}"
    );
    assert_eq!(
        response_at_source, response_at_destination,
        "both ztunnels count the same response bytes"
    );
}

#[test]
fn a_dead_endpoint_is_ejected_and_the_call_retried_on_the_next() {
    let lab = Lab::up("e2elb", TOPOLOGY);
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    let answers: Vec<String> = (0..4)
        .map(|_| lab.call(&alpha, DUO_VIP, 0).expect("alpha → duo"))
        .collect();
    assert!(answers.iter().any(|b| b.contains("hello from duo-1")), "{answers:?}");
    assert!(
        answers.iter().any(|b| b.contains("hello from duo-2")),
        "round robin: {answers:?}"
    );

    lab.kill_all_in(&lab.pod_ns("east", "mesh", "duo-1"));
    let started = Instant::now();
    for i in 0..8 {
        let body = lab
            .call(&alpha, DUO_VIP, 0)
            .unwrap_or_else(|e| panic!("call {i} with duo-1 dead: {e}"));
        assert!(body.contains("hello from duo-2"), "{body}");
    }
    let elapsed = started.elapsed().as_secs_f64();

    let failed = [("reporter", "source"), ("destination_workload", "duo-1")];
    let failures = lab.metric("east", "node-1", "trellis_tcp_connection_failures_total", &failed);
    // Round robin puts duo-1 first for one of the first two calls, and that call still got its
    // answer from duo-2: the connection was retried on the next endpoint at once.
    assert!(failures >= 1.0, "duo-1 was tried and failed: {failures}");
    let log = lab.log("ztunnel-east-node-1");
    let ejected = log
        .lines()
        .filter(|l| l.contains("endpoint failed; ejected, trying the next") && l.contains("endpoint=10.1.1.13:8080"))
        .count();
    assert_eq!(ejected as f64, failures, "each failure of duo-1 ejected it:\n{log}");
    // Ejected after its n-th failure, duo-1 is skipped for 2^(n-1) s (1 s, 2 s, ...), so n
    // failures need at least 2^(n-1) - 1 s between the first and the last; without ejection
    // every other call would have tried it (4 of 8), however fast the calls.
    let most = (1.0 + (elapsed + 1.0).log2()).floor();
    assert!(
        failures <= most,
        "duo-1 stayed ejected: {failures} failures in {elapsed:.1} s allow at most {most}"
    );
}
