//! Kubernetes-shaped YAML manifests: the documents a manifest file may hold, parsed strictly,
//! each error carrying the line it comes from.
//!
//! Kinds: `Namespace`, `Service`, `Workload` (a Pod-like object with node and IP),
//! `HTTPRoute` (Gateway API), `AuthorizationPolicy` and `Waypoint` (Trellis).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;

use serde::Deserialize;
use serde_saphyr::granit_parser::{Event, Parser};

use trellis_identity::Principal;

use crate::inventory::{
    FederationObj, Inventory, NamespaceObj, ObjectKey, PolicyAction, PolicyObj, PolicyRuleObj, PortObj, Protocol,
    RouteBackendObj, RouteMatchObj, RouteObj, RouteRuleObj, ServiceObj, WaypointObj, WorkloadObj,
};

/// Largest manifest file read, in bytes.
pub const MAX_FILE_BYTES: usize = 16 * 1024 * 1024;

/// One problem in one manifest file, pointing at the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// 1-based line in the file (0 when the whole file is at fault).
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

#[derive(Debug, Deserialize)]
struct Header {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Trellis reads [`crate::model::TUNNEL_ADDRESS`] and Istio's
    /// [`crate::model::ISTIO_REDIRECTION`] on workloads; the rest are accepted and ignored.
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc<S> {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: Meta,
    spec: Option<S>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoSpec {}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortSpec {
    #[serde(default)]
    name: String,
    port: u32,
    #[serde(default)]
    target_port: Option<u32>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadSpec {
    #[serde(default)]
    service_account: Option<String>,
    node: String,
    ip: String,
    /// The node's address (a Pod's `status.hostIP`): where tunnels to this workload go.
    #[serde(default, rename = "nodeIP")]
    node_ip: Option<String>,
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FederationSpec {
    cluster: String,
    etcd: EtcdSpec,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    gateway: Option<GatewaySpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EtcdSpec {
    endpoints: Vec<String>,
    ca_file: String,
    cert_file: String,
    key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GatewaySpec {
    address: String,
    #[serde(default = "default_hbone_port")]
    hbone_port: u32,
    #[serde(default)]
    quic_port: Option<u32>,
}

fn default_hbone_port() -> u32 {
    15008
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteSpec {
    #[serde(default)]
    parent_refs: Vec<RefSpec>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<RouteRuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RefSpec {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    /// Accepted for Gateway API compatibility (parents and backends are Services).
    #[serde(default, rename = "kind")]
    _kind: Option<String>,
    #[serde(default, rename = "group")]
    _group: Option<String>,
    #[serde(default)]
    port: Option<u32>,
    #[serde(default)]
    weight: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteRuleSpec {
    #[serde(default)]
    matches: Vec<MatchSpec>,
    #[serde(default)]
    backend_refs: Vec<RefSpec>,
    #[serde(default)]
    timeouts: Option<TimeoutSpec>,
    #[serde(default)]
    retry: Option<RetrySpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutSpec {
    #[serde(default)]
    request: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetrySpec {
    #[serde(default)]
    attempts: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchSpec {
    #[serde(default)]
    path: Option<PathSpec>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    headers: Vec<HeaderSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathSpec {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: String,
    value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PolicySpec {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    selector: Option<SelectorSpec>,
    #[serde(default)]
    rules: Vec<PolicyRuleSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SelectorSpec {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyRuleSpec {
    #[serde(default)]
    from: Option<FromSpec>,
    #[serde(default)]
    to: Option<ToSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FromSpec {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToSpec {
    #[serde(default)]
    ports: Vec<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WaypointSpec {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    service_account: Option<String>,
}

/// Splits a multi-document YAML stream into its documents, with YAML's own parser (so `---`
/// followed by content, `...`, directives and comments all mean what YAML says): (first line
/// of the document, its text). Documents with no content are skipped.
pub fn documents(text: &str) -> Result<Vec<(u64, String)>, ManifestError> {
    let roots = document_roots(text).map_err(|(line, message)| ManifestError { line, message })?;
    Ok(roots
        .into_iter()
        .map(|root| {
            let line = text[..root.start].matches('\n').count() as u64 + 1;
            (line, text[root].to_string())
        })
        .collect())
}

/// The byte range of each document's root node in a YAML stream, in order; comments, markers
/// and blank lines around a root are outside it, and so are a root's tag or anchor and a block
/// scalar's `|` header (only mapping roots are replaced here). Empty documents have no range.
pub(crate) fn document_roots(text: &str) -> Result<Vec<Range<usize>>, (u64, String)> {
    let byte = |m: &serde_saphyr::granit_parser::Marker| {
        m.byte_offset()
            .unwrap_or_else(|| text.char_indices().nth(m.index()).map_or(text.len(), |(b, _)| b))
    };
    let mut roots = Vec::new();
    let mut current: Option<Range<usize>> = None;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| (e.marker().line() as u64, format!("invalid YAML: {}", e.info())))?;
        let (start, end) = (byte(&span.start), byte(&span.end));
        match event {
            Event::DocumentEnd => roots.extend(current.take().map(|mut root| {
                // An indented root starts at its line's start, so its text parses alone.
                let line_start = text[..root.start].rfind('\n').map_or(0, |i| i + 1);
                if text[line_start..root.start].bytes().all(|b| b == b' ') {
                    root.start = line_start;
                }
                root
            })),
            // A block collection's start and end are zero-width marks at the next token, which
            // may lie past trailing comments: the root ends where its last content ends.
            Event::Scalar(..)
            | Event::Alias(..)
            | Event::MappingStart(..)
            | Event::MappingEnd
            | Event::SequenceStart(..)
            | Event::SequenceEnd
                if end > start =>
            {
                let range = current.get_or_insert(start..end);
                range.start = range.start.min(start);
                range.end = range.end.max(end);
            }
            _ => {}
        }
    }
    Ok(roots)
}

fn yaml_error(first_line: u64, e: &serde_saphyr::Error) -> ManifestError {
    let line = e
        .location()
        .map_or(first_line, |l| first_line + l.line().saturating_sub(1));
    // The rendered message repeats the snippet; the first line says what is wrong.
    let full = e.to_string();
    let message = full.lines().next().unwrap_or("invalid YAML").trim().to_string();
    ManifestError { line, message }
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    trellis_identity::id::check_name(name)
        .map_err(|_| format!("{what} {name:?} is not a valid name: use lowercase letters, digits and '-' (at most 63)"))
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{what} {s:?} is not an IP address"))
}

fn check_port(what: &str, port: u32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} \"{port}\" is not a port (1-65535)"))
}

/// The namespace of a namespaced object: required.
fn namespace_of(meta: &Meta, kind: &str) -> Result<String, String> {
    let ns = meta
        .namespace
        .clone()
        .ok_or_else(|| format!("{kind} {:?} needs metadata.namespace", meta.name))?;
    check_name("namespace", &ns)?;
    Ok(ns)
}

/// Parses every document of one file into `inventory`. Stops at the first error: a file is
/// applied whole or not at all.
pub fn parse_file(text: &str) -> Result<Inventory, ManifestError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(ManifestError {
            line: 0,
            message: format!("the file is {} bytes; the limit is {MAX_FILE_BYTES}", text.len()),
        });
    }
    let mut inventory = Inventory::default();
    for (line, doc) in documents(text)? {
        parse_document(line, &doc, &mut inventory)?;
    }
    Ok(inventory)
}

fn parse_document(line: u64, doc: &str, inv: &mut Inventory) -> Result<(), ManifestError> {
    let header: Header = serde_saphyr::from_str(doc).map_err(|e| yaml_error(line, &e))?;
    // A semantic error quotes the offending value; point at the first line that holds it.
    let at = |message: String| {
        let value = message.split('"').nth(1).filter(|v| !v.is_empty());
        let offset = value.and_then(|v| doc.lines().position(|l| l.contains(v))).unwrap_or(0) as u64;
        ManifestError {
            line: line + offset,
            message,
        }
    };
    macro_rules! typed {
        ($spec:ty) => {{
            let d: Doc<$spec> = serde_saphyr::from_str(doc).map_err(|e| yaml_error(line, &e))?;
            check_name(&header.kind, &d.metadata.name).map_err(at)?;
            d
        }};
    }
    match header.kind.as_str() {
        "Namespace" => {
            let d = typed!(NoSpec);
            let obj = NamespaceObj {
                name: d.metadata.name,
                labels: d.metadata.labels,
            };
            inv.add_namespace(obj, line).map_err(at)
        }
        "Service" => {
            let d = typed!(ServiceSpec);
            let ns = namespace_of(&d.metadata, "Service").map_err(at)?;
            let spec = d.spec.unwrap_or_default();
            let mut vips = Vec::new();
            for ip in spec.cluster_ip.iter().chain(spec.cluster_ips.iter()) {
                if ip == "None" {
                    continue;
                }
                let ip = parse_ip("clusterIP", ip).map_err(at)?;
                if !vips.contains(&ip) {
                    vips.push(ip);
                }
            }
            let mut ports = Vec::new();
            for p in spec.ports {
                let port = check_port("port", p.port).map_err(at)?;
                let target = check_port("targetPort", p.target_port.unwrap_or(p.port)).map_err(at)?;
                let protocol = match p.app_protocol.as_deref().or(p.protocol.as_deref()).unwrap_or("TCP") {
                    "TCP" | "tcp" => Protocol::Tcp,
                    "HTTP" | "http" => Protocol::Http,
                    "HTTP2" | "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
                    "GRPC" | "grpc" => Protocol::Grpc,
                    other => {
                        return Err(at(format!(
                            "port protocol {other:?} is not one of TCP, HTTP, HTTP2, GRPC"
                        )))
                    }
                };
                ports.push(PortObj {
                    name: p.name,
                    port,
                    target_port: target,
                    protocol,
                });
            }
            let obj = ServiceObj {
                key: ObjectKey::new(&ns, &d.metadata.name),
                labels: d.metadata.labels,
                selector: spec.selector,
                ports,
                vips,
            };
            inv.add_service(obj, line).map_err(at)
        }
        "Workload" | "Pod" => {
            let d = typed!(WorkloadSpec);
            let ns = namespace_of(&d.metadata, &header.kind).map_err(at)?;
            let spec = d.spec.ok_or_else(|| {
                at(format!(
                    "{} {:?} needs a spec with node and ip",
                    header.kind, d.metadata.name
                ))
            })?;
            let sa = spec.service_account.unwrap_or_else(|| "default".to_string());
            check_name("serviceAccount", &sa).map_err(at)?;
            check_name("node", &spec.node).map_err(at)?;
            let ip = parse_ip("ip", &spec.ip).map_err(at)?;
            let node_ip = match &spec.node_ip {
                Some(a) => Some(parse_ip("nodeIP", a).map_err(at)?),
                None => None,
            };
            let tunnel_to_pod = crate::model::tunnel_to_pod(&d.metadata.annotations).map_err(at)?;
            let obj = WorkloadObj {
                key: ObjectKey::new(&ns, &d.metadata.name),
                labels: d.metadata.labels,
                tunnel_to_pod,
                service_account: sa,
                node: spec.node,
                ip,
                node_ip,
                ready: spec.ready.unwrap_or(true),
                region: spec.region,
                zone: spec.zone,
            };
            inv.add_workload(obj, line).map_err(at)
        }
        "HTTPRoute" => {
            let d = typed!(RouteSpec);
            let ns = namespace_of(&d.metadata, "HTTPRoute").map_err(at)?;
            let spec = d.spec.unwrap_or_default();
            let parents = spec
                .parent_refs
                .iter()
                .map(|p| ObjectKey::new(p.namespace.as_deref().unwrap_or(&ns), &p.name))
                .collect();
            let mut rules = Vec::new();
            for rule in spec.rules {
                let mut matches = Vec::new();
                for m in rule.matches {
                    let (prefix, exact) = match &m.path {
                        None => (String::new(), String::new()),
                        Some(p) => match p.kind.as_deref().unwrap_or("PathPrefix") {
                            "PathPrefix" => (p.value.clone(), String::new()),
                            "Exact" => (String::new(), p.value.clone()),
                            other => return Err(at(format!("path type {other:?} is not PathPrefix or Exact"))),
                        },
                    };
                    matches.push(RouteMatchObj {
                        path_prefix: prefix,
                        path_exact: exact,
                        method: m.method.unwrap_or_default(),
                        headers: m.headers.into_iter().map(|h| (h.name, h.value)).collect(),
                    });
                }
                let mut backends = Vec::new();
                for b in rule.backend_refs {
                    let port = match b.port {
                        Some(p) => check_port("backendRef port", p).map_err(at)?,
                        None => 0,
                    };
                    backends.push(RouteBackendObj {
                        service: ObjectKey::new(b.namespace.as_deref().unwrap_or(&ns), &b.name),
                        port,
                        weight: b.weight.unwrap_or(1),
                    });
                }
                let timeout_ms = match rule.timeouts.and_then(|t| t.request) {
                    Some(t) => parse_duration_ms(&t).map_err(at)?,
                    None => 0,
                };
                rules.push(RouteRuleObj {
                    matches,
                    backends,
                    timeout_ms,
                    retries: rule.retry.and_then(|r| r.attempts).unwrap_or(0),
                });
            }
            let obj = RouteObj {
                key: ObjectKey::new(&ns, &d.metadata.name),
                parents,
                hostnames: spec.hostnames,
                rules,
            };
            inv.add_route(obj, line).map_err(at)
        }
        "AuthorizationPolicy" => {
            let d = typed!(PolicySpec);
            let ns = namespace_of(&d.metadata, "AuthorizationPolicy").map_err(at)?;
            let spec = d.spec.unwrap_or_default();
            let action = match spec.action.as_deref().unwrap_or("ALLOW") {
                "ALLOW" => PolicyAction::Allow,
                "DENY" => PolicyAction::Deny,
                other => return Err(at(format!("action {other:?} is not ALLOW or DENY"))),
            };
            let mut rules = Vec::new();
            for r in spec.rules {
                let from = r.from.unwrap_or_default();
                let principals = |list: &[String]| {
                    list.iter()
                        .map(|p| Principal::parse(p).map_err(|e| at(e.to_string())))
                        .collect::<Result<Vec<_>, _>>()
                };
                let mut ports = Vec::new();
                for p in r.to.map(|t| t.ports).unwrap_or_default() {
                    ports.push(check_port("port", p).map_err(at)?);
                }
                rules.push(PolicyRuleObj {
                    principals: principals(&from.principals)?,
                    namespaces: from.namespaces,
                    not_principals: principals(&from.not_principals)?,
                    not_namespaces: from.not_namespaces,
                    ports,
                });
            }
            let obj = PolicyObj {
                key: ObjectKey::new(&ns, &d.metadata.name),
                action,
                selector: spec.selector.map(|s| s.match_labels).unwrap_or_default(),
                rules,
            };
            inv.add_policy(obj, line).map_err(at)
        }
        "Waypoint" => {
            let d = typed!(WaypointSpec);
            let ns = namespace_of(&d.metadata, "Waypoint").map_err(at)?;
            let spec = d.spec.unwrap_or_default();
            let mut addresses = Vec::new();
            for a in &spec.addresses {
                addresses.push(parse_ip("address", a).map_err(at)?);
            }
            let sa = spec.service_account.unwrap_or_else(|| d.metadata.name.clone());
            check_name("serviceAccount", &sa).map_err(at)?;
            let obj = WaypointObj {
                key: ObjectKey::new(&ns, &d.metadata.name),
                addresses,
                service_account: sa,
            };
            inv.add_waypoint(obj, line).map_err(at)
        }
        "Federation" => {
            let d = typed!(FederationSpec);
            let spec = d
                .spec
                .ok_or_else(|| at(format!("Federation {:?} needs a spec", d.metadata.name)))?;
            check_name("cluster", &spec.cluster).map_err(at)?;
            if spec.etcd.endpoints.is_empty() {
                return Err(at("Federation: spec.etcd.endpoints is empty".into()));
            }
            for e in &spec.etcd.endpoints {
                if !e.starts_with("https://") {
                    return Err(at(format!(
                        "etcd endpoint \"{e}\" is not https://: the federation talks to etcd only over TLS"
                    )));
                }
            }
            let network = spec.network.unwrap_or_else(|| spec.cluster.clone());
            check_name("network", &network).map_err(at)?;
            let gateway = match spec.gateway {
                None => None,
                Some(g) => Some((
                    parse_ip("gateway address", &g.address).map_err(at)?,
                    check_port("gateway hbonePort", g.hbone_port).map_err(at)?,
                    g.quic_port.map(|p| check_port("gateway quicPort", p)).transpose().map_err(at)?,
                )),
            };
            let obj = FederationObj {
                name: d.metadata.name,
                cluster: spec.cluster,
                etcd_endpoints: spec.etcd.endpoints,
                etcd_ca_file: spec.etcd.ca_file,
                etcd_cert_file: spec.etcd.cert_file,
                etcd_key_file: spec.etcd.key_file,
                network,
                region: spec.region,
                zone: spec.zone,
                gateway,
            };
            inv.add_federation(obj, line).map_err(at)
        }
        "" => Err(at(format!(
            "the document has no kind (apiVersion {:?})",
            header.api_version
        ))),
        other => Err(at(format!(
            "unknown kind {other:?}; expected Namespace, Service, Workload, HTTPRoute, AuthorizationPolicy, Waypoint or Federation"
        ))),
    }
}

/// Parses Gateway API durations ("500ms", "5s", "1m", "1h").
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("duration {s:?} is not like 500ms, 5s, 1m or 1h");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(factor).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    trellis.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  selector: {app: cart}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {serviceAccount: cart, node: node-1, ip: 10.1.1.5}
"#;

    #[test]
    fn a_good_file_yields_its_objects() {
        let inv = parse_file(GOOD).unwrap();
        assert_eq!(inv.namespaces.len(), 1);
        assert_eq!(inv.services.len(), 1);
        let w = inv.workloads.values().next().unwrap();
        assert_eq!(w.0.node, "node-1");
        assert!(w.0.ready, "ready by default");
        let s = inv.services.values().next().unwrap();
        assert_eq!(s.0.ports[0].target_port, 8080);
    }

    #[test]
    fn a_workload_annotated_for_pod_addressed_tunnels_is_dialled_at_its_own_address() {
        let with = |annotations: &str| {
            let text = GOOD.replace(
                "labels: {app: cart}}",
                &format!("labels: {{app: cart}}, annotations: {{{annotations}}}}}"),
            );
            let spec = text.replace("ip: 10.1.1.5}", "ip: 10.1.1.5, nodeIP: 10.1.0.11}");
            parse_file(&spec).map(|inv| crate::model::tunnel_address(&inv.workloads.values().next().unwrap().0))
        };
        let node = Some("10.1.0.11".parse().unwrap());
        let pod = Some("10.1.1.5".parse().unwrap());
        assert_eq!(with("owner: team-a").unwrap(), node, "by default, the node");
        assert_eq!(with("trellis.io/tunnel-address: pod").unwrap(), pod);
        assert_eq!(
            with("ambient.istio.io/redirection: enabled").unwrap(),
            pod,
            "Istio's ztunnel captures it"
        );
        assert_eq!(
            with("ambient.istio.io/redirection: enabled, trellis.io/tunnel-address: node").unwrap(),
            node,
            "Trellis's annotation wins"
        );
        let err = with("trellis.io/tunnel-address: pods").unwrap_err();
        assert!(
            err.message.contains("trellis.io/tunnel-address") && err.message.contains("\"pods\""),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let bad_ip = GOOD.replace("ip: 10.1.1.5", "ip: 10.1.1");
        let err = parse_file(&bad_ip).unwrap_err();
        assert_eq!(err.line, 20, "{err}");
        assert!(err.message.contains("not an IP address"), "{err}");

        let unknown = GOOD.replace("kind: Service", "kind: Servise");
        let err = parse_file(&unknown).unwrap_err();
        assert_eq!(err.line, 10, "{err}");
        assert!(err.message.contains("unknown kind \"Servise\""), "{err}");

        let typo = GOOD.replace("targetPort: 8080", "targetPrt: 8080");
        let err = parse_file(&typo).unwrap_err();
        assert!(err.message.contains("targetPrt"), "{err}");
        assert_eq!(err.line, 15, "{err}");

        let broken = GOOD.replace("  name: shop\n", "  name: [shop\n");
        let err = parse_file(&broken).unwrap_err();
        assert!(err.line >= 4 && err.line <= 9, "{err}");
    }

    #[test]
    fn documents_follow_yaml_not_line_patterns() {
        let text = "--- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n...\n%YAML 1.2\n---\n# only a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n";
        let inv = parse_file(text).unwrap();
        assert_eq!(
            inv.namespaces.keys().collect::<Vec<_>>(),
            ["legacy", "shop"],
            "the namespace on the marker line counts"
        );
        assert_eq!(inv.namespaces["legacy"].1, 7, "and lines are the file's");
        let err = parse_file("kind: Namespace\nmetadata: {name: [unclosed\n").unwrap_err();
        assert!(err.message.contains("invalid YAML"), "{err}");
    }

    #[test]
    fn duplicates_in_one_file_are_refused() {
        let twice = format!("{GOOD}---\n{}", GOOD.split("---").nth(2).unwrap());
        let err = parse_file(&twice).unwrap_err();
        assert!(err.message.contains("defined twice"), "{err}");
    }

    #[test]
    fn policies_routes_and_durations_parse() {
        let text = r#"
apiVersion: trellis.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - from: {principals: ["ns/shop/sa/admin", "spiffe://west.trellis.local/ns/x/sa/y"]}
    to: {ports: [8080]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{name: cart, kind: Service}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: cart-v2, port: 80, weight: 90}, {name: cart-v1, port: 80, weight: 10}]
    timeouts: {request: 2s}
"#;
        let inv = parse_file(text).unwrap();
        let policy = &inv.policies.values().next().unwrap().0;
        assert_eq!(policy.action, PolicyAction::Deny);
        assert_eq!(policy.rules[0].ports, vec![8080]);
        let route = &inv.routes.values().next().unwrap().0;
        assert_eq!(route.rules[0].timeout_ms, 2000);
        assert_eq!(route.rules[0].backends[0].weight, 90);
        let bad = text.replace("ns/shop/sa/admin", "shop/admin");
        assert!(parse_file(&bad).unwrap_err().message.contains("principal"));
    }
}
