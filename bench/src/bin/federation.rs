//! Federation benchmark: real `trellisd` processes following a real etcd (Debian's etcd-server,
//! TLS, client certificates, etcd's users and roles), nodes subscribed to their config streams.
//!
//! - **propagation**: clusters east and west joined; a manifest change of a global service in
//!   east (one endpoint's readiness), until every subscribed node of west holds it; p50 and p99
//!   over [`CHANGES`] changes, beside etcd's own put → watch delivery on the same etcd.
//! - **scale**: one trellisd following 20 simulated clusters of 5,000 endpoints each (written
//!   straight to etcd by the bench, under a live lease): cold sync (trellisd started → a
//!   subscribed node holds all 100,000 remote endpoints), trellisd's memory, and one change in
//!   one simulated cluster until the node holds it, p50 and p99.
//!
//! Run: `bash bench/run.sh federation` (builds with the bench profile first).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use tokio::sync::watch;
use trellis_api::config::v1::resource::Kind as Variant;
use trellis_api::stream::Applied;
use trellis_bench::{ms, percentile, rss_mib, Trellisd};
use trellis_e2e::etcd::Etcd;
use trellis_federation::keys;
use trellis_federation::records::{
    encode, ClusterRecord, EndpointRecord, EndpointsRecord, GrantRecord, ServicePort, ServiceRecord,
};
use trellis_identity::{CertificateAuthority, IssuancePolicy, TrustBundle, TrustDomain};

const CHANGES: usize = 100;
const SIMULATED: usize = 20;
const SERVICES: usize = 10;
const PER_SERVICE: usize = 500;

/// The manifests of one cluster: namespace demo (enrolled), `services` global services
/// `svc-<k>`, and `pods` ready pods of svc-0 on node-1.
fn manifests(dir: &Path, services: usize, pods: usize) -> anyhow::Result<()> {
    let mut text =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {trellis.io/dataplane-mode: ambient}}\n"
            .to_string();
    for k in 0..services {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{k}, namespace: demo, labels: {{trellis.io/global: \"true\"}}}}\nspec: {{selector: {{app: app-{k}}}, clusterIP: 10.96.0.{}, ports: [{{port: 80, targetPort: 8080}}]}}\n",
            10 + k
        ));
    }
    for i in 0..pods {
        text.push_str(&format!(
            "---\napiVersion: trellis.io/v1\nkind: Workload\nmetadata: {{name: pod-{i}, namespace: demo, labels: {{app: app-0}}}}\nspec: {{serviceAccount: app, node: node-1, nodeIP: 10.1.0.11, ip: 10.1.1.{}, ready: true}}\n",
            10 + i
        ));
    }
    std::fs::write(dir.join("demo.yaml"), text)?;
    Ok(())
}

/// The Federation manifest `trellis federation join` writes, for `cluster` on network "bench".
fn join(etcd: &Etcd, cluster: &str, manifests: &Path, creds: &Path) -> anyhow::Result<()> {
    let (ca, cert, key) = etcd.write_credentials(&trellis_federation::access::cluster_user(cluster), creds);
    let text = format!(
        "apiVersion: trellis.io/v1\nkind: Federation\nmetadata: {{name: membership}}\nspec:\n  cluster: {cluster}\n  etcd: {{endpoints: [\"{}\"], caFile: {}, certFile: {}, keyFile: {}}}\n  network: bench\n",
        etcd.client_url,
        ca.display(),
        cert.display(),
        key.display()
    );
    std::fs::write(manifests.join("federation.yaml"), text)?;
    Ok(())
}

/// Remote endpoints of `cluster` the node holds, over every service.
fn remote_endpoints(applied: &Applied, cluster: &str) -> usize {
    applied
        .slice
        .values()
        .map(|r| match &r.kind {
            Some(Variant::Service(s)) => s.endpoints.iter().filter(|e| e.cluster == cluster).count(),
            _ => 0,
        })
        .sum()
}

