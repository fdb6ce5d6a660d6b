//! `trellis lab up`: network, manifests, trellisd per cluster, ztunnel per node (joined with a
//! one-time token), then the pods' processes, each step waiting until the previous one serves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use trellis_admin::client::get_blocking;

use super::netns::{accepts, in_netns};
use super::plan::{self, ClusterPlan, NodePlan, Plan, PodPlan, PodRun};
use super::procs::{self, Launch};
use super::spec::{self, Topology};
use super::state::{self, State};
use super::{manifests, net};

/// How long trellisd and each ztunnel get to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a pod's server gets to listen.
const SERVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub trellisd: PathBuf,
    pub ztunnel: PathBuf,
    pub trellis: PathBuf,
}

impl Bins {
    /// The three binaries in `dir`, which must all be there.
    pub fn in_dir(dir: &Path) -> anyhow::Result<Bins> {
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
        })
    }
}

/// The name of a process's record and log.
pub fn trellisd_name(c: &ClusterPlan) -> String {
    format!("trellisd-{}", c.name)
}

pub fn ztunnel_name(c: &ClusterPlan, n: &NodePlan) -> String {
    format!("ztunnel-{}-{}", c.name, n.name)
}

pub fn pod_process_name(plan: &Plan, p: &PodPlan) -> String {
    let prefix = format!("tl-{}-", plan.lab);
    format!("pod-{}", p.netns.strip_prefix(&prefix).unwrap_or(&p.netns))
}

/// Every process the plan runs, by record name.
pub fn process_names(plan: &Plan) -> Vec<String> {
    let mut all = Vec::new();
    for c in &plan.clusters {
        all.push(trellisd_name(c));
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
/// the order `up` starts them (trellisd, ztunnels, pods), each waited for as `up` does. A
/// ztunnel resumes with the node SVID it saved in its state directory (its join token is
/// spent). Returns the names restarted.
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
        for n in &c.nodes {
            let name = ztunnel_name(c, n);
            if let Some(argv) = dead(&name) {
                let pid = relaunch(&name, &n.host.netns, argv, env.clone())?;
                wait_ztunnel(n, &name, pid, state)?;
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

fn wait_ztunnel(n: &NodePlan, name: &str, pid: u32, state: &State) -> anyhow::Result<()> {
    let ready = SocketAddr::from((n.host.ip, plan::READY_PORT));
    wait_until(name, pid, &state.log(name), READY_TIMEOUT, || {
        in_netns(&n.host.netns, || {
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
    for c in &plan.clusters {
        let files = manifests::render(plan, c).with_context(|| format!("writing cluster {}'s manifests", c.name))?;
        for (file, text) in files {
            state::write(&state.manifests(&c.name).join(file), &text)?;
        }
        start_trellisd(c, state, bins, &env)?;
    }
    let mut ztunnels = Vec::new();
    for c in &plan.clusters {
        for n in &c.nodes {
            ztunnels.push((n, start_ztunnel(c, n, state, bins, &env)?, ztunnel_name(c, n)));
        }
    }
    // Started together, waited for in turn: the waits overlap.
    for (n, pid, name) in ztunnels {
        wait_ztunnel(n, &name, pid, state)?;
    }
    for c in &plan.clusters {
        for n in &c.nodes {
            for p in &n.pods {
                start_pod(plan, p, state, bins)?;
            }
        }
    }
    state::write(&state.ready(), "")
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

fn start_ztunnel(
    c: &ClusterPlan,
    n: &NodePlan,
    state: &State,
    bins: &Bins,
    env: &[(String, String)],
) -> anyhow::Result<u32> {
    let ca = state.ca(&c.name);
    let out = Command::new(&bins.trellisd)
        .args(["--cluster", &c.name, "--ca-dir", &path(&ca)])
        .args(["token", "create", "--node", &n.name, "--ttl-seconds", "600"])
        .env_remove("TRELLIS_CA_DIR")
        .env_remove("TRELLIS_CLUSTER")
        .output()
        .with_context(|| format!("running {}", bins.trellisd.display()))?;
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || token.is_empty() {
        bail!(
            "`trellisd token create --node {}` for cluster {} failed: {}",
            n.name,
            c.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let token_file = state.token(&c.name, &n.name);
    state::write_secret(&token_file, &format!("{token}\n"))?;
    let argv = vec![
        path(&bins.ztunnel),
        "--node".into(),
        n.name.clone(),
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
        path(&state.node_state(&c.name, &n.name)),
    ];
    // Every node's pod network: an address there that no known workload holds is refused.
    let mut argv = argv;
    for node in &c.nodes {
        argv.push("--mesh-cidr".into());
        argv.push(format!("{}/24", node.pod_cidr));
    }
    argv.extend(c.ztunnel_args.iter().cloned());
    let launch = Launch {
        name: ztunnel_name(c, n),
        netns: n.host.netns.clone(),
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
