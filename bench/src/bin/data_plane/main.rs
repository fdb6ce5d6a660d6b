//! Data-plane benchmark: a client pod on node-1 and a server pod on node-2 of a network-namespace
//! lab (`trellis lab up`), measured in the same run DIRECT (a namespace that is not enrolled:
//! plain routing through the node namespaces) and THROUGH TWO ZTUNNELS (an enrolled namespace:
//! captured by node-1's ztunnel, tunnelled as HTTP/2 CONNECT in mTLS to node-2's ztunnel).
//!
//! Measures single-stream throughput, 1 KiB request/response latency, 1 KiB round trips per
//! second over 16 connections at once, new connections per second, both ztunnels' resident
//! memory, idle and at peak under the mesh runs, and the CPU time both ztunnels spend per GB of
//! the mesh throughput run and per round trip of the mesh ping-pong run; prints each mesh figure
//! against the direct one and a PASS/MISS line per target. The load comes from `netbench`
//! (bench/src/bin/netbench.rs), run inside the pods' namespaces.
//!
//! Run as root: `bash bench/run.sh data-plane` (builds everything with the bench profile first).

mod baseline;
mod lab;
mod memory;
mod report;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use lab::*;
use memory::{pss_kib, rss_kib, sampled};
use report::{cpu_s_per_gb, cpu_us_per_round_trip, mib, table, verdicts};
use trellis_bench::procs::{cpu_while, ztunnel_pid};
use trellis_bench::results::{Connrate, Latency, Pingpong, Throughput};

const SECONDS: u64 = 10;
const LATENCY_ROUNDS: usize = 20_000;
const LATENCY_WARMUP: usize = 1_000;
const CONN_WORKERS: usize = 4;
const PINGPONG_CONNECTIONS: usize = 16;
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

/// Everything one run measured: pairs are [direct, mesh].
#[derive(Debug, Clone, Copy)]
struct Figures {
    throughput: [Throughput; 2],
    latency: [Latency; 2],
    pingpong: [Pingpong; 2],
    connrate: [Connrate; 2],
    /// Share of all CPUs busy (0..=1) during the throughput, ping-pong and connection runs:
    /// [direct, mesh].
    throughput_busy: [f64; 2],
    /// The same, during the run through the relays.
    relayed_busy: f64,
    pingpong_busy: [f64; 2],
    connrate_busy: [f64; 2],
    /// CPU time of the two ztunnels together (user and system, every thread) during the mesh
    /// throughput and ping-pong runs, in seconds.
    throughput_ztunnel_cpu_s: f64,
    pingpong_ztunnel_cpu_s: f64,
    /// Single-stream throughput from the direct client through two plain relays (see
    /// [`lab::start_relays`]): the most any two-hop proxy can reach on this machine.
    relayed: Throughput,
    /// Per ztunnel (node-1, node-2), in KiB.
    idle_kib: [u64; 2],
    peak_kib: [u64; 2],
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

    let throughput = on_both_paths(pids, &mut peak_kib, |path| {
        let (t, busy) = busy_while(|| netbench::<Throughput>(bin, path, &["throughput", "--seconds", &secs]))?;
        print_throughput(path, t, busy);
        Ok((t, busy))
    })?;
    println!(
        "  ztunnel CPU per GB (pair): {:.2} CPU-s/GB",
        cpu_s_per_gb(throughput.ztunnel_cpu_s, throughput.runs[1].0.bytes)
    );
    let relays = start_relays(bin)?;
    let (relayed, relayed_busy) =
        busy_while(|| netbench::<Throughput>(bin, &RELAYED, &["throughput", "--seconds", &secs]))?;
    drop(relays);
    print_throughput(&RELAYED, relayed, relayed_busy);
    let (rounds, warmup) = (LATENCY_ROUNDS.to_string(), LATENCY_WARMUP.to_string());
    let latency = on_both_paths(pids, &mut peak_kib, |path| {
        let l = netbench::<Latency>(bin, path, &["latency", "--count", &rounds, "--warmup", &warmup])?;
        println!(
            "  latency    {:<6} p50 {:>7.1} us  p99 {:>7.1} us",
            path.name, l.p50_us, l.p99_us
        );
        Ok(l)
    })?
    .runs;
    let connections = PINGPONG_CONNECTIONS.to_string();
    let pingpong = on_both_paths(pids, &mut peak_kib, |path| {
        let (p, busy) = busy_while(|| {
            netbench::<Pingpong>(
                bin,
                path,
                &["pingpong", "--seconds", &secs, "--connections", &connections],
            )
        })?;
        println!(
            "  pingpong{PINGPONG_CONNECTIONS} {:<6} {:>8.0} /s ({} errors, CPU {:.0}% busy)",
            path.name,
            p.per_second,
            p.errors,
            busy * 100.0
        );
        Ok((p, busy))
    })?;
    println!(
        "  ztunnel CPU per round trip (pair): {:.1} CPU-us",
        cpu_us_per_round_trip(pingpong.ztunnel_cpu_s, pingpong.runs[1].0.round_trips)
    );
    let workers = CONN_WORKERS.to_string();
    let connrate = on_both_paths(pids, &mut peak_kib, |path| {
        let (c, busy) =
            busy_while(|| netbench::<Connrate>(bin, path, &["connrate", "--seconds", &secs, "--workers", &workers]))?;
        println!(
            "  connrate   {:<6} {:>8.0} /s ({} errors, CPU {:.0}% busy)",
            path.name,
            c.per_second,
            c.errors,
            busy * 100.0
        );
        Ok((c, busy))
    })?
    .runs;
    Ok(Figures {
        throughput: throughput.runs.map(|(t, _)| t),
        throughput_busy: throughput.runs.map(|(_, busy)| busy),
        throughput_ztunnel_cpu_s: throughput.ztunnel_cpu_s,
        latency,
        pingpong: pingpong.runs.map(|(p, _)| p),
        pingpong_busy: pingpong.runs.map(|(_, busy)| busy),
        pingpong_ztunnel_cpu_s: pingpong.ztunnel_cpu_s,
        connrate: connrate.map(|(c, _)| c),
        connrate_busy: connrate.map(|(_, busy)| busy),
        relayed,
        relayed_busy,
        idle_kib,
        peak_kib,
    })
}

