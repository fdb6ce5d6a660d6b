//! Which clusters serve a global service now, seen from one cluster: the data plane's rule
//! (`ztunnel/src/lb.rs`) applied to what the control plane knows of each cluster's endpoints,
//! for `trellis status` and `trellis traffic status`.
//!
//! **With cluster weights** (`trellis traffic shift`), every weighted cluster that has a healthy
//! endpoint serves its weight's share of new connections; the share of a weighted cluster
//! without one goes to the others, in proportion to their weights (failover wins over weights).
//! When no weighted cluster has a healthy endpoint, the clusters of weight 0 or not named take
//! over, by locality. **Without weights**, by locality: this cluster if it has a healthy
//! endpoint, else the clusters of its region, else any other; round robin over the endpoints
//! of that tier.
//!
//! The control plane sees readiness, not the data plane's ejections: an endpoint that is still
//! ready but whose connects fail counts here as healthy, while the nodes already skip it.

use std::collections::BTreeMap;

use trellis_api::config::v1 as pb;

/// One cluster's endpoints of a service, as this cluster's nodes get them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEndpoints {
    pub cluster: String,
    pub region: String,
    /// Pods: an endpoint behind a gateway counts the pods it stands for.
    pub endpoints: u32,
    /// Of those, the ones ready (another cluster publishes only its ready ones).
    pub healthy: u32,
}

/// How near a cluster is, as the data plane orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// This cluster.
    Local,
    /// Another cluster of this cluster's region.
    Region,
    /// Any other cluster.
    Remote,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Region => "region",
            Tier::Remote => "remote",
        }
    }
}

/// Why the serving clusters are the ones they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// By weight: the weighted clusters that have a healthy endpoint.
    Weights,
    /// Weights are set, but no weighted cluster has a healthy endpoint: the others, by locality.
    Failover(Tier),
    /// No weights: the nearest tier with a healthy endpoint.
    Locality(Tier),
    /// No cluster has a healthy endpoint.
    Nothing,
}

impl Basis {
    /// `weights`, `failover`, `locality` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Weights => "weights",
            Basis::Failover(_) => "failover",
            Basis::Locality(_) => "locality",
            Basis::Nothing => "none",
        }
    }

    /// The locality tier chosen, when locality chose.
    pub fn tier(self) -> Option<Tier> {
        match self {
            Basis::Failover(t) | Basis::Locality(t) => Some(t),
            Basis::Weights | Basis::Nothing => None,
        }
    }
}

/// One serving cluster and its share of new connections.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub cluster: String,
    /// Percent of new connections, when the rule fixes it: by weight, or a cluster alone in its
    /// tier. `None` for clusters sharing a tier, whose connections go round robin over their
    /// endpoints.
    pub percent: Option<f64>,
}

/// Who serves, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Serving {
    pub basis: Basis,
    /// In the order of `clusters` given to [`serving`].
    pub shares: Vec<Share>,
}

/// The clusters serving new connections now, seen from cluster `local` in `region` (see the
/// module's doc for the rule). `weights` empty means by locality.
pub fn serving(local: &str, region: &str, clusters: &[ClusterEndpoints], weights: &BTreeMap<String, u32>) -> Serving {
    let weight = |c: &ClusterEndpoints| weights.get(&c.cluster).copied().unwrap_or(0);
    if !weights.is_empty() {
        let weighted: Vec<&ClusterEndpoints> = clusters.iter().filter(|c| c.healthy > 0 && weight(c) > 0).collect();
        let total: u64 = weighted.iter().map(|c| u64::from(weight(c))).sum();
        if total > 0 {
            let shares = weighted
                .iter()
                .map(|c| Share {
                    cluster: c.cluster.clone(),
                    percent: Some(f64::from(weight(c)) * 100.0 / total as f64),
                })
                .collect();
            return Serving {
                basis: Basis::Weights,
                shares,
            };
        }
    }
    // By locality: every cluster left with a healthy endpoint has weight 0 or none.
    let tier = |c: &ClusterEndpoints| {
        if c.cluster == local {
            Tier::Local
        } else if !region.is_empty() && c.region == region {
            Tier::Region
        } else {
            Tier::Remote
        }
    };
    let healthy: Vec<&ClusterEndpoints> = clusters.iter().filter(|c| c.healthy > 0).collect();
    let Some(nearest) = healthy.iter().map(|c| tier(c)).min() else {
        return Serving {
            basis: Basis::Nothing,
            shares: Vec::new(),
        };
    };
    let serving: Vec<&ClusterEndpoints> = healthy.into_iter().filter(|c| tier(c) == nearest).collect();
    let alone = serving.len() == 1;
    Serving {
        basis: match weights.is_empty() {
            true => Basis::Locality(nearest),
            false => Basis::Failover(nearest),
        },
        shares: serving
            .iter()
            .map(|c| Share {
                cluster: c.cluster.clone(),
                percent: alone.then_some(100.0),
            })
            .collect(),
    }
}

