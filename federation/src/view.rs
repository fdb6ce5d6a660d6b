//! What this cluster knows of the federation, built from etcd's keys and nothing else: a pure
//! state fed a list (the whole prefix at one revision) and then watch events, no I/O.
//!
//! Every key and value is untrusted. A key outside the layout, or a value that does not parse
//! or check, is refused and named in [`View::problems`]; the key keeps its last good value, so
//! garbage never erases good state. Then [`View::federation`] cross-checks the records against
//! each other. Trust follows root's grants (`grants/<cluster>`, which no member can write): a
//! cluster record counts only with the trust domain its grant names, and a bundle only for a
//! granted trust domain. A member is live while its record (on its lease) is there; its bundle
//! stays trusted while the bundle key is, so a member that lost etcd for a while keeps its
//! open connections, and one that left (bundle deleted) loses them. Services and endpoints
//! count only under a live member.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use trellis_identity::{TrustBundle, TrustDomain};

use crate::keys::PREFIX;
use crate::records::{decode, ClusterRecord, EndpointsRecord, ServiceRecord, TrafficRecord, MAX_VALUE_BYTES};

/// A key of the layout, parsed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Grant(String),
    Cluster(String),
    Bundle(String),
    Service {
        cluster: String,
        namespace: String,
        name: String,
    },
    Endpoints {
        cluster: String,
        namespace: String,
        name: String,
    },
    Traffic {
        namespace: String,
        name: String,
    },
}

impl Key {
    /// Parses an etcd key; the error says how it strays from the layout.
    pub fn parse(raw: &[u8]) -> Result<Key, String> {
        let text = std::str::from_utf8(raw).map_err(|_| "not UTF-8".to_string())?;
        let rest = text.strip_prefix(PREFIX).ok_or_else(|| format!("outside {PREFIX}"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let names = |parts: &[&str]| {
            parts
                .iter()
                .try_for_each(|p| trellis_identity::id::check_name(p).map_err(|e| format!("segment {p:?}: {e}")))
        };
        match parts.as_slice() {
            ["clusters", c] => names(&[c]).map(|_| Key::Cluster(c.to_string())),
            ["grants", c] => names(&[c]).map(|_| Key::Grant(c.to_string())),
            ["bundles", td] => TrustDomain::new(td)
                .map(|_| Key::Bundle(td.to_string()))
                .map_err(|e| format!("trust domain {td:?}: {e}")),
            ["services", c, ns, n] => names(&[c, ns, n]).map(|_| Key::Service {
                cluster: c.to_string(),
                namespace: ns.to_string(),
                name: n.to_string(),
            }),
            ["endpoints", c, ns, n] => names(&[c, ns, n]).map(|_| Key::Endpoints {
                cluster: c.to_string(),
                namespace: ns.to_string(),
                name: n.to_string(),
            }),
            ["traffic", ns, n] => names(&[ns, n]).map(|_| Key::Traffic {
                namespace: ns.to_string(),
                name: n.to_string(),
            }),
            _ => Err("not a key of the layout (grants/, clusters/, bundles/, services/, endpoints/, traffic/)".into()),
        }
    }
}

/// One key-value pair as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// A value that parsed and passed its own checks (cross-checks come in [`View::federation`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Grant(TrustDomain),
    Cluster {
        record: ClusterRecord,
        trust_domain: TrustDomain,
    },
    /// The raw JSON; parsed against the trust domain of its key.
    Bundle(TrustBundle),
    Service(ServiceRecord),
    /// Checked when it arrives, but for its owner: the trust domain its identities claim (with
    /// the first of them) is compared with the member's in [`View::federation`].
    Endpoints(Arc<EndpointsRecord>, Option<(TrustDomain, String)>),
    Traffic(TrafficRecord),
}

#[derive(Debug, Clone, PartialEq)]
struct Held {
    value: Value,
    create_revision: i64,
}

/// The federation as read from etcd.
#[derive(Debug, Clone, Default)]
pub struct View {
    held: BTreeMap<Key, Held>,
    /// Refusals by raw key (lossy UTF-8), with why.
    problems: BTreeMap<String, String>,
    revision: i64,
}

/// A member cluster, cross-checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub record: ClusterRecord,
    pub trust_domain: TrustDomain,
    pub bundle: Option<TrustBundle>,
    /// (namespace, name) → service.
    pub services: BTreeMap<(String, String), ServiceRecord>,
    /// Shared with the view: a new Federation copies pointers, not endpoints.
    pub endpoints: BTreeMap<(String, String), Arc<EndpointsRecord>>,
}