/// What a run on both paths measured.
struct BothPaths<T> {
    /// [direct, mesh].
    runs: [T; 2],
    /// CPU time of the two ztunnels together during the mesh run, in seconds. The direct run has
    /// none: it does not go through them.
    ztunnel_cpu_s: f64,
}

/// Runs `run` on the direct path, then on the mesh path while sampling both ztunnels' RSS into
/// `peak_kib` and counting the CPU time they use.
fn on_both_paths<T>(
    pids: [u32; 2],
    peak_kib: &mut [u64; 2],
    mut run: impl FnMut(&Route) -> anyhow::Result<T>,
) -> anyhow::Result<BothPaths<T>> {
    let direct = run(&DIRECT)?;
    let (mesh, ztunnel_cpu_s) = cpu_while(&pids, || sampled(pids, peak_kib, || run(&MESH)))?;
    Ok(BothPaths {
        runs: [direct, mesh],
        ztunnel_cpu_s,
    })
}

fn print_throughput(path: &Route, t: Throughput, busy: f64) {
    println!(
        "  throughput {:<6} {:>8.2} Gbit/s (CPU {:.0}% busy)",
        path.name,
        t.gbps,
        busy * 100.0
    );
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

fn cpu_sample() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    cpu_jiffies(&stat).context("/proc/stat has no cpu line")
}

/// Runs `f`, and tells how busy the whole machine was meanwhile (0..=1, over every CPU).
fn busy_while<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let (b0, t0) = cpu_sample()?;
    let result = f()?;
    let (b1, t1) = cpu_sample()?;
    Ok((
        result,
        b1.saturating_sub(b0) as f64 / t1.saturating_sub(t0).max(1) as f64,
    ))
}

/// How busy the machine is before the run, sampled for a second.
fn busy_before() -> anyhow::Result<f64> {
    busy_while(|| {
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    })
    .map(|((), busy)| busy)
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
        "ztunnel data-plane benchmark: {cpus} CPUs, ztunnel RUST_LOG={log_level}, {SECONDS} s runs, {LATENCY_ROUNDS} latency rounds, {PINGPONG_CONNECTIONS} ping-pong connections, {CONN_WORKERS} connection workers"
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
    let baseline = std::env::var_os("TRELLIS_BENCH_BASELINE_ZTUNNEL").map(PathBuf::from);
    if let Some(b) = &baseline {
        anyhow::ensure!(b.is_file(), "TRELLIS_BENCH_BASELINE_ZTUNNEL={} is no file", b.display());
        println!("baseline ztunnel: {}", b.display());
    }
    let bins = baseline::BinDir::new(&work, &bin)?;
    let lab = Lab::up(&bins.dir, &work, &log_level)?;
    println!("lab up in {:.1} s", started.elapsed().as_secs_f64());
    let servers = start_servers(&bin)?;
    let figures = measure(&bin)?;
    let compared = match &baseline {
        Some(b) => Some(baseline::compare(&lab, &bins, b)?),
        None => None,
    };
    drop(servers);
    drop(lab);

    println!();
    print!("{}", table(&figures));
    println!();
    for v in verdicts(&figures) {
        println!("{v}");
    }
    if let (Some(b), Some(totals)) = (&baseline, compared) {
        println!();
        print!("{}", baseline::report(b, totals));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_jiffies_counts_iowait_as_idle() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(cpu_jiffies(stat), Some((150, 1000)));
        assert_eq!(cpu_jiffies("intr 1 2\n"), None);
    }
}
