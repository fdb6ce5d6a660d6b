//! Measuring lab processes: the CPU time they use, the network namespace they run in, and the
//! metrics they export.

use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{bail, Context};

/// utime + stime of a /proc/<pid>/stat line (its fields 14 and 15): the clock ticks the process
/// has run, in user space and in the kernel, over all its threads.
pub fn process_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces and parentheses itself:
    // count from the last ')', after which field 3 comes.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The clock ticks of `pids` together, since each started.
fn ticks_of(pids: &[u32]) -> anyhow::Result<u64> {
    let mut ticks = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path} (did the ztunnel exit?)"))?;
        ticks += process_ticks(&stat).with_context(|| format!("{path} has no utime and stime"))?;
    }
    Ok(ticks)
}

/// Clock ticks per second, the unit of /proc/<pid>/stat's times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // It cannot fail for this name on Linux; 100 is USER_HZ on x86 and arm.
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Runs `f`, and tells how much CPU time the processes `pids` used meanwhile, together, in
/// seconds.
pub fn cpu_while<T>(pids: &[u32], f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let before = ticks_of(pids)?;
    let result = f()?;
    let after = ticks_of(pids)?;
    Ok((result, after.saturating_sub(before) as f64 / ticks_per_second()))
}

/// Runs `f` on a thread inside network namespace `ns`: the sockets it opens live there.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
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

/// Sums the samples of `name` whose labels include `label="value"` (every sample when `None`).
pub fn metric_sum(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
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

/// The pid of the ztunnel running in node namespace `node`.
pub fn ztunnel_pid(node: &str) -> anyhow::Result<u32> {
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

/// Runs `trellis lab up --name name --bin-dir bin --file file` (`trellis` is `bin/trellis`),
/// the lab's processes logging at warn; fails with what it printed.
pub fn lab_up(bin: &std::path::Path, name: &str, file: &std::path::Path) -> anyhow::Result<()> {
    let out = Command::new(bin.join("trellis"))
        .args(["lab", "up", "--name", name, "--bin-dir"])
        .arg(bin)
        .arg("--file")
        .arg(file)
        .env("RUST_LOG", "warn")
        .output()
        .context("trellis lab up")?;
    if !out.status.success() {
        bail!(
            "trellis lab up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A `netbench server` on 0.0.0.0:9000 in each of `namespaces`, pushed onto `into` as it starts
/// (so that the caller's clean-up kills those started before a failure).
pub fn netbench_servers(
    bin: &std::path::Path,
    namespaces: &[&str],
    into: &mut Vec<std::process::Child>,
) -> anyhow::Result<()> {
    for ns in namespaces {
        into.push(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(bin.join("netbench"))
                .args(["server", "--listen", "0.0.0.0:9000"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("a netbench server")?,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENED: &str = "trellis_tcp_connections_opened_total";
    const PAGE: &str = "\
# HELP trellis_tcp_connections_opened TCP connections opened
# TYPE trellis_tcp_connections_opened counter
trellis_tcp_connections_opened_total{reporter=\"source\",connection_security_policy=\"mutual_tls\"} 3
trellis_tcp_connections_opened_total{reporter=\"source\",connection_security_policy=\"none\"} 2
trellis_tcp_connections_opened_totalx 100
trellis_tcp_sent_bytes_total{reporter=\"source\"} 7
";

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

    #[test]
    fn process_ticks_adds_utime_and_stime_even_when_the_name_holds_spaces_and_parentheses() {
        let stat = "4242 (zt (w) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 1500 250 7 9 20 0 3 0 12345 0 0\n";
        assert_eq!(process_ticks(stat), Some(1750));
        assert_eq!(process_ticks("4242 (ztunnel) S 1 4242 4242 0 -1 4194560 900 0\n"), None);
        assert_eq!(process_ticks("no process here"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu_time() {
        let me = std::process::id();
        let ((), cpu_s) = cpu_while(&[me, me], || {
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_millis(100) {
                std::hint::spin_loop();
            }
            Ok(())
        })
        .unwrap();
        assert!(cpu_s > 0.0 && cpu_s < 10.0, "{cpu_s} CPU-s for 2 x 100 ms of spinning");
    }
}