/// A global service as one cluster's nodes get it: its clusters' endpoints, its weights, and
/// who serves now.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// This cluster first, then the others by name.
    pub clusters: Vec<ClusterEndpoints>,
    pub weights: BTreeMap<String, u32>,
    pub serving: Serving,
}

/// Summarizes `service` (from this cluster's model, remote endpoints merged) for cluster
/// `local` in `region`. Besides the clusters with endpoints, lists this cluster, every cluster
/// the weights name, and `members` (cluster and region of each member exporting the service),
/// so a cluster left without endpoints still shows, with none.
pub fn summarize(service: &pb::Service, local: &str, region: &str, members: &[(String, String)]) -> Summary {
    let mut by_cluster: BTreeMap<String, ClusterEndpoints> = BTreeMap::new();
    row(&mut by_cluster, local, region);
    for (cluster, region_of) in members {
        row(&mut by_cluster, cluster, region_of);
    }
    for cluster in service.cluster_weights.keys() {
        row(&mut by_cluster, cluster, "");
    }
    for e in &service.endpoints {
        let cluster = if e.cluster.is_empty() { local } else { &e.cluster };
        let region_of = e.locality.as_ref().map_or("", |l| l.region.as_str());
        let c = row(&mut by_cluster, cluster, region_of);
        if c.region.is_empty() && cluster != local {
            c.region = region_of.to_string();
        }
        let pods = e.weight.max(1);
        c.endpoints = c.endpoints.saturating_add(pods);
        if e.healthy {
            c.healthy = c.healthy.saturating_add(pods);
        }
    }
    let mut clusters: Vec<ClusterEndpoints> = by_cluster.remove(local).into_iter().collect();
    clusters.extend(by_cluster.into_values());
    let serving = serving(local, region, &clusters, &service.cluster_weights);
    Summary {
        clusters,
        weights: service.cluster_weights.clone(),
        serving,
    }
}

