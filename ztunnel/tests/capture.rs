//! Capture's reconcile loop end to end, in network namespaces with real nftables: a ztunnel in a
//! node namespace captures an enrolled pod's connections to a server outside the mesh, and runs
//! nft through a wrapper that fails or hangs on demand (see `harness`). Needs root.
//!
//! "Carried in plaintext past ztunnel" is observable at the server: a captured connection comes
//! from the node (ztunnel dials it, 10.77.2.1); one that bypassed capture comes from the pod
//! itself (10.77.1.10).

mod harness;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use harness::{in_netns, real_nft, sample, wait_for, Node, NODE_EXT_SIDE, POD_IP};
use trellis_ztunnel::capture::{desired, installed, Nft, Plan, Ports};

const PORTS: Ports = Ports {
    outbound: 15001,
    inbound_plain: 15006,
    hbone: 15008,
    metrics: 15020,
    readiness: 15021,
};
const SETTLE: Duration = Duration::from_secs(20);

/// Asserts that the table in the node namespace is exactly the desired one for the pod.
fn assert_installed_equals_desired(node: &Node) {
    let installed = installed::parse(&node.installed_json()).expect("nft -j output parses");
    let want = desired(&Plan::Pods(BTreeSet::from([POD_IP])), PORTS).snapshot();
    assert_eq!(
        installed::difference(&want, Some(&installed)),
        None,
        "read back differs from desired\n{}",
        node.log()
    );
}

/// Asserts that the pod's connection went through ztunnel: the server saw the node, never the pod.
fn assert_captured(node: &Node) {
    let answer = node
        .call_from_pod()
        .unwrap_or_else(|e| panic!("pod → server: {e}\n{}", node.log()));
    assert_eq!(answer.trim(), format!("hello {NODE_EXT_SIDE}"), "dialled by ztunnel");
    assert_never_bypassed(node);
}

fn assert_never_bypassed(node: &Node) {
    let callers = node.server.as_ref().expect("server").callers();
    assert!(
        !callers.contains(&IpAddr::V4(POD_IP)),
        "a connection of the enrolled pod bypassed ztunnel: {callers:?}"
    );
}

#[test]
fn rules_converge_after_nft_fails_its_first_calls_and_readiness_follows() {
    let mut node = Node::new("conv");
    node.fail_next(3);
    node.start_ztunnel(5000, 10_000);

    // Poll until ready, recording what readiness and the metrics said on the way.
    let mut saw_failing_and_unready = false;
    wait_for(
        "readiness 200 once nft works",
        SETTLE,
        || node.log(),
        || {
            // One scrape for both values, then readiness: each sample is a consistent "before".
            let metrics = node.metrics()?;
            let failures = sample(&metrics, "trellis_capture_apply_failures_total").unwrap_or(0.0);
            let in_sync = sample(&metrics, "trellis_capture_rules_in_sync").unwrap_or(0.0);
            let ready = node.readiness()?;
            if failures >= 1.0 && in_sync == 0.0 && ready.0 == 503 && ready.1.contains("capture rules") {
                saw_failing_and_unready = true;
            }
            (ready.0 == 200).then_some(())
        },
    );
    assert!(
        saw_failing_and_unready,
        "readiness said 503 (capture rules) while nft failed\n{}",
        node.log()
    );

    assert_eq!(
        node.metric("trellis_capture_apply_failures_total"),
        3.0,
        "{}",
        node.log()
    );
    assert_eq!(node.metric("trellis_capture_rules_in_sync"), 1.0);
    assert_eq!(
        node.metric("trellis_config_connected"),
        0.0,
        "no stream with --config-file"
    );
    let calls = node.nft_calls();
    assert!(
        calls[..4].iter().all(|c| c == "-f -"),
        "three failed installs, one that worked: {calls:?}"
    );
    assert!(
        calls[4..].iter().any(|c| c.starts_with("-j list table ip trellis")),
        "then a read back: {calls:?}"
    );
    assert_installed_equals_desired(&node);
    assert_captured(&node);
}

