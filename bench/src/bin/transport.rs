//! The tunnel transports between two clusters, side by side in one lab (`trellis lab up`: east
//! with three nodes, west with one, a gateway each on a shared wan): a client pod on each east
//! node calls a server pod in west through west's gateway, node-1's ztunnel over HBONE on
//! HTTP/3 (QUIC, CUBIC), node-2's over HTTP/3 with BBR, node-3's over HTTP/2 (TCP); and, as the
//! baseline, plain TCP between the two gateways' namespaces over the same wan link. The link is
//! clean, lossy (15 ms each way, 1% loss each way: a 30 ms round trip) or long and fat (25 ms
//! each way, no loss: 50 ms). This kernel has no `sch_netem`, so `wanem` (this crate, netem's
//! delay and loss in user space) sits between west's gateway and the wan bridge for those two.
//!
//! Prints, per link and path: single-stream throughput, 1 KiB request/response p50/p99, new
//! connections per second and the CPU the ztunnels on the path (east's node, west's gateway and
//! west's node) spend per GB moved; 16 concurrent tunnels' p99 and their fewest and most
//! rounds; then the targets with the ratios measured.
//!
//! Run as root: `bash bench/run.sh transport`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use trellis_bench::procs::{cpu_while, in_netns, lab_up, metric_sum, netbench_servers, ztunnel_pid};
use trellis_bench::results::{self, Connrate, Latency, Pingpong, Throughput};

const LAB: &str = "tbench";
/// The lab; `quic` (`TRANSPORT_QUIC_ARGS`, words) is appended to every QUIC ztunnel's flags, to
/// try a setting against HTTP/2 in the same run.
fn topology(quic: &str) -> String {
    let quic: Vec<String> = quic.split_whitespace().map(|w| format!("{w:?}")).collect();
    let bbr: Vec<String> = ["\"--quic-congestion\"".to_string(), "\"bbr\"".to_string()]
        .into_iter()
        .chain(quic.iter().cloned())
        .collect();
    let (node_1, node_2) = (quic.join(", "), bbr.join(", "));
    let west = if quic.is_empty() {
        String::new()
    } else {
        format!(", ztunnelArgs: [{node_1}]")
    };
    format!(
        "\
clusters:
  - name: east
    nodes: 3
    nodeZtunnelArgs:
      node-1: [{node_1}]
      node-2: [{node_2}]
      node-3: [--transport-remote, h2]
  - {{name: west, nodes: 1{west}}}
{REST}"
    )
}

const REST: &str = "\
namespaces:
  - {name: mesh, ambient: true}
services:
  - {name: far, namespace: mesh, cluster: east, port: 9000, selector: {app: far}, global: true}
  - {name: far, namespace: mesh, cluster: west, port: 9000, selector: {app: far}, global: true}
pods:
  - {name: h3, namespace: mesh, cluster: east, node: node-1, serviceAccount: cli}
  - {name: bbr, namespace: mesh, cluster: east, node: node-2, serviceAccount: cli}
  - {name: h2, namespace: mesh, cluster: east, node: node-3, serviceAccount: cli}
  - {name: far, namespace: mesh, cluster: west, node: node-1, serviceAccount: far, labels: {app: far}}
";
/// East's VIP of `far` (the first service of cluster 1): served only in west.
const FAR: &str = "10.101.0.10:9000";
/// West's gateway on the wan (10.200.0.(10+c)).
const WEST_GW_WAN: &str = "10.200.0.12:9000";
const EAST_GW: &str = "tl-tbench-east-gw";
const WEST_GW: &str = "tl-tbench-west-gw";
const WEST_NODE: &str = "tl-tbench-west-node-1";
const SERVERS: [&str; 2] = ["tl-tbench-west-mesh-far", WEST_GW];
const METRICS: &str = "127.0.0.1:15020";
const TUNNELS: &str = "trellis_tunnels_opened_total";
const FALLBACKS: &str = "trellis_quic_fallbacks_total";
/// Concurrent tunnels on the lossy link.
const CONCURRENT: usize = 16;

/// One way from east to the server in west.
struct Route {
    name: &'static str,
    /// Where the client runs.
    client: &'static str,
    to: &'static str,
    /// East's node whose ztunnel carries it, with the transport it must use; none for direct.
    node: Option<(&'static str, &'static str)>,
}

