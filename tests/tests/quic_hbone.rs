//! HBONE over QUIC on 15009 (issue 15, item 1), held against an independent HTTP/3
//! implementation: aioquic (tests/h3/hbone_h3_client.py), run where another node's proxy would
//! (node-2's namespace), sends a plain HTTP/3 CONNECT (only `:method` and `:authority`, as RFC
//! 9114 §4.4 wants) to node-1's ztunnel. With a mesh SVID it reaches the pod, served as the
//! identity its SNI names; a DENY policy answers 401 exactly as on 15008; an address that is no
//! workload of the node answers 400; without a certificate the handshake is refused. A hostile
//! aioquic peer (tests/h3/hostile_quic.py: garbage datagrams, a flood of half-open handshakes, a
//! request stream stalled inside its HEADERS, streams past the limit) is refused or timed out
//! while a well-behaved tunnel beside it is still served.
//!
//! Addresses (deploy/lab/README.md): nodes 10.1.0.11 and 10.1.0.12; node-1's pod tgt 10.1.1.10.

use std::process::Command;
use std::time::Duration;

use trellis_e2e::lab::Lab;
use trellis_e2e::{h3_client_script, h3_python, wait_until};
use trellis_identity::SpiffeId;
use trellis_ztunnel::hbone::http3::RETRY_ABOVE;
use trellis_ztunnel::hbone::server::SERVER_HANDSHAKE_TIMEOUT;
use trellis_ztunnel::hbone::{sni_for, MAX_STREAMS};

const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 2}
namespaces:
  - {name: mesh, ambient: true}
pods:
  - {name: tgt, namespace: mesh, node: node-1, serviceAccount: tgt, labels: {app: tgt}, run: {server: {version: v1, port: 8080}}}
  - {name: cli, namespace: mesh, node: node-2, serviceAccount: cli}
"#;

const DENY_ATK: &str = r#"
apiVersion: trellis.io/v1
kind: AuthorizationPolicy
metadata: {name: no-atk, namespace: mesh}
spec:
  action: DENY
  selector: {matchLabels: {app: tgt}}
  rules:
    - from: {principals: ["ns/mesh/sa/atk"]}
"#;

const TGT: &str = "spiffe://east.trellis.local/ns/mesh/sa/tgt";
const CLI: &str = "spiffe://east.trellis.local/ns/mesh/sa/cli";
const ATK: &str = "spiffe://east.trellis.local/ns/mesh/sa/atk";
const NODE1_QUIC: &str = "10.1.0.11:15009";
const TGT_AUTHORITY: &str = "10.1.1.10:8080";

/// The JSON line a Python client printed (`who` names it if it printed none).
fn json_line(out: std::process::Output, who: &str) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{who} printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// An aioquic `script` run where another node's proxy would (node-2's namespace), aimed at
/// node-1's 15009 with the SNI that names tgt, for a tunnel to `authority`.
fn aioquic(lab: &Lab, script: std::path::PathBuf, authority: &str) -> Command {
    let tgt = SpiffeId::parse(TGT).expect("an ID");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.node_ns("east", "node-2")])
        .arg(h3_python())
        .arg(script)
        .args([
            "--connect",
            NODE1_QUIC,
            "--sni",
            &sni_for(&tgt),
            "--authority",
            authority,
        ]);
    cmd
}

/// What the aioquic client printed: its JSON line.
fn h3_connect(lab: &Lab, svid: Option<&(String, String)>, authority: &str) -> serde_json::Value {
    let mut cmd = aioquic(lab, h3_client_script(), authority);
    cmd.args([
        "--baggage",
        "k8s.cluster.name=east,k8s.namespace.name=mesh,k8s.deployment.name=cli",
    ])
    .args([
        "--send",
        "GET / HTTP/1.1\\r\\nHost: tgt\\r\\nConnection: close\\r\\n\\r\\n",
    ]);
    if let Some((cert, key)) = svid {
        cmd.args(["--cert", cert, "--key", key]);
    }
    json_line(cmd.output().expect("running the aioquic client"), "the aioquic client")
}

/// `id`'s SVID from the lab's CA, written as PEM files (chain, key) in `dir`.
fn svid_files(lab: &Lab, dir: &std::path::Path, id: &str) -> (String, String) {
    let (ca, _) = lab.ca("east");
    let id = SpiffeId::parse(id).expect("an ID");
    let svid = ca.issue_svid(&id, Duration::from_secs(3600)).expect("an SVID");
    let name = id.to_string().rsplit('/').next().unwrap_or("svid").to_string();
    let chain: String = svid
        .chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect();
    let key = pem::encode(&pem::Pem::new("PRIVATE KEY", svid.key.secret_pkcs8_der().to_vec()));
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, chain).expect("writing the chain");
    std::fs::write(&key_path, key).expect("writing the key");
    (cert_path.display().to_string(), key_path.display().to_string())
}