#[test]
fn an_enrolled_pods_connection_is_refused_not_bypassed_while_its_rules_are_stale_and_nft_fails() {
    let mut node = Node::new("stale");
    node.start_ztunnel(5000, 300);
    node.wait_ready(SETTLE);
    assert_captured(&node);

    // nft breaks, and someone flushes the redirects: the table is stale and cannot be repaired.
    node.fail_always(true);
    node.nft(&["flush", "chain", "ip", "trellis", "capture"]);
    let refused = node.call_from_pod();
    assert!(refused.is_err(), "the guard refuses what capture missed: {refused:?}");
    assert_never_bypassed(&node);
    wait_for(
        "readiness 503 while the rules cannot be checked",
        SETTLE,
        || node.log(),
        || node.readiness().filter(|(status, _)| *status == 503),
    );
    assert_eq!(node.metric("trellis_capture_rules_in_sync"), 0.0);
    wait_for(
        "the failing nft runs to be counted",
        SETTLE,
        || node.log(),
        || {
            let failed = node.metric("trellis_capture_readback_failures_total")
                + node.metric("trellis_capture_apply_failures_total");
            (failed >= 1.0).then_some(())
        },
    );
    assert!(node.call_from_pod().is_err(), "still refused");
    assert_never_bypassed(&node);

    // nft works again: the drift is found and repaired.
    node.fail_always(false);
    node.wait_ready(SETTLE);
    assert!(node.metric("trellis_capture_drift_total") >= 1.0, "{}", node.log());
    assert_installed_equals_desired(&node);
    assert_captured(&node);
}

#[test]
fn a_table_deleted_behind_ztunnels_back_is_reinstalled() {
    let mut node = Node::new("del");
    node.start_ztunnel(5000, 300);
    node.wait_ready(SETTLE);
    node.nft(&["delete", "table", "ip", "trellis"]);
    wait_for(
        "the drift to be counted",
        SETTLE,
        || node.log(),
        || (node.metric("trellis_capture_drift_total") >= 1.0).then_some(()),
    );
    node.wait_ready(SETTLE);
    assert_installed_equals_desired(&node);
    assert_captured(&node);
}

#[test]
fn a_hung_nft_is_killed_at_its_timeout_and_the_rules_still_converge() {
    let mut node = Node::new("hung");
    node.hang_next();
    node.start_ztunnel(1000, 10_000);
    wait_for(
        "the first nft call to hang",
        SETTLE,
        || node.log(),
        || Node::process_running(&node.hang_marker).then_some(()),
    );
    let (status, body) = node.readiness().expect("readiness answers while nft hangs");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("capture rules"), "{body}");

    node.wait_ready(SETTLE);
    assert_eq!(
        node.metric("trellis_capture_apply_failures_total"),
        1.0,
        "{}",
        node.log()
    );
    wait_for(
        "the hung nft and its child to be gone",
        Duration::from_secs(5),
        || node.log(),
        || (!Node::process_running(&node.hang_marker)).then_some(()),
    );
    assert!(
        node.log().contains("did not finish within 1s and was killed"),
        "{}",
        node.log()
    );
    assert_installed_equals_desired(&node);
    assert_captured(&node);
}

/// The driver's nft runs alone, in a fresh namespace: what it installs reads back equal, in both
/// modes, and a missing table reads back as missing, not as an error.
#[test]
fn nft_reads_back_exactly_what_it_installed_in_pod_and_host_mode() {
    let ns = harness::Netns::new(format!("ztc-rb-{}", std::process::id()));
    let nft = Nft {
        path: real_nft(),
        timeout: Duration::from_secs(5),
    };
    let plans = [
        Plan::Pods(BTreeSet::new()),
        Plan::Pods(BTreeSet::from([POD_IP, "10.77.1.11".parse().unwrap()])),
        Plan::Host {
            control: Some("10.1.0.2:15012".parse().unwrap()),
        },
        Plan::Host { control: None },
    ];
    in_netns(&ns.0, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(nft.read_back().await.expect("listing"), None, "no table yet");
            for plan in &plans {
                let table = desired(plan, PORTS);
                nft.apply(&table.script())
                    .await
                    .unwrap_or_else(|e| panic!("{plan:?}: {e}"));
                let back = nft.read_back().await.expect("read back").expect("a table");
                assert_eq!(installed::difference(&table.snapshot(), Some(&back)), None, "{plan:?}");
            }
        })
    });
}