/// Everything [`View::federation`] accepts, by cluster name, and what it refused.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Federation {
    /// Live members (their record on its lease), by cluster name.
    pub members: BTreeMap<String, Member>,
    /// Every granted trust domain with its cluster and bundle, live member or not: what nodes trust.
    pub trusted: BTreeMap<TrustDomain, (String, TrustBundle)>,
    /// Every cluster root granted a trust domain (`grants/`), live member or not: the names an
    /// operator may give weights to.
    pub granted: BTreeSet<String>,
    /// `traffic/<ns>/<name>` by (namespace, name): cluster weights, each record checked.
    pub traffic: BTreeMap<(String, String), TrafficRecord>,
    /// `(key, why)`, sorted by key: from the keys' own checks and from the cross-checks.
    pub problems: Vec<(String, String)>,
    /// The etcd revision this was read at.
    pub revision: i64,
}

fn parse_value(key: &Key, value: &[u8]) -> Result<Value, String> {
    Ok(match key {
        Key::Grant(_) => {
            let record: crate::records::GrantRecord = decode(value)?;
            Value::Grant(TrustDomain::new(&record.trust_domain).map_err(|e| format!("trust domain: {e}"))?)
        }
        Key::Cluster(c) => {
            let record: ClusterRecord = decode(value)?;
            let trust_domain = record.check(c)?;
            Value::Cluster { record, trust_domain }
        }
        Key::Bundle(td) => {
            if value.len() > MAX_VALUE_BYTES {
                return Err(format!(
                    "the value is {} bytes; the limit is {MAX_VALUE_BYTES}",
                    value.len()
                ));
            }
            let td = TrustDomain::new(td).map_err(|e| e.to_string())?;
            Value::Bundle(TrustBundle::from_json(td, value).map_err(|e| e.to_string())?)
        }
        Key::Service { .. } => {
            let record: ServiceRecord = decode(value)?;
            record.check()?;
            Value::Service(record)
        }
        // The trust-domain check needs the cluster record: done in `federation`.
        Key::Endpoints { .. } => {
            let record: EndpointsRecord = decode(value)?;
            let claimed = record.claimed()?;
            Value::Endpoints(Arc::new(record), claimed)
        }
        Key::Traffic { .. } => {
            let record: TrafficRecord = decode(value)?;
            record.check()?;
            Value::Traffic(record)
        }
    })
}

impl View {
    /// Replaces everything with a complete list of the prefix taken at `revision`.
    pub fn reset(&mut self, kvs: Vec<Kv>, revision: i64) {
        let before = std::mem::take(&mut self.held);
        self.problems.clear();
        for kv in kvs {
            // A bad value keeps what the key held before the re-list, if anything.
            let key = Key::parse(&kv.key).ok();
            let kept = key.as_ref().and_then(|k| before.get(k).cloned());
            if let (Some(k), Some(h)) = (key, kept) {
                self.held.insert(k, h);
            }
            self.put(kv);
        }
        self.revision = revision;
    }

    /// A key was created or changed.
    pub fn put(&mut self, kv: Kv) {
        let name = String::from_utf8_lossy(&kv.key).into_owned();
        self.revision = self.revision.max(kv.mod_revision);
        let key = match Key::parse(&kv.key) {
            Ok(key) => key,
            Err(why) => {
                self.problems.insert(name, why);
                return;
            }
        };
        match parse_value(&key, &kv.value) {
            Ok(value) => {
                self.problems.remove(&name);
                self.held.insert(
                    key,
                    Held {
                        value,
                        create_revision: kv.create_revision,
                    },
                );
            }
            Err(why) => {
                let why = match self.held.contains_key(&key) {
                    true => format!("{why}; keeping its last good value"),
                    false => why,
                };
                self.problems.insert(name, why);
            }
        }
    }

    /// A key was deleted (or its lease expired) at `revision`.
    pub fn delete(&mut self, raw_key: &[u8], revision: i64) {
        self.revision = self.revision.max(revision);
        self.problems.remove(&String::from_utf8_lossy(raw_key).into_owned());
        if let Ok(key) = Key::parse(raw_key) {
            self.held.remove(&key);
        }
    }

    /// The revision of the last list or event applied.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The refusals of the keys' own checks, by key.
    pub fn problems(&self) -> &BTreeMap<String, String> {
        &self.problems
    }

