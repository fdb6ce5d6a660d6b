//! Resource exhaustion end to end, in the network-namespace lab (issue 12): a compromised
//! workload flooding a node with silent tunnels, and a hostile host flooding trellisd with silent
//! connections. In both, a normal client's calls are measured alongside: they keep succeeding,
//! with a p99 within twice the undisturbed run's.
//!
//! Addresses (deploy/lab/README.md): trellisd 10.1.0.2, nodes 10.1.0.11 and 10.1.0.12; node-1's
//! pods tgt 10.1.1.10 (a demo server on 8080, service VIP 10.101.0.10:80) and sink 10.1.1.11
//! (a listener this test runs); node-2's pods atk 10.1.2.10 and cli 10.1.2.11.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use trellis_api::identity::v1::certificate_service_client::CertificateServiceClient;
use trellis_api::identity::v1::TrustBundleRequest;
use trellis_e2e::flood::{flood, p99, within_twice, Flood};
use trellis_e2e::lab::Lab;
use trellis_e2e::{in_netns, wait_until};
use trellis_identity::tls::{client_config, tls_channel, FIRST_REQUEST_TIMEOUT, HANDSHAKE_TIMEOUT};
use trellis_identity::verify::{ExpectedPeer, SpiffeServerVerifier};
use trellis_identity::{CaClient, CertManager, JoinTokens, ManagerConfig, SpiffeId, TrustDomain};
use trellis_ztunnel::hbone::pool::{Key, OpenError, Pool, Tunnel};
use trellis_ztunnel::hbone::tunnel::Protocol;

/// Each ztunnel admits 2,000 tunnels per source identity and closes a tunnel that has moved no
/// byte 5 s after it opened (defaults 4,096 and 30 s: smaller here to keep the test short).
const TOPOLOGY: &str = r#"
clusters:
  - name: east
    nodes: 2
    ztunnelArgs: [--max-tunnels-per-identity, "2000", --tunnel-unused-timeout-seconds, "5"]
namespaces:
  - {name: mesh, ambient: true}
services:
  - {name: tgt, namespace: mesh, port: 80, targetPort: 8080, selector: {app: tgt}}
pods:
  - {name: tgt, namespace: mesh, node: node-1, serviceAccount: tgt, labels: {app: tgt}, run: {server: {version: v1, port: 8080}}}
  - {name: sink, namespace: mesh, node: node-1, serviceAccount: sink}
  - {name: atk, namespace: mesh, node: node-2, serviceAccount: atk}
  - {name: cli, namespace: mesh, node: node-2, serviceAccount: cli}
"#;

const TD: &str = "east.trellis.local";
const ATK: &str = "spiffe://east.trellis.local/ns/mesh/sa/atk";
const SINK: &str = "spiffe://east.trellis.local/ns/mesh/sa/sink";
const SINK_POD: &str = "10.1.1.11:9000";
const NODE1_HBONE: &str = "10.1.0.11:15008";
const TRELLISD: &str = "10.1.0.2:15012";
const TGT_VIP: &str = "10.101.0.10:80";
const PER_IDENTITY: usize = 2000;
const UNUSED_TIMEOUT: Duration = Duration::from_secs(5);
/// Silent CONNECTs the compromised workload attempts.
const TUNNEL_FLOOD: usize = 3000;
/// Calls measured undisturbed, and at least as many under each flood.
const CALLS: usize = 100;

/// Lifts this process's soft descriptor limit to its hard one: the sink holds thousands.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "raising RLIMIT_NOFILE");
    }
}

/// One HTTP/1.1 call from the current namespace to `addr` on a fresh connection: how long it
/// took, or what went wrong.
fn call(addr: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let addr: SocketAddr = addr.parse().expect("an address");
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: tgt\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).map_err(|e| format!("read: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    match answer.starts_with("HTTP/1.1 200") && answer.contains("hello from tgt") {
        true => Ok(started.elapsed()),
        false => Err(format!("unexpected answer: {answer:?}")),
    }
}

