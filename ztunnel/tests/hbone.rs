//! The HBONE server and client over real TLS and HTTP/2 on loopback, with a real CA: tunnels
//! work, and hostile peers are refused or timed out without harming other tunnels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::slice::{key_of, Slice};
use trellis_identity::{
    BundleSet, CertManager, CertificateAuthority, IssuancePolicy, ManagerConfig, SpiffeId, TrustBundle, TrustDomain,
};
use trellis_ztunnel::hbone::pool::{Key, OpenError, Pool, Tunnel};
use trellis_ztunnel::hbone::server::{self, LocalCerts};
use trellis_ztunnel::metrics::Metrics;
use trellis_ztunnel::proxy::inbound::Inbound;
use trellis_ztunnel::proxy::Proxy;
use trellis_ztunnel::state::ProxyState;

const CART: &str = "spiffe://east.trellis.local/ns/shop/sa/cart";
const WEB: &str = "spiffe://east.trellis.local/ns/shop/sa/web";
const API: &str = "spiffe://east.trellis.local/ns/shop/sa/api";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

struct Ca {
    _dir: tempfile::TempDir,
    ca: Arc<CertificateAuthority>,
}

fn ca(td: &str) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    let ca =
        CertificateAuthority::load_or_create(dir.path(), &TrustDomain::new(td).unwrap(), IssuancePolicy::default())
            .unwrap();
    Ca {
        _dir: dir,
        ca: Arc::new(ca),
    }
}

async fn certs_for(ca: &Ca, ids: &[&str]) -> CertManager {
    let certs = CertManager::new(ca.ca.clone(), ManagerConfig::default());
    for s in ids {
        certs.ensure(&id(s));
        certs.wait_for(&id(s), Duration::from_secs(5)).await.expect("SVID");
    }
    certs
}

/// cart-1 at 127.0.0.1 on this "node", enrolled; optionally a policy denying `api`.
fn slice(deny_api: bool) -> Slice {
    let mut resources = vec![pb::Resource {
        kind: Some(Variant::Workload(pb::Workload {
            name: "cart-1".into(),
            namespace: "shop".into(),
            service_account: "cart".into(),
            node: "node-1".into(),
            cluster: "east".into(),
            addresses: vec!["127.0.0.1".into()],
            labels: [("app".to_string(), "cart".to_string())].into(),
            enrolled: true,
            identity: CART.into(),
            ..Default::default()
        })),
    }];
    if deny_api {
        resources.push(pb::Resource {
            kind: Some(Variant::AuthorizationPolicy(pb::AuthorizationPolicy {
                name: "no-api".into(),
                namespace: "shop".into(),
                action: pb::Action::Deny as i32,
                selector: [("app".to_string(), "cart".to_string())].into(),
                rules: vec![pb::PolicyRule {
                    principals: vec!["ns/shop/sa/api".into()],
                    ..Default::default()
                }],
            })),
        });
    }
    resources
        .into_iter()
        .map(|r| (key_of(&r).unwrap(), Arc::new(r)))
        .collect()
}

/// An echo server on loopback (the workload).
async fn echo() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    addr
}

struct Node {
    hbone: std::net::SocketAddr,
    workload: std::net::SocketAddr,
    bundles: BundleSet,
    metrics: Arc<Metrics>,
    _ca: Ca,
}

