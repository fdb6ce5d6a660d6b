//! `waypoint`: the optional per-namespace L7 proxy (HTTP/1.1, HTTP/2 and gRPC routing, policy,
//! resilience). Not built yet: it follows the ztunnel (see ARCHITECTURE.md).

use std::process::ExitCode;

use clap::Parser;

/// The per-namespace L7 proxy.
#[derive(Debug, Parser)]
#[command(name = "waypoint", version)]
struct Config {
    /// Namespace this waypoint serves.
    #[arg(long, env = "TRELLIS_NAMESPACE")]
    namespace: String,
}

fn main() -> ExitCode {
    let config = Config::parse();
    eprintln!(
        "waypoint for namespace {}: not available yet; L7 routing and policy arrive after the ztunnel",
        config.namespace
    );
    ExitCode::from(2)
}