/// The row of `cluster`, added with `region` and no endpoints if it is not there yet.
fn row<'a>(rows: &'a mut BTreeMap<String, ClusterEndpoints>, cluster: &str, region: &str) -> &'a mut ClusterEndpoints {
    rows.entry(cluster.to_string()).or_insert_with(|| ClusterEndpoints {
        cluster: cluster.to_string(),
        region: region.to_string(),
        endpoints: 0,
        healthy: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, region: &str, endpoints: u32, healthy: u32) -> ClusterEndpoints {
        ClusterEndpoints {
            cluster: name.into(),
            region: region.into(),
            endpoints,
            healthy,
        }
    }

    fn weights(w: &[(&str, u32)]) -> BTreeMap<String, u32> {
        w.iter().map(|(c, w)| (c.to_string(), *w)).collect()
    }

    fn shares(s: &Serving) -> Vec<(&str, Option<u32>)> {
        s.shares
            .iter()
            .map(|s| (s.cluster.as_str(), s.percent.map(|p| p.round() as u32)))
            .collect()
    }

    #[test]
    fn without_weights_this_cluster_serves_then_its_region_then_any_other() {
        let mut all = vec![
            cluster("east", "eu", 2, 2),
            cluster("north", "eu", 1, 1),
            cluster("west", "us", 1, 1),
        ];
        let s = serving("east", "eu", &all, &BTreeMap::new());
        assert_eq!(
            (s.basis, shares(&s)),
            (Basis::Locality(Tier::Local), vec![("east", Some(100))])
        );
        all[0].healthy = 0;
        let s = serving("east", "eu", &all, &BTreeMap::new());
        assert_eq!(
            (s.basis, shares(&s)),
            (Basis::Locality(Tier::Region), vec![("north", Some(100))])
        );
        all[1].healthy = 0;
        let s = serving("east", "eu", &all, &BTreeMap::new());
        assert_eq!(s.basis, Basis::Locality(Tier::Remote));
        assert_eq!(shares(&s), [("west", Some(100))]);
        all[2].healthy = 0;
        assert_eq!(serving("east", "eu", &all, &BTreeMap::new()).basis, Basis::Nothing);
    }

    #[test]
    fn clusters_sharing_a_tier_share_it_round_robin_and_no_region_means_remote() {
        let all = [
            cluster("east", "", 1, 0),
            cluster("north", "", 1, 1),
            cluster("west", "", 3, 3),
        ];
        let s = serving("east", "", &all, &BTreeMap::new());
        assert_eq!(s.basis, Basis::Locality(Tier::Remote), "an empty region matches none");
        assert_eq!(shares(&s), [("north", None), ("west", None)]);
    }

    #[test]
    fn weights_split_over_the_weighted_clusters_that_have_a_healthy_endpoint() {
        let mut all = vec![
            cluster("east", "eu", 2, 2),
            cluster("west", "eu", 1, 1),
            cluster("south", "eu", 1, 1),
        ];
        let w = weights(&[("east", 90), ("west", 10)]);
        let s = serving("east", "eu", &all, &w);
        assert_eq!(s.basis, Basis::Weights);
        assert_eq!(
            shares(&s),
            [("east", Some(90)), ("west", Some(10))],
            "south, not named, gets none"
        );
        // East's endpoints die: its share goes to west, the only weighted cluster left.
        all[0].healthy = 0;
        let s = serving("east", "eu", &all, &w);
        assert_eq!((s.basis, shares(&s)), (Basis::Weights, vec![("west", Some(100))]));
        // Three weighted clusters, one down: the other two split in proportion.
        let w3 = weights(&[("east", 50), ("west", 25), ("south", 25)]);
        let s = serving("east", "eu", &all, &w3);
        assert_eq!(shares(&s), [("west", Some(50)), ("south", Some(50))]);
    }

    #[test]
    fn a_cluster_of_weight_zero_serves_only_when_no_weighted_cluster_can() {
        let mut all = vec![cluster("east", "eu", 1, 1), cluster("west", "us", 1, 1)];
        let w = weights(&[("east", 0), ("west", 100)]);
        let s = serving("east", "eu", &all, &w);
        assert_eq!(shares(&s), [("west", Some(100))], "weight 0 gets none, even local");
        all[1].healthy = 0;
        let s = serving("east", "eu", &all, &w);
        assert_eq!(
            (s.basis, shares(&s)),
            (Basis::Failover(Tier::Local), vec![("east", Some(100))]),
            "failover wins over weights"
        );
        // Weights naming only clusters that are gone: the rest by locality.
        let gone = weights(&[("north", 100)]);
        let s = serving("east", "eu", &all, &gone);
        assert_eq!(s.basis, Basis::Failover(Tier::Local));
    }

    #[test]
    fn a_summary_counts_pods_per_cluster_and_lists_clusters_without_endpoints() {
        let endpoint = |cluster: &str, healthy: bool, weight: u32| pb::Endpoint {
            cluster: cluster.into(),
            healthy,
            weight,
            locality: Some(pb::Locality {
                region: "eu".into(),
                zone: String::new(),
            }),
            ..Default::default()
        };
        let service = pb::Service {
            name: "hello".into(),
            namespace: "demo".into(),
            global: true,
            endpoints: vec![
                endpoint("east", true, 0),
                endpoint("east", false, 0),
                endpoint("west", true, 3),
            ],
            cluster_weights: weights(&[("east", 50), ("west", 50), ("gone", 10)]),
            ..Default::default()
        };
        let members = [("north".to_string(), "us".to_string())];
        let s = summarize(&service, "east", "eu", &members);
        let rows: Vec<(&str, &str, u32, u32)> = s
            .clusters
            .iter()
            .map(|c| (c.cluster.as_str(), c.region.as_str(), c.endpoints, c.healthy))
            .collect();
        assert_eq!(
            rows,
            [
                ("east", "eu", 2, 1),
                ("gone", "", 0, 0),
                ("north", "us", 0, 0),
                ("west", "eu", 3, 3)
            ],
            "this cluster first; a gateway endpoint counts its pods"
        );
        assert_eq!(s.serving.basis, Basis::Weights);
        assert_eq!(shares(&s.serving), [("east", Some(50)), ("west", Some(50))]);
    }
}
