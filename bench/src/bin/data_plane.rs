//! Data-plane benchmark: a client pod on node-1 and a server pod on node-2 of a network-namespace
//! lab (`trellis lab up`), measured in the same run DIRECT (a namespace that is not enrolled:
//! plain routing through the node namespaces) and THROUGH TWO ZTUNNELS (an enrolled namespace:
//! captured by node-1's ztunnel, tunnelled as HTTP/2 CONNECT in mTLS to node-2's ztunnel).
//!
//! Measures single-stream throughput, 1 KiB request/response latency, new connections per
//! second, and both ztunnels' resident memory, idle and at peak under the mesh runs; prints
//! each mesh figure against the direct one and a PASS/MISS line per target. The load comes from
//! `netbench` (bench/src/bin/netbench.rs), run inside the pods' namespaces.
//!
//! Run as root: `bash bench/run.sh data-plane` (builds everything with the bench profile first).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;

/// The lab's name; every namespace it makes starts with `tl-bench-`.
const LAB: &str = "bench";
/// Topology: pods on node n are 10.1.n.(10+i), i their index among that node's pods. A ztunnel
/// learns a remote pod only as the endpoint of a service, so each server backs one; the clients
/// still call the pod's address.
const TOPOLOGY: &str = "\
clusters:
  - {name: east, nodes: 2}
namespaces:
  - {name: plain, ambient: false}
  - {name: mesh, ambient: true}
services:
  - {name: psrv, namespace: plain, port: 9000, selector: {app: psrv}}
  - {name: msrv, namespace: mesh, port: 9000, selector: {app: msrv}}
pods:
  - {name: pcli, namespace: plain, node: node-1, serviceAccount: pcli}
  - {name: mcli, namespace: mesh, node: node-1, serviceAccount: mcli}
  - {name: psrv, namespace: plain, node: node-2, serviceAccount: psrv, labels: {app: psrv}}
  - {name: msrv, namespace: mesh, node: node-2, serviceAccount: msrv, labels: {app: msrv}}
";
const NODE_1: &str = "tl-bench-east-node-1";
const NODE_2: &str = "tl-bench-east-node-2";
/// ztunnel's metrics, inside a node's namespace.
const METRICS: &str = "127.0.0.1:15020";
const SERVER_PORT: u16 = 9000;

/// A client pod, the server pod it calls, and the server's address.
struct Route {
    name: &'static str,
    client_netns: &'static str,
    server_netns: &'static str,
    server: &'static str,
}

const DIRECT: Route = Route {
    name: "direct",
    client_netns: "tl-bench-east-plain-pcli",
    server_netns: "tl-bench-east-plain-psrv",
    server: "10.1.2.10:9000",
};
const MESH: Route = Route {
    name: "mesh",
    client_netns: "tl-bench-east-mesh-mcli",
    server_netns: "tl-bench-east-mesh-msrv",
    server: "10.1.2.11:9000",
};

const SECONDS: u64 = 10;
const LATENCY_ROUNDS: usize = 20_000;
const LATENCY_WARMUP: usize = 1_000;
const CONN_WORKERS: usize = 4;
const RSS_EVERY: Duration = Duration::from_millis(100);

/// Targets, and what Istio's ztunnel measured on this kind of machine.
const TARGET_THROUGHPUT: f64 = 0.45;
const ISTIO_THROUGHPUT: f64 = 0.32;
const TARGET_LATENCY: f64 = 2.0;
const ISTIO_LATENCY: f64 = 2.7;
const TARGET_CONNRATE: f64 = 0.35;
const ISTIO_CONNRATE: f64 = 0.22;
const TARGET_IDLE_MIB: f64 = 8.0;
const ISTIO_IDLE_MIB: f64 = 12.0;

/// Set by SIGINT/SIGTERM: the run stops at the next step and the lab is still taken down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct Throughput {
    gbps: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct Connrate {
    per_second: f64,
    errors: u64,
}

/// Everything one run measured: pairs are [direct, mesh].
#[derive(Debug, Clone, Copy)]
struct Figures {
    throughput: [Throughput; 2],
    latency: [Latency; 2],
    connrate: [Connrate; 2],
    /// Per ztunnel (node-1, node-2), in KiB.
    idle_kib: [u64; 2],
    peak_kib: [u64; 2],
}