/// `n` calls from cli to tgt's VIP, each of which must succeed; their durations.
fn calls(lab: &Lab, n: usize) -> Vec<Duration> {
    in_netns(&lab.pod_ns("east", "mesh", "cli"), || {
        (0..n)
            .map(|i| call(TGT_VIP).unwrap_or_else(|e| panic!("cli → tgt call {i} (undisturbed): {e}")))
            .collect()
    })
}

/// Calls from cli to tgt's VIP until `done` is set and at least `CALLS` were made; panics on the
/// first that fails.
fn calls_until(lab: &Lab, done: &AtomicBool, during: &str) -> Vec<Duration> {
    in_netns(&lab.pod_ns("east", "mesh", "cli"), || {
        let mut took = Vec::new();
        while took.len() < CALLS || !done.load(Ordering::Acquire) {
            let i = took.len();
            took.push(call(TGT_VIP).unwrap_or_else(|e| panic!("cli → tgt call {i} during {during}: {e}")));
        }
        took
    })
}

/// A listener in sink's namespace that accepts every connection and holds it until its peer
/// closes it (a workload that never speaks first).
fn run_sink(lab: &Lab) {
    let listener = in_netns(&lab.pod_ns("east", "mesh", "sink"), || {
        TcpListener::bind("0.0.0.0:9000").expect("binding the sink")
    });
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut tcp = tcp;
                let mut buf = [0u8; 1024];
                while matches!(tcp.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

/// What became of the tunnel flood.
#[derive(Debug)]
struct TunnelFlood {
    held: usize,
    refused: usize,
    /// Held tunnels the node ended (for silence) while the attacker still held them.
    ended_by_node: usize,
    /// From the last tunnel opened to the last ended.
    ended_after: Duration,
}

/// atk's SVID (issued by the lab's CA, as trellisd issues it to atk's node), from node-2's
/// namespace: `TUNNEL_FLOOD` CONNECTs to sink through node-1 that never send a byte, all held
/// until the node ends them. `opened` gets (held, refused) once every CONNECT was answered.
fn tunnel_flood(lab: &Lab, opened: mpsc::Sender<(usize, usize)>) -> TunnelFlood {
    let (ca, bundles) = lab.ca("east");
    in_netns(&lab.node_ns("east", "node-2"), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let atk = SpiffeId::parse(ATK).expect("atk's ID");
            let certs = CertManager::new(Arc::new(ca), ManagerConfig::default());
            certs.ensure(&atk);
            certs.wait_for(&atk, Duration::from_secs(10)).await.expect("atk's SVID");
            let pool = Pool::new(certs, bundles);
            let key = Arc::new(Key {
                source: atk,
                node: NODE1_HBONE.parse().expect("node-1"),
                destination: SpiffeId::parse(SINK).expect("sink's ID"),
                protocol: Protocol::Http2,
                via: None,
            });
            let target: SocketAddr = SINK_POD.parse().expect("sink");
            let mut tasks = tokio::task::JoinSet::new();
            let mut held: Vec<Tunnel> = Vec::new();
            let mut refused = 0;
            let mut settle = |done: Result<Result<Tunnel, OpenError>, tokio::task::JoinError>| match done {
                Ok(Ok(tunnel)) => held.push(tunnel),
                Ok(Err(OpenError::Unreachable)) => refused += 1,
                Ok(Err(e)) => panic!("flood tunnel: unexpected {e:?}"),
                Err(e) => panic!("flood task: {e}"),
            };
            for _ in 0..TUNNEL_FLOOD {
                while tasks.len() >= 64 {
                    settle(tasks.join_next().await.expect("a task"));
                }
                let (pool, key) = (pool.clone(), key.clone());
                tasks.spawn(async move { pool.open(&key, target, &[], &Bytes::new()).await });
            }
            while let Some(done) = tasks.join_next().await {
                settle(done);
            }
            let opened_at = Instant::now();
            let _ = opened.send((held.len(), refused));
            let mut ended_by_node = 0;
            for tunnel in &mut held {
                let end = tokio::time::timeout(Duration::from_secs(60), tunnel.next_chunk()).await;
                match end {
                    Ok(Some(Ok(data))) => panic!("the sink sent {} bytes", data.len()),
                    Ok(_) => ended_by_node += 1,
                    Err(_) => break,
                }
            }
            TunnelFlood {
                held: held.len(),
                refused,
                ended_by_node,
                ended_after: opened_at.elapsed(),
            }
        })
    })
}

