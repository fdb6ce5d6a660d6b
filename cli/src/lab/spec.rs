//! The lab's topology file: clusters of nodes, namespaces, services and pods, parsed strictly
//! (unknown fields are refused, errors name the field and line).
//!
//! The file says *what* to build; [`super::plan`] turns it into addresses and names.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The built-in topology (`deploy/lab/demo.yaml`), used when `--file` is not given.
pub const DEMO: &str = include_str!("../../../deploy/lab/demo.yaml");

/// Largest topology file read, in bytes.
const MAX_FILE_BYTES: usize = 1024 * 1024;

/// A whole lab: what `trellis lab up` builds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The clusters, in order: the first is cluster 1 in the address plan.
    pub clusters: Vec<Cluster>,
    /// Namespaces, created in every cluster.
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub pods: Vec<Pod>,
}

/// One cluster: a control plane and `nodes` nodes named `node-1`..`node-N`, optionally with
/// flags appended to its processes' command lines (`trellisdArgs: [--svid-ttl-seconds, "60"]`,
/// `ztunnelArgs: [...]`: the lab's own way to try a setting, as a test or a user would), and
/// per node after those (`nodeZtunnelArgs: {node-2: [--transport-remote, h2]}`), so that one
/// lab can run two settings side by side.
///
/// With two or more clusters the lab is a federation, and `network`, `region` and `zone` are
/// what the cluster joins with (`trellis federation join --network --region --zone`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Cluster {
    pub name: String,
    pub nodes: u32,
    /// The cluster's network. Default: the cluster's name (every lab cluster has a network of
    /// its own, reached only through its east-west gateway).
    #[serde(default)]
    pub network: Option<String>,
    /// Default: none.
    #[serde(default)]
    pub region: String,
    /// Default: none.
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub trellisd_args: Vec<String>,
    #[serde(default)]
    pub ztunnel_args: Vec<String>,
    /// Default: none.
    #[serde(default)]
    pub node_ztunnel_args: std::collections::BTreeMap<String, Vec<String>>,
}

/// A namespace; `ambient: true` enrols its pods (label `trellis.io/dataplane-mode=ambient`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub ambient: bool,
}

/// A service: a VIP in front of the pods its selector matches (in its cluster).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Default: the first cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    pub port: u16,
    /// Default: `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Export it to the federation (label `trellis.io/global: "true"`): the services of that
    /// namespace and name in every cluster are one global service.
    #[serde(default)]
    pub global: bool,
}

/// A pod: a network namespace behind its node, optionally running a demo process.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    /// Default: the first cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// `node-<n>` of the pod's cluster.
    pub node: String,
    /// Default: `default`.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Written on the pod's manifest as they are (`trellis.io/tunnel-address: pod`, ...).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// What runs in the pod; none leaves an empty network namespace to exec into.
    #[serde(default)]
    pub run: Option<Run>,
}

/// The demo process a pod runs (`trellis demo server|client`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum Run {
    /// `trellis demo server`: answers every request with who it is and who called.
    Server { version: String, port: u16 },
    /// `trellis demo client`: calls `url` every `interval_ms`; the host may be
    /// `<service>.<namespace>`, resolved to the service's VIP.
    #[serde(rename_all = "camelCase")]
    Client { url: String, interval_ms: u64 },
}

/// Parses a topology file's text; `origin` names it in errors.
pub fn parse(origin: &str, text: &str) -> anyhow::Result<Topology> {
    if text.len() > MAX_FILE_BYTES {
        anyhow::bail!(
            "{origin}: the file is {} bytes; the limit is {MAX_FILE_BYTES}",
            text.len()
        );
    }
    serde_saphyr::from_str(text).map_err(|e| {
        let full = e.to_string();
        let what = full.lines().next().unwrap_or("invalid YAML").trim();
        match e.location() {
            Some(at) => anyhow::anyhow!("{origin}: line {}: {what}", at.line()),
            None => anyhow::anyhow!("{origin}: {what}"),
        }
    })
}

/// Whether `s` is a DNS label of at most `max` characters: lowercase letters, digits and '-',
/// starting and ending with a letter or digit.
pub fn is_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Checks a lab or cluster name: `[a-z0-9-]`, at most 8 characters (they go into interface and
/// namespace names, which are short).
pub fn check_short_name(what: &str, name: &str) -> anyhow::Result<()> {
    if is_label(name, 8) {
        Ok(())
    } else {
        anyhow::bail!(
            "{what} name {name:?} is not valid: use 1 to 8 lowercase letters, digits and '-' (not at either end)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_topology_parses() {
        let t = parse("demo.yaml", DEMO).unwrap();
        let clusters: Vec<_> = t.clusters.iter().map(|c| (c.name.as_str(), c.nodes)).collect();
        assert_eq!(clusters, [("east", 2), ("west", 1)]);
        assert!(t.clusters.iter().all(|c| c.network.is_none() && c.region.is_empty()));
        assert!(t.namespaces[0].ambient);
        let services: Vec<_> = t
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.cluster.as_deref(), s.global))
            .collect();
        assert_eq!(services, [("hello", Some("east"), true), ("hello", Some("west"), true)]);
        assert_eq!(t.pods.len(), 3);
        assert_eq!(t.pods[1].cluster.as_deref(), Some("west"));
        assert!(matches!(t.pods[2].run, Some(Run::Client { interval_ms: 1000, .. })));
    }

    #[test]
    fn an_unknown_field_is_named_with_its_line() {
        let text = "clusters:\n  - name: east\n    nodes: 2\n    zones: 3\n";
        let err = parse("t.yaml", text).unwrap_err().to_string();
        assert!(err.contains("zones"), "{err}");
        assert!(err.starts_with("t.yaml: line 4"), "{err}");
    }

    #[test]
    fn federation_fields_parse_and_default() {
        let text = "clusters:\n  - {name: a, nodes: 1, network: n1, region: r, zone: z}\n  - {name: b, nodes: 1}\n\
            namespaces: [{name: n}]\nservices: [{name: s, namespace: n, port: 80, global: true}]\n";
        let t = parse("t.yaml", text).unwrap();
        let a = &t.clusters[0];
        assert_eq!(
            (a.network.as_deref(), a.region.as_str(), a.zone.as_str()),
            (Some("n1"), "r", "z")
        );
        let b = &t.clusters[1];
        assert_eq!(
            (b.network.as_deref(), b.region.as_str(), b.zone.as_str()),
            (None, "", "")
        );
        assert!(t.services[0].global);
        let t = parse(
            "t.yaml",
            "clusters: [{name: a, nodes: 1}]\nservices: [{name: s, namespace: n, port: 80}]\n",
        )
        .unwrap();
        assert!(!t.services[0].global);
    }

    #[test]
    fn an_unknown_run_kind_is_refused() {
        let text =
            "clusters: [{name: a, nodes: 1}]\npods:\n  - {name: p, namespace: n, node: node-1, run: {shell: {}}}\n";
        let err = parse("t.yaml", text).unwrap_err().to_string();
        assert!(err.contains("shell"), "{err}");
    }

    #[test]
    fn short_names_are_checked() {
        assert!(check_short_name("lab", "demo").is_ok());
        assert!(check_short_name("lab", "a-1").is_ok());
        for bad in ["", "Demo", "toolongname", "-a", "a_b", "a-"] {
            let err = check_short_name("lab", bad).unwrap_err().to_string();
            assert!(err.contains("lab name"), "{err}");
        }
    }
}
