//! The table and the PASS/MISS lines.

use std::fmt::Write as _;

use super::*;

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) fn ratio(mesh: f64, direct: f64) -> f64 {
    if direct > 0.0 {
        mesh / direct
    } else {
        0.0
    }
}

/// CPU-seconds per GB (10^9 bytes) moved; 0 when nothing moved.
pub(crate) fn cpu_s_per_gb(cpu_s: f64, bytes: u64) -> f64 {
    if bytes > 0 {
        cpu_s / (bytes as f64 / 1e9)
    } else {
        0.0
    }
}

/// CPU-microseconds per round trip; 0 when none completed.
pub(crate) fn cpu_us_per_round_trip(cpu_s: f64, round_trips: u64) -> f64 {
    if round_trips > 0 {
        cpu_s * 1e6 / round_trips as f64
    } else {
        0.0
    }
}

/// The figures as a table: direct, mesh, mesh/direct, target.
pub(crate) fn table(f: &Figures) -> String {
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
    // The CPU busy during the runs of the row above, in %.
    let busy = |direct: f64, mesh: f64| {
        let percent = |busy: f64| format!("{:.0}", busy * 100.0);
        (
            "  CPU busy, all CPUs (%)",
            percent(direct),
            percent(mesh),
            none(),
            none(),
        )
    };
    let (name, d, m, r, t) = busy(f.throughput_busy[0], f.throughput_busy[1]);
    row(name, d, m, r, t);
    // Only the mesh path goes through the ztunnels.
    row(
        "  ztunnel pair CPU (CPU-s/GB)",
        "-".into(),
        format!("{:.2}", cpu_s_per_gb(f.throughput_ztunnel_cpu_s, f.throughput[1].bytes)),
        "-".into(),
        none(),
    );
    row(
        "  two plain relays instead (Gbit/s)",
        format!("{:.2}", f.throughput[0].gbps),
        format!("{:.2}", f.relayed.gbps),
        format!("{:.2}", ratio(f.relayed.gbps, f.throughput[0].gbps)),
        "ceiling".into(),
    );
    let (name, d, m, r, t) = busy(f.throughput_busy[0], f.relayed_busy);
    row(name, d, m, r, t);
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
    let (d, m, r) = both(f.pingpong[0].per_second, f.pingpong[1].per_second, 0);
    let name = format!("1 KiB ping-pong, {PINGPONG_CONNECTIONS} connections (/s)");
    row(&name, d, m, r, none());
    let (name, d, m, r, t) = busy(f.pingpong_busy[0], f.pingpong_busy[1]);
    row(name, d, m, r, t);
    row(
        "  ztunnel pair CPU (CPU-us/round trip)",
        "-".into(),
        format!(
            "{:.1}",
            cpu_us_per_round_trip(f.pingpong_ztunnel_cpu_s, f.pingpong[1].round_trips)
        ),
        "-".into(),
        none(),
    );
    row(
        "  connections that failed",
        f.pingpong[0].errors.to_string(),
        f.pingpong[1].errors.to_string(),
        none(),
        none(),
    );
    let (d, m, r) = both(f.connrate[0].per_second, f.connrate[1].per_second, 0);
    let name = format!("new connections, {CONN_WORKERS} workers (/s)");
    row(&name, d, m, r, format!(">= {TARGET_CONNRATE}x"));
    let (name, d, m, r, t) = busy(f.connrate_busy[0], f.connrate_busy[1]);
    row(name, d, m, r, t);
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
pub(crate) fn verdicts(f: &Figures) -> Vec<String> {
    let line = |pass: bool, text: String| format!("{} {text}", if pass { "PASS" } else { "MISS" });
    let throughput = ratio(f.throughput[1].gbps, f.throughput[0].gbps);
    let latency = ratio(f.latency[1].p50_us, f.latency[0].p50_us);
    let connrate = ratio(f.connrate[1].per_second, f.connrate[0].per_second);
    let idle = mib(f.idle_kib[0].max(f.idle_kib[1]));
    let ceiling = ratio(f.relayed.gbps, f.throughput[0].gbps);
    vec![
        line(
            throughput >= TARGET_THROUGHPUT,
            format!("throughput mesh/direct {throughput:.2} (target >= {TARGET_THROUGHPUT}; Istio's ztunnel {ISTIO_THROUGHPUT}; two zero-copy relays without TLS {ceiling:.2})"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A 10 s throughput run at `gbps`.
    fn throughput(gbps: f64) -> Throughput {
        Throughput {
            gbps,
            bytes: (gbps * 1.25e9) as u64,
        }
    }

    fn pingpong(per_second: f64) -> Pingpong {
        Pingpong {
            round_trips: (per_second * 10.0) as u64,
            per_second,
            errors: 0,
            p50_us: 0.0,
            p99_us: 0.0,
            fewest: 0,
            most: 0,
        }
    }

    fn figures(mesh_gbps: f64, mesh_p50: f64, mesh_cps: f64, idle_mib: u64) -> Figures {
        Figures {
            throughput: [throughput(10.0), throughput(mesh_gbps)],
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
            pingpong: [pingpong(40_000.0), pingpong(20_000.0)],
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
            throughput_busy: [0.8, 0.9],
            pingpong_busy: [0.7, 0.75],
            connrate_busy: [1.0, 0.85],
            throughput_ztunnel_cpu_s: 9.0,
            pingpong_ztunnel_cpu_s: 6.0,
            relayed: throughput(4.0),
            relayed_busy: 0.95,
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

    #[test]
    fn the_relay_ceiling_and_cpu_are_reported_against_direct() {
        let f = figures(4.5, 100.0, 3_500.0, 8);
        let t = table(&f);
        let relays = t.lines().find(|l| l.contains("two plain relays")).unwrap();
        assert!(
            relays.contains("4.00") && relays.contains("0.40") && relays.contains("ceiling"),
            "{relays}"
        );
        assert!(
            t.lines()
                .any(|l| l.contains("CPU busy") && l.contains("80") && l.contains("90")),
            "{t}"
        );
        assert!(verdicts(&f)[0].contains("without TLS 0.40"), "{:?}", verdicts(&f));
    }

    #[test]
    fn the_ztunnels_cpu_is_reported_per_gb_and_per_round_trip_for_the_mesh_only() {
        let t = table(&figures(4.5, 100.0, 3_500.0, 8));
        let line = |name: &str| t.lines().find(|l| l.contains(name)).unwrap().to_string();
        // 9 CPU-s for 5.625 GB; 6 CPU-s for 200,000 round trips.
        let per_gb = line("CPU-s/GB");
        assert!(per_gb.contains("1.60") && per_gb.contains(" - "), "{per_gb}");
        let per_round_trip = line("CPU-us/round trip");
        assert!(
            per_round_trip.contains("30.0") && per_round_trip.contains(" - "),
            "{per_round_trip}"
        );
        let rate = line("ping-pong, 16 connections");
        assert!(
            rate.contains("40000") && rate.contains("20000") && rate.contains("0.50"),
            "{rate}"
        );
    }

    #[test]
    fn cpu_per_unit_is_zero_when_nothing_was_moved() {
        assert_eq!(cpu_s_per_gb(1.0, 0), 0.0);
        assert_eq!(cpu_us_per_round_trip(1.0, 0), 0.0);
        assert_eq!(cpu_s_per_gb(3.0, 2_000_000_000), 1.5);
        assert_eq!(cpu_us_per_round_trip(0.5, 1_000), 500.0);
    }
}
