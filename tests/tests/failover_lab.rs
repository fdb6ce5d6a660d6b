//! Failover across clusters in the lab, as a caller sees it (DESIGN.md "Load balancing and
//! failover"; issue 14). A client opens new connections to the global service `hello`; each
//! demo server answers with its cluster as its version (`hello from hello-w1 (west) ...`), so
//! every connection says which cluster served it:
//! - every local endpoint killed: no new connection fails, west serves them, and when the
//!   endpoints return traffic comes back to east and stays there;
//! - a local node blackholed: connections still succeed, and once it is ejected they no longer
//!   wait for the connect timeout;
//! - a whole cluster lost: the others drop it after its lease expires, and no new connection
//!   fails meanwhile;
//! - etcd down: the data plane still fails over on its own;
//! - weights: 90/10 over 1,000 connections within ±3 points, weight 0 gets none, `--clear`
//!   returns to locality.
//!
//! "New connection" leaves out the few that were open at the instant of the fault: a request
//! that had already reached a workload that then died cannot be saved by any proxy. Every
//! other connection must succeed.
//!
//! The tests share this machine's two cores with their labs, so they run one at a time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use trellis_e2e::lab::load::{calls, calls_for, Load, Outcome};
use trellis_e2e::lab::{blackhole, endpoint_clusters, log_field, service_weights, Lab};
use trellis_e2e::wait_until;
use trellis_federation::sync::LEASE_TTL;

/// ztunnel's per-attempt connect timeout, passed explicitly to every ztunnel of these labs.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// New connections a second while a fault happens.
const RATE: u32 = 50;

/// east (two nodes; the client on node-1) and west (one node, `hello-w1`), one global service
/// `hello` in both; east's servers are added by [`two_clusters`].
const TWO_CLUSTERS: &str = r#"
clusters:
  - {name: east, nodes: 2, ztunnelArgs: [--connect-timeout-ms, "500"]}
  - {name: west, nodes: 1, ztunnelArgs: [--connect-timeout-ms, "500"]}
namespaces:
  - {name: demo, ambient: true}
services:
  - {name: hello, namespace: demo, cluster: east, port: 80, targetPort: 8080, selector: {app: hello}, global: true}
  - {name: hello, namespace: demo, cluster: west, port: 80, targetPort: 8080, selector: {app: hello}, global: true}
pods:
  - {name: client, namespace: demo, cluster: east, node: node-1, serviceAccount: client}
  - {name: hello-w1, namespace: demo, cluster: west, node: node-1, serviceAccount: hello, labels: {app: hello}, run: {server: {version: west, port: 8080}}}
"#;

/// Three clusters, the client in west, which has no `hello` endpoint of its own: east and north
/// serve it, both "another cluster" from west, so west's client round-robins over them and
/// every other new connection prefers east. Losing east must cost none of them.
const THREE_CLUSTERS: &str = r#"
clusters:
  - {name: east, nodes: 1, ztunnelArgs: [--connect-timeout-ms, "500"]}
  - {name: west, nodes: 1, ztunnelArgs: [--connect-timeout-ms, "500"]}
  - {name: north, nodes: 1, ztunnelArgs: [--connect-timeout-ms, "500"]}
namespaces:
  - {name: demo, ambient: true}
services:
  - {name: hello, namespace: demo, cluster: east, port: 80, targetPort: 8080, selector: {app: hello}, global: true}
  - {name: hello, namespace: demo, cluster: west, port: 80, targetPort: 8080, selector: {app: hello}, global: true}
  - {name: hello, namespace: demo, cluster: north, port: 80, targetPort: 8080, selector: {app: hello}, global: true}
pods:
  - {name: hello-e1, namespace: demo, cluster: east, node: node-1, serviceAccount: hello, labels: {app: hello}, run: {server: {version: east, port: 8080}}}
  - {name: client, namespace: demo, cluster: west, node: node-1, serviceAccount: client}
  - {name: hello-n1, namespace: demo, cluster: north, node: node-1, serviceAccount: hello, labels: {app: hello}, run: {server: {version: north, port: 8080}}}
