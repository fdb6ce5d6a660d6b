//! The SPIFFE Workload API on a real Unix socket, exercised with the `spiffe` crate's client:
//! the real third-party client a workload would use.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use trellis_api::spiffe_workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use trellis_api::spiffe_workload::X509svidRequest;
use trellis_identity::workload_api::{UidAttestor, WorkloadApi, WorkloadApiServer};
use trellis_identity::{BundleSet, CertManager};

const WEB: &str = "spiffe://east.trellis.local/ns/shop/sa/web";

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

struct Setup {
    east: Cluster,
    west: Cluster,
    node: CertManager,
    server: Option<WorkloadApiServer>,
    _dir: tempfile::TempDir,
    endpoint: String,
    path: std::path::PathBuf,
}

async fn setup(attest_me: bool) -> Setup {
    let east = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let west = Cluster::start("west.trellis.local", Default::default(), allow_all()).await;
    let node = east.join_node("node-1", fast_retries()).await;
    node.ensure(&id(WEB));
    node.wait_for(&id(WEB), Duration::from_secs(5)).await.expect("SVID");
    let bundles = BundleSet::new();
    bundles.upsert(east.bundle());
    bundles.upsert(west.bundle());
    let mut uids = HashMap::new();
    if attest_me {
        uids.insert(my_uid(), id(WEB));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workload.sock");
    let api = WorkloadApi::new(node.clone(), bundles, Arc::new(UidAttestor(uids)));
    let server = WorkloadApiServer::start(&path, api).unwrap();
    let endpoint = format!("unix://{}", path.display());
    Setup {
        east,
        west,
        node,
        server: Some(server),
        _dir: dir,
        endpoint,
        path,
    }
}

#[tokio::test]
async fn the_spiffe_client_fetches_its_svid_and_federated_bundles() {
    let s = setup(true).await;
    let client = spiffe::WorkloadApiClient::connect_to(&s.endpoint).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), WEB);
    let held = s.node.current(&id(WEB)).unwrap();
    assert_eq!(svid.leaf().as_bytes(), held.svid.chain[0].as_ref());

    let context = client.fetch_x509_context().await.unwrap();
    let west = spiffe::TrustDomain::new("west.trellis.local").unwrap();
    let west_bundle = context.bundle_set().get(&west).expect("federated bundle for west");
    assert_eq!(west_bundle.authorities()[0].as_bytes(), s.west.ca.roots()[0].as_ref());
    let east = spiffe::TrustDomain::new("east.trellis.local").unwrap();
    assert!(context.bundle_set().get(&east).is_some());
}

/// When the manager holds a new SVID, open streams receive it. (When the manager renews is
/// tested in tests/manager.rs on a paused clock; here the renewal is the CA's next SVID stored
/// at once, so the test needs no waiting.)
#[tokio::test]
async fn a_rotated_svid_is_pushed_to_the_stream() {
    let s = setup(true).await;
    let client = spiffe::WorkloadApiClient::connect_to(&s.endpoint).await.unwrap();
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let renewed = issue(&s.east.ca, &id(WEB));
    let renewed_leaf = renewed.svid.chain[0].clone();
    s.node.insert(renewed);
    let second = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let next = stream.next().await.expect("stream open").expect("valid SVID");
            if next.leaf().as_bytes() != first.leaf().as_bytes() {
                return next;
            }
        }
    })
    .await
    .expect("the rotated SVID is pushed");
    assert_eq!(second.spiffe_id().to_string(), WEB);
    assert_eq!(second.leaf().as_bytes(), renewed_leaf.as_ref());
}

#[tokio::test]
async fn a_caller_without_an_identity_is_denied() {
    let s = setup(false).await;
    let client = spiffe::WorkloadApiClient::connect_to(&s.endpoint).await.unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(matches!(err, spiffe::WorkloadApiError::NoIdentityIssued), "{err:?}");
}

#[tokio::test]
async fn a_request_without_the_security_header_is_an_invalid_argument() {
    let s = setup(true).await;
    let path = s.path.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let err = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("workload.spiffe.io"));
}

#[tokio::test]
async fn stopping_the_server_ends_open_streams() {
    let mut s = setup(true).await;
    let client = spiffe::WorkloadApiClient::connect_to(&s.endpoint).await.unwrap();
    let mut stream = client.stream_x509_svids().await.unwrap();
    stream.next().await.unwrap().unwrap();
    drop(s.server.take());
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream ends");
    assert!(!matches!(end, Some(Ok(_))), "no further SVIDs after the server stopped");
    assert!(!s.path.exists(), "the socket file is removed");
}
