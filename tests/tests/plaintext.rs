//! No plaintext between enrolled pods (issue 12, item 1): an enrolled pod calling an enrolled
//! pod on another node *by pod IP*, where the callee backs no service, is tunnelled in mutual
//! TLS like any other mesh call; an address of the mesh's pod networks that no workload holds
//! is refused, never dialled in plaintext.
//!
//! Addresses: node-1's pod alpha 10.1.1.10; node-2's pod lone 10.1.2.10 (enrolled, no
//! service); node-2's pod network 10.1.2.0/24; trellisd 10.1.0.2.

use std::net::Ipv4Addr;

use trellis_e2e::lab::{metric_sum, Lab};
use trellis_e2e::sniff::Sniffer;

const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 2}
namespaces:
  - {name: mesh, ambient: true}
pods:
  - {name: alpha, namespace: mesh, node: node-1, serviceAccount: alpha}
  - {name: lone, namespace: mesh, node: node-2, serviceAccount: lone, run: {server: {version: v1, port: 8080}}}
"#;

const TRELLISD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

#[test]
fn an_enrolled_pod_called_by_ip_on_another_node_without_a_service_is_tunnelled_never_plaintext() {
    let lab = Lab::up("e2eplain", TOPOLOGY);
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    let marker = format!("marker-plain-{}", std::process::id());
    let sniffer = Sniffer::start(&lab.underlay_ns()).expect("sniffer in the underlay");
    let body = lab
        .call(&alpha, &format!("http://10.1.2.10:8080/{marker}"), 0)
        .expect("alpha → lone by pod IP");
    let wire = sniffer.stop();

    assert!(body.contains("hello from lone"), "{body}");
    assert!(
        body.contains("10.1.2.1:"),
        "delivered by node-2's ztunnel, not dialled directly: {body}"
    );
    assert!(
        !wire.iter().any(|s| s.carries(marker.as_bytes())),
        "the request crossed the wire in plaintext"
    );
    let between_nodes: Vec<_> = wire.iter().filter(|s| s.src != TRELLISD && s.dst != TRELLISD).collect();
    assert!(
        between_nodes.iter().any(|s| s.dport == 15008),
        "the call crossed on 15008"
    );
    let other: Vec<_> = between_nodes
        .iter()
        .filter(|s| s.sport != 15008 && s.dport != 15008)
        .collect();
    assert!(other.is_empty(), "only HBONE between nodes, saw {:?}", other.first());

    let node2 = lab.metrics("east", "node-2");
    let at_lone = [
        ("reporter", "destination"),
        ("destination_workload", "lone"),
        ("source_principal", "spiffe://east.trellis.local/ns/mesh/sa/alpha"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        metric_sum(&node2, "trellis_tcp_connections_opened_total", &at_lone),
        1.0,
        "{node2}"
    );
}

#[test]
fn an_address_of_the_pod_network_that_no_workload_holds_is_refused() {
    let lab = Lab::up("e2eunk", TOPOLOGY);
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    // Make sure node-1 has its config (alpha's calls to lone work) before probing the gap.
    lab.call(&alpha, "http://10.1.2.10:8080/warm", 0).expect("alpha → lone");
    let sniffer = Sniffer::start(&lab.underlay_ns()).expect("sniffer in the underlay");
    let refused = lab.call(&alpha, "http://10.1.2.77:8080/nobody", 0);
    let wire = sniffer.stop();
    let error = refused.expect_err("an unknown address of the pod network must not be reached");
    assert!(
        error.contains("reset") || error.contains("closed"),
        "refused by ztunnel: {error}"
    );
    assert!(
        !wire.iter().any(|s| s.dst == Ipv4Addr::new(10, 1, 2, 77)),
        "nothing was sent towards the unknown address"
    );
    let log = lab.log("ztunnel-east-node-1");
    assert!(log.contains("refused rather than sent in plaintext"), "{log}");
}
