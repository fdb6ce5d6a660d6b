//! The federation sync (`trellis_federation::sync`) against a real etcd (Debian's etcd-server,
//! TLS, client certificates, etcd's users and roles), as two clusters, east and west, run it:
//! each sees the other, writes only its own keys, refuses garbage by key name, keeps its last
//! view while etcd is down (reported stale) and resyncs, re-lists after a compaction, and drops
//! a cluster whose lease expired.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use trellis_e2e::etcd::Etcd;
use trellis_federation::records::{
    ClusterRecord, EndpointRecord, EndpointsRecord, Gateway, ServicePort, ServiceRecord,
};
use trellis_federation::sync::{self, Ended, EtcdConfig, Publication, SyncState, LEASE_TTL};
use trellis_federation::view::View;
use trellis_federation::{access, keys};
use trellis_identity::{CertificateAuthority, IssuancePolicy, TrustBundle, TrustDomain};

fn config(etcd: &Etcd, user: &str) -> EtcdConfig {
    etcd.config(user)
}

/// etcd with root, the operator and the two members provisioned, and auth on.
async fn provisioned() -> Etcd {
    let etcd = Etcd::start();
    etcd.provision(&[("east", "east.trellis.local"), ("west", "west.trellis.local")])
        .await;
    etcd
}

fn bundle_json(dir: &std::path::Path, td: &str) -> (String, TrustBundle) {
    let td = TrustDomain::new(td).expect("trust domain");
    let ca = CertificateAuthority::load_or_create(&dir.join(td.as_str()), &td, IssuancePolicy::default()).expect("CA");
    let bundle = TrustBundle::new(td, ca.roots().to_vec());
    (bundle.to_json(), bundle)
}

fn publication(dir: &std::path::Path, cluster: &str, third_octet: u8) -> Publication {
    let td = format!("{cluster}.trellis.local");
    let (bundle_json, _) = bundle_json(dir, &td);
    let key = ("demo".to_string(), "hello".to_string());
    Publication {
        cluster: ClusterRecord {
            name: cluster.into(),
            trust_domain: td.clone(),
            network: cluster.into(),
            region: "eu-1".into(),
            zone: format!("eu-1{}", (b'a' + third_octet) as char),
            gateway: Some(Gateway {
                address: format!("10.{third_octet}.0.20").parse().expect("ip"),
                hbone_port: 15008,
                quic_port: None,
                node: trellis_federation::records::GATEWAY_NODE.into(),
            }),
        },
        bundle_json,
        services: BTreeMap::from([(
            key.clone(),
            ServiceRecord {
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: 8080,
                    app_protocol: String::new(),
                }],
                hostnames: vec![],
            },
        )]),
        endpoints: BTreeMap::from([(
            key,
            EndpointsRecord {
                endpoints: vec![EndpointRecord {
                    address: format!("10.{third_octet}.1.10").parse().expect("ip"),
                    identity: format!("spiffe://{td}/ns/demo/sa/hello"),
                    node: "node-1".into(),
                    node_address: format!("10.{third_octet}.0.11").parse().expect("ip"),
                    zone: String::new(),
                }],
                behind_gateway: Vec::new(),
            },
        )]),
    }
}