async fn node() -> Node {
    let east = ca("east.trellis.local");
    let certs = certs_for(&east, &[CART]).await;
    let bundles = BundleSet::with(TrustBundle::new(
        east.ca.trust_domain().clone(),
        east.ca.roots().to_vec(),
    ));
    let state = ProxyState::from_slice("node-1", 1, &slice(true));
    let (_tx, rx) = watch::channel(Arc::new(state));
    std::mem::forget(_tx);
    let metrics = Arc::new(Metrics::default());
    let proxy = Proxy::new(
        "node-1".into(),
        "east".into(),
        rx,
        certs.clone(),
        bundles.clone(),
        metrics.clone(),
    );
    let local = LocalCerts::new(certs);
    local.set([id(CART)]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = listener.local_addr().unwrap();
    let config = server::tls_config(local.clone(), bundles.clone());
    tokio::spawn(server::serve(
        listener,
        config,
        local,
        Arc::new(Inbound { proxy: proxy.clone() }),
        proxy.drain.watch(),
    ));
    Node {
        hbone,
        workload: echo().await,
        bundles,
        metrics,
        _ca: east,
    }
}

fn key(node: &Node, source: &str) -> Key {
    Key {
        source: id(source),
        node: node.hbone,
        destination: id(CART),
    }
}

async fn round_trip(tunnel: &mut Tunnel, payload: &'static [u8]) -> Vec<u8> {
    exchange(tunnel, payload, payload.len()).await
}

/// Sends `payload`, then reads until `expected` bytes came back.
async fn exchange(tunnel: &mut Tunnel, payload: &'static [u8], expected: usize) -> Vec<u8> {
    tunnel.send.send_data(Bytes::from_static(payload), false).unwrap();
    let mut got = Vec::new();
    while got.len() < expected {
        let data = tokio::time::timeout(Duration::from_secs(5), tunnel.recv.data())
            .await
            .expect("echo within 5 s")
            .expect("stream open")
            .expect("data");
        let _ = tunnel.recv.flow_control().release_capacity(data.len());
        got.extend_from_slice(&data);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_carry_bytes_and_policy_answers_401() {
    let node = node().await;
    let east_certs = certs_for(&node._ca, &[WEB, API]).await;
    let pool = Pool::new(east_certs, node.bundles.clone());

    let mut tunnel = pool
        .open(&key(&node, WEB), node.workload, &[], &Bytes::new())
        .await
        .expect("web → cart");
    assert_eq!(
        round_trip(&mut tunnel, b"hello through hbone").await,
        b"hello through hbone"
    );

    let denied = pool.open(&key(&node, API), node.workload, &[], &Bytes::new()).await;
    assert!(
        matches!(denied, Err(OpenError::Denied)),
        "api is denied by policy: {:?}",
        denied.err()
    );
    let text = node.metrics.render();
    assert!(
        text.contains("trellis_authorization_decisions_total{decision=\"deny\""),
        "{text}"
    );

    let elsewhere: std::net::SocketAddr = "127.0.0.2:9".parse().unwrap();
    let not_local = pool.open(&key(&node, WEB), elsewhere, &[], &Bytes::new()).await;
    assert!(
        matches!(not_local, Err(OpenError::Status(s)) if s == http::StatusCode::BAD_REQUEST),
        "CONNECT to an address that is not a local workload: {:?}",
        not_local.err()
    );

    let closed_port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let unreachable = pool.open(&key(&node, WEB), closed_port, &[], &Bytes::new()).await;
    assert!(
        matches!(unreachable, Err(OpenError::Unreachable)),
        "{:?}",
        unreachable.err()
    );
    assert_eq!(round_trip(&mut tunnel, b"still here").await, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_sent_with_the_connect_reach_the_workload_once() {
    let node = node().await;
    let pool = Pool::new(certs_for(&node._ca, &[WEB, API]).await, node.bundles.clone());
    let early = Bytes::from_static(b"GET / HTTP/1.1\r\n");
    let mut tunnel = pool
        .open(&key(&node, WEB), node.workload, &[], &early)
        .await
        .expect("web → cart with early bytes");
    // The echo answers the early bytes first, then what follows, each exactly once.
    let expected = b"GET / HTTP/1.1\r\nhost: cart\r\n";
    assert_eq!(exchange(&mut tunnel, b"host: cart\r\n", expected.len()).await, expected);
    assert_eq!(round_trip(&mut tunnel, b"no echo twice").await, b"no echo twice");

    // Refusals with early bytes: a 503 proves nothing was delivered, so it may be retried
    // elsewhere; a 401 is an answer, not a failure.
    let closed_port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let unreachable = pool.open(&key(&node, WEB), closed_port, &[], &early).await;
    assert!(
        matches!(&unreachable, Err(e @ OpenError::Unreachable) if e.retryable()),
        "{:?}",
        unreachable.err()
    );
    let denied = pool.open(&key(&node, API), node.workload, &[], &early).await;
    assert!(
        matches!(&denied, Err(e @ OpenError::Denied) if !e.retryable()),
        "{:?}",
        denied.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_without_harming_other_tunnels() {
    let node = node().await;
    let pool = Pool::new(certs_for(&node._ca, &[WEB]).await, node.bundles.clone());
    let mut tunnel = pool
        .open(&key(&node, WEB), node.workload, &[], &Bytes::new())
        .await
        .expect("web → cart");

    // A client without a certificate: the TLS handshake fails.
    let no_cert = trellis_identity::tls::client_config(
        trellis_identity::verify::SpiffeServerVerifier::new(
            node.bundles.clone(),
            trellis_identity::verify::ExpectedPeer::Any,
        ),
        None,
    )
    .unwrap();
    let tcp = TcpStream::connect(node.hbone).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(trellis_ztunnel::hbone::sni_for(&id(CART))).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(no_cert))
        .connect(name, tcp)
        .await;
    let refused = match tls {
        Err(_) => true,
        Ok(mut tls) => {
            let mut buf = [0u8; 1];
            tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.is_err()
                || matches!(tls.read(&mut buf).await, Ok(0) | Err(_))
        }
    };
    assert!(refused, "a client without a certificate is refused");

    // A workload of an unknown trust domain: refused.
    let evil = ca("evil.example");
    let evil_pool = Pool::new(
        certs_for(&evil, &["spiffe://evil.example/ns/shop/sa/web"]).await,
        node.bundles.clone(),
    );
    let evil_key = Key {
        source: id("spiffe://evil.example/ns/shop/sa/web"),
        ..key(&node, WEB)
    };
    let outsider = evil_pool.open(&evil_key, node.workload, &[], &Bytes::new()).await;
    assert!(
        matches!(outsider, Err(OpenError::Tls(..) | OpenError::Protocol(..))),
        "{:?}",
        outsider.err()
    );

    // A flood: 250 tunnels at once (beyond one connection's 100 streams) all open and work.
    let mut flood = Vec::new();
    for _ in 0..250 {
        let pool = pool.clone();
        let key = key(&node, WEB);
        let addr = node.workload;
        flood.push(tokio::spawn(async move {
            pool.open(&key, addr, &[], &Bytes::new()).await.map(|_| ())
        }));
    }
    for t in flood {
        t.await.unwrap().expect("a flood tunnel");
    }
    // Streams opened and abandoned at once, over and over.
    let web = key(&node, WEB);
    let nothing = Bytes::new();
    for _ in 0..300 {
        let attempt = pool.open(&web, node.workload, &[], &nothing);
        let _ = tokio::time::timeout(Duration::from_micros(200), attempt).await;
    }

    // A TCP client that never sends: closed once the handshake deadline passes.
    let mut silent = TcpStream::connect(node.hbone).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the silent client is dropped: {end:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "after the handshake timeout, not before"
    );

    assert_eq!(round_trip(&mut tunnel, b"unharmed").await, b"unharmed");
}