"#;

/// [`TWO_CLUSTERS`] with east's `hello` servers: `(pod, node)`.
fn two_clusters(east_servers: &[(&str, &str)]) -> String {
    let mut topology = TWO_CLUSTERS.to_string();
    for (pod, node) in east_servers {
        topology += &format!(
            "  - {{name: {pod}, namespace: demo, cluster: east, node: {node}, serviceAccount: hello, labels: {{app: hello}}, run: {{server: {{version: east, port: 8080}}}}}}\n"
        );
    }
    topology
}

/// The VIP of `hello` in the cluster at 1-based position `c` (the first service of each).
fn hello_vip(c: u8) -> SocketAddr {
    SocketAddr::from(([10, 100 + c, 0, 10], 80))
}

static ONE_LAB: Mutex<()> = Mutex::new(());

fn one_lab_at_a_time() -> MutexGuard<'static, ()> {
    ONE_LAB.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits (up to `timeout`) until ten connections in a row from `netns` are served by `version`.
fn wait_served_by(netns: &str, to: SocketAddr, version: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = calls(netns, to, 10, 1);
        if last.iter().all(|o| o.version() == Some(version)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{netns} is still not served by {version} after {timeout:?}: {:?}",
            last.iter().map(|o| &o.result).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `n` connections opened at or after `since` have ended.
fn wait_ended(load: &Load, since: Instant, n: usize, timeout: Duration) {
    wait_until(&format!("{n} more connections of the load have ended"), timeout, || {
        load.ended_since(since) >= n
    });
}

/// The connections that failed, but for those open while the fault happened (`from`..`to`).
fn failed_new(outcomes: &[Outcome], from: Instant, to: Instant) -> Vec<String> {
    outcomes
        .iter()
        .filter(|o| !o.overlaps(from, to))
        .filter_map(|o| o.result.as_ref().err())
        .map(|e| e.trim().to_string())
        .collect()
}

/// How many of `outcomes` each version served (`error` for failures).
fn served(outcomes: &[&Outcome]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for o in outcomes {
        *by.entry(o.version().unwrap_or("error").to_string()).or_insert(0) += 1;
    }
    by
}

/// `trellis federation status` as trellisd of `cluster` reports it.
fn federation_status(lab: &Lab, cluster: &str) -> String {
    let out = lab.exec(&lab.control_ns(cluster), "trellis", &["federation", "status"]);
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Kills every `hello` server of east, as `(pod, node)` in [`two_clusters`]; returns when all are
/// dead.
fn kill_east_servers(lab: &Lab, east_servers: &[(&str, &str)]) {
    for (pod, _) in east_servers {
        lab.kill_all_in(&lab.pod_ns("east", "demo", pod));
    }
}

#[test]
fn killing_every_local_endpoint_moves_new_connections_to_west_with_none_failed_and_they_return() {
    let _one = one_lab_at_a_time();
    // One endpoint on the client's own node, one on the other: every local one dies.
    let servers = [("hello-e1", "node-1"), ("hello-e2", "node-2")];
    let lab = Lab::up("fokill", &two_clusters(&servers));
    let client = lab.pod_ns("east", "demo", "client");
    let hello = hello_vip(1);
    wait_served_by(&client, hello, "east", Duration::from_secs(30));

    let load = Load::start(&client, hello, RATE);
    wait_ended(&load, Instant::now(), 25, Duration::from_secs(10));
    let fault = Instant::now();
    kill_east_servers(&lab, &servers);
    let killed = Instant::now();
    wait_ended(&load, killed, 100, Duration::from_secs(20));

    let so_far = load.outcomes();
    let failed = failed_new(&so_far, fault, killed);
    assert!(
        failed.is_empty(),
        "new connections failed while west could serve them: {failed:?}"
    );
    let before: Vec<&Outcome> = so_far.iter().filter(|o| o.end < fault).collect();
    assert!(
        before.iter().all(|o| o.version() == Some("east")),
        "before the kill east served: {:?}",
        served(&before)
    );
    let after: Vec<&Outcome> = so_far.iter().filter(|o| o.start >= killed).collect();
    assert!(
        after.iter().all(|o| o.version() == Some("west")),
        "after the kill: {:?}",
        served(&after)
    );
    // The client's node says so: the connection that found east dead went on to west in the same
    // connection, and the metrics count connections to west.
    let log = lab.log("ztunnel-east-node-1");
    assert!(
        log.lines().any(|l| {
            log_field(l, "dst_cluster") == Some("west")
                && log_field(l, "locality") == Some("remote")
                && log_field(l, "attempts")
                    .and_then(|a| a.parse::<u32>().ok())
                    .is_some_and(|a| a >= 2)
        }),
        "no access-log line of east's node-1 shows a connection retried on west (dst_cluster=west locality=remote attempts>=2)"
    );
    let to_west = lab.metric(
        "east",
        "node-1",
        "trellis_tcp_connections_opened_total",
        &[("reporter", "source"), ("destination_cluster", "west")],
    );
    assert!(
        to_west > 0.0,
        "east's node-1 counts no connection to destination_cluster west"
    );

    // The endpoints return: once a probe finds each one back, new connections are east's again,
    // and stay east's (no flapping), with no failure on the way.
    lab.up_again();
    let back = Instant::now();
    wait_until(
        "new connections are served by east again",
        Duration::from_secs(45),
        || {
            let recent: Vec<Outcome> = load.outcomes().into_iter().filter(|o| o.start >= back).collect();
            recent.len() >= 50 && recent[recent.len() - 50..].iter().all(|o| o.version() == Some("east"))
        },
    );
    let all = load.stop();
    let failed = failed_new(&all, fault, killed);
    assert!(
        failed.is_empty(),
        "connections failed as the endpoints returned: {failed:?}"
    );
    let first_east = all
        .iter()
        .find(|o| o.start >= back && o.version() == Some("east"))
        .map(|o| o.end)
        .expect("a connection served by east after the restart");
    let later: Vec<&Outcome> = all.iter().filter(|o| o.start > first_east).collect();
    assert!(
        later.iter().all(|o| o.version() == Some("east")),
        "traffic went back to west after east served again: {:?}",
        served(&later)
    );
    eprintln!(
        "east back {:?} after the restart",
        first_east.saturating_duration_since(back)
    );
}

#[test]
fn a_blackholed_local_node_costs_the_connect_timeout_once_then_connections_skip_it() {
    let _one = one_lab_at_a_time();
    // East's only server runs on node-2; the client sits on node-1.
    let lab = Lab::up("fohole", &two_clusters(&[("hello-e2", "node-2")]));
    let client = lab.pod_ns("east", "demo", "client");
    let hello = hello_vip(1);
    wait_served_by(&client, hello, "east", Duration::from_secs(30));

    // node-2 drops every packet from now on: no reset, no answer.
    blackhole(&lab.node_ns("east", "node-2")).unwrap_or_else(|e| panic!("{e}"));
    let window = Duration::from_secs(6);
    let timed = calls_for(&client, hello, window);
    let start = timed.first().map(|o| o.start).expect("calls were made");

    let failed: Vec<&String> = timed.iter().filter_map(|o| o.result.as_ref().err()).collect();
    assert!(failed.is_empty(), "calls failed with node-2 blackholed: {failed:?}");
    let all: Vec<&Outcome> = timed.iter().collect();
    assert!(
        all.iter().all(|o| o.version() == Some("west")),
        "with east's only node blackholed: {:?}",
        served(&all)
    );
    // The first connection waits for the timeout; then node-2 is ejected and skipped. When an
    // ejection ends, one connection probes node-2 and waits again (backoff 1 s, 2 s, ...: about
    // two probes in this window), so a handful may be slow, not every one.
    let slow: Vec<(u128, u128)> = timed
        .iter()
        .filter(|o| o.took() >= CONNECT_TIMEOUT / 2)
        .map(|o| (o.start.duration_since(start).as_millis(), o.took().as_millis()))
        .collect();
    assert!(
        timed.len() >= 30,
        "only {} calls in {window:?}: connections keep waiting for node-2 (slow ones at ms, taking ms: {slow:?})",
        timed.len()
    );
    assert!(
        slow.len() <= 4,
        "{} of {} calls took at least {:?}, at (ms since the blackhole, ms taken): {slow:?}",
        slow.len(),
        timed.len(),
        CONNECT_TIMEOUT / 2
    );
    eprintln!(
        "{} calls in {window:?} with node-2 blackholed; slow ones (ms since, ms taken): {slow:?}",
        timed.len()
    );
}

#[test]
fn a_lost_cluster_is_dropped_after_its_lease_expires_and_no_new_connection_fails_meanwhile() {
    let _one = one_lab_at_a_time();
    let lab = Lab::up("folost", THREE_CLUSTERS);
    let client = lab.pod_ns("west", "demo", "client");
    let hello = hello_vip(2);
    wait_until(
        "west's client is served by both east and north",
        Duration::from_secs(30),
        || {
            let some = calls(&client, hello, 10, 1);
            some.iter().any(|o| o.version() == Some("east")) && some.iter().any(|o| o.version() == Some("north"))
        },
    );
    let has_east = |cluster: &str| {
        endpoint_clusters(&lab.config_dump(cluster, "node-1"), "demo", "hello").contains(&"east".to_string())
    };
    assert!(
        has_east("west") && has_east("north"),
        "west and north know east's endpoint"
    );

    let load = Load::start(&client, hello, RATE);
    wait_ended(&load, Instant::now(), 25, Duration::from_secs(10));
    // East is lost: its gateway, its node's ztunnel and its trellisd, which renews its lease.
    let fault = Instant::now();
    for netns in [
        lab.gateway_ns("east"),
        lab.node_ns("east", "node-1"),
        lab.control_ns("east"),
    ] {
        lab.kill_all_in(&netns);
    }
    let killed = Instant::now();
    wait_until(
        "west's node drops east's endpoints",
        LEASE_TTL + Duration::from_secs(10),
        || !has_east("west"),
    );
    let dropped = fault.elapsed();
    wait_until("north's node drops east's endpoints", Duration::from_secs(10), || {
        !has_east("north")
    });
    wait_ended(&load, Instant::now(), 25, Duration::from_secs(10));
    let all = load.stop();

    let failed = failed_new(&all, fault, killed);
    assert!(
        failed.is_empty(),
        "new connections failed while east was lost: {failed:?}"
    );
    let after: Vec<&Outcome> = all.iter().filter(|o| o.start >= killed).collect();
    assert!(
        after.iter().all(|o| o.version() == Some("north")),
        "after east was lost: {:?}",
        served(&after)
    );
    // The lease lapses at most LEASE_TTL after east's last renewal; then the watch and the push.
    assert!(
        dropped <= LEASE_TTL + Duration::from_secs(4),
        "west dropped east {dropped:?} after it was lost; the lease is {LEASE_TTL:?}"
    );
    eprintln!(
        "east dropped by west {dropped:?} after it was lost; {} new connections, none failed",
        after.len()
    );
}

#[test]
fn with_etcd_down_the_data_plane_still_fails_over_to_west_on_its_own() {
    let _one = one_lab_at_a_time();
    let servers = [("hello-e1", "node-1"), ("hello-e2", "node-2")];
    let lab = Lab::up("foetcd", &two_clusters(&servers));
    let client = lab.pod_ns("east", "demo", "client");
    let hello = hello_vip(1);
    wait_served_by(&client, hello, "east", Duration::from_secs(30));

    lab.kill_all_in(&lab.etcd_ns());
    wait_until("east reports the federation stale", Duration::from_secs(30), || {
        federation_status(&lab, "east").contains("stale")
    });
    assert!(
        endpoint_clusters(&lab.config_dump("east", "node-1"), "demo", "hello").contains(&"west".to_string()),
        "east's node still holds west's endpoint from the last state"
    );

    let load = Load::start(&client, hello, RATE);
    wait_ended(&load, Instant::now(), 25, Duration::from_secs(10));
    let fault = Instant::now();
    kill_east_servers(&lab, &servers);
    let killed = Instant::now();
    wait_ended(&load, killed, 100, Duration::from_secs(20));
    let all = load.stop();

    let failed = failed_new(&all, fault, killed);
    assert!(failed.is_empty(), "new connections failed with etcd down: {failed:?}");
    let after: Vec<&Outcome> = all.iter().filter(|o| o.start >= killed).collect();
    assert!(
        after.iter().all(|o| o.version() == Some("west")),
        "after the kill, with etcd down: {:?}",
        served(&after)
    );
}

/// Shifts `hello`'s traffic with `trellis traffic shift -n demo hello <how>` and waits until
/// the client's node applies `expect` (weights above 0; none: by locality).
fn shift(lab: &Lab, how: &[&str], expect: &[(&str, u64)]) {
    let mut args = vec!["shift", "-n", "demo", "hello"];
    args.extend_from_slice(how);
    let said = lab.traffic(&args).unwrap_or_else(|e| panic!("{e}"));
    let want: BTreeMap<String, u64> = expect
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(c, w)| (c.to_string(), *w))
        .collect();
    wait_until(
        &format!(
            "east's node-1 applies the weights {want:?} (trellis said: {})",
            said.trim()
        ),
        Duration::from_secs(30),
        || {
            let held = service_weights(&lab.config_dump("east", "node-1"), "demo", "hello");
            held.into_iter().filter(|(_, w)| *w > 0).collect::<BTreeMap<_, _>>() == want
        },
    );
}

#[test]
fn weights_split_new_connections_90_10_weight_0_gets_none_and_clear_restores_locality() {
    let _one = one_lab_at_a_time();
    let lab = Lab::up(
        "foshift",
        &two_clusters(&[("hello-e1", "node-1"), ("hello-e2", "node-2")]),
    );
    let client = lab.pod_ns("east", "demo", "client");
    let hello = hello_vip(1);
    wait_served_by(&client, hello, "east", Duration::from_secs(30));

    shift(&lab, &["--cluster", "east=90,west=10"], &[("east", 90), ("west", 10)]);
    let split = calls(&client, hello, 1000, 4);
    let all: Vec<&Outcome> = split.iter().collect();
    let by = served(&all);
    assert_eq!(by.get("error"), None, "connections failed: {by:?}");
    let west = by.get("west").copied().unwrap_or(0);
    assert_eq!(by.get("east").copied().unwrap_or(0) + west, 1000, "{by:?}");
    assert!(
        (70..=130).contains(&west),
        "west got {west} of 1000 connections at weight 10 of 100 (±3 points: 70 to 130): {by:?}"
    );
    assert!(
        lab.log("ztunnel-east-node-1")
            .lines()
            .any(|l| log_field(l, "locality") == Some("weighted")),
        "no access-log line of east's node-1 says locality=weighted"
    );

    // Weight 0 gets none, even the client's own cluster.
    shift(&lab, &["--cluster", "east=0,west=100"], &[("east", 0), ("west", 100)]);
    let shifted = calls(&client, hello, 200, 4);
    let all: Vec<&Outcome> = shifted.iter().collect();
    assert!(
        all.iter().all(|o| o.version() == Some("west")),
        "east at weight 0: {:?}",
        served(&all)
    );

    // --clear: by locality again, so all east.
    shift(&lab, &["--clear"], &[]);
    let cleared = calls(&client, hello, 200, 4);
    let all: Vec<&Outcome> = cleared.iter().collect();
    assert!(
        all.iter().all(|o| o.version() == Some("east")),
        "after --clear: {:?}",
        served(&all)
    );
}