const ROUTES: [Route; 4] = [
    Route {
        name: "direct TCP",
        client: EAST_GW,
        to: WEST_GW_WAN,
        node: None,
    },
    Route {
        name: "HBONE HTTP/2",
        client: "tl-tbench-east-mesh-h2",
        to: FAR,
        node: Some(("tl-tbench-east-node-3", "h2")),
    },
    Route {
        name: "HBONE HTTP/3",
        client: "tl-tbench-east-mesh-h3",
        to: FAR,
        node: Some(("tl-tbench-east-node-1", "h3")),
    },
    Route {
        name: "HBONE HTTP/3 BBR",
        client: "tl-tbench-east-mesh-bbr",
        to: FAR,
        node: Some(("tl-tbench-east-node-2", "h3")),
    },
];
const DIRECT: usize = 0;
const H2: usize = 1;
const H3: usize = 2;
const BBR: usize = 3;

/// The link between the two clusters' networks, as `wanem` shapes it.
#[derive(Debug, Clone, Copy)]
enum Link {
    Clean,
    /// 30 ms round trip, 1% loss each way.
    Lossy,
    /// 50 ms round trip, no loss.
    LongFat,
}

impl Link {
    /// The delay (ms) and loss (%) each way, as `wanem` takes them: half the round trip.
    fn wanem(self) -> Option<(&'static str, &'static str)> {
        match self {
            Link::Clean => None,
            Link::Lossy => Some(("15", "1")),
            Link::LongFat => Some(("25", "0")),
        }
    }
}

struct Lab {
    trellis: PathBuf,
    servers: Vec<Child>,
    wanem: Option<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in self.servers.iter_mut().chain(self.wanem.as_mut()) {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new(&self.trellis)
            .args(["lab", "down", "--name", LAB])
            .output();
    }
}

fn netbench<T: serde::de::DeserializeOwned>(bin: &Path, route: &Route, args: &[&str]) -> anyhow::Result<T> {
    let args = [args, &["--to", route.to]].concat();
    let (parsed, _) = results::netbench(bin, route.client, &args).with_context(|| format!("over {}", route.name))?;
    Ok(parsed)
}

/// The lab's underlay namespace, its wan bridge, and west gateway's port on it.
const UNDERLAY: &str = "tl-tbench-u";
const WAN_BRIDGE: &str = "br-wan";
const WEST_PORT: &str = "w2gw";
/// The veth pair that puts [`wanem`](../wanem) between west's port and the bridge.
const SHAPED: [&str; 2] = ["tbwd0", "tbwd1"];

fn underlay(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", UNDERLAY])
        .args(args)
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} in {UNDERLAY}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The wan as `link` says: west's gateway port straight on the bridge, or behind `wanem`
/// (this kernel has no netem) with the link's delay and loss each way.
fn shape(lab: &mut Lab, bin: &Path, link: Link) -> anyhow::Result<()> {
    if let Some(mut old) = lab.wanem.take() {
        let _ = old.kill();
        let _ = old.wait();
    }
    let _ = underlay(&["ip", "link", "del", SHAPED[0]]);
    let Some((delay, loss)) = link.wanem() else {
        return underlay(&["ip", "link", "set", WEST_PORT, "master", WAN_BRIDGE]);
    };
    underlay(&["ip", "link", "set", WEST_PORT, "nomaster"])?;
    underlay(&[
        "ip", "link", "add", SHAPED[0], "type", "veth", "peer", "name", SHAPED[1],
    ])?;
    underlay(&["ip", "link", "set", SHAPED[1], "master", WAN_BRIDGE, "up"])?;
    underlay(&["ip", "link", "set", SHAPED[0], "up"])?;
    lab.wanem = Some(
        Command::new("ip")
            .args(["netns", "exec", UNDERLAY])
            .arg(bin.join("wanem"))
            .args([
                "--a",
                WEST_PORT,
                "--b",
                SHAPED[0],
                "--delay-ms",
                delay,
                "--loss-percent",
                loss,
            ])
            .spawn()
            .context("starting wanem")?,
    );
    Ok(())
}

fn scrape(ns: &str) -> anyhow::Result<String> {
    in_netns(ns, || {
        let (status, body) = trellis_admin::client::get_blocking(METRICS.parse()?, "/metrics", Duration::from_secs(5))?;
        anyhow::ensure!(status == 200, "answered {status}");
        Ok(body)
    })
    .with_context(|| format!("scraping {METRICS} in {ns}"))
}