    /// The accepted federation, cross-checked.
    pub fn federation(&self) -> Federation {
        let mut out = Federation {
            revision: self.revision,
            problems: self.problems.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ..Federation::default()
        };
        // Grants: a trust domain granted twice goes to the earlier grant.
        let mut granted: BTreeMap<TrustDomain, (i64, String)> = BTreeMap::new();
        for (key, held) in &self.held {
            if let (Key::Grant(name), Value::Grant(td)) = (key, &held.value) {
                let claim = (held.create_revision, name.clone());
                let entry = granted.entry(td.clone()).or_insert(claim.clone());
                if claim < *entry {
                    *entry = claim;
                }
            }
        }
        let mut grant_of: BTreeMap<String, TrustDomain> = BTreeMap::new();
        for (key, held) in &self.held {
            if let (Key::Grant(name), Value::Grant(td)) = (key, &held.value) {
                match granted.get(td) {
                    Some((_, owner)) if owner == name => {
                        grant_of.insert(name.clone(), td.clone());
                    }
                    Some((_, owner)) => out.problems.push((
                        crate::keys::grant(name),
                        format!("grants trust domain {td}, which cluster {owner} was granted first"),
                    )),
                    None => {}
                }
            }
        }
        out.granted = grant_of.keys().cloned().collect();
        for (key, held) in &self.held {
            let Key::Cluster(name) = key else { continue };
            let Value::Cluster { record, trust_domain } = &held.value else {
                continue;
            };
            match grant_of.get(name) {
                None => {
                    out.problems.push((
                        crate::keys::cluster(name),
                        format!("cluster {name} has no grant (trellis federation grant); not a member"),
                    ));
                    continue;
                }
                Some(td) if td != trust_domain => {
                    out.problems.push((
                        crate::keys::cluster(name),
                        format!("claims trust domain {trust_domain}, but cluster {name} was granted {td}"),
                    ));
                    continue;
                }
                Some(_) => {}
            }
            out.members.insert(
                name.clone(),
                Member {
                    record: record.clone(),
                    trust_domain: trust_domain.clone(),
                    bundle: None,
                    services: BTreeMap::new(),
                    endpoints: BTreeMap::new(),
                },
            );
        }
        for (key, held) in &self.held {
            match (key, &held.value) {
                (Key::Bundle(_), Value::Bundle(bundle)) => {
                    let td = &bundle.trust_domain;
                    match grant_of.iter().find(|(_, g)| *g == td) {
                        Some((cluster, _)) => {
                            out.trusted.insert(td.clone(), (cluster.clone(), bundle.clone()));
                            if let Some(m) = out.members.get_mut(cluster) {
                                m.bundle = Some(bundle.clone());
                            }
                        }
                        None => out.problems.push((
                            crate::keys::bundle(td.as_str()),
                            format!("a bundle for trust domain {td}, which no cluster was granted; not trusted"),
                        )),
                    }
                }
                (
                    Key::Service {
                        cluster,
                        namespace,
                        name,
                    },
                    Value::Service(s),
                ) => match out.members.get_mut(cluster) {
                    Some(m) => {
                        m.services.insert((namespace.clone(), name.clone()), s.clone());
                    }
                    None => out.problems.push((
                        crate::keys::service(cluster, namespace, name),
                        format!("cluster {cluster} is not a member"),
                    )),
                },
                (
                    Key::Endpoints {
                        cluster,
                        namespace,
                        name,
                    },
                    Value::Endpoints(e, claimed),
                ) => {
                    let raw = crate::keys::endpoints(cluster, namespace, name);
                    match out.members.get_mut(cluster) {
                        Some(m) => match claimed {
                            Some((td, first)) if td != &m.trust_domain => out.problems.push((
                                raw,
                                format!("{first}, outside the cluster's trust domain {}", m.trust_domain),
                            )),
                            _ => {
                                m.endpoints.insert((namespace.clone(), name.clone()), e.clone());
                            }
                        },
                        None => out.problems.push((raw, format!("cluster {cluster} is not a member"))),
                    }
                }
                (Key::Traffic { namespace, name }, Value::Traffic(t)) => {
                    out.traffic.insert((namespace.clone(), name.clone()), t.clone());
                }
                _ => {}
            }
        }
        out.problems.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use crate::records::{encode, EndpointRecord, GrantRecord};

    fn kv(key: &str, value: &str, create: i64) -> Kv {
        Kv {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision: create,
            mod_revision: create,
        }
    }

    fn grant(cluster: &str, td: &str, create: i64) -> Kv {
        let value = encode(&GrantRecord {
            trust_domain: td.into(),
        });
        kv(&keys::grant(cluster), &value, create)
    }

    fn cluster(name: &str, td: &str) -> String {
        encode(&ClusterRecord {
            name: name.into(),
            trust_domain: td.into(),
            network: name.into(),
            region: String::new(),
            zone: String::new(),
            gateway: None,
        })
    }

    fn endpoints(identity: &str) -> String {
        encode(&EndpointsRecord {
            endpoints: vec![EndpointRecord {
                address: "10.2.1.10".parse().unwrap(),
                identity: identity.into(),
                node: "node-1".into(),
                node_address: "10.2.0.11".parse().unwrap(),
                zone: String::new(),
            }],
            behind_gateway: Vec::new(),
        })
    }

    #[test]
    fn a_granted_member_with_its_endpoints_is_accepted() {
        let mut v = View::default();
        v.reset(
            vec![
                grant("west", "west.trellis.local", 1),
                kv(&keys::cluster("west"), &cluster("west", "west.trellis.local"), 2),
                kv(
                    &keys::endpoints("west", "demo", "hello"),
                    &endpoints("spiffe://west.trellis.local/ns/demo/sa/hello"),
                    3,
                ),
            ],
            3,
        );
        let f = v.federation();
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert_eq!(f.members["west"].endpoints.len(), 1);
        assert_eq!(f.revision, 3);
    }

    #[test]
    fn garbage_is_named_and_the_last_good_value_stays() {
        let mut v = View::default();
        let key = keys::cluster("west");
        v.put(grant("west", "west.trellis.local", 1));
        v.put(kv(&key, &cluster("west", "west.trellis.local"), 2));
        v.put(kv(&key, "{not json", 5));
        v.put(kv("/trellis/v1/secrets/x", "{}", 6));
        v.put(kv("/elsewhere", "{}", 7));
        let f = v.federation();
        assert!(f.members.contains_key("west"), "the good value stayed");
        let named: Vec<&str> = f.problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            named,
            ["/elsewhere", "/trellis/v1/clusters/west", "/trellis/v1/secrets/x"]
        );
        assert!(
            f.problems[1].1.contains("keeping its last good value"),
            "{:?}",
            f.problems
        );
        // A re-list with the same garbage keeps it too; a fixed value clears the problem.
        v.reset(
            vec![grant("west", "west.trellis.local", 1), kv(&key, "{not json", 2)],
            8,
        );
        assert!(v.federation().members.contains_key("west"));
        v.put(kv(&key, &cluster("west", "west.trellis.local"), 2));
        assert!(v.federation().problems.is_empty());
    }

