//! Two clusters on two networks in the lab, federated through a real etcd (TLS, client
//! certificates, etcd's users and roles) and joined by `trellis lab up` itself: a client of east
//! reaches a global service that only west serves, through the two east-west gateways, in mutual
//! TLS end to end; the wire between the networks carries only tunnels; west's policy sees east's
//! workload; etcd's loss is survived and reported; a cluster that leaves is refused, and
//! accepted again once it rejoins.

use std::process::Command;
use std::time::{Duration, Instant};

use trellis_e2e::lab::Lab;
use trellis_e2e::wait_until;

/// east: a client (no process: the test calls from it) and `near`, served there; west: `far`,
/// served only there, and a client of its own. Both services exist and are global in both
/// clusters (one global service per namespace and name).
const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 1}
  - {name: west, nodes: 1}
namespaces:
  - {name: demo, ambient: true}
services:
  - {name: far, namespace: demo, cluster: east, port: 80, targetPort: 8080, selector: {app: far}, global: true}
  - {name: far, namespace: demo, cluster: west, port: 80, targetPort: 8080, selector: {app: far}, global: true}
  - {name: near, namespace: demo, cluster: east, port: 80, targetPort: 8080, selector: {app: near}, global: true}
  - {name: near, namespace: demo, cluster: west, port: 80, targetPort: 8080, selector: {app: near}, global: true}
pods:
  - {name: client, namespace: demo, cluster: east, node: node-1, serviceAccount: client}
  - {name: near-1, namespace: demo, cluster: east, node: node-1, serviceAccount: near, labels: {app: near}, run: {server: {version: east, port: 8080}}}
  - {name: far-1, namespace: demo, cluster: west, node: node-1, serviceAccount: far, labels: {app: far}, run: {server: {version: west, port: 8080}}}
  - {name: client, namespace: demo, cluster: west, node: node-1, serviceAccount: client}
"#;

/// The VIPs of the lab's address plan: the k-th service of cluster c is 10.(100+c).0.(10+k).
const EAST_FAR: &str = "http://10.101.0.10/";
const WEST_NEAR: &str = "http://10.102.0.11/";

/// Captures the IPv4 frames on the wan bridge's ports for `seconds` (a raw socket in the
/// underlay namespace) while `during` runs; returns one entry per TCP segment or UDP datagram:
/// `(protocol, sport, dport, plaintext)`, `protocol` being "tcp" or "udp" and `plaintext` true
/// when its payload holds `needle`.
fn capture_wan(lab: &Lab, seconds: u32, needle: &str, during: impl FnOnce()) -> Vec<(String, u16, u16, bool)> {
    let script = format!(
        r#"
import socket, struct, time, sys
# Every protocol: frames bridged between ports reach only an ETH_P_ALL socket.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.settimeout(0.2)
print("ready", flush=True)
end = time.time() + {seconds}
needle = {needle:?}.encode()
while time.time() < end:
    try:
        frame, where = s.recvfrom(65535)
    except socket.timeout:
        continue
    # The wan's ports on its bridge: the gateways' and etcd's veth ends (w<c>gw, wetcd).
    if not where[0].startswith("w"):
        continue
    ip = frame[14:]
    if frame[12:14] != b"\x08\x00" or len(ip) < 20 or ip[9] not in (6, 17):
        continue
    ihl = (ip[0] & 15) * 4
    seg = ip[ihl:]
    sport, dport = struct.unpack("!HH", seg[:4])
    off = (seg[12] >> 4) * 4 if ip[9] == 6 else 8
    proto = "tcp" if ip[9] == 6 else "udp"
    print(proto, sport, dport, 1 if needle in seg[off:] else 0, flush=True)
"#
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.underlay_ns(), "python3", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the capture");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).expect("the capture starts");
    assert_eq!(first.trim(), "ready");
    during();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("the capture's output");
    assert!(child.wait().expect("the capture ends").success());
    rest.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let proto = f.next()?.to_string();
            let mut n = f.map(|v| v.parse::<u16>().ok());
            Some((proto, n.next()??, n.next()??, n.next()?? == 1))
        })
        .collect()
}

