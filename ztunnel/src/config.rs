//! ztunnel's configuration: one typed struct, from flags or `TRELLIS_*` environment variables,
//! printed in full by the admin endpoint's config dump.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Serialize;

/// What ztunnel captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// Enrolled pods behind this node (network namespaces routed through it).
    Pod,
    /// The host's own traffic: the host is the one workload (VMs, bare metal).
    Host,
    /// Nothing: tunnels only (tests, or capture managed elsewhere).
    None,
}

/// Everything ztunnel is configured with.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "ztunnel", version, about = "Trellis's per-node zero-trust tunnel proxy")]
pub struct Config {
    /// This node's name.
    #[arg(long, env = "TRELLIS_NODE")]
    pub node: String,
    /// This node's cluster (for metrics and the baggage header).
    #[arg(long, env = "TRELLIS_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// The cluster's trust domain.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Address of trellisd (certificate service and config stream).
    #[arg(long, env = "TRELLIS_CA_ADDR", default_value = "127.0.0.1:15012")]
    pub ca_addr: SocketAddr,
    /// PEM file with the cluster's root certificates (trellisd's root-cert.pem).
    #[arg(long, env = "TRELLIS_CA_ROOTS")]
    pub ca_roots: PathBuf,
    /// File holding the one-time join token (not needed with --config-file and --identity-file).
    #[arg(long, env = "TRELLIS_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Keep the node SVID here (0600, rewritten after every renewal), so that a restart resumes
    /// with it instead of a new join token while it is still valid. Empty: nothing is kept.
    #[arg(long, env = "TRELLIS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Read the config from this manifest file (the YAML trellisd reads) instead of trellisd's
    /// config stream: hosts without a control plane. Reloaded when it changes.
    #[arg(long, env = "TRELLIS_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
    /// A pre-issued SVID to serve (PEM: the certificate chain, leaf first, then its PKCS#8
    /// key), e.g. from `trellis identity issue`; repeatable. With it, no join and no CA.
    #[arg(long = "identity-file", env = "TRELLIS_IDENTITY_FILES", value_delimiter = ',')]
    pub identity_files: Vec<PathBuf>,
    /// The mesh's pod networks (repeatable, e.g. 10.1.0.0/16): a captured connection to an
    /// address there that no known workload holds is refused instead of passed through, since
    /// it may be an enrolled pod this node has not heard of yet. Empty: unknown addresses pass
    /// through (as outside the mesh).
    #[arg(long = "mesh-cidr", env = "TRELLIS_MESH_CIDRS", value_delimiter = ',')]
    #[serde(serialize_with = "display_all")]
    pub mesh_cidrs: Vec<crate::state::Cidr>,
    /// What to capture.
    #[arg(long, env = "TRELLIS_CAPTURE", value_enum, default_value = "pod")]
    pub capture: CaptureMode,
    /// The nft binary that installs and reads back the capture rules.
    #[arg(long, env = "TRELLIS_NFT", default_value = "nft")]
    pub nft_path: PathBuf,
    /// How long one nft run may take before it is killed and retried.
    #[arg(long, env = "TRELLIS_NFT_TIMEOUT_MS", default_value_t = 5000)]
    pub nft_timeout_ms: u64,
    /// How often the installed capture rules are read back and compared with the desired ones.
    #[arg(long, env = "TRELLIS_CAPTURE_CHECK_MS", default_value_t = 10000)]
    pub capture_check_ms: u64,
    /// Run as the cluster's east-west gateway: 15008 relays tunnels from other clusters to the
    /// nodes serving the global services they name, presenting this node's identity; nothing
    /// is captured (needs --capture none).
    #[arg(long, env = "TRELLIS_GATEWAY")]
    pub gateway: bool,
    /// HBONE listener (mTLS + HTTP/2 CONNECT).
    #[arg(long, default_value = "0.0.0.0:15008")]
    pub hbone_listen: SocketAddr,
    /// HBONE-over-QUIC listener (UDP: QUIC, mTLS + HTTP/3 CONNECT).
    #[arg(long, default_value = "0.0.0.0:15009")]
    pub quic_listen: SocketAddr,
    /// Outbound capture listener.
    #[arg(long, default_value = "0.0.0.0:15001")]
    pub outbound_listen: SocketAddr,
    /// Inbound plaintext capture listener.
    #[arg(long, default_value = "0.0.0.0:15006")]
    pub inbound_plain_listen: SocketAddr,
    /// Prometheus metrics.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_listen: SocketAddr,
    /// Readiness probe (/healthz/ready).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_listen: SocketAddr,
    /// Admin endpoint (config dump, certificates, log level); loopback only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_listen: SocketAddr,
    /// Data-plane threads (shards): each accepts and carries its own share of the connections
    /// on a single-threaded runtime, with its own HBONE connection pool.
    #[arg(long, env = "TRELLIS_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
    /// Most inbound tunnels (15008 CONNECTs) this node carries at once; beyond, 503. Lowered
    /// at start to fit the file descriptor limit.
    #[arg(long, env = "TRELLIS_MAX_TUNNELS", default_value_t = 16_384)]
    pub max_tunnels: usize,
    /// Most inbound tunnels one source identity holds on this node at once; beyond, 503.
    #[arg(long, env = "TRELLIS_MAX_TUNNELS_PER_IDENTITY", default_value_t = 4096)]
    pub max_tunnels_per_identity: usize,
    /// A tunnel that moves no byte either way this long after it opened is closed (reset both
    /// ways): a CONNECT nobody uses holds a pod socket for nothing.
    #[arg(long, env = "TRELLIS_TUNNEL_UNUSED_TIMEOUT_SECONDS", default_value_t = 30)]
    pub tunnel_unused_timeout_seconds: u64,
    /// A tunnel that moves no byte either way for this long is closed, as Envoy's TCP proxy does
    /// (its default is one hour too); 0: never.
    #[arg(long, env = "TRELLIS_TUNNEL_IDLE_TIMEOUT_SECONDS", default_value_t = 3600)]
    pub tunnel_idle_timeout_seconds: u64,
    /// How long one attempt to reach an endpoint may take (dial, TLS and HTTP/2 handshakes,
    /// the CONNECT's answer) before the endpoint, and its node or gateway, is ejected and the
    /// connection retried on the next one. Keep it above a few round trips to the farthest
    /// cluster.
    #[arg(long, env = "TRELLIS_CONNECT_TIMEOUT_MS", default_value_t = 500)]
    pub connect_timeout_ms: u64,
    /// Tunnel transport inside this cluster: h2 (HTTP/2 over TCP, 15008) or h3 (HTTP/3 over
    /// QUIC, 15009/udp).
    #[arg(long, env = "TRELLIS_TRANSPORT_LOCAL", default_value = "h2")]
    pub transport_local: crate::hbone::tunnel::Protocol,
    /// Tunnel transport to other clusters (their gateways, or their nodes on a shared network).
    #[arg(long, env = "TRELLIS_TRANSPORT_REMOTE", default_value = "h3")]
    pub transport_remote: crate::hbone::tunnel::Protocol,
    /// Per remote cluster, overriding --transport-remote: `CLUSTER=h2` or `CLUSTER=h3`;
    /// repeatable.
    #[arg(long = "transport", value_name = "CLUSTER=h2|h3", value_parser = parse_cluster_transport)]
    pub transport_clusters: Vec<(String, crate::hbone::tunnel::Protocol)>,
    /// After a failed QUIC dial (UDP blocked), how long that destination is reached over HTTP/2
    /// before QUIC is tried again.
    #[arg(long, env = "TRELLIS_QUIC_FALLBACK_SECONDS", default_value_t = 300)]
    pub quic_fallback_seconds: u64,
    /// The congestion controller of QUIC tunnels.
    #[arg(long, env = "TRELLIS_QUIC_CONGESTION", value_enum, default_value = "cubic")]
    pub quic_congestion: crate::hbone::http3::Congestion,
    /// The buffer size asked for each QUIC socket, each way, in bytes (beyond
    /// net.core.rmem_max/wmem_max only with CAP_NET_ADMIN; a shortfall is logged).
    #[arg(long, env = "TRELLIS_QUIC_SOCKET_BUFFER", default_value_t = crate::hbone::http3::SOCKET_BUFFER)]
    pub quic_socket_buffer: usize,
    /// Ack-eliciting QUIC packets the peer may receive before it must acknowledge (the ACK
    /// frequency extension); unset: QUIC's default, every other packet.
    #[arg(long, env = "TRELLIS_QUIC_ACK_THRESHOLD")]
    pub quic_ack_threshold: Option<u32>,
    /// The longest the peer may hold a QUIC acknowledgement back, in ms (with the extension);
    /// unset: the peer's own (25 ms by default).
    #[arg(long, env = "TRELLIS_QUIC_MAX_ACK_DELAY_MS")]
    pub quic_max_ack_delay_ms: Option<u64>,
    /// On SIGTERM, how long open connections may take to finish.
    #[arg(long, env = "TRELLIS_DRAIN_SECONDS", default_value_t = 5)]
    pub drain_seconds: u64,
}

