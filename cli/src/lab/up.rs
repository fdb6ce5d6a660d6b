//! `trellis lab up`: network, manifests, trellisd per cluster, ztunnel per node (joined with a
//! one-time token), then the pods' processes, each step waiting until the previous one serves.
//!
//! A lab of several clusters is a federation: etcd comes first (its certificates, then
//! `trellis federation grant` for every cluster, which also turns etcd's authentication on), an
//! east-west gateway ztunnel per cluster starts with the nodes' ztunnels, each cluster runs
//! `trellis federation join` once they are ready, and `up` ends when every trellisd has synced
//! with every member.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use trellis_admin::client::get_blocking;
use trellis_federation::access;

use super::netns::{accepts, in_netns};
use super::plan::{self, ClusterPlan, FederationPlan, GatewayPlan, Host, NodePlan, Plan, PodPlan, PodRun};
use super::procs::{self, Launch};
use super::spec::{self, Topology};
use super::state::{self, State};
use super::{manifests, net, pki};

/// How long etcd, trellisd and each ztunnel get to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a pod's server gets to listen.
const SERVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long every cluster of a federation gets, in all, to sync with every member.
const FEDERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// The record (and log) name of a federation's etcd.
pub const ETCD_NAME: &str = "etcd";
/// etcd's superuser (its certificate's CN), which `federation grant` runs as.
const ROOT_USER: &str = "root";
/// What etcd logs, once per start, when it serves clients.
const ETCD_SERVING: &str = "serving client traffic";
/// etcd's peer URL: a single member, on its namespace's loopback.
const ETCD_PEER_URL: &str = "http://127.0.0.1:2380";

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub trellisd: PathBuf,
    pub ztunnel: PathBuf,
    pub trellis: PathBuf,
    /// Debian's etcd, from PATH: only for a lab of several clusters.
    pub etcd: Option<PathBuf>,
}

impl Bins {
    /// The three binaries in `dir`, which must all be there; with `etcd`, also etcd (from PATH).
    pub fn in_dir(dir: &Path, etcd: bool) -> anyhow::Result<Bins> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("--bin-dir {}", dir.display()))?;
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                bail!(
                    "{} is missing: build it (cargo build --bins) or point --bin-dir at the directory holding trellisd, ztunnel and trellis",
                    path.display()
                )
            }
        };
        Ok(Bins {
            trellisd: find("trellisd")?,
            ztunnel: find("ztunnel")?,
            trellis: find("trellis")?,
            etcd: if etcd { Some(find_etcd()?) } else { None },
        })
    }
}

/// The `etcd` binary on PATH (or in /usr/bin, where Debian's etcd-server puts it).
fn find_etcd() -> anyhow::Result<PathBuf> {
    let search = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&search)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .context(
            "etcd is missing: a lab of several clusters runs one for the federation; install Debian's \
             etcd-server (bash deploy/install-deps.sh) or put etcd on PATH",
        )?;
    found
        .canonicalize()
        .with_context(|| format!("finding etcd at {}", found.display()))
}

/// The name of a process's record and log.
pub fn trellisd_name(c: &ClusterPlan) -> String {
    format!("trellisd-{}", c.name)
}

pub fn ztunnel_name(c: &ClusterPlan, n: &NodePlan) -> String {
    format!("ztunnel-{}-{}", c.name, n.name)
}

/// The east-west gateway's ztunnel of cluster `c`.
pub fn gateway_name(c: &ClusterPlan) -> String {
    format!("ztunnel-{}-gw", c.name)
}

pub fn pod_process_name(plan: &Plan, p: &PodPlan) -> String {
    let prefix = format!("tl-{}-", plan.lab);
    format!("pod-{}", p.netns.strip_prefix(&prefix).unwrap_or(&p.netns))
}

/// Every process the plan runs, by record name.
pub fn process_names(plan: &Plan) -> Vec<String> {
    let mut all = Vec::new();
    if plan.federation.is_some() {
        all.push(ETCD_NAME.to_string());
    }
    for c in &plan.clusters {
        all.push(trellisd_name(c));
        if plan.gateway(c).is_some() {
            all.push(gateway_name(c));
        }
        for n in &c.nodes {
            all.push(ztunnel_name(c, n));
            all.extend(
                n.pods
                    .iter()
                    .filter(|p| p.run.is_some())
                    .map(|p| pod_process_name(plan, p)),
            );
        }
    }
    all.sort();
    all
}