/// Waits (up to `timeout`) until `pred` holds on every receiver.
async fn all_hold(
    receivers: &mut [watch::Receiver<Applied>],
    timeout: Duration,
    pred: impl Fn(&Applied) -> bool,
) -> anyhow::Result<()> {
    for rx in receivers.iter_mut() {
        tokio::time::timeout(timeout, rx.wait_for(|a| pred(a)))
            .await
            .context("a node never got there")??;
    }
    Ok(())
}

/// etcd's own put → watch delivery on this etcd, as a baseline.
async fn etcd_baseline(client: &mut Client) -> anyhow::Result<Vec<Duration>> {
    let key = "/bench/baseline";
    let mut stream = client.watch(key, Some(WatchOptions::new())).await?;
    let mut times = Vec::new();
    for i in 0..CHANGES {
        let t0 = Instant::now();
        client.put(key, format!("{i}"), None).await?;
        loop {
            let response = stream.message().await?.context("the watch ended")?;
            if response.events().iter().any(|e| e.event_type() == EventType::Put) {
                break;
            }
        }
        times.push(t0.elapsed());
    }
    times.sort();
    Ok(times)
}

struct Figures {
    p50: Duration,
    p99: Duration,
}

/// East and west joined; east's pods flip readiness; west's nodes see it.
async fn propagation(bin: &Path, etcd: &Etcd, dir: &Path, nodes: usize) -> anyhow::Result<Figures> {
    let mut clusters = BTreeMap::new();
    for (name, pods) in [("east", 4), ("west", 0)] {
        let home = dir.join(name);
        let m = home.join("manifests");
        std::fs::create_dir_all(&m)?;
        manifests(&m, 1, pods)?;
        join(etcd, name, &m, &home)?;
        clusters.insert(name, (Trellisd::start(bin, name, &m, &home).await?, m));
    }
    let (west, _) = &clusters["west"];
    let mut receivers = Vec::new();
    for n in 0..nodes {
        let node = format!("node-{n}");
        let manager = west.join(&node).await?;
        receivers.push(west.subscribe(&node, &manager)?);
    }
    all_hold(&mut receivers, Duration::from_secs(60), |a| {
        remote_endpoints(a, "east") == 4
    })
    .await?;
    let file = clusters["east"].1.join("demo.yaml");
    let original = std::fs::read_to_string(&file)?;
    let mut latencies = Vec::new();
    for i in 0..CHANGES {
        let want = if i.is_multiple_of(2) { 3 } else { 4 };
        let text = if i.is_multiple_of(2) {
            original.replacen("ready: true", "ready: false", 1)
        } else {
            original.clone()
        };
        let tmp = file.with_file_name(".demo.yaml.tmp");
        std::fs::write(&tmp, text)?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, &file)?;
        all_hold(&mut receivers, Duration::from_secs(10), |a| {
            remote_endpoints(a, "east") == want
        })
        .await?;
        latencies.push(t0.elapsed());
        // Let the directory's modification time move on before the next write.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    latencies.sort();
    Ok(Figures {
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    })
}

/// A key to write, its value, and whether it lives on the lease.
type Put = (String, String, bool);

/// The keys of simulated cluster `c` (its record on `lease`), `n` being its number.
fn simulated(dir: &Path, n: usize) -> anyhow::Result<(String, String, Vec<Put>)> {
    let c = format!("sim-{n:02}");
    let td = TrustDomain::new(&format!("{c}.trellis.local"))?;
    let ca = CertificateAuthority::load_or_create(&dir.join(&c), &td, IssuancePolicy::default())?;
    let record = ClusterRecord {
        name: c.clone(),
        trust_domain: td.to_string(),
        network: "bench".into(),
        region: "sim".into(),
        zone: String::new(),
        gateway: None,
    };
    let mut kvs = vec![
        (keys::cluster(&c), encode(&record), true),
        (
            keys::bundle(td.as_str()),
            TrustBundle::new(td.clone(), ca.roots().to_vec()).to_json(),
            false,
        ),
    ];
    for k in 0..SERVICES {
        let svc = format!("svc-{k}");
        let service = ServiceRecord {
            ports: vec![ServicePort {
                name: String::new(),
                port: 80,
                target_port: 8080,
                app_protocol: String::new(),
            }],
            hostnames: vec![],
        };
        kvs.push((keys::service(&c, "demo", &svc), encode(&service), false));
        kvs.push((
            keys::endpoints(&c, "demo", &svc),
            encode(&endpoints(n, k, PER_SERVICE)),
            true,
        ));
    }
    Ok((c, td.to_string(), kvs))
}

