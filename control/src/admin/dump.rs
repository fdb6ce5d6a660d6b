//! The JSON of `/config_dump`: each resource as a plain object with the field names of
//! `config.proto`, addresses as text (`"10.1.0.12"`), enums by name (`"ALLOW"`, `"HTTP"`), the
//! oneof unwrapped. prost's types do not derive `Serialize`, so the mapping is written out per
//! kind; a field added to the contract is added here too.

use serde_json::{json, Map, Value};
use trellis_api::config::v1 as pb;
use trellis_api::config::v1::resource::Kind as Variant;

/// One resource as JSON (`null` for a resource without a kind, which the model never holds).
pub fn resource(r: &pb::Resource) -> Value {
    match &r.kind {
        Some(Variant::Workload(w)) => workload(w),
        Some(Variant::Service(s)) => service(s),
        Some(Variant::AuthorizationPolicy(p)) => policy(p),
        Some(Variant::Waypoint(w)) => waypoint(w),
        Some(Variant::HttpRoute(r)) => route(r),
        Some(Variant::RemoteCluster(c)) => remote_cluster(c),
        Some(Variant::TrustBundle(b)) => trust_bundle(b),
        Some(Variant::WorkloadAddresses(a)) => workload_addresses(a),
        None => Value::Null,
    }
}

fn workload(w: &pb::Workload) -> Value {
    json!({
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "service_account": w.service_account,
        "node": w.node,
        "cluster": w.cluster,
        "network": w.network,
        "addresses": addresses(&w.addresses),
        "labels": w.labels,
        "ready": w.ready,
        "enrolled": w.enrolled,
        "identity": w.identity,
        "waypoint": w.waypoint,
        "locality": locality(w.locality.as_ref()),
        "node_address": address(&w.node_address),
    })
}

fn workload_addresses(a: &pb::WorkloadAddresses) -> Value {
    let workloads: Vec<Value> = a
        .workloads
        .iter()
        .map(|w| {
            json!({
                "name": w.name,
                "node": w.node,
                "address": address(&w.address),
                "node_address": address(&w.node_address),
                "service_account": w.service_account,
                "enrolled": w.enrolled,
                "ready": w.ready,
                "waypoint": w.waypoint,
                "locality": locality(w.locality.as_ref()),
            })
        })
        .collect();
    json!({
        "namespace": a.namespace,
        "cluster": a.cluster,
        "trust_domain": a.trust_domain,
        "workloads": workloads,
    })
}

fn service(s: &pb::Service) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "port": p.port,
                "target_port": p.target_port,
                "protocol": enum_name(pb::Protocol::try_from(p.protocol).map(|p| p.as_str_name()), p.protocol, "PROTOCOL_"),
            })
        })
        .collect();
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "workload_name": e.workload_name,
                "workload_namespace": e.workload_namespace,
                "cluster": e.cluster,
                "address": address(&e.address),
                "node": e.node,
                "healthy": e.healthy,
                "locality": locality(e.locality.as_ref()),
                "identity": e.identity,
                "enrolled": e.enrolled,
                "node_address": address(&e.node_address),
                "gateway_identity": e.gateway_identity,
                "gateway_port": e.gateway_port,
                "weight": e.weight,
            })
        })
        .collect();
    json!({
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": addresses(&s.vips),
        "ports": ports,
        "endpoints": endpoints,
        "global": s.global,
        "waypoint": s.waypoint,
        "cluster_weights": s.cluster_weights,
    })
}

fn policy(p: &pb::AuthorizationPolicy) -> Value {
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            json!({
                "principals": r.principals,
                "namespaces": r.namespaces,
                "ports": r.ports,
                "not_principals": r.not_principals,
                "not_namespaces": r.not_namespaces,
            })
        })
        .collect();
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "action": enum_name(pb::Action::try_from(p.action).map(|a| a.as_str_name()), p.action, "ACTION_"),
        "selector": p.selector,
        "rules": rules,
    })
}

fn waypoint(w: &pb::Waypoint) -> Value {
    json!({
        "name": w.name,
        "namespace": w.namespace,
        "addresses": addresses(&w.addresses),
        "hbone_port": w.hbone_port,
        "identity": w.identity,
    })
}

fn route(r: &pb::HttpRoute) -> Value {
    let rules: Vec<Value> = r
        .rules
        .iter()
        .map(|rule| {
            let matches: Vec<Value> = rule
                .matches
                .iter()
                .map(|m| {
                    json!({
                        "path_prefix": m.path_prefix,
                        "path_exact": m.path_exact,
                        "method": m.method,
                        "headers": m.headers,
                    })
                })
                .collect();
            let backends: Vec<Value> = rule
                .backends
                .iter()
                .map(|b| {
                    json!({
                        "service": b.service,
                        "namespace": b.namespace,
                        "port": b.port,
                        "weight": b.weight,
                        "cluster": b.cluster,
                    })
                })
                .collect();
            json!({
                "matches": matches,
                "backends": backends,
                "timeout_ms": rule.timeout_ms,
                "retries": rule.retries,
            })
        })
        .collect();
    json!({
        "name": r.name,
        "namespace": r.namespace,
        "parents": r.parents,
        "hostnames": r.hostnames,
        "rules": rules,
    })
}