/// Whether the lab in `state` was built from `topo` and everything it recorded is alive.
pub fn is_up(state: &State, lab: &str, topo: &Topology, plan: &Plan) -> bool {
    is_intact(state, lab, topo, plan) && state.recorded_processes().iter().all(procs::is_ours)
}

/// Whether the lab in `state` was built, completely, from `topo`: its namespaces are all there
/// and every process it runs was recorded, though some may have died since.
pub fn is_intact(state: &State, lab: &str, topo: &Topology, plan: &Plan) -> bool {
    let same_spec = std::fs::read_to_string(state.spec())
        .ok()
        .and_then(|t| spec::parse("spec.yaml", &t).ok())
        .is_some_and(|t| &t == topo);
    let same_lab = std::fs::read_to_string(state.lab_name()).is_ok_and(|t| t.trim() == lab);
    let mut netns = state.recorded_netns();
    let mut planned = plan.netns();
    netns.sort();
    planned.sort();
    let all_netns = netns == planned && netns.iter().all(|n| net::netns_exists(n));
    let names: Vec<String> = state.recorded_processes().into_iter().map(|p| p.name).collect();
    state.ready().exists() && same_spec && same_lab && all_netns && names == process_names(plan)
}

/// Starts again, with the command line recorded, every process of an intact lab that died, in
/// the order `up` starts them (etcd, trellisd, ztunnels and gateways, pods), each waited for as
/// `up` does. A ztunnel resumes with the node SVID it saved in its state directory (its join
/// token is spent); etcd with its data; a trellisd rejoins from the federation manifest in its
/// manifest directory. Returns the names restarted.
pub fn restart_dead(plan: &Plan, state: &State) -> anyhow::Result<Vec<String>> {
    let recorded = state.recorded_processes();
    let dead = |name: &str| {
        recorded
            .iter()
            .find(|p| p.name == name)
            .filter(|p| !procs::is_ours(p))
            .map(|p| p.argv.clone())
    };
    let log_level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let env = vec![("RUST_LOG".to_string(), log_level)];
    let relaunch = |name: &str, netns: &str, argv: Vec<String>, env: Vec<(String, String)>| {
        procs::start(
            state,
            &Launch {
                name: name.to_string(),
                netns: netns.to_string(),
                argv,
                env,
            },
        )
    };
    let mut restarted = Vec::new();
    if let Some(f) = &plan.federation {
        if let Some(argv) = dead(ETCD_NAME) {
            let served = etcd_serving_count(&state.log(ETCD_NAME));
            let pid = relaunch(ETCD_NAME, &f.etcd.netns, argv, Vec::new())?;
            wait_etcd(f, pid, served, state)?;
            restarted.push(ETCD_NAME.to_string());
        }
    }
    for c in &plan.clusters {
        let name = trellisd_name(c);
        if let Some(argv) = dead(&name) {
            let pid = relaunch(&name, &c.cp.netns, argv, env.clone())?;
            let listen = SocketAddr::from((c.cp.ip, plan::CA_PORT));
            wait_until(&name, pid, &state.log(&name), READY_TIMEOUT, || {
                in_netns(&c.cp.netns, || accepts(listen)).unwrap_or(false)
            })
            .with_context(|| format!("waiting for {name} to listen on {listen}"))?;
            restarted.push(name);
        }
    }
    for c in &plan.clusters {
        if let Some(gw) = plan.gateway(c) {
            let name = gateway_name(c);
            if let Some(argv) = dead(&name) {
                let pid = relaunch(&name, &gw.host.netns, argv, env.clone())?;
                wait_ztunnel(&gw.host, &name, pid, state)?;
                restarted.push(name);
            }
        }
        for n in &c.nodes {
            let name = ztunnel_name(c, n);
            if let Some(argv) = dead(&name) {
                let pid = relaunch(&name, &n.host.netns, argv, env.clone())?;
                wait_ztunnel(&n.host, &name, pid, state)?;
                restarted.push(name);
            }
        }
    }
    for c in &plan.clusters {
        for n in &c.nodes {
            for p in n.pods.iter().filter(|p| p.run.is_some()) {
                let name = pod_process_name(plan, p);
                if let Some(argv) = dead(&name) {
                    relaunch(&name, &p.netns, argv, Vec::new())?;
                    restarted.push(name);
                }
            }
        }
    }
    Ok(restarted)
}

