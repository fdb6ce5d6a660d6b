//! A subscriber's copy of its node slice, and the pure rules that keep it: how a resource is
//! keyed, whether an update can be applied, and how it is applied. The config-stream client
//! ([`crate::stream`]), ztunnel's static mode and the tests all apply updates through these.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::v1 as pb;
use crate::config::v1::resource::Kind as Variant;

/// Identifies a resource in the config stream. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResKey {
    pub kind: pb::Kind,
    pub name: Arc<str>,
}

impl ResKey {
    pub fn new(kind: pb::Kind, name: &str) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }

    pub fn to_proto(&self) -> pb::ResourceKey {
        pb::ResourceKey {
            kind: self.kind as i32,
            name: self.name.to_string(),
        }
    }
}

/// One node's view as a subscriber holds it: every resource it should hold, by key.
pub type Slice = BTreeMap<ResKey, Arc<pb::Resource>>;

/// Whether a subscriber can apply `update`: every key and resource has a known kind.
pub fn check(update: &pb::ConfigUpdate) -> Result<(), String> {
    for key in &update.removals {
        pb::Kind::try_from(key.kind).map_err(|_| format!("unknown kind {} in a removal", key.kind))?;
    }
    if update.upserts.iter().any(|r| key_of(r).is_none()) {
        return Err("a resource with no kind".into());
    }
    Ok(())
}

/// Applies an update to a slice, as a subscriber does; pure, for tests and clients.
/// The update is taken by value: its resources move into the slice without a copy.
pub fn apply(slice: &mut Slice, update: pb::ConfigUpdate) -> Result<(), String> {
    if update.snapshot {
        slice.clear();
    }
    for key in &update.removals {
        let kind = pb::Kind::try_from(key.kind).map_err(|_| format!("unknown kind {}", key.kind))?;
        slice.remove(&ResKey::new(kind, &key.name));
    }
    for r in update.upserts {
        let key = key_of(&r).ok_or("a resource with no kind")?;
        slice.insert(key, Arc::new(r));
    }
    Ok(())
}

/// The key of a resource, read off its content.
pub fn key_of(r: &pb::Resource) -> Option<ResKey> {
    let (kind, ns, name) = match r.kind.as_ref()? {
        Variant::Workload(w) => (pb::Kind::Workload, &w.namespace, &w.name),
        Variant::Service(s) => (pb::Kind::Service, &s.namespace, &s.name),
        Variant::AuthorizationPolicy(p) => (pb::Kind::AuthorizationPolicy, &p.namespace, &p.name),
        Variant::Waypoint(w) => (pb::Kind::Waypoint, &w.namespace, &w.name),
        Variant::HttpRoute(h) => (pb::Kind::HttpRoute, &h.namespace, &h.name),
        Variant::RemoteCluster(c) => return Some(ResKey::new(pb::Kind::RemoteCluster, &c.name)),
        Variant::TrustBundle(b) => return Some(ResKey::new(pb::Kind::TrustBundle, &b.trust_domain)),
        Variant::WorkloadAddresses(a) => {
            return Some(ResKey::new(pb::Kind::WorkloadAddresses, &format!("{}/", a.namespace)))
        }
    };
    Some(ResKey::new(kind, &format!("{ns}/{name}")))
}
