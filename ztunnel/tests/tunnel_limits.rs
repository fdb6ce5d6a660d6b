//! A node's HBONE port under a flood of silent CONNECTs from one workload identity (issue 12):
//! the flood gets at most its identity's share of tunnels (503 beyond), and another identity's
//! tunnels keep opening and carrying bytes as fast as without the flood.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{echo, id};
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::slice::{key_of, Slice};
use trellis_e2e::flood::{p99, within_twice};
use trellis_identity::{
    BundleSet, CertManager, CertificateAuthority, IssuancePolicy, ManagerConfig, TrustBundle, TrustDomain,
};
use trellis_ztunnel::hbone::idle::IdleTimeouts;
use trellis_ztunnel::hbone::pool::{Key, OpenError, Pool, Tunnel};
use trellis_ztunnel::hbone::server::{self, LocalCerts};
use trellis_ztunnel::hbone::tunnel::Protocol;
use trellis_ztunnel::limits::{Limited, TunnelLimits};
use trellis_ztunnel::metrics::Metrics;
use trellis_ztunnel::proxy::inbound::Inbound;
use trellis_ztunnel::proxy::Proxy;
use trellis_ztunnel::state::ProxyState;

const CART: &str = "spiffe://east.trellis.local/ns/shop/sa/cart";
const WEB: &str = "spiffe://east.trellis.local/ns/shop/sa/web";
const FLOOD: &str = "spiffe://east.trellis.local/ns/shop/sa/flood";
/// Silent CONNECTs the flood attempts (5 pooled connections of 100 streams).
const FLOOD_TUNNELS: usize = 500;
const LIMITS: TunnelLimits = TunnelLimits {
    per_node: 2000,
    per_identity: 300,
};
/// Tunnels web opens (and uses) with and without the flood.
const ROUNDS: usize = 300;

/// cart-1 at 127.0.0.1 on this "node", enrolled, no policy.
fn slice() -> Slice {
    let resources = [pb::Resource {
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
    }];
    resources
        .into_iter()
        .map(|r| (key_of(&r).unwrap(), Arc::new(r)))
        .collect()
}

async fn certs_for(ca: &Arc<CertificateAuthority>, ids: &[&str]) -> CertManager {
    let certs = CertManager::new(ca.clone(), ManagerConfig::default());
    for s in ids {
        certs.ensure(&id(s));
        certs.wait_for(&id(s), Duration::from_secs(5)).await.expect("SVID");
    }
    certs
}

async fn round_trip(tunnel: &mut Tunnel) {
    tunnel.send_all(Bytes::from_static(b"ping")).await.expect("send");
    let mut got = 0;
    while got < 4 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), tunnel.next_chunk())
            .await
            .expect("echo within 5 s")
            .expect("stream open")
            .expect("data");
        got += chunk.len();
    }
}

/// A node serving cart-1 (an echo server on loopback) on an HBONE port of its own, with
/// `limits` and `idle`; the CA that issues every identity of the test.
struct Node {
    ca: Arc<CertificateAuthority>,
    bundles: BundleSet,
    limited: Arc<Limited<Inbound>>,
    hbone: SocketAddr,
    workload: SocketAddr,
    _state: watch::Sender<Arc<ProxyState>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(limits: TunnelLimits, idle: IdleTimeouts) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(
            CertificateAuthority::load_or_create(
                dir.path(),
                &TrustDomain::new("east.trellis.local").unwrap(),
                IssuancePolicy::default(),
            )
            .unwrap(),
        );
        let bundles = BundleSet::with(TrustBundle::new(ca.trust_domain().clone(), ca.roots().to_vec()));
        let certs = certs_for(&ca, &[CART]).await;
        let (state_tx, state) = watch::channel(Arc::new(ProxyState::from_slice("node-1", 1, &slice())));
        let proxy = Proxy::new(
            "node-1".into(),
            "east".into(),
            state,
            certs.clone(),
            bundles.clone(),
            Arc::new(Metrics::default()),
            idle,
            trellis_ztunnel::proxy::DEFAULT_CONNECT_TIMEOUT,
        );
        let local = LocalCerts::new(certs);
        local.set([id(CART)]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hbone = listener.local_addr().unwrap();
        let limited = Arc::new(Limited::new(Arc::new(Inbound { proxy: proxy.clone() }), limits));
        tokio::spawn(server::serve(
            listener,
            server::tls_config(local.clone(), bundles.clone()),
            local,
            limited.clone(),
            proxy.drain.watch(),
            proxy.bundles.clone(),
        ));
        Node {
            ca,
            bundles,
            limited,
            hbone,
            workload: echo().await,
            _state: state_tx,
            _dir: dir,
        }
    }

    fn key(&self, source: &str) -> Key {
        Key {
            source: id(source),
            node: self.hbone,
            destination: id(CART),
            protocol: Protocol::Http2,
            via: None,
        }
    }

    /// A pool holding `source`'s SVID.
    async fn client(&self, source: &str) -> Arc<Pool> {
        Pool::new(certs_for(&self.ca, &[source]).await, self.bundles.clone())
    }