    #[test]
    fn a_trust_domain_is_only_the_one_root_granted_and_endpoints_stay_inside_it() {
        let mut v = View::default();
        v.put(grant("west", "west.trellis.local", 1));
        v.put(grant("evil", "evil.trellis.local", 2));
        v.put(grant("copycat", "west.trellis.local", 3));
        v.put(kv(&keys::cluster("west"), &cluster("west", "west.trellis.local"), 4));
        // A member claiming another's trust domain, one never granted, and a second grant of a domain.
        v.put(kv(&keys::cluster("evil"), &cluster("evil", "west.trellis.local"), 9));
        v.put(kv(
            &keys::cluster("stranger"),
            &cluster("stranger", "stranger.trellis.local"),
            9,
        ));
        v.put(kv(
            &keys::cluster("copycat"),
            &cluster("copycat", "west.trellis.local"),
            9,
        ));
        v.put(kv(
            &keys::endpoints("west", "demo", "hello"),
            &endpoints("spiffe://east.trellis.local/ns/demo/sa/hello"),
            10,
        ));
        let f = v.federation();
        assert_eq!(f.members.keys().collect::<Vec<_>>(), ["west"]);
        let why = |key: &str| {
            f.problems
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, w)| w.clone())
                .unwrap_or_default()
        };
        assert!(why(&keys::cluster("evil")).contains("but cluster evil was granted evil.trellis.local"));
        assert!(why(&keys::cluster("stranger")).contains("has no grant"));
        assert!(why(&keys::grant("copycat")).contains("which cluster west was granted first"));
        assert!(why(&keys::cluster("copycat")).contains("has no grant"));
        assert!(why(&keys::endpoints("west", "demo", "hello")).contains("outside the cluster's trust domain"));
        assert_eq!(
            f.granted.iter().collect::<Vec<_>>(),
            ["evil", "west"],
            "copycat's grant came second: not granted"
        );
        // West's lease expired: no longer a member; its endpoints no longer served.
        v.delete(keys::cluster("west").as_bytes(), 11);
        let f = v.federation();
        assert!(f.members.is_empty());
        assert!(f
            .problems
            .iter()
            .any(|(k, w)| k == &keys::endpoints("west", "demo", "hello") && w.contains("not a member")));
    }
}
