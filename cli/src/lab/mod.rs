//! `trellis lab up | down | status | stop`: Trellis on one machine, with clusters of nodes and
//! pods as Linux network namespaces (DESIGN.md, "The lab"; the layout is in deploy/lab/README.md).
//!
//! Read [`spec`] (the topology file) and [`plan`] (the pure address plan) first; [`net`] and
//! [`procs`] do the I/O, recorded in the [`state`] directory so `down` removes exactly that.
//! Two or more clusters make a federation: a wan between them, a real etcd ([`pki`] makes its
//! certificates) and an east-west gateway per cluster ([`up`] runs them and joins the clusters).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

mod manifests;
mod net;
mod netns;
mod pki;
mod plan;
mod procs;
mod report;
mod spec;
mod state;
mod up;

use state::State;

/// The lab verbs.
#[derive(Debug, Subcommand)]
pub enum Lab {
    /// Build the lab (idempotent: a lab that is up and unchanged is left alone; a broken or
    /// changed one is torn down and rebuilt).
    Up(UpArgs),
    /// Remove everything the lab made: processes, network namespaces, the state directory (etcd's
    /// data with it).
    Down(Which),
    /// Show the lab's processes, a federation's etcd and gateways, each node's traffic
    /// counters, the clients' last calls and each cluster's `trellis status`.
    Status(Which),
    /// Stop one of the lab's processes (SIGTERM, then SIGKILL), e.g. a pod's server to watch
    /// the mesh fail over: `trellis lab stop pod-east-demo-hello-v1`. `trellis lab up` starts
    /// it again with its recorded command line.
    Stop(StopArgs),
}

/// `lab stop`'s arguments.
#[derive(Debug, Args)]
pub struct StopArgs {
    #[command(flatten)]
    which: Which,
    /// The process, as `trellis lab status` names it (pod-<cluster>-<namespace>-<pod>,
    /// ztunnel-<cluster>-<node>, trellisd-<cluster>, ...).
    process: String,
}

