//! Who a policy names: one type, parsed once where the text arrives (the manifest parser, the
//! config stream), so that trellisd and ztunnel agree on what a policy means.
//!
//! Three forms, as Istio's and Linkerd's policies spell them:
//! - a full SPIFFE ID, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`: exactly that identity;
//! - `ns/<ns>/sa/<sa>`: that service account in every federated trust domain (namespace
//!   sameness across clusters);
//! - `*`: any authenticated peer (any verified SPIFFE ID). A plaintext source never matches.

use std::fmt;
use std::str::FromStr;

use crate::id::{check_name, IdKind, SpiffeId};

/// A principal pattern of an authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
    /// This service account of this namespace, in any federated trust domain.
    Account { namespace: String, service_account: String },
    /// Any authenticated peer.
    Any,
}

/// Text that is not a principal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("principal {0:?} is not a SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<sa>), ns/<namespace>/sa/<service-account> or *")]
pub struct BadPrincipal(pub String);

impl Principal {
    /// Parses one of the three forms; anything else is refused.
    pub fn parse(s: &str) -> Result<Self, BadPrincipal> {
        if s == "*" {
            return Ok(Self::Any);
        }
        if s.starts_with("spiffe://") {
            return SpiffeId::parse(s)
                .map(Self::Exact)
                .map_err(|_| BadPrincipal(s.to_string()));
        }
        let mut parts = s.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if check_name(ns).is_ok() && check_name(sa).is_ok() => {
                Ok(Self::Account {
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => Err(BadPrincipal(s.to_string())),
        }
    }

    /// Whether a peer with verified identity `id` (`None`: plaintext) is this principal.
    pub fn matches(&self, id: Option<&SpiffeId>) -> bool {
        let Some(id) = id else { return false };
        match self {
            Self::Any => true,
            Self::Exact(want) => want == id,
            Self::Account {
                namespace,
                service_account,
            } => matches!(
                id.kind(),
                IdKind::Workload { namespace: ns, service_account: sa } if ns == namespace && sa == service_account
            ),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::Account {
                namespace,
                service_account,
            } => write!(f, "ns/{namespace}/sa/{service_account}"),
            Self::Any => f.write_str("*"),
        }
    }
}

impl FromStr for Principal {
    type Err = BadPrincipal;
    fn from_str(s: &str) -> Result<Self, BadPrincipal> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_parse_and_print_back_the_same() {
        for text in ["*", "ns/shop/sa/web", "spiffe://east.trellis.local/ns/shop/sa/web"] {
            let p = Principal::parse(text).unwrap();
            assert_eq!(p.to_string(), text);
        }
    }

    #[test]
    fn malformed_principals_are_refused() {
        for text in [
            "",
            "**",
            "web",
            "ns/shop",
            "ns/shop/sa/",
            "ns/shop/sa/web/extra",
            "ns/Shop/sa/web",
            "spiffe://",
            "spiffe://east.trellis.local/ns/shop/sa/web/",
        ] {
            assert!(Principal::parse(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn account_matches_every_trust_domain_and_any_needs_an_identity() {
        let east = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/web").unwrap();
        let west = SpiffeId::parse("spiffe://west.trellis.local/ns/shop/sa/web").unwrap();
        let other = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/cart").unwrap();
        let account = Principal::parse("ns/shop/sa/web").unwrap();
        assert!(account.matches(Some(&east)) && account.matches(Some(&west)));
        assert!(!account.matches(Some(&other)));
        let exact = Principal::parse("spiffe://east.trellis.local/ns/shop/sa/web").unwrap();
        assert!(exact.matches(Some(&east)) && !exact.matches(Some(&west)));
        assert!(Principal::Any.matches(Some(&other)));
        assert!(!Principal::Any.matches(None), "a plaintext peer is nobody");
    }
}
