//! Which trust domains a node trusts: its own (the roots it was started with, never replaced
//! from the config), and every other one the config stream carries as a TrustBundle (a
//! federated cluster's). A trust domain the config no longer carries is dropped, so its peers are
//! refused from then on; a bundle that does not parse is refused with a reason and the domain's
//! last good bundle, if any, stays.

use std::collections::BTreeMap;

use rustls::pki_types::CertificateDer;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::slice::Slice;
use trellis_identity::{BundleSet, TrustBundle, TrustDomain};

/// The federated bundles `slice` carries, by trust domain (never `own`), and what was refused.
pub fn federated(slice: &Slice, own: &TrustDomain) -> (BTreeMap<TrustDomain, TrustBundle>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for r in slice.values() {
        let Some(Variant::TrustBundle(b)) = &r.kind else {
            continue;
        };
        let td = match TrustDomain::new(&b.trust_domain) {
            Ok(td) => td,
            Err(e) => {
                problems.push(format!("TrustBundle {:?}: {e}", b.trust_domain));
                continue;
            }
        };
        if &td == own {
            problems.push(format!(
                "TrustBundle for this node's own trust domain {td}: ignored (its roots are the CA's)"
            ));
            continue;
        }
        let roots: Vec<CertificateDer<'static>> = b
            .x509_authorities
            .iter()
            .map(|der| CertificateDer::from(der.clone()))
            .collect();
        if roots.is_empty() || roots.iter().any(|r| trellis_identity::svid::parse_cert(r).is_err()) {
            problems.push(format!(
                "TrustBundle {td}: no roots, or one that is not an X.509 certificate"
            ));
            continue;
        }
        let mut bundle = TrustBundle::new(td.clone(), roots);
        bundle.sequence = b.sequence;
        out.insert(td, bundle);
    }
    (out, problems)
}

/// Makes `bundles` trust `own` and exactly the federated domains of `slice`. Returns the
/// problems (see [`federated`]) and the trust domains dropped.
pub fn reconcile(bundles: &BundleSet, own: &TrustDomain, slice: &Slice) -> (Vec<String>, Vec<TrustDomain>) {
    let (wanted, problems) = federated(slice, own);
    let mut dropped = Vec::new();
    for held in bundles.all() {
        let td = &held.trust_domain;
        if td != own && !wanted.contains_key(td) {
            // A refused bundle keeps the domain's last good one; only an absent one drops it.
            let refused = problems.iter().any(|p| p.starts_with(&format!("TrustBundle {td}:")));
            if !refused {
                bundles.remove(td);
                dropped.push(td.clone());
            }
        }
    }
    for (td, bundle) in wanted {
        if bundles.get(&td).is_none_or(|b| b != bundle) {
            bundles.upsert(bundle);
        }
    }
    (problems, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use trellis_api::config::v1 as pb;
    use trellis_api::slice::key_of;
    use trellis_identity::{CertificateAuthority, IssuancePolicy};

    fn bundle_resource(td: &str, roots: Vec<Vec<u8>>) -> pb::Resource {
        pb::Resource {
            kind: Some(Variant::TrustBundle(pb::TrustBundle {
                trust_domain: td.into(),
                x509_authorities: roots,
                sequence: 1,
                refresh_hint_seconds: 300,
            })),
        }
    }

    fn slice(resources: Vec<pb::Resource>) -> Slice {
        resources
            .into_iter()
            .map(|r| (key_of(&r).unwrap(), Arc::new(r)))
            .collect()
    }

    #[test]
    fn federated_domains_come_and_go_with_the_config_and_the_own_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let own: TrustDomain = "east.trellis.local".parse().unwrap();
        let west: TrustDomain = "west.trellis.local".parse().unwrap();
        let own_ca =
            CertificateAuthority::load_or_create(&dir.path().join("e"), &own, IssuancePolicy::default()).unwrap();
        let west_ca =
            CertificateAuthority::load_or_create(&dir.path().join("w"), &west, IssuancePolicy::default()).unwrap();
        let bundles = BundleSet::with(TrustBundle::new(own.clone(), own_ca.roots().to_vec()));
        let west_roots: Vec<Vec<u8>> = west_ca.roots().iter().map(|c| c.to_vec()).collect();

        let with_west = slice(vec![
            bundle_resource("west.trellis.local", west_roots.clone()),
            // A bundle claiming the node's own domain never replaces its roots.
            bundle_resource("east.trellis.local", west_roots.clone()),
        ]);
        let (problems, dropped) = reconcile(&bundles, &own, &with_west);
        assert!(dropped.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(bundles.roots(&west).unwrap(), west_ca.roots());
        assert_eq!(bundles.roots(&own).unwrap(), own_ca.roots());

        // Garbage for west keeps its last good bundle.
        let (problems, dropped) = reconcile(
            &bundles,
            &own,
            &slice(vec![bundle_resource("west.trellis.local", vec![b"junk".to_vec()])]),
        );
        assert!(problems[0].contains("not an X.509 certificate"), "{problems:?}");
        assert!(dropped.is_empty() && bundles.roots(&west).is_some());

        // West gone from the config: its peers are refused from now on.
        let (_, dropped) = reconcile(&bundles, &own, &Slice::new());
        assert_eq!(dropped, std::slice::from_ref(&west));
        assert!(bundles.roots(&west).is_none());
        assert!(bundles.roots(&own).is_some(), "the own domain is never dropped");
    }
}
