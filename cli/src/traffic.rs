//! `trellis traffic shift | status`: traffic shifting between the clusters of a global service.
//!
//! `shift` writes (or with `--clear` deletes) etcd's `traffic/<ns>/<name>` with the operator's
//! etcd credentials (user `trellis-operator`, the one that may write `traffic/`); every member's
//! trellisd puts the weights on its Service, and its ztunnels split new connections by them.
//! The weights are checked here as every reader checks them ([`TrafficRecord::check`]), and
//! every cluster named must be a member of the federation (granted by root).
//!
//! `status` reads this cluster's trellisd (`/status`, `global_services`): the weights in force,
//! each cluster's endpoints and how many are healthy, and who serves now.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::Value;
use trellis_federation::keys;
use trellis_federation::records::{encode, TrafficRecord};
use trellis_federation::sync::EtcdConfig;
use trellis_federation::view::{Federation, View};

/// Where etcd is and the operator's credentials for it.
#[derive(Debug, Clone, clap::Args)]
pub struct Operator {
    /// etcd endpoint(s) of the federation, e.g. https://etcd.example:2379 (comma-separated).
    #[arg(long, env = "TRELLIS_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// PEM file of the CA that signed etcd's server certificate.
    #[arg(long, env = "TRELLIS_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// The operator's etcd certificate (CN trellis-operator: the user that may write traffic/).
    #[arg(long, env = "TRELLIS_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Its key.
    #[arg(long, env = "TRELLIS_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

impl Operator {
    /// The etcd client settings; the error names the flag to fix.
    fn config(&self) -> Result<EtcdConfig, String> {
        if self.etcd.is_empty() {
            return Err(
                "--etcd is needed (or TRELLIS_ETCD): the federation's etcd, e.g. https://etcd.example:2379".into(),
            );
        }
        for e in &self.etcd {
            if !e.starts_with("https://") {
                return Err(format!(
                    "--etcd {e}: the federation talks to etcd over TLS only (https://...)"
                ));
            }
        }
        let read = |flag: &str, env: &str, p: &Option<PathBuf>| {
            let p = p.as_deref().ok_or_else(|| {
                format!("{flag} is needed (or {env}): etcd runs with TLS and client certificates, and traffic/ is written with the operator's (CN trellis-operator)")
            })?;
            std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()))
        };
        Ok(EtcdConfig {
            endpoints: self.etcd.clone(),
            ca_pem: read("--etcd-ca", "TRELLIS_ETCD_CA", &self.etcd_ca)?,
            cert_pem: read("--etcd-cert", "TRELLIS_ETCD_CERT", &self.etcd_cert)?,
            key_pem: read("--etcd-key", "TRELLIS_ETCD_KEY", &self.etcd_key)?,
        })
    }
}

/// Parses `--cluster east=90,west=10` into a checked record; the error says what to fix.
pub fn parse_weights(text: &str) -> Result<TrafficRecord, String> {
    let example = "give CLUSTER=WEIGHT,... e.g. --cluster east=90,west=10";
    let mut weights = BTreeMap::new();
    for part in text.split(',') {
        let part = part.trim();
        let Some((cluster, weight)) = part.split_once('=') else {
            return Err(match part.is_empty() {
                true => format!("--cluster {text:?}: an empty entry; {example}"),
                false => format!("--cluster {text}: {part:?} is not CLUSTER=WEIGHT; {example}"),
            });
        };
        let (cluster, weight) = (cluster.trim(), weight.trim());
        let weight: u32 = weight.parse().map_err(|_| {
            format!("--cluster {text}: the weight of {cluster} is {weight:?}, not a whole number from 0 to 10000")
        })?;
        if weights.insert(cluster.to_string(), weight).is_some() {
            return Err(format!("--cluster {text}: cluster {cluster} is named twice"));
        }
    }
    let record = TrafficRecord { weights };
    record.check().map_err(|e| format!("--cluster {text}: {e}"))?;
    Ok(record)
}

