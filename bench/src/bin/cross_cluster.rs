//! Cross-cluster overhead: in a two-cluster lab (`trellis lab up`: east and west on two
//! networks, etcd, a gateway each), a client pod of east calls a server on east's other node
//! (east → east: two ztunnels) and, in the same run, a server in west behind its gateway
//! (east → west: east's ztunnel, west's gateway, west's ztunnel, the tunnel inside a tunnel).
//! Measures 1 KiB request/response latency on an open connection and new connections per
//! second, with `netbench` in the pods, and prints east → west against east → east.
//!
//! Istio's published figures for its tunnel inside a tunnel, for comparison: +2.2 ms (346%) per
//! new connection and +0.13 ms (72%) per request.
//!
//! Run as root: `bash bench/run.sh federation` (after the federation benchmark) or
//! `target/release/cross_cluster` once built with the bench profile.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context};
use trellis_bench::procs::{lab_up, netbench_servers};
use trellis_bench::results::{self, Connrate, Latency};

const LAB: &str = "xbench";
const TOPOLOGY: &str = "\
clusters:
  - {name: east, nodes: 2}
  - {name: west, nodes: 1}
namespaces:
  - {name: mesh, ambient: true}
services:
  - {name: near, namespace: mesh, cluster: east, port: 9000, selector: {app: near}}
  - {name: far, namespace: mesh, cluster: east, port: 9000, selector: {app: far}, global: true}
  - {name: far, namespace: mesh, cluster: west, port: 9000, selector: {app: far}, global: true}
pods:
  - {name: cli, namespace: mesh, cluster: east, node: node-1, serviceAccount: cli}
  - {name: near, namespace: mesh, cluster: east, node: node-2, serviceAccount: near, labels: {app: near}}
  - {name: far, namespace: mesh, cluster: west, node: node-1, serviceAccount: far, labels: {app: far}}
";
const CLIENT: &str = "tl-xbench-east-mesh-cli";
/// The VIPs of east's services (the k-th service of cluster 1 is 10.101.0.(10+k)).
const NEAR: &str = "10.101.0.10:9000";
const FAR: &str = "10.101.0.11:9000";
const SERVERS: [&str; 2] = ["tl-xbench-east-mesh-near", "tl-xbench-west-mesh-far"];

struct Lab {
    trellis: PathBuf,
    servers: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new(&self.trellis)
            .args(["lab", "down", "--name", LAB])
            .output();
    }
}

fn netbench<T: serde::de::DeserializeOwned>(bin: &Path, args: &[&str]) -> anyhow::Result<T> {
    Ok(results::netbench(bin, CLIENT, args)?.0)
}

fn main() -> anyhow::Result<()> {
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    let work = tempfile::tempdir()?;
    let file = work.path().join("topology.yaml");
    std::fs::write(&file, TOPOLOGY)?;
    let mut lab = Lab {
        trellis: bin.join("trellis"),
        servers: Vec::new(),
    };
    lab_up(&bin, LAB, &file)?;
    netbench_servers(&bin, &SERVERS, &mut lab.servers)?;
    // Both paths answer before anything is measured.
    for to in [NEAR, FAR] {
        let mut tries = 0;
        while netbench::<Latency>(&bin, &["latency", "--to", to, "--count", "10", "--warmup", "0"]).is_err() {
            tries += 1;
            if tries > 100 {
                bail!("{to} never answered through the mesh");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let latency = |to: &str| netbench::<Latency>(&bin, &["latency", "--to", to, "--count", "10000", "--warmup", "500"]);
    let connrate =
        |to: &str| netbench::<Connrate>(&bin, &["connrate", "--to", to, "--seconds", "10", "--workers", "1"]);
    let (ln, lf) = (latency(NEAR)?, latency(FAR)?);
    let (cn, cf) = (connrate(NEAR)?, connrate(FAR)?);
    // One worker: a new connection's cost is the inverse of the rate.
    let (new_n, new_f) = (1000.0 / cn.per_second.max(1e-9), 1000.0 / cf.per_second.max(1e-9));
    println!(
        "cross-cluster overhead (one client in east; east -> east is two ztunnels, east -> west adds both gateways)"
    );
    println!();
    println!(
        "{:<40} {:>12} {:>12} {:>10} {:>10}",
        "", "east->east", "east->west", "added", "ratio"
    );
    let row = |name: &str, a: f64, b: f64| {
        println!(
            "{:<40} {:>12.3} {:>12.3} {:>10.3} {:>9.0}%",
            name,
            a,
            b,
            b - a,
            100.0 * (b - a) / a.max(1e-9)
        );
    };
    row(
        "1 KiB request on an open connection, p50 (ms)",
        ln.p50_us / 1000.0,
        lf.p50_us / 1000.0,
    );
    row(
        "1 KiB request on an open connection, p99 (ms)",
        ln.p99_us / 1000.0,
        lf.p99_us / 1000.0,
    );
    row("new connection + 64 B exchange (ms)", new_n, new_f);
    println!();
    println!(
        "connection errors: {} east->east, {} east->west; Istio's tunnel inside a tunnel adds 2.2 ms (346%) per new connection and 0.13 ms (72%) per request",
        cn.errors, cf.errors
    );
    let ok = new_f - new_n < 2.2 && (lf.p50_us - ln.p50_us) / 1000.0 < 0.13;
    println!("better than Istio on both: {}", if ok { "yes" } else { "NO" });
    Ok(())
}