/// `trellis federation status` as trellisd of `cluster` reports it.
fn federation_status(lab: &Lab, cluster: &str) -> String {
    let out = lab.exec(&lab.control_ns(cluster), "trellis", &["federation", "status"]);
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn east_reaches_west_through_the_gateways_in_mutual_tls_and_west_decides() {
    let lab = Lab::up("fedlab", TOPOLOGY);
    let east_client = lab.pod_ns("east", "demo", "client");
    let west_client = lab.pod_ns("west", "demo", "client");

    // A service with endpoints only in west, called from east.
    let answer = lab.call_until(&east_client, EAST_FAR, Duration::from_secs(30), |r| r.is_ok());
    let body = answer.expect("east's client reaches far, served only in west");
    assert!(body.contains("far-1"), "{body}");
    // West's node saw east's workload identity on the tunnel, and served west's.
    wait_until("west's access log names east's client", Duration::from_secs(10), || {
        lab.log("ztunnel-west-node-1").lines().any(|l| {
            l.contains("connection closed")
                && l.contains("src_identity=spiffe://east.trellis.local/ns/demo/sa/client")
                && l.contains("dst_identity=spiffe://west.trellis.local/ns/demo/sa/far")
        })
    });

    // Between the networks: only QUIC tunnels to the gateways (UDP 15009, the default transport
    // between clusters) and etcd's port, no TCP 15008, no plaintext.
    let segments = capture_wan(&lab, 4, "GET /", || {
        for _ in 0..5 {
            lab.call(&east_client, EAST_FAR, 0)
                .expect("a call through the gateways");
        }
    });
    assert!(!segments.is_empty(), "the calls crossed the wan");
    for (proto, sport, dport, plain) in &segments {
        let allowed = match proto.as_str() {
            "udp" => *sport == 15009 || *dport == 15009,
            _ => *sport == 2379 || *dport == 2379,
        };
        assert!(
            allowed,
            "a {proto} segment on the wan between ports {sport} and {dport}"
        );
        assert!(!plain, "application plaintext on the wan ({proto} {sport} -> {dport})");
    }
    assert!(
        segments
            .iter()
            .any(|(p, s, d, _)| p == "udp" && (*s == 15009 || *d == 15009)),
        "the gateway's QUIC port carried the calls"
    );

    // West's policy applies to east's workload by its namespace and service account.
    let policy = "apiVersion: trellis.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client, namespace: demo}\nspec:\n  action: DENY\n  rules:\n    - from: {principals: [\"ns/demo/sa/client\"]}\n";
    let file = lab.manifests("west").join("deny-client.yaml");
    std::fs::write(&file, policy).expect("west's policy");
    let denied = lab.call_until(&east_client, EAST_FAR, Duration::from_secs(30), |r| r.is_err());
    assert!(denied.is_err(), "west denies ns/demo/sa/client of any trust domain");
    assert!(
        lab.log("ztunnel-west-node-1").contains("tunnel denied (401)"),
        "denied by west's node"
    );
    std::fs::remove_file(&file).expect("removing the policy");
    lab.call_until(&east_client, EAST_FAR, Duration::from_secs(30), |r| r.is_ok())
        .expect("allowed again");

    // The other way: west's client reaches near, served only in east.
    lab.call_until(&west_client, WEST_NEAR, Duration::from_secs(30), |r| r.is_ok())
        .expect("west's client reaches near, served only in east");

    // etcd lost: traffic goes on from the last state, reported stale; etcd back: synced.
    lab.kill_all_in(&format!("tl-{}-etcd", lab.name));
    wait_until("east reports the federation stale", Duration::from_secs(30), || {
        federation_status(&lab, "east").contains("stale")
    });
    for _ in 0..3 {
        lab.call(&east_client, EAST_FAR, 0)
            .expect("traffic goes on without etcd");
    }
    lab.up_again();
    wait_until("east resyncs", Duration::from_secs(60), || {
        let status = federation_status(&lab, "east");
        !status.contains("stale") && status.contains("synced")
    });

    // West leaves: east drops its endpoints and no longer trusts it.
    let out = lab.exec(
        &lab.control_ns("west"),
        "trellis",
        &[
            "federation",
            "leave",
            "--manifests",
            &lab.manifests("west").display().to_string(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let started = Instant::now();
    let gone = lab.call_until(&east_client, EAST_FAR, Duration::from_secs(30), |r| r.is_err());
    assert!(gone.is_err(), "far has no endpoint left once west left");
    wait_until("east's node no longer trusts west", Duration::from_secs(30), || {
        lab.call(&lab.node_ns("east", "node-1"), "http://127.0.0.1:15000/config_dump", 0)
            .is_ok_and(|dump| !dump.contains("west.trellis.local"))
    });
    assert!(
        lab.call(&west_client, WEST_NEAR, 0).is_err(),
        "west's client is refused once west left"
    );
    eprintln!("west left: refused within {:?}", started.elapsed());

    // West joins again (as `lab up` did, with its own etcd certificate): accepted again.
    let pki = lab.state_dir.join("etcd").join("pki");
    let file = |name: &str| pki.join(name).display().to_string();
    let manifests = lab.manifests("west").display().to_string();
    let out = lab.exec(
        &lab.control_ns("west"),
        "trellis",
        &[
            "federation",
            "join",
            "--cluster",
            "west",
            "--etcd",
            "https://10.200.0.2:2379",
            "--etcd-ca",
            &file("ca.pem"),
            "--etcd-cert",
            &file("trellis-cluster-west.pem"),
            "--etcd-key",
            &file("trellis-cluster-west-key.pem"),
            "--network",
            "west",
            "--gateway",
            "10.200.0.12:15008",
            "--manifests",
            &manifests,
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lab.call_until(&west_client, WEST_NEAR, Duration::from_secs(30), |r| r.is_ok())
        .expect("west's client is accepted in east again once west rejoined");
    lab.call_until(&east_client, EAST_FAR, Duration::from_secs(30), |r| r.is_ok())
        .expect("and east reaches far in west again");
}
