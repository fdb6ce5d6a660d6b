//! Control-plane benchmark: a real `trellisd` process discovering N workloads and M services
//! from a manifest directory, with K nodes subscribed to the config stream over mTLS.
//!
//! Measures, at full scale (10,000 workloads, 1,000 services, 100 nodes) and at a 1/10 baseline
//! in the same run: time until every node holds its first snapshot, trellisd's resident memory,
//! and the latency from a one-line manifest change to every affected subscriber having it.
//!
//! Run: `bash bench/run.sh control-plane` (builds with the bench profile first).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use trellis_bench::{admin_get, ms, percentile, rss_mib, Trellisd};
use trellis_identity::TrustDomain;

const CHANGES: usize = 60;

struct Scale {
    workloads: usize,
    services: usize,
    nodes: usize,
    namespaces: usize,
}

struct Figures {
    build: Duration,
    snapshots: Duration,
    rss_idle_mib: f64,
    rss_after_mib: f64,
    p50: Duration,
    p99: Duration,
}

/// One file per namespace: the namespace, its services, its workloads (spread over nodes).
fn write_manifests(dir: &Path, s: &Scale) -> anyhow::Result<()> {
    let per_ns_services = s.services / s.namespaces;
    let per_ns_workloads = s.workloads / s.namespaces;
    let per_service = per_ns_workloads / per_ns_services;
    let mut w = 0usize;
    for n in 0..s.namespaces {
        let mut text = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{trellis.io/dataplane-mode: ambient}}}}\n"
        );
        for k in 0..per_ns_services {
            let vip = 10 * 65536 + n * per_ns_services + k;
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{k}, namespace: ns-{n}}}\nspec: {{selector: {{app: app-{k}}}, clusterIP: 10.96.{}.{}, ports: [{{port: 80, targetPort: 8080}}]}}\n",
                (vip / 256) % 256,
                vip % 256
            ));
        }
        for i in 0..per_ns_workloads {
            let app = i / per_service;
            let ip = w;
            text.push_str(&format!(
                "---\napiVersion: trellis.io/v1\nkind: Workload\nmetadata: {{name: pod-{i}, namespace: ns-{n}, labels: {{app: app-{app}}}}}\nspec: {{serviceAccount: sa-{app}, node: node-{}, ip: 10.{}.{}.{}, ready: true}}\n",
                w % s.nodes,
                64 + (ip >> 16),
                (ip >> 8) & 255,
                ip & 255
            ));
            w += 1;
        }
        std::fs::write(dir.join(format!("ns-{n}.yaml")), text)?;
    }
    Ok(())
}

async fn run(bin: &Path, s: &Scale) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    write_manifests(&manifests, s)?;
    let trellisd = Trellisd::start(bin, "bench", &manifests, dir.path()).await?;
    let (pid, admin) = (trellisd.pid(), trellisd.admin);
    let deadline = Instant::now() + Duration::from_secs(30);

    // Join every node first, so the snapshot figure is the config stream's own.
    let mut managers = Vec::new();
    for n in 0..s.nodes {
        let node = format!("node-{n}");
        managers.push((node.clone(), trellisd.join(&node).await?));
    }
    // Wait until trellisd has discovered every workload.
    let discovered = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("trellis_discovery_workloads "))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<usize>().ok())
    };
    while discovered(&admin_get(admin, "/metrics").await) != Some(s.workloads) {
        anyhow::ensure!(
            Instant::now() < deadline + Duration::from_secs(60),
            "trellisd never discovered every workload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_idle_mib = rss_mib(pid);

    let started = Instant::now();
    let mut receivers = Vec::new();
    for (node, manager) in &managers {
        receivers.push(trellisd.subscribe(node, manager)?);
    }
    let expected_workloads = s.workloads / s.nodes;
    for rx in &mut receivers {
        tokio::time::timeout(
            Duration::from_secs(60),
            rx.wait_for(|a| {
                a.slice
                    .keys()
                    .filter(|k| k.kind == trellis_api::config::v1::Kind::Workload)
                    .count()
                    == expected_workloads
                    && a.slice.len() > s.services
            }),
        )
        .await
        .context("a node never got its snapshot")??;
    }
    let snapshots = started.elapsed();

    // One-line changes: flip one workload's readiness; every node holds that service.
    let file = manifests.join("ns-0.yaml");
    let original = std::fs::read_to_string(&file)?;
    let mut latencies = Vec::new();
    for i in 0..CHANGES {
        let before: Vec<u64> = receivers.iter().map(|r| r.borrow().version).collect();
        let text = if i % 2 == 0 {
            original.replacen("ready: true", "ready: false", 1)
        } else {
            original.clone()
        };
        let tmp = manifests.join(".ns-0.yaml.tmp");
        std::fs::write(&tmp, text)?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, &file)?;
        for (rx, v0) in receivers.iter_mut().zip(before) {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|a| a.version > v0))
                .await
                .context("a change never arrived")??;
        }
        latencies.push(t0.elapsed());
        // Let the directory's modification time move on before the next write.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    latencies.sort();
    let rss_after_mib = rss_mib(pid);
    let build = build_snapshots(&manifests, s)?;
    let metrics = admin_get(admin, "/metrics").await;
    let metric = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let builds = metric("trellis_config_model_build_seconds_count");
    println!(
        "  {} workloads: {} model builds, mean {:.1} ms",
        s.workloads,
        builds,
        1000.0 * metric("trellis_config_model_build_seconds_sum") / builds.max(1.0)
    );
    Ok(Figures {
        build,
        snapshots,
        rss_idle_mib,
        rss_after_mib,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    })
}

