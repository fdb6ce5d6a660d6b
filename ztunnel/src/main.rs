//! `ztunnel`: the per-node zero-trust tunnel proxy.
//!
//! Today it bootstraps the node's identity: it redeems a one-time join token at the cluster CA
//! for its node SVID (`spiffe://<td>/trellis/node/<node>`) and keeps it renewed. Capture, HBONE,
//! L4 policy, metrics and the Workload API socket land here next (see ARCHITECTURE.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use trellis_identity::{BundleSet, ManagerConfig, SpiffeId, TrustBundle, TrustDomain};

/// Everything ztunnel is configured with (flags or `TRELLIS_*` environment variables).
#[derive(Debug, Clone, Parser)]
#[command(name = "ztunnel", version)]
struct Config {
    /// This node's name.
    #[arg(long, env = "TRELLIS_NODE")]
    node: String,
    /// The cluster's trust domain.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN")]
    trust_domain: String,
    /// Address of trellisd's certificate service.
    #[arg(long, env = "TRELLIS_CA_ADDR", default_value = "127.0.0.1:15012")]
    ca_addr: SocketAddr,
    /// PEM file with the cluster's root certificates (trellisd's root-cert.pem).
    #[arg(long, env = "TRELLIS_CA_ROOTS")]
    ca_roots: PathBuf,
    /// File holding the one-time join token.
    #[arg(long, env = "TRELLIS_JOIN_TOKEN_FILE")]
    join_token_file: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Config::parse();
    tracing::info!(?config, "ztunnel starting");
    let td: TrustDomain = config.trust_domain.parse().context("--trust-domain")?;
    let bundles = BundleSet::with(TrustBundle::new(
        td.clone(),
        trellis_identity::ca::read_certs(&config.ca_roots)?,
    ));
    let token = std::fs::read_to_string(&config.join_token_file)
        .with_context(|| format!("reading the join token from {}", config.join_token_file.display()))?;
    let manager = trellis_identity::caclient::join_node(
        config.ca_addr,
        &td,
        bundles,
        &config.node,
        token.trim(),
        ManagerConfig::default(),
    )
    .await
    .with_context(|| format!("joining the cluster at {} as node {}", config.ca_addr, config.node))?;
    let node_id = SpiffeId::node(&td, &config.node)?;
    let held = manager
        .wait_for(&node_id, Duration::from_secs(5))
        .await
        .context("the node SVID vanished right after joining")?;
    let expires = trellis_identity::svid::to_unix(held.svid.not_after);
    tracing::info!(identity = %node_id, not_after_unix = expires, "joined: holding the node SVID");
    println!("ztunnel joined as {node_id} (SVID valid until unix time {expires})");
    tokio::signal::ctrl_c().await.ok();
    Ok(())
}
