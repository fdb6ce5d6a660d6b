//! What `netbench`'s clients print (one JSON object each), as the benchmarks read it back.

use serde::Deserialize;

/// `netbench throughput`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Throughput {
    pub gbps: f64,
    /// Counted by the server.
    pub bytes: u64,
}

/// `netbench latency`: one connection, rounds one after another.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `netbench pingpong`: many connections at once; `fewest` and `most` are one connection's
/// rounds, to tell a starved connection.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Pingpong {
    pub round_trips: u64,
    pub per_second: f64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub fewest: u64,
    pub most: u64,
}

/// `netbench connrate`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Connrate {
    pub per_second: f64,
    pub errors: u64,
}

/// Runs one `netbench` client (`bin/netbench args...`) in network namespace `netns` and parses
/// the JSON it prints; also returns what it wrote on stderr (its notes on errors).
pub fn netbench<T: serde::de::DeserializeOwned>(
    bin: &std::path::Path,
    netns: &str,
    args: &[&str],
) -> anyhow::Result<(T, String)> {
    use anyhow::Context;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(bin.join("netbench"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running netbench {} in {netns}", args.join(" ")))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        anyhow::bail!(
            "netbench {} in {netns} failed ({}): {}",
            args.join(" "),
            out.status,
            stderr.trim()
        );
    }
    let parsed = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "netbench {} printed {:?}, not the expected JSON",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    Ok((parsed, stderr))
}
