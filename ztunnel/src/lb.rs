//! Endpoint choice for a service, and passive ejection, as pure functions over plain data.
//!
//! **Locality.** Healthy endpoints are ordered in tiers as seen from the calling workload: the
//! same cluster and zone, then the same cluster, then the same region, then any other federated
//! cluster (through its gateway when it is on another network). Within a tier, round robin from
//! a per-service cursor.
//!
//! **Weights.** A service with cluster weights (traffic shifting) has each new connection go to
//! one cluster chosen by weight among the weighted clusters that have a usable endpoint, with a
//! low-discrepancy sequence over the cursor so that the split holds exactly over short runs;
//! the rest follow in locality order, clusters of weight 0 (or not named) last. A weighted
//! cluster with no usable endpoint gives its share to the others: failover wins over weights.
//!
//! **Ejection.** A failed connect ejects the endpoint for a backoff that doubles with each
//! consecutive failure (1 s up to 30 s); a failure of the node or gateway itself (refused,
//! TLS, HTTP/2, no answer in time) also ejects that hop, shared by every service, so one dead
//! node or gateway costs one timeout, not one per service or per connection. Ejected endpoints
//! go last: tried only when nothing else is left (as Envoy's panic threshold does). When the
//! backoff ends, one connection probes the endpoint (it is held back from the others for a
//! probe window); a success clears the ejection and traffic returns, a failure doubles it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::Endpoint;

const BASE_EJECTION: Duration = Duration::from_secs(1);
const MAX_EJECTION: Duration = Duration::from_secs(30);

/// Consecutive failures and ejection deadline of one endpoint or hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub failures: u32,
    pub until: Instant,
}

/// Where the calling workload runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Locality<'a> {
    pub cluster: &'a str,
    pub region: &'a str,
    pub zone: &'a str,
}

/// How near an endpoint is to the caller, nearest first; `Weighted` when traffic shifting chose
/// its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Zone,
    Cluster,
    Region,
    Remote,
    Weighted,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Zone => "zone",
            Tier::Cluster => "cluster",
            Tier::Region => "region",
            Tier::Remote => "remote",
            Tier::Weighted => "weighted",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One candidate of a connection, with the tier it was chosen in.
#[derive(Debug, Clone, Copy)]
pub struct Pick<'a> {
    pub endpoint: &'a Endpoint,
    pub tier: Tier,
}

/// The tier of `e` as seen from `from`. An endpoint without a cluster is the caller's own.
pub fn tier(e: &Endpoint, from: &Locality) -> Tier {
    let same_cluster = e.cluster.is_empty() || e.cluster == from.cluster;
    match (same_cluster, e.zone == from.zone) {
        (true, true) => Tier::Zone,
        (true, false) => Tier::Cluster,
        _ if !from.region.is_empty() && e.region == from.region => Tier::Region,
        _ => Tier::Remote,
    }
}

/// The cluster of `e`: its own, or `own` (the caller's) when it names none.
fn cluster_name<'x>(e: &'x Endpoint, own: &'x str) -> &'x str {
    match e.cluster.as_str() {
        "" => own,
        c => c,
    }
}

/// The hop a connection to `e` is dialled to: its gateway, its node (tunnelled), or itself.
pub fn hop(e: &Endpoint) -> IpAddr {
    match (&e.gateway, e.enrolled, e.node_address) {
        (Some(gw), _, _) => gw.address.ip(),
        (None, true, Some(node)) => node,
        _ => e.ip,
    }
}

/// What is ejected, and the inputs of one choice.
#[derive(Debug, Clone, Copy)]
pub struct Health<'a> {
    /// By endpoint address, for this service.
    pub endpoints: &'a HashMap<IpAddr, Ejection>,
    /// By hop address (node or gateway), for every service.
    pub hops: &'a HashMap<IpAddr, Ejection>,
    pub now: Instant,
}

