//! `trellisd`: the per-cluster control plane.
//!
//! Today it hosts the cluster CA (`trellis.identity.v1` over TLS 1.3) and manages join tokens.
//! Discovery, the node-scoped config stream and federation sync land here next (see
//! ARCHITECTURE.md). Read [`Config`] first, then `serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use trellis_identity::issuance::{CaServer, CaService};
use trellis_identity::IdKind;
use trellis_identity::{
    CertManager, CertificateAuthority, IssuancePolicy, JoinTokens, ManagerConfig, SpiffeId, TrustDomain,
};

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
    /// Directory holding the CA key material and the join-token file.
    #[arg(long, env = "TRELLIS_CA_DIR", default_value = "/var/lib/trellis/ca")]
    ca_dir: PathBuf,
    /// Address of the certificate service (TLS 1.3, gRPC).
    #[arg(long, env = "TRELLIS_CA_LISTEN", default_value = "127.0.0.1:15012")]
    ca_listen: SocketAddr,
    /// Default SVID lifetime, seconds.
    #[arg(long, env = "TRELLIS_SVID_TTL", default_value_t = 24 * 3600)]
    svid_ttl_seconds: u64,
    /// Longest SVID lifetime any caller gets, seconds.
    #[arg(long, env = "TRELLIS_SVID_MAX_TTL", default_value_t = 24 * 3600)]
    svid_max_ttl_seconds: u64,
}

impl Config {
    fn trust_domain(&self) -> anyhow::Result<TrustDomain> {
        match &self.trust_domain {
            Some(td) => td.parse().with_context(|| format!("--trust-domain {td:?}")),
            None => TrustDomain::for_cluster(&self.cluster).with_context(|| format!("--cluster {:?}", self.cluster)),
        }
    }

    fn policy(&self) -> IssuancePolicy {
        IssuancePolicy {
            default_ttl: Duration::from_secs(self.svid_ttl_seconds),
            max_ttl: Duration::from_secs(self.svid_max_ttl_seconds),
            min_ttl: Duration::from_secs(60),
        }
    }
}

fn tokens(config: &Config) -> anyhow::Result<JoinTokens> {
    std::fs::create_dir_all(&config.ca_dir).with_context(|| format!("creating {}", config.ca_dir.display()))?;
    Ok(JoinTokens::open(&config.ca_dir.join("join-tokens.json"))?)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let td = config.trust_domain()?;
    tracing::info!(?config, trust_domain = %td, "trellisd starting");
    let ca = Arc::new(
        CertificateAuthority::load_or_create(&config.ca_dir, &td, config.policy())
            .context("the cluster CA cannot start")?,
    );
    let control = CertManager::new(ca.clone(), ManagerConfig::default());
    let control_id = SpiffeId::control(&td);
    control.ensure(&control_id);
    control
        .wait_for(&control_id, Duration::from_secs(10))
        .await
        .context("could not issue trellisd's own SVID")?;
    let authorizer = |node: &str, id: &SpiffeId| -> Result<(), String> {
        match id.kind() {
            // Every joined node may renew its node SVID until discovery can retire nodes.
            IdKind::Node(name) if name == node => Ok(()),
            _ => Err(format!(
                "no workload with {id} is scheduled on {node}: this trellisd has no discovery source yet"
            )),
        }
    };
    let service = CaService::new(ca, Arc::new(tokens(&config)?), Arc::new(authorizer));
    let listener = tokio::net::TcpListener::bind(config.ca_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.ca_listen))?;
    let server = CaServer::start(listener, service, &control)?;
    tracing::info!(addr = %server.local_addr, "certificate service listening");
    shutdown_signal().await;
    tracing::info!("trellisd stopping");
    server.stop().await;
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