#[test]
fn an_independent_http3_client_tunnels_over_quic_with_the_rules_of_15008() {
    let lab = Lab::up("e2equic", TOPOLOGY);
    let version = lab.metric("east", "node-1", "trellis_config_version", &[]);
    std::fs::write(lab.manifests("east").join("policy.yaml"), DENY_ATK).expect("writing the policy");
    wait_until(
        "node-1 applies a config with the policy",
        Duration::from_secs(20),
        || lab.metric("east", "node-1", "trellis_config_version", &[]) > version,
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let cli = svid_files(&lab, dir.path(), CLI);
    let atk = svid_files(&lab, dir.path(), ATK);

    let open = h3_connect(&lab, Some(&cli), TGT_AUTHORITY);
    assert_eq!(open["status"], 200, "cli's CONNECT over HTTP/3 is answered 200: {open}");
    assert_eq!(open["server_id"], TGT, "served as the identity the SNI names: {open}");
    assert!(
        open["body"].as_str().unwrap_or_default().contains("hello from tgt"),
        "the bytes crossed the tunnel to tgt and back: {open}"
    );

    let denied = h3_connect(&lab, Some(&atk), TGT_AUTHORITY);
    assert_eq!(denied["status"], 401, "the DENY policy applies over QUIC too: {denied}");

    let stray = h3_connect(&lab, Some(&cli), "10.1.1.99:8080");
    assert_eq!(stray["status"], 400, "no workload of node-1 at that address: {stray}");

    let anonymous = h3_connect(&lab, None, TGT_AUTHORITY);
    assert!(
        anonymous.get("error").is_some() && anonymous.get("status").is_none(),
        "no client certificate: the QUIC handshake is refused, no CONNECT answered: {anonymous}"
    );

    let log = lab.log("ztunnel-east-node-1");
    assert!(
        log.lines().any(|l| l.contains("connection closed")
            && l.contains(&format!("src_identity={CLI}"))
            && l.contains(r#"claimed_source=("east", "mesh", "cli")"#)),
        "node-1's access log has the QUIC tunnel, with the client's baggage:\n{log}"
    );
    assert!(
        log.contains("tunnel denied (401)") && log.contains("HBONE QUIC connection refused"),
        "node-1 logged the denial and the refused handshake:\n{log}"
    );
}

/// What the hostile aioquic peer (tests/h3/hostile_quic.py) printed after attacking node-1's
/// 15009 from node-2 in `mode`, with `svid` for its well-behaved tunnel to tgt.
fn hostile(lab: &Lab, mode: &str, count: usize, svid: &(String, String)) -> serde_json::Value {
    let out = aioquic(lab, h3_client_script().with_file_name("hostile_quic.py"), TGT_AUTHORITY)
        .arg(mode)
        .args(["--cert", &svid.0, "--key", &svid.1, "--count", &count.to_string()])
        .output()
        .expect("running the hostile aioquic peer");
    eprintln!("hostile {mode}: {}", String::from_utf8_lossy(&out.stdout).trim());
    json_line(out, "the hostile peer")
}

/// The well-behaved tunnel of a hostile run got its 200 and tgt's answer through it.
fn served(result: &serde_json::Value, during: &str) {
    assert_eq!(
        (&result["tunnel"]["status"], &result["tunnel"]["answered"]),
        (&serde_json::json!(200), &serde_json::json!(true)),
        "{during}, a well-behaved tunnel is still answered 200 and carries tgt's answer: {result}"
    );
}

#[test]
fn a_hostile_quic_peer_is_held_off_without_harming_other_tunnels() {
    let lab = Lab::up("e2equich", TOPOLOGY);
    let dir = tempfile::tempdir().expect("temp dir");
    let cli = svid_files(&lab, dir.path(), CLI);

    let garbage = hostile(&lab, "garbage", 20_000, &cli);
    served(&garbage, "after 20,000 garbage datagrams");

    // Half-open handshakes from spoofable sources: past RETRY_ABOVE in flight, a new client
    // must first echo a Retry token, so the flood holds at most that many handshakes.
    let flood = hostile(&lab, "handshakes", 300, &cli);
    served(&flood, "while 300 handshakes that never finish are pending");
    let retries = flood["answers"]["retry"].as_u64().unwrap_or(0);
    let initials = flood["answers"]["initial"].as_u64().unwrap_or(0);
    assert!(
        retries >= 300 - 2 * RETRY_ABOVE as u64 && initials <= 2 * RETRY_ABOVE as u64,
        "past {RETRY_ABOVE} pending handshakes the flood gets Retry packets, not handshakes: {flood}"
    );

    let silent = hostile(&lab, "silent", 0, &cli);
    served(&silent, "beside a request stream that stalls inside its HEADERS");
    let stopped = silent["silent_stopped_after"].as_f64();
    assert!(
        stopped.is_some_and(|s| s <= SERVER_HANDSHAKE_TIMEOUT.as_secs_f64() + 2.0),
        "the stalled stream is given up within the handshake timeout ({SERVER_HANDSHAKE_TIMEOUT:?}): {silent}"
    );

    // A peer that opens streams past the server's limit breaks QUIC (RFC 9000 §4.6): its
    // connection ends with STREAM_LIMIT_ERROR (0x4); another connection's tunnel carries on.
    let streams = hostile(&lab, "streams", MAX_STREAMS as usize + 100, &cli);
    served(&streams, "after another connection broke the stream limit");
    assert_eq!(
        streams["stream_limit"],
        serde_json::json!(MAX_STREAMS),
        "the server grants MAX_STREAMS tunnels per connection: {streams}"
    );
    assert_eq!(
        streams["flood_closed_with"],
        serde_json::json!(0x4),
        "the flooding connection is closed with STREAM_LIMIT_ERROR: {streams}"
    );

    let log = lab.log("ztunnel-east-node-1");
    assert!(!log.contains("panicked"), "node-1's ztunnel did not panic:\n{log}");
}

/// Two clusters on two networks (as in federation_lab.rs): east's client calls `far`, served
/// only in west, through the gateways. East's ztunnels retry QUIC 3 s after a fallback.
const FEDERATION: &str = r#"
clusters:
  - {name: east, nodes: 1, ztunnelArgs: [--quic-fallback-seconds, "3"]}
  - {name: west, nodes: 1}
namespaces:
  - {name: demo, ambient: true}
services:
  - {name: far, namespace: demo, cluster: east, port: 80, targetPort: 8080, selector: {app: far}, global: true}
  - {name: far, namespace: demo, cluster: west, port: 80, targetPort: 8080, selector: {app: far}, global: true}
pods:
  - {name: client, namespace: demo, cluster: east, node: node-1, serviceAccount: client}
  - {name: far-1, namespace: demo, cluster: west, node: node-1, serviceAccount: far, labels: {app: far}, run: {server: {version: west, port: 8080}}}
"#;

/// far's VIP in east (the lab's address plan: the first service of cluster 1).
const EAST_FAR: &str = "http://10.101.0.10/";

/// Tunnels east's node-1 opened over `transport`.
fn tunnels(lab: &Lab, transport: &str) -> f64 {
    lab.metric(
        "east",
        "node-1",
        "trellis_tunnels_opened_total",
        &[("reporter", "source"), ("transport", transport)],
    )
}

/// Drops (or, with `drop` false, lets through again) UDP 15009 on the wan bridge between the
/// cluster networks: a firewall that blocks QUIC.
fn block_quic_on_the_wan(lab: &Lab, drop: bool) {
    let script = if drop {
        "add table bridge trellis_test\n\
         add chain bridge trellis_test forward { type filter hook forward priority 0; }\n\
         add rule bridge trellis_test forward udp dport 15009 drop\n\
         add rule bridge trellis_test forward udp sport 15009 drop\n"
    } else {
        "delete table bridge trellis_test\n"
    };
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &lab.underlay_ns(), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("running nft");
    std::io::Write::write_all(&mut nft.stdin.take().expect("stdin"), script.as_bytes()).expect("nft's input");
    assert!(nft.wait().expect("nft ends").success(), "nft {script}");
}

#[test]
fn cross_cluster_tunnels_ride_quic_and_fall_back_to_http2_while_udp_is_blocked() {
    let lab = Lab::up("e2equicf", FEDERATION);
    let client = lab.pod_ns("east", "demo", "client");
    let body = lab
        .call_until(&client, EAST_FAR, Duration::from_secs(30), |r| r.is_ok())
        .expect("east's client reaches far in west");
    assert!(body.contains("far-1"), "{body}");
    assert!(
        tunnels(&lab, "h3") >= 1.0,
        "the tunnel to west's gateway rode QUIC:\n{}\n{}",
        lab.log("ztunnel-east-node-1"),
        lab.log("ztunnel-west-gw")
    );
    let h2_before = tunnels(&lab, "h2");
    assert!(
        lab.log("ztunnel-east-node-1")
            .lines()
            .any(|l| l.contains("connection closed") && (l.contains("transport=\"h3\"") || l.contains("transport=h3"))),
        "the access log names the transport"
    );

    // A firewall starts dropping UDP between the networks: every new call still succeeds,
    // over HTTP/2 to the gateway's 15008.
    block_quic_on_the_wan(&lab, true);
    for i in 0..10 {
        let body = lab
            .call(&client, EAST_FAR, 0)
            .unwrap_or_else(|e| panic!("call {i} with UDP blocked: {e}"));
        assert!(body.contains("far-1"), "{body}");
    }
    let fallbacks = lab.metric("east", "node-1", "trellis_quic_fallbacks_total", &[]);
    assert!(fallbacks >= 1.0, "the QUIC dial failed and fell back");
    assert!(tunnels(&lab, "h2") >= h2_before + 10.0, "the calls rode HTTP/2");

    // UDP gets through again: once the fallback expires, new tunnels ride QUIC again.
    block_quic_on_the_wan(&lab, false);
    let h3_before = tunnels(&lab, "h3");
    wait_until("east's tunnels ride QUIC again", Duration::from_secs(30), || {
        let _ = lab.call(&client, EAST_FAR, 0);
        tunnels(&lab, "h3") > h3_before
    });
    for i in 0..5 {
        lab.call(&client, EAST_FAR, 0)
            .unwrap_or_else(|e| panic!("call {i} after UDP came back: {e}"));
    }
}
