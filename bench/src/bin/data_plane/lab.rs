//! The benchmark's lab: its topology, bringing it up and down, the netbench servers and
//! clients inside the pods' namespaces, and the checks that each path goes where it should.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::check_interrupted;
pub(crate) use trellis_bench::procs::{in_netns, metric_sum, ztunnel_pid};

/// The lab's name; every namespace it makes starts with `tl-bench-`.
pub(crate) const LAB: &str = "bench";
/// Topology: pods on node n are 10.1.n.(10+i), i their index among that node's pods. A ztunnel
/// learns a remote pod only as the endpoint of a service, so each server backs one; the clients
/// still call the pod's address.
pub(crate) const TOPOLOGY: &str = "\
clusters:
  - {name: east, nodes: 2}
namespaces:
  - {name: plain, ambient: false}
  - {name: mesh, ambient: true}
services:
  - {name: psrv, namespace: plain, port: 9000, selector: {app: psrv}}
  - {name: msrv, namespace: mesh, port: 9000, selector: {app: msrv}}
pods:
  - {name: pcli, namespace: plain, node: node-1, serviceAccount: pcli}
  - {name: mcli, namespace: mesh, node: node-1, serviceAccount: mcli}
  - {name: psrv, namespace: plain, node: node-2, serviceAccount: psrv, labels: {app: psrv}}
  - {name: msrv, namespace: mesh, node: node-2, serviceAccount: msrv, labels: {app: msrv}}
";
pub(crate) const NODE_1: &str = "tl-bench-east-node-1";
pub(crate) const NODE_2: &str = "tl-bench-east-node-2";
/// ztunnel's metrics, inside a node's namespace.
pub(crate) const METRICS: &str = "127.0.0.1:15020";
pub(crate) const SERVER_PORT: u16 = 9000;

/// A client pod, the server pod it calls, and the server's address.
pub(crate) struct Route {
    pub(crate) name: &'static str,
    pub(crate) client_netns: &'static str,
    pub(crate) server_netns: &'static str,
    pub(crate) server: &'static str,
}

pub(crate) const DIRECT: Route = Route {
    name: "direct",
    client_netns: "tl-bench-east-plain-pcli",
    server_netns: "tl-bench-east-plain-psrv",
    server: "10.1.2.10:9000",
};
/// The direct client again, through a relay in node-1's namespace and another in node-2's, to
/// the direct server: see [`start_relays`].
pub(crate) const RELAYED: Route = Route {
    name: "relays",
    client_netns: "tl-bench-east-plain-pcli",
    server_netns: "tl-bench-east-plain-psrv",
    server: RELAY_1,
};
/// Where the relays listen: each node's address on the cluster network (node n is 10.1.0.(10+n)).
const RELAY_1: &str = "10.1.0.11:15101";
const RELAY_2: &str = "10.1.0.12:15102";

pub(crate) const MESH: Route = Route {
    name: "mesh",
    client_netns: "tl-bench-east-mesh-mcli",
    server_netns: "tl-bench-east-mesh-msrv",
    server: "10.1.2.11:9000",
};

/// The lab, taken down when dropped (on success, error or panic).
pub(crate) struct Lab {
    trellis: PathBuf,
    state_dir: PathBuf,
    file: PathBuf,
    bin: PathBuf,
    log_level: String,
}

impl Lab {
    /// Takes down what a previous run left in `work`, then builds the benchmark's lab.
    pub(crate) fn up(bin: &Path, work: &Path, log_level: &str) -> anyhow::Result<Lab> {
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let file = work.join("topology.yaml");
        std::fs::write(&file, TOPOLOGY).with_context(|| format!("writing {}", file.display()))?;
        let lab = Lab {
            trellis: bin.join("trellis"),
            state_dir: work.join("state"),
            file,
            bin: bin.to_path_buf(),
            log_level: log_level.to_string(),
        };
        lab.down().context("removing the lab a previous run left")?;
        lab.run_up()?;
        Ok(lab)
    }