impl Health<'_> {
    /// Until when `e` is ejected, if it is.
    fn ejected_until(&self, e: &Endpoint) -> Option<Instant> {
        let of =
            |map: &HashMap<IpAddr, Ejection>, ip: IpAddr| map.get(&ip).map(|ej| ej.until).filter(|u| *u > self.now);
        of(self.endpoints, e.ip).max(of(self.hops, hop(e)))
    }
}

/// The fraction of the Weyl sequence at `n` (golden ratio): spreads successive connections
/// over the weight line evenly, so that any run of connections splits close to the weights.
fn weyl(n: usize) -> f64 {
    const PHI_FRACTION: f64 = 0.618_033_988_749_894_9;
    ((n as f64) * PHI_FRACTION).fract()
}

/// Orders `endpoints` for one connection: usable ones (healthy, not ejected) by weight or
/// locality, round robin within a tier from `cursor`; then healthy ejected ones, soonest back
/// first. Unhealthy endpoints are left out.
pub fn candidates<'a>(
    endpoints: &'a [Endpoint],
    from: &Locality,
    weights: &BTreeMap<String, u32>,
    health: &Health,
    cursor: usize,
) -> Vec<Pick<'a>> {
    let (mut usable, mut ejected): (Vec<Pick>, Vec<Pick>) = endpoints
        .iter()
        .filter(|e| e.healthy)
        .map(|e| Pick {
            endpoint: e,
            tier: tier(e, from),
        })
        .partition(|p| health.ejected_until(p.endpoint).is_none());
    let weight_of = |cluster: &str| weights.get(cluster).copied().unwrap_or(0);
    // With weights: one weighted cluster that has a usable endpoint, chosen along the sequence.
    let mut eligible: Vec<(&str, u32)> = Vec::new();
    if !weights.is_empty() {
        for p in &usable {
            let c = cluster_name(p.endpoint, from.cluster);
            let w = weight_of(c);
            if w > 0 && !eligible.iter().any(|(e, _)| *e == c) {
                eligible.push((c, w));
            }
        }
        eligible.sort();
    }
    let chosen: Option<&str> = (!eligible.is_empty()).then(|| {
        let total: u64 = eligible.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut at = (weyl(cursor) * total as f64) as u64;
        let mut chosen = eligible[eligible.len() - 1].0;
        for (c, w) in &eligible {
            if at < u64::from(*w) {
                chosen = c;
                break;
            }
            at -= u64::from(*w);
        }
        chosen
    });
    if let Some(chosen) = chosen {
        for p in &mut usable {
            if cluster_name(p.endpoint, from.cluster) == chosen {
                p.tier = Tier::Weighted;
            }
        }
    }
    // The group a usable endpoint goes in: the chosen cluster's, then other weighted clusters
    // by locality, then those of weight 0 by locality; without weights, by locality alone.
    let group = |p: &Pick| -> (u8, Tier) {
        match chosen {
            None => (0, p.tier),
            Some(_) if p.tier == Tier::Weighted => (0, Tier::Weighted),
            Some(_) if weight_of(cluster_name(p.endpoint, from.cluster)) > 0 => (1, p.tier),
            Some(_) => (2, p.tier),
        }
    };
    usable.sort_by_key(|p| group(p));
    rotate_groups(&mut usable, cursor, group);
    ejected.sort_by_key(|p| health.ejected_until(p.endpoint));
    usable.append(&mut ejected);
    usable
}

/// Rotates each run of equal `group` in `picks` (already sorted by it) by `cursor`.
fn rotate_groups<K: PartialEq>(picks: &mut [Pick], cursor: usize, group: impl Fn(&Pick) -> K) {
    let mut start = 0;
    while start < picks.len() {
        let key = group(&picks[start]);
        let len = picks[start..].iter().take_while(|p| group(p) == key).count();
        picks[start..start + len].rotate_left(cursor % len);
        start += len;
    }
}

/// The ejection after one more failure.
pub fn eject(previous: Option<Ejection>, now: Instant) -> Ejection {
    let failures = previous.map_or(1, |p| p.failures.saturating_add(1));
    let backoff = BASE_EJECTION
        .saturating_mul(1u32 << (failures - 1).min(5))
        .min(MAX_EJECTION);
    Ejection {
        failures,
        until: now + backoff,
    }
}

