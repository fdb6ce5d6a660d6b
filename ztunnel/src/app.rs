//! Wires ztunnel together: join, config stream, certificates, capture, listeners, admin, drain.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_api::stream::{follow, Applied};
use trellis_identity::manager::{CertificateSource, HeldSvid, Issued};
use trellis_identity::saved;
use trellis_identity::tls::{client_config, tls_channel};
use trellis_identity::verify::{ExpectedPeer, SpiffeServerVerifier};
use trellis_identity::{BundleSet, CertManager, ManagerConfig, SpiffeId, TrustBundle, TrustDomain};
use trellis_mesh::model::ClusterInfo;

use crate::admin::{self, query_param, Readiness, Reply, Route};
use crate::capture::{self, Nft, Plan, Ports, Table, Timing};
use crate::config::{CaptureMode, Config};
use crate::hbone::http3;
use crate::hbone::server::{self as hbone_server, LocalCerts};
use crate::limits::Limited;
use crate::metrics::{IdentityLabels, Metrics};
use crate::proxy::{gateway::Gateway, inbound::Inbound, inbound_plain, outbound, Proxy};
use crate::shard;
use crate::state::ProxyState;
use crate::static_config;

/// Changes the log filter at runtime (`/logging?level=...` on the admin endpoint).
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Runs ztunnel until SIGTERM or SIGINT, then drains.
pub async fn run(config: Config, log: LogControl) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let td: TrustDomain = config.trust_domain.parse().context("--trust-domain")?;
    let roots = trellis_identity::ca::read_certs(&config.ca_roots)
        .with_context(|| format!("reading --ca-roots {}", config.ca_roots.display()))?;
    let bundles = BundleSet::with(TrustBundle::new(td.clone(), roots));
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(Readiness::default());

    // Bind every port first: a port in use is a configuration error worth failing on at once.
    let bind = |addr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {what} listener on {addr}"))
    };
    // The data plane's listeners, one of each per shard (see `shard`).
    let shards = config.worker_threads;
    let hbone_listeners = shard::bind_all(config.hbone_listen, shards, "HBONE")?;
    let quic_socket = std::net::UdpSocket::bind(config.quic_listen)
        .with_context(|| format!("binding the HBONE-over-QUIC socket on {} (UDP)", config.quic_listen))?;
    quic_socket.set_nonblocking(true)?;
    let outbound_listeners = shard::bind_all(config.outbound_listen, shards, "outbound capture")?;
    let plain_listeners = shard::bind_all(config.inbound_plain_listen, shards, "inbound plaintext capture")?;
    let metrics_listener = bind(config.metrics_listen, "metrics").await?;
    let ready_listener = bind(config.readiness_listen, "readiness").await?;
    let admin_listener = bind(config.admin_listen, "admin").await?;

    let ready_route: Route = {
        let ready = ready.clone();
        Arc::new(move |_: &Method, _: &str, _: Option<&str>| ready.reply())
    };
    tokio::spawn(admin::serve(ready_listener, ready_route));
    let metrics_route: Route = {
        let metrics = metrics.clone();
        Arc::new(move |_: &Method, path: &str, _: Option<&str>| match path {
            "/metrics" | "/stats/prometheus" => (StatusCode::OK, trellis_admin::PROMETHEUS_TEXT, metrics.render()),
            _ => (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into()),
        })
    };
    tokio::spawn(admin::serve(metrics_listener, metrics_route));

    let (applied_tx, applied_rx) = watch::channel(Applied::default());
    let certs = match &config.config_file {
        Some(file) => {
            // No control plane: the config, and maybe the identities, come from files.
            let cluster = ClusterInfo {
                name: config.cluster.clone(),
                trust_domain: td.clone(),
                network: config.cluster.clone(),
                domain: "cluster.local".into(),
            };
            let first = static_config::load(file, &config.node, &cluster).map_err(anyhow::Error::msg)?;
            tracing::info!(file = %file.display(), resources = first.len(), "config from a static file, not from trellisd");
            let certs = if config.identity_files.is_empty() {
                join(&config, &td, bundles.clone()).await?
            } else {
                static_identities(&config, &td, &bundles)?
            };
            tokio::spawn(static_config::follow(
                file.clone(),
                config.node.clone(),
                cluster,
                first,
                applied_tx,
            ));
            certs
        }
        None => {
            let certs = join(&config, &td, bundles.clone()).await?;
            let node_id = SpiffeId::node(&td, &config.node)?;
            let control = SpiffeServerVerifier::new(bundles.clone(), ExpectedPeer::Exact(SpiffeId::control(&td)));
            let channel = tls_channel(
                config.ca_addr,
                Arc::new(client_config(control, Some(certs.resolver(&node_id)))?),
            );
            tokio::spawn(follow(
                channel,
                config.node.clone(),
                trellis_api::config::v1::Role::Ztunnel,
                applied_tx,
            ));
            certs
        }
    };
    ready.node_svid.store(true, Ordering::Release);

    let (capture_tx, capture_rx) = watch::channel(None::<Table>);
    match config.capture {
        CaptureMode::None => ready.capture.store(true, Ordering::Release),
        CaptureMode::Pod | CaptureMode::Host => {
            let nft = Nft {
                path: config.nft_path.clone(),
                timeout: Duration::from_millis(config.nft_timeout_ms),
            };
            let timing = Timing {
                check_every: Duration::from_millis(config.capture_check_ms),
                ..Timing::default()
            };
            tokio::spawn(capture::driver::run(
                nft,
                timing,
                capture_rx,
                metrics.clone(),
                ready.clone(),
            ));
        }
    }

    let (state_tx, state_rx) = watch::channel(Arc::new(ProxyState::default()));
    let local = LocalCerts::new(certs.clone());
    let proxy = Proxy::new(
        config.node.clone(),
        config.cluster.clone(),
        state_rx,
        certs.clone(),
        bundles.clone(),
        metrics.clone(),
        config.idle_timeouts(),
        Duration::from_millis(config.connect_timeout_ms),
    );
    proxy.links.set_policy(config.transport_policy());
    let quic_tuning = config.quic_tuning();
    proxy.set_quic_tuning(quic_tuning);
    tokio::spawn(apply_config(
        config.clone(),
        applied_rx,
        state_tx,
        capture_tx,
        certs.clone(),
        local.clone(),
        metrics.clone(),
        ready.clone(),
        bundles.clone(),
    ));
    tokio::spawn(export_expiry(certs.clone(), metrics.clone()));

    let server_tls = hbone_server::tls_config(local.clone(), bundles.clone());
    let tunnel_limits = config.tunnel_limits().fitted(trellis_identity::limits::nofile_limit());
    tracing::info!(?tunnel_limits, "inbound tunnel limits");
    let data_plane = DataPlane {
        proxy: proxy.clone(),
        server_tls,
        local,
        bundles: bundles.clone(),
        quic_socket,
        quic_tuning,
        listeners: hbone_listeners
            .into_iter()
            .zip(outbound_listeners)
            .zip(plain_listeners)
            .map(|((h, o), p)| [h, o, p])
            .collect(),
    };
    if config.gateway {
        data_plane.start(Arc::new(Limited::new(
            Arc::new(Gateway { proxy: proxy.clone() }),
            tunnel_limits,
        )))?;
    } else {
        data_plane.start(Arc::new(Limited::new(
            Arc::new(Inbound { proxy: proxy.clone() }),
            tunnel_limits,
        )))?;
    }
    tokio::spawn(admin::serve(
        admin_listener,
        admin_route(&config, proxy.clone(), ready.clone(), log),
    ));

    tracing::info!(node = %config.node, capture = ?config.capture, "ztunnel serving");
    shutdown_signal().await;
    ready.draining.store(true, Ordering::Release);
    let grace = Duration::from_secs(config.drain_seconds);
    tracing::info!(open = proxy.drain.open(), grace_s = grace.as_secs(), "draining");
    let left = proxy.drain.drain(grace).await;
    tracing::info!(left_open = left, "drained; exiting");
    Ok(())
}

