//! HBONE over HTTP/2 the way a foreign peer speaks it (issue 15, item 4), in the lab: Istio's
//! ztunnel sends no server name (SNI), dials the destination *pod's* address on 15008 and names
//! its workload in `baggage` as `k8s.deployment.name`. Such a client, holding an SVID of the
//! shared root CA and running where a foreign node proxy would (node-2's namespace, not
//! captured), reaches the right pod with the right identity, and a DENY policy still applies.
//! The other direction: a workload annotated `trellis.io/tunnel-address: pod` is dialled at its
//! own address on 15008, as a foreign node proxy expects.
//!
//! Addresses (deploy/lab/README.md): nodes 10.1.0.11 and 10.1.0.12; node-1's pods tgt 10.1.1.10
//! and ist 10.1.1.11; node-2's pod cli 10.1.2.10; ist's service VIP 10.101.0.10:80.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use tokio::net::TcpStream;
use trellis_e2e::lab::Lab;
use trellis_e2e::sniff::Sniffer;
use trellis_e2e::{in_netns, wait_until};
use trellis_identity::tls::client_config;
use trellis_identity::verify::{peer_id, ExpectedPeer, SpiffeServerVerifier};
use trellis_identity::{BundleSet, CertManager, ManagerConfig, SpiffeId};

const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 2}
namespaces:
  - {name: mesh, ambient: true}
services:
  - {name: ist, namespace: mesh, port: 80, targetPort: 8080, selector: {app: ist}}
pods:
  - {name: tgt, namespace: mesh, node: node-1, serviceAccount: tgt, labels: {app: tgt}, run: {server: {version: v1, port: 8080}}}
  - {name: ist, namespace: mesh, node: node-1, serviceAccount: ist, labels: {app: ist}, annotations: {trellis.io/tunnel-address: pod}, run: {server: {version: v1, port: 8080}}}
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
const TGT_POD: &str = "10.1.1.10";
const IST_POD: &str = "10.1.1.11";
const NODE1: &str = "10.1.0.11";
const IST_VIP: &str = "http://10.101.0.10:80/";

/// What a foreign HBONE client got: the identity the server presented, the CONNECT's status,
/// and what the workload answered through the tunnel (on a 200).
#[derive(Debug)]
struct Answer {
    server: SpiffeId,
    status: StatusCode,
    body: String,
}