/// `count` endpoints of service `k` of simulated cluster `n`.
fn endpoints(n: usize, k: usize, count: usize) -> EndpointsRecord {
    EndpointsRecord {
        endpoints: (0..count)
            .map(|i| {
                let ip = (n * SERVICES + k) * 1024 + i;
                EndpointRecord {
                    address: std::net::Ipv4Addr::new(10, 128 + (ip >> 16) as u8, (ip >> 8) as u8, ip as u8).into(),
                    identity: format!("spiffe://sim-{n:02}.trellis.local/ns/demo/sa/app-{k}"),
                    node: format!("node-{}", i % 50),
                    node_address: std::net::Ipv4Addr::new(10, 127, n as u8, (i % 50) as u8 + 1).into(),
                    zone: String::new(),
                }
            })
            .collect(),
        behind_gateway: Vec::new(),
    }
}

struct Scale {
    cold: Duration,
    rss_mib: f64,
    p50: Duration,
    p99: Duration,
}

/// One trellisd following [`SIMULATED`] clusters written straight to etcd.
async fn scale(bin: &Path, etcd: &Etcd, root: &mut Client, dir: &Path) -> anyhow::Result<Scale> {
    let lease = root.lease_grant(60, None).await?.id();
    let (mut keeper, _responses) = root.lease_keep_alive(lease).await?;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if keeper.keep_alive().await.is_err() {
                return;
            }
        }
    });
    for n in 0..SIMULATED {
        let (c, td, kvs) = simulated(dir, n)?;
        root.put(
            keys::grant(&c),
            encode(&GrantRecord {
                trust_domain: td.clone(),
            }),
            None,
        )
        .await?;
        for (key, value, leased) in kvs {
            let options = leased.then(|| PutOptions::new().with_lease(lease));
            root.put(key, value, options).await?;
        }
    }
    let home = dir.join("solo");
    let m = home.join("manifests");
    std::fs::create_dir_all(&m)?;
    manifests(&m, SERVICES, 0)?;
    join(etcd, "solo", &m, &home)?;
    let started = Instant::now();
    let solo = Trellisd::start(bin, "solo", &m, &home).await?;
    let manager = solo.join("node-1").await?;
    let mut node = [solo.subscribe("node-1", &manager)?];
    let total = SIMULATED * SERVICES * PER_SERVICE;
    // One pass over the node's services.
    let all = |a: &Applied| -> usize {
        a.slice
            .values()
            .map(|r| match &r.kind {
                Some(Variant::Service(s)) => s.endpoints.iter().filter(|e| e.cluster.starts_with("sim-")).count(),
                _ => 0,
            })
            .sum()
    };
    all_hold(&mut node, Duration::from_secs(120), |a| all(a) == total).await?;
    let cold = started.elapsed();
    let rss = rss_mib(solo.pid());
    let mut latencies = Vec::new();
    for i in 0..CHANGES {
        // Each round of SIMULATED changes takes one endpoint from a service of every simulated
        // cluster; the next round gives them back.
        let (n, k) = (i % SIMULATED, i % SERVICES);
        let count = if (i / SIMULATED).is_multiple_of(2) {
            PER_SERVICE - 1
        } else {
            PER_SERVICE
        };
        let key = keys::endpoints(&format!("sim-{n:02}"), "demo", &format!("svc-{k}"));
        let value = encode(&endpoints(n, k, count));
        // The node holds the change once that one service has that many endpoints of that cluster.
        let cluster = format!("sim-{n:02}");
        let service = trellis_api::slice::ResKey::new(trellis_api::config::v1::Kind::Service, &format!("demo/svc-{k}"));
        let of_cluster = move |a: &Applied| match a.slice.get(&service).and_then(|r| r.kind.as_ref()) {
            Some(Variant::Service(s)) => s.endpoints.iter().filter(|e| e.cluster == cluster).count(),
            _ => 0,
        };
        let t0 = Instant::now();
        root.put(key, value, Some(PutOptions::new().with_lease(lease))).await?;
        all_hold(&mut node, Duration::from_secs(10), |a| of_cluster(a) == count).await?;
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    Ok(Scale {
        cold,
        rss_mib: rss,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    let dir = tempfile::tempdir()?;
    let mut members: Vec<(String, String)> = ["east", "west", "solo"]
        .iter()
        .map(|c| (c.to_string(), format!("{c}.trellis.local")))
        .collect();
    members.extend((0..SIMULATED).map(|n| (format!("sim-{n:02}"), format!("sim-{n:02}.trellis.local"))));
    let etcd = Etcd::start();
    let refs: Vec<(&str, &str)> = members.iter().map(|(c, td)| (c.as_str(), td.as_str())).collect();
    etcd.provision(&refs).await;
    let mut root = trellis_federation::sync::connect(&etcd.config("root"))
        .await
        .map_err(|e| anyhow::anyhow!("root client: {e}"))?;

    println!("federation benchmark ({CHANGES} changes per figure)");
    let baseline = etcd_baseline(&mut root).await?;
    let (e50, e99) = (percentile(&baseline, 0.5), percentile(&baseline, 0.99));
    let p = propagation(&bin, &etcd, dir.path(), 3).await?;
    let s = scale(&bin, &etcd, &mut root, dir.path()).await?;

    println!();
    println!("{:<58} {:>10} {:>10} {:>10}", "", "p50 (ms)", "p99 (ms)", "target");
    println!(
        "{:<58} {:>10.1} {:>10.1}",
        "etcd put -> watch delivery (baseline)",
        ms(e50),
        ms(e99)
    );
    println!(
        "{:<58} {:>10.1} {:>10.1} {:>10}",
        "east manifest change -> every west node (3 nodes)",
        ms(p.p50),
        ms(p.p99),
        "< 100"
    );
    println!(
        "{:<58} {:>10.1} {:>10.1} {:>10}",
        "  Trellis's own share (total - etcd)",
        ms(p.p50.saturating_sub(e50)),
        ms(p.p99.saturating_sub(e99)),
        "< 30"
    );
    println!(
        "{:<58} {:>10.1} {:>10.1}",
        "  ratio to etcd's own delivery",
        ms(p.p50) / ms(e50).max(0.001),
        ms(p.p99) / ms(e99).max(0.001)
    );
    println!(
        "{:<58} {:>10.1} {:>10.1} {:>10}",
        "scale: one change of 20x5,000 -> subscribed node",
        ms(s.p50),
        ms(s.p99),
        "< 100"
    );
    println!();
    println!(
        "scale: cold sync of {SIMULATED} clusters x {} endpoints: {:.0} ms (target < 5000); trellisd RSS {:.0} MiB (target < 300)",
        SERVICES * PER_SERVICE,
        ms(s.cold),
        s.rss_mib
    );
    let ok = ms(p.p99) < 100.0
        && ms(p.p99.saturating_sub(e99)) < 30.0
        && ms(s.p99) < 100.0
        && ms(s.cold) < 5000.0
        && s.rss_mib < 300.0;
    println!("targets: {}", if ok { "met" } else { "NOT met" });
    Ok(())
}
