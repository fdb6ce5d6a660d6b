//! The manifests trellisd discovers a lab cluster from, rendered from the plan (pure).
//!
//! Each Namespace goes to its own file `ns-<namespace>.yaml`, so `trellis namespace label`
//! rewrites it without touching the rest; Services and Workloads go to `lab.yaml`.

use std::collections::BTreeMap;

use super::plan::{ClusterPlan, Plan};

/// The label that enrols a namespace.
const DATAPLANE_MODE: &str = "trellis.io/dataplane-mode";

/// The files of cluster `cluster`'s manifest directory: (file name, contents).
pub fn render(plan: &Plan, cluster: &ClusterPlan) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for ns in &plan.namespaces {
        let mut text = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n", ns.name);
        if ns.ambient {
            text.push_str(&format!("  labels:\n    {DATAPLANE_MODE}: ambient\n"));
        }
        files.push((format!("ns-{}.yaml", ns.name), text));
    }
    let mut docs = Vec::new();
    for s in &cluster.services {
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  selector: {}\n  clusterIP: {}\n  ports:\n    - {{name: tcp, port: {}, targetPort: {}}}\n",
            s.name,
            s.namespace,
            flow_map(&s.selector),
            s.vip,
            s.port,
            s.target_port
        ));
    }
    for node in &cluster.nodes {
        for p in &node.pods {
            docs.push(format!(
                "apiVersion: trellis.io/v1\nkind: Workload\nmetadata:\n  name: {}\n  namespace: {}\n  labels: {}\nspec:\n  serviceAccount: {}\n  node: {}\n  ip: {}\n  nodeIP: {}\n",
                p.name,
                p.namespace,
                flow_map(&p.labels),
                p.service_account,
                node.name,
                p.ip,
                node.host.ip
            ));
        }
    }
    let mut lab = format!(
        "# Written by `trellis lab up` for lab {}, cluster {}.\n",
        plan.lab, cluster.name
    );
    lab.push_str(&docs.join("---\n"));
    files.push(("lab.yaml".to_string(), lab));
    files
}

/// A YAML flow mapping with every key and value quoted (JSON strings are YAML scalars).
fn flow_map(map: &BTreeMap<String, String>) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"));
    let pairs: Vec<String> = map.iter().map(|(k, v)| format!("{}: {}", quote(k), quote(v))).collect();
    format!("{{{}}}", pairs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{plan, spec};
    use trellis_mesh::manifest::parse_file;

    #[test]
    fn trellisd_reads_what_the_lab_writes() {
        let p = plan::plan("demo", &spec::parse("demo", spec::DEMO).unwrap()).unwrap();
        let files = render(&p, &p.clusters[0]);
        let names: Vec<_> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ns-demo.yaml", "lab.yaml"]);
        let ns = parse_file(&files[0].1).unwrap();
        assert_eq!(ns.namespaces["demo"].0.labels[DATAPLANE_MODE], "ambient");
        let lab = parse_file(&files[1].1).unwrap_or_else(|e| panic!("{e}\n{}", files[1].1));
        assert_eq!(lab.services.len(), 1);
        assert_eq!(lab.workloads.len(), 3);
        assert!(files[1].1.contains("nodeIP: 10.1.0.12"), "{}", files[1].1);
        assert!(files[1].1.contains("clusterIP: 10.101.0.10"), "{}", files[1].1);
    }

    #[test]
    fn a_namespace_that_is_not_ambient_has_no_label() {
        let text = "clusters: [{name: a, nodes: 1}]\nnamespaces: [{name: n}]\n";
        let p = plan::plan("t", &spec::parse("t", text).unwrap()).unwrap();
        let files = render(&p, &p.clusters[0]);
        assert_eq!(files[0].1, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: n\n");
        assert!(parse_file(&files[1].1).is_ok());
    }
}
