//! The tunnel inside a tunnel through an east-west gateway, over real TLS and HTTP/2 on
//! loopback with two real CAs (two trust domains): a workload of east reaches a global service
//! of west through west's gateway; west's node sees east's workload identity (its policy
//! applies to it); the inner connection is pooled; the gateway relays only global services.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{ca, certs_for, echo, id, Ca};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::slice::{key_of, Slice};
use trellis_identity::{BundleSet, CertManager, TrustBundle, TrustDomain};
use trellis_ztunnel::hbone::idle::IdleTimeouts;
use trellis_ztunnel::hbone::pool::{Key, OpenError, Pool, Via};
use trellis_ztunnel::hbone::server::{self, Handler, LocalCerts};
use trellis_ztunnel::hbone::tunnel::Protocol;
use trellis_ztunnel::hbone::PORT;
use trellis_ztunnel::metrics::Metrics;
use trellis_ztunnel::proxy::gateway::Gateway;
use trellis_ztunnel::proxy::inbound::Inbound;
use trellis_ztunnel::proxy::Proxy;
use trellis_ztunnel::state::ProxyState;

const CART: &str = "spiffe://west.trellis.local/ns/shop/sa/cart";
const GATEWAY: &str = "spiffe://west.trellis.local/trellis/node/east-west-gateway";
const WEB: &str = "spiffe://east.trellis.local/ns/shop/sa/web";
const API: &str = "spiffe://east.trellis.local/ns/shop/sa/api";

fn bundle(ca: &Ca) -> TrustBundle {
    TrustBundle::new(ca.ca.trust_domain().clone(), ca.ca.roots().to_vec())
}

/// West's cluster as its node and its gateway see it: cart-1 (at 127.0.0.1, node-1 at `node`)
/// behind the global service cart (port 80 → `target`), the local-only service stock, and a
/// policy denying `ns/shop/sa/api` of any trust domain.
fn west_slice(node: IpAddr, target: u16) -> Slice {
    let cart_1 = pb::Endpoint {
        workload_name: "cart-1".into(),
        workload_namespace: "shop".into(),
        cluster: "west".into(),
        address: trellis_api::addr::to_bytes(std::net::Ipv4Addr::LOCALHOST.into()),
        node: "node-1".into(),
        node_address: trellis_api::addr::to_bytes(node),
        identity: CART.into(),
        enrolled: true,
        healthy: true,
        ..Default::default()
    };
    let service = |name: &str, global: bool| pb::Resource {
        kind: Some(Variant::Service(pb::Service {
            name: name.into(),
            namespace: "shop".into(),
            hostname: format!("{name}.shop.svc.cluster.local"),
            ports: vec![pb::ServicePort {
                port: 80,
                target_port: u32::from(target),
                ..Default::default()
            }],
            endpoints: vec![cart_1.clone()],
            global,
            ..Default::default()
        })),
    };
    let resources = [
        pb::Resource {
            kind: Some(Variant::Workload(pb::Workload {
                name: "cart-1".into(),
                namespace: "shop".into(),
                service_account: "cart".into(),
                node: "node-1".into(),
                cluster: "west".into(),
                addresses: vec![trellis_api::addr::to_bytes(std::net::Ipv4Addr::LOCALHOST.into())],
                labels: [("app".to_string(), "cart".to_string())].into(),
                enrolled: true,
                identity: CART.into(),
                ..Default::default()
            })),
        },
        service("cart", true),
        service("stock", false),
        pb::Resource {
            kind: Some(Variant::AuthorizationPolicy(pb::AuthorizationPolicy {
                name: "no-api".into(),
                namespace: "shop".into(),
                action: pb::Action::Deny as i32,
                rules: vec![pb::PolicyRule {
                    principals: vec!["ns/shop/sa/api".into()],
                    ..Default::default()
                }],
                ..Default::default()
            })),
        },
    ];
    resources
        .into_iter()
        .map(|r| (key_of(&r).unwrap(), Arc::new(r)))
        .collect()
}