/// Waits until the ztunnel in `host`'s namespace answers 200 on its readiness port.
fn wait_ztunnel(host: &Host, name: &str, pid: u32, state: &State) -> anyhow::Result<()> {
    let ready = SocketAddr::from((host.ip, plan::READY_PORT));
    wait_until(name, pid, &state.log(name), READY_TIMEOUT, || {
        in_netns(&host.netns, || {
            get_blocking(ready, "/healthz/ready", Duration::from_secs(1))
        })
        .is_ok_and(|r| r.is_ok_and(|(status, _)| status == 200))
    })
    .with_context(|| format!("waiting for {name} to answer 200 on http://{ready}/healthz/ready"))
}

/// Builds the lab; on failure the caller tears down what was recorded.
pub fn build(plan: &Plan, state: &State, bins: &Bins) -> anyhow::Result<()> {
    net::build(plan, state)?;
    let log_level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let env = vec![("RUST_LOG".to_string(), log_level)];
    if let Some(f) = &plan.federation {
        start_etcd(plan, f, state, bins).context("starting the federation's etcd")?;
    }
    for c in &plan.clusters {
        let files = manifests::render(plan, c).with_context(|| format!("writing cluster {}'s manifests", c.name))?;
        for (file, text) in files {
            state::write(&state.manifests(&c.name).join(file), &text)?;
        }
        start_trellisd(c, state, bins, &env)?;
    }
    let mut ztunnels = Vec::new();
    for c in &plan.clusters {
        if let Some(gw) = plan.gateway(c) {
            ztunnels.push((&gw.host, start_gateway(c, gw, state, bins, &env)?, gateway_name(c)));
        }
        for n in &c.nodes {
            ztunnels.push((&n.host, start_ztunnel(c, n, state, bins, &env)?, ztunnel_name(c, n)));
        }
    }
    // Started together, waited for in turn: the waits overlap.
    for (host, pid, name) in ztunnels {
        wait_ztunnel(host, &name, pid, state)?;
    }
    if let Some(f) = &plan.federation {
        for c in &plan.clusters {
            let gw = plan
                .gateway(c)
                .with_context(|| format!("cluster {} has no gateway in the plan", c.name))?;
            join(f, c, gw, state, bins).with_context(|| format!("joining cluster {} to the federation", c.name))?;
        }
    }
    for c in &plan.clusters {
        for n in &c.nodes {
            for p in &n.pods {
                start_pod(plan, p, state, bins)?;
            }
        }
    }
    if plan.federation.is_some() {
        wait_federation(plan)?;
    }
    state::write(&state.ready(), "")
}

/// The etcd users the lab makes certificates for: root, the operator, and one per cluster.
fn etcd_users(plan: &Plan) -> Vec<String> {
    let mut users = vec![ROOT_USER.to_string(), access::OPERATOR_USER.to_string()];
    users.extend(plan.clusters.iter().map(|c| access::cluster_user(&c.name)));
    users
}

