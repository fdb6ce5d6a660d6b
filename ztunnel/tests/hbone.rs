//! The HBONE server and client over real TLS and HTTP/2 on loopback, with a real CA: tunnels
//! work, hostile peers are refused or timed out without harming other tunnels, and the pool
//! dials exactly as many connections as its tunnels need, sharing each dial.
//!
//! Connections are counted by a [`Front`], a TCP relay in front of the node's HBONE port: each
//! connection it accepts is one TLS and HTTP/2 handshake of the pool.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ca, certs_for, echo, id, Ca};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::slice::{key_of, Slice};
use trellis_identity::{BundleSet, TrustBundle, TrustDomain};
use trellis_ztunnel::hbone::idle::IdleTimeouts;
use trellis_ztunnel::hbone::pool::{Key, OpenError, Pool, Tunnel};
use trellis_ztunnel::hbone::server::{self, LocalCerts};
use trellis_ztunnel::hbone::tunnel::Protocol;
use trellis_ztunnel::metrics::Metrics;
use trellis_ztunnel::proxy::inbound::Inbound;
use trellis_ztunnel::proxy::Proxy;
use trellis_ztunnel::state::ProxyState;

const CART: &str = "spiffe://east.trellis.local/ns/shop/sa/cart";
const WEB: &str = "spiffe://east.trellis.local/ns/shop/sa/web";
const API: &str = "spiffe://east.trellis.local/ns/shop/sa/api";