/// `CLUSTER=h2|h3`.
fn parse_cluster_transport(s: &str) -> Result<(String, crate::hbone::tunnel::Protocol), String> {
    let (cluster, transport) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected CLUSTER=h2 or CLUSTER=h3"))?;
    trellis_identity::id::check_name(cluster).map_err(|e| format!("{s:?}: cluster {cluster:?}: {e}"))?;
    Ok((cluster.to_string(), transport.parse()?))
}

impl Config {
    /// How QUIC sockets and connections are tuned, from the flags.
    pub fn quic_tuning(&self) -> crate::hbone::http3::QuicTuning {
        crate::hbone::http3::QuicTuning {
            congestion: self.quic_congestion,
            socket_buffer: self.quic_socket_buffer,
            ack_threshold: self.quic_ack_threshold,
            max_ack_delay: self.quic_max_ack_delay_ms.map(std::time::Duration::from_millis),
        }
    }

    /// Which transport each link uses, from the flags.
    pub fn transport_policy(&self) -> crate::proxy::transport::TransportPolicy {
        crate::proxy::transport::TransportPolicy {
            local: self.transport_local,
            remote: self.transport_remote,
            clusters: self.transport_clusters.iter().cloned().collect(),
            fallback_for: std::time::Duration::from_secs(self.quic_fallback_seconds),
        }
    }