/// Checks the clusters of `record` against the federation as etcd holds it: a cluster that is
/// not a member (granted by root, live or not) is refused, with the members; warnings for a
/// weighted cluster that cannot take its share now (not connected, or not exporting the service).
pub fn check_clusters(
    record: &TrafficRecord,
    federation: &Federation,
    namespace: &str,
    service: &str,
) -> Result<Vec<String>, String> {
    let members: BTreeSet<&str> = federation
        .granted
        .iter()
        .chain(federation.members.keys())
        .map(String::as_str)
        .collect();
    let unknown: Vec<&str> = record
        .weights
        .keys()
        .map(String::as_str)
        .filter(|c| !members.contains(c))
        .collect();
    if !unknown.is_empty() {
        let listed = match members.is_empty() {
            true => "none yet (trellis federation grant)".to_string(),
            false => members.iter().copied().collect::<Vec<_>>().join(", "),
        };
        let what = match unknown.as_slice() {
            [one] => format!("cluster {one} is not a member"),
            many => format!("clusters {} are not members", many.join(", ")),
        };
        return Err(format!(
            "--cluster: {what} of the federation (members: {listed}); name clusters as they joined (trellis federation status)"
        ));
    }
    let id = (namespace.to_string(), service.to_string());
    let mut warnings = Vec::new();
    for (cluster, _) in record.weights.iter().filter(|(_, w)| **w > 0) {
        match federation.members.get(cluster) {
            None => warnings.push(format!(
                "cluster {cluster} is not connected to the federation now: its share goes to the others until it is back"
            )),
            Some(m) if !m.services.contains_key(&id) => warnings.push(format!(
                "cluster {cluster} does not export {namespace}/{service} (label it trellis.io/global=true there): its share goes to the others until it does"
            )),
            Some(_) => {}
        }
    }
    Ok(warnings)
}

/// `trellis traffic shift`: writes `record`'s weights for `namespace/service`, or with `None`
/// deletes them. What was done, and warnings.
pub fn shift(
    namespace: &str,
    service: &str,
    weights: Option<&str>,
    operator: &Operator,
) -> Result<(String, Vec<String>), String> {
    trellis_identity::id::check_name(namespace).map_err(|e| format!("-n {namespace}: {e}"))?;
    trellis_identity::id::check_name(service).map_err(|e| format!("service {service}: {e}"))?;
    let record = weights.map(parse_weights).transpose()?;
    let config = operator.config()?;
    let key = keys::traffic(namespace, service);
    let etcd = config.endpoints.join(",");
    crate::federation::with_etcd(&config, async |client| {
        let refused = |e: &dyn std::fmt::Display| {
            let hint = match e.to_string().contains("permission denied") {
                true => "; traffic/ is written with the operator's etcd certificate (CN trellis-operator: --etcd-cert, --etcd-key)",
                false => "",
            };
            format!("etcd {etcd} refused to change {key}: {e}{hint}")
        };
        let Some(record) = record else {
            let deleted = client.delete(key.clone(), None).await.map_err(|e| refused(&e))?;
            let said = match deleted.deleted() {
                0 => format!("{namespace}/{service} had no weights ({key} was not set): it already follows locality"),
                _ => format!(
                    "{namespace}/{service}: weights cleared ({key} deleted); new connections follow locality again"
                ),
            };
            return Ok((said, Vec::new()));
        };
        let mut view = View::default();
        trellis_federation::sync::list(client, &mut view)
            .await
            .map_err(|e| format!("reading the federation from etcd {etcd}: {e}"))?;
        let warnings = check_clusters(&record, &view.federation(), namespace, service)?;
        client
            .put(key.clone(), encode(&record), None)
            .await
            .map_err(|e| refused(&e))?;
        let total: u64 = record.weights.values().map(|w| u64::from(*w)).sum();
        let split: Vec<String> = record
            .weights
            .iter()
            .map(|(c, w)| format!("{c}={w} ({})", percent(f64::from(*w) * 100.0 / total as f64)))
            .collect();
        Ok::<_, String>((
            format!(
                "{namespace}/{service}: new connections split by weight {} ({key}); trellis traffic status -n {namespace} {service} shows who serves",
                split.join(", ")
            ),
            warnings,
        ))
    })
}

/// `trellis traffic status`: one global service as this cluster's trellisd sees it.
pub fn status(admin: SocketAddr, namespace: &str, service: &str) -> Result<String, String> {
    let v = crate::status::fetch(admin)?;
    let local = v["cluster"].as_str().unwrap_or("?");
    let wanted = format!("{namespace}/{service}");
    let Some(all) = v["global_services"].as_array() else {
        return Err(format!(
            "trellisd at {admin} does not report global services (is it older than this trellis?)"
        ));
    };
    match all.iter().find(|g| g["service"] == wanted.as_str()) {
        Some(g) => Ok(render(g, local)),
        None => {
            let here: Vec<&str> = all.iter().filter_map(|g| g["service"].as_str()).collect();
            Err(format!(
                "{wanted} is not a global service of cluster {local} (global here: {}); export it with: trellis service label -n {namespace} {service} trellis.io/global=true",
                if here.is_empty() { "none".to_string() } else { here.join(", ") }
            ))
        }
    }
}

/// A percentage as people write it: `90%`, `33.3%`.
fn percent(p: f64) -> String {
    match (p - p.round()).abs() < 0.05 {
        true => format!("{p:.0}%"),
        false => format!("{p:.1}%"),
    }
}