/// The lab, taken down when dropped (on success, error or panic).
struct Lab {
    trellis: PathBuf,
    state_dir: PathBuf,
}

impl Lab {
    /// Takes down what a previous run left in `work`, then builds the benchmark's lab.
    fn up(bin: &Path, work: &Path, log_level: &str) -> anyhow::Result<Lab> {
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let file = work.join("topology.yaml");
        std::fs::write(&file, TOPOLOGY).with_context(|| format!("writing {}", file.display()))?;
        let lab = Lab {
            trellis: bin.join("trellis"),
            state_dir: work.join("state"),
        };
        lab.down().context("removing the lab a previous run left")?;
        let out = Command::new(&lab.trellis)
            .args(["lab", "up", "--name", LAB, "--file"])
            .arg(&file)
            .arg("--state-dir")
            .arg(&lab.state_dir)
            .arg("--bin-dir")
            .arg(bin)
            .env("RUST_LOG", log_level)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} lab up", lab.trellis.display()))?;
        if !out.status.success() {
            bail!(
                "trellis lab up failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(lab)
    }

    fn down(&self) -> anyhow::Result<()> {
        let out = Command::new(&self.trellis)
            .args(["lab", "down", "--name", LAB, "--state-dir"])
            .arg(&self.state_dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} lab down", self.trellis.display()))?;
        if !out.status.success() {
            bail!(
                "trellis lab down --name {LAB} --state-dir {} failed ({}): {}",
                self.state_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("data_plane: {e:#}");
        }
    }
}

/// The netbench servers, killed when dropped.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`: the sockets it opens live there.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: `file` is an open namespace file for the whole call; setns moves only this
            // short-lived thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| format!("entering {path}"));
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {ns} panicked"))?
    })
}