/// Tunnels each east node's ztunnel opened as the source, over `transport`.
fn tunnels_over(node: &str, transport: &str) -> anyhow::Result<f64> {
    let page = scrape(node)?;
    Ok(page
        .lines()
        .filter(|l| {
            l.starts_with(TUNNELS)
                && l.contains("reporter=\"source\"")
                && l.contains(&format!("transport=\"{transport}\""))
        })
        .map(|l| metric_sum(l, TUNNELS, None))
        .sum())
}

/// Every mesh route carried its tunnels on its own transport only, and no QUIC dial fell back.
fn check_transports() -> anyhow::Result<()> {
    for route in &ROUTES {
        let Some((node, transport)) = route.node else { continue };
        let other = if transport == "h2" { "h3" } else { "h2" };
        let (ours, theirs) = (tunnels_over(node, transport)?, tunnels_over(node, other)?);
        let fallbacks = metric_sum(&scrape(node)?, FALLBACKS, None);
        if ours == 0.0 || theirs > 0.0 || fallbacks > 0.0 {
            bail!(
                "{} is not what it claims: {node}'s ztunnel opened {ours} tunnels over {transport}, {theirs} over {other}, {fallbacks} QUIC fallbacks",
                route.name
            );
        }
    }
    Ok(())
}

/// CPU-seconds per GB moved.
fn per_gb(cpu_s: f64, bytes: u64) -> f64 {
    cpu_s / (bytes as f64 / 1e9).max(1e-9)
}