    /// Waits until the node holds no tunnel.
    async fn wait_no_tunnels(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.limited.open() > 0 {
            assert!(Instant::now() < deadline, "{} tunnels still open", self.limited.open());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_tunnels_from_one_identity_gets_503_and_spares_the_others() {
    let node = Node::start(LIMITS, IdleTimeouts::default()).await;
    let (workload, key) = (node.workload, |source: &str| node.key(source));

    let web = node.client(WEB).await;
    let rounds = |first: usize| {
        let (web, key) = (web.clone(), key(WEB));
        async move {
            let mut took = Vec::new();
            for n in first..first + ROUNDS {
                let started = Instant::now();
                let mut tunnel = web
                    .open(&key, workload, &[], &Bytes::new())
                    .await
                    .unwrap_or_else(|e| panic!("web → cart tunnel {n}: {e:?}"));
                round_trip(&mut tunnel).await;
                took.push(started.elapsed());
            }
            took
        }
    };
    rounds(0).await; // warm up: the pooled connection is open
    let undisturbed = p99(rounds(0).await);

    // The flood: CONNECTs from one identity that never send a byte, all held open.
    let flood = node.client(FLOOD).await;
    let opens: Vec<_> = (0..FLOOD_TUNNELS)
        .map(|_| {
            let (flood, key) = (flood.clone(), key(FLOOD));
            tokio::spawn(async move { flood.open(&key, workload, &[], &Bytes::new()).await })
        })
        .collect();
    let flooded = tokio::spawn(rounds(10_000));
    let mut held = Vec::new();
    let mut refused = 0;
    for open in opens {
        match open.await.unwrap() {
            Ok(tunnel) => held.push(tunnel),
            Err(OpenError::Unreachable) => refused += 1,
            Err(e) => panic!("flood tunnel: unexpected {e:?}"),
        }
    }
    let flooded = p99(flooded.await.unwrap());
    eprintln!(
        "flood: {} tunnels held, {refused} refused with 503; web p99 {undisturbed:?} undisturbed, {flooded:?} under the flood",
        held.len()
    );
    assert_eq!(
        held.len(),
        LIMITS.per_identity,
        "the flood gets exactly its identity's share"
    );
    assert_eq!(
        refused,
        FLOOD_TUNNELS - LIMITS.per_identity,
        "every CONNECT beyond it gets 503"
    );
    assert!(
        within_twice(flooded, undisturbed),
        "web's p99 under the flood {flooded:?} is more than twice the undisturbed {undisturbed:?} plus 50 ms"
    );

    // The flood's tunnels end; its identity gets tunnels again.
    drop(held);
    node.wait_no_tunnels(Duration::from_secs(10)).await;
    let mut again = flood
        .open(&key(FLOOD), workload, &[], &Bytes::new())
        .await
        .expect("flood identity after the flood");
    round_trip(&mut again).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tunnels_are_closed_after_the_unused_timeout_and_used_ones_stay() {
    let unused = Duration::from_secs(2);
    let limits = TunnelLimits {
        per_node: 2000,
        per_identity: 50,
    };
    let node = Node::start(
        limits,
        IdleTimeouts {
            unused,
            idle: Some(Duration::from_secs(3600)),
        },
    )
    .await;
    let web = node.client(WEB).await;
    let mut used = web
        .open(&node.key(WEB), node.workload, &[], &Bytes::new())
        .await
        .expect("web → cart");
    round_trip(&mut used).await;

    // The flood takes its identity's whole share with tunnels that never carry a byte...
    let flood = node.client(FLOOD).await;
    let mut held = Vec::new();
    for n in 0..limits.per_identity {
        let tunnel = flood.open(&node.key(FLOOD), node.workload, &[], &Bytes::new()).await;
        held.push(tunnel.unwrap_or_else(|e| panic!("flood tunnel {n}: {e:?}")));
    }
    assert!(
        matches!(
            flood.open(&node.key(FLOOD), node.workload, &[], &Bytes::new()).await,
            Err(OpenError::Unreachable)
        ),
        "the share is full: 503"
    );
    let opened = Instant::now();
    // ...and loses them once they have been silent for the unused timeout, while it still holds
    // every one of them: the node closed them, not the client.
    let deadline = opened + unused * 5;
    while node.limited.open() > 1 {
        assert!(
            Instant::now() < deadline,
            "{} silent tunnels still open {:?} after the last opened",
            node.limited.open() - 1,
            opened.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(opened.elapsed() >= unused / 2, "closed before the timeout fell due");
    for tunnel in &mut held {
        let end = tokio::time::timeout(Duration::from_secs(5), tunnel.next_chunk())
            .await
            .expect("the closed tunnel ends");
        assert!(!matches!(end, Some(Ok(_))), "a closed tunnel carries no data: {end:?}");
    }
    // The identity's share is free again, and the tunnel that carried bytes is still open.
    let mut again = flood
        .open(&node.key(FLOOD), node.workload, &[], &Bytes::new())
        .await
        .expect("flood identity after its silent tunnels closed");
    round_trip(&mut again).await;
    round_trip(&mut used).await;
}
