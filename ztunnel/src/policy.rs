//! L4 authorization at the destination, as a pure function.
//!
//! Semantics follow Istio's AuthorizationPolicy: a DENY policy that matches wins; otherwise, if
//! any ALLOW policy selects the workload, one of them must match; otherwise the connection is
//! allowed. Within a rule every non-empty field must match; an ALLOW policy with no rules
//! matches nothing (allow-nothing), a DENY policy with no rules denies nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use trellis_api::config::v1 as pb;
use trellis_identity::{IdKind, Principal, SpiffeId};

/// What a policy does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// One rule: every non-empty field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub principals: Vec<Principal>,
    pub not_principals: Vec<Principal>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ports: Vec<u16>,
}

/// An AuthorizationPolicy as ztunnel enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    /// Labels a workload must carry; empty selects every workload of the namespace.
    pub selector: BTreeMap<String, String>,
    pub rules: Vec<Rule>,
}

/// Who is connecting, as the destination sees it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The verified SPIFFE ID; `None` for plaintext sources.
    pub principal: Option<&'a SpiffeId>,
    pub port: u16,
}

/// The outcome, with the policy that decided it (for the log and metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied; the string says why ("policy shop/deny-web", "no ALLOW policy matched").
    Deny(String),
}

impl Policy {
    /// Converts the wire form, rejecting principals and ports that cannot be enforced.
    pub fn from_pb(p: &pb::AuthorizationPolicy) -> Result<Self, String> {
        let action = match pb::Action::try_from(p.action) {
            Ok(pb::Action::Allow) => Action::Allow,
            Ok(pb::Action::Deny) => Action::Deny,
            _ => return Err(format!("action {} is neither ALLOW nor DENY", p.action)),
        };
        let principals = |list: &[String]| {
            list.iter()
                .map(|s| Principal::parse(s).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()
        };
        let rules = p
            .rules
            .iter()
            .map(|r| {
                Ok(Rule {
                    principals: principals(&r.principals)?,
                    not_principals: principals(&r.not_principals)?,
                    namespaces: r.namespaces.clone(),
                    not_namespaces: r.not_namespaces.clone(),
                    ports: r
                        .ports
                        .iter()
                        .map(|&port| u16::try_from(port).map_err(|_| format!("bad port {port}")))
                        .collect::<Result<_, String>>()?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            action,
            selector: p.selector.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            rules,
        })
    }

    /// What stands in for a policy that cannot be enforced as written: a DENY that matches
    /// every source of the workloads its selector picks, named so the log says why.
    pub fn unusable(p: &pb::AuthorizationPolicy, why: &str) -> Self {
        Self {
            name: format!("{} (unusable: {why})", p.name),
            namespace: p.namespace.clone(),
            action: Action::Deny,
            selector: p.selector.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            rules: vec![Rule::default()],
        }
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    fn matches(&self, source: &Source<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(source))
    }
}

impl Rule {
    fn matches(&self, source: &Source<'_>) -> bool {
        let namespace = source.principal.and_then(|id| match id.kind() {
            IdKind::Workload { namespace, .. } => Some(namespace.to_string()),
            _ => None,
        });
        let in_ns = |list: &[String]| {
            namespace
                .as_ref()
                .is_some_and(|ns| list.iter().any(|n| n == ns || n == "*"))
        };
        (self.principals.is_empty() || self.principals.iter().any(|p| p.matches(source.principal)))
            && !self.not_principals.iter().any(|p| p.matches(source.principal))
            && (self.namespaces.is_empty() || in_ns(&self.namespaces))
            && !in_ns(&self.not_namespaces)
            && (self.ports.is_empty() || self.ports.contains(&source.port))
    }
}

/// Decides whether `source` may reach a workload with `labels`, under its namespace's policies.
pub fn authorize(policies: &[Arc<Policy>], labels: &BTreeMap<String, String>, source: &Source<'_>) -> Decision {
    let selecting = policies.iter().filter(|p| p.selects(labels));
    let mut allow_exists = false;
    let mut allowed = false;
    for policy in selecting {
        match policy.action {
            Action::Deny if policy.matches(source) => {
                return Decision::Deny(format!("denied by policy {}/{}", policy.namespace, policy.name))
            }
            Action::Deny => {}
            Action::Allow => {
                allow_exists = true;
                allowed = allowed || policy.matches(source);
            }
        }
    }
    if allow_exists && !allowed {
        return Decision::Deny("no ALLOW policy matched".into());
    }
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn policy(action: Action, rules: Vec<Rule>) -> Arc<Policy> {
        Arc::new(Policy {
            name: "p".into(),
            namespace: "shop".into(),
            action,
            selector: BTreeMap::from([("app".into(), "cart".into())]),
            rules,
        })
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("app".into(), app.into())])
    }

    #[test]
    fn no_policy_allows_everything() {
        let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
        let src = Source {
            principal: Some(&web),
            port: 80,
        };
        assert_eq!(authorize(&[], &labels("cart"), &src), Decision::Allow);
    }

    #[test]
    fn deny_blocks_exactly_the_named_principal_and_port() {
        let rule = Rule {
            principals: vec![Principal::parse("ns/shop/sa/web").unwrap()],
            ports: vec![8080],
            ..Default::default()
        };
        let policies = [policy(Action::Deny, vec![rule])];
        let web_east = id("spiffe://east.trellis.local/ns/shop/sa/web");
        let web_west = id("spiffe://west.trellis.local/ns/shop/sa/web");
        let api = id("spiffe://east.trellis.local/ns/shop/sa/api");
        let at = |principal, port| authorize(&policies, &labels("cart"), &Source { principal, port });
        assert!(matches!(at(Some(&web_east), 8080), Decision::Deny(_)));
        assert!(
            matches!(at(Some(&web_west), 8080), Decision::Deny(_)),
            "ns/sa form spans trust domains"
        );
        assert_eq!(at(Some(&web_east), 9090), Decision::Allow, "another port");
        assert_eq!(at(Some(&api), 8080), Decision::Allow, "another principal");
        assert_eq!(
            authorize(
                &policies,
                &labels("other"),
                &Source {
                    principal: Some(&web_east),
                    port: 8080
                }
            ),
            Decision::Allow,
            "the selector does not pick this workload"
        );
    }

    #[test]
    fn a_policy_that_cannot_be_enforced_denies_what_it_selects() {
        let wire = pb::AuthorizationPolicy {
            name: "broken".into(),
            namespace: "shop".into(),
            action: pb::Action::Unspecified as i32,
            selector: [("app".to_string(), "cart".to_string())].into(),
            rules: vec![],
        };
        let why = Policy::from_pb(&wire).unwrap_err();
        let policies = [Arc::new(Policy::unusable(&wire, &why))];
        let web = id("spiffe://east.trellis.local/ns/shop/sa/web");
        for principal in [Some(&web), None] {
            let decision = authorize(&policies, &labels("cart"), &Source { principal, port: 80 });
            assert!(
                matches!(&decision, Decision::Deny(why) if why.contains("unusable")),
                "{decision:?}"
            );
        }
        let other = authorize(
            &policies,
            &labels("other"),
            &Source {
                principal: Some(&web),
                port: 80,
            },
        );
        assert_eq!(other, Decision::Allow, "only what its selector picks is denied");
    }

    #[test]
    fn allow_policies_turn_the_default_into_deny() {
        let rule = Rule {
            namespaces: vec!["shop".into()],
            not_principals: vec![Principal::parse("spiffe://east.trellis.local/ns/shop/sa/web").unwrap()],
            ..Default::default()
        };
        let policies = [policy(Action::Allow, vec![rule])];
        let at = |principal: Option<&SpiffeId>| authorize(&policies, &labels("cart"), &Source { principal, port: 1 });
        assert_eq!(
            at(Some(&id("spiffe://east.trellis.local/ns/shop/sa/api"))),
            Decision::Allow
        );
        assert!(matches!(
            at(Some(&id("spiffe://east.trellis.local/ns/shop/sa/web"))),
            Decision::Deny(_)
        ));
        assert!(matches!(
            at(Some(&id("spiffe://east.trellis.local/ns/other/sa/x"))),
            Decision::Deny(_)
        ));
        assert!(matches!(at(None), Decision::Deny(_)), "plaintext has no namespace");
    }

    #[test]
    fn empty_rules_allow_nothing_and_deny_nothing() {
        let api = id("spiffe://east.trellis.local/ns/shop/sa/api");
        let src = Source {
            principal: Some(&api),
            port: 1,
        };
        assert!(matches!(
            authorize(&[policy(Action::Allow, vec![])], &labels("cart"), &src),
            Decision::Deny(_)
        ));
        assert_eq!(
            authorize(&[policy(Action::Deny, vec![])], &labels("cart"), &src),
            Decision::Allow
        );
    }

    #[test]
    fn bad_principals_are_refused_with_a_reason() {
        let wire = pb::AuthorizationPolicy {
            name: "p".into(),
            namespace: "shop".into(),
            action: pb::Action::Allow as i32,
            selector: Default::default(),
            rules: vec![pb::PolicyRule {
                principals: vec!["shop/web".into()],
                ..Default::default()
            }],
        };
        let err = Policy::from_pb(&wire).unwrap_err();
        assert!(err.contains("ns/<namespace>/sa/<service-account>"), "{err}");
    }
}
