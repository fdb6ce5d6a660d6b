//! The certificate manager: rotation at half life, backoff while the CA is down, and no
//! expired certificate ever handed out.
//!
//! The timing tests run on tokio's paused clock (`start_paused`): a `sleep` there costs no real
//! time, the clock jumps to each timer in turn, and every task due before the sleep ends has
//! run by then. They use a real CA with real certificates, called in-process
//! ([`InProcessCa`]): with sockets, the paused clock would also jump ahead whenever the runtime
//! waited on the network. The last two tests keep the real TLS path (a node joined over the
//! network, renewing with its own node SVID) on the real clock, and wait for events, not for
//! fixed times.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use rustls::client::ResolvesClientCert;
use trellis_identity::renewal::{retry_delay, JITTER_FRACTION};
use trellis_identity::{CertManager, ManagerConfig, SpiffeId};

const HOUR: Duration = Duration::from_secs(3600);

fn web() -> SpiffeId {
    id("spiffe://east.trellis.local/ns/shop/sa/web")
}

/// Where the renewal of the certificate issued at `call` falls, measured from that call on
/// tokio's clock, for a jitter of -1 (earliest) and +1 (latest).
fn renewal_band(held: &trellis_identity::HeldSvid, call: &CaCall) -> (Duration, Duration) {
    let (not_before, not_after) = (held.svid.not_before, held.svid.not_after);
    let lifetime = not_after.duration_since(not_before).unwrap();
    let at = |fraction: f64| {
        (not_before + lifetime.mul_f64(fraction))
            .duration_since(call.wall)
            .unwrap()
    };
    (at(0.5 - JITTER_FRACTION), at(0.5 + JITTER_FRACTION))
}