    /// The inbound tunnel limits from the flags (before fitting to the descriptor limit).
    pub fn tunnel_limits(&self) -> crate::limits::TunnelLimits {
        crate::limits::TunnelLimits {
            per_node: self.max_tunnels,
            per_identity: self.max_tunnels_per_identity,
        }
    }

    /// When silent tunnels close, from the flags.
    pub fn idle_timeouts(&self) -> crate::hbone::idle::IdleTimeouts {
        use std::time::Duration;
        crate::hbone::idle::IdleTimeouts {
            unused: Duration::from_secs(self.tunnel_unused_timeout_seconds.max(1)),
            idle: (self.tunnel_idle_timeout_seconds > 0).then(|| Duration::from_secs(self.tunnel_idle_timeout_seconds)),
        }
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=crate::shard::MAX).contains(&self.worker_threads) {
            return Err(format!(
                "--worker-threads {} is out of range: 1 to {} data-plane threads",
                self.worker_threads,
                crate::shard::MAX
            ));
        }
        if !self.identity_files.is_empty() && self.config_file.is_none() {
            return Err(
                "--identity-file needs --config-file: without a control plane the config comes from a file too".into(),
            );
        }
        if self.join_token_file.is_none() && self.identity_files.is_empty() && self.state_dir.is_none() {
            return Err(
                "give --join-token-file (to join trellisd; with --state-dir, a restart needs no new token), or --config-file with --identity-file (no control plane)"
                    .into(),
            );
        }
        if self.gateway && self.capture != CaptureMode::None {
            return Err("--gateway needs --capture none: a gateway relays tunnels and hosts no workload".into());
        }
        if self.max_tunnels == 0 || self.max_tunnels_per_identity == 0 {
            return Err("--max-tunnels and --max-tunnels-per-identity must be at least 1".into());
        }
        if self.connect_timeout_ms == 0 {
            return Err("--connect-timeout-ms must be at least 1".into());
        }
        if self.nft_timeout_ms == 0 || self.capture_check_ms == 0 {
            return Err("--nft-timeout-ms and --capture-check-ms must be at least 1".into());
        }
        if !self.admin_listen.ip().is_loopback() {
            return Err(format!(
                "--admin-listen {} is not a loopback address; the admin endpoint must not leave the node",
                self.admin_listen
            ));
        }
        Ok(())
    }
}

/// Serializes a list by each item's `Display` (for the config dump).
fn display_all<S: serde::Serializer, T: std::fmt::Display>(items: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(items.iter().map(ToString::to_string))
}