/// Waits (up to `timeout`) until `pred` holds on the sync's state; panics with the last state.
async fn until(
    state: &mut watch::Receiver<SyncState>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&SyncState) -> bool,
) -> SyncState {
    let wait = async {
        loop {
            if pred(&state.borrow_and_update()) {
                return;
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    };
    if tokio::time::timeout(timeout, wait).await.is_err() || !pred(&state.borrow()) {
        panic!(
            "timed out after {timeout:?} waiting until {what}; last state: {:#?}",
            *state.borrow()
        );
    }
    state.borrow().clone()
}

fn members(s: &SyncState) -> Vec<String> {
    s.federation.members.keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_see_each_other_and_each_writes_only_its_own_keys() {
    let etcd = provisioned().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (east_pub, east_rx) = watch::channel(Some(publication(dir.path(), "east", 1)));
    let (west_pub, west_rx) = watch::channel(Some(publication(dir.path(), "west", 2)));
    let (mut east, _east_task) = sync::spawn(config(&etcd, &access::cluster_user("east")), east_rx);
    let (_west, west_task) = sync::spawn(config(&etcd, &access::cluster_user("west")), west_rx);

    let s = until(&mut east, "east sees both members", Duration::from_secs(20), |s| {
        s.published
            && members(s) == ["east", "west"]
            && s.federation.members["west"].bundle.is_some()
            && !s.federation.members["west"].endpoints.is_empty()
    })
    .await;
    let west = &s.federation.members["west"];
    let (_, west_bundle) = bundle_json(dir.path(), "west.trellis.local");
    assert_eq!(
        west.bundle.as_ref().map(|b| &b.x509_authorities),
        Some(&west_bundle.x509_authorities)
    );
    assert_eq!(
        west.endpoints[&("demo".into(), "hello".into())].endpoints[0]
            .address
            .to_string(),
        "10.2.1.10"
    );
    assert!(s.published && s.synced && s.stale_since.is_none(), "{s:#?}");
    assert!(s.federation.problems.is_empty(), "{:?}", s.federation.problems);

    // East's credentials cannot write west's keys, nor traffic; the operator's can.
    let mut as_east = sync::connect(&config(&etcd, &access::cluster_user("east")))
        .await
        .expect("client");
    for key in [
        keys::cluster("west"),
        keys::bundle("west.trellis.local"),
        keys::endpoints("west", "demo", "hello"),
        keys::traffic("demo", "hello"),
    ] {
        let e = as_east
            .put(key.as_str(), "{}", None)
            .await
            .expect_err("east writing another's key");
        assert!(e.to_string().contains("permission denied"), "{key}: {e}");
    }
    let mut operator = sync::connect(&config(&etcd, access::OPERATOR_USER))
        .await
        .expect("client");
    operator
        .put(
            keys::traffic("demo", "hello"),
            r#"{"weights":{"east":90,"west":10}}"#,
            None,
        )
        .await
        .expect("the operator writes traffic");
    let s = until(&mut east, "east sees the weights", Duration::from_secs(10), |s| {
        !s.federation.traffic.is_empty()
    })
    .await;
    assert_eq!(
        s.federation.traffic[&("demo".into(), "hello".into())].weights["east"],
        90
    );

    // West crashes (no revoke): its lease expires and east drops it and its endpoints.
    west_task.abort();
    let _ = west_task.await;
    drop(west_pub);
    let started = tokio::time::Instant::now();
    let s = until(&mut east, "east drops west", LEASE_TTL * 3, |s| members(s) == ["east"]).await;
    let took = started.elapsed();
    assert!(
        took >= LEASE_TTL / 2,
        "dropped after {took:?}: only the lease's expiry may drop it"
    );
    assert!(
        s.federation
            .problems
            .iter()
            .any(|(k, w)| k == &keys::service("west", "demo", "hello") && w.contains("not a member")),
        "west's service (not leased) is no longer served: {:?}",
        s.federation.problems
    );
    // Its bundle key outlives the lease: a member that lost etcd for a while stays trusted
    // (its open connections live on); only leaving (the bundle deleted) withdraws trust.
    let west_td = TrustDomain::new("west.trellis.local").expect("td");
    assert!(
        s.federation.trusted.contains_key(&west_td),
        "{:?}",
        s.federation.trusted.keys()
    );
    drop(east_pub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_refuses_an_etcd_anyone_may_write_or_roots_credentials() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Authentication off: any certificate may write anything.
    let open = Etcd::start();
    let (_p1, rx1) = watch::channel(Some(publication(dir.path(), "east", 1)));
    let (mut s1, _t1) = sync::spawn(config(&open, &access::cluster_user("east")), rx1);
    let s = until(&mut s1, "the open etcd refused", Duration::from_secs(20), |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("authentication is off"))
    })
    .await;
    assert!(!s.synced && !s.published, "{s:#?}");
    // Authentication on, but trellisd given root's certificate.
    let guarded = provisioned().await;
    let (_p2, rx2) = watch::channel(Some(publication(dir.path(), "east", 1)));
    let (mut s2, _t2) = sync::spawn(config(&guarded, "root"), rx2);
    until(&mut s2, "root's credentials refused", Duration::from_secs(20), |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("root's certificate"))
    })
    .await;
    let mut root = sync::connect(&config(&guarded, "root")).await.expect("root");
    let written = root
        .get(keys::PREFIX, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("get");
    assert!(
        written
            .kvs()
            .iter()
            .all(|kv| kv.key().starts_with(b"/trellis/v1/grants/")),
        "nothing but root's grants was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_etcd_is_refused_by_key_and_the_last_good_state_stays() {
    let etcd = provisioned().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (_east_pub, east_rx) = watch::channel(Some(publication(dir.path(), "east", 1)));
    // Root plays a cluster gone bad, writing what its role would let it write, and more.
    let mut root = sync::connect(&config(&etcd, "root")).await.expect("root client");
    let west = publication(dir.path(), "west", 2);
    for (key, owned) in west.keys() {
        root.put(key, owned.value, None).await.expect("west's keys");
    }
    let (mut east, _task) = sync::spawn(config(&etcd, &access::cluster_user("east")), east_rx);
    until(&mut east, "east sees west", Duration::from_secs(20), |s| {
        members(s) == ["east", "west"]
    })
    .await;

    let garbage = [
        (keys::cluster("west"), "{not json".to_string()),
        ("/trellis/v1/secrets/west".to_string(), "{}".to_string()),
        (keys::bundle("nobody.trellis.local"), bundle_json(dir.path(), "nobody.trellis.local").0),
        (
            keys::endpoints("west", "demo", "forged"),
            r#"{"endpoints":[{"address":"10.2.1.66","identity":"spiffe://east.trellis.local/ns/demo/sa/hello","node":"node-1","nodeAddress":"10.2.0.11"}]}"#
                .to_string(),
        ),
        (keys::service("west", "demo", "huge"), format!("{{\"ports\":[], \"pad\":\"{}\"}}", "x".repeat(1 << 20))),
    ];
    for (key, value) in &garbage {
        root.put(key.as_str(), value.as_str(), None).await.expect("garbage in");
    }
    let s = until(&mut east, "every bad key is named", Duration::from_secs(10), |s| {
        garbage
            .iter()
            .all(|(k, _)| s.federation.problems.iter().any(|(p, _)| p == k))
    })
    .await;
    let why = |key: &str| {
        s.federation
            .problems
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, w)| w.clone())
            .unwrap_or_default()
    };
    assert!(
        why(&keys::cluster("west")).contains("keeping its last good value"),
        "{:?}",
        s.federation.problems
    );
    assert!(why("/trellis/v1/secrets/west").contains("not a key of the layout"));
    assert!(why(&keys::bundle("nobody.trellis.local")).contains("which no cluster was granted"));
    assert!(why(&keys::endpoints("west", "demo", "forged")).contains("outside the cluster's trust domain"));
    assert!(why(&keys::service("west", "demo", "huge")).contains("the limit is 1048576"));
    assert_eq!(members(&s), ["east", "west"], "west's last good record stays");
    assert!(!s.federation.members["west"]
        .endpoints
        .contains_key(&("demo".into(), "forged".into())));
    assert!(s.federation.members["west"].bundle.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_keeps_the_last_view_reported_stale_and_it_resyncs_when_back() {
    let mut etcd = provisioned().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (_east_pub, east_rx) = watch::channel(Some(publication(dir.path(), "east", 1)));
    let (west_pub, west_rx) = watch::channel(Some(publication(dir.path(), "west", 2)));
    let (mut east, _t1) = sync::spawn(config(&etcd, &access::cluster_user("east")), east_rx);
    let (_west, _t2) = sync::spawn(config(&etcd, &access::cluster_user("west")), west_rx);
    until(&mut east, "synced", Duration::from_secs(20), |s| {
        members(s) == ["east", "west"]
    })
    .await;

    etcd.stop();
    let s = until(&mut east, "east reports stale", Duration::from_secs(20), |s| {
        s.stale_since.is_some()
    })
    .await;
    assert_eq!(members(&s), ["east", "west"], "the last view stays while etcd is down");
    assert!(s.last_error.is_some());

    etcd.resume();
    let s = until(&mut east, "east resyncs", Duration::from_secs(30), |s| {
        s.stale_since.is_none() && s.relists >= 1
    })
    .await;
    assert_eq!(members(&s), ["east", "west"]);
    // West's change after the outage reaches east.
    let mut changed = publication(dir.path(), "west", 2);
    changed.services.insert(
        ("demo".into(), "new".into()),
        changed.services[&("demo".into(), "hello".into())].clone(),
    );
    west_pub.send_replace(Some(changed));
    until(&mut east, "west's new service", Duration::from_secs(20), |s| {
        s.federation
            .members
            .get("west")
            .is_some_and(|m| m.services.contains_key(&("demo".into(), "new".into())))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_behind_a_compaction_is_told_to_relist_and_the_list_loses_no_event() {
    let etcd = Etcd::start();
    let mut root = sync::connect(&config(&etcd, "root")).await.expect("root client");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut view = View::default();
    let from = sync::list(&mut root, &mut view).await.expect("list") + 1;
    // Events the watch would have to replay, then a compaction past them.
    root.put(keys::grant("west"), r#"{"trustDomain":"west.trellis.local"}"#, None)
        .await
        .expect("west's grant");
    for (key, owned) in publication(dir.path(), "west", 2).keys() {
        root.put(key, owned.value, None).await.expect("put");
    }
    let head = root
        .get("x", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    root.compact(head, None).await.expect("compact");
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        sync::follow(&mut root, &mut view, from, &|_| {}),
    )
    .await
    .expect("the watch answers at once");
    assert_eq!(ended, Ok(Ended::Compacted(head)));
    assert!(
        view.federation().members.is_empty(),
        "nothing replayed from a compacted history"
    );
    sync::list(&mut root, &mut view).await.expect("re-list");
    assert_eq!(
        view.federation().members.keys().collect::<Vec<_>>(),
        ["west"],
        "the re-list has every event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_larger_than_one_grpc_message_is_read_whole_in_pages() {
    let etcd = Etcd::start();
    let mut root = sync::connect(&config(&etcd, "root")).await.expect("root client");
    let dir = tempfile::tempdir().expect("temp dir");
    root.put(keys::grant("west"), r#"{"trustDomain":"west.trellis.local"}"#, None)
        .await
        .expect("west's grant");
    for (key, owned) in publication(dir.path(), "west", 2).keys() {
        root.put(key, owned.value, None).await.expect("put");
    }
    // Ten services of 5,000 endpoints each: about 6 MB, past gRPC's 4 MiB message limit.
    let big = |n: u32| EndpointsRecord {
        endpoints: (0..5_000u32)
            .map(|i| EndpointRecord {
                address: std::net::Ipv4Addr::from(0x0a02_0000 + n * 8192 + i).into(),
                identity: "spiffe://west.trellis.local/ns/demo/sa/hello".into(),
                node: format!("node-{}", i % 50),
                node_address: std::net::Ipv4Addr::from(0x0a02_0000 + i % 50).into(),
                zone: String::new(),
            })
            .collect(),
        behind_gateway: Vec::new(),
    };
    let mut total = 0;
    for n in 0..10 {
        let value = trellis_federation::records::encode(&big(n));
        total += value.len();
        root.put(keys::endpoints("west", "demo", &format!("svc-{n}")), value, None)
            .await
            .expect("a big endpoints value");
    }
    assert!(total > 4 * 1024 * 1024, "{total} bytes");
    let mut view = View::default();
    sync::list(&mut root, &mut view).await.expect("a paged list");
    let members = view.federation().members;
    assert_eq!(
        members["west"].endpoints.len(),
        11,
        "every value listed: {:?}",
        view.problems()
    );
    assert!(
        members["west"]
            .endpoints
            .values()
            .filter(|e| e.endpoints.len() == 5_000)
            .count()
            == 10,
        "and whole"
    );
}