/// Serves HBONE on `listener` with `handler`'s answers, presenting `served`.
fn serve<H: Handler>(listener: TcpListener, proxy: &Arc<Proxy>, certs: CertManager, served: &str, handler: H) {
    let local = LocalCerts::new(certs);
    local.set([id(served)]);
    let config = server::tls_config(local.clone(), proxy.bundles.clone());
    tokio::spawn(server::serve(
        listener,
        config,
        local,
        Arc::new(handler),
        proxy.drain.watch(),
        proxy.bundles.clone(),
    ));
}

fn proxy(node: &str, state: ProxyState, certs: CertManager, bundles: BundleSet) -> Arc<Proxy> {
    let (tx, rx) = watch::channel(Arc::new(state));
    std::mem::forget(tx);
    Proxy::new(
        node.into(),
        "west".into(),
        rx,
        certs,
        bundles,
        Arc::new(Metrics::default()),
        IdleTimeouts::default(),
        trellis_ztunnel::proxy::DEFAULT_CONNECT_TIMEOUT,
    )
}

/// West's node and gateway, and east's pool, each with its own view of the federation.
struct Fixture {
    pool: Arc<Pool>,
    /// What east's pool trusts.
    east_trusts: BundleSet,
    /// What west's node trusts.
    west_trusts: BundleSet,
    gw: SocketAddr,
    _cas: (Ca, Ca),
}

async fn fixture() -> Fixture {
    let (east, west) = (ca("east.trellis.local"), ca("west.trellis.local"));
    let federated = || {
        let set = BundleSet::with(bundle(&east));
        set.upsert(bundle(&west));
        set
    };
    let workload = echo().await;
    // west's node: its HBONE on port 15008 of a loopback address of its own.
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let third = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let node_ip: IpAddr = [127, 41, third, (std::process::id() % 250) as u8 + 1].into();
    let node_listener = TcpListener::bind(SocketAddr::new(node_ip, PORT)).await.unwrap();
    let slice = west_slice(node_ip, workload.port());
    let node_certs = certs_for(&west, &[CART]).await;
    let west_trusts = federated();
    let node = proxy(
        "node-1",
        ProxyState::from_slice("node-1", 1, &slice),
        node_certs.clone(),
        west_trusts.clone(),
    );
    serve(node_listener, &node, node_certs, CART, Inbound { proxy: node.clone() });
    // west's gateway, with the same view of its cluster.
    let gw_certs = certs_for(&west, &[GATEWAY]).await;
    let gateway = proxy(
        "east-west-gateway",
        ProxyState::from_slice("east-west-gateway", 1, &slice),
        gw_certs.clone(),
        federated(),
    );
    let gw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = gw_listener.local_addr().unwrap();
    serve(
        gw_listener,
        &gateway,
        gw_certs,
        GATEWAY,
        Gateway { proxy: gateway.clone() },
    );
    // east's ztunnel.
    let east_trusts = federated();
    let pool = Pool::new(certs_for(&east, &[WEB, API]).await, east_trusts.clone());
    Fixture {
        pool,
        east_trusts,
        west_trusts,
        gw,
        _cas: (east, west),
    }
}

fn through(gw: SocketAddr, source: &str, service: &str) -> Key {
    Key {
        source: id(source),
        node: gw,
        destination: id(CART),
        protocol: Protocol::Http2,
        via: Some(Via {
            gateway: id(GATEWAY),
            authority: format!("{service}.shop.svc.cluster.local:80"),
            lane: 0,
        }),
    }
}

const AUTHORITY: &str = "cart.shop.svc.cluster.local:80";

/// Opens a tunnel to cart through the gateway and checks it echoes.
async fn open_echoing(f: &Fixture) -> trellis_ztunnel::hbone::pool::Tunnel {
    let mut t = f
        .pool
        .open(&through(f.gw, WEB, "cart"), AUTHORITY, &[], &Bytes::new())
        .await
        .expect("tunnel");
    t.send_all(Bytes::from_static(b"ping")).await.unwrap();
    assert_eq!(&t.next_chunk().await.unwrap().unwrap()[..], b"ping");
    t
}

