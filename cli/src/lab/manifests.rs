//! The manifests trellisd discovers a lab cluster from, rendered from the plan (pure).
//!
//! Each Namespace goes to its own file `ns-<namespace>.yaml`, so `trellis namespace label`
//! rewrites it without touching the rest; Services and Workloads go to `lab.yaml`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Serialize;

use super::plan::{ClusterPlan, Plan};

/// The label that enrols a namespace.
const DATAPLANE_MODE: &str = "trellis.io/dataplane-mode";
/// The label that exports a service to the federation.
const GLOBAL: &str = "trellis.io/global";

/// One Kubernetes-shaped document, as `trellis_mesh::manifest` reads it.
#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<Spec<'a>>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Spec<'a> {
    Service {
        selector: BTreeMap<&'a str, &'a str>,
        #[serde(rename = "clusterIP")]
        cluster_ip: Ipv4Addr,
        ports: [Port; 1],
    },
    #[serde(rename_all = "camelCase")]
    Workload {
        service_account: &'a str,
        node: &'a str,
        ip: Ipv4Addr,
        #[serde(rename = "nodeIP")]
        node_ip: Ipv4Addr,
    },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Port {
    name: &'static str,
    port: u16,
    target_port: u16,
}

fn borrowed(map: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The files of cluster `cluster`'s manifest directory: (file name, contents).
pub fn render(plan: &Plan, cluster: &ClusterPlan) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for ns in &plan.namespaces {
        let labels = match ns.ambient {
            true => BTreeMap::from([(DATAPLANE_MODE, "ambient")]),
            false => BTreeMap::new(),
        };
        let doc = Manifest {
            api_version: "v1",
            kind: "Namespace",
            metadata: Metadata {
                name: &ns.name,
                namespace: None,
                labels,
                annotations: BTreeMap::new(),
            },
            spec: None,
        };
        files.push((format!("ns-{}.yaml", ns.name), serde_saphyr::to_string(&doc)?));
    }
    let mut docs = Vec::new();
    for s in &cluster.services {
        docs.push(Manifest {
            api_version: "v1",
            kind: "Service",
            metadata: Metadata {
                name: &s.name,
                namespace: Some(&s.namespace),
                labels: match s.global {
                    true => BTreeMap::from([(GLOBAL, "true")]),
                    false => BTreeMap::new(),
                },
                annotations: BTreeMap::new(),
            },
            spec: Some(Spec::Service {
                selector: borrowed(&s.selector),
                cluster_ip: s.vip,
                ports: [Port {
                    name: "tcp",
                    port: s.port,
                    target_port: s.target_port,
                }],
            }),
        });
    }
    for node in &cluster.nodes {
        for p in &node.pods {
            docs.push(Manifest {
                api_version: "trellis.io/v1",
                kind: "Workload",
                metadata: Metadata {
                    name: &p.name,
                    namespace: Some(&p.namespace),
                    labels: borrowed(&p.labels),
                    annotations: borrowed(&p.annotations),
                },
                spec: Some(Spec::Workload {
                    service_account: &p.service_account,
                    node: &node.name,
                    ip: p.ip,
                    node_ip: node.host.ip,
                }),
            });
        }
    }
    let lab = format!(
        "# Written by `trellis lab up` for lab {}, cluster {}.\n{}",
        plan.lab,
        cluster.name,
        serde_saphyr::to_string_multiple(&docs)?
    );
    files.push(("lab.yaml".to_string(), lab));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{plan, spec};
    use trellis_mesh::inventory::ObjectKey;
    use trellis_mesh::manifest::parse_file;

    #[test]
    fn trellisd_reads_what_the_lab_writes() {
        let p = plan::plan("demo", &spec::parse("demo", spec::DEMO).unwrap()).unwrap();
        let cluster = &p.clusters[0];
        let files = render(&p, cluster).unwrap();
        let names: Vec<_> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ns-demo.yaml", "lab.yaml"]);
        let ns = parse_file(&files[0].1).unwrap();
        assert_eq!(ns.namespaces["demo"].0.labels[DATAPLANE_MODE], "ambient");
        let lab = parse_file(&files[1].1).unwrap_or_else(|e| panic!("{e}\n{}", files[1].1));
        assert!(files[1].1.starts_with("# Written by `trellis lab up` for lab demo"));
        assert_eq!(lab.services.len(), cluster.services.len());
        for s in &cluster.services {
            let (read, _) = &lab.services[&ObjectKey::new(&s.namespace, &s.name)];
            assert_eq!(read.vips, [s.vip]);
            assert_eq!(read.labels.get(GLOBAL).map(String::as_str), s.global.then_some("true"));
            assert_eq!(read.selector, s.selector);
            assert_eq!((read.ports[0].port, read.ports[0].target_port), (s.port, s.target_port));
        }
        let pods: Vec<_> = cluster
            .nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n, p)))
            .collect();
        assert_eq!(lab.workloads.len(), pods.len());
        for (node, pod) in pods {
            let (read, _) = &lab.workloads[&ObjectKey::new(&pod.namespace, &pod.name)];
            assert_eq!(read.ip, pod.ip);
            assert_eq!(read.node_ip, Some(node.host.ip.into()));
            assert_eq!(
                (read.node.as_str(), read.service_account.as_str()),
                (node.name.as_str(), pod.service_account.as_str())
            );
            assert_eq!(read.labels, pod.labels);
        }
    }

    #[test]
    fn a_namespace_that_is_not_ambient_and_a_service_that_is_not_global_have_no_label() {
        let text =
            "clusters: [{name: a, nodes: 1}]\nnamespaces: [{name: n}]\nservices: [{name: s, namespace: n, port: 80}]\n";
        let p = plan::plan("t", &spec::parse("t", text).unwrap()).unwrap();
        let files = render(&p, &p.clusters[0]).unwrap();
        assert!(!files[0].1.contains("labels"), "{}", files[0].1);
        assert!(!files[1].1.contains(GLOBAL), "{}", files[1].1);
        assert!(parse_file(&files[0].1).unwrap().namespaces["n"].0.labels.is_empty());
        assert!(parse_file(&files[1].1).is_ok());
    }
}
