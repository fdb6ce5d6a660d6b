//! The mesh end to end, in the network-namespace lab: real trellisd, real ztunnels in node
//! namespaces, real nftables capture, pods as namespaces behind their nodes. Each test builds
//! its own lab (distinct names, so they run in parallel) and tears it down when it ends.
//!
//! Addresses (see deploy/lab/README.md): nodes 10.1.0.11 and 10.1.0.12, trellisd 10.1.0.2;
//! node-1's pods alpha 10.1.1.10, beta 10.1.1.11, pcli 10.1.1.12; node-2's pods srv
//! 10.1.2.10, psrv 10.1.2.11; duo-1 10.1.1.13 and duo-2 10.1.2.12 behind one service; VIPs srv
//! 10.101.0.10, psrv 10.101.0.11, duo 10.101.0.12. ztunnel delivers tunnels
//! to a pod from the node's pod gateway 10.1.2.1, which is how a server tells meshed callers.

use std::time::Duration;

use trellis_e2e::lab::{metric_sum, Lab};
use trellis_e2e::sniff::Sniffer;

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

fn marker(test: &str) -> String {
    format!("marker-{test}-{}", std::process::id())
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

    std::fs::write(lab.manifests("east").join("policy.yaml"), DENY_ALPHA).expect("writing the policy");
    let denied = lab.call_until(&alpha, SRV_VIP, Duration::from_secs(20), |r| r.is_err());
    let error = denied.expect_err("alpha is denied");
    assert!(
        error.contains("reset") || error.contains("closed"),
        "the client's connection is reset: {error}"
    );
    let allowed = lab.call(&beta, SRV_VIP, 0).expect("beta is not named by the policy");
    assert!(allowed.contains("hello from srv"), "{allowed}");

    let node2 = lab.metrics("east", "node-2");
    let deny = [
        ("decision", "deny"),
        ("source_principal", "spiffe://east.trellis.local/ns/mesh/sa/alpha"),
    ];
    assert!(
        metric_sum(&node2, "trellis_authorization_decisions_total", &deny) >= 1.0,
        "{node2}"
    );
    let beta_denied = [
        ("decision", "deny"),
        ("source_principal", "spiffe://east.trellis.local/ns/mesh/sa/beta"),
    ];
    assert_eq!(
        metric_sum(&node2, "trellis_authorization_decisions_total", &beta_denied),
        0.0
    );
}

#[test]
fn killing_trellisd_does_not_break_traffic_and_nodes_resync_when_it_returns() {
    let lab = Lab::up("e2ekill", TOPOLOGY);
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    lab.call(&alpha, SRV_VIP, 0).expect("alpha → srv with trellisd up");
    lab.kill_all_in(&lab.control_ns("east"));
    std::thread::sleep(Duration::from_millis(500));
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
    std::fs::write(lab.manifests("east").join("policy.yaml"), DENY_ALPHA).expect("writing the policy");
    lab.restart("trellisd-east", &lab.control_ns("east"));
    let denied = lab.call_until(&alpha, SRV_VIP, Duration::from_secs(30), |r| r.is_err());
    assert!(
        denied.is_err(),
        "node-2 resynced and enforces the new policy: {denied:?}"
    );
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

    let from_alpha = [("source_workload", "alpha"), ("destination_workload", "srv")];
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
    for i in 0..8 {
        let body = lab
            .call(&alpha, DUO_VIP, 0)
            .unwrap_or_else(|e| panic!("call {i} with duo-1 dead: {e}"));
        assert!(body.contains("hello from duo-2"), "{body}");
    }
    let node1 = lab.metrics("east", "node-1");
    let failed = [("reporter", "source"), ("destination_workload", "duo-1")];
    let failures = metric_sum(&node1, "trellis_tcp_connection_failures_total", &failed);
    assert!(
        (1.0..=3.0).contains(&failures),
        "duo-1 failed, then stayed ejected (backoff 1 s, 2 s, …): {failures}\n{node1}"
    );
}
