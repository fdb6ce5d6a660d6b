//! What the benchmarks share: a trellisd process on loopback ports of its own, nodes joined and
//! subscribed to its config stream, and the small measuring helpers.

pub mod procs;
pub mod results;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use trellis_api::stream::{follow, Applied};
use trellis_identity::caclient::join_node;
use trellis_identity::tls::{client_config, tls_channel};
use trellis_identity::verify::{ExpectedPeer, SpiffeServerVerifier};
use trellis_identity::{BundleSet, JoinTokens, ManagerConfig, SpiffeId, TrustBundle, TrustDomain};

/// A loopback port nobody holds now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The body trellisd's admin endpoint on `port` answers for `path` (empty while it cannot).
pub async fn admin_get(port: u16, path: &str) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    trellis_admin::client::get(addr, path, Duration::from_secs(10))
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// A process's resident memory, MiB (0 if it cannot be read).
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The `p` quantile (0..=1) of `sorted`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A trellisd process, killed when dropped.
pub struct Trellisd {
    child: Child,
    pub addr: SocketAddr,
    pub admin: u16,
    pub trust_domain: TrustDomain,
    pub bundles: BundleSet,
    tokens: JoinTokens,
}

impl Drop for Trellisd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Trellisd {
    /// Starts `<bin>/trellisd` for `cluster` with its manifests and CA under `dir` and waits
    /// (30 s) until its config stream accepts connections.
    pub async fn start(bin: &Path, cluster: &str, manifests: &Path, dir: &Path) -> anyhow::Result<Self> {
        let ca_dir = dir.join("ca");
        let (port, admin) = (free_port(), free_port());
        let child = Command::new(bin.join("trellisd"))
            .args(["--cluster", cluster, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .arg("--manifests")
            .arg(manifests)
            .arg("--ca-dir")
            .arg(&ca_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting trellisd (run bench/run.sh, which builds it)")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "trellisd did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let trust_domain = TrustDomain::new(&format!("{cluster}.trellis.local"))?;
        let roots = trellis_identity::ca::read_certs(&ca_dir.join("root-cert.pem"))?;
        let bundles = BundleSet::with(TrustBundle::new(trust_domain.clone(), roots));
        let tokens = JoinTokens::open(&ca_dir.join("join-tokens.json"))?;
        Ok(Self {
            child,
            addr,
            admin,
            trust_domain,
            bundles,
            tokens,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Joins `node` with a fresh token; its SVIDs come from the returned manager.
    pub async fn join(&self, node: &str) -> anyhow::Result<trellis_identity::CertManager> {
        let token = self.tokens.create(node, Duration::from_secs(600))?;
        Ok(join_node(
            self.addr,
            &self.trust_domain,
            self.bundles.clone(),
            node,
            &token,
            ManagerConfig::default(),
        )
        .await?)
    }

    /// Subscribes joined `node` to the config stream as a ztunnel: what it holds, as it changes.
    pub fn subscribe(
        &self,
        node: &str,
        manager: &trellis_identity::CertManager,
    ) -> anyhow::Result<watch::Receiver<Applied>> {
        let td = &self.trust_domain;
        let verifier = SpiffeServerVerifier::new(self.bundles.clone(), ExpectedPeer::Exact(SpiffeId::control(td)));
        let resolver = manager.resolver(&SpiffeId::node(td, node)?);
        let config = client_config(verifier, Some(resolver))?;
        let channel = tls_channel(self.addr, Arc::new(config));
        let (tx, rx) = watch::channel(Applied::default());
        tokio::spawn(follow(
            channel,
            node.to_string(),
            trellis_api::config::v1::Role::Ztunnel,
            tx,
        ));
        Ok(rx)
    }
}