#[test]
fn a_tunnel_flood_from_one_workload_spares_other_callers_and_gives_memory_back() {
    raise_nofile();
    let lab = Lab::up("e2etunfl", TOPOLOGY);
    run_sink(&lab);
    let cli = lab.pod_ns("east", "mesh", "cli");
    lab.call_until(&cli, "http://10.101.0.10/", Duration::from_secs(20), |r| r.is_ok())
        .expect("cli → tgt before the flood");
    calls(&lab, 20); // warm up
    let undisturbed = p99(calls(&lab, CALLS));
    let node1 = "ztunnel-east-node-1";
    let rss_before = lab.rss_kib(node1);

    let done = AtomicBool::new(false);
    let (opened_tx, opened_rx) = mpsc::channel();
    let (outcome, flooded, rss_peak) = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let outcome = tunnel_flood(&lab, opened_tx);
            done.store(true, Ordering::Release);
            outcome
        });
        let measured = s.spawn(|| calls_until(&lab, &done, "the tunnel flood"));
        // The peak: sampled while the flood's tunnels are all held.
        let (held, refused) = opened_rx.recv().expect("the flood's tunnels opened");
        eprintln!("tunnel flood: {held} held, {refused} refused");
        let mut peak = lab.rss_kib(node1);
        while !done.load(Ordering::Acquire) {
            peak = peak.max(lab.rss_kib(node1));
            std::thread::sleep(Duration::from_millis(100));
        }
        (
            flood.join().expect("the flood"),
            p99(measured.join().expect("the calls")),
            peak,
        )
    });
    eprintln!(
        "{outcome:?}; cli → tgt p99 {undisturbed:?} undisturbed, {flooded:?} under the flood; node-1 ztunnel RSS {rss_before} KiB before, {rss_peak} KiB at the peak"
    );
    assert_eq!(
        outcome.held, PER_IDENTITY,
        "the flood gets exactly its identity's share"
    );
    assert_eq!(
        outcome.refused,
        TUNNEL_FLOOD - PER_IDENTITY,
        "every CONNECT beyond it gets 503"
    );
    assert!(
        within_twice(flooded, undisturbed),
        "cli's p99 under the flood {flooded:?} is more than twice the undisturbed {undisturbed:?} plus 50 ms"
    );
    assert_eq!(
        outcome.ended_by_node, outcome.held,
        "node-1 ends every silent tunnel while the attacker still holds it"
    );
    assert!(
        outcome.ended_after <= UNUSED_TIMEOUT * 4,
        "the silent tunnels ended {:?} after the last opened (timeout {UNUSED_TIMEOUT:?})",
        outcome.ended_after
    );

    // The memory the flood took is given back.
    let grew = rss_peak.saturating_sub(rss_before);
    let mut rss_after = rss_peak;
    wait_until(
        "node-1's ztunnel gave back at least half of what the flood took",
        Duration::from_secs(30),
        || {
            rss_after = lab.rss_kib(node1);
            rss_after <= rss_before + grew / 2
        },
    );
    eprintln!("node-1 ztunnel RSS after the flood: {rss_after} KiB (grew {grew} KiB at the peak)");
    assert!(grew > 0, "the flood cost no memory: it did not happen");
    calls(&lab, 10);
}