#[tokio::test(start_paused = true)]
async fn svids_rotate_at_half_life_within_the_jitter_band() {
    let ca = InProcessCa::new("east.trellis.local");
    let manager = CertManager::new(ca.clone(), fast_retries());
    let ids: Vec<SpiffeId> = (0..8)
        .map(|n| id(&format!("spiffe://east.trellis.local/ns/shop/sa/app-{n}")))
        .collect();
    for id in &ids {
        manager.ensure(id);
    }
    let mut first = Vec::new();
    for id in &ids {
        first.push(manager.wait_for(id, Duration::from_secs(1)).await.expect("first SVID"));
    }
    let resolver = manager.resolver(&ids[0]);
    let start = tokio::time::Instant::now();
    let bands: Vec<_> = ids
        .iter()
        .zip(&first)
        .map(|(id, held)| renewal_band(held, &ca.calls_for(id)[0]))
        .collect();
    let earliest = bands.iter().map(|b| b.0).min().unwrap();
    let latest = bands.iter().map(|b| b.1).max().unwrap();
    // A 24 h certificate renews at 12 h, ±72 min (less the CA's one-minute backdating).
    assert!(earliest > 10 * HOUR && latest < 14 * HOUR, "{earliest:?}..{latest:?}");

    // Just before the band, no CA call and the first certificates are still served.
    tokio::time::sleep_until(start + earliest - Duration::from_secs(1)).await;
    assert_eq!(ca.calls().len(), ids.len(), "no renewal before the jitter band");
    for (id, held) in ids.iter().zip(&first) {
        assert_eq!(manager.current(id).unwrap().svid.chain[0], held.svid.chain[0]);
    }

    // Just after it, every identity was renewed exactly once, inside its own band.
    tokio::time::sleep_until(start + latest + Duration::from_secs(1)).await;
    assert_eq!(ca.calls().len(), 2 * ids.len(), "one renewal each");
    let mut renewed_after = Vec::new();
    for ((id, held), band) in ids.iter().zip(&first).zip(&bands) {
        let calls = ca.calls_for(id);
        let after = calls[1].at - calls[0].at;
        let slack = Duration::from_secs(1); // wall-clock milliseconds that passed meanwhile
        assert!(
            band.0 - slack <= after && after <= band.1 + slack,
            "{id} renewed after {after:?}, outside {band:?}"
        );
        renewed_after.push(after);
        let now = manager.current(id).expect("renewed SVID");
        // (Its validity is stamped from the wall clock, which barely moved: compare the keys.)
        assert_ne!(now.svid.chain[0], held.svid.chain[0], "{id} has a new certificate");
        assert_ne!(
            now.svid.key.secret_pkcs8_der(),
            held.svid.key.secret_pkcs8_der(),
            "and a new key"
        );
    }
    renewed_after.sort();
    renewed_after.dedup();
    assert!(
        renewed_after.len() > 1,
        "jitter spreads the renewals: {renewed_after:?}"
    );
    let presented = resolver.resolve(&[], &[]).expect("a certificate for the handshake");
    assert_eq!(
        presented.end_entity_cert().unwrap(),
        &manager.current(&ids[0]).unwrap().svid.chain[0]
    );
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_while_the_ca_fails_and_start_afresh_after_a_success() {
    let ca = InProcessCa::new("east.trellis.local");
    let config = ManagerConfig {
        ttl: Duration::from_secs(600),
        ..fast_retries()
    };
    let manager = CertManager::new(ca.clone(), config);
    ca.set_up(false);
    manager.ensure(&web());

    // The gap after the n-th consecutive failure is the n-th backoff step, jitter included.
    let assert_backoff = |calls: &[CaCall]| {
        for (n, pair) in calls.windows(2).enumerate() {
            let gap = pair[1].at - pair[0].at;
            let failures = n as u32 + 1;
            let shortest = retry_delay(failures, config.retry_min, config.retry_max, 0.0);
            let longest = retry_delay(failures, config.retry_min, config.retry_max, 1.0);
            // tokio's timers tick in whole milliseconds.
            assert!(
                shortest <= gap && gap <= longest + Duration::from_millis(1),
                "gap {n}: {gap:?} not in {shortest:?}..={longest:?}"
            );
        }
    };
    let calls = ca.wait_for_calls(10).await;
    assert!(calls.iter().all(|c| !c.answered));
    assert_backoff(&calls);
    assert_eq!(
        calls[1].at - calls[0].at,
        config.retry_min,
        "the first retry comes soon"
    );
    assert!(
        calls[9].at - calls[8].at >= config.retry_max / 2,
        "later ones are spaced out to the cap"
    );
    assert!(manager.current(&web()).is_none(), "no CA, no SVID");

    // The CA comes back: the next retry gets the SVID.
    ca.set_up(true);
    let held = manager
        .wait_for(&web(), config.retry_max * 2)
        .await
        .expect("an SVID once the CA answers");
    assert_eq!(held.svid.id, web());
    let answered = ca.calls();
    assert_eq!(answered.len(), 11, "one more call, and it succeeded");
    assert!(answered[10].answered);

    // At half life the CA is down again: the backoff starts from the shortest step again.
    ca.set_up(false);
    let calls = ca.wait_for_calls(15).await;
    let renewal = &calls[11..];
    let (earliest, latest) = renewal_band(&held, &answered[10]);
    let slack = Duration::from_secs(1);
    let after = renewal[0].at - answered[10].at;
    assert!(
        earliest - slack <= after && after <= latest + slack,
        "renewal at half life: {after:?}"
    );
    assert_backoff(renewal);
    assert_eq!(renewal[1].at - renewal[0].at, config.retry_min);
    assert_eq!(
        manager.current(&web()).unwrap().svid.chain[0],
        held.svid.chain[0],
        "the unexpired SVID is served while renewal fails"
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_certificate_is_never_handed_out() {
    let ca = InProcessCa::new("east.trellis.local");
    let config = ManagerConfig {
        ttl: Duration::from_secs(600),
        ..ManagerConfig::default()
    };
    let manager = CertManager::new(ca.clone(), config);
    manager.ensure(&web());
    let held = manager.wait_for(&web(), Duration::from_secs(1)).await.expect("SVID");
    ca.set_up(false);
    let resolver = manager.resolver(&web());
    let mut changes = manager.changes();
    changes.borrow_and_update();

    let left = held.svid.not_after.duration_since(SystemTime::now()).unwrap();
    tokio::time::sleep(left - Duration::from_secs(1)).await;
    assert!(ca.calls().len() > 3, "renewal was tried and failed");
    assert!(resolver.resolve(&[], &[]).is_some(), "valid while the CA is down");
    assert!(manager.identities().contains(&web()));
    assert!(!changes.has_changed().unwrap());

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(manager.current(&web()).is_none(), "expired SVIDs are not returned");
    assert!(resolver.resolve(&[], &[]).is_none(), "nor presented in handshakes");
    assert!(!manager.identities().contains(&web()));
    assert!(
        changes.has_changed().unwrap(),
        "watchers (Workload API streams) hear of it"
    );

    ca.set_up(true);
    let fresh = manager
        .wait_for(&web(), config.retry_max * 2)
        .await
        .expect("a new SVID once the CA is back");
    assert_ne!(fresh.svid.chain[0], held.svid.chain[0]);
}

#[tokio::test(start_paused = true)]
async fn an_svid_stored_before_ensure_is_renewed_not_replaced() {
    let ca = InProcessCa::new("east.trellis.local");
    let manager = CertManager::new(ca.clone(), fast_retries());
    // As a node's SVID from Join: stored first, then kept renewed.
    manager.insert(issue(&ca.ca, &web()));
    manager.ensure(&web());
    tokio::time::sleep(10 * HOUR).await;
    assert!(ca.calls().is_empty(), "nothing to do before half life");
    tokio::time::sleep(4 * HOUR).await;
    assert_eq!(ca.calls().len(), 1, "renewed once, at half life");
}

#[tokio::test]
async fn the_node_svid_and_workload_svids_renew_over_mtls() {
    // Real TLS on the real clock: 2 s certificates renew about every second.
    let cluster = Cluster::start("east.trellis.local", short_policy(Duration::from_secs(2)), allow_all()).await;
    let node = cluster.join_node("node-1", fast_retries()).await;
    node.ensure(&web());
    let first = node.wait_for(&web(), Duration::from_secs(5)).await.expect("first SVID");
    let node_id = SpiffeId::node(&cluster.td, "node-1").unwrap();
    let first_node = node.current(&node_id).expect("node SVID");

    let renewed = |id: &SpiffeId, first: &Arc<trellis_identity::HeldSvid>| {
        node.current(id)
            .is_some_and(|now| now.svid.not_after > first.svid.not_after)
    };
    let mut changes = node.changes();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !(renewed(&web(), &first) && renewed(&node_id, &first_node)) {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("both renewed, the node SVID authenticating its own renewal");
    assert_ne!(node.current(&web()).unwrap().svid.chain[0], first.svid.chain[0]);
}

#[tokio::test]
async fn the_manager_retries_while_the_ca_is_down_and_recovers() {
    // Real TLS on the real clock: the CA client reconnects once the server is back.
    let mut cluster = Cluster::start("east.trellis.local", Default::default(), allow_all()).await;
    let node = cluster.join_node("node-1", fast_retries()).await;
    cluster.stop().await;
    node.ensure(&web());
    assert!(
        node.wait_for(&web(), Duration::from_millis(300)).await.is_none(),
        "no CA, no SVID"
    );
    cluster.restart().await;
    let held = node
        .wait_for(&web(), Duration::from_secs(5))
        .await
        .expect("SVID once the CA is back");
    assert_eq!(held.svid.id, web());
}
