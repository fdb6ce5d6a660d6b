//! Federation: keeps trust bundles and endpoints in sync across clusters through etcd (keys
//! under `/trellis/v1/`, see DESIGN.md "Federation through etcd").
//!
//! Read [`keys`] first (the layout), then [`records`] (the values, checked), [`view`] (what is
//! read, as pure state: refusals named, last good values kept, cross-checks between clusters),
//! [`sync`] (the etcd I/O: lease, writes, list and watch) and [`access`] (etcd users and roles).
//!
//! Not wired into trellisd yet: nothing runs the sync outside its tests.

pub mod access;
pub mod records;
pub mod sync;
pub mod view;

/// The etcd key layout of the federation.
pub mod keys {
    /// Every federation key starts with this prefix.
    pub const PREFIX: &str = "/trellis/v1/";

    /// `clusters/<cluster>`: a member cluster, bound to its lease.
    pub fn cluster(cluster: &str) -> String {
        format!("{PREFIX}clusters/{cluster}")
    }

    /// `bundles/<trust-domain>`: a cluster's SPIFFE trust bundle.
    pub fn bundle(trust_domain: &str) -> String {
        format!("{PREFIX}bundles/{trust_domain}")
    }

    /// `services/<cluster>/<ns>/<name>`: an exported service.
    pub fn service(cluster: &str, namespace: &str, name: &str) -> String {
        format!("{PREFIX}services/{cluster}/{namespace}/{name}")
    }

    /// `endpoints/<cluster>/<ns>/<name>`: a service's healthy endpoints, bound to the lease.
    pub fn endpoints(cluster: &str, namespace: &str, name: &str) -> String {
        format!("{PREFIX}endpoints/{cluster}/{namespace}/{name}")
    }

    /// `grants/<cluster>`: the trust domain a member may use, written by root when the operator
    /// grants the member (`trellis federation grant`); no member can write it. An addition to
    /// DESIGN.md's layout: without it a member could claim another's trust domain.
    pub fn grant(cluster: &str) -> String {
        format!("{PREFIX}grants/{cluster}")
    }

    /// `traffic/<ns>/<name>`: cluster weights for traffic shifting.
    pub fn traffic(namespace: &str, name: &str) -> String {
        format!("{PREFIX}traffic/{namespace}/{name}")
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn keys_follow_the_design_layout() {
            assert_eq!(super::cluster("east"), "/trellis/v1/clusters/east");
            assert_eq!(
                super::bundle("east.trellis.local"),
                "/trellis/v1/bundles/east.trellis.local"
            );
            assert_eq!(
                super::service("east", "shop", "cart"),
                "/trellis/v1/services/east/shop/cart"
            );
            assert_eq!(
                super::endpoints("east", "shop", "cart"),
                "/trellis/v1/endpoints/east/shop/cart"
            );
            assert_eq!(super::traffic("shop", "cart"), "/trellis/v1/traffic/shop/cart");
        }
    }
}