/// cart-1 at 127.0.0.1 on this "node", enrolled; optionally a policy denying `api`.
fn slice(deny_api: bool) -> Slice {
    let mut resources = vec![pb::Resource {
        kind: Some(Variant::Workload(pb::Workload {
            name: "cart-1".into(),
            namespace: "shop".into(),
            service_account: "cart".into(),
            node: "node-1".into(),
            cluster: "east".into(),
            addresses: vec![trellis_api::addr::to_bytes(std::net::Ipv4Addr::LOCALHOST.into())],
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
        metrics,
        _ca: east,
    }
}

fn key(node: &Node, source: &str) -> Key {
    Key {
        source: id(source),
        node: node.hbone,
        destination: id(CART),
        protocol: Protocol::Http2,
        via: None,
    }
}

async fn round_trip(tunnel: &mut Tunnel, payload: &'static [u8]) -> Vec<u8> {
    exchange(tunnel, payload, payload.len()).await
}

/// Sends `payload`, then reads until `expected` bytes came back.
async fn exchange(tunnel: &mut Tunnel, payload: &'static [u8], expected: usize) -> Vec<u8> {
    tunnel
        .send_all(Bytes::from_static(payload))
        .await
        .expect("sending into the tunnel");
    let mut got = Vec::new();
    while got.len() < expected {
        let data = tokio::time::timeout(Duration::from_secs(5), tunnel.next_chunk())
            .await
            .expect("echo within 5 s")
            .expect("stream open")
            .expect("data");
        got.extend_from_slice(&data);
    }
    got
}

/// What a [`Front`] does with a connection it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Relay it to the node.
    Forward,
    /// Keep it waiting (the dial stays in flight) until the gate changes.
    Hold,
    /// Close it at once: the client's TLS handshake fails.
    Refuse,
}

/// A TCP relay in front of a node's HBONE port, counting the connections dialled through it.
struct Front {
    addr: SocketAddr,
    dialled: watch::Receiver<usize>,
    gate: watch::Sender<Gate>,
}

impl Front {
    async fn start(node: SocketAddr, gate: Gate) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (count, dialled) = watch::channel(0usize);
        let (gate, gate_rx) = watch::channel(gate);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.send_modify(|n| *n += 1);
                let mut gate = gate_rx.clone();
                tokio::spawn(async move {
                    let Ok(now) = gate.wait_for(|g| *g != Gate::Hold).await.map(|g| *g) else {
                        return;
                    };
                    if now == Gate::Refuse {
                        return;
                    }
                    if let Ok(mut server) = TcpStream::connect(node).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Front { addr, dialled, gate }
    }

    /// Connections dialled through the front so far.
    fn dialled(&self) -> usize {
        *self.dialled.borrow()
    }

    fn set(&self, gate: Gate) {
        self.gate.send_replace(gate);
    }
}

/// Waits until `condition` holds; fails the test naming `what` after 10 s.
async fn until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Opens a tunnel in a task of its own.
fn spawn_open(pool: &Arc<Pool>, key: &Key, to: SocketAddr) -> tokio::task::JoinHandle<Result<Tunnel, OpenError>> {
    let (pool, key) = (pool.clone(), key.clone());
    tokio::spawn(async move { pool.open(&key, to, &[], &Bytes::new()).await })
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

    // Streams opened and abandoned at once, over and over: none keeps a stream slot.
    let web = key(&node, WEB);
    let nothing = Bytes::new();
    for _ in 0..300 {
        let attempt = pool.open(&web, node.workload, &[], &nothing);
        let _ = tokio::time::timeout(Duration::from_micros(200), attempt).await;
    }
    let tunnels: usize = pool.snapshot().iter().map(|(_, _, tunnels)| tunnels).sum();
    assert_eq!(tunnels, 1, "only the tunnel still held counts: {:?}", pool.snapshot());

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
        started.elapsed() >= server::SERVER_HANDSHAKE_TIMEOUT - Duration::from_secs(1),
        "after the handshake timeout, not before"
    );

    assert_eq!(round_trip(&mut tunnel, b"unharmed").await, b"unharmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_one_connections_streams_opens_exactly_enough_connections() {
    let node = node().await;
    let front = Front::start(node.hbone, Gate::Forward).await;
    let pool = Pool::new(certs_for(&node._ca, &[WEB]).await, node.bundles.clone());
    let key = Key {
        node: front.addr,
        ..key(&node, WEB)
    };
    let opens: Vec<_> = (0..250).map(|_| spawn_open(&pool, &key, node.workload)).collect();
    let mut tunnels = Vec::new();
    for open in opens {
        let mut tunnel = open.await.unwrap().expect("a flood tunnel");
        assert_eq!(round_trip(&mut tunnel, b"flood").await, b"flood");
        tunnels.push(tunnel);
    }
    assert_eq!(
        front.dialled(),
        3,
        "250 tunnels held open at {} streams per connection",
        trellis_ztunnel::hbone::MAX_STREAMS
    );
    assert_eq!(pool.snapshot(), vec![(key, 3, 250)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_to_a_cold_key_share_one_handshake() {
    let node = node().await;
    let front = Front::start(node.hbone, Gate::Hold).await;
    let pool = Pool::new(certs_for(&node._ca, &[WEB]).await, node.bundles.clone());
    let key = Key {
        node: front.addr,
        ..key(&node, WEB)
    };
    let opens: Vec<_> = (0..20).map(|_| spawn_open(&pool, &key, node.workload)).collect();
    until("all 20 opens wait on a dial", || pool.waiting(&key) == 20).await;
    front.set(Gate::Forward);

    let mut tunnels = Vec::new();
    for open in opens {
        let mut tunnel = open.await.unwrap().expect("a tunnel over the shared connection");
        assert_eq!(round_trip(&mut tunnel, b"shared").await, b"shared");
        tunnels.push(tunnel);
    }
    assert_eq!(front.dialled(), 1, "one TCP connection, one TLS and HTTP/2 handshake");
    assert_eq!(pool.snapshot(), vec![(key.clone(), 1, 20)]);
    assert_eq!(pool.waiting(&key), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dial_fails_every_open_waiting_on_it_and_is_not_cached() {
    let node = node().await;
    let front = Front::start(node.hbone, Gate::Hold).await;
    let pool = Pool::new(certs_for(&node._ca, &[WEB]).await, node.bundles.clone());
    let key = Key {
        node: front.addr,
        ..key(&node, WEB)
    };
    let opens: Vec<_> = (0..20).map(|_| spawn_open(&pool, &key, node.workload)).collect();
    until("all 20 opens wait on a dial", || pool.waiting(&key) == 20).await;
    front.set(Gate::Refuse);
    for open in opens {
        let failed = open.await.unwrap();
        assert!(
            matches!(&failed, Err(e @ OpenError::Tls(at, _)) if *at == front.addr && e.retryable()),
            "every waiting open hears of the failed handshake: {:?}",
            failed.err()
        );
    }
    assert_eq!(front.dialled(), 1, "one dial, failed once for all");
    assert!(pool.snapshot().is_empty(), "{:?}", pool.snapshot());

    front.set(Gate::Forward);
    let mut tunnel = pool
        .open(&key, node.workload, &[], &Bytes::new())
        .await
        .expect("the next open dials again");
    assert_eq!(round_trip(&mut tunnel, b"again").await, b"again");
    assert_eq!(front.dialled(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_that_gives_up_leaves_its_dial_to_the_opens_that_joined_it() {
    let node = node().await;
    let front = Front::start(node.hbone, Gate::Hold).await;
    let pool = Pool::new(certs_for(&node._ca, &[WEB]).await, node.bundles.clone());
    let key = Key {
        node: front.addr,
        ..key(&node, WEB)
    };
    let leader = spawn_open(&pool, &key, node.workload);
    until("the first open dials", || {
        pool.waiting(&key) == 1 && front.dialled() == 1
    })
    .await;
    let follower = spawn_open(&pool, &key, node.workload);
    until("the second open joins the dial", || pool.waiting(&key) == 2).await;
    leader.abort();
    assert!(leader.await.is_err_and(|e| e.is_cancelled()));
    assert_eq!(pool.waiting(&key), 1, "the open that gave up hands its stream back");

    front.set(Gate::Forward);
    let mut tunnel = follower
        .await
        .unwrap()
        .expect("the dial completes for the open still waiting");
    assert_eq!(round_trip(&mut tunnel, b"still dialled").await, b"still dialled");
    assert_eq!(front.dialled(), 1);
    assert_eq!(
        pool.snapshot(),
        vec![(key.clone(), 1, 1)],
        "no stream kept for the open that left"
    );
    drop(tunnel);
    assert_eq!(pool.snapshot(), vec![(key, 1, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_domain_dropped_from_the_federation_loses_its_open_tunnels_and_new_ones() {
    let node = node().await;
    let west = ca("west.trellis.local");
    let west_web = "spiffe://west.trellis.local/ns/shop/sa/web";
    let west_td = TrustDomain::new("west.trellis.local").unwrap();
    node.bundles
        .upsert(TrustBundle::new(west_td.clone(), west.ca.roots().to_vec()));
    // West's node trusts east (to verify cart) and presents west's SVID.
    let west_trusts = BundleSet::with(TrustBundle::new(
        node._ca.ca.trust_domain().clone(),
        node._ca.ca.roots().to_vec(),
    ));
    let pool = Pool::new(certs_for(&west, &[west_web]).await, west_trusts);
    let mut tunnel = pool
        .open(&key(&node, west_web), node.workload, &[], &Bytes::new())
        .await
        .expect("west's web → east's cart, west trusted");
    assert_eq!(round_trip(&mut tunnel, b"from west").await, b"from west");

    node.bundles.remove(&west_td);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tunnel.next_chunk().await {
                Some(Ok(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the open tunnel was not closed when west's trust was withdrawn"
    );
    let again = pool
        .open(&key(&node, west_web), node.workload, &[], &Bytes::new())
        .await;
    assert!(again.is_err(), "a new tunnel from west is refused");
}

/// A TCP relay that forwards both ways until it is told to drop everything, as a node whose
/// packets are blackholed (no reset, no answer).
struct Blackhole {
    addr: SocketAddr,
    dropping: watch::Sender<bool>,
}

impl Blackhole {
    async fn start(node: SocketAddr) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dropping, dropping_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(node).await else {
                    continue;
                };
                let (client_rx, client_tx) = client.into_split();
                let (server_rx, server_tx) = server.into_split();
                tokio::spawn(Self::pipe(client_rx, server_tx, dropping_rx.clone()));
                tokio::spawn(Self::pipe(server_rx, client_tx, dropping_rx.clone()));
            }
        });
        Blackhole { addr, dropping }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        dropping: watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !*dropping.borrow() && to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_node_fails_every_waiting_open_at_once_and_retryably() {
    let node = node().await;
    let pool = Pool::new(certs_for(&node._ca, &[WEB]).await, node.bundles.clone());
    let hole = Blackhole::start(node.hbone).await;
    let key = Key {
        node: hole.addr,
        ..key(&node, WEB)
    };
    let mut tunnel = pool
        .open(&key, node.workload, &[], &Bytes::new())
        .await
        .expect("a tunnel while the node answers");
    assert_eq!(round_trip(&mut tunnel, b"before").await, b"before");

    hole.dropping.send_replace(true);
    // Two opens on the pooled connection, with early bytes, 50 ms apart, each with 600 ms to
    // go: the first's probe (a PING at 150 ms, no answer within 300 ms) closes the connection,
    // and both fail then, the second well before its own deadline.
    let early = Bytes::from_static(b"GET / HTTP/1.1\r\n");
    let timed = |pool: Arc<Pool>, key: Key, early: Bytes| async move {
        let started = tokio::time::Instant::now();
        let opened = pool
            .open_by(&key, node.workload, &[], &early, started + Duration::from_millis(600))
            .await;
        (opened.err(), started.elapsed())
    };
    let first = tokio::spawn(timed(pool.clone(), key.clone(), early.clone()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn(timed(pool.clone(), key.clone(), early.clone()));
    let (first, first_took) = first.await.unwrap();
    let (second, second_took) = second.await.unwrap();
    for (what, e, took) in [("first", &first, first_took), ("second", &second, second_took)] {
        assert!(
            matches!(e, Some(e @ OpenError::Unanswered(_)) if e.retryable() && e.hop_failed()),
            "{what} open: {e:?}"
        );
        assert!(took < Duration::from_millis(600), "{what} open took {took:?}");
    }
    assert!(
        second_took < Duration::from_millis(500),
        "second open took {second_took:?}"
    );
    // The tunnel that was open on it ends too, rather than hanging on a dead node.
    let ended = tokio::time::timeout(Duration::from_secs(2), tunnel.next_chunk()).await;
    assert!(
        matches!(ended, Ok(None | Some(Err(_)))),
        "the open tunnel should end: {ended:?}"
    );

    // A fresh dial to the dead node sends nothing and times out: safe to retry elsewhere.
    let started = tokio::time::Instant::now();
    let fresh = pool
        .open_by(&key, node.workload, &[], &early, started + Duration::from_millis(300))
        .await;
    assert!(
        matches!(&fresh, Err(e @ OpenError::TimedOut(_)) if e.retryable()),
        "{:?}",
        fresh.err()
    );
}
