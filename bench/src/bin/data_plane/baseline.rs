//! The HTTP/2 byte path against a baseline ztunnel, in the same run and the same lab: with
//! `TRELLIS_BENCH_BASELINE_ZTUNNEL` set (`bash bench/run.sh data-plane --baseline <rev>` builds
//! that revision's ztunnel and sets it), both ztunnels are restarted from the baseline binary
//! and from this one in turn, [`ROUNDS`] times each, and each time carry the mesh throughput
//! run and the 16-connection ping-pong run. Alternating spreads the machine's drift over both.
//! The figures are totals over the rounds (CPU time over bytes, round trips over seconds).

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::lab::{netbench, Lab, MESH, NODE_1, NODE_2};
use super::report::{cpu_s_per_gb, cpu_us_per_round_trip};
use super::{check_interrupted, PINGPONG_CONNECTIONS, SECONDS};
use trellis_bench::procs::{cpu_while, ztunnel_pid};
use trellis_bench::results::{Pingpong, Throughput};

/// Runs of each binary.
pub(crate) const ROUNDS: usize = 2;
/// The targets: CPU per GB down by 15%, 16-connection round trips up by 10%.
const TARGET_CPU_PER_GB: f64 = 0.85;
const TARGET_PINGPONG: f64 = 1.10;

/// The lab's binary directory: links to the built binaries, with `ztunnel` re-pointed between
/// the baseline and this build.
pub(crate) struct BinDir {
    pub(crate) dir: PathBuf,
    built: PathBuf,
}

impl BinDir {
    pub(crate) fn new(work: &Path, built: &Path) -> anyhow::Result<Self> {
        let dir = work.join("bin");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for name in ["trellis", "trellisd", "ztunnel", "netbench"] {
            symlink(built.join(name), dir.join(name))
                .with_context(|| format!("linking {name} into {}", dir.display()))?;
        }
        Ok(Self {
            dir,
            built: built.to_path_buf(),
        })
    }

    /// Points the lab's `ztunnel` at `binary`.
    fn use_ztunnel(&self, binary: &Path) -> anyhow::Result<()> {
        let link = self.dir.join("ztunnel");
        std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        symlink(binary, &link).with_context(|| format!("linking {} to {}", link.display(), binary.display()))
    }
}

/// Totals of one binary's rounds.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    bytes: u64,
    throughput_seconds: f64,
    throughput_cpu_s: f64,
    round_trips: u64,
    pingpong_seconds: f64,
    pingpong_cpu_s: f64,
}

impl Totals {
    fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1e9 / self.throughput_seconds.max(1e-9)
    }
    fn cpu_per_gb(&self) -> f64 {
        cpu_s_per_gb(self.throughput_cpu_s, self.bytes)
    }
    fn per_second(&self) -> f64 {
        self.round_trips as f64 / self.pingpong_seconds.max(1e-9)
    }
    fn cpu_per_round_trip(&self) -> f64 {
        cpu_us_per_round_trip(self.pingpong_cpu_s, self.round_trips)
    }
}