/// Starts `netbench server` in each path's server pod and waits until both accept.
fn start_servers(bin: &Path) -> anyhow::Result<Servers> {
    let mut servers = Servers(Vec::new());
    for path in [&DIRECT, &MESH] {
        let child = Command::new("ip")
            .args(["netns", "exec", path.server_netns])
            .arg(bin.join("netbench"))
            .args(["server", "--listen", &format!("0.0.0.0:{SERVER_PORT}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting netbench server in {}", path.server_netns))?;
        servers.0.push(child);
    }
    let local = SocketAddr::from(([127, 0, 0, 1], SERVER_PORT));
    for (path, child) in [&DIRECT, &MESH].into_iter().zip(&mut servers.0) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !in_netns(path.server_netns, || Ok(TcpStream::connect(local).is_ok()))? {
            if let Some(status) = child.try_wait()? {
                bail!("netbench server in {} exited: {status}", path.server_netns);
            }
            if Instant::now() > deadline {
                bail!("netbench server in {} did not listen on {local}", path.server_netns);
            }
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(servers)
}

/// Runs one netbench client in `path`'s client pod and parses the JSON it prints.
fn netbench<T: serde::de::DeserializeOwned>(bin: &Path, path: &Route, args: &[&str]) -> anyhow::Result<T> {
    check_interrupted()?;
    let out = Command::new("ip")
        .args(["netns", "exec", path.client_netns])
        .arg(bin.join("netbench"))
        .args(args)
        .args(["--to", path.server])
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running netbench {} in {}", args.join(" "), path.client_netns))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        check_interrupted()?;
        bail!(
            "netbench {} --to {} ({}) failed ({}): {}",
            args.join(" "),
            path.server,
            path.name,
            out.status,
            stderr.trim()
        );
    }
    for line in stderr.lines() {
        println!("    {}: {line}", path.name);
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "netbench {} printed {:?}, not the expected JSON",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// One connection-rate exchange from `path`'s client pod: 64 bytes each way, then the close.
fn one_exchange(path: &Route) -> anyhow::Result<()> {
    let to: SocketAddr = path.server.parse()?;
    in_netns(path.client_netns, || {
        let mut tcp =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).with_context(|| format!("connecting to {to}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut request = [0u8; 64];
        request[0] = b'C';
        tcp.write_all(&request)?;
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest)
            .with_context(|| format!("reading the answer of {to}"))?;
        anyhow::ensure!(rest.len() == 64, "{to} answered {} bytes, not 64", rest.len());
        Ok(())
    })
    .with_context(|| format!("one {} connection from {}", path.name, path.client_netns))
}

/// ztunnel's metrics page in node namespace `node`.
fn scrape(node: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = METRICS.parse()?;
    in_netns(node, || {
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        // HTTP/1.0: the body ends at the close, never chunked.
        tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: ztunnel\r\n\r\n")?;
        let mut text = String::new();
        tcp.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP response")?;
        anyhow::ensure!(head.split_whitespace().nth(1) == Some("200"), "answered {head:?}");
        Ok(body.to_string())
    })
    .with_context(|| format!("scraping http://{METRICS}/metrics in {node}"))
}

/// Sums the samples of `name` whose labels include `label="value"` (every sample when `None`).
fn metric_sum(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    let wanted = label.map(|(k, v)| format!("{k}=\"{v}\""));
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            if !wanted
                .as_deref()
                .is_none_or(|w| labels.split(',').any(|l| l.trim() == w))
            {
                return None;
            }
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

const OPENED: &str = "trellis_tcp_connections_opened_total";

/// Proves the two paths are what they claim: a direct connection leaves node-1's ztunnel alone,
/// a mesh connection is counted by it as mutual TLS.
fn check_paths() -> anyhow::Result<()> {
    let before = metric_sum(&scrape(NODE_1)?, OPENED, None);
    one_exchange(&DIRECT)?;
    std::thread::sleep(Duration::from_millis(300));
    let after = metric_sum(&scrape(NODE_1)?, OPENED, None);
    if after != before {
        bail!("the direct path went through node-1's ztunnel ({OPENED} went from {before} to {after})");
    }
    one_exchange(&MESH)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text = scrape(NODE_1)?;
        if metric_sum(&text, OPENED, Some(("connection_security_policy", "mutual_tls"))) > 0.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            let ours: Vec<&str> = text.lines().filter(|l| l.starts_with(OPENED)).collect();
            bail!(
                "the mesh path is not meshed: node-1's ztunnel counts no {OPENED} with connection_security_policy=\"mutual_tls\" after a connection from {} to {} (its samples: {ours:?})",
                MESH.client_netns,
                MESH.server
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of the ztunnel running in node namespace `node`.
fn ztunnel_pid(node: &str) -> anyhow::Result<u32> {
    let out = Command::new("ip")
        .args(["netns", "pids", node])
        .output()
        .context("running ip netns pids")?;
    anyhow::ensure!(
        out.status.success(),
        "ip netns pids {node}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ztunnel"))
        .collect();
    match pids[..] {
        [pid] => Ok(pid),
        [] => bail!("no ztunnel runs in {node}"),
        _ => bail!("more than one ztunnel runs in {node}: {pids:?}"),
    }
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (did the ztunnel exit?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .with_context(|| format!("/proc/{pid}/status has no VmRSS"))
}

/// Proportional set size of `pid` in KiB: shared pages (the binary's code, libc) divided among
/// the processes that map them; what the process costs the machine, next to VmRSS.
fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup (did the ztunnel exit?)"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .with_context(|| format!("/proc/{pid}/smaps_rollup has no Pss"))
}

/// Runs `f` while sampling the ztunnels' RSS every [`RSS_EVERY`], raising `peak` to what it saw.
fn sampled<T>(pids: [u32; 2], peak: &mut [u64; 2], f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let stop = AtomicBool::new(false);
    let (result, seen) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut seen = [0u64; 2];
            loop {
                for (max, pid) in seen.iter_mut().zip(pids) {
                    *max = (*max).max(rss_kib(pid)?);
                }
                if stop.load(Ordering::Relaxed) {
                    return anyhow::Ok(seen);
                }
                std::thread::sleep(RSS_EVERY);
            }
        });
        let result = f();
        stop.store(true, Ordering::Relaxed);
        (result, sampler.join())
    });
    let seen = seen.map_err(|_| anyhow::anyhow!("the RSS sampler panicked"))??;
    for (p, s) in peak.iter_mut().zip(seen) {
        *p = (*p).max(s);
    }
    result
}

fn measure(bin: &Path) -> anyhow::Result<Figures> {
    let pids = [ztunnel_pid(NODE_1)?, ztunnel_pid(NODE_2)?];
    let idle_kib = [rss_kib(pids[0])?, rss_kib(pids[1])?];
    let pss_kib = [pss_kib(pids[0])?, pss_kib(pids[1])?];
    println!(
        "ztunnels idle: node-1 pid {} (RSS {:.1} MiB, PSS {:.1} MiB), node-2 pid {} (RSS {:.1} MiB, PSS {:.1} MiB)",
        pids[0],
        mib(idle_kib[0]),
        mib(pss_kib[0]),
        pids[1],
        mib(idle_kib[1]),
        mib(pss_kib[1])
    );
    check_paths()?;
    println!("paths checked: direct bypasses ztunnel, mesh is counted as mutual_tls by node-1's ztunnel");
    let mut peak_kib = [0u64; 2];
    let secs = SECONDS.to_string();

    let mut throughput = Vec::new();
    for path in [&DIRECT, &MESH] {
        let run = || netbench::<Throughput>(bin, path, &["throughput", "--seconds", &secs]);
        let t = if path.name == "mesh" {
            sampled(pids, &mut peak_kib, run)?
        } else {
            run()?
        };
        println!("  throughput {:<6} {:>8.2} Gbit/s", path.name, t.gbps);
        throughput.push(t);
    }
    let mut latency = Vec::new();
    let (rounds, warmup) = (LATENCY_ROUNDS.to_string(), LATENCY_WARMUP.to_string());
    for path in [&DIRECT, &MESH] {
        let run = || netbench::<Latency>(bin, path, &["latency", "--count", &rounds, "--warmup", &warmup]);
        let l = if path.name == "mesh" {
            sampled(pids, &mut peak_kib, run)?
        } else {
            run()?
        };
        println!(
            "  latency    {:<6} p50 {:>7.1} us  p99 {:>7.1} us",
            path.name, l.p50_us, l.p99_us
        );
        latency.push(l);
    }
    let mut connrate = Vec::new();
    let workers = CONN_WORKERS.to_string();
    for path in [&DIRECT, &MESH] {
        let run = || netbench::<Connrate>(bin, path, &["connrate", "--seconds", &secs, "--workers", &workers]);
        let c = if path.name == "mesh" {
            sampled(pids, &mut peak_kib, run)?
        } else {
            run()?
        };
        println!(
            "  connrate   {:<6} {:>8.0} /s ({} errors)",
            path.name, c.per_second, c.errors
        );
        connrate.push(c);
    }
    let two = |what: &str| anyhow::anyhow!("{what}: expected a direct and a mesh figure");
    Ok(Figures {
        throughput: throughput.try_into().map_err(|_| two("throughput"))?,
        latency: latency.try_into().map_err(|_| two("latency"))?,
        connrate: connrate.try_into().map_err(|_| two("connrate"))?,
        idle_kib,
        peak_kib,
    })
}

/// The `cpu` line of /proc/stat: (busy, total) jiffies since boot, over every CPU.
fn cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))?
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...: idle and iowait are the idle ones.
    let total = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// How busy the machine is before the run (0..=1, over every CPU), sampled for a second.