/// Which lab.
#[derive(Debug, Args)]
pub struct Which {
    /// The lab's name: 1 to 8 of [a-z0-9-]; labs with different names coexist.
    #[arg(long, default_value = "demo")]
    name: String,
    /// Where the lab keeps its state [default: /run/trellis-lab/<name>].
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// `lab up`'s flags.
#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    which: Which,
    /// Topology file (YAML; see deploy/lab/README.md) [default: the built-in demo,
    /// deploy/lab/demo.yaml].
    #[arg(long)]
    file: Option<PathBuf>,
    /// Directory holding the trellisd, ztunnel and trellis binaries [default: the directory of
    /// this trellis].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// The state directory of lab `name` when `--state-dir` is not given.
pub fn default_state_dir(name: &str) -> PathBuf {
    PathBuf::from("/run/trellis-lab").join(name)
}

impl Which {
    fn state(&self) -> State {
        State::new(self.state_dir.clone().unwrap_or_else(|| default_state_dir(&self.name)))
    }
}

/// Runs a lab verb.
pub fn run(verb: Lab) -> ExitCode {
    let (what, result) = match verb {
        Lab::Up(args) => ("lab up", lab_up(&args)),
        Lab::Down(which) => ("lab down", lab_down(&which)),
        Lab::Status(which) => ("lab status", lab_status(&which)),
        Lab::Stop(args) => ("lab stop", lab_stop(&args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trellis {what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a report; a closed pipe (`| head`) is not an error.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn need_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("trellis lab needs root (it creates network namespaces and nftables rules): run it with sudo");
    }
    Ok(())
}

fn lab_up(args: &UpArgs) -> anyhow::Result<ExitCode> {
    let name = &args.which.name;
    spec::check_short_name("lab", name)?;
    let (origin, text) = match &args.file {
        None => ("the built-in demo topology".to_string(), spec::DEMO.to_string()),
        Some(f) => (
            f.display().to_string(),
            std::fs::read_to_string(f).with_context(|| format!("reading --file {}", f.display()))?,
        ),
    };
    let topo = spec::parse(&origin, &text)?;
    let plan = plan::plan(name, &topo).with_context(|| origin.clone())?;
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("finding this trellis binary")?
            .parent()
            .context("finding this trellis binary's directory")?
            .to_path_buf(),
    };
    let bins = up::Bins::in_dir(&bin_dir, plan.federation.is_some())?;
    need_root()?;
    let state = args.which.state();
    if state.exists() && state.check_ours()? {
        if up::is_up(&state, name, &topo, &plan) {
            println!("lab {name} is already up (trellis lab status --name {name})");
            return Ok(ExitCode::SUCCESS);
        }
        if up::is_intact(&state, name, &topo, &plan) {
            let restarted = up::restart_dead(&plan, &state)?;
            println!(
                "lab {name} was up with processes dead; restarted {}",
                restarted.join(", ")
            );
            return Ok(ExitCode::SUCCESS);
        }
        println!("lab {name} exists but is broken or was built from another topology: rebuilding it");
        teardown(&state)?;
    }
    state.create(name, &text)?;
    if let Err(e) = up::build(&plan, &state, &bins) {
        eprintln!("trellis lab up: {e:#}");
        eprintln!("trellis lab up: removing what was built");
        if let Err(t) = teardown(&state) {
            eprintln!("trellis lab up: {t:#}");
        }
        return Ok(ExitCode::FAILURE);
    }
    out(&report::summary(&plan, &state));
    Ok(ExitCode::SUCCESS)
}

fn lab_down(which: &Which) -> anyhow::Result<ExitCode> {
    spec::check_short_name("lab", &which.name)?;
    need_root()?;
    let state = which.state();
    if !state.exists() || !state.check_ours()? {
        println!("lab {} is not up", which.name);
        return Ok(ExitCode::SUCCESS);
    }
    teardown(&state)?;
    println!("lab {} is down", which.name);
    Ok(ExitCode::SUCCESS)
}

fn lab_status(which: &Which) -> anyhow::Result<ExitCode> {
    spec::check_short_name("lab", &which.name)?;
    need_root()?;
    let state = which.state();
    if !state.exists() || !state.check_ours()? {
        eprintln!("lab {} is not up (trellis lab up --name {})", which.name, which.name);
        return Ok(ExitCode::FAILURE);
    }
    let spec_path = state.spec();
    let text = std::fs::read_to_string(&spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let topo = spec::parse(&spec_path.display().to_string(), &text)?;
    let plan = plan::plan(&which.name, &topo)?;
    out(&report::status(&plan, &state));
    Ok(ExitCode::SUCCESS)
}

fn lab_stop(args: &StopArgs) -> anyhow::Result<ExitCode> {
    let which = &args.which;
    spec::check_short_name("lab", &which.name)?;
    need_root()?;
    let state = which.state();
    if !state.exists() || !state.check_ours()? {
        anyhow::bail!("lab {} is not up (trellis lab up --name {})", which.name, which.name);
    }
    let recorded = state.recorded_processes();
    let Some(p) = recorded.iter().find(|p| p.name == args.process) else {
        let names: Vec<&str> = recorded.iter().map(|p| p.name.as_str()).collect();
        anyhow::bail!(
            "lab {} runs no process {:?}; its processes: {}",
            which.name,
            args.process,
            names.join(", ")
        );
    };
    if !procs::is_ours(p) {
        println!(
            "{} (pid {}) is not running; trellis lab up --name {} starts it again",
            p.name, p.pid, which.name
        );
        return Ok(ExitCode::SUCCESS);
    }
    procs::stop_all(std::slice::from_ref(p));
    println!(
        "stopped {} (pid {}); trellis lab up --name {} starts it again",
        p.name, p.pid, which.name
    );
    Ok(ExitCode::SUCCESS)
}

/// Removes everything recorded in `state`: processes (only while their command line still
/// matches), whatever else runs in the lab's namespaces, the namespaces, then the directory.
/// The directory stays when a namespace could not be removed, so `lab down` can be retried.
fn teardown(state: &State) -> anyhow::Result<()> {
    procs::stop_all(&state.recorded_processes());
    let netns = state.recorded_netns();
    for ns in netns.iter().rev() {
        procs::kill_in_netns(ns);
    }
    let mut failed = Vec::new();
    for ns in netns.iter().rev() {
        if let Err(e) = net::delete_netns(ns) {
            failed.push(format!("{e:#}"));
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "could not remove every network namespace ({}); {} is kept so `trellis lab down` can be retried",
            failed.join("; "),
            state.dir.display()
        );
    }
    state.remove()
}