/// Writes etcd's certificates (keys 0600), starts etcd in its namespace, waits until it serves
/// clients, then grants every cluster its etcd user and role and turns authentication on.
fn start_etcd(plan: &Plan, f: &FederationPlan, state: &State, bins: &Bins) -> anyhow::Result<()> {
    let etcd = bins
        .etcd
        .as_ref()
        .context("etcd was not looked for: a lab of several clusters needs it")?;
    let made = pki::make(IpAddr::V4(f.etcd.ip), &etcd_users(plan))?;
    let pairs = [("ca", &made.ca), ("server", &made.server)]
        .into_iter()
        .chain(made.clients.iter().map(|(user, pem)| (user.as_str(), pem)));
    for (name, pem) in pairs {
        state::write(&state.etcd_cert(name), &pem.cert)?;
        state::write_secret(&state.etcd_key(name), &pem.key)?;
    }
    let url = f.etcd_url();
    let argv: Vec<String> = [
        path(etcd).as_str(),
        "--name",
        "lab",
        "--data-dir",
        &path(&state.etcd_data()),
        "--listen-client-urls",
        &url,
        "--advertise-client-urls",
        &url,
        "--listen-peer-urls",
        ETCD_PEER_URL,
        "--initial-advertise-peer-urls",
        ETCD_PEER_URL,
        "--initial-cluster",
        &format!("lab={ETCD_PEER_URL}"),
        "--cert-file",
        &path(&state.etcd_cert("server")),
        "--key-file",
        &path(&state.etcd_key("server")),
        "--trusted-ca-file",
        &path(&state.etcd_cert("ca")),
        "--client-cert-auth",
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
    ]
    .map(String::from)
    .to_vec();
    let served = etcd_serving_count(&state.log(ETCD_NAME));
    let launch = Launch {
        name: ETCD_NAME.to_string(),
        netns: f.etcd.netns.clone(),
        argv,
        env: Vec::new(),
    };
    let pid = procs::start(state, &launch)?;
    wait_etcd(f, pid, served, state)?;
    grant(plan, f, state, bins)
}

/// How many times etcd's log says it serves clients (the log is appended across restarts).
fn etcd_serving_count(log: &Path) -> usize {
    std::fs::read(log)
        .map(|l| String::from_utf8_lossy(&l).matches(ETCD_SERVING).count())
        .unwrap_or(0)
}

/// Waits until etcd, started after its log said it serves clients `served_before` times, says
/// so once more and accepts connections on its client port.
fn wait_etcd(f: &FederationPlan, pid: u32, served_before: usize, state: &State) -> anyhow::Result<()> {
    let listen = SocketAddr::from((f.etcd.ip, plan::ETCD_PORT));
    let log = state.log(ETCD_NAME);
    wait_until(ETCD_NAME, pid, &log, READY_TIMEOUT, || {
        etcd_serving_count(&log) > served_before && in_netns(&f.etcd.netns, || accepts(listen)).unwrap_or(false)
    })
    .with_context(|| format!("waiting for etcd to serve clients on {}", f.etcd_url()))
}

/// `trellis federation grant` for every cluster, with root's certificate, from etcd's own
/// namespace; the last one also creates root and the operator and enables authentication.
fn grant(plan: &Plan, f: &FederationPlan, state: &State, bins: &Bins) -> anyhow::Result<()> {
    for (i, c) in plan.clusters.iter().enumerate() {
        let mut argv: Vec<String> = [
            path(&bins.trellis).as_str(),
            "federation",
            "grant",
            "--cluster",
            &c.name,
            "--trust-domain",
            &c.trust_domain(),
            "--etcd",
            &f.etcd_url(),
            "--etcd-ca",
            &path(&state.etcd_cert("ca")),
            "--etcd-cert",
            &path(&state.etcd_cert(ROOT_USER)),
            "--etcd-key",
            &path(&state.etcd_key(ROOT_USER)),
        ]
        .map(String::from)
        .to_vec();
        if i + 1 == plan.clusters.len() {
            argv.push("--enable-auth".into());
        }
        let said = procs::run_in_netns(&f.etcd.netns, &argv)
            .with_context(|| format!("granting cluster {} its etcd user", c.name))?;
        eprintln!("lab up: {}", said.trim());
    }
    Ok(())
}

/// `trellis federation join` for cluster `c`, from its control plane's namespace (trellisd's
/// admin endpoint is on its loopback): writes the Federation manifest into the cluster's
/// manifest directory and waits until trellisd has registered the cluster.
fn join(f: &FederationPlan, c: &ClusterPlan, gw: &GatewayPlan, state: &State, bins: &Bins) -> anyhow::Result<()> {
    let user = access::cluster_user(&c.name);
    let mut argv: Vec<String> = [
        path(&bins.trellis).as_str(),
        "federation",
        "join",
        "--cluster",
        &c.name,
        "--etcd",
        &f.etcd_url(),
        "--etcd-ca",
        &path(&state.etcd_cert("ca")),
        "--etcd-cert",
        &path(&state.etcd_cert(&user)),
        "--etcd-key",
        &path(&state.etcd_key(&user)),
        "--network",
        &c.network,
        "--gateway",
        &gw.wan_hbone().to_string(),
    ]
    .map(String::from)
    .to_vec();
    for (flag, value) in [("--region", &c.region), ("--zone", &c.zone)] {
        if !value.is_empty() {
            argv.extend([flag.to_string(), value.clone()]);
        }
    }
    argv.extend([
        "--manifests".to_string(),
        path(&state.manifests(&c.name)),
        "--admin".to_string(),
        SocketAddr::from(([127, 0, 0, 1], plan::ADMIN_PORT)).to_string(),
    ]);
    let said = procs::run_in_netns(&c.cp.netns, &argv)?;
    eprintln!("lab up: {}", said.trim());
    Ok(())
}