/// Measures [`ROUNDS`] rounds of (baseline, this build) and returns their totals, leaving the
/// lab on this build.
pub(crate) fn compare(lab: &Lab, bins: &BinDir, baseline: &Path) -> anyhow::Result<[Totals; 2]> {
    let mut totals = [Totals::default(); 2];
    let binaries = [baseline.to_path_buf(), bins.built.join("ztunnel")];
    let secs = SECONDS.to_string();
    let connections = PINGPONG_CONNECTIONS.to_string();
    for round in 1..=ROUNDS {
        for (which, binary) in binaries.iter().enumerate() {
            check_interrupted()?;
            bins.use_ztunnel(binary)?;
            lab.restart_ztunnels()?;
            let pids = [ztunnel_pid(NODE_1)?, ztunnel_pid(NODE_2)?];
            let (t, t_cpu) = cpu_while(&pids, || {
                netbench::<Throughput>(&bins.dir, &MESH, &["throughput", "--seconds", &secs])
            })?;
            let (p, p_cpu) = cpu_while(&pids, || {
                netbench::<Pingpong>(
                    &bins.dir,
                    &MESH,
                    &["pingpong", "--seconds", &secs, "--connections", &connections],
                )
            })?;
            let name = ["baseline", "this build"][which];
            println!(
                "  round {round} {name:<10} throughput {:.2} Gbit/s, {:.2} CPU-s/GB; pingpong{PINGPONG_CONNECTIONS} {:.0} /s, {:.1} CPU-us per round trip",
                t.gbps,
                cpu_s_per_gb(t_cpu, t.bytes),
                p.per_second,
                cpu_us_per_round_trip(p_cpu, p.round_trips)
            );
            let total = &mut totals[which];
            total.bytes += t.bytes;
            // netbench reports rates over its own clock: its durations follow from them.
            total.throughput_seconds += t.bytes as f64 * 8.0 / 1e9 / t.gbps.max(1e-9);
            total.throughput_cpu_s += t_cpu;
            total.round_trips += p.round_trips;
            total.pingpong_seconds += p.round_trips as f64 / p.per_second.max(1e-9);
            total.pingpong_cpu_s += p_cpu;
        }
    }
    Ok(totals)
}

/// The comparison's table and its two verdicts.
pub(crate) fn report(baseline: &Path, [base, this]: [Totals; 2]) -> String {
    let rows = [
        ("mesh throughput (Gbit/s)", base.gbps(), this.gbps(), None),
        (
            "ztunnel pair CPU per GB (CPU-s/GB)",
            base.cpu_per_gb(),
            this.cpu_per_gb(),
            Some(format!("<= {TARGET_CPU_PER_GB:.2}x")),
        ),
        (
            "1 KiB ping-pong, 16 connections (/s)",
            base.per_second(),
            this.per_second(),
            Some(format!(">= {TARGET_PINGPONG:.2}x")),
        ),
        (
            "ztunnel pair CPU per round trip (CPU-us)",
            base.cpu_per_round_trip(),
            this.cpu_per_round_trip(),
            None,
        ),
    ];
    let mut out = format!(
        "HTTP/2 path against the baseline ztunnel {} ({ROUNDS} rounds each, alternating):\n{:<42} {:>10} {:>10} {:>10} {:>9}\n",
        baseline.display(),
        "",
        "baseline",
        "this",
        "ratio",
        "target"
    );
    for (name, b, t, target) in rows {
        out += &format!(
            "{name:<42} {b:>10.2} {t:>10.2} {:>10.2} {:>9}\n",
            t / b.max(1e-9),
            target.unwrap_or_default()
        );
    }
    let cpu = this.cpu_per_gb() / base.cpu_per_gb().max(1e-9);
    let pingpong = this.per_second() / base.per_second().max(1e-9);
    let verdict = |pass: bool| if pass { "PASS" } else { "MISS" };
    out += &format!(
        "{} HTTP/2 CPU per GB {cpu:.2}x the baseline's (target <= {TARGET_CPU_PER_GB})\n",
        verdict(cpu <= TARGET_CPU_PER_GB)
    );
    out += &format!(
        "{} 16-connection ping-pong {pingpong:.2}x the baseline's (target >= {TARGET_PINGPONG})\n",
        verdict(pingpong >= TARGET_PINGPONG)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_takes_totals_over_rounds_and_judges_both_targets() {
        let base = Totals {
            bytes: 10_000_000_000,
            throughput_seconds: 20.0,
            throughput_cpu_s: 14.0,
            round_trips: 600_000,
            pingpong_seconds: 20.0,
            pingpong_cpu_s: 24.0,
        };
        let this = Totals {
            throughput_cpu_s: 12.6,
            round_trips: 690_000,
            ..base
        };
        let text = report(Path::new("/b/ztunnel"), [base, this]);
        assert!(text.contains("MISS HTTP/2 CPU per GB 0.90x"), "{text}");
        assert!(text.contains("PASS 16-connection ping-pong 1.15x"), "{text}");
        assert!((base.cpu_per_gb() - 1.4).abs() < 1e-9);
        assert!((base.per_second() - 30_000.0).abs() < 1e-9);
    }
}
