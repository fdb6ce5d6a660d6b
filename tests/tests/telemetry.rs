//! Telemetry end to end, in the network-namespace lab: what a peer sends cannot grow a node's
//! metrics, and every `/metrics` the mesh serves is valid Prometheus text by `promtool`'s rules.
//!
//! Addresses (deploy/lab/README.md): nodes 10.1.0.11 and 10.1.0.12, trellisd 10.1.0.2; node-1's
//! pod tgt 10.1.1.10 (a demo server on 8080), node-2's pods atk 10.1.2.10 and cli 10.1.2.11.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use trellis_e2e::lab::{metric_sum, Lab};
use trellis_e2e::{in_netns, wait_until};
use trellis_identity::{CertManager, ManagerConfig, SpiffeId};
use trellis_ztunnel::hbone::baggage;
use trellis_ztunnel::hbone::pool::{Key, Pool};
use trellis_ztunnel::hbone::tunnel::Protocol;

const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 2}
namespaces:
  - {name: mesh, ambient: true}
services:
  - {name: tgt, namespace: mesh, port: 80, targetPort: 8080, selector: {app: tgt}}
pods:
  - {name: tgt, namespace: mesh, node: node-1, serviceAccount: tgt, labels: {app: tgt}, run: {server: {version: v1, port: 8080}}}
  - {name: atk, namespace: mesh, node: node-2, serviceAccount: atk}
  - {name: cli, namespace: mesh, node: node-2, serviceAccount: cli}
"#;

const TGT: &str = "spiffe://east.trellis.local/ns/mesh/sa/tgt";
const ATK: &str = "spiffe://east.trellis.local/ns/mesh/sa/atk";
const TGT_POD: &str = "10.1.1.10:8080";
const NODE1_HBONE: &str = "10.1.0.11:15008";
const FLOOD: usize = 5000;

/// Series (sample lines) in a Prometheus text exposition.
fn series(text: &str) -> usize {
    text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count()
}

/// Opens `FLOOD` tunnels to tgt through node-1, each with a `baggage` header of its own, from
/// node-2's namespace with atk's SVID (issued by the lab's CA, as trellisd would issue it to
/// atk's node): what a compromised workload can do. Returns how many tunnels opened.
fn baggage_flood(lab: &Lab) -> usize {
    let (ca, bundles) = lab.ca("east");
    let atk = SpiffeId::parse(ATK).expect("atk's ID");
    in_netns(&lab.node_ns("east", "node-2"), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let certs = CertManager::new(Arc::new(ca), ManagerConfig::default());
            certs.ensure(&atk);
            certs.wait_for(&atk, Duration::from_secs(10)).await.expect("atk's SVID");
            let pool = Pool::new(certs, bundles);
            let key = Arc::new(Key {
                source: atk,
                node: NODE1_HBONE.parse().expect("node-1"),
                destination: SpiffeId::parse(TGT).expect("tgt's ID"),
                protocol: Protocol::Http2,
                via: None,
            });
            let target: SocketAddr = TGT_POD.parse().expect("tgt");
            let mut tasks = tokio::task::JoinSet::new();
            let mut opened = 0;
            let mut first_error = None;
            for i in 0..FLOOD {
                // At most 64 in flight.
                while tasks.len() >= 64 {
                    match tasks.join_next().await {
                        Some(Ok(Ok(()))) => opened += 1,
                        Some(Ok(Err(e))) => first_error = first_error.or(Some(e)),
                        _ => {}
                    }
                }
                let (pool, key) = (pool.clone(), key.clone());
                tasks.spawn(async move {
                    let headers = [(
                        "baggage",
                        baggage(&format!("c{i}"), &format!("ns{i}"), &format!("flood-{i}")),
                    )];
                    let early = Bytes::new();
                    let open = pool.open(&key, target, &headers, &early);
                    match tokio::time::timeout(Duration::from_secs(10), open).await {
                        Ok(Ok(_tunnel)) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("no answer within 10 s".to_string()),
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                match done {
                    Ok(Ok(())) => opened += 1,
                    Ok(Err(e)) => first_error = first_error.or(Some(e)),
                    Err(_) => {}
                }
            }
            if let Some(e) = first_error {
                eprintln!("baggage flood: {opened}/{FLOOD} opened; first error: {e}");
            }
            opened
        })
    })
}