/// The data plane's sockets and what its servers share, before they start.
struct DataPlane {
    proxy: Arc<Proxy>,
    server_tls: Arc<rustls::ServerConfig>,
    local: Arc<LocalCerts>,
    bundles: BundleSet,
    quic_socket: std::net::UdpSocket,
    quic_tuning: http3::QuicTuning,
    /// Per shard: the HBONE, outbound capture and inbound plaintext listeners.
    listeners: Vec<[std::net::TcpListener; 3]>,
}

impl DataPlane {
    /// Starts the QUIC server on this (the main) runtime and one shard per listener set, with
    /// `handler` answering tunnels on both transports.
    fn start<H: hbone_server::Handler>(self, handler: Arc<H>) -> anyhow::Result<()> {
        let Self {
            proxy,
            server_tls,
            local,
            bundles,
            quic_socket,
            quic_tuning,
            listeners,
        } = self;
        tokio::spawn(http3::serve(
            quic_socket,
            server_tls.clone(),
            local.clone(),
            handler.clone(),
            proxy.drain.watch(),
            bundles.clone(),
            quic_tuning,
        ));
        // One admission gate for 15008 across the shards: its per-source limits hold per node.
        let gate = hbone_server::gate();
        for (index, [hbone, outbound, plain]) in listeners.into_iter().enumerate() {
            let (proxy, gate, handler) = (proxy.clone(), gate.clone(), handler.clone());
            let (server_tls, local, bundles) = (server_tls.clone(), local.clone(), bundles.clone());
            shard::spawn(index, move || async move {
                let (hbone, outbound, plain) = (
                    TcpListener::from_std(hbone)?,
                    TcpListener::from_std(outbound)?,
                    TcpListener::from_std(plain)?,
                );
                let drain = proxy.drain.watch();
                tokio::join!(
                    hbone_server::serve_gated(hbone, gate, server_tls, local, handler, drain, bundles),
                    outbound::serve(outbound, proxy.clone()),
                    inbound_plain::serve(plain, proxy.clone()),
                );
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// Identities from `--identity-file`s, for a host with no CA to ask: served as they are, never
/// renewed (replace the files and restart before they expire).
fn static_identities(config: &Config, td: &TrustDomain, bundles: &BundleSet) -> anyhow::Result<CertManager> {
    struct NoCa;
    impl CertificateSource for NoCa {
        fn issue<'a>(
            &'a self,
            id: &'a SpiffeId,
            _: &'a str,
            _: Duration,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Issued, String>> + Send + 'a>> {
            Box::pin(async move {
                Err(format!(
                    "no CA without a control plane: {id} comes only from an --identity-file; issue a fresh one and restart"
                ))
            })
        }
    }
    let roots = bundles.roots(td).unwrap_or_default();
    let certs = CertManager::new(Arc::new(NoCa), ManagerConfig::default());
    for path in &config.identity_files {
        let held = trellis_identity::svid::read_pem_svid(path)
            .map_err(anyhow::Error::msg)
            .and_then(|svid| HeldSvid::new(svid, roots.clone()).map_err(anyhow::Error::from))
            .with_context(|| format!("loading --identity-file {}", path.display()))?;
        if held.svid.id.trust_domain() != td {
            anyhow::bail!(
                "--identity-file {} holds {}, which is not of trust domain {td}",
                path.display(),
                held.svid.id
            );
        }
        let expires = trellis_identity::svid::to_unix(held.svid.not_after);
        tracing::info!(identity = %held.svid.id, not_after_unix = expires, file = %path.display(), "identity loaded");
        certs.insert(held);
    }
    Ok(certs)
}

/// The node SVID and the manager that renews it: the one saved in `--state-dir` by an earlier
/// run while it is still good (no token needed), otherwise a Join with the one-time token. The
/// SVID is saved again after every renewal.
async fn join(config: &Config, td: &TrustDomain, bundles: BundleSet) -> anyhow::Result<CertManager> {
    let node_id = SpiffeId::node(td, &config.node)?;
    let saved = match &config.state_dir {
        None => None,
        Some(dir) => match saved::load(dir, &node_id, &bundles, SystemTime::now()) {
            Ok(held) => held.map(|held| (held, saved::node_svid_path(dir))),
            Err(why) => {
                tracing::warn!(%why, "not using the saved node SVID; joining with the token");
                None
            }
        },
    };
    let certs = match saved {
        Some((held, path)) => {
            let expires = trellis_identity::svid::to_unix(held.svid.not_after);
            let certs =
                trellis_identity::caclient::node_manager(config.ca_addr, td, bundles, held, ManagerConfig::default())
                    .context("setting up the CA client")?;
            tracing::info!(identity = %node_id, not_after_unix = expires, file = %path.display(), "resumed with the saved node SVID");
            println!(
                "ztunnel resumed as {node_id} with the SVID saved in {} (valid until unix time {expires})",
                path.display()
            );
            certs
        }
        None => {
            let token_file = config.join_token_file.as_ref().context(
                "no usable node SVID in --state-dir, and no --join-token-file: create a token (trellisd token create --node <node>) and pass it",
            )?;
            let token = std::fs::read_to_string(token_file)
                .with_context(|| format!("reading the join token from {}", token_file.display()))?;
            let certs = trellis_identity::caclient::join_node(
                config.ca_addr,
                td,
                bundles,
                &config.node,
                token.trim(),
                ManagerConfig::default(),
            )
            .await
            .with_context(|| format!("joining the cluster at {} as node {}", config.ca_addr, config.node))?;
            let held = certs
                .wait_for(&node_id, Duration::from_secs(5))
                .await
                .context("the node SVID vanished right after joining")?;
            let expires = trellis_identity::svid::to_unix(held.svid.not_after);
            tracing::info!(identity = %node_id, not_after_unix = expires, "joined: holding the node SVID");
            println!("ztunnel joined as {node_id} (SVID valid until unix time {expires})");
            certs
        }
    };
    if let Some(dir) = &config.state_dir {
        tokio::spawn(save_node_svid(certs.clone(), node_id, dir.clone()));
    }
    Ok(certs)
}

/// Saves the node SVID to `dir` now and after every renewal, until the manager is gone. A failed
/// write is logged and retried at the next change; the SVID in memory is unaffected.
async fn save_node_svid(certs: CertManager, node_id: SpiffeId, dir: std::path::PathBuf) {
    let mut changes = certs.changes();
    let mut last: Option<Arc<HeldSvid>> = None;
    loop {
        if let Some(held) = certs.current(&node_id) {
            if !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &held)) {
                let (dir, saving) = (dir.clone(), held.clone());
                match tokio::task::spawn_blocking(move || saved::save(&dir, &saving.svid)).await {
                    Ok(Ok(())) => tracing::debug!("node SVID saved"),
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "could not save the node SVID; a restart will need a new join token")
                    }
                    Err(error) => tracing::warn!(%error, "could not save the node SVID"),
                }
                last = Some(held);
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Follows applied config versions: rebuilds the state, keeps workload SVIDs and the served
/// identities in step, and hands the desired capture rules to the capture reconciler
/// ([`capture::driver::run`]), which installs them and owns readiness's `capture` flag.
#[allow(clippy::too_many_arguments)]
async fn apply_config(
    config: Config,
    mut applied: watch::Receiver<Applied>,
    state_tx: watch::Sender<Arc<ProxyState>>,
    capture_tx: watch::Sender<Option<Table>>,
    certs: CertManager,
    local: Arc<LocalCerts>,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    bundles: BundleSet,
) {
    let own_td: Option<TrustDomain> = config.trust_domain.parse().ok();
    let ports = Ports {
        outbound: config.outbound_listen.port(),
        inbound_plain: config.inbound_plain_listen.port(),
        hbone: config.hbone_listen.port(),
        metrics: config.metrics_listen.port(),
        readiness: config.readiness_listen.port(),
    };
    // trellisd (config stream, certificate renewals) stays reachable whatever host mode captures.
    let control = match config.ca_addr {
        std::net::SocketAddr::V4(v4) if config.identity_files.is_empty() => Some(v4),
        _ => None,
    };
    let mut served: BTreeSet<SpiffeId> = BTreeSet::new();
    loop {
        let (version, state) = {
            let a = applied.borrow_and_update();
            metrics.config_connected.set(i64::from(a.connected));
            // Federated trust domains follow the config: a cluster that left is refused now.
            if let (Some(own), true) = (&own_td, a.version > 0) {
                let (problems, dropped) = crate::trust::reconcile(&bundles, own, &a.slice);
                for problem in problems {
                    tracing::warn!(version = a.version, %problem, "trust bundle refused");
                }
                for td in dropped {
                    tracing::info!(trust_domain = %td, "trust domain left the federation: its peers are refused");
                }
            }
            (
                a.version,
                ProxyState::from_slice(&config.node, a.version, &a.slice).with_mesh_networks(&config.mesh_cidrs),
            )
        };
        if version > 0 {
            for problem in &state.problems {
                tracing::warn!(version, %problem, "config resource skipped");
            }
            let enrolled: Vec<_> = state.local.values().filter(|w| w.enrolled).collect();
            let ids: BTreeSet<SpiffeId> = enrolled.iter().map(|w| w.identity.clone()).collect();
            for id in ids.difference(&served) {
                certs.ensure(id);
            }
            for id in served.difference(&ids) {
                certs.forget(id);
            }
            // A gateway serves its node identity to the clusters that tunnel through it.
            let gateway_id = match (config.gateway, &own_td) {
                (true, Some(td)) => SpiffeId::node(td, &config.node).ok(),
                _ => None,
            };
            local.set(ids.iter().cloned().chain(gateway_id));
            // A foreign HBONE client (no SNI) is served by the pod address it dialled.
            local.set_addresses(enrolled.iter().map(|w| (w.ip, w.identity.clone())));
            served = ids;
            let plan = match config.capture {
                CaptureMode::Pod => Some(Plan::Pods(
                    enrolled
                        .iter()
                        .filter_map(|w| match w.ip {
                            IpAddr::V4(v4) => Some(v4),
                            IpAddr::V6(_) => None,
                        })
                        .collect(),
                )),
                CaptureMode::Host => Some(Plan::Host { control }),
                CaptureMode::None => None,
            };
            metrics.captured_workloads.set(enrolled.len() as i64);
            metrics.config_version.set(version as i64);
            state_tx.send_replace(Arc::new(state));
            ready.config.store(true, Ordering::Release);
            if let Some(plan) = plan {
                let table = capture::desired(&plan, ports);
                capture_tx.send_if_modified(|current| {
                    let changed = current.as_ref() != Some(&table);
                    if changed {
                        tracing::info!(?plan, "capture rules desired");
                        *current = Some(table);
                    }
                    changed
                });
            }
        }
        if applied.changed().await.is_err() {
            return;
        }
    }
}

async fn export_expiry(certs: CertManager, metrics: Arc<Metrics>) {
    loop {
        metrics.cert_expiry.clear();
        for id in certs.identities() {
            if let Some(held) = certs.current(&id) {
                let labels = IdentityLabels {
                    identity: id.to_string(),
                };
                metrics
                    .cert_expiry
                    .get_or_create(&labels)
                    .set(trellis_identity::svid::to_unix(held.svid.not_after) as i64);
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn admin_route(config: &Config, proxy: Arc<Proxy>, ready: Arc<Readiness>, log: LogControl) -> Route {
    let config = serde_json::to_value(config).unwrap_or_default();
    Arc::new(move |method: &Method, path: &str, query: Option<&str>| -> Reply {
        match (path, method) {
            ("/config_dump", &Method::GET) => json_reply(config_dump(&config, &proxy)),
            ("/certs", &Method::GET) => json_reply(certs_dump(&proxy.certs)),
            ("/healthz/ready", &Method::GET) => ready.reply(),
            ("/logging", _) => match query_param(query, "level") {
                Some(level) => match log(level) {
                    Ok(()) => (StatusCode::OK, "text/plain", format!("log level set to {level}\n")),
                    Err(e) => (
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("bad level {level:?}: {e}\n"),
                    ),
                },
                None => (
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "give ?level=<filter>, e.g. info or ztunnel=debug\n".into(),
                ),
            },
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /config_dump, /certs, /logging?level=debug or /healthz/ready\n".into(),
            ),
        }
    })
}

fn json_reply(value: serde_json::Value) -> Reply {
    let body = serde_json::to_string_pretty(&value).unwrap_or_default() + "\n";
    (StatusCode::OK, "application/json", body)
}

fn config_dump(config: &serde_json::Value, proxy: &Proxy) -> serde_json::Value {
    let state = proxy.state();
    let mut workloads: Vec<_> = state
        .local
        .values()
        .map(|w| json!({"name": w.name, "namespace": w.namespace, "ip": w.ip, "identity": w.identity.to_string(), "enrolled": w.enrolled}))
        .collect();
    workloads.sort_by_key(|w| w["ip"].to_string());
    let services: Vec<_> = state
        .services()
        .iter()
        .map(|s| {
            let balancer = proxy.balancer(&s.namespace, &s.name);
            json!({
                "name": s.name, "namespace": s.namespace, "vips": s.vips, "ports": s.ports,
                "weights": s.weights,
                "endpoints": s.endpoints.iter().map(|e| json!({
                    "name": e.name, "ip": e.ip, "node": e.node, "node_address": e.node_address,
                    "cluster": e.cluster, "region": e.region, "zone": e.zone,
                    "gateway": e.gateway.as_ref().map(|g| g.address.to_string()),
                    "identity": e.identity.as_ref().map(ToString::to_string), "enrolled": e.enrolled, "healthy": e.healthy,
                    "ejected": balancer.is_ejected(e.ip) || proxy.hops.is_ejected(crate::lb::hop(e)),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let pool: Vec<_> = proxy
        .pools()
        .flat_map(|pool| pool.snapshot())
        .map(|(k, conns, streams)| json!({"source": k.source.to_string(), "node": k.node, "destination": k.destination.to_string(), "connections": conns, "tunnels": streams}))
        .collect();
    json!({
        "config": config,
        "version": state.version,
        "workloads": workloads,
        "services": services,
        "problems": state.problems,
        "trust_domains": proxy.bundles.all().iter().map(|b| json!({"trust_domain": b.trust_domain.to_string(), "roots": b.x509_authorities.len()})).collect::<Vec<_>>(),
        "pool": pool,
        "open_connections": proxy.drain.open(),
    })
}

fn certs_dump(certs: &CertManager) -> serde_json::Value {
    let now = SystemTime::now();
    let list: Vec<_> = certs
        .identities()
        .into_iter()
        .filter_map(|id| certs.current(&id).map(|held| (id, held)))
        .map(|(id, held)| {
            let left = held.svid.not_after.duration_since(now).unwrap_or_default();
            json!({
                "identity": id.to_string(),
                "not_after_unix": trellis_identity::svid::to_unix(held.svid.not_after),
                "seconds_left": left.as_secs(),
            })
        })
        .collect();
    json!({ "certificates": list })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops ztunnel");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