/// Waits until `tunnel` ends (closed or reset), up to 10 s.
async fn ends(tunnel: &mut trellis_ztunnel::hbone::pool::Tunnel) -> bool {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tunnel.next_chunk().await {
                Some(Ok(_)) => continue,
                _ => return,
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn trust_withdrawn_or_replaced_closes_open_tunnels_on_both_sides() {
    // east's side: west's roots replaced by others that did not sign west's SVIDs.
    let f = fixture().await;
    let mut open = open_echoing(&f).await;
    f.east_trusts.upsert(bundle(&ca("west.trellis.local")));
    assert!(
        ends(&mut open).await,
        "east stops trusting west's node and gateway at once"
    );
    // west's side: east's trust domain leaves the federation.
    let f = fixture().await;
    let mut open = open_echoing(&f).await;
    f.west_trusts.remove(&TrustDomain::new("east.trellis.local").unwrap());
    assert!(
        ends(&mut open).await,
        "west's node closes east's inner connection at once"
    );
    // A bundle change that keeps the signer (the same roots again) closes nothing.
    let f = fixture().await;
    let mut open = open_echoing(&f).await;
    let same = f
        .west_trusts
        .get(&TrustDomain::new("east.trellis.local").unwrap())
        .unwrap();
    f.west_trusts.upsert(same);
    open.send_all(Bytes::from_static(b"still")).await.unwrap();
    assert_eq!(&open.next_chunk().await.unwrap().unwrap()[..], b"still");
}

#[tokio::test]
async fn east_reaches_a_global_service_of_west_through_its_gateway() {
    let f = fixture().await;
    let (pool, gw) = (&f.pool, f.gw);
    let through = |source: &str, service: &str| through(gw, source, service);
    let key = through(WEB, "cart");
    let authority = AUTHORITY;
    let mut first = pool
        .open(&key, authority, &[], &Bytes::from_static(b"early "))
        .await
        .expect("tunnel");
    first.send_all(Bytes::from_static(b"hello west")).await.unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < b"early hello west".len() {
        let chunk = first.next_chunk().await.expect("more bytes").unwrap();
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(
        echoed, b"early hello west",
        "the workload's answer, through both tunnels"
    );

    // A second connection rides the same inner connection: no new handshake.
    let mut second = pool
        .open(&key, authority, &[], &Bytes::new())
        .await
        .expect("second tunnel");
    second.send_all(Bytes::from_static(b"again")).await.unwrap();
    assert_eq!(&second.next_chunk().await.unwrap().unwrap()[..], b"again");
    let inner: Vec<_> = pool
        .snapshot()
        .into_iter()
        .filter(|(k, _, _)| k.via.is_some())
        .collect();
    assert_eq!(inner.len(), 1, "{inner:?}");
    assert_eq!(
        (inner[0].1, inner[0].2),
        (1, 2),
        "one inner connection carrying both tunnels"
    );

    // west's node sees east's workload identity: its DENY of ns/shop/sa/api applies.
    let denied = pool.open(&through(API, "cart"), authority, &[], &Bytes::new()).await;
    assert!(matches!(denied, Err(OpenError::Denied)), "{:?}", denied.err());

    // A service west does not export is not reachable through its gateway.
    let hidden = pool
        .open(
            &through(WEB, "stock"),
            "stock.shop.svc.cluster.local:80",
            &[],
            &Bytes::new(),
        )
        .await;
    assert!(
        matches!(hidden, Err(OpenError::Status(s)) if s == http::StatusCode::NOT_FOUND),
        "{:?}",
        hidden.err()
    );

    // The inner handshake checks the destination workload's identity, not the gateway's: an
    // identity no node behind the gateway serves fails there, not at the gateway.
    let wrong = Key {
        destination: id("spiffe://west.trellis.local/ns/shop/sa/other"),
        ..through(WEB, "cart")
    };
    let refused = pool.open(&wrong, authority, &[], &Bytes::new()).await;
    assert!(refused.is_err(), "a workload identity nobody serves");

    // Plain bytes to the gateway are not relayed: it speaks only TLS.
    let mut raw = tokio::net::TcpStream::connect(gw).await.unwrap();
    raw.write_all(b"CONNECT cart.shop.svc.cluster.local:80 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(15), raw.read(&mut buf))
        .await
        .expect("the gateway answers or closes")
        .unwrap_or(0);
    assert!(!buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
}