#[test]
fn a_baggage_flood_from_a_verified_peer_does_not_grow_the_metrics() {
    let lab = Lab::up("e2ebagg", TOPOLOGY);
    let before = lab.metrics("east", "node-1");

    let opened = baggage_flood(&lab);
    assert!(opened >= FLOOD * 99 / 100, "only {opened} of {FLOOD} tunnels opened");
    let from_atk = [("reporter", "destination"), ("source_principal", ATK)];
    let mut after = String::new();
    wait_until(
        "node-1 counted every tunnel of the flood, opened and closed",
        Duration::from_secs(60),
        || {
            after = lab.metrics("east", "node-1");
            let count = |m| metric_sum(&after, m, &from_atk) as usize;
            count("trellis_tcp_connections_opened_total") >= opened
                && count("trellis_tcp_connections_closed_total") >= opened
        },
    );

    let (lines_before, lines_after) = (series(&before), series(&after));
    eprintln!(
        "node-1's /metrics: {lines_before} series before {opened} tunnels with distinct baggage, {lines_after} after ({} bytes)",
        after.len()
    );
    assert!(
        lines_after <= lines_before + 16,
        "{opened} tunnels from one identity grew node-1's /metrics from {lines_before} to {lines_after} series ({} bytes)",
        after.len()
    );
    assert!(!after.contains("flood-"), "a claimed workload name became a label");
    // atk is a workload of the lab: the destination names it from its verified identity and
    // its namespace's address book, never from the baggage it sent.
    let known = [
        ("reporter", "destination"),
        ("source_principal", ATK),
        ("source_workload", "atk"),
        ("source_workload_namespace", "mesh"),
        ("source_cluster", "east"),
        ("destination_workload", "tgt"),
    ];
    assert!(
        metric_sum(&after, "trellis_tcp_connections_opened_total", &known) >= opened as f64,
        "the source labels are atk's verified identity, its workload, namespace and cluster:\n{after}"
    );
}

/// Runs `promtool check metrics` on `text`; its complaints, if any.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool (Debian: prometheus; deploy/install-deps.sh installs it)");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("promtool's answer");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.success() && said.trim().is_empty() {
        true => Ok(()),
        false => Err(format!("promtool check metrics ({}):\n{said}", out.status)),
    }
}

#[test]
fn every_metrics_endpoint_passes_promtool_check_metrics() {
    let lab = Lab::up("e2eprom", TOPOLOGY);
    // Traffic first, so that the labelled families and the histograms have samples.
    let cli = lab.pod_ns("east", "mesh", "cli");
    lab.call_until(&cli, "http://10.101.0.10/", Duration::from_secs(20), |r| r.is_ok())
        .expect("cli → tgt");
    let scrape = |netns: String, url: &str| {
        lab.call(&netns, url, 0)
            .unwrap_or_else(|e| panic!("GET {url} in {netns}: {e}"))
    };
    let endpoints = [
        (
            "ztunnel on node-1",
            scrape(lab.node_ns("east", "node-1"), "http://127.0.0.1:15020/metrics"),
        ),
        (
            "ztunnel on node-2",
            scrape(lab.node_ns("east", "node-2"), "http://127.0.0.1:15020/metrics"),
        ),
        (
            "ztunnel on node-1, /stats/prometheus",
            scrape(lab.node_ns("east", "node-1"), "http://127.0.0.1:15020/stats/prometheus"),
        ),
        (
            "trellisd's admin",
            scrape(lab.control_ns("east"), "http://127.0.0.1:15014/metrics"),
        ),
    ];
    let mut failures = Vec::new();
    for (what, text) in &endpoints {
        assert!(
            text.contains("trellis_") && series(text) > 0,
            "{what} serves metrics:\n{text}"
        );
        if let Err(e) = promtool_check(text) {
            failures.push(format!("{what}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