/// Waits, [`FEDERATION_TIMEOUT`] in all, until every cluster's trellisd reports what
/// `trellis federation status --wait` waits for, with every cluster of the lab among its
/// members; prints each cluster's progress as it changes.
fn wait_federation(plan: &Plan) -> anyhow::Result<()> {
    let admin = SocketAddr::from(([127, 0, 0, 1], plan::ADMIN_PORT));
    let members: Vec<&str> = plan.clusters.iter().map(|c| c.name.as_str()).collect();
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    for c in &plan.clusters {
        let waited = in_netns(&c.cp.netns, || {
            crate::federation::wait(
                admin,
                deadline.saturating_duration_since(Instant::now()),
                |f| synced_with(f, &members),
                |f| format!("lab up: cluster {}: {}", c.name, sync_progress(f, &members)),
            )
        })
        .with_context(|| format!("cannot enter {}", c.cp.netns))?;
        if let Err((why, last)) = waited {
            bail!(
                "cluster {}'s trellisd had not synced with every member ({}) within {} s ({why}); its federation status:\n{}",
                c.name,
                members.join(", "),
                FEDERATION_TIMEOUT.as_secs(),
                last.map(|f| crate::federation::render(&f)).unwrap_or_default().trim_end()
            );
        }
        eprintln!("lab up: cluster {}: synced with {}", c.name, members.join(", "));
    }
    Ok(())
}

/// The clusters of `clusters` a trellisd's federation status does not list among its members.
fn missing_members<'a>(federation: &Value, clusters: &[&'a str]) -> Vec<&'a str> {
    let members: Vec<&str> = federation["members"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["cluster"].as_str()).collect())
        .unwrap_or_default();
    clusters.iter().copied().filter(|c| !members.contains(c)).collect()
}

/// Whether a trellisd's federation status is synced as `trellis federation status --wait`
/// requires, with every one of `clusters` among its members.
fn synced_with(federation: &Value, clusters: &[&str]) -> bool {
    crate::federation::all_synced(federation) && missing_members(federation, clusters).is_empty()
}

/// One line on how far a trellisd's federation status is from [`synced_with`].
fn sync_progress(federation: &Value, clusters: &[&str]) -> String {
    if federation["joined"] != Value::Bool(true) {
        return match federation["error"].as_str() {
            Some(e) => format!("not joined: {e}"),
            None => "not joined yet".to_string(),
        };
    }
    let mut line = format!("synced {}, published {}", federation["synced"], federation["published"]);
    let missing = missing_members(federation, clusters);
    if !missing.is_empty() {
        line.push_str(&format!(", waiting for {}", missing.join(", ")));
    }
    if let Some(e) = federation["last_error"].as_str() {
        line.push_str(&format!(" (last error: {e})"));
    }
    line
}

fn start_trellisd(c: &ClusterPlan, state: &State, bins: &Bins, env: &[(String, String)]) -> anyhow::Result<()> {
    let name = trellisd_name(c);
    let ca = state.ca(&c.name);
    let listen = SocketAddr::from((c.cp.ip, plan::CA_PORT));
    let argv = vec![
        path(&bins.trellisd),
        "--cluster".into(),
        c.name.clone(),
        "--ca-dir".into(),
        path(&ca),
        "--manifests".into(),
        path(&state.manifests(&c.name)),
        "--listen".into(),
        listen.to_string(),
        "--admin-listen".into(),
        format!("127.0.0.1:{}", plan::ADMIN_PORT),
    ];
    let argv = [argv, c.trellisd_args.clone()].concat();
    let launch = Launch {
        name: name.clone(),
        netns: c.cp.netns.clone(),
        argv,
        env: env.to_vec(),
    };
    let pid = procs::start(state, &launch)?;
    let root = ca.join("root-cert.pem");
    wait_until(&name, pid, &state.log(&name), READY_TIMEOUT, || {
        root.exists() && in_netns(&c.cp.netns, || accepts(listen)).unwrap_or(false)
    })
    .with_context(|| format!("waiting for {name} to write {} and listen on {listen}", root.display()))
}

