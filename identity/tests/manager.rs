//! The certificate manager against a real CA over TLS: rotation at half life, retries while
//! the CA is down, and no expired certificate ever handed out.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use rustls::client::ResolvesClientCert;
use trellis_identity::SpiffeId;

#[tokio::test]
async fn svids_rotate_before_they_expire() {
    let cluster = Cluster::start("east.trellis.local", short_policy(Duration::from_secs(4)), allow_all()).await;
    let node = cluster.join_node("node-1", fast_retries()).await;
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    node.ensure(&web);
    let first = node.wait_for(&web, Duration::from_secs(5)).await.expect("first SVID");
    let node_id = SpiffeId::node(&cluster.td, "node-1").unwrap();
    let first_node = node.current(&node_id).expect("node SVID");

    // Half of a 4 s life is 2 s (±5%); by 3.5 s both have been replaced by later ones.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let second = node.current(&web).expect("renewed SVID");
    assert_ne!(first.svid.chain[0], second.svid.chain[0], "a new certificate");
    assert!(second.svid.not_after > first.svid.not_after);
    let second_node = node.current(&node_id).expect("renewed node SVID");
    assert!(
        second_node.svid.not_after > first_node.svid.not_after,
        "the node SVID renews itself over mTLS"
    );
    // And it keeps going well past the first certificate's expiry.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let third = node.current(&web).expect("still valid");
    assert!(third.svid.is_valid_at(SystemTime::now()));
    assert!(SystemTime::now() > first.svid.not_after);
}

#[tokio::test]
async fn the_manager_retries_while_the_ca_is_down_and_recovers() {
    let mut cluster = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let node = cluster.join_node("node-1", fast_retries()).await;
    cluster.stop().await;
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    node.ensure(&web);
    assert!(
        node.wait_for(&web, Duration::from_millis(1500)).await.is_none(),
        "no CA, no SVID"
    );
    cluster.restart().await;
    let held = node
        .wait_for(&web, Duration::from_secs(5))
        .await
        .expect("SVID once the CA is back");
    assert_eq!(held.svid.id, web);
}

#[tokio::test]
async fn an_expired_certificate_is_never_handed_out() {
    let mut cluster = Cluster::start("east.trellis.local", short_policy(Duration::from_secs(2)), allow_all()).await;
    let node = cluster.join_node("node-1", fast_retries()).await;
    let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
    node.ensure(&web);
    let held = node.wait_for(&web, Duration::from_secs(5)).await.expect("SVID");
    cluster.stop().await;
    let resolver = node.resolver(&web);
    assert!(resolver.resolve(&[], &[]).is_some(), "valid while the CA is down");

    let wait = held
        .svid
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(1200)).await;
    assert!(node.current(&web).is_none(), "expired SVIDs are not returned");
    assert!(resolver.resolve(&[], &[]).is_none(), "nor presented in handshakes");
    assert!(!node.identities().contains(&web));
}
