//! Cross-cluster failover, measured (issue 14): a client pod opens 200 new connections a second
//! (each a fresh TCP connect, one HTTP GET and its answer, paced in an open loop so a stalled
//! connection does not hold back the next) to the global service `hello`, and the bench breaks
//! what serves it, three times in one lab:
//!
//! 1. east's client, east's every `hello` endpoint killed (west serves next);
//! 2. east's client, the east node that runs `hello` blackholed (packets dropped, no reset);
//! 3. north's client (north has no `hello` of its own; weights `east=100,west=0` make it prefer
//!    east), the whole of east lost: its trellisd, ztunnels and gateway killed.
//!
//! For each: the time from the fault to the first connection served by another cluster, the
//! time until every connection is, and the connections that failed. Targets: none failed;
//! served remotely within 1 s (runs 1 and 2), within the lease TTL plus 1 s (run 3).
//!
//! Run as root: `bash bench/run.sh failover`, or `target/release/failover` once built with the
//! bench profile. Needs Debian's etcd (`bash deploy/install-deps.sh`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use trellis_bench::ms;
use trellis_e2e::lab::load::{calls, Load, Outcome};
use trellis_e2e::lab::{
    blackhole, config_dump, endpoint_clusters, is_running, kill_all_in, lift_blackhole, operator_etcd_flags, pids_in,
    service_weights,
};
use trellis_federation::sync::LEASE_TTL;

const LAB: &str = "fobench";
/// New connections a second.
const RATE: u32 = 200;
/// Load before each fault (every connection should be served by the preferred cluster).
const BEFORE: Duration = Duration::from_secs(2);
/// Load after the fault of runs 1 and 2.
const AFTER: Duration = Duration::from_secs(5);
/// ztunnel's connect timeout per attempt, as the topology sets it.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// East has the client of runs 1 and 2 on node-1 and its only `hello` on node-2; west serves
/// `hello` too; north has only a client. Each server answers with its cluster as its version.
const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 2, ztunnelArgs: [--connect-timeout-ms, "500"]}
  - {name: west, nodes: 1, ztunnelArgs: [--connect-timeout-ms, "500"]}
  - {name: north, nodes: 1, ztunnelArgs: [--connect-timeout-ms, "500"]}
namespaces:
  - {name: bench, ambient: true}
services:
  - {name: hello, namespace: bench, cluster: east, port: 80, targetPort: 8080, selector: {app: hello}, global: true}
  - {name: hello, namespace: bench, cluster: west, port: 80, targetPort: 8080, selector: {app: hello}, global: true}
  - {name: hello, namespace: bench, cluster: north, port: 80, targetPort: 8080, selector: {app: hello}, global: true}
pods:
  - {name: cli, namespace: bench, cluster: east, node: node-1, serviceAccount: cli}
  - {name: hello-e, namespace: bench, cluster: east, node: node-2, serviceAccount: hello, labels: {app: hello}, run: {server: {version: east, port: 8080}}}
  - {name: hello-w, namespace: bench, cluster: west, node: node-1, serviceAccount: hello, labels: {app: hello}, run: {server: {version: west, port: 8080}}}
  - {name: cli, namespace: bench, cluster: north, node: node-1, serviceAccount: cli}
"#;
const EAST_CLIENT: &str = "tl-fobench-east-bench-cli";
const EAST_SERVER: &str = "tl-fobench-east-bench-hello-e";
const EAST_NODE_2: &str = "tl-fobench-east-node-2";
const NORTH_CLIENT: &str = "tl-fobench-north-bench-cli";
const NORTH_NODE: &str = "tl-fobench-north-node-1";
/// Everything of east that runs a Trellis process.
const EAST_PARTS: [&str; 4] = [
    "tl-fobench-east-gw",
    "tl-fobench-east-node-1",
    "tl-fobench-east-node-2",
    "tl-fobench-east-cp",
];
const ETCD: &str = "tl-fobench-etcd";

/// `hello`'s VIP in the cluster at 1-based position `c` (its first service).
fn hello_vip(c: u8) -> SocketAddr {
    SocketAddr::from(([10, 100 + c, 0, 10], 80))
}

/// The bench's lab, taken down when dropped (on success, error or panic).
struct BenchLab {
    bin: PathBuf,
    file: PathBuf,
    state_dir: PathBuf,
    log_level: String,
}