/// Where a ztunnel runs and as what.
struct ZtunnelAt<'a> {
    /// Its record's name.
    name: String,
    /// The node it joins as.
    node: &'a str,
    host: &'a Host,
    /// Flags after the common ones, before the topology's `ztunnelArgs`.
    extra: &'a [&'a str],
    /// Flags after the cluster's `ztunnelArgs` (the node's `nodeZtunnelArgs`).
    last: &'a [String],
}

fn start_ztunnel(
    c: &ClusterPlan,
    n: &NodePlan,
    state: &State,
    bins: &Bins,
    env: &[(String, String)],
) -> anyhow::Result<u32> {
    let at = ZtunnelAt {
        name: ztunnel_name(c, n),
        node: &n.name,
        host: &n.host,
        extra: &[],
        last: &n.ztunnel_args,
    };
    launch_ztunnel(c, &at, state, bins, env)
}

/// The cluster's east-west gateway: a node ztunnel's command line, as node
/// [`plan::GATEWAY_NODE`], capturing nothing, in gateway mode.
fn start_gateway(
    c: &ClusterPlan,
    gw: &GatewayPlan,
    state: &State,
    bins: &Bins,
    env: &[(String, String)],
) -> anyhow::Result<u32> {
    let at = ZtunnelAt {
        name: gateway_name(c),
        node: plan::GATEWAY_NODE,
        host: &gw.host,
        extra: &["--capture", "none", "--gateway"],
        last: &[],
    };
    launch_ztunnel(c, &at, state, bins, env)
}

