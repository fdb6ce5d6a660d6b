//! `trellis status`: asks trellisd's admin endpoint and prints what is meshed, and per global
//! service who serves it.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use trellis_admin::client::{get_blocking, GetError};

/// How long trellisd has to answer, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);

/// GETs `/status` from trellisd's admin endpoint. Blocks; not for async code.
pub fn fetch(admin: SocketAddr) -> Result<Value, String> {
    let (status, body) = get_blocking(admin, "/status", TIMEOUT).map_err(|e| match e {
        GetError::Connect { source, .. } => format!(
            "cannot reach trellisd's admin endpoint at {admin}: {source}; is trellisd running? (set --admin or TRELLIS_ADMIN)"
        ),
        other => other.to_string(),
    })?;
    if status != 200 {
        return Err(format!("{admin} answered {status}: {}", body.trim()));
    }
    serde_json::from_str(&body).map_err(|e| format!("{admin} answered something that is not trellisd's status: {e}"))
}

/// The human-readable status.
pub fn render(v: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let mut out = format!(
        "cluster {} (trust domain {}), model version {}\n",
        s(&v["cluster"]),
        s(&v["trust_domain"]),
        v["version"]
    );
    let enrolled: Vec<String> = v["enrolled_namespaces"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    out.push_str(&format!(
        "enrolled namespaces: {}\n",
        if enrolled.is_empty() {
            "none".to_string()
        } else {
            enrolled.join(", ")
        }
    ));
    out.push_str(&format!("services: {}, policies: {}\n", v["services"], v["policies"]));
    out.push_str("workloads by node:\n");
    if let Some(nodes) = v["workloads_by_node"].as_object() {
        for (node, workloads) in nodes {
            let list = workloads.as_array().cloned().unwrap_or_default();
            out.push_str(&format!("  {node} ({} workloads)\n", list.len()));
            for w in list {
                let mesh = if w["enrolled"].as_bool() == Some(true) {
                    "mTLS"
                } else {
                    "plain"
                };
                let ready = if w["ready"].as_bool() == Some(true) {
                    "ready"
                } else {
                    "not ready"
                };
                out.push_str(&format!(
                    "    {:<32} {:<16} {mesh:<6} {ready}\n",
                    s(&w["name"]),
                    s(&w["address"])
                ));
            }
        }
    }
    let connected = v["connected_nodes"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("connected nodes: {}\n", connected.len()));
    for n in connected {
        let error = n["last_error"].as_str().filter(|e| !e.is_empty());
        out.push_str(&format!(
            "  {:<16} {:<9} version sent {} acked {}, {} resources{}\n",
            s(&n["node"]),
            s(&n["role"]),
            n["sent_version"],
            n["acked_version"],
            n["resources"],
            error.map(|e| format!(", last rejection: {e}")).unwrap_or_default()
        ));
    }
    if !v["federation"].is_null() {
        out.push_str(&crate::federation::render(&v["federation"]));
    }
    let globals = v["global_services"].as_array().cloned().unwrap_or_default();
    if !globals.is_empty() {
        out.push_str(&format!(
            "global services, seen from {} (trellis traffic status -n <namespace> <service>):\n",
            s(&v["cluster"])
        ));
        for g in &globals {
            out.push_str(&crate::traffic::one_line(g));
        }
    }
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    if problems.is_empty() {
        out.push_str("problems: none\n");
    } else {
        out.push_str(&format!("problems ({}):\n", problems.len()));
        for p in problems {
            out.push_str(&format!("  {}\n", s(&p)));
        }
    }
    out
}