fn ratio(a: f64, b: f64) -> f64 {
    a / b.max(1e-9)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the transport benchmark builds network namespaces: run it as root");
    }
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    let work = tempfile::tempdir()?;
    let file = work.path().join("topology.yaml");
    std::fs::write(
        &file,
        topology(&std::env::var("TRANSPORT_QUIC_ARGS").unwrap_or_default()),
    )?;
    let mut lab = Lab {
        trellis: bin.join("trellis"),
        servers: Vec::new(),
        wanem: None,
    };
    lab_up(&bin, LAB, &file)?;
    netbench_servers(&bin, &SERVERS, &mut lab.servers)?;
    // Every route answers before anything is measured.
    for route in &ROUTES {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = netbench::<Latency>(&bin, route, &["latency", "--count", "10", "--warmup", "0"]) {
            if Instant::now() > deadline {
                return Err(e.context(format!("{} never answered", route.name)));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    check_transports()?;
    let west = [ztunnel_pid(WEST_GW)?, ztunnel_pid(WEST_NODE)?];
    let pids = |route: &Route| -> anyhow::Result<Vec<u32>> {
        match route.node {
            None => Ok(Vec::new()),
            Some((node, _)) => Ok(vec![ztunnel_pid(node)?, west[0], west[1]]),
        }
    };

    // The clean link.
    shape(&mut lab, &bin, Link::Clean)?;
    let mut clean = Vec::new();
    for route in &ROUTES {
        let (tp, cpu_s) = cpu_while(&pids(route)?, || {
            netbench::<Throughput>(&bin, route, &["throughput", "--seconds", "10"])
        })?;
        let lat = netbench::<Latency>(&bin, route, &["latency", "--count", "5000", "--warmup", "500"])?;
        let conn = netbench::<Connrate>(&bin, route, &["connrate", "--seconds", "10", "--workers", "1"])?;
        clean.push((tp, cpu_s, lat, conn));
    }
    println!("clean link (the wan bridge as the lab builds it; the ztunnels' CPU is east's node, west's gateway and west's node together)");
    println!();
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10}",
        "", "Gbit/s", "p50 ms", "p99 ms", "new conn/s", "errors", "CPU-s/GB"
    );
    for (route, (tp, cpu_s, lat, conn)) in ROUTES.iter().zip(&clean) {
        let cpu = if route.node.is_some() {
            format!("{:.2}", per_gb(*cpu_s, tp.bytes))
        } else {
            "-".into()
        };
        println!(
            "{:<20} {:>10.3} {:>10.3} {:>10.3} {:>12.1} {:>10} {:>10}",
            route.name,
            tp.gbps,
            lat.p50_us / 1000.0,
            lat.p99_us / 1000.0,
            conn.per_second,
            conn.errors,
            cpu
        );
    }

    // The lossy link: 16 tunnels at once, 1 KiB each way per round.
    shape(&mut lab, &bin, Link::Lossy)?;
    let mut lossy = Vec::new();
    let connections = CONCURRENT.to_string();
    for route in &ROUTES {
        // A short warm-up, so that every route's connections are pooled before it counts.
        netbench::<Pingpong>(
            &bin,
            route,
            &["pingpong", "--seconds", "2", "--connections", &connections],
        )?;
        lossy.push(netbench::<Pingpong>(
            &bin,
            route,
            &["pingpong", "--seconds", "20", "--connections", &connections],
        )?);
    }
    println!();
    println!("lossy link (wanem between the gateways: 15 ms and 1% of frames lost each way; {CONCURRENT} concurrent tunnels of 1 KiB request/response for 20 s)");
    println!();
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "", "p50 ms", "p99 ms", "rounds/s", "fewest/conn", "most/conn", "errors"
    );
    for (route, p) in ROUTES.iter().zip(&lossy) {
        println!(
            "{:<20} {:>10.2} {:>10.2} {:>10.1} {:>12} {:>12} {:>8}",
            route.name,
            p.p50_us / 1000.0,
            p.p99_us / 1000.0,
            p.per_second,
            p.fewest,
            p.most,
            p.errors
        );
    }

    // The long fat link: one stream.
    shape(&mut lab, &bin, Link::LongFat)?;
    let mut fat = Vec::new();
    for route in &ROUTES {
        fat.push(netbench::<Throughput>(&bin, route, &["throughput", "--seconds", "20"])?);
    }
    shape(&mut lab, &bin, Link::Clean)?;
    println!();
    println!("long fat link (wanem between the gateways: 25 ms each way, no loss; one stream for 20 s)");
    println!();
    println!("{:<20} {:>10} {:>10}", "", "Gbit/s", "x direct");
    for (route, tp) in ROUTES.iter().zip(&fat) {
        println!(
            "{:<20} {:>10.3} {:>10.2}",
            route.name,
            tp.gbps,
            ratio(tp.gbps, fat[DIRECT].gbps)
        );
    }
    check_transports()?;

    // The targets.
    let (h2, h3) = (&clean[H2], &clean[H3]);
    let throughput = ratio(h3.0.gbps, h2.0.gbps);
    let cpu = ratio(per_gb(h3.1, h3.0.bytes), per_gb(h2.1, h2.0.bytes));
    let p99 = ratio(lossy[H3].p99_us, lossy[H2].p99_us);
    let p99_bbr = ratio(lossy[BBR].p99_us, lossy[H2].p99_us);
    // Starved: a tunnel that did under half of the mean tunnel's rounds.
    let starved = |p: &Pingpong| (p.fewest as f64) < 0.5 * p.round_trips as f64 / CONCURRENT as f64;
    let long = ratio(fat[H3].gbps, fat[DIRECT].gbps);
    let long_bbr = ratio(fat[BBR].gbps, fat[DIRECT].gbps);
    println!();
    println!("targets (HTTP/3 with CUBIC, the default; BBR alongside)");
    println!(
        "  clean: HTTP/3 throughput {throughput:.2}x HTTP/2's (target >= 0.8): {}; BBR {:.2}x",
        verdict(throughput >= 0.8),
        ratio(clean[BBR].0.gbps, h2.0.gbps)
    );
    println!(
        "  clean: HTTP/3 CPU per GB {cpu:.2}x HTTP/2's (target <= 1.3): {}; BBR {:.2}x",
        verdict(cpu <= 1.3),
        ratio(per_gb(clean[BBR].1, clean[BBR].0.bytes), per_gb(h2.1, h2.0.bytes))
    );
    println!(
        "  lossy: HTTP/3 p99 {p99:.2}x HTTP/2's (target <= 0.6): {}; BBR {p99_bbr:.2}x",
        verdict(p99 <= 0.6)
    );
    println!(
        "  lossy: no HTTP/3 tunnel starved (fewest rounds >= half the mean): {}; HTTP/2 {}, BBR {}",
        verdict(!starved(&lossy[H3])),
        if starved(&lossy[H2]) {
            "starved one"
        } else {
            "none starved"
        },
        if starved(&lossy[BBR]) {
            "starved one"
        } else {
            "none starved"
        }
    );
    println!(
        "  long fat: one HTTP/3 tunnel {long:.2}x direct TCP (target >= 0.8): {}; BBR {long_bbr:.2}x, HTTP/2 {:.2}x",
        verdict(long >= 0.8),
        ratio(fat[H2].gbps, fat[DIRECT].gbps)
    );
    drop(lab);
    Ok(())
}