/// Ejections by address, shared by the connections that consult them.
#[derive(Debug, Default)]
pub struct Ejections(Mutex<HashMap<IpAddr, Ejection>>);

impl Ejections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Ejection>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failure of `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let mut map = self.lock();
        let previous = map.get(&ip).copied();
        map.insert(ip, eject(previous, Instant::now()));
    }

    /// Records a success of `ip`, clearing its ejection.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut map = self.lock();
        if !map.is_empty() {
            map.remove(&ip);
        }
    }

    /// Whether `ip` is ejected now, for status.
    pub fn is_ejected(&self, ip: IpAddr) -> bool {
        self.lock().get(&ip).is_some_and(|e| e.until > Instant::now())
    }
}

/// Holds back a probe of `ip` for `window` from other connections, if its ejection has ended
/// without a success since (the connection that chose it probes it).
fn hold_for_probe(map: &mut HashMap<IpAddr, Ejection>, ip: IpAddr, now: Instant, window: Duration) {
    if let Some(e) = map.get_mut(&ip).filter(|e| e.until <= now) {
        e.until = now + window;
    }
}

/// One service's balancer: its cursor and its endpoints' ejections.
#[derive(Debug, Default)]
pub struct Balancer {
    cursor: AtomicUsize,
    endpoints: Ejections,
}

impl Balancer {
    /// The order in which to try `endpoints` for a new connection from `from`; the first is
    /// held back from other connections for `probe` if it is coming back from an ejection.
    pub fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        from: &Locality,
        weights: &BTreeMap<String, u32>,
        hops: &Ejections,
        probe: Duration,
    ) -> Vec<Pick<'a>> {
        let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let (mut eps, mut hop_map) = (self.endpoints.lock(), hops.lock());
        let health = Health {
            endpoints: &eps,
            hops: &hop_map,
            now,
        };
        let picks = candidates(endpoints, from, weights, &health, cursor);
        if let Some(first) = picks.first() {
            hold_for_probe(&mut eps, first.endpoint.ip, now, probe);
            hold_for_probe(&mut hop_map, hop(first.endpoint), now, probe);
        }
        picks
    }

    /// Records a failed connect to the endpoint at `ip`.
    pub fn failed(&self, ip: IpAddr) {
        self.endpoints.failed(ip)
    }

    /// Records a successful connect to the endpoint at `ip`, clearing its ejection.
    pub fn succeeded(&self, ip: IpAddr) {
        self.endpoints.succeeded(ip)
    }

    /// Whether the endpoint at `ip` is ejected now, for the config dump.
    pub fn is_ejected(&self, ip: IpAddr) -> bool {
        self.endpoints.is_ejected(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use crate::state::GatewayHop;

    fn ep(last: u8, cluster: &str, zone: &str) -> Endpoint {
        Endpoint {
            name: format!("ep-{last}"),
            cluster: cluster.into(),
            region: if cluster == "west" { "eu".into() } else { "us".into() },
            zone: zone.into(),
            ip: IpAddr::from([10, 0, 0, last]),
            node: format!("node-{last}"),
            node_address: Some(IpAddr::from([10, 9, 0, last])),
            identity: None,
            enrolled: true,
            healthy: true,
            gateway: None,
        }
    }

    fn unhealthy(mut e: Endpoint) -> Endpoint {
        e.healthy = false;
        e
    }

    const EAST_A: Locality<'static> = Locality {
        cluster: "east",
        region: "us",
        zone: "a",
    };

    fn ips(list: &[Pick]) -> Vec<u8> {
        list.iter()
            .map(|p| match p.endpoint.ip {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect()
    }

    fn order(eps: &[Endpoint], weights: &BTreeMap<String, u32>, cursor: usize) -> Vec<u8> {
        let none = HashMap::new();
        let health = Health {
            endpoints: &none,
            hops: &none,
            now: Instant::now(),
        };
        ips(&candidates(eps, &EAST_A, weights, &health, cursor))
    }

    #[test]
    fn round_robin_skips_unhealthy_endpoints() {
        let eps = [ep(1, "east", "a"), unhealthy(ep(2, "east", "a")), ep(3, "east", "a")];
        let none = BTreeMap::new();
        assert_eq!(order(&eps, &none, 0), [1, 3]);
        assert_eq!(order(&eps, &none, 1), [3, 1]);
        assert_eq!(order(&eps, &none, 2), [1, 3]);
    }

    #[test]
    fn nearer_tiers_come_first_and_each_turns_on_its_own() {
        // 1, 2: same zone; 3: same cluster, other zone; 4: same region (another cluster);
        // 5, 6: another region.
        let mut central = ep(4, "central", "c");
        central.region = "us".into();
        let eps = [
            ep(5, "west", "w"),
            ep(3, "east", "b"),
            central,
            ep(1, "east", "a"),
            ep(6, "west", "w"),
            ep(2, "east", "a"),
        ];
        let none = BTreeMap::new();
        assert_eq!(order(&eps, &none, 0), [1, 2, 3, 4, 5, 6]);
        assert_eq!(order(&eps, &none, 1), [2, 1, 3, 4, 6, 5]);
        let none_map = HashMap::new();
        let health = Health {
            endpoints: &none_map,
            hops: &none_map,
            now: Instant::now(),
        };
        let tiers: Vec<Tier> = candidates(&eps, &EAST_A, &none, &health, 0)
            .iter()
            .map(|p| p.tier)
            .collect();
        use Tier::*;
        assert_eq!(tiers, [Zone, Zone, Cluster, Region, Remote, Remote]);
    }

    #[test]
    fn an_ejected_endpoint_goes_last_until_its_backoff_ends() {
        let eps = [ep(1, "east", "a"), ep(2, "east", "a"), ep(3, "west", "w")];
        let now = Instant::now();
        let ejections = HashMap::from([(eps[0].ip, eject(None, now))]);
        let none = HashMap::new();
        let at = |now| Health {
            endpoints: &ejections,
            hops: &none,
            now,
        };
        let w = BTreeMap::new();
        assert_eq!(ips(&candidates(&eps, &EAST_A, &w, &at(now), 0)), [2, 3, 1]);
        assert_eq!(
            ips(&candidates(&eps, &EAST_A, &w, &at(now + Duration::from_secs(2)), 0)),
            [1, 2, 3]
        );
    }

    #[test]
    fn an_ejected_hop_takes_every_endpoint_behind_it_out() {
        // 1 and 2 share node 10.9.0.1; the node is ejected, so both go last.
        let mut two = ep(2, "east", "a");
        two.node_address = Some(IpAddr::from([10, 9, 0, 1]));
        let eps = [ep(1, "east", "a"), two, ep(3, "west", "w")];
        let now = Instant::now();
        let hops = HashMap::from([(IpAddr::from([10, 9, 0, 1]), eject(None, now))]);
        let none = HashMap::new();
        let health = Health {
            endpoints: &none,
            hops: &hops,
            now,
        };
        assert_eq!(ips(&candidates(&eps, &EAST_A, &BTreeMap::new(), &health, 0)), [3, 1, 2]);
    }

    #[test]
    fn a_gateway_is_the_hop_of_the_endpoints_behind_it() {
        let mut behind = ep(7, "west", "w");
        behind.gateway = Some(Arc::new(GatewayHop {
            address: SocketAddr::from(([10, 200, 0, 12], 15008)),
            identity: trellis_identity::SpiffeId::parse("spiffe://west.local/ns/trellis-system/sa/gw").unwrap(),
            weight: 3,
        }));
        assert_eq!(hop(&behind), IpAddr::from([10, 200, 0, 12]));
        let mut plain = ep(8, "east", "a");
        plain.enrolled = false;
        assert_eq!(hop(&plain), plain.ip);
    }

    #[test]
    fn weights_split_connections_exactly_over_a_short_run() {
        let eps = [ep(1, "east", "a"), ep(2, "east", "b"), ep(3, "west", "w")];
        let weights = BTreeMap::from([("east".to_string(), 90), ("west".to_string(), 10)]);
        let firsts: Vec<u8> = (0..1000).map(|c| order(&eps, &weights, c)[0]).collect();
        let west = firsts.iter().filter(|f| **f == 3).count();
        assert!((95..=105).contains(&west), "west got {west} of 1000");
        // East's share turns over both of its endpoints, and the other cluster is still a
        // candidate behind them.
        assert!(firsts.contains(&1) && firsts.contains(&2));
        assert!(order(&eps, &weights, 0).contains(&3));
    }

    #[test]
    fn weight_zero_gets_nothing_unless_no_weighted_cluster_is_left() {
        let eps = [ep(1, "east", "a"), ep(3, "west", "w")];
        let weights = BTreeMap::from([("east".to_string(), 0), ("west".to_string(), 100)]);
        assert!((0..200).all(|c| order(&eps, &weights, c)[0] == 3));
        // West has nothing healthy: east serves (failover wins over weights).
        let eps = [ep(1, "east", "a"), unhealthy(ep(3, "west", "w"))];
        assert_eq!(order(&eps, &weights, 0), [1]);
    }

    #[test]
    fn a_weighted_cluster_without_usable_endpoints_gives_its_share_away() {
        let eps = [ep(1, "east", "a"), ep(3, "west", "w"), ep(4, "north", "n")];
        let weights = BTreeMap::from([
            ("east".to_string(), 50),
            ("west".to_string(), 50),
            ("north".to_string(), 0),
        ]);
        let now = Instant::now();
        let ejected = HashMap::from([(eps[1].ip, eject(None, now))]);
        let none = HashMap::new();
        let health = Health {
            endpoints: &ejected,
            hops: &none,
            now,
        };
        for c in 0..100 {
            let picks = candidates(&eps, &EAST_A, &weights, &health, c);
            assert_eq!(ips(&picks), [1, 4, 3], "cursor {c}");
            assert_eq!(picks[0].tier, Tier::Weighted);
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let now = Instant::now();
        let mut e = eject(None, now);
        assert_eq!(e.until - now, Duration::from_secs(1));
        e = eject(Some(e), now);
        assert_eq!(e.until - now, Duration::from_secs(2));
        for _ in 0..10 {
            e = eject(Some(e), now);
        }
        assert_eq!(e.until - now, MAX_EJECTION);
    }

    #[test]
    fn one_connection_probes_an_endpoint_coming_back_and_the_others_wait_for_it() {
        let eps = [ep(1, "east", "a"), ep(3, "west", "w")];
        let balancer = Balancer::default();
        let hops = Ejections::default();
        let w = BTreeMap::new();
        let probe = Duration::from_secs(5);
        balancer.failed(eps[0].ip);
        // Ejected: west first.
        assert_eq!(ips(&balancer.pick(&eps, &EAST_A, &w, &hops, probe))[0], 3);
        // Its backoff ends: the first connection probes it, the next does not.
        balancer.endpoints.lock().get_mut(&eps[0].ip).unwrap().until = Instant::now();
        assert_eq!(ips(&balancer.pick(&eps, &EAST_A, &w, &hops, probe))[0], 1);
        assert_eq!(ips(&balancer.pick(&eps, &EAST_A, &w, &hops, probe))[0], 3);
        // The probe succeeded: traffic returns.
        balancer.succeeded(eps[0].ip);
        assert_eq!(ips(&balancer.pick(&eps, &EAST_A, &w, &hops, probe))[0], 1);
        assert_eq!(ips(&balancer.pick(&eps, &EAST_A, &w, &hops, probe))[0], 1);
    }

    #[test]
    fn no_healthy_endpoint_means_no_candidate() {
        assert!(order(&[unhealthy(ep(1, "east", "a"))], &BTreeMap::new(), 0).is_empty());
    }
}
