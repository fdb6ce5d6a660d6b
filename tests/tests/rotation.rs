//! Rotation under long-lived connections, end to end in the lab (issue 12, item 5), and a node
//! that restarts after its first SVID has expired (issue 12: persisted node identity).
//!
//! With 60 s SVIDs, one keep-alive HTTP/1.1 connection from cli to tgt carries a request every
//! 5 s for 75 s: past the expiry of the certificate that opened its HBONE connection, which
//! node-1 answers with GOAWAY (no new tunnels there) while the open tunnel runs on. New calls keep
//! succeeding on the renewed SVIDs. Then node-2's ztunnel is killed: its join token is spent and
//! the node SVID it joined with has expired, yet `trellis lab up` brings it back with the renewed
//! SVID it saved, and calls work again.
//!
//! Addresses (deploy/lab/README.md): node-1's pod tgt 10.1.1.10 (demo server on 8080, service
//! VIP 10.101.0.10:80); node-2's pod cli 10.1.2.10.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use trellis_e2e::lab::Lab;
use trellis_e2e::{in_netns, wait_until};

const TOPOLOGY: &str = r#"
clusters:
  - name: east
    nodes: 2
    trellisdArgs: [--svid-ttl-seconds, "60", --svid-max-ttl-seconds, "60"]
namespaces:
  - {name: mesh, ambient: true}
services:
  - {name: tgt, namespace: mesh, port: 80, targetPort: 8080, selector: {app: tgt}}
pods:
  - {name: tgt, namespace: mesh, node: node-1, serviceAccount: tgt, labels: {app: tgt}, run: {server: {version: v1, port: 8080}}}
  - {name: cli, namespace: mesh, node: node-2, serviceAccount: cli}
"#;

const TGT_VIP: &str = "10.101.0.10:80";
const SVID_TTL: Duration = Duration::from_secs(60);
const EXPIRED: &str = "client certificate expired: no new tunnels (GOAWAY), open ones run on";

/// One request on an open keep-alive connection; the body of a 200 answer.
fn request(reader: &mut BufReader<TcpStream>, i: usize) -> Result<String, String> {
    let request = format!("GET /keepalive-{i} HTTP/1.1\r\nHost: tgt\r\n\r\n");
    reader
        .get_mut()
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut status = String::new();
    reader.read_line(&mut status).map_err(|e| format!("read: {e}"))?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status line {status:?}"));
    }
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
            if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close") {
                return Err("the server closes the connection".into());
            }
        }
    }
    let mut body = vec![0; length.ok_or("no content-length")?];
    reader.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn a_long_lived_connection_outlives_its_svids_and_a_restarted_ztunnel_resumes_without_a_token() {
    let lab = Lab::up("e2erot", TOPOLOGY);
    let cli = lab.pod_ns("east", "mesh", "cli");
    let vip: SocketAddr = TGT_VIP.parse().expect("an address");
    let tcp = in_netns(&cli, || TcpStream::connect_timeout(&vip, Duration::from_secs(5))).expect("cli → tgt");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut conn = BufReader::new(tcp);
    let opened = Instant::now();

    let mut i = 0;
    while opened.elapsed() < SVID_TTL + Duration::from_secs(15) {
        let body = request(&mut conn, i).unwrap_or_else(|e| {
            panic!(
                "request {i} on the long-lived connection, {:.1} s after it opened: {e}",
                opened.elapsed().as_secs_f64()
            )
        });
        assert!(body.contains("hello from tgt"), "{body}");
        // A new connection works too, whatever SVID is current.
        let fresh = lab.call(&cli, "http://10.101.0.10/", 0);
        assert!(
            fresh.as_ref().is_ok_and(|b| b.contains("hello from tgt")),
            "a new call {:.1} s in: {fresh:?}",
            opened.elapsed().as_secs_f64()
        );
        i += 1;
        std::thread::sleep(Duration::from_secs(5));
    }
    assert!(i >= 15, "{i} requests on the long-lived connection");
    eprintln!(
        "{i} requests on one keep-alive connection over {:.1} s (SVIDs live {} s), each beside a new call",
        opened.elapsed().as_secs_f64(),
        SVID_TTL.as_secs()
    );
    let node1 = lab.log("ztunnel-east-node-1");
    assert!(
        node1.contains(EXPIRED),
        "the certificate that opened the HBONE connection expired while it was open:\n{node1}"
    );

    // A killed ztunnel: `lab status` says how to start it again, and `lab up` does.
    let node2 = lab.node_ns("east", "node-2");
    lab.kill_all_in(&node2);
    let status = lab.status();
    let line = status
        .lines()
        .find(|l| l.contains("ztunnel-east-node-2"))
        .unwrap_or_else(|| panic!("no line for node-2's ztunnel:\n{status}"));
    assert!(line.contains("dead (restart: trellis lab up --file"), "{status}");
    let out = lab.up_again();
    assert!(out.contains("restarted ztunnel-east-node-2"), "{out}");
    let log = lab.log("ztunnel-east-node-2");
    assert!(
        log.contains("ztunnel resumed as spiffe://east.trellis.local/trellis/node/node-2"),
        "resumed with the saved SVID, not the spent token:\n{log}"
    );
    let mut last = Err(String::new());
    wait_until(
        "cli's calls work through the restarted ztunnel",
        Duration::from_secs(20),
        || {
            last = lab.call(&cli, "http://10.101.0.10/", 0);
            last.as_ref().is_ok_and(|b| b.contains("hello from tgt"))
        },
    );
    assert!(
        lab.status().lines().all(|l| !l.contains("dead")),
        "everything alive again"
    );
}