/// Makes a join token for `at.node` and starts its ztunnel in `at.host`'s namespace.
fn launch_ztunnel(
    c: &ClusterPlan,
    at: &ZtunnelAt<'_>,
    state: &State,
    bins: &Bins,
    env: &[(String, String)],
) -> anyhow::Result<u32> {
    let ca = state.ca(&c.name);
    let out = Command::new(&bins.trellisd)
        .args(["--cluster", &c.name, "--ca-dir", &path(&ca)])
        .args(["token", "create", "--node", at.node, "--ttl-seconds", "600"])
        .env_remove("TRELLIS_CA_DIR")
        .env_remove("TRELLIS_CLUSTER")
        .output()
        .with_context(|| format!("running {}", bins.trellisd.display()))?;
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || token.is_empty() {
        bail!(
            "`trellisd token create --node {}` for cluster {} failed: {}",
            at.node,
            c.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let token_file = state.token(&c.name, at.node);
    state::write_secret(&token_file, &format!("{token}\n"))?;
    let argv = vec![
        path(&bins.ztunnel),
        "--node".into(),
        at.node.to_string(),
        "--cluster".into(),
        c.name.clone(),
        "--trust-domain".into(),
        c.trust_domain(),
        "--ca-addr".into(),
        SocketAddr::from((c.cp.ip, plan::CA_PORT)).to_string(),
        "--ca-roots".into(),
        path(&ca.join("root-cert.pem")),
        "--join-token-file".into(),
        path(&token_file),
        "--state-dir".into(),
        path(&state.node_state(&c.name, at.node)),
    ];
    // Every node's pod network: an address there that no known workload holds is refused.
    let mut argv = argv;
    for node in &c.nodes {
        argv.push("--mesh-cidr".into());
        argv.push(format!("{}/24", node.pod_cidr));
    }
    argv.extend(at.extra.iter().map(|s| s.to_string()));
    argv.extend(c.ztunnel_args.iter().cloned());
    argv.extend(at.last.iter().cloned());
    let launch = Launch {
        name: at.name.clone(),
        netns: at.host.netns.clone(),
        argv,
        env: env.to_vec(),
    };
    procs::start(state, &launch)
}

fn start_pod(plan: &Plan, p: &PodPlan, state: &State, bins: &Bins) -> anyhow::Result<()> {
    let trellis = path(&bins.trellis);
    let name = pod_process_name(plan, p);
    let argv: Vec<String> = match &p.run {
        None => return Ok(()),
        Some(PodRun::Server { version, port }) => [
            &trellis,
            "demo",
            "server",
            "--name",
            &p.name,
            "--version",
            version,
            "--listen",
            &format!("0.0.0.0:{port}"),
        ]
        .map(String::from)
        .to_vec(),
        Some(PodRun::Client { url, interval_ms }) => [
            &trellis,
            "demo",
            "client",
            "--url",
            url,
            "--interval-ms",
            &interval_ms.to_string(),
        ]
        .map(String::from)
        .to_vec(),
    };
    let launch = Launch {
        name: name.clone(),
        netns: p.netns.clone(),
        argv,
        env: Vec::new(),
    };
    let pid = procs::start(state, &launch)?;
    if let Some(PodRun::Server { port, .. }) = &p.run {
        let addr = SocketAddr::from((p.ip, *port));
        wait_until(&name, pid, &state.log(&name), SERVER_TIMEOUT, || {
            in_netns(&p.netns, || accepts(addr)).unwrap_or(false)
        })
        .with_context(|| format!("waiting for {name} to listen on {addr}"))?;
    }
    Ok(())
}

/// Polls `ready` until it holds, failing early (with the log's last lines) when the process
/// exits, or after `timeout`.
fn wait_until(
    name: &str,
    pid: u32,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        let tail = || {
            let t = procs::log_tail(log, 15);
            if t.is_empty() {
                "(empty)".to_string()
            } else {
                t
            }
        };
        if !procs::is_alive(pid) {
            bail!("{name} exited; the end of {}:\n{}", log.display(), tail());
        }
        if Instant::now() >= deadline {
            bail!(
                "{name} was not ready after {} s; the end of {}:\n{}",
                timeout.as_secs(),
                log.display(),
                tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn lab(text: &str) -> Plan {
        plan::plan("t", &spec::parse("t", text).unwrap()).unwrap()
    }

    #[test]
    fn a_federation_runs_etcd_and_a_gateway_per_cluster() {
        let p = lab("clusters: [{name: a, nodes: 1}, {name: b, nodes: 2}]");
        assert_eq!(
            process_names(&p),
            [
                "etcd",
                "trellisd-a",
                "trellisd-b",
                "ztunnel-a-gw",
                "ztunnel-a-node-1",
                "ztunnel-b-gw",
                "ztunnel-b-node-1",
                "ztunnel-b-node-2",
            ]
        );
        assert_eq!(
            etcd_users(&p),
            ["root", "trellis-operator", "trellis-cluster-a", "trellis-cluster-b"]
        );
        let one = lab("clusters: [{name: a, nodes: 1}]");
        assert_eq!(process_names(&one), ["trellisd-a", "ztunnel-a-node-1"]);
    }

    fn member(cluster: &str) -> Value {
        json!({"cluster": cluster, "bundle": true})
    }

    #[test]
    fn up_waits_until_every_cluster_is_a_synced_member() {
        let clusters = ["east", "west"];
        let mut f = json!({
            "joined": true, "synced": true, "published": true, "stale_since_unix": null,
            "members": [member("east")],
        });
        assert!(
            crate::federation::all_synced(&f),
            "what federation status --wait accepts"
        );
        assert!(!synced_with(&f, &clusters), "west is not a member yet");
        assert_eq!(
            sync_progress(&f, &clusters),
            "synced true, published true, waiting for west"
        );
        f["members"] = json!([member("east"), member("west")]);
        assert!(synced_with(&f, &clusters));
        f["stale_since_unix"] = json!(1700000000);
        assert!(!synced_with(&f, &clusters));
        let not_joined = json!({"joined": false, "error": "no etcd"});
        assert!(!synced_with(&not_joined, &clusters));
        assert_eq!(sync_progress(&not_joined, &clusters), "not joined: no etcd");
    }
}
