//! Manifest files (a watched manifest directory, ztunnel's static file): YAML text through
//! `trellis_mesh::manifest::parse_file`, and what parses on through the model build, each
//! node's slice and ztunnel's state build, as `ztunnel::static_config::load` does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_identity::TrustDomain;
use trellis_mesh::manifest::{documents, parse_file};
use trellis_mesh::model::{build, node_slice, to_client, ClusterInfo, Role};
use trellis_ztunnel::state::ProxyState;

fuzz_target!(|data: &[u8]| {
    // The manifest readers take the file as UTF-8 text (`read_to_string`).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = documents(text);
    let Ok(inventory) = parse_file(text) else {
        return;
    };
    let cluster = ClusterInfo {
        name: "east".into(),
        trust_domain: TrustDomain::new(trellis_fuzz::TRUST_DOMAIN).expect("a valid trust domain"),
        network: "east".into(),
        domain: "cluster.local".into(),
    };
    let (model, _) = build(&inventory, &cluster, None);
    let nodes: std::collections::BTreeSet<String> = inventory
        .workloads
        .values()
        .map(|(w, _)| w.node.clone())
        .chain([trellis_fuzz::NODE.to_string()])
        .collect();
    for node in &nodes {
        for role in [Role::Ztunnel, Role::Waypoint] {
            let slice = to_client(&node_slice(&model, node, role));
            let _ = ProxyState::from_slice(node, 1, &slice);
        }
    }
    // A rebuild over the previous inventory and model: the hot-reload path.
    let _ = build(&inventory, &cluster, Some((&inventory, &model)));
});
