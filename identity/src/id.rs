//! SPIFFE IDs and trust domains, parsed strictly as the SPIFFE ID standard says.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the standard allows, in bytes.
const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name the standard allows, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error("{0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    #[error("trust domain {0:?} may only hold lowercase letters, digits, '.', '-' and '_'")]
    TrustDomainChars(String),
    #[error("trust domain {0:?} is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong(String),
    #[error("{0:?} is longer than {MAX_ID_LEN} bytes")]
    TooLong(String),
    #[error("{0:?} has an empty path segment ('//' or a trailing '/')")]
    EmptySegment(String),
    #[error("{0:?} has a '.' or '..' path segment")]
    DotSegment(String),
    #[error("{0:?}: path segments may only hold letters, digits, '.', '-' and '_'")]
    PathChars(String),
    #[error("{0:?} is not a workload ID of the form spiffe://<td>/ns/<namespace>/sa/<service-account>")]
    NotWorkload(String),
    #[error("{0:?} is not a valid name: use lowercase letters, digits and '-' (at most 63)")]
    BadName(String),
}

/// A SPIFFE trust domain, e.g. `east.trellis.local`. One per Trellis cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, IdError> {
        if name.is_empty() {
            return Err(IdError::EmptyTrustDomain(name.to_string()));
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdError::TrustDomainTooLong(name.to_string()));
        }
        let ok = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !ok {
            return Err(IdError::TrustDomainChars(name.to_string()));
        }
        Ok(Self(name.to_string()))
    }

    /// The default trust domain of a cluster: `<cluster>.trellis.local`.
    pub fn for_cluster(cluster: &str) -> Result<Self, IdError> {
        check_name(cluster)?;
        Self::new(&format!("{cluster}.trellis.local"))
    }

    /// The trust domain's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<td>`, the trust domain's own ID (used as the bundle's key).
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    /// Accepts `td` or `spiffe://td`.
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s.strip_prefix("spiffe://").unwrap_or(s))
    }
}

/// What a SPIFFE ID names, in Trellis terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdKind<'a> {
    /// `/ns/<namespace>/sa/<service-account>`: a workload's identity.
    Workload {
        namespace: &'a str,
        service_account: &'a str,
    },
    /// `/trellis/node/<node>`: a node (its ztunnel).
    Node(&'a str),
    /// `/trellis/control`: the cluster's trellisd.
    Control,
    /// Any other path: valid SPIFFE, but no Trellis role.
    Other,
}

/// A SPIFFE ID: `spiffe://<trust-domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg/seg…`.
    path: String,
}

impl SpiffeId {
    /// Parses `spiffe://<td>/<path>`, rejecting anything the standard forbids (upper-case trust
    /// domains, ports, user info, query, fragment, percent-encoding, empty or dot segments).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong(s.chars().take(64).collect()));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdError::Scheme(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::new(td).map_err(|e| match e {
            IdError::EmptyTrustDomain(_) => IdError::EmptyTrustDomain(s.to_string()),
            other => other,
        })?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(IdError::EmptySegment(s.to_string())),
                    "." | ".." => return Err(IdError::DotSegment(s.to_string())),
                    _ => {}
                }
                let ok = segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
                if !ok {
                    return Err(IdError::PathChars(s.to_string()));
                }
            }
        }
        Ok(Self {
            trust_domain,
            path: path.to_string(),
        })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn workload(td: &TrustDomain, namespace: &str, service_account: &str) -> Result<Self, IdError> {
        check_name(namespace)?;
        check_name(service_account)?;
        Ok(Self {
            trust_domain: td.clone(),
            path: format!("/ns/{namespace}/sa/{service_account}"),
        })
    }

    /// `spiffe://<td>/trellis/node/<node>`.
    pub fn node(td: &TrustDomain, node: &str) -> Result<Self, IdError> {
        check_name(node)?;
        Ok(Self {
            trust_domain: td.clone(),
            path: format!("/trellis/node/{node}"),
        })
    }

    /// `spiffe://<td>/trellis/control`: trellisd's own identity.
    pub fn control(td: &TrustDomain) -> Self {
        Self {
            trust_domain: td.clone(),
            path: "/trellis/control".to_string(),
        }
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What the ID names in Trellis.
    pub fn kind(&self) -> IdKind<'_> {
        let segments: Vec<&str> = self.path.split('/').skip(1).collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => IdKind::Workload {
                namespace,
                service_account,
            },
            ["trellis", "node", node] => IdKind::Node(node),
            ["trellis", "control"] => IdKind::Control,
            _ => IdKind::Other,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

/// Checks a Kubernetes-style name (RFC 1123 label): namespaces, service accounts, nodes,
/// clusters.
pub fn check_name(name: &str) -> Result<(), IdError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(IdError::BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_round_trip_and_expose_namespace_and_account() {
        let id = SpiffeId::parse("spiffe://east.trellis.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "east.trellis.local");
        assert_eq!(
            id.kind(),
            IdKind::Workload {
                namespace: "shop",
                service_account: "web"
            }
        );
        assert_eq!(id.to_string(), "spiffe://east.trellis.local/ns/shop/sa/web");
        let td = TrustDomain::new("east.trellis.local").unwrap();
        assert_eq!(SpiffeId::workload(&td, "shop", "web").unwrap(), id);
    }

    #[test]
    fn node_and_control_ids_have_their_own_kinds() {
        let td = TrustDomain::for_cluster("east").unwrap();
        let node = SpiffeId::node(&td, "node-1").unwrap();
        assert_eq!(node.to_string(), "spiffe://east.trellis.local/trellis/node/node-1");
        assert_eq!(
            SpiffeId::parse(&node.to_string()).unwrap().kind(),
            IdKind::Node("node-1")
        );
        assert_eq!(SpiffeId::control(&td).kind(), IdKind::Control);
        assert_eq!(SpiffeId::parse("spiffe://td/foo/bar").unwrap().kind(), IdKind::Other);
        assert_eq!(SpiffeId::parse("spiffe://td").unwrap().kind(), IdKind::Other);
    }

    #[test]
    fn malformed_ids_are_rejected_with_the_reason() {
        let cases = [
            ("http://td/ns/a/sa/b", "spiffe://"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://East.local/ns/a", "lowercase"),
            ("spiffe://td:8080/ns/a", "lowercase"),
            ("spiffe://user@td/ns/a", "lowercase"),
            ("spiffe://td/ns//sa/b", "empty path segment"),
            ("spiffe://td/ns/a/", "empty path segment"),
            ("spiffe://td/ns/../sa", "'.' or '..'"),
            ("spiffe://td/ns/a?x=1", "path segments"),
            ("spiffe://td/ns/a#frag", "path segments"),
            ("spiffe://td/ns/a%20b", "path segments"),
        ];
        for (input, why) in cases {
            let err = SpiffeId::parse(input).expect_err(input).to_string();
            assert!(err.contains(why), "{input}: {err}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        assert!(matches!(SpiffeId::parse(&long), Err(IdError::TooLong(_))));
    }

    #[test]
    fn names_follow_kubernetes_label_rules() {
        let td = TrustDomain::new("td").unwrap();
        assert!(SpiffeId::workload(&td, "Shop", "web").is_err());
        assert!(SpiffeId::workload(&td, "shop", "").is_err());
        assert!(SpiffeId::node(&td, "-n").is_err());
        assert!(SpiffeId::node(&td, &"n".repeat(64)).is_err());
        assert!(TrustDomain::for_cluster("east_1").is_err());
    }
}