/// One tunnel the way a foreign HBONE client opens it: TCP to `dial` (port 15008), TLS 1.3
/// presenting `source`'s SVID and no server name (rustls sends none for an address), ALPN h2,
/// then `CONNECT authority` with Istio's `baggage` keys, and an HTTP/1.1 GET through it.
async fn foreign_tunnel(
    certs: &CertManager,
    bundles: &BundleSet,
    source: &SpiffeId,
    dial: &str,
    authority: &str,
) -> Result<Answer, String> {
    let verifier = SpiffeServerVerifier::new(bundles.clone(), ExpectedPeer::Any);
    let mut config = client_config(verifier, Some(certs.resolver(source))).map_err(|e| e.to_string())?;
    config.enable_sni = false;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr: SocketAddr = format!("{dial}:15008").parse().map_err(|e| format!("{e}"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| "TCP connect timed out".to_string())?
        .map_err(|e| format!("TCP: {e}"))?;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    let server = peer_id(tls.get_ref().1).ok_or("the server presented no SPIFFE ID")?;
    let (h2, connection) = h2::client::handshake(tls).await.map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.map_err(|e| format!("HTTP/2: {e}"))?;
    let request = Request::connect(authority)
        .header("forwarded", "for=\"10.1.2.10:40000\"")
        .header(
            "baggage",
            "k8s.cluster.name=east,k8s.namespace.name=mesh,k8s.deployment.name=cli,service.name=cli,service.version=v1",
        )
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut send) = h2.send_request(request, false).map_err(|e| format!("CONNECT: {e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .map_err(|_| "no answer to CONNECT".to_string())?
        .map_err(|e| format!("CONNECT: {e}"))?;
    let status = response.status();
    if status != StatusCode::OK {
        return Ok(Answer {
            server,
            status,
            body: String::new(),
        });
    }
    send.send_data(
        Bytes::from_static(b"GET / HTTP/1.1\r\nHost: tgt\r\nConnection: close\r\n\r\n"),
        false,
    )
    .map_err(|e| format!("sending: {e}"))?;
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .map_err(|_| "the workload did not answer".to_string())?
    {
        let chunk = chunk.map_err(|e| format!("reading: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
        if String::from_utf8_lossy(&got).contains("hello from") {
            break;
        }
    }
    Ok(Answer {
        server,
        status,
        body: String::from_utf8_lossy(&got).into_owned(),
    })
}

/// Runs `f` with SVIDs of `ids` issued by the lab's CA (a foreign mesh sharing the root CA), on a
/// runtime inside node-2's namespace.
fn as_foreign_node<T: Send>(lab: &Lab, ids: &[&str], f: impl AsyncFnOnce(CertManager, BundleSet) -> T + Send) -> T {
    let (ca, bundles) = lab.ca("east");
    let ids: Vec<SpiffeId> = ids.iter().map(|i| SpiffeId::parse(i).expect("an ID")).collect();
    in_netns(&lab.node_ns("east", "node-2"), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let certs = CertManager::new(Arc::new(ca), ManagerConfig::default());
            for id in &ids {
                certs.ensure(id);
                certs.wait_for(id, Duration::from_secs(10)).await.expect("an SVID");
            }
            f(certs, bundles).await
        })
    })
}

#[test]
fn a_foreign_hbone_client_without_sni_dialling_the_pod_reaches_it_and_policy_applies() {
    let lab = Lab::up("e2eforgn", TOPOLOGY);
    let version = lab.metric("east", "node-1", "trellis_config_version", &[]);
    std::fs::write(lab.manifests("east").join("policy.yaml"), DENY_ATK).expect("writing the policy");
    wait_until(
        "node-1 applies a config with the policy",
        Duration::from_secs(20),
        || lab.metric("east", "node-1", "trellis_config_version", &[]) > version,
    );
    let tgt_authority = format!("{TGT_POD}:8080");
    let ist_authority = format!("{IST_POD}:8080");
    let (cli, atk, to_node, to_other_pod) = as_foreign_node(&lab, &[CLI, ATK], async |certs, bundles| {
        let (cli, atk) = (SpiffeId::parse(CLI).unwrap(), SpiffeId::parse(ATK).unwrap());
        (
            foreign_tunnel(&certs, &bundles, &cli, TGT_POD, &tgt_authority).await,
            foreign_tunnel(&certs, &bundles, &atk, TGT_POD, &tgt_authority).await,
            foreign_tunnel(&certs, &bundles, &cli, NODE1, &tgt_authority).await,
            foreign_tunnel(&certs, &bundles, &cli, TGT_POD, &ist_authority).await,
        )
    });

    let cli = cli.expect("cli's tunnel to tgt's own address");
    assert_eq!(cli.server.to_string(), TGT, "served as the pod dialled, with no SNI");
    assert_eq!(cli.status, StatusCode::OK, "{cli:?}");
    assert!(cli.body.contains("hello from tgt"), "delivered to tgt: {cli:?}");
    let atk = atk.expect("atk's TLS and CONNECT complete");
    assert_eq!(atk.status, StatusCode::UNAUTHORIZED, "the DENY policy applies: {atk:?}");
    let refused = to_node.expect_err("no SNI and the node's own address: no identity to serve");
    assert!(refused.starts_with("TLS"), "refused in the TLS handshake: {refused}");
    let other = to_other_pod.expect("TLS to tgt completes");
    assert_eq!(
        other.status,
        StatusCode::BAD_REQUEST,
        "a connection made to tgt carries no tunnel to ist: {other:?}"
    );

    let log = lab.log("ztunnel-east-node-1");
    assert!(
        log.lines().any(|l| l.contains("connection closed")
            && l.contains(&format!("src_identity={CLI}"))
            && l.contains(r#"claimed_source=("east", "mesh", "cli")"#)),
        "the access log names the workload from k8s.deployment.name:\n{log}"
    );
    assert!(
        log.contains("the client sent no server name and the connection was made to no workload of this node"),
        "the refusal says why:\n{log}"
    );
}

#[test]
fn a_workload_annotated_for_pod_addressed_tunnels_is_dialled_at_its_own_address() {
    let lab = Lab::up("e2epodad", TOPOLOGY);
    let cli = lab.pod_ns("east", "mesh", "cli");
    let sniffer = Sniffer::start(&lab.underlay_ns()).expect("sniffer in the underlay");
    let body = lab.call(&cli, IST_VIP, 0).expect("cli → ist's service");
    let wire = sniffer.stop();
    assert!(body.contains("hello from ist"), "{body}");
    let ist: std::net::Ipv4Addr = IST_POD.parse().unwrap();
    let node1: std::net::Ipv4Addr = NODE1.parse().unwrap();
    assert!(
        wire.iter().any(|s| s.dst == ist && s.dport == 15008),
        "the tunnel was dialled at ist's own address on 15008"
    );
    assert!(
        !wire.iter().any(|s| s.dst == node1 && s.dport == 15008),
        "not at its node's"
    );
    assert!(
        !wire.iter().any(|s| s.dport == 8080 || s.sport == 8080),
        "no plaintext to the pod's port crossed the wire"
    );
}
