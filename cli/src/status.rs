//! `trellis status`: asks trellisd's admin endpoint and prints what is meshed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// Largest admin response read, in bytes.
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

/// GETs `/status` from trellisd's admin endpoint.
pub fn fetch(admin: SocketAddr) -> Result<Value, String> {
    let unreachable = |e: std::io::Error| {
        format!("cannot reach trellisd's admin endpoint at {admin}: {e}; is trellisd running? (set --admin or TRELLIS_ADMIN)")
    };
    let mut tcp = TcpStream::connect_timeout(&admin, Duration::from_secs(3)).map_err(unreachable)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    write!(
        tcp,
        "GET /status HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut response = Vec::new();
    tcp.take(MAX_RESPONSE).read_to_end(&mut response).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{admin} did not answer HTTP"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{admin} answered {}", head.lines().next().unwrap_or("?")));
    }
    serde_json::from_str(body).map_err(|e| format!("{admin} answered something that is not trellisd's status: {e}"))
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