#[test]
fn silent_connections_to_trellisd_neither_slow_nodes_nor_stay_open() {
    let lab = Lab::up("e2ecpfl", TOPOLOGY);
    let (_, bundles) = lab.ca("east");
    let td = TrustDomain::new(TD).expect("trust domain");
    let trellisd: SocketAddr = TRELLISD.parse().expect("trellisd");
    let anonymous = {
        let verifier = SpiffeServerVerifier::new(bundles.clone(), ExpectedPeer::Exact(SpiffeId::control(&td)));
        Arc::new(client_config(verifier, None).expect("TLS client"))
    };
    // A well-behaved node on node-1: a Join (for a new node, with a token made beforehand, as
    // an operator would) and a GetTrustBundle, each on a fresh connection.
    let tokens =
        JoinTokens::open(&lab.state_dir.join("east").join("ca").join("join-tokens.json")).expect("the lab's tokens");
    let joined = std::sync::atomic::AtomicUsize::new(0);
    let round = |rt: &tokio::runtime::Runtime, during: &str| -> Duration {
        let node = format!("extra-{}", joined.fetch_add(1, Ordering::Relaxed));
        let token = tokens.create(&node, Duration::from_secs(600)).expect("a join token");
        rt.block_on(async {
            let started = Instant::now();
            let client = CaClient::new(trellisd, &td, bundles.clone(), None).expect("CA client");
            client
                .join(&token, &node, &td)
                .await
                .unwrap_or_else(|e| panic!("Join of {node} {during}: {e}"));
            let mut ca = CertificateServiceClient::new(tls_channel(trellisd, anonymous.clone()));
            let mut request = tonic::Request::new(TrustBundleRequest {});
            request.set_timeout(Duration::from_secs(5));
            let bundle = ca
                .get_trust_bundle(request)
                .await
                .unwrap_or_else(|e| panic!("GetTrustBundle {during}: {e}"));
            assert_eq!(bundle.into_inner().trust_domain, TD);
            started.elapsed()
        })
    };
    let node1 = lab.node_ns("east", "node-1");
    let undisturbed = in_netns(&node1, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        (0..5).for_each(|_| {
            round(&rt, "warming up");
        });
        p99((0..CALLS).map(|_| round(&rt, "undisturbed")).collect())
    });

    // The flood, from node-2's address: 200 connections that finish TLS without a certificate
    // and never send a request, then 2,000 that never start TLS.
    let (tls_done, tls_opened) = tokio::sync::oneshot::channel();
    let (all_done, mut all_opened) = tokio::sync::oneshot::channel();
    let hostile = Flood {
        silent_tls: 200,
        silent_tcp: 2000,
        from: None,
    };
    let (outcome, flooded) = std::thread::scope(|s| {
        let flooding = s.spawn(|| {
            in_netns(&lab.node_ns("east", "node-2"), || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let close_within = HANDSHAKE_TIMEOUT + FIRST_REQUEST_TIMEOUT + Duration::from_secs(2);
                rt.block_on(flood(
                    trellisd,
                    hostile,
                    anonymous.clone(),
                    tls_done,
                    all_done,
                    close_within,
                ))
            })
        });
        let flooded = in_netns(&node1, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(tls_opened).expect("the flood's TLS connections");
            let mut took = Vec::new();
            while took.len() < CALLS || all_opened.try_recv().is_err() {
                took.push(round(&rt, "under the flood"));
            }
            took
        });
        (flooding.join().expect("the flood"), flooded)
    });
    let rounds = flooded.len();
    let flooded = p99(flooded);
    eprintln!(
        "{outcome:?}; node-1's Join + GetTrustBundle p99 {undisturbed:?} undisturbed, {flooded:?} under the flood ({rounds} rounds)"
    );
    assert!(
        within_twice(flooded, undisturbed),
        "p99 under the flood {flooded:?} is more than twice the undisturbed {undisturbed:?} plus 50 ms"
    );
    assert!(
        outcome.tls_opened > 0 && outcome.tcp_opened > 0,
        "the flood got in at all"
    );
    assert_eq!(
        outcome.tcp_still_open, 0,
        "silent TCP connections outlived the handshake timeout"
    );
    assert_eq!(
        outcome.tls_still_open, 0,
        "silent TLS connections outlived the request timeout"
    );
    // The mesh itself never noticed: its nodes' streams and tunnels carry on.
    lab.call(&lab.pod_ns("east", "mesh", "cli"), "http://10.101.0.10/", 0)
        .expect("cli → tgt after the flood");
}
