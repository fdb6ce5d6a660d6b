//! trellisd in-process with real TLS on loopback, a real manifest directory and real node
//! clients: enrolment at runtime, identity moving with a workload, bad manifests, reconnects.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::stream::{follow, follow_once, Applied};
use trellis_control::server::{ControlPlane, Options};
use trellis_identity::caclient::{join_node, CaClientError};
use trellis_identity::csr::new_csr;
use trellis_identity::tls::{client_config, tls_channel};
use trellis_identity::verify::{ExpectedPeer, SpiffeServerVerifier};
use trellis_identity::{
    BundleSet, CaClient, CertManager, IssuancePolicy, ManagerConfig, SpiffeId, TrustBundle, TrustDomain,
};
use trellis_mesh::model::{ClusterInfo, ResKey};

const TD: &str = "east.trellis.local";

fn namespace(mode: Option<&str>) -> String {
    let labels = mode.map_or(String::new(), |m| {
        format!(", labels: {{trellis.io/dataplane-mode: {m}}}")
    });
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop{labels}}}\n")
}

fn workload(name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: trellis.io/v1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop, labels: {{app: cart}}}}\nspec: {{serviceAccount: cart, node: {node}, ip: {ip}}}\n"
    )
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {selector: {app: cart}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}\n";

/// Writes a manifest atomically (as editors and `trellis namespace label` do).
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    manifests: std::path::PathBuf,
    plane: ControlPlane,
    td: TrustDomain,
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        write(&manifests, "ns.yaml", &namespace(None));
        write(&manifests, "svc.yaml", SERVICE);
        write(&manifests, "cart-1.yaml", &workload("cart-1", "node-1", "10.1.1.5"));
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
            manifests: manifests.clone(),
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
        })
        .await
        .unwrap();
        assert!(plane.ready(Duration::from_secs(5)).await, "first discovery");
        Self {
            _dir: dir,
            manifests,
            plane,
            td,
        }
    }

    fn bundles(&self) -> BundleSet {
        BundleSet::with(TrustBundle::new(self.td.clone(), self.plane.ca.roots().to_vec()))
    }

    async fn join(&self, node: &str) -> CertManager {
        let token = self.plane.tokens.create(node, Duration::from_secs(60)).unwrap();
        join_node(
            self.plane.grpc_addr,
            &self.td,
            self.bundles(),
            node,
            &token,
            ManagerConfig::default(),
        )
        .await
        .unwrap()
    }

    fn channel(&self, certs: Option<&CertManager>, node: &str) -> tonic::transport::Channel {
        let verifier = SpiffeServerVerifier::new(self.bundles(), ExpectedPeer::Exact(SpiffeId::control(&self.td)));
        let resolver = certs.map(|m| {
            m.resolver(&SpiffeId::node(&self.td, node).unwrap()) as Arc<dyn rustls::client::ResolvesClientCert>
        });
        tls_channel(
            self.plane.grpc_addr,
            Arc::new(client_config(verifier, resolver).unwrap()),
        )
    }

    /// A subscriber that follows the stream for `node`, reconnecting as needed.
    fn subscribe(&self, certs: &CertManager, node: &str) -> watch::Receiver<Applied> {
        let (tx, rx) = watch::channel(Applied::default());
        tokio::spawn(follow(
            self.channel(Some(certs), node),
            node.to_string(),
            pb::Role::Ztunnel,
            tx,
        ));
        rx
    }

    async fn status(&self) -> serde_json::Value {
        http_get(self.plane.admin_addr, "/status").await.parse().unwrap()
    }
}

/// The body of `path` on trellisd's admin endpoint.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = trellis_admin::client::get(addr, path, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

fn find_workload(applied: &Applied, name: &str) -> Option<pb::Workload> {
    applied
        .slice
        .get(&ResKey {
            kind: pb::Kind::Workload,
            name: format!("shop/{name}").into(),
        })
        .and_then(|r| match r.kind.as_ref() {
            Some(Variant::Workload(w)) => Some(w.clone()),
            _ => None,
        })
}

