//! The `global_services` part of `/status`: per Service labelled `trellis.io/global=true`, its
//! cluster weights, each cluster's endpoints and how many are healthy, and which clusters serve
//! now from this cluster's point of view (`trellis_mesh::traffic`, the data plane's rule).

use serde_json::{json, Value};
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_federation::view::Federation;
use trellis_mesh::model::MeshModel;
use trellis_mesh::traffic::{summarize, Summary};

/// Every global service of `model`, seen from cluster `local` in `region`; `federation` (when
/// joined) adds the members that export each one, so a member without endpoints still shows.
pub fn global_services(model: &MeshModel, local: &str, region: &str, federation: Option<&Federation>) -> Value {
    let mut out = Vec::new();
    for (key, entry) in model.services() {
        let Some(Variant::Service(s)) = &entry.resource.kind else {
            continue;
        };
        if !s.global {
            continue;
        }
        let id = (key.namespace.clone(), key.name.clone());
        let members: Vec<(String, String)> = federation
            .into_iter()
            .flat_map(|f| f.members.iter())
            .filter(|(_, m)| m.services.contains_key(&id))
            .map(|(name, m)| (name.clone(), m.record.region.clone()))
            .collect();
        out.push(to_json(&key.to_string(), local, &summarize(s, local, region, &members)));
    }
    Value::Array(out)
}

fn to_json(service: &str, local: &str, s: &Summary) -> Value {
    let weighted = !s.weights.is_empty();
    let clusters: Vec<Value> = s
        .clusters
        .iter()
        .map(|c| {
            json!({
                "cluster": c.cluster,
                "local": c.cluster == local,
                "region": c.region,
                "endpoints": c.endpoints,
                "healthy": c.healthy,
                // null without weights (locality); 0 for a cluster the weights do not name.
                "weight": weighted.then(|| s.weights.get(&c.cluster).copied().unwrap_or(0)),
            })
        })
        .collect();
    let serving: Vec<Value> = s
        .serving
        .shares
        .iter()
        .map(|share| json!({"cluster": share.cluster, "percent": share.percent}))
        .collect();
    json!({
        "service": service,
        "weights": s.weights,
        "clusters": clusters,
        "serving": {
            "by": s.serving.basis.as_str(),
            "tier": s.serving.basis.tier().map(|t| t.as_str()),
            "clusters": serving,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::TrustDomain;
    use trellis_mesh::model::{build, with_remote, ClusterInfo, Remote};

    #[test]
    fn a_global_service_shows_its_weights_clusters_and_who_serves() {
        let cluster = ClusterInfo {
            name: "east".into(),
            trust_domain: TrustDomain::new("east.trellis.local").unwrap(),
            network: "east".into(),
            domain: "cluster.local".into(),
        };
        let inv = trellis_mesh::manifest::parse_file(
            "apiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: demo, labels: {trellis.io/global: \"true\"}}\nspec: {selector: {app: hello}, ports: [{port: 80, targetPort: 8080}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: here, namespace: demo}\nspec: {selector: {app: hello}, ports: [{port: 81, targetPort: 8080}]}\n---\napiVersion: trellis.io/v1\nkind: Workload\nmetadata: {name: hello-v1, namespace: demo, labels: {app: hello}}\nspec: {serviceAccount: hello, node: node-1, ip: 10.1.1.10, ready: false}\n",
        )
        .unwrap();
        let (mut model, _) = build(&inv, &cluster, None);
        let west = trellis_api::config::v1::Endpoint {
            cluster: "west".into(),
            healthy: true,
            weight: 2,
            ..Default::default()
        };
        let id = ("demo".to_string(), "hello".to_string());
        let split: std::collections::BTreeMap<String, u32> =
            [("east".to_string(), 50), ("west".to_string(), 50)].into();
        let remote = Remote {
            endpoints: [(id.clone(), vec![std::sync::Arc::new(vec![west])])].into(),
            weights: [(id, split)].into(),
            ..Remote::default()
        };
        with_remote(&mut model, "east", &remote, None);
        let v = global_services(&model, "east", "eu-1", None);
        assert_eq!(v.as_array().map(Vec::len), Some(1), "only the global service: {v}");
        let hello = &v[0];
        assert_eq!(hello["service"], "demo/hello");
        assert_eq!(hello["weights"], json!({"east": 50, "west": 50}));
        assert_eq!(
            hello["clusters"],
            json!([
                {"cluster": "east", "local": true, "region": "eu-1", "endpoints": 1, "healthy": 0, "weight": 50},
                {"cluster": "west", "local": false, "region": "", "endpoints": 2, "healthy": 2, "weight": 50},
            ])
        );
        assert_eq!(
            hello["serving"],
            json!({"by": "weights", "tier": null, "clusters": [{"cluster": "west", "percent": 100.0}]}),
            "east has no ready endpoint: its share goes to west"
        );
    }
}