fn remote_cluster(c: &pb::RemoteCluster) -> Value {
    json!({
        "name": c.name,
        "trust_domain": c.trust_domain,
        "network": c.network,
        "locality": locality(c.locality.as_ref()),
        "gateway_address": address(&c.gateway_address),
        "gateway_hbone_port": c.gateway_hbone_port,
        "gateway_quic_port": c.gateway_quic_port,
        "healthy": c.healthy,
    })
}

/// A trust bundle's certificates are not repeated in the dump: their count and sizes say
/// which bundle a node holds; `/certs` on a ztunnel shows the certificates themselves.
fn trust_bundle(b: &pb::TrustBundle) -> Value {
    let sizes: Vec<usize> = b.x509_authorities.iter().map(Vec::len).collect();
    json!({
        "trust_domain": b.trust_domain,
        "x509_authority_der_bytes": sizes,
        "sequence": b.sequence,
        "refresh_hint_seconds": b.refresh_hint_seconds,
    })
}

fn locality(l: Option<&pb::Locality>) -> Value {
    match l {
        Some(l) => json!({"region": l.region, "zone": l.zone}),
        None => Value::Null,
    }
}

/// An address field as text: `null` when unset (empty), a note when malformed.
fn address(bytes: &[u8]) -> Value {
    match trellis_api::addr::optional(bytes) {
        Ok(Some(ip)) => ip.to_string().into(),
        Ok(None) => Value::Null,
        Err(e) => format!("<{e}>").into(),
    }
}

fn addresses(list: &[Vec<u8>]) -> Value {
    list.iter().map(|a| address(a)).collect::<Vec<_>>().into()
}

/// A protobuf enum by name without its prefix (`ACTION_ALLOW` → `ALLOW`); an unknown number as
/// itself.
fn enum_name(name: Result<&str, prost::UnknownEnumValue>, number: i32, prefix: &str) -> Value {
    match name {
        Ok(name) => name.strip_prefix(prefix).unwrap_or(name).into(),
        Err(_) => number.into(),
    }
}

/// `key → resource` for one kind of the model, in the model's order.
pub fn by_key<'a, K: ToString + 'a>(
    items: impl Iterator<Item = (&'a K, &'a std::sync::Arc<trellis_mesh::model::Entry>)>,
) -> Map<String, Value> {
    items.map(|(k, e)| (k.to_string(), resource(&e.resource))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Vec<u8> {
        trellis_api::addr::to_bytes(s.parse().unwrap())
    }

    #[test]
    fn a_workload_is_an_object_with_text_addresses() {
        let w = pb::Resource {
            kind: Some(Variant::Workload(pb::Workload {
                name: "cart-1".into(),
                namespace: "shop".into(),
                addresses: vec![ip("10.1.0.12"), ip("fd00::12")],
                enrolled: true,
                locality: Some(pb::Locality {
                    region: "eu".into(),
                    zone: "eu-1".into(),
                }),
                ..Default::default()
            })),
        };
        let v = resource(&w);
        assert_eq!(v["name"], "cart-1");
        assert_eq!(v["addresses"], json!(["10.1.0.12", "fd00::12"]));
        assert_eq!(v["enrolled"], true);
        assert_eq!(v["locality"], json!({"region": "eu", "zone": "eu-1"}));
        assert_eq!(v["node_address"], Value::Null, "an unset address is null");
    }

    #[test]
    fn enums_are_named_and_bad_addresses_are_flagged() {
        let p = pb::Resource {
            kind: Some(Variant::AuthorizationPolicy(pb::AuthorizationPolicy {
                name: "deny-web".into(),
                action: pb::Action::Deny as i32,
                rules: vec![pb::PolicyRule {
                    principals: vec!["ns/shop/sa/web".into()],
                    ports: vec![80],
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        let v = resource(&p);
        assert_eq!(v["action"], "DENY");
        assert_eq!(v["rules"][0]["principals"], json!(["ns/shop/sa/web"]));
        let s = pb::Resource {
            kind: Some(Variant::Service(pb::Service {
                vips: vec![vec![1, 2, 3]],
                ports: vec![pb::ServicePort {
                    port: 80,
                    protocol: 99,
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        let v = resource(&s);
        assert_eq!(v["vips"], json!(["<an address of 3 bytes (want 4 or 16)>"]));
        assert_eq!(
            v["ports"][0]["protocol"], 99,
            "an unknown enum value is kept as its number"
        );
    }
}