impl BenchLab {
    /// Takes down what a previous run left, then builds the lab.
    fn up(bin: &Path) -> anyhow::Result<BenchLab> {
        let work = std::env::temp_dir().join("trellis-bench-failover");
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let file = work.join("topology.yaml");
        std::fs::write(&file, TOPOLOGY).with_context(|| format!("writing {}", file.display()))?;
        let lab = BenchLab {
            bin: bin.to_path_buf(),
            file,
            state_dir: work.join("state"),
            log_level: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        };
        lab.down().context("removing the lab a previous run left")?;
        lab.lab_up()?;
        Ok(lab)
    }

    /// `trellis lab up`: builds the lab, or starts again what died in it.
    fn lab_up(&self) -> anyhow::Result<()> {
        let out = Command::new(self.bin.join("trellis"))
            .args(["lab", "up", "--name", LAB, "--file"])
            .arg(&self.file)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bin-dir")
            .arg(&self.bin)
            .env("RUST_LOG", &self.log_level)
            .stdin(Stdio::null())
            .output()
            .context("running trellis lab up")?;
        if !out.status.success() {
            bail!(
                "trellis lab up failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn down(&self) -> anyhow::Result<()> {
        let out = Command::new(self.bin.join("trellis"))
            .args(["lab", "down", "--name", LAB, "--state-dir"])
            .arg(&self.state_dir)
            .stdin(Stdio::null())
            .output()
            .context("running trellis lab down")?;
        if !out.status.success() {
            bail!(
                "trellis lab down --name {LAB} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `trellis traffic <args>` with the operator's etcd credentials, from etcd's namespace.
    fn traffic(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", ETCD])
            .arg(self.bin.join("trellis"))
            .arg("traffic")
            .args(args)
            .args(operator_etcd_flags(&self.state_dir))
            .stdin(Stdio::null())
            .output()
            .context("running trellis traffic")?;
        if !out.status.success() {
            bail!(
                "trellis traffic {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("failover: {e:#}");
        }
    }
}

/// Waits until 20 connections in a row from `netns` are served by `version`.
fn wait_served_by(netns: &str, to: SocketAddr, version: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = calls(netns, to, 20, 1);
        if last.iter().all(|o| o.version() == Some(version)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let seen: Vec<&Result<String, String>> = last.iter().map(|o| &o.result).collect();
            bail!("{netns} is not served by {version} after {timeout:?}: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills every process in the namespaces `netns` at once, and waits (10 s) until all are dead.
fn kill_all_at_once(netns: &[&str]) -> anyhow::Result<()> {
    let pids: Vec<u32> = netns.iter().flat_map(|ns| pids_in(ns)).collect();
    for &pid in &pids {
        let pid_t = libc::pid_t::try_from(pid).context("a pid out of range")?;
        // SAFETY: kill(2) takes no pointers; `pid` was just listed in one of the namespaces.
        unsafe {
            libc::kill(pid_t, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| is_running(p)) {
        if Instant::now() > deadline {
            bail!("processes of {netns:?} still run 10 s after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// One run: the connections, the fault's start and end, and what served before it.
struct Run {
    name: &'static str,
    preferred: &'static str,
    target: Duration,
    outcomes: Vec<Outcome>,
    fault: Instant,
    fault_end: Instant,
}

/// Opens connections from `client` for [`BEFORE`], causes `fault`, goes on for `after`, calling
/// `during` every 100 ms meanwhile (with the fault's instant).
fn measure(
    client: &str,
    to: SocketAddr,
    after: Duration,
    fault: impl FnOnce() -> anyhow::Result<()>,
    mut during: impl FnMut(Instant),
) -> anyhow::Result<(Vec<Outcome>, Instant, Instant)> {
    let load = Load::start(client, to, RATE);
    // The run's time line: load before the fault, then after it.
    std::thread::sleep(BEFORE);
    let at = Instant::now();
    fault()?;
    let end = Instant::now();
    while at.elapsed() < after {
        during(at);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((load.stop(), at, end))
}

/// What a run shows.
struct Figures {
    /// Connections that were not open during the fault, and those of them that failed.
    new: usize,
    failed: usize,
    /// Connections open while the fault happened, and those of them that failed.
    in_flight: usize,
    in_flight_failed: usize,
    /// Connections answered before the fault by another cluster than the preferred one.
    before_elsewhere: usize,
    /// From the fault to the first answer from another cluster.
    first: Option<Duration>,
    /// From the fault until every connection opened before that first answer has been
    /// answered, and the preferred cluster answers no more.
    all: Option<Duration>,
    /// The slowest connection opened after the fault, and how many waited for a timeout.
    slowest: Duration,
    slow: usize,
    /// The most a connection opened after it was due (the load's own lag).
    late: Duration,
}

fn figures(run: &Run) -> Figures {
    let (fault, fault_end) = (run.fault, run.fault_end);
    let in_flight: Vec<&Outcome> = run.outcomes.iter().filter(|o| o.overlaps(fault, fault_end)).collect();
    let new: Vec<&Outcome> = run.outcomes.iter().filter(|o| !o.overlaps(fault, fault_end)).collect();
    let after: Vec<&Outcome> = run.outcomes.iter().filter(|o| o.start >= fault).collect();
    let remote = |o: &Outcome| o.version().is_some_and(|v| v != run.preferred);
    let first_at = after.iter().filter(|o| remote(o)).map(|o| o.end).min();
    let all_at = first_at.map(|first| {
        let waited = after.iter().filter(|o| o.start < first).map(|o| o.end).max();
        let preferred = after
            .iter()
            .filter(|o| o.version() == Some(run.preferred))
            .map(|o| o.end)
            .max();
        [Some(first), waited, preferred]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(first)
    });
    Figures {
        new: new.len(),
        failed: new.iter().filter(|o| o.result.is_err()).count(),
        in_flight: in_flight.len(),
        in_flight_failed: in_flight.iter().filter(|o| o.result.is_err()).count(),
        before_elsewhere: run
            .outcomes
            .iter()
            .filter(|o| o.end < fault && o.version() != Some(run.preferred))
            .count(),
        first: first_at.map(|t| t.saturating_duration_since(fault)),
        all: all_at.map(|t| t.saturating_duration_since(fault)),
        slowest: after.iter().map(|o| o.took()).max().unwrap_or_default(),
        slow: after.iter().filter(|o| o.took() >= CONNECT_TIMEOUT / 2).count(),
        late: run
            .outcomes
            .iter()
            .map(|o| o.start.saturating_duration_since(o.due))
            .max()
            .unwrap_or_default(),
    }
}

fn passes(f: &Figures, target: Duration) -> bool {
    f.failed == 0 && f.first.is_some_and(|d| d <= target) && f.all.is_some_and(|d| d <= target)
}

fn show(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_string(), |d| format!("{:.0} ms", ms(d)))
}

/// The first fault errors of a run, for the reader to see why.
fn errors(run: &Run) -> Vec<String> {
    let mut seen: Vec<String> = run
        .outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err())
        .map(|e| e.trim().to_string())
        .collect();
    seen.dedup();
    seen.truncate(3);
    seen
}

fn main() -> anyhow::Result<()> {
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("the binary's directory")?
        .to_path_buf();
    eprintln!("failover: building the lab (three clusters, etcd, three gateways)...");
    let lab = BenchLab::up(&bin)?;
    let east_hello = hello_vip(1);
    let north_hello = hello_vip(3);
    let mut runs = Vec::new();

    // 1. Every local endpoint killed.
    wait_served_by(EAST_CLIENT, east_hello, "east", Duration::from_secs(30))?;
    eprintln!("failover: run 1, east's endpoints killed...");
    let (outcomes, fault, fault_end) = measure(
        EAST_CLIENT,
        east_hello,
        AFTER,
        || {
            kill_all_in(EAST_SERVER);
            Ok(())
        },
        |_| {},
    )?;
    runs.push(Run {
        name: "local endpoints killed",
        preferred: "east",
        target: Duration::from_secs(1),
        outcomes,
        fault,
        fault_end,
    });
    lab.lab_up().context("starting east's server again")?;
    wait_served_by(EAST_CLIENT, east_hello, "east", Duration::from_secs(60))
        .context("traffic returning to east after run 1")?;

    // 2. The local node that runs the endpoint blackholed.
    eprintln!("failover: run 2, east's node-2 blackholed...");
    let (outcomes, fault, fault_end) = measure(
        EAST_CLIENT,
        east_hello,
        AFTER,
        || blackhole(EAST_NODE_2).map_err(anyhow::Error::msg),
        |_| {},
    )?;
    runs.push(Run {
        name: "local node blackholed",
        preferred: "east",
        target: Duration::from_secs(1),
        outcomes,
        fault,
        fault_end,
    });
    lift_blackhole(EAST_NODE_2).map_err(anyhow::Error::msg)?;
    wait_served_by(EAST_CLIENT, east_hello, "east", Duration::from_secs(60))
        .context("traffic returning to east after run 2")?;

    // 3. The whole preferred cluster lost, seen from north, which weights make prefer east.
    lab.traffic(&["shift", "-n", "bench", "hello", "--cluster", "east=100,west=0"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let weights = config_dump(NORTH_NODE).map(|d| service_weights(&d, "bench", "hello"));
        if weights.as_ref().is_ok_and(|w| w.get("east") == Some(&100)) {
            break;
        }
        if Instant::now() > deadline {
            bail!("north's node did not apply the weights east=100,west=0 within 30 s: {weights:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_served_by(NORTH_CLIENT, north_hello, "east", Duration::from_secs(30))?;
    eprintln!("failover: run 3, east lost (trellisd, ztunnels, gateway)...");
    let mut dropped: Option<Duration> = None;
    let (outcomes, fault, fault_end) = measure(
        NORTH_CLIENT,
        north_hello,
        LEASE_TTL + Duration::from_secs(4),
        || kill_all_at_once(&EAST_PARTS),
        |at| {
            if dropped.is_none() {
                let has_east = config_dump(NORTH_NODE)
                    .map(|d| endpoint_clusters(&d, "bench", "hello").iter().any(|c| c == "east"))
                    .unwrap_or(true);
                if !has_east {
                    dropped = Some(at.elapsed());
                }
            }
        },
    )?;
    runs.push(Run {
        name: "local cluster lost",
        preferred: "east",
        target: LEASE_TTL + Duration::from_secs(1),
        outcomes,
        fault,
        fault_end,
    });

    println!(
        "failover: {RATE} new connections a second (each a TCP connect, a GET and its answer) to the global service hello;"
    );
    println!(
        "connect timeout {} ms per attempt, lease TTL {} s",
        CONNECT_TIMEOUT.as_millis(),
        LEASE_TTL.as_secs()
    );
    println!("  run 1: east's client; east's every hello endpoint killed (west serves next)");
    println!("  run 2: east's client; east's node-2, which runs hello, blackholed (packets dropped, no reset)");
    println!("  run 3: north's client, weights east=100,west=0; east lost (its trellisd, ztunnels and gateway killed)");
    println!();
    println!(
        "{:<24} {:>13} {:>11} {:>12} {:>18} {:>9} {:>12} {:>8} {:>9}",
        "run",
        "first remote",
        "all remote",
        "failed/new",
        "in flight (failed)",
        "slowest",
        "slow (>=250)",
        "target",
        "verdict"
    );
    let mut all_pass = true;
    for run in &runs {
        let f = figures(run);
        let pass = passes(&f, run.target);
        all_pass &= pass;
        println!(
            "{:<24} {:>13} {:>11} {:>12} {:>18} {:>6.0} ms {:>12} {:>5} ms {:>9}",
            run.name,
            show(f.first),
            show(f.all),
            format!("{}/{}", f.failed, f.new),
            format!("{} ({})", f.in_flight, f.in_flight_failed),
            ms(f.slowest),
            f.slow,
            run.target.as_millis(),
            if pass { "PASS" } else { "FAIL" }
        );
        if f.before_elsewhere > 0 {
            println!(
                "  note: before the fault {} connections were not served by {} (the run's premise)",
                f.before_elsewhere, run.preferred
            );
        }
        if f.late > Duration::from_millis(100) {
            println!(
                "  note: the load opened a connection up to {:.0} ms late (the machine was saturated)",
                ms(f.late)
            );
        }
        let seen = errors(run);
        if !seen.is_empty() {
            println!("  errors: {}", seen.join("; "));
        }
    }
    match dropped {
        Some(d) => println!(
            "east dropped from north's node {:.1} s after it was lost (lease TTL {} s)",
            d.as_secs_f64(),
            LEASE_TTL.as_secs()
        ),
        None => println!(
            "east was NOT dropped from north's node within {} s of being lost",
            (LEASE_TTL + Duration::from_secs(4)).as_secs()
        ),
    }
    println!();
    println!(
        "targets: no failed connection in any run; served remotely within 1 s of the fault (runs 1 and 2) and within the lease TTL + 1 s (run 3): {}",
        if all_pass { "PASS" } else { "FAIL" }
    );
    println!(
        "for comparison: Envoy's default outlier detection needs 5 consecutive errors in a 10 s interval, Linkerd's gateway probe runs every 3 s, and Istio's ztunnel does not retry another endpoint at all"
    );
    println!(
        "  (at {RATE} connections/s: at least 5 failed connections per dead endpoint with Envoy, up to 3 s of them ({}) to a dead gateway with Linkerd, every one sent to a dead endpoint with Istio's ztunnel)",
        RATE * 3
    );
    Ok(())
}
