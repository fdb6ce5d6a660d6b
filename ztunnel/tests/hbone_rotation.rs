//! HBONE across certificate rotation, with SVIDs of a few seconds from a real CA over real TLS
//! and HTTP/2 on loopback: a tunnel keeps carrying bytes after the client certificate that
//! opened its connection has expired, while new tunnels go to a connection dialled with the
//! renewed SVID, and an expired certificate opens no new tunnel.
//!
//! Connections are counted by a relay in front of the node's HBONE port: each connection it
//! accepts is one TLS and HTTP/2 handshake of the client.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{echo, id};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::slice::{key_of, Slice};
use trellis_identity::verify::{ExpectedPeer, SpiffeServerVerifier};
use trellis_identity::{
    BundleSet, CertManager, CertificateAuthority, HeldSvid, IssuancePolicy, ManagerConfig, TrustBundle, TrustDomain,
};
use trellis_ztunnel::hbone::idle::IdleTimeouts;
use trellis_ztunnel::hbone::pool::{Key, Pool, Tunnel};
use trellis_ztunnel::hbone::server::{self, LocalCerts};
use trellis_ztunnel::hbone::sni_for;
use trellis_ztunnel::hbone::tunnel::Protocol;
use trellis_ztunnel::metrics::Metrics;
use trellis_ztunnel::proxy::inbound::Inbound;
use trellis_ztunnel::proxy::Proxy;
use trellis_ztunnel::state::ProxyState;

const CART: &str = "spiffe://east.trellis.local/ns/shop/sa/cart";
const WEB: &str = "spiffe://east.trellis.local/ns/shop/sa/web";
/// The client SVIDs' lifetime: renewed at about half of it.
const SHORT_TTL: Duration = Duration::from_secs(4);

/// A node serving cart-1 (the echo server below) on an HBONE port, with a CA that issues SVIDs
/// down to one second.
struct Node {
    hbone: SocketAddr,
    workload: SocketAddr,
    bundles: BundleSet,
    ca: Arc<CertificateAuthority>,
    _dir: tempfile::TempDir,
}

async fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let policy = IssuancePolicy {
        min_ttl: Duration::from_secs(1),
        ..IssuancePolicy::default()
    };
    let td = TrustDomain::new("east.trellis.local").unwrap();
    let ca = Arc::new(CertificateAuthority::load_or_create(dir.path(), &td, policy).unwrap());
    let bundles = BundleSet::with(TrustBundle::new(ca.trust_domain().clone(), ca.roots().to_vec()));
    let certs = CertManager::new(ca.clone(), ManagerConfig::default());
    certs.ensure(&id(CART));
    certs
        .wait_for(&id(CART), Duration::from_secs(5))
        .await
        .expect("cart SVID");

    let workload = pb::Resource {
        kind: Some(Variant::Workload(pb::Workload {
            name: "cart-1".into(),
            namespace: "shop".into(),
            service_account: "cart".into(),
            node: "node-1".into(),
            cluster: "east".into(),
            addresses: vec![trellis_api::addr::to_bytes(std::net::Ipv4Addr::LOCALHOST.into())],
            enrolled: true,
            identity: CART.into(),
            ..Default::default()
        })),
    };
    let slice: Slice = [(key_of(&workload).unwrap(), Arc::new(workload))].into_iter().collect();
    let (state, rx) = watch::channel(Arc::new(ProxyState::from_slice("node-1", 1, &slice)));
    std::mem::forget(state);
    let proxy = Proxy::new(
        "node-1".into(),
        "east".into(),
        rx,
        certs.clone(),
        bundles.clone(),
        Arc::new(Metrics::default()),
        IdleTimeouts::default(),
        trellis_ztunnel::proxy::DEFAULT_CONNECT_TIMEOUT,
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
        proxy.bundles.clone(),
    ));
    Node {
        hbone,
        workload: echo().await,
        bundles,
        ca,
        _dir: dir,
    }
}

/// A TCP relay to `node`, counting the connections dialled through it.
async fn front(node: SocketAddr) -> (SocketAddr, watch::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (count, dialled) = watch::channel(0usize);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            count.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(node).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (addr, dialled)
}

async fn round_trip(tunnel: &mut Tunnel, payload: &'static [u8]) -> Vec<u8> {
    tunnel
        .send_all(Bytes::from_static(payload))
        .await
        .expect("sending into the tunnel");
    let mut got = Vec::new();
    while got.len() < payload.len() {
        let data = tokio::time::timeout(Duration::from_secs(5), tunnel.next_chunk())
            .await
            .expect("echo within 5 s")
            .expect("the tunnel is still open")
            .expect("data");
        got.extend_from_slice(&data);
    }
    got
}

