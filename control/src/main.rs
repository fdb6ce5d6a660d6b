//! `trellisd`: the per-cluster control plane.
//!
//! It discovers the mesh from a manifest directory, hosts the cluster CA and the node-scoped
//! config stream on one TLS port, and serves a loopback admin endpoint; federation sync lands
//! here next (see ARCHITECTURE.md). Read [`Config`] first, then `serve`; the machinery is in the
//! `trellis_control` library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use trellis_control::server::{ControlPlane, Options};
use trellis_identity::{IssuancePolicy, JoinTokens, TrustDomain};
use trellis_mesh::model::ClusterInfo;

/// trellisd: discovery, the cluster CA, the config stream and federation sync for one cluster.
#[derive(Debug, Parser)]
#[command(name = "trellisd", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage one-time join tokens for nodes.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token for a node and print it.
    Create {
        /// Node the token is for; its ztunnel presents the token once.
        #[arg(long)]
        node: String,
        /// How long the token stays valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
}

/// Everything trellisd is configured with (flags or `TRELLIS_*` environment variables).
#[derive(Debug, Clone, Args)]
struct Config {
    /// Cluster name.
    #[arg(long, env = "TRELLIS_CLUSTER", default_value = "cluster")]
    cluster: String,
    /// Trust domain; default `<cluster>.trellis.local`.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// Network the cluster's pod addresses live on; default the cluster name.
    #[arg(long, env = "TRELLIS_NETWORK")]
    network: Option<String>,
    /// DNS suffix of service hostnames.
    #[arg(long, env = "TRELLIS_DOMAIN", default_value = "cluster.local")]
    domain: String,
    /// Directory holding the CA key material and the join-token file.
    #[arg(long, env = "TRELLIS_CA_DIR", default_value = "/var/lib/trellis/ca")]
    ca_dir: PathBuf,
    /// Directory of Kubernetes-shaped YAML manifests to discover the mesh from (watched live).
    #[arg(long, env = "TRELLIS_MANIFESTS", default_value = "/etc/trellis/manifests")]
    manifests: PathBuf,
    /// Address of the certificate service and the config stream (TLS 1.3, gRPC).
    #[arg(long, alias = "ca-listen", env = "TRELLIS_LISTEN", default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// Loopback address of the admin endpoint (/status, /config_dump, /metrics).
    #[arg(long, env = "TRELLIS_ADMIN_LISTEN", default_value = "127.0.0.1:15014")]
    admin_listen: SocketAddr,
    /// Default SVID lifetime, seconds.
    #[arg(long, env = "TRELLIS_SVID_TTL", default_value_t = 24 * 3600)]
    svid_ttl_seconds: u64,
    /// Longest SVID lifetime any caller gets, seconds.
    #[arg(long, env = "TRELLIS_SVID_MAX_TTL", default_value_t = 24 * 3600)]
    svid_max_ttl_seconds: u64,
}

/// Longest SVID lifetime accepted from flags: a year.
const MAX_TTL_FLAG: u64 = 365 * 24 * 3600;

impl Config {
    fn trust_domain(&self) -> anyhow::Result<TrustDomain> {
        match &self.trust_domain {
            Some(td) => td.parse().with_context(|| format!("--trust-domain {td:?}")),
            None => TrustDomain::for_cluster(&self.cluster).with_context(|| format!("--cluster {:?}", self.cluster)),
        }
    }

    fn policy(&self) -> anyhow::Result<IssuancePolicy> {
        for (flag, v) in [
            ("--svid-ttl-seconds", self.svid_ttl_seconds),
            ("--svid-max-ttl-seconds", self.svid_max_ttl_seconds),
        ] {
            anyhow::ensure!(
                (60..=MAX_TTL_FLAG).contains(&v),
                "{flag} {v}: use 60 to {MAX_TTL_FLAG} seconds"
            );
        }
        Ok(IssuancePolicy {
            default_ttl: Duration::from_secs(self.svid_ttl_seconds),
            max_ttl: Duration::from_secs(self.svid_max_ttl_seconds),
            min_ttl: Duration::from_secs(60),
        })
    }

    fn options(&self) -> anyhow::Result<Options> {
        anyhow::ensure!(
            self.admin_listen.ip().is_loopback(),
            "--admin-listen {} is not a loopback address; the admin endpoint must not leave the host",
            self.admin_listen
        );
        Ok(Options {
            cluster: ClusterInfo {
                name: self.cluster.clone(),
                trust_domain: self.trust_domain()?,
                network: self.network.clone().unwrap_or_else(|| self.cluster.clone()),
                domain: self.domain.clone(),
            },
            ca_dir: self.ca_dir.clone(),
            policy: self.policy()?,
            manifests: self.manifests.clone(),
            grpc_listen: self.listen,
            admin_listen: self.admin_listen,
        })
    }
}

fn tokens(config: &Config) -> anyhow::Result<JoinTokens> {
    std::fs::create_dir_all(&config.ca_dir).with_context(|| format!("creating {}", config.ca_dir.display()))?;
    Ok(JoinTokens::open(&config.ca_dir.join("join-tokens.json"))?)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let options = config.options()?;
    tracing::info!(?config, "trellisd starting");
    // Every connection costs a descriptor: take all the kernel allows before listening.
    match trellis_identity::limits::raise_nofile_limit() {
        Ok(nofile) => tracing::info!(nofile, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
    }
    let plane = ControlPlane::start(options).await?;
    println!(
        "trellisd serving: gRPC (CA + config stream) on {}, admin on http://{}",
        plane.grpc_addr, plane.admin_addr
    );
    shutdown_signal().await;
    tracing::info!("trellisd stopping");
    drop(plane);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(TokenCommand::Create { node, ttl_seconds })) => {
            let token = tokens(&cli.config)?.create(&node, Duration::from_secs(ttl_seconds))?;
            println!("{token}");
            Ok(())
        }
        None => serve(cli.config).await,
    }
}