async fn until(rx: &mut watch::Receiver<Applied>, what: &str, f: impl Fn(&Applied) -> bool) -> Applied {
    let result = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|a| f(a)))
        .await
        .map(|r| r.map(|a| a.clone()));
    match result {
        Ok(Ok(applied)) => applied,
        _ => panic!(
            "timed out waiting for: {what}; have {:?}",
            rx.borrow().slice.keys().collect::<Vec<_>>()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_on_and_off_at_runtime_reaches_a_subscriber_as_a_delta() {
    let f = Fixture::start().await;
    let node = f.join("node-1").await;
    let mut rx = f.subscribe(&node, "node-1");
    let first = until(&mut rx, "cart-1 in the snapshot", |a| {
        find_workload(a, "cart-1").is_some()
    })
    .await;
    assert!(!find_workload(&first, "cart-1").unwrap().enrolled);

    write(&f.manifests, "ns.yaml", &namespace(Some("ambient")));
    let on = until(&mut rx, "cart-1 enrolled", |a| {
        find_workload(a, "cart-1").is_some_and(|w| w.enrolled)
    })
    .await;
    assert!(on.version > first.version);
    assert_eq!(
        find_workload(&on, "cart-1").unwrap().identity,
        "spiffe://east.trellis.local/ns/shop/sa/cart"
    );
    write(&f.manifests, "ns.yaml", &namespace(None));
    until(&mut rx, "cart-1 back out", |a| {
        find_workload(a, "cart-1").is_some_and(|w| !w.enrolled)
    })
    .await;

    let metrics = http_get(f.plane.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("trellis_config_pushes_total{kind=\"snapshot\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_config_pushes_total{kind=\"delta\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("trellis_config_connected_nodes 1"), "{metrics}");
}

/// Waits until the model says cart-1 is (or is not) enrolled.
async fn wait_for_enrolment(f: &Fixture, enrolled: bool) {
    let mut model = f.plane.hub.model.clone();
    let found = tokio::time::timeout(
        Duration::from_secs(10),
        model.wait_for(|p| {
            p.model.workloads().any(|(k, e)| {
                k.name == "cart-1" && matches!(&e.resource.kind, Some(Variant::Workload(w)) if w.enrolled == enrolled)
            })
        }),
    )
    .await;
    assert!(found.is_ok(), "cart-1 never became enrolled={enrolled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_is_not_enrolled_gets_no_svid() {
    let f = Fixture::start().await;
    let node1 = f.join("node-1").await;
    let client = CaClient::new(
        f.plane.grpc_addr,
        &f.td,
        f.bundles(),
        Some(node1.resolver(&SpiffeId::node(&f.td, "node-1").unwrap())),
    )
    .unwrap();
    let cart = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/cart").unwrap();
    let (csr, _key) = new_csr(&cart).unwrap();
    // cart-1 runs on node-1, in a namespace that is not in the mesh.
    wait_for_enrolment(&f, false).await;
    let err = client.sign(&cart, &csr, Duration::ZERO).await.unwrap_err();
    assert!(
        matches!(&err, CaClientError::Status { code: tonic::Code::PermissionDenied, message, .. } if message.contains("not enrolled")),
        "{err}"
    );
    write(&f.manifests, "ns.yaml", &namespace(Some("ambient")));
    wait_for_enrolment(&f, true).await;
    client.sign(&cart, &csr, Duration::ZERO).await.expect("enrolled now");
    write(&f.manifests, "ns.yaml", &namespace(Some("none")));
    wait_for_enrolment(&f, false).await;
    let err = client.sign(&cart, &csr, Duration::ZERO).await.unwrap_err();
    assert!(permission_denied(err), "out of the mesh again");
}

fn permission_denied(e: CaClientError) -> bool {
    matches!(
        e,
        CaClientError::Status {
            code: tonic::Code::PermissionDenied,
            ..
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_moving_nodes_moves_the_right_to_its_svid() {
    let f = Fixture::start().await;
    let node1 = f.join("node-1").await;
    let node2 = f.join("node-2").await;
    let mut rx = f.subscribe(&node2, "node-2");
    write(&f.manifests, "ns.yaml", &namespace(Some("ambient")));
    wait_for_enrolment(&f, true).await;
    let cart = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/cart").unwrap();
    let client = |m: &CertManager, n: &str| {
        CaClient::new(
            f.plane.grpc_addr,
            &f.td,
            f.bundles(),
            Some(m.resolver(&SpiffeId::node(&f.td, n).unwrap())),
        )
        .unwrap()
    };
    let (csr, _key) = new_csr(&cart).unwrap();
    client(&node1, "node-1")
        .sign(&cart, &csr, Duration::ZERO)
        .await
        .expect("cart runs on node-1");
    let err = client(&node2, "node-2")
        .sign(&cart, &csr, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(permission_denied(err));

    write(&f.manifests, "cart-1.yaml", &workload("cart-1", "node-2", "10.1.1.5"));
    until(&mut rx, "cart-1 on node-2", |a| {
        find_workload(a, "cart-1").is_some_and(|w| w.node == "node-2")
    })
    .await;
    client(&node2, "node-2")
        .sign(&cart, &csr, Duration::ZERO)
        .await
        .expect("now on node-2");
    let err = client(&node1, "node-1")
        .sign(&cart, &csr, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(permission_denied(err), "node-1 lost the right");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manifests_are_reported_and_keep_the_last_good_state() {
    let f = Fixture::start().await;
    let node = f.join("node-1").await;
    let mut rx = f.subscribe(&node, "node-1");
    until(&mut rx, "cart-1", |a| find_workload(a, "cart-1").is_some()).await;
    let version = f.plane.hub.model.borrow().version;

    let cases = [
        (
            "cart-1.yaml",
            "apiVersion: v1\nkind: Workload\nmetadata: {name: [cart-1\n",
            "cart-1.yaml: line ",
        ),
        (
            "extra.yaml",
            "apiVersion: v1\nkind: Deployment\nmetadata: {name: x, namespace: shop}\n",
            "unknown kind \"Deployment\"",
        ),
        (
            "dup.yaml",
            &workload("cart-1", "node-9", "10.1.9.9"),
            "already defined in",
        ),
        (
            "vip.yaml",
            &SERVICE.replace("name: cart", "name: other"),
            "claims VIP 10.96.0.10",
        ),
    ];
    for (file, text, expect) in cases {
        write(&f.manifests, file, text);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let status = f.status().await;
            let problems: Vec<String> = serde_json::from_value(status["problems"].clone()).unwrap();
            if problems.iter().any(|p| p.contains(file) && p.contains(expect)) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{file}: no problem saying {expect:?}: {problems:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let now = rx.borrow().clone();
    let cart = find_workload(&now, "cart-1").expect("the last good cart-1 stays");
    assert_eq!(cart.node, "node-1");
    assert!(now
        .slice
        .keys()
        .any(|k| &*k.name == "shop/cart" && k.kind == pb::Kind::Service));
    assert!(!now.slice.keys().any(|k| &*k.name == "shop/other"));
    assert_eq!(
        f.plane.hub.model.borrow().version,
        version,
        "nothing good changed, no new version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_ends_with_the_same_state_as_one_that_never_left() {
    let f = Fixture::start().await;
    let node = f.join("node-1").await;
    let mut steady = f.subscribe(&node, "node-1");
    until(&mut steady, "cart-1", |a| find_workload(a, "cart-1").is_some()).await;

    // The flaky one connects, then drops mid-stream.
    let (flaky_tx, mut flaky) = watch::channel(Applied::default());
    let first = tokio::spawn({
        let channel = f.channel(Some(&node), "node-1");
        let tx = flaky_tx.clone();
        async move { follow_once(channel, "node-1", pb::Role::Ztunnel, &tx).await }
    });
    until(&mut flaky, "first snapshot", |a| a.version > 0).await;
    first.abort();

    // Changes while it is away: enrol, add a workload, remove the service.
    write(&f.manifests, "ns.yaml", &namespace(Some("ambient")));
    write(&f.manifests, "cart-2.yaml", &workload("cart-2", "node-1", "10.1.1.6"));
    std::fs::remove_file(f.manifests.join("svc.yaml")).unwrap();
    let settled = until(&mut steady, "all three changes", |a| {
        find_workload(a, "cart-2").is_some()
            && !a.slice.keys().any(|k| k.kind == pb::Kind::Service)
            && find_workload(a, "cart-1").is_some_and(|w| w.enrolled)
    })
    .await;

    // It comes back and resumes from what it had.
    tokio::spawn(follow(
        f.channel(Some(&node), "node-1"),
        "node-1".to_string(),
        pb::Role::Ztunnel,
        flaky_tx,
    ));
    let resumed = until(&mut flaky, "caught up", |a| a.version == settled.version).await;
    assert_eq!(resumed.slice, settled.slice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sees_only_its_own_workloads_and_cannot_pose_as_another() {
    let f = Fixture::start().await;
    write(&f.manifests, "cart-2.yaml", &workload("cart-2", "node-2", "10.1.2.5"));
    let node1 = f.join("node-1").await;
    let mut rx = f.subscribe(&node1, "node-1");
    let applied = until(&mut rx, "cart-1 and the service", |a| {
        find_workload(a, "cart-1").is_some() && a.slice.keys().any(|k| k.kind == pb::Kind::Service)
    })
    .await;
    assert!(
        find_workload(&applied, "cart-2").is_none(),
        "node-2's workload is not node-1's business"
    );

    let (tx, _rx) = watch::channel(Applied::default());
    let err = follow_once(f.channel(Some(&node1), "node-1"), "node-2", pb::Role::Ztunnel, &tx)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = follow_once(f.channel(None, "node-1"), "node-1", pb::Role::Ztunnel, &tx)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_rejects_a_version_is_logged_counted_and_shown() {
    use trellis_api::config::v1::config_service_client::ConfigServiceClient;
    let f = Fixture::start().await;
    let node = f.join("node-1").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Subscribe(pb::Subscribe {
            node: "node-1".into(),
            role: pb::Role::Ztunnel as i32,
            resume_from: 0,
        })),
    })
    .await
    .unwrap();
    let mut client = ConfigServiceClient::new(f.channel(Some(&node), "node-1"));
    let mut updates = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let snapshot = updates.message().await.unwrap().expect("a snapshot");
    assert!(snapshot.snapshot);
    tx.send(pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Ack(pb::Ack {
            version: snapshot.version,
            error: "cannot program the dataplane".into(),
        })),
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = f.status().await;
        let nodes = status["connected_nodes"].as_array().cloned().unwrap_or_default();
        if nodes.iter().any(|n| n["last_error"] == "cannot program the dataplane") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rejection never showed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = http_get(f.plane.admin_addr, "/metrics").await;
    assert!(metrics.contains("trellis_config_push_errors_total 1"), "{metrics}");
}

/// Opens a raw config stream as whoever `certs` holds `id` for, subscribing with `subscribe`.
async fn raw_stream(
    f: &Fixture,
    certs: &CertManager,
    id: &SpiffeId,
    subscribe: pb::Subscribe,
) -> Result<RawStream, tonic::Status> {
    use trellis_api::config::v1::config_service_client::ConfigServiceClient;
    let verifier = SpiffeServerVerifier::new(f.bundles(), ExpectedPeer::Exact(SpiffeId::control(&f.td)));
    let resolver = certs.resolver(id) as Arc<dyn rustls::client::ResolvesClientCert>;
    let channel = tls_channel(
        f.plane.grpc_addr,
        Arc::new(client_config(verifier, Some(resolver)).unwrap()),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Subscribe(subscribe)),
    })
    .await
    .unwrap();
    let mut client = ConfigServiceClient::new(channel);
    let updates = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(RawStream { _requests: tx, updates })
}

/// A config stream opened by hand; its request side stays open while it lives.
struct RawStream {
    _requests: tokio::sync::mpsc::Sender<pb::StreamRequest>,
    updates: tonic::Streaming<pb::ConfigUpdate>,
}

const WAYPOINT: &str =
    "apiVersion: trellis.io/v1\nkind: Waypoint\nmetadata: {name: shop-wp, namespace: shop}\nspec: {serviceAccount: shop-wp, addresses: [10.1.1.100]}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_svid_asking_for_the_waypoint_role_is_refused() {
    let f = Fixture::start().await;
    write(&f.manifests, "wp.yaml", WAYPOINT);
    let node = f.join("node-1").await;
    let node_id = SpiffeId::node(&f.td, "node-1").unwrap();
    let subscribe = pb::Subscribe {
        node: "node-1".into(),
        role: pb::Role::Waypoint as i32,
        resume_from: 0,
    };
    let err = match raw_stream(&f, &node, &node_id, subscribe).await {
        Ok(_) => panic!("a node got the waypoint slice"),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // The same node as a ztunnel is fine.
    let (tx, _rx) = watch::channel(Applied::default());
    let ok = tokio::time::timeout(
        Duration::from_millis(500),
        follow_once(f.channel(Some(&node), "node-1"), "node-1", pb::Role::Ztunnel, &tx),
    )
    .await;
    assert!(ok.is_err(), "still streaming as a ztunnel: {ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_waypoints_own_identity_gets_the_waypoint_slice_and_only_while_it_exists() {
    let f = Fixture::start().await;
    write(&f.manifests, "wp.yaml", WAYPOINT);
    let certs = CertManager::new(f.plane.ca.clone(), ManagerConfig::default());
    let waypoint = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/shop-wp").unwrap();
    let web = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/web").unwrap();
    for id in [&waypoint, &web] {
        certs.ensure(id);
        certs.wait_for(id, Duration::from_secs(10)).await.expect("an SVID");
    }
    let subscribe = || pb::Subscribe {
        node: "node-1".into(),
        role: pb::Role::Waypoint as i32,
        resume_from: 0,
    };
    // Wait for the model to hold the Waypoint.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match raw_stream(&f, &certs, &waypoint, subscribe()).await {
            Ok(stream) => break stream,
            Err(e) if e.code() == tonic::Code::PermissionDenied && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the waypoint was refused: {e}"),
        }
    };
    let snapshot = stream.updates.message().await.unwrap().expect("a snapshot");
    assert!(snapshot.snapshot);
    let err = match raw_stream(&f, &certs, &web, subscribe()).await {
        Ok(_) => panic!("a workload that is no waypoint got the waypoint slice"),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // Its Waypoint removed: the stream is closed.
    std::fs::remove_file(f.manifests.join("wp.yaml")).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.updates.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .expect("the stream ends");
    assert_eq!(ended, Some(tonic::Code::PermissionDenied));
}
