//! The ztunnels' memory: RSS, PSS, and the peak while a run goes on.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

use super::RSS_EVERY;

/// VmRSS of `pid`, in KiB.
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    kib_field(pid, "status", "VmRSS:")
}

/// Proportional set size of `pid` in KiB: shared pages (the binary's code, libc) divided among
/// the processes that map them; what the process costs the machine, next to VmRSS.
pub(crate) fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    kib_field(pid, "smaps_rollup", "Pss:")
}

/// The `field` line ("Name:  123 kB") of /proc/`pid`/`file`, in KiB.
fn kib_field(pid: u32, file: &str, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/{file}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path} (did the ztunnel exit?)"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .with_context(|| format!("{path} has no {field}"))
}

/// Runs `f` while sampling the ztunnels' RSS every [`RSS_EVERY`], raising `peak` to what it saw.
pub(crate) fn sampled<T>(
    pids: [u32; 2],
    peak: &mut [u64; 2],
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_and_a_proportional_size() {
        let me = std::process::id();
        let (rss, pss) = (rss_kib(me).unwrap(), pss_kib(me).unwrap());
        assert!(rss > 0 && pss > 0 && pss <= rss, "rss {rss} KiB, pss {pss} KiB");
        let gone = kib_field(me, "status", "NoSuchField:").unwrap_err();
        assert!(gone.to_string().contains("has no NoSuchField:"), "{gone}");
    }
}