/// What trellisd does to serve a cold start, timed in-process with its own library: discover
/// the manifests, build the model, and cut and encode every node's snapshot.
fn build_snapshots(manifests: &Path, s: &Scale) -> anyhow::Result<Duration> {
    use trellis_control::discovery::directory::{DirectoryState, ManifestDirectory};
    use trellis_control::wire::RawUpdate;
    use trellis_mesh::model::{build, node_slice, ClusterInfo, Role};
    let started = Instant::now();
    let mut state = DirectoryState::default();
    ManifestDirectory::new(manifests).load(&mut state, &mut Default::default());
    let cluster = ClusterInfo {
        name: "bench".into(),
        trust_domain: TrustDomain::new("bench.trellis.local")?,
        network: "bench".into(),
        domain: "cluster.local".into(),
    };
    let (model, _) = build(&state.discovered().inventory, &cluster, None);
    let mut bytes = 0usize;
    for n in 0..s.nodes {
        let slice = node_slice(&model, &format!("node-{n}"), Role::Ztunnel);
        let update = RawUpdate {
            version: 1,
            snapshot: true,
            upserts: slice.into_values().collect(),
            removals: Vec::new(),
        };
        let mut buf = Vec::new();
        update.encode(&mut buf);
        bytes += buf.len();
    }
    let took = started.elapsed();
    println!(
        "  {} workloads: {} snapshots, {:.1} MiB encoded",
        s.workloads,
        s.nodes,
        bytes as f64 / 1048576.0
    );
    Ok(took)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    let baseline = Scale {
        workloads: 1_000,
        services: 100,
        nodes: 10,
        namespaces: 10,
    };
    let full = Scale {
        workloads: 10_000,
        services: 1_000,
        nodes: 100,
        namespaces: 100,
    };
    println!("trellisd control-plane benchmark ({CHANGES} one-line changes per scale)");
    let b = run(&bin, &baseline).await?;
    let f = run(&bin, &full).await?;
    println!();
    println!(
        "{:<44} {:>12} {:>12} {:>8} {:>10}",
        "", "baseline", "full", "ratio", "target"
    );
    println!(
        "{:<44} {:>12} {:>12}",
        "scale (workloads/services/nodes)", "1k/100/10", "10k/1k/100"
    );
    let row = |name: &str, b: f64, f: f64, unit: &str, target: &str| {
        println!(
            "{:<44} {:>10.1}{unit} {:>10.1}{unit} {:>7.1}x {:>10}",
            name,
            b,
            f,
            if b > 0.0 { f / b } else { 0.0 },
            target
        );
    };
    row(
        "build: discover + model + every snapshot (ms)",
        ms(b.build),
        ms(f.build),
        "",
        "< 1000",
    );
    row(
        "deliver: every node holds its snapshot (ms)",
        ms(b.snapshots),
        ms(f.snapshots),
        "",
        "",
    );
    row("change -> every subscriber, p50 (ms)", ms(b.p50), ms(f.p50), "", "");
    row(
        "change -> every subscriber, p99 (ms)",
        ms(b.p99),
        ms(f.p99),
        "",
        "< 100",
    );
    row(
        "trellisd RSS after discovery (MiB)",
        b.rss_idle_mib,
        f.rss_idle_mib,
        "",
        "",
    );
    row(
        "trellisd RSS with nodes subscribed (MiB)",
        b.rss_after_mib,
        f.rss_after_mib,
        "",
        "< 200",
    );
    let ok = ms(f.build) < 1000.0 && ms(f.snapshots) < 1000.0 && ms(f.p99) < 100.0 && f.rss_after_mib < 200.0;
    println!();
    println!("targets at full scale: {}", if ok { "met" } else { "NOT met" });
    println!("(deliver runs 100 subscribers on the same machine as trellisd; both figures are held to 1 s)");
    Ok(())
}
