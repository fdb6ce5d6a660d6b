//! The CA over real gRPC + TLS on loopback: join tokens, node authentication, the
//! authorization hook and CSR checks, each with the status code a caller sees.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use trellis_identity::caclient::CaClientError;
use trellis_identity::csr::new_csr;
use trellis_identity::issuance::IssuanceAuthorizer;
use trellis_identity::svid::leaf_info;
use trellis_identity::{CaClient, SpiffeId};

fn code(err: CaClientError) -> tonic::Code {
    match err {
        CaClientError::Status { code, .. } => code,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

/// node-1 may hold shop/web; nobody else may hold anything.
fn web_on_node_1() -> Arc<dyn IssuanceAuthorizer> {
    Arc::new(|node: &str, id: &SpiffeId| {
        if node == "node-1" && id.path() == "/ns/shop/sa/web" {
            Ok(())
        } else {
            Err(format!("no workload with {id} is scheduled on {node}"))
        }
    })
}

#[tokio::test]
async fn a_join_token_buys_the_node_svid_once() {
    let cluster = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let token = cluster.tokens.create("node-1", Duration::from_secs(60)).unwrap();
    let client = cluster.anonymous_client();

    let held = client.join(&token, "node-1", &cluster.td).await.expect("first use");
    assert_eq!(
        held.svid.id.to_string(),
        "spiffe://east.trellis.local/trellis/node/node-1"
    );
    assert_eq!(held.roots, cluster.ca.roots());

    let again = client.join(&token, "node-1", &cluster.td).await.unwrap_err();
    assert_eq!(code(again), tonic::Code::Unauthenticated, "a token works once");
}

#[tokio::test]
async fn bad_expired_and_foreign_tokens_are_unauthenticated() {
    let cluster = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let client = cluster.anonymous_client();
    let err = client.join("deadbeef.0000", "node-1", &cluster.td).await.unwrap_err();
    assert_eq!(code(err), tonic::Code::Unauthenticated);

    // A token with no lifetime has expired by the time it is presented.
    let expired = cluster.tokens.create("node-1", Duration::ZERO).unwrap();
    let err = client.join(&expired, "node-1", &cluster.td).await.unwrap_err();
    assert_eq!(code(err), tonic::Code::Unauthenticated);

    let for_node_2 = cluster.tokens.create("node-2", Duration::from_secs(60)).unwrap();
    let err = client.join(&for_node_2, "node-1", &cluster.td).await.unwrap_err();
    assert_eq!(code(err), tonic::Code::Unauthenticated);
    // A refused attempt does not burn the token for its rightful node.
    client
        .join(&for_node_2, "node-2", &cluster.td)
        .await
        .expect("node-2 joins");
}

#[tokio::test]
async fn sign_needs_a_node_svid() {
    let cluster = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    let (csr, _key) = new_csr(&web).unwrap();
    let err = cluster
        .anonymous_client()
        .sign(&web, &csr, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(code(err), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn a_node_gets_only_the_identities_the_hook_allows() {
    let cluster = Cluster::start("east.trellis.local", Default::default(), web_on_node_1()).await;
    let node1 = cluster.join_node("node-1", fast_retries()).await;
    let node2 = cluster.join_node("node-2", fast_retries()).await;
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    let (csr, _key) = new_csr(&web).unwrap();

    let issued = cluster
        .node_client(&node1, "node-1")
        .sign(&web, &csr, Duration::ZERO)
        .await
        .expect("allowed");
    assert_eq!(leaf_info(&issued.chain[0]).unwrap().id, web);

    let err = cluster
        .node_client(&node2, "node-2")
        .sign(&web, &csr, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(code(err), tonic::Code::PermissionDenied);

    // A node may not mint another node's identity or the control plane's.
    let other_node = id("spiffe://east.trellis.local/trellis/node/node-2");
    let (csr, _key) = new_csr(&other_node).unwrap();
    let err = cluster
        .node_client(&node1, "node-1")
        .sign(&other_node, &csr, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(code(err), tonic::Code::PermissionDenied);
    let control = SpiffeId::control(&cluster.td);
    let (csr, _key) = new_csr(&control).unwrap();
    let err = cluster
        .node_client(&node1, "node-1")
        .sign(&control, &csr, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(code(err), tonic::Code::PermissionDenied);
}

fn csr_with(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[tokio::test]
async fn malformed_oversized_and_mismatched_csrs_are_invalid_arguments() {
    let cluster = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let node = cluster.join_node("node-1", fast_retries()).await;
    let client = cluster.node_client(&node, "node-1");
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());

    let cases = [
        ("garbage", "not a CSR at all".to_string()),
        ("oversized", "A".repeat(64 * 1024)),
        (
            "mismatched",
            csr_with(vec![uri("spiffe://east.trellis.local/ns/shop/sa/admin")]),
        ),
        (
            "extra SAN",
            csr_with(vec![
                uri(&web.to_string()),
                uri("spiffe://east.trellis.local/ns/x/sa/y"),
            ]),
        ),
        (
            "DNS SAN",
            csr_with(vec![uri(&web.to_string()), SanType::DnsName("web".try_into().unwrap())]),
        ),
        ("non-SPIFFE SAN", csr_with(vec![uri("https://example.com/web")])),
    ];
    for (what, csr) in cases {
        let err = client.sign(&web, &csr, Duration::ZERO).await.expect_err(what);
        assert_eq!(code(err), tonic::Code::InvalidArgument, "{what}");
    }
    let err = client
        .sign(
            &id("spiffe://west.trellis.local/ns/shop/sa/web"),
            &csr_with(vec![]),
            Duration::ZERO,
        )
        .await
        .unwrap_err();
    assert_eq!(code(err), tonic::Code::InvalidArgument, "foreign trust domain");
}

#[tokio::test]
async fn ttl_is_capped_by_policy() {
    let policy = short_policy(Duration::from_secs(600));
    let cluster = Cluster::start("east.trellis.local", policy, allow_all()).await;
    let node = cluster.join_node("node-1", fast_retries()).await;
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    let (csr, _key) = new_csr(&web).unwrap();
    let issued = cluster
        .node_client(&node, "node-1")
        .sign(&web, &csr, Duration::from_secs(365 * 24 * 3600))
        .await
        .unwrap();
    let info = leaf_info(&issued.chain[0]).unwrap();
    let lifetime = info.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(lifetime <= Duration::from_secs(600), "asked a year, got {lifetime:?}");
    assert!(lifetime > Duration::from_secs(590));
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_cannot_talk_to_it() {
    let cluster = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let stranger = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    // Same trust domain name, different root: the server's chain does not verify.
    let client = CaClient::new(cluster.addr, &cluster.td, stranger.bundles(), None).unwrap();
    let token = cluster.tokens.create("node-1", Duration::from_secs(60)).unwrap();
    let err = client.join(&token, "node-1", &cluster.td).await.unwrap_err();
    assert_eq!(code(err), tonic::Code::Unavailable, "the TLS handshake fails");
    // And the token is still good for a client that does trust it.
    cluster
        .anonymous_client()
        .join(&token, "node-1", &cluster.td)
        .await
        .expect("token unspent");
}

#[tokio::test]
async fn a_node_the_hook_retires_cannot_renew_its_node_svid() {
    let retired: Arc<dyn IssuanceAuthorizer> = Arc::new(|node: &str, _: &SpiffeId| {
        if node == "node-1" {
            Err("node-1 was removed from the cluster".to_string())
        } else {
            Ok(())
        }
    });
    let cluster = Cluster::start("east.trellis.local", Default::default(), retired).await;
    let node = cluster.join_node("node-1", fast_retries()).await;
    let own = SpiffeId::node(&cluster.td, "node-1").unwrap();
    let (csr, _key) = new_csr(&own).unwrap();
    let err = cluster
        .node_client(&node, "node-1")
        .sign(&own, &csr, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(code(err), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_forged_join_token_never_reaches_the_signing_key() {
    let cluster = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let client = cluster.anonymous_client();
    let real = cluster.tokens.create("node-1", Duration::from_secs(60)).unwrap();
    let (real_id, _) = real.split_once('.').unwrap();
    let for_node_2 = cluster.tokens.create("node-2", Duration::from_secs(60)).unwrap();
    let expired = cluster.tokens.create("node-1", Duration::ZERO).unwrap();
    let before = cluster.ca.signatures();
    let forged = [
        "deadbeef.0000".to_string(),
        format!("{real_id}.{}", "0".repeat(32)),
        for_node_2.clone(),
        expired,
    ];
    for token in &forged {
        let err = client.join(token, "node-1", &cluster.td).await.unwrap_err();
        assert_eq!(code(err), tonic::Code::Unauthenticated, "{token}");
    }
    assert_eq!(
        cluster.ca.signatures(),
        before,
        "no refused token cost the CA a signature"
    );
    // The real token still works, for one signature, and is spent.
    client.join(&real, "node-1", &cluster.td).await.expect("the real token");
    assert_eq!(cluster.ca.signatures(), before + 1);
    let err = client.join(&real, "node-1", &cluster.td).await.unwrap_err();
    assert_eq!(code(err), tonic::Code::Unauthenticated);
    assert_eq!(cluster.ca.signatures(), before + 1, "a spent token signs nothing");
}
