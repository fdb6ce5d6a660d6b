//! A node for capture tests, built from network namespaces: `node` (ztunnel, nftables), `pod`
//! (an enrolled workload, 10.77.1.10, routed through the node) and `ext` (a server outside the
//! mesh, 10.77.2.10, behind the node). ztunnel runs from a static config with an offline SVID,
//! and runs nft through a wrapper the test steers: fail the next N calls, fail every call, or
//! hang the next call. Everything (processes, namespaces, files) is removed on drop, pass or fail.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trellis_identity::{CertificateAuthority, IssuancePolicy, SpiffeId, TrustDomain};

pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 10);
pub const NODE_POD_SIDE: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 10);
/// The node's address towards `ext`: where connections ztunnel makes come from.
pub const NODE_EXT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
pub const EXT_PORT: u16 = 8080;
const TD: &str = "east.trellis.local";

/// The real nft.
pub fn real_nft() -> PathBuf {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nft is not installed (apt-get install nftables)")
}

/// Runs a command, panicking with its stderr if it fails.
pub fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    assert!(
        out.status.success(),
        "{bin} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted (after killing whatever still runs in it) on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub use trellis_e2e::in_netns;

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` with `what` and
/// `context()` (e.g. ztunnel's log).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP/1.1 GET on loopback inside `ns`: status and body.
pub fn http_get(ns: &str, port: u16, path: &str) -> Option<(u16, String)> {
    in_netns(ns, || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    })
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A TCP server in `ext` that answers each connection with one line and records who called.
pub struct Server {
    pub callers: Arc<Mutex<Vec<IpAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &str) -> Server {
        let listener = in_netns(ns, || TcpListener::bind((EXT_IP, EXT_PORT))).expect("server listener");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let callers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (callers, stop) = (callers.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((mut tcp, peer)) => {
                            callers.lock().unwrap().push(peer.ip());
                            let _ = tcp.set_nonblocking(false);
                            let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut line = [0u8; 256];
                            let _ = tcp.read(&mut line);
                            let _ = writeln!(tcp, "hello {}", peer.ip());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Server {
            callers,
            stop,
            thread: Some(thread),
        }
    }

    pub fn callers(&self) -> Vec<IpAddr> {
        self.callers.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The whole setup of one test.
pub struct Node {
    ztunnel: Option<Child>,
    pub server: Option<Server>,
    pub node: Netns,
    pub pod: Netns,
    pub ext: Netns,
    pub dir: tempfile::TempDir,
    /// What the wrapper's hung call runs, to find it in /proc.
    pub hang_marker: String,
}

impl Node {
    /// Builds the namespaces and the files; `tag` (a few letters) keeps names apart between
    /// tests running at once.
    pub fn new(tag: &str) -> Node {
        let base = format!("ztc-{tag}-{}", std::process::id());
        let (node, pod, ext) = (
            Netns::new(format!("{base}-node")),
            Netns::new(format!("{base}-pod")),
            Netns::new(format!("{base}-ext")),
        );
        for (peer, inside, outside, node_ip, peer_ip) in [
            (&pod, "vpod", "eth0", NODE_POD_SIDE, POD_IP),
            (&ext, "vext", "eth0", NODE_EXT_SIDE, EXT_IP),
        ] {
            run(
                "ip",
                &[
                    "-n", &node.0, "link", "add", inside, "type", "veth", "peer", "name", outside, "netns", &peer.0,
                ],
            );
            run(
                "ip",
                &["-n", &node.0, "addr", "add", &format!("{node_ip}/24"), "dev", inside],
            );
            run("ip", &["-n", &node.0, "link", "set", inside, "up"]);
            run(
                "ip",
                &["-n", &peer.0, "addr", "add", &format!("{peer_ip}/24"), "dev", outside],
            );
            run("ip", &["-n", &peer.0, "link", "set", outside, "up"]);
            run(
                "ip",
                &["-n", &peer.0, "route", "add", "default", "via", &node_ip.to_string()],
            );
        }
        run(
            "ip",
            &["netns", "exec", &node.0, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        );
        let dir = tempfile::tempdir().expect("temp dir");
        static NODES: AtomicU32 = AtomicU32::new(0);
        let hang_marker = format!(
            "2999.{}{:03}",
            std::process::id(),
            NODES.fetch_add(1, Ordering::Relaxed)
        );
        let server = Some(Server::start(&ext.0));
        let this = Node {
            ztunnel: None,
            server,
            node,
            pod,
            ext,
            dir,
            hang_marker,
        };
        this.write_files();
        this
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_files(&self) {
        let wrapper = format!(
            r#"#!/bin/sh
# nft for tests: counts calls; fails while nft-fail holds a positive count or nft-fail-always
# exists; hangs once (in a child process of its own) when nft-hang exists.
dir="{dir}"
echo "$*" >> "$dir/nft-calls"
if [ -e "$dir/nft-hang" ]; then
    rm -f "$dir/nft-hang"
    sleep {marker}
fi
if [ -e "$dir/nft-fail-always" ]; then
    echo "nft (test wrapper): failing on purpose" >&2
    exit 1
fi
n=$(cat "$dir/nft-fail" 2>/dev/null || echo 0)
if [ "$n" -gt 0 ]; then
    echo $((n - 1)) > "$dir/nft-fail"
    echo "nft (test wrapper): failing on purpose" >&2
    exit 1
fi
exec {nft} "$@"
"#,
            dir = self.dir.path().display(),
            marker = self.hang_marker,
            nft = real_nft().display(),
        );
        std::fs::write(self.path("nft"), wrapper).expect("nft wrapper");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.path("nft"), std::fs::Permissions::from_mode(0o755)).expect("chmod");

        let manifest = format!(
            "apiVersion: v1
kind: Namespace
metadata: {{name: app, labels: {{trellis.io/dataplane-mode: ambient}}}}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {{name: client, namespace: app}}
spec: {{serviceAccount: client, node: node-1, ip: {POD_IP}, nodeIP: {NODE_POD_SIDE}}}
"
        );
        std::fs::write(self.path("mesh.yaml"), manifest).expect("manifest");

        let td = TrustDomain::new(TD).unwrap();
        let ca_dir = self.path("ca");
        let ca = CertificateAuthority::load_or_create(&ca_dir, &td, IssuancePolicy::default()).expect("CA");
        let id = SpiffeId::parse(&format!("spiffe://{TD}/ns/app/sa/client")).unwrap();
        let svid = ca.issue_svid(&id, Duration::from_secs(3600)).expect("SVID");
        std::fs::write(self.path("client.pem"), svid.to_pem()).expect("SVID file");
    }

    /// Makes the wrapper fail its next `n` calls.
    pub fn fail_next(&self, n: u32) {
        std::fs::write(self.path("nft-fail"), n.to_string()).expect("nft-fail");
    }

    /// Makes the wrapper fail every call (`true`) or none (`false`).
    pub fn fail_always(&self, on: bool) {
        let flag = self.path("nft-fail-always");
        match on {
            true => std::fs::write(flag, "").expect("nft-fail-always"),
            false => std::fs::remove_file(flag).expect("removing nft-fail-always"),
        }
    }

    /// Makes the wrapper's next call hang.
    pub fn hang_next(&self) {
        std::fs::write(self.path("nft-hang"), "").expect("nft-hang");
    }

    /// Every call the wrapper saw, one line each (its arguments).
    pub fn nft_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("nft-calls"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Starts ztunnel in the node namespace, capturing pods, nft through the wrapper.
    pub fn start_ztunnel(&mut self, nft_timeout_ms: u64, check_ms: u64) {
        let log = std::fs::File::create(self.path("ztunnel.log")).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node.0, env!("CARGO_BIN_EXE_ztunnel")])
            .args([
                "--node",
                "node-1",
                "--cluster",
                "east",
                "--trust-domain",
                TD,
                "--capture",
                "pod",
            ])
            .arg("--ca-roots")
            .arg(self.path("ca").join("root-cert.pem"))
            .arg("--config-file")
            .arg(self.path("mesh.yaml"))
            .arg("--identity-file")
            .arg(self.path("client.pem"))
            .arg("--nft-path")
            .arg(self.path("nft"))
            .args(["--nft-timeout-ms", &nft_timeout_ms.to_string()])
            .args(["--capture-check-ms", &check_ms.to_string()])
            .env("RUST_LOG", "info")
            .env_remove("TRELLIS_NFT")
            .env_remove("TRELLIS_CAPTURE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting ztunnel");
        self.ztunnel = Some(child);
    }

    /// ztunnel's log so far.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.path("ztunnel.log")).unwrap_or_default();
        format!("--- ztunnel log\n{log}\n--- nft calls\n{}", self.nft_calls().join("\n"))
    }

    /// `/healthz/ready`: status and body.
    pub fn readiness(&self) -> Option<(u16, String)> {
        http_get(&self.node.0, 15021, "/healthz/ready")
    }

    /// The Prometheus text of ztunnel.
    pub fn metrics(&self) -> Option<String> {
        http_get(&self.node.0, 15020, "/metrics").map(|(_, body)| body)
    }

    /// One sample of ztunnel's metrics (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics().and_then(|m| sample(&m, name)).unwrap_or(0.0)
    }

    /// Waits until readiness answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        wait_for(
            "readiness 200",
            timeout,
            || self.log(),
            || self.readiness().filter(|(status, _)| *status == 200),
        );
    }

    /// The installed table, read with the real nft: `nft -j list table ip trellis`.
    pub fn installed_json(&self) -> String {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.node.0,
                &real_nft().to_string_lossy(),
                "-j",
                "list",
                "table",
                "ip",
                "trellis",
            ],
        )
    }

    /// Runs the real nft in the node namespace (to tamper with the rules).
    pub fn nft(&self, args: &[&str]) {
        let nft = real_nft();
        let mut all = vec!["netns", "exec", &self.node.0, nft.to_str().unwrap()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// The pod connects to the server outside the mesh and sends a line: the server's answer,
    /// or the error (refused, reset).
    pub fn call_from_pod(&self) -> Result<String, std::io::Error> {
        in_netns(&self.pod.0, || {
            let addr = SocketAddr::from((EXT_IP, EXT_PORT));
            let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
            tcp.write_all(b"secret-plaintext\n")?;
            let mut answer = String::new();
            tcp.read_to_string(&mut answer)?;
            match answer.is_empty() {
                true => Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "closed without an answer",
                )),
                false => Ok(answer),
            }
        })
    }

    /// Whether a process whose command line holds `marker` is alive anywhere.
    pub fn process_running(marker: &str) -> bool {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|cmd| String::from_utf8_lossy(&cmd).contains(marker))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.ztunnel.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.server.take();
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
    }
}