fn busy_before() -> anyhow::Result<f64> {
    let sample = || {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        cpu_jiffies(&stat).context("/proc/stat has no cpu line")
    };
    let (b0, t0) = sample()?;
    std::thread::sleep(Duration::from_secs(1));
    let (b1, t1) = sample()?;
    Ok(b1.saturating_sub(b0) as f64 / t1.saturating_sub(t0).max(1) as f64)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ratio(mesh: f64, direct: f64) -> f64 {
    if direct > 0.0 {
        mesh / direct
    } else {
        0.0
    }
}

/// The figures as a table: direct, mesh, mesh/direct, target.
fn table(f: &Figures) -> String {
    let mut out = format!(
        "{:<40} {:>10} {:>10} {:>12} {:>10}\n",
        "", "direct", "mesh", "mesh/direct", "target"
    );
    let mut row = |name: &str, direct: String, mesh: String, ratio: String, target: String| {
        let _ = writeln!(out, "{name:<40} {direct:>10} {mesh:>10} {ratio:>12} {target:>10}");
    };
    // A figure measured both ways, with `decimals` places, and their ratio.
    let both = |d: f64, m: f64, decimals: usize| {
        (
            format!("{d:.decimals$}"),
            format!("{m:.decimals$}"),
            format!("{:.2}", ratio(m, d)),
        )
    };
    let none = String::new;
    let (d, m, r) = both(f.throughput[0].gbps, f.throughput[1].gbps, 2);
    row(
        "throughput, 1 stream (Gbit/s)",
        d,
        m,
        r,
        format!(">= {TARGET_THROUGHPUT}x"),
    );
    let (d, m, r) = both(f.latency[0].p50_us, f.latency[1].p50_us, 1);
    row(
        "latency 1 KiB req/resp, p50 (us)",
        d,
        m,
        r,
        format!("<= {TARGET_LATENCY:.1}x"),
    );
    let (d, m, r) = both(f.latency[0].p99_us, f.latency[1].p99_us, 1);
    row("latency 1 KiB req/resp, p99 (us)", d, m, r, none());
    let (d, m, r) = both(f.connrate[0].per_second, f.connrate[1].per_second, 0);
    let name = format!("new connections, {CONN_WORKERS} workers (/s)");
    row(&name, d, m, r, format!(">= {TARGET_CONNRATE}x"));
    let errors = |c: &Connrate| c.errors.to_string();
    row(
        "  connections that failed",
        errors(&f.connrate[0]),
        errors(&f.connrate[1]),
        none(),
        none(),
    );
    for (i, node) in ["node-1", "node-2"].into_iter().enumerate() {
        let idle = format!("{:.1}", mib(f.idle_kib[i]));
        let name = format!("ztunnel {node} RSS idle (MiB)");
        row(&name, "-".into(), idle, "-".into(), format!("<= {TARGET_IDLE_MIB:.1}"));
    }
    for (i, node) in ["node-1", "node-2"].into_iter().enumerate() {
        let peak = format!("{:.1}", mib(f.peak_kib[i]));
        row(
            &format!("ztunnel {node} RSS peak, mesh runs (MiB)"),
            "-".into(),
            peak,
            "-".into(),
            none(),
        );
    }
    out
}

/// One line per target: PASS or MISS, the figure, the target and Istio's ztunnel.
fn verdicts(f: &Figures) -> Vec<String> {
    let line = |pass: bool, text: String| format!("{} {text}", if pass { "PASS" } else { "MISS" });
    let throughput = ratio(f.throughput[1].gbps, f.throughput[0].gbps);
    let latency = ratio(f.latency[1].p50_us, f.latency[0].p50_us);
    let connrate = ratio(f.connrate[1].per_second, f.connrate[0].per_second);
    let idle = mib(f.idle_kib[0].max(f.idle_kib[1]));
    vec![
        line(
            throughput >= TARGET_THROUGHPUT,
            format!("throughput mesh/direct {throughput:.2} (target >= {TARGET_THROUGHPUT}; Istio's ztunnel {ISTIO_THROUGHPUT})"),
        ),
        line(
            latency > 0.0 && latency <= TARGET_LATENCY,
            format!("latency p50 mesh/direct {latency:.2} (target <= {TARGET_LATENCY:.1}; Istio's ztunnel {ISTIO_LATENCY})"),
        ),
        line(
            connrate >= TARGET_CONNRATE,
            format!("connections/s mesh/direct {connrate:.2} (target >= {TARGET_CONNRATE}; Istio's ztunnel {ISTIO_CONNRATE})"),
        ),
        line(
            idle > 0.0 && idle <= TARGET_IDLE_MIB,
            format!("ztunnel idle RSS {idle:.1} MiB, the larger of the two (target <= {TARGET_IDLE_MIB:.0} MiB; Istio's ztunnel {ISTIO_IDLE_MIB:.0} MiB)"),
        ),
    ]
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the data-plane benchmark builds network namespaces: run it as root");
    }
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("the benchmark binary's directory")?
        .to_path_buf();
    for name in ["netbench", "trellis", "trellisd", "ztunnel"] {
        anyhow::ensure!(
            bin.join(name).is_file(),
            "{} is missing: run bash bench/run.sh data-plane, which builds it",
            bin.join(name).display()
        );
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe. Children get the
    // default disposition back at exec, so Ctrl-C still stops a running netbench.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    // The ztunnels log at RUST_LOG, as `trellis lab up` would run them (info: an access-log line
    // per connection) unless the caller says otherwise.
    let log_level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "ztunnel data-plane benchmark: {cpus} CPUs, ztunnel RUST_LOG={log_level}, {SECONDS} s runs, {LATENCY_ROUNDS} latency rounds, {CONN_WORKERS} connection workers"
    );
    println!(
        "direct: {} -> {}; mesh: {} -> {}",
        DIRECT.client_netns, DIRECT.server, MESH.client_netns, MESH.server
    );
    let busy = busy_before()?;
    println!("CPU busy before the run: {:.0}%", busy * 100.0);
    if busy > 0.10 {
        println!("note: other work is running on this machine; it skews the figures, the tail latencies most");
    }

    // A fixed directory, so that a run that was killed outright is cleaned up by the next one.
    let work = std::env::temp_dir().join("trellis-bench-data-plane");
    let started = Instant::now();
    let lab = Lab::up(&bin, &work, &log_level)?;
    println!("lab up in {:.1} s", started.elapsed().as_secs_f64());
    let servers = start_servers(&bin)?;
    let figures = measure(&bin)?;
    drop(servers);
    drop(lab);

    println!();
    print!("{}", table(&figures));
    println!();
    for v in verdicts(&figures) {
        println!("{v}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# HELP trellis_tcp_connections_opened TCP connections opened
# TYPE trellis_tcp_connections_opened counter
trellis_tcp_connections_opened_total{reporter=\"source\",connection_security_policy=\"mutual_tls\"} 3
trellis_tcp_connections_opened_total{reporter=\"source\",connection_security_policy=\"none\"} 2
trellis_tcp_connections_opened_totalx 100
trellis_tcp_sent_bytes_total{reporter=\"source\"} 7
";

    #[test]
    fn cpu_jiffies_counts_iowait_as_idle() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(cpu_jiffies(stat), Some((150, 1000)));
        assert_eq!(cpu_jiffies("intr 1 2\n"), None);
    }

    #[test]
    fn metric_sum_adds_the_samples_with_the_label() {
        assert_eq!(metric_sum(PAGE, OPENED, None), 5.0);
        assert_eq!(
            metric_sum(PAGE, OPENED, Some(("connection_security_policy", "mutual_tls"))),
            3.0
        );
        assert_eq!(metric_sum(PAGE, OPENED, Some(("reporter", "destination"))), 0.0);
        assert_eq!(metric_sum("up 1\n", "up", None), 1.0);
    }

    fn figures(mesh_gbps: f64, mesh_p50: f64, mesh_cps: f64, idle_mib: u64) -> Figures {
        Figures {
            throughput: [Throughput { gbps: 10.0 }, Throughput { gbps: mesh_gbps }],
            latency: [
                Latency {
                    p50_us: 50.0,
                    p99_us: 90.0,
                },
                Latency {
                    p50_us: mesh_p50,
                    p99_us: 200.0,
                },
            ],
            connrate: [
                Connrate {
                    per_second: 10_000.0,
                    errors: 0,
                },
                Connrate {
                    per_second: mesh_cps,
                    errors: 0,
                },
            ],
            idle_kib: [idle_mib * 1024, 1024],
            peak_kib: [idle_mib * 2048, 2048],
        }
    }

    #[test]
    fn targets_pass_at_their_bounds_and_miss_beyond() {
        let at_bounds = verdicts(&figures(4.5, 100.0, 3_500.0, 8));
        assert!(at_bounds.iter().all(|v| v.starts_with("PASS")), "{at_bounds:?}");
        let beyond = verdicts(&figures(4.4, 101.0, 3_499.0, 9));
        assert!(beyond.iter().all(|v| v.starts_with("MISS")), "{beyond:?}");
    }

    #[test]
    fn a_zero_direct_figure_is_a_miss_not_a_pass() {
        let mut f = figures(4.5, 100.0, 3_500.0, 8);
        f.latency[0].p50_us = 0.0;
        f.throughput[0].gbps = 0.0;
        let v = verdicts(&f);
        assert!(v[0].starts_with("MISS") && v[1].starts_with("MISS"), "{v:?}");
    }

    #[test]
    fn the_table_shows_ratios_and_no_ratio_for_memory() {
        let t = table(&figures(4.5, 100.0, 3_500.0, 8));
        assert!(t.contains("0.45"), "{t}");
        assert!(t.contains("4.50"), "{t}");
        assert!(t.contains("2.00"), "{t}");
        let rss = t.lines().find(|l| l.starts_with("ztunnel node-1 RSS idle")).unwrap();
        assert!(rss.contains(" - "), "{rss}");
    }
}