/// `east=90, west=10`, or `none (by locality)`.
fn weights_text(g: &Value) -> String {
    match g["weights"].as_object().filter(|w| !w.is_empty()) {
        Some(w) => w.iter().map(|(c, n)| format!("{c}={n}")).collect::<Vec<_>>().join(", "),
        None => "none (by locality)".into(),
    }
}

/// Who serves, and why, in one phrase.
fn serving_text(g: &Value) -> String {
    let serving = &g["serving"];
    let shares: Vec<String> = serving["clusters"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let name = s["cluster"].as_str().unwrap_or("?");
                    match s["percent"].as_f64() {
                        Some(p) => format!("{name} {}", percent(p)),
                        None => name.to_string(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let list = shares.join(", ");
    let clusters = g["clusters"].as_array().cloned().unwrap_or_default();
    let without: Vec<&str> = clusters
        .iter()
        .filter(|c| c["weight"].as_u64().is_some_and(|w| w > 0) && c["healthy"].as_u64() == Some(0))
        .filter_map(|c| c["cluster"].as_str())
        .collect();
    let local_down = clusters
        .iter()
        .any(|c| c["local"] == Value::Bool(true) && c["healthy"].as_u64() == Some(0));
    let tier = match serving["tier"].as_str() {
        Some("local") => "this cluster",
        Some("region") => "this cluster's region",
        _ => "other clusters",
    };
    let round_robin = match shares.len() > 1 {
        true => ", round robin",
        false => "",
    };
    match serving["by"].as_str() {
        Some("weights") if without.is_empty() => format!("{list} (by weight)"),
        Some("weights") => format!(
            "{list} (by weight; no healthy endpoint in {}: its share goes to the others)",
            without.join(", ")
        ),
        Some("failover") => {
            format!("{list} (failover: no weighted cluster has a healthy endpoint; by locality, {tier}{round_robin})")
        }
        Some("locality") if local_down && tier != "this cluster" => {
            format!("{list} (by locality: this cluster has no healthy endpoint; {tier}{round_robin})")
        }
        Some("locality") => format!("{list} (by locality: {tier}{round_robin})"),
        _ => "nothing: no cluster has a healthy endpoint".into(),
    }
}

/// One global service in full (`trellis traffic status`).
pub fn render(g: &Value, local: &str) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut out = format!("{}, seen from cluster {local}\n", s(&g["service"]));
    out.push_str(&format!("  weights: {}\n", weights_text(g)));
    out.push_str(&format!(
        "  {:<16} {:<7} {:<10} {:<8} REGION\n",
        "CLUSTER", "WEIGHT", "ENDPOINTS", "HEALTHY"
    ));
    for c in g["clusters"].as_array().cloned().unwrap_or_default() {
        let name = match c["local"] == Value::Bool(true) {
            true => format!("{} (here)", s(&c["cluster"])),
            false => s(&c["cluster"]),
        };
        let weight = c["weight"].as_u64().map_or("-".to_string(), |w| w.to_string());
        let region = c["region"].as_str().filter(|r| !r.is_empty()).unwrap_or("-");
        // Numbers, not JSON values: a Value's Display ignores the column width.
        let (endpoints, healthy) = (c["endpoints"].as_u64().unwrap_or(0), c["healthy"].as_u64().unwrap_or(0));
        out.push_str(&format!(
            "  {name:<16} {weight:<7} {endpoints:<10} {healthy:<8} {region}\n"
        ));
    }
    out.push_str(&format!("  serving: {}\n", serving_text(g)));
    out
}

/// One global service in one line (`trellis status`).
pub fn one_line(g: &Value) -> String {
    let healthy: Vec<String> = g["clusters"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    format!(
                        "{} {}/{}",
                        c["cluster"].as_str().unwrap_or("?"),
                        c["healthy"],
                        c["endpoints"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "  {}: weights {}; healthy {}; serving {}\n",
        g["service"].as_str().unwrap_or("?"),
        weights_text(g),
        healthy.join(", "),
        serving_text(g)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn weights_parse_and_bad_ones_say_what_to_fix() {
        let r = parse_weights("east=90, west=10").unwrap();
        assert_eq!(
            r.weights,
            BTreeMap::from([("east".to_string(), 90), ("west".to_string(), 10)])
        );
        assert_eq!(
            parse_weights("east=100,west=0").unwrap().weights["west"],
            0,
            "weight 0 is allowed"
        );
        let e = |text: &str| parse_weights(text).unwrap_err();
        assert!(e("east").contains("\"east\" is not CLUSTER=WEIGHT"), "{}", e("east"));
        assert!(e("east=90,").contains("an empty entry"), "{}", e("east=90,"));
        assert!(e("east=ninety").contains("not a whole number from 0 to 10000"));
        assert!(e("east=-1").contains("not a whole number"));
        assert!(
            e("east=20000").contains("weight 20000 for east: at most 10000"),
            "{}",
            e("east=20000")
        );
        assert!(e("east=0,west=0").contains("every weight is 0"));
        assert!(e("east=1,east=2").contains("named twice"));
        assert!(e("East=1").contains("cluster \"East\""), "{}", e("East=1"));
    }

    fn federation() -> Federation {
        let mut f = Federation {
            granted: ["east", "west", "north"].iter().map(|c| c.to_string()).collect(),
            ..Federation::default()
        };
        for live in ["east", "west"] {
            let service = trellis_federation::records::ServiceRecord {
                ports: Vec::new(),
                hostnames: Vec::new(),
            };
            let services = match live {
                "east" => BTreeMap::from([(("demo".to_string(), "hello".to_string()), service)]),
                _ => BTreeMap::new(),
            };
            f.members.insert(
                live.to_string(),
                trellis_federation::view::Member {
                    record: trellis_federation::records::ClusterRecord {
                        name: live.into(),
                        trust_domain: format!("{live}.trellis.local"),
                        network: live.into(),
                        region: String::new(),
                        zone: String::new(),
                        gateway: None,
                    },
                    trust_domain: format!("{live}.trellis.local").parse().unwrap(),
                    bundle: None,
                    services,
                    endpoints: BTreeMap::new(),
                },
            );
        }
        f
    }

    #[test]
    fn a_cluster_outside_the_federation_is_refused_with_the_members() {
        let f = federation();
        let e = check_clusters(&parse_weights("east=50,south=50").unwrap(), &f, "demo", "hello").unwrap_err();
        assert!(
            e.contains("cluster south is not a member of the federation (members: east, north, west)"),
            "{e}"
        );
        let warnings =
            check_clusters(&parse_weights("east=50,west=30,north=20").unwrap(), &f, "demo", "hello").unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("cluster north is not connected"), "{warnings:?}");
        assert!(
            warnings[1].contains("cluster west does not export demo/hello"),
            "{warnings:?}"
        );
        assert!(
            check_clusters(&parse_weights("east=100,west=0").unwrap(), &f, "demo", "hello")
                .unwrap()
                .is_empty(),
            "weight 0 takes no share: nothing to warn of"
        );
    }

    fn global(weights: Value, east_healthy: u32, serving: Value) -> Value {
        let weighted = weights.as_object().is_some_and(|w| !w.is_empty());
        let weight = |c: &str| weighted.then(|| weights[c].as_u64().unwrap_or(0));
        json!({
            "service": "demo/hello",
            "weights": weights.clone(),
            "clusters": [
                {"cluster": "east", "local": true, "region": "eu-1", "endpoints": 1, "healthy": east_healthy, "weight": weight("east")},
                {"cluster": "west", "local": false, "region": "eu-1", "endpoints": 2, "healthy": 2, "weight": weight("west")},
            ],
            "serving": serving,
        })
    }

    #[test]
    fn status_shows_weights_endpoints_and_who_serves() {
        let g = global(
            json!({"east": 50, "west": 50}),
            1,
            json!({"by": "weights", "tier": null, "clusters": [{"cluster": "east", "percent": 50.0}, {"cluster": "west", "percent": 50.0}]}),
        );
        let text = render(&g, "east");
        assert!(
            text.starts_with("demo/hello, seen from cluster east\n  weights: east=50, west=50\n"),
            "{text}"
        );
        assert!(
            text.contains("  east (here)      50      1          1        eu-1\n"),
            "{text}"
        );
        assert!(text.contains("serving: east 50%, west 50% (by weight)"), "{text}");
        assert_eq!(
            one_line(&g),
            "  demo/hello: weights east=50, west=50; healthy east 1/1, west 2/2; serving east 50%, west 50% (by weight)\n"
        );
        let g = global(
            json!({"east": 50, "west": 50}),
            0,
            json!({"by": "weights", "tier": null, "clusters": [{"cluster": "west", "percent": 100.0}]}),
        );
        assert_eq!(
            serving_text(&g),
            "west 100% (by weight; no healthy endpoint in east: its share goes to the others)"
        );
        let g = global(
            json!({}),
            0,
            json!({"by": "locality", "tier": "region", "clusters": [{"cluster": "west", "percent": 100.0}]}),
        );
        assert!(render(&g, "east").contains("weights: none (by locality)"));
        assert!(
            render(&g, "east").contains("  west             -       2"),
            "{}",
            render(&g, "east")
        );
        assert_eq!(
            serving_text(&g),
            "west 100% (by locality: this cluster has no healthy endpoint; this cluster's region)"
        );
        let g = global(json!({}), 1, json!({"by": "none", "tier": null, "clusters": []}));
        assert_eq!(serving_text(&g), "nothing: no cluster has a healthy endpoint");
    }
}
