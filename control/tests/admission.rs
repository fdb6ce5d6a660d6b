//! trellisd under a flood of unauthenticated, silent connections (issue 12): thousands of peers
//! that open TCP and never start TLS, or finish TLS without a certificate and never send a
//! request, must neither slow a well-behaved node's Join and GetTrustBundle nor stay open.
//!
//! The flood comes from 127.0.0.2 and the well-behaved client from 127.0.0.1, so the per-source
//! limits apply to the flood only, as they would to one hostile host.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_api::identity::v1::certificate_service_client::CertificateServiceClient;
use trellis_api::identity::v1::TrustBundleRequest;
use trellis_control::server::{ControlPlane, Options};
use trellis_e2e::flood::{flood, p99, within_twice, Flood};
use trellis_identity::tls::{client_config, tls_channel, FIRST_REQUEST_TIMEOUT, HANDSHAKE_TIMEOUT};
use trellis_identity::verify::{ExpectedPeer, SpiffeServerVerifier};
use trellis_identity::{BundleSet, CaClient, IssuancePolicy, SpiffeId, TrustBundle, TrustDomain};
use trellis_mesh::model::ClusterInfo;

const TD: &str = "east.trellis.local";
/// 200 silent connections that finish TLS (no client certificate) and send nothing, 2,000 that
/// never start TLS, from 127.0.0.2.
const FLOOD: Flood = Flood {
    silent_tls: 200,
    silent_tcp: 2000,
    from: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2))),
};
/// Join + GetTrustBundle rounds measured with and without the flood.
const ROUNDS: usize = 300;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    plane: ControlPlane,
    td: TrustDomain,
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        write(
            &manifests,
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        );
        let td = TrustDomain::new(TD).unwrap();
        let plane = ControlPlane::start(Options {
            cluster: ClusterInfo {
                name: "east".into(),
                trust_domain: td.clone(),
                network: "east".into(),
                domain: "cluster.local".into(),
            },
            ca_dir: dir.path().join("ca"),
            policy: IssuancePolicy::default(),
            manifests,
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
        })
        .await
        .unwrap();
        assert!(plane.ready(Duration::from_secs(5)).await, "first discovery");
        Self { _dir: dir, plane, td }
    }

    fn bundles(&self) -> BundleSet {
        BundleSet::with(TrustBundle::new(self.td.clone(), self.plane.ca.roots().to_vec()))
    }

    fn anonymous_tls(&self) -> Arc<rustls::ClientConfig> {
        let verifier = SpiffeServerVerifier::new(self.bundles(), ExpectedPeer::Exact(SpiffeId::control(&self.td)));
        Arc::new(client_config(verifier, None).unwrap())
    }

    /// One well-behaved node: a Join and a GetTrustBundle, each on a fresh connection (so each
    /// includes a TCP and TLS handshake). Returns how long both took.
    async fn round(&self, n: usize) -> Duration {
        let node = format!("node-{n}");
        let token = self.plane.tokens.create(&node, Duration::from_secs(60)).unwrap();
        let started = Instant::now();
        let client = CaClient::new(self.plane.grpc_addr, &self.td, self.bundles(), None).unwrap();
        client
            .join(&token, &node, &self.td)
            .await
            .unwrap_or_else(|e| panic!("Join {n} failed: {e}"));
        let mut ca = CertificateServiceClient::new(tls_channel(self.plane.grpc_addr, self.anonymous_tls()));
        let mut request = tonic::Request::new(TrustBundleRequest {});
        request.set_timeout(Duration::from_secs(5));
        let bundle = ca
            .get_trust_bundle(request)
            .await
            .unwrap_or_else(|e| panic!("GetTrustBundle {n} failed: {e}"));
        assert_eq!(bundle.into_inner().trust_domain, TD);
        started.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_unauthenticated_connections_neither_slow_join_nor_stay_open() {
    let f = Fixture::start().await;
    for n in 0..5 {
        f.round(n).await; // warm up
    }
    let mut undisturbed = Vec::new();
    for n in 100..100 + ROUNDS {
        undisturbed.push(f.round(n).await);
    }
    let undisturbed = p99(undisturbed);

    // Measure while the flood's connections are held and its bare TCP dials go on, at least
    // ROUNDS rounds. (The flood's own TLS handshakes run first: on two shared cores, their
    // client half would be measured too.) The flood runs on a thread and runtime of its own, as
    // another host would.
    let (tls_done, tls_opened) = tokio::sync::oneshot::channel();
    let (all_done, mut all_opened) = tokio::sync::oneshot::channel();
    let (server, tls) = (f.plane.grpc_addr, f.anonymous_tls());
    let flooding = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let close_within = HANDSHAKE_TIMEOUT + FIRST_REQUEST_TIMEOUT + Duration::from_secs(2);
        rt.block_on(flood(server, FLOOD, tls, tls_done, all_done, close_within))
    });
    tls_opened.await.unwrap();
    let mut flooded = Vec::new();
    let mut n = 1000;
    while flooded.len() < ROUNDS || all_opened.try_recv().is_err() {
        flooded.push(f.round(n).await);
        n += 1;
    }
    let rounds = flooded.len();
    let flooded = p99(flooded);
    eprintln!("Join + GetTrustBundle p99: {undisturbed:?} undisturbed, {flooded:?} under the flood ({rounds} rounds)");
    assert!(
        within_twice(flooded, undisturbed),
        "p99 under the flood {flooded:?} is more than twice the undisturbed {undisturbed:?} plus 50 ms"
    );

    // Every silent connection is closed by the server once its timeout has run.
    let outcome = tokio::task::spawn_blocking(move || flooding.join().unwrap())
        .await
        .unwrap();
    eprintln!("{outcome:?}");
    assert!(
        outcome.tls_opened > 0 && outcome.tcp_opened > 0,
        "the flood got in at all"
    );
    assert_eq!(
        outcome.tcp_still_open, 0,
        "silent TCP connections still open after the handshake timeout"
    );
    assert_eq!(
        outcome.tls_still_open, 0,
        "silent TLS connections still open after the request timeout"
    );
    f.round(5000).await;
}