/// Whether the wall clock is still before `t`; waits 200 ms first unless this is the first
/// call, and fails the test if `t` is not reached within 30 s of `started`.
async fn before(t: SystemTime, started: Instant, first: bool) -> bool {
    if !first {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the clock never reached {t:?}"
    );
    SystemTime::now() < t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_tunnel_outlives_its_client_svid_and_new_tunnels_use_the_renewed_one() {
    let node = node().await;
    let (relay, dialled) = front(node.hbone).await;
    let web = id(WEB);
    let client = CertManager::new(
        node.ca.clone(),
        ManagerConfig {
            ttl: SHORT_TTL,
            ..ManagerConfig::default()
        },
    );
    client.ensure(&web);
    let first = client.wait_for(&web, Duration::from_secs(5)).await.expect("web SVID");
    let pool = Pool::new(client.clone(), node.bundles.clone());
    let key = Key {
        source: web.clone(),
        node: relay,
        destination: id(CART),
        protocol: Protocol::Http2,
        via: None,
    };

    let mut long_lived = pool
        .open(&key, node.workload, &[], &Bytes::new())
        .await
        .expect("web → cart");
    assert_eq!(round_trip(&mut long_lived, b"opened").await, b"opened");
    assert_eq!(*dialled.borrow(), 1);

    // Bytes keep flowing through the renewal and past the expiry of the SVID the connection
    // was opened with (the server used to close the whole connection there).
    let expiry = first.svid.not_after;
    let (started, mut ticks) = (Instant::now(), 0);
    while before(expiry + Duration::from_secs(1), started, ticks == 0).await {
        assert_eq!(round_trip(&mut long_lived, b"tick").await, b"tick");
        ticks += 1;
    }
    assert!(ticks >= 10, "bytes crossed the whole lifetime: {ticks} round trips");
    let renewed = client.current(&web).expect("a renewed SVID");
    assert!(renewed.svid.not_after > expiry, "the SVID was renewed meanwhile");

    // A new tunnel lands on a new connection, dialled with the renewed SVID.
    let mut fresh = pool
        .open(&key, node.workload, &[], &Bytes::new())
        .await
        .expect("a new tunnel after the expiry");
    assert_eq!(round_trip(&mut fresh, b"fresh").await, b"fresh");
    assert_eq!(*dialled.borrow(), 2, "one more handshake, with the renewed SVID");
    assert_eq!(round_trip(&mut long_lived, b"still here").await, b"still here");
    assert_eq!(
        pool.snapshot(),
        vec![(key.clone(), 2, 2)],
        "the old connection still carries its tunnel"
    );

    // Every further tunnel shares the new connection.
    let mut third = pool
        .open(&key, node.workload, &[], &Bytes::new())
        .await
        .expect("another tunnel");
    assert_eq!(round_trip(&mut third, b"third").await, b"third");
    assert_eq!(*dialled.borrow(), 2);
}

/// Presents one fixed certificate, as a client whose SVID is never renewed would.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Sends `payload` on a raw HTTP/2 tunnel and reads the echo.
async fn raw_round_trip(send: &mut h2::SendStream<Bytes>, recv: &mut h2::RecvStream, payload: &'static [u8]) {
    send.send_data(Bytes::from_static(payload), false)
        .expect("the stream still takes data");
    let mut got = Vec::new();
    while got.len() < payload.len() {
        let data = tokio::time::timeout(Duration::from_secs(5), recv.data())
            .await
            .expect("echo within 5 s")
            .expect("the tunnel is still open")
            .expect("data");
        let _ = recv.flow_control().release_capacity(data.len());
        got.extend_from_slice(&data);
    }
    assert_eq!(got, payload);
}

fn connect_request(to: SocketAddr) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(to.to_string())
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_opens_no_tunnel_while_its_open_ones_run_to_the_end() {
    let node = node().await;
    // An SVID that is never renewed, presented by a plain HTTP/2 client.
    let svid = node.ca.issue_svid(&id(WEB), Duration::from_secs(3)).unwrap();
    let expiry = svid.not_after;
    let held = HeldSvid::new(svid, node.ca.roots().to_vec()).unwrap();
    let verifier = SpiffeServerVerifier::new(node.bundles.clone(), ExpectedPeer::Exact(id(CART)));
    let tls = trellis_identity::tls::client_config(verifier, Some(Arc::new(Fixed(held.certified_key())))).unwrap();
    let tcp = TcpStream::connect(node.hbone).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni_for(&id(CART))).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS with a valid SVID");
    let (requests, connection) = h2::client::handshake(tls).await.expect("HTTP/2");
    let connection = tokio::spawn(connection);

    let (response, mut send) = requests
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(connect_request(node.workload), false)
        .unwrap();
    let response = response.await.expect("an answer");
    assert_eq!(response.status(), http::StatusCode::OK);
    let mut recv = response.into_body();
    raw_round_trip(&mut send, &mut recv, b"opened").await;

    let (started, mut ticks) = (Instant::now(), 0);
    while before(expiry + Duration::from_secs(1), started, ticks == 0).await {
        raw_round_trip(&mut send, &mut recv, b"tick").await;
        ticks += 1;
    }

    // No new tunnel under the lapsed identity: GOAWAY stops it before it leaves, or the server
    // refuses it unprocessed.
    let refused = match requests.clone().ready().await {
        Err(e) => e.is_go_away(),
        Ok(mut ready) => match ready.send_request(connect_request(node.workload), false) {
            Err(e) => e.is_go_away(),
            Ok((response, _)) => match response.await {
                Err(e) => e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away(),
                Ok(response) => panic!("a tunnel was answered {} after the expiry", response.status()),
            },
        },
    };
    assert!(refused, "the new stream is refused by GOAWAY or REFUSED_STREAM");

    // The open tunnel runs on, and the connection closes once it has ended.
    raw_round_trip(&mut send, &mut recv, b"still here").await;
    send.send_data(Bytes::new(), true).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match recv.data().await {
                Some(Ok(data)) if data.is_empty() => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(
        matches!(end, Ok(None)),
        "the workload's end reaches the client: {end:?}"
    );
    drop((send, recv));
    // `requests` is kept, so that it is the server that ends the connection.
    let closed = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the server closes the connection after its last tunnel: {closed:?}"
    );
    drop(requests);
}