    /// `trellis lab up`: builds the lab, or restarts whatever of it is dead.
    fn run_up(&self) -> anyhow::Result<()> {
        let out = Command::new(&self.trellis)
            .args(["lab", "up", "--name", LAB, "--file"])
            .arg(&self.file)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bin-dir")
            .arg(&self.bin)
            .env("RUST_LOG", &self.log_level)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} lab up", self.trellis.display()))?;
        if !out.status.success() {
            bail!(
                "trellis lab up failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Kills both ztunnels and starts them again from the lab's `ztunnel` (which the caller may
    /// have pointed at another binary), then waits until the mesh path carries a connection.
    pub(crate) fn restart_ztunnels(&self) -> anyhow::Result<()> {
        for node in [NODE_1, NODE_2] {
            let pid = ztunnel_pid(node)?;
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "ztunnel {pid} in {node} outlived SIGKILL by 10 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.run_up()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            check_interrupted()?;
            match one_exchange(&MESH) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("the mesh path after restarting the ztunnels"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn down(&self) -> anyhow::Result<()> {
        let out = Command::new(&self.trellis)
            .args(["lab", "down", "--name", LAB, "--state-dir"])
            .arg(&self.state_dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} lab down", self.trellis.display()))?;
        if !out.status.success() {
            bail!(
                "trellis lab down --name {LAB} --state-dir {} failed ({}): {}",
                self.state_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("data_plane: {e:#}");
        }
    }
}

/// The netbench servers, killed when dropped.
pub(crate) struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `netbench server` in each path's server pod and waits until both accept.
pub(crate) fn start_servers(bin: &Path) -> anyhow::Result<Servers> {
    let mut servers = Servers(Vec::new());
    for path in [&DIRECT, &MESH] {
        let child = Command::new("ip")
            .args(["netns", "exec", path.server_netns])
            .arg(bin.join("netbench"))
            .args(["server", "--listen", &format!("0.0.0.0:{SERVER_PORT}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting netbench server in {}", path.server_netns))?;
        servers.0.push(child);
    }
    let local = SocketAddr::from(([127, 0, 0, 1], SERVER_PORT));
    for (path, child) in [&DIRECT, &MESH].into_iter().zip(&mut servers.0) {
        wait_listening(child, path.server_netns, local)?;
    }
    Ok(servers)
}

/// Waits until `addr` accepts connections inside `ns`, where `child` should be listening.
fn wait_listening(child: &mut Child, ns: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !in_netns(ns, || Ok(TcpStream::connect(addr).is_ok()))? {
        if let Some(status) = child.try_wait()? {
            bail!("netbench in {ns} exited: {status}");
        }
        if Instant::now() > deadline {
            bail!("netbench in {ns} did not listen on {addr}");
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts `netbench relay` in node-1's namespace (to node-2's relay) and in node-2's (to the
/// direct server), and waits until both accept. Nothing enrolled is on that path, so neither
/// ztunnel touches it: it is the two hops of the mesh path, with zero-copy forwarding and no TLS
/// or HTTP/2, so the cheapest two-hop proxy there can be.
pub(crate) fn start_relays(bin: &Path) -> anyhow::Result<Servers> {
    let mut relays = Servers(Vec::new());
    for (node, listen, to) in [(NODE_2, RELAY_2, DIRECT.server), (NODE_1, RELAY_1, RELAY_2)] {
        let child = Command::new("ip")
            .args(["netns", "exec", node])
            .arg(bin.join("netbench"))
            .args(["relay", "--listen", listen, "--to", to])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting netbench relay in {node}"))?;
        relays.0.push(child);
        let child = relays.0.last_mut().context("the relay just started")?;
        wait_listening(child, node, listen.parse()?)?;
    }
    Ok(relays)
}

/// Runs one netbench client in `path`'s client pod and parses the JSON it prints.
pub(crate) fn netbench<T: serde::de::DeserializeOwned>(bin: &Path, path: &Route, args: &[&str]) -> anyhow::Result<T> {
    check_interrupted()?;
    let args = [args, &["--to", path.server]].concat();
    let (parsed, stderr) = match trellis_bench::results::netbench(bin, path.client_netns, &args) {
        Ok(done) => done,
        Err(e) => {
            check_interrupted()?;
            return Err(e.context(format!("over the {} path", path.name)));
        }
    };
    for line in stderr.lines() {
        println!("    {}: {line}", path.name);
    }
    Ok(parsed)
}

/// One connection-rate exchange from `path`'s client pod: 64 bytes each way, then the close.
pub(crate) fn one_exchange(path: &Route) -> anyhow::Result<()> {
    let to: SocketAddr = path.server.parse()?;
    in_netns(path.client_netns, || {
        let mut tcp =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).with_context(|| format!("connecting to {to}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut request = [0u8; 64];
        request[0] = b'C';
        tcp.write_all(&request)?;
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest)
            .with_context(|| format!("reading the answer of {to}"))?;
        anyhow::ensure!(rest.len() == 64, "{to} answered {} bytes, not 64", rest.len());
        Ok(())
    })
    .with_context(|| format!("one {} connection from {}", path.name, path.client_netns))
}

/// ztunnel's metrics page in node namespace `node`.
pub(crate) fn scrape(node: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = METRICS.parse()?;
    in_netns(node, || {
        let (status, body) = trellis_admin::client::get_blocking(addr, "/metrics", Duration::from_secs(5))?;
        anyhow::ensure!(status == 200, "answered {status}: {}", body.trim());
        Ok(body)
    })
    .with_context(|| format!("scraping http://{METRICS}/metrics in {node}"))
}

pub(crate) const OPENED: &str = "trellis_tcp_connections_opened_total";

/// Proves the two paths are what they claim: a direct connection leaves node-1's ztunnel alone,
/// a mesh connection is counted by it as mutual TLS.
pub(crate) fn check_paths() -> anyhow::Result<()> {
    let before = metric_sum(&scrape(NODE_1)?, OPENED, None);
    one_exchange(&DIRECT)?;
    std::thread::sleep(Duration::from_millis(300));
    let after = metric_sum(&scrape(NODE_1)?, OPENED, None);
    if after != before {
        bail!("the direct path went through node-1's ztunnel ({OPENED} went from {before} to {after})");
    }
    one_exchange(&MESH)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text = scrape(NODE_1)?;
        if metric_sum(&text, OPENED, Some(("connection_security_policy", "mutual_tls"))) > 0.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            let ours: Vec<&str> = text.lines().filter(|l| l.starts_with(OPENED)).collect();
            bail!(
                "the mesh path is not meshed: node-1's ztunnel counts no {OPENED} with connection_security_policy=\"mutual_tls\" after a connection from {} to {} (its samples: {ours:?})",
                MESH.client_netns,
                MESH.server
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
