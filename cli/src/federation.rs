//! `trellis federation join | leave | status`.
//!
//! Joining writes this cluster's `Federation` manifest (`federation.yaml`) into the manifest
//! directory trellisd discovers from, so the membership survives a trellisd restart like any other
//! manifest; trellisd then registers the cluster in etcd and follows the others. Leaving removes
//! the file; trellisd removes the cluster's keys. Both wait for trellisd to report the outcome.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

/// The manifest file `join` writes and `leave` removes.
pub const FILE: &str = "federation.yaml";

/// `join`'s settings, from its flags.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "membership")]
pub struct Join {
    /// This cluster's name (trellisd's --cluster).
    #[arg(long)]
    pub cluster: String,
    /// etcd endpoint(s) of the federation, e.g. https://etcd.example:2379 (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// PEM file of the CA that signed etcd's server certificate.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// PEM certificate of this cluster's etcd user (its CN is the user).
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    /// PEM key of that certificate.
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
    /// The cluster's network (default: its name); clusters on one network reach pods directly.
    #[arg(long)]
    pub network: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    #[arg(long)]
    pub zone: Option<String>,
    /// The east-west gateway, IP or IP:port (port 15008 by default).
    #[arg(long)]
    pub gateway: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Doc {
    api_version: &'static str,
    kind: &'static str,
    metadata: Meta,
    spec: Spec,
}

#[derive(Serialize)]
struct Meta {
    name: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    cluster: String,
    etcd: Etcd,
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<Gateway>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Etcd {
    endpoints: Vec<String>,
    ca_file: String,
    cert_file: String,
    key_file: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Gateway {
    address: String,
    hbone_port: u16,
}

/// The manifest for `join`; the error says which flag to fix.
pub fn manifest(join: &Join) -> Result<String, String> {
    for e in &join.etcd {
        if !e.starts_with("https://") {
            return Err(format!(
                "--etcd {e}: the federation talks to etcd over TLS only (https://...)"
            ));
        }
    }
    // trellisd reads the credentials from its own working directory: absolute paths only.
    let absolute = |flag: &str, p: &Option<PathBuf>| {
        let p = p.as_deref().ok_or_else(|| {
            format!("{flag} is needed: etcd runs with TLS and client-certificate authentication (--etcd-ca, --etcd-cert, --etcd-key)")
        })?;
        let meta = std::fs::metadata(p).map_err(|e| format!("{flag} {}: {e}", p.display()))?;
        if !meta.is_file() {
            return Err(format!("{flag} {}: not a regular file", p.display()));
        }
        p.canonicalize()
            .map(|p| p.display().to_string())
            .map_err(|e| format!("{flag} {}: {e}", p.display()))
    };
    let gateway = match &join.gateway {
        None => None,
        Some(g) => {
            let (address, port) = match g.parse::<SocketAddr>() {
                Ok(sa) => (sa.ip(), sa.port()),
                Err(_) => (
                    g.parse()
                        .map_err(|_| format!("--gateway {g}: give an IP address, or IP:port"))?,
                    15008,
                ),
            };
            Some(Gateway {
                address: address.to_string(),
                hbone_port: port,
            })
        }
    };
    let doc = Doc {
        api_version: "trellis.io/v1",
        kind: "Federation",
        metadata: Meta { name: "membership" },
        spec: Spec {
            cluster: join.cluster.clone(),
            etcd: Etcd {
                endpoints: join.etcd.clone(),
                ca_file: absolute("--etcd-ca", &join.etcd_ca)?,
                cert_file: absolute("--etcd-cert", &join.etcd_cert)?,
                key_file: absolute("--etcd-key", &join.etcd_key)?,
            },
            network: join.network.clone(),
            region: join.region.clone(),
            zone: join.zone.clone(),
            gateway,
        },
    };
    let text = serde_saphyr::to_string(&doc).map_err(|e| format!("writing the manifest: {e}"))?;
    // What trellisd will parse must parse here first.
    trellis_mesh::manifest::parse_file(&text).map_err(|e| format!("the manifest would be refused: {e}"))?;
    Ok(text)
}

/// The federation part of trellisd's `/status`.
fn federation(admin: SocketAddr) -> Result<Value, String> {
    crate::status::fetch(admin).map(|v| v["federation"].clone())
}

/// Polls trellisd until `done` holds on its federation status, up to `timeout`; prints each new
/// `progress` line on the way. The last status, or why it could not be read.
pub fn wait(
    admin: SocketAddr,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
    progress: impl Fn(&Value) -> String,
) -> Result<Value, (String, Option<Value>)> {
    let deadline = Instant::now() + timeout;
    let mut said = String::new();
    loop {
        let last = federation(admin);
        if let Ok(f) = &last {
            if done(f) {
                return Ok(f.clone());
            }
            let line = progress(f);
            if line != said {
                eprintln!("{line}");
                said = line;
            }
        }
        if Instant::now() >= deadline {
            return Err(match last {
                Ok(f) => (format!("not done after {} s", timeout.as_secs()), Some(f)),
                Err(e) => (e, None),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn progress(f: &Value) -> String {
    if f["joined"] != Value::Bool(true) {
        return match f["error"].as_str() {
            Some(e) => format!("not joined: {e}"),
            None => "waiting for trellisd to read the membership".into(),
        };
    }
    let members: Vec<&str> = f["members"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["cluster"].as_str()).collect())
        .unwrap_or_default();
    match f["last_error"].as_str() {
        Some(e) => format!("joining: {e}"),
        None => format!(
            "joining: synced {}, published {}, members: {}",
            f["synced"],
            f["published"],
            members.join(", ")
        ),
    }
}

/// Whether every member is synced: read, published, not stale, each with its bundle.
pub fn all_synced(f: &Value) -> bool {
    f["joined"] == Value::Bool(true)
        && f["synced"] == Value::Bool(true)
        && f["published"] == Value::Bool(true)
        && f["stale_since_unix"].is_null()
        && f["members"]
            .as_array()
            .is_some_and(|m| !m.is_empty() && m.iter().all(|m| m["bundle"] == Value::Bool(true)))
}

/// `trellis federation join`.
pub fn join(manifests: &Path, admin: SocketAddr, join: &Join) -> Result<String, String> {
    let text = manifest(join)?;
    if !manifests.is_dir() {
        return Err(format!(
            "{}: not a directory (set --manifests or TRELLIS_MANIFESTS)",
            manifests.display()
        ));
    }
    let path = manifests.join(FILE);
    trellis_mesh::edit::write_atomically(&path, &text).map_err(|e| e.to_string())?;
    let own = join.cluster.clone();
    let registered = |f: &Value| {
        f["joined"] == Value::Bool(true)
            && f["published"] == Value::Bool(true)
            && f["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["cluster"].as_str() == Some(own.as_str())))
    };
    match wait(admin, Duration::from_secs(30), registered, progress) {
        Ok(_) => Ok(format!(
            "cluster {} joined the federation at {} ({} written; trellis federation status)",
            join.cluster,
            join.etcd.join(","),
            path.display()
        )),
        Err((why, last)) => Err(format!(
            "wrote {}, but trellisd has not registered the cluster: {why}{}",
            path.display(),
            last.map(|f| format!("; last: {}", progress(&f))).unwrap_or_default()
        )),
    }
}

/// `trellis federation grant`: the member's etcd user and role, with root's credentials.
pub fn grant(
    cluster: &str,
    trust_domain: &str,
    etcd: Vec<String>,
    ca: &Path,
    cert: &Path,
    key: &Path,
    enable_auth: bool,
) -> Result<String, String> {
    trellis_identity::id::check_name(cluster).map_err(|e| format!("--cluster {cluster}: {e}"))?;
    trellis_identity::TrustDomain::new(trust_domain).map_err(|e| format!("--trust-domain {trust_domain}: {e}"))?;
    let read = |flag: &str, p: &Path| std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()));
    let config = trellis_federation::sync::EtcdConfig {
        endpoints: etcd.clone(),
        ca_pem: read("--etcd-ca", ca)?,
        cert_pem: read("--etcd-cert", cert)?,
        key_pem: read("--etcd-key", key)?,
    };
    with_etcd(&config, async |client| {
        trellis_federation::access::add_member(client, cluster, trust_domain)
            .await
            .map_err(|e| format!("creating {}: {e}", trellis_federation::access::cluster_user(cluster)))?;
        if enable_auth {
            trellis_federation::access::add_operator(client)
                .await
                .map_err(|e| format!("creating {}: {e}", trellis_federation::access::OPERATOR_USER))?;
            trellis_federation::access::enable(client)
                .await
                .map_err(|e| format!("enabling etcd's authentication: {e}"))?;
        }
        Ok::<_, String>(())
    })?;
    Ok(format!(
        "etcd user {user} may now write cluster {cluster}'s keys (trust domain {trust_domain}); join with a certificate whose CN is {user}{auth}",
        user = trellis_federation::access::cluster_user(cluster),
        auth = if enable_auth { "; etcd authentication is on" } else { "" }
    ))
}

/// Runs `work` with a client of the federation's etcd, on a runtime of its own (the CLI's verbs
/// are synchronous).
pub fn with_etcd<T>(
    config: &trellis_federation::sync::EtcdConfig,
    work: impl AsyncFnOnce(&mut trellis_federation::sync::EtcdClient) -> Result<T, String>,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    runtime.block_on(async {
        let mut client = trellis_federation::sync::connect(config)
            .await
            .map_err(|e| format!("connecting to etcd {}: {e}", config.endpoints.join(",")))?;
        work(&mut client).await
    })
}

/// `trellis federation leave`.
pub fn leave(manifests: &Path, admin: SocketAddr) -> Result<String, String> {
    let path = manifests.join(FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{} does not exist: this cluster has not joined (here)",
                path.display()
            ))
        }
        Err(e) => return Err(format!("removing {}: {e}", path.display())),
    }
    match wait(
        admin,
        Duration::from_secs(30),
        |f| f["joined"] == Value::Bool(false),
        progress,
    ) {
        Ok(_) => Ok(format!(
            "left the federation ({} removed; trellisd removed this cluster's keys)",
            path.display()
        )),
        Err((why, _)) => Err(format!(
            "removed {}, but trellisd still reports a membership: {why}",
            path.display()
        )),
    }
}

/// `trellis federation status`: the members as this cluster's trellisd reads them. With `wait`,
/// waits until every member is synced, printing progress.
pub fn status(admin: SocketAddr, wait_for: Option<Duration>) -> Result<String, String> {
    let f = match wait_for {
        None => federation(admin)?,
        Some(timeout) => match wait(admin, timeout, all_synced, progress) {
            Ok(f) => f,
            Err((why, Some(f))) => return Err(format!("not every member is synced: {why}\n{}", render(&f))),
            Err((why, None)) => return Err(why),
        },
    };
    Ok(render(&f))
}

/// The human-readable federation status (also part of `trellis status`).
pub fn render(f: &Value) -> String {
    if f["joined"] != Value::Bool(true) {
        return match f["error"].as_str() {
            Some(e) => format!("federation: not joined: {e}\n"),
            None => "federation: not joined (trellis federation join)\n".into(),
        };
    }
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let state = if !f["stale_since_unix"].is_null() {
        format!(
            "stale since unix time {} ({})",
            f["stale_since_unix"],
            s(&f["last_error"])
        )
    } else if f["synced"] == Value::Bool(true) {
        format!("synced at revision {}", f["revision"])
    } else {
        format!("not synced yet ({})", s(&f["last_error"]))
    };
    let etcd: Vec<String> = f["etcd"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    let mut out = format!(
        "federation: etcd {}, {state}, this cluster {}\n",
        etcd.join(","),
        if f["published"] == Value::Bool(true) {
            "registered"
        } else {
            "not registered"
        }
    );
    out.push_str(&format!(
        "  {:<12} {:<28} {:<10} {:<20} {:<7} services\n",
        "CLUSTER", "TRUST DOMAIN", "NETWORK", "GATEWAY", "BUNDLE"
    ));
    for m in f["members"].as_array().cloned().unwrap_or_default() {
        let services: Vec<String> = m["services"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        out.push_str(&format!(
            "  {:<12} {:<28} {:<10} {:<20} {:<7} {}\n",
            s(&m["cluster"]),
            s(&m["trust_domain"]),
            s(&m["network"]),
            s(&m["gateway"]),
            if m["bundle"] == Value::Bool(true) { "yes" } else { "no" },
            if services.is_empty() {
                "-".into()
            } else {
                services.join(", ")
            }
        ));
    }
    for p in f["problems"].as_array().cloned().unwrap_or_default() {
        out.push_str(&format!("  problem: {}\n", s(&p)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(dir: &Path) -> Join {
        for f in ["ca.pem", "c.pem", "k.pem"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        Join {
            cluster: "east".into(),
            etcd: vec!["https://127.0.0.1:2379".into()],
            etcd_ca: Some(dir.join("ca.pem")),
            etcd_cert: Some(dir.join("c.pem")),
            etcd_key: Some(dir.join("k.pem")),
            network: None,
            region: Some("eu-1".into()),
            zone: None,
            gateway: Some("10.1.0.20".into()),
        }
    }

    #[test]
    fn the_manifest_parses_as_trellisd_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let text = manifest(&join(dir.path())).unwrap();
        let inv = trellis_mesh::manifest::parse_file(&text).unwrap();
        let (m, _) = &inv.federations["membership"];
        assert_eq!(m.cluster, "east");
        assert_eq!(
            m.gateway.map(|g| (g.0.to_string(), g.1)),
            Some(("10.1.0.20".into(), 15008))
        );
        assert!(m.etcd_ca_file.starts_with('/'), "absolute: {}", m.etcd_ca_file);
    }

    #[test]
    fn bad_flags_say_which_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = join(dir.path());
        j.etcd = vec!["http://127.0.0.1:2379".into()];
        assert!(manifest(&j).unwrap_err().contains("--etcd http://"));
        let mut j = join(dir.path());
        j.etcd_key = Some(dir.path().join("missing.pem"));
        assert!(manifest(&j).unwrap_err().contains("--etcd-key"));
        j.etcd_cert = None;
        assert!(manifest(&j).unwrap_err().contains("--etcd-cert is needed"));
        let mut j = join(dir.path());
        j.gateway = Some("gw.example".into());
        assert!(manifest(&j).unwrap_err().contains("--gateway gw.example"));
    }
}
