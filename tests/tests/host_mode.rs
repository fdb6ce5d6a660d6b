//! Host mode end to end: a "VM" (a network namespace on the cluster bridge, outside any node)
//! runs its own ztunnel with `--capture host`, the host being its one workload, next to the lab's
//! pods. Once configured by trellisd (join token, config stream), once with no control plane at
//! all (a static manifest file and an SVID issued offline with `trellis identity issue`).
//!
//! Addresses: the VM is 10.1.0.50 on the east bridge (nodes are 10.1.0.11.., trellisd
//! 10.1.0.2); its service `billing` has the VIP 10.101.0.50; the pods' service `web` gets the
//! lab's first VIP, 10.101.0.10.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_e2e::lab::{metric_sum, Lab};
use trellis_e2e::sniff::Sniffer;
use trellis_e2e::{bin_dir, binary, create_token, in_netns};

const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 1}
namespaces:
  - {name: mesh, ambient: true}
services:
  - {name: web, namespace: mesh, port: 80, targetPort: 8080, selector: {app: web}}
pods:
  - {name: alpha, namespace: mesh, node: node-1, serviceAccount: alpha}
  - {name: web, namespace: mesh, node: node-1, serviceAccount: web, labels: {app: web}, run: {server: {version: v1, port: 8080}}}
"#;

const VM_IP: &str = "10.1.0.50";
const BILLING_VIP: &str = "http://10.101.0.50";
const WEB_VIP: &str = "http://10.101.0.10";
const BILLING_ID: &str = "spiffe://east.trellis.local/ns/legacy/sa/billing";

/// The VM's workload and service, as trellisd (and the static file) read them.
fn vm_manifest(node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: legacy, labels: {{trellis.io/dataplane-mode: ambient}}}}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {{name: billing-vm, namespace: legacy, labels: {{app: billing}}}}
spec: {{serviceAccount: billing, node: {node}, ip: {VM_IP}, nodeIP: {VM_IP}}}
---
apiVersion: v1
kind: Service
metadata: {{name: billing, namespace: legacy}}
spec:
  selector: {{app: billing}}
  clusterIP: 10.101.0.50
  ports:
    - {{name: tcp, port: 80, targetPort: 8080}}
"
    )
}

/// A host on the cluster bridge with its processes; removed when dropped (before the lab, which
/// owns the bridge), even when the test fails.
struct Vm {
    netns: String,
    children: Vec<Child>,
    log_dir: tempfile::TempDir,
}

impl Vm {
    fn attach(lab: &Lab) -> Vm {
        let netns = format!("tl-{}-east-vm", lab.name);
        let vm = Vm {
            netns: netns.clone(),
            children: Vec::new(),
            log_dir: tempfile::tempdir().expect("temp dir"),
        };
        let uplink = format!("tl{}vm", lab.name);
        let u = lab.underlay_ns();
        run("ip", &["netns", "add", &netns]);
        run(
            "ip",
            &[
                "-n", &u, "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        );
        run("ip", &["-n", &u, "link", "set", &uplink, "master", "br-east", "up"]);
        run(
            "ip",
            &["-n", &netns, "addr", "add", &format!("{VM_IP}/24"), "dev", "eth0"],
        );
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        run("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        // Service VIPs are virtual: any route lets a connect reach the capture rules.
        run("ip", &["-n", &netns, "route", "add", "default", "dev", "eth0"]);
        vm
    }

    /// Starts a workspace binary in the VM, logging to `<name>.log`.
    fn start(&mut self, name: &str, bin: &str, args: &[String]) {
        let log = std::fs::File::create(self.log(name)).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin_dir().join(bin))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting a process in the VM");
        self.children.push(child);
    }

    fn log(&self, name: &str) -> PathBuf {
        self.log_dir.path().join(format!("{name}.log"))
    }

    fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.log(n)).unwrap_or_default();
        format!("--- ztunnel\n{}\n--- billing\n{}", read("ztunnel"), read("billing"))
    }

    /// Waits for the VM's ztunnel to be ready, with its log in the panic message if it is not.
    fn wait_ready(&self, lab: &Lab) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while lab
            .call(&self.netns, "http://127.0.0.1:15021/healthz/ready", 0)
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the VM's ztunnel never got ready\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn metrics(&self, lab: &Lab) -> String {
        lab.call(&self.netns, "http://127.0.0.1:15020/metrics", 0)
            .unwrap_or_else(|e| panic!("scraping the VM's ztunnel: {e}\n{}", self.logs()))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

fn run(bin: &str, args: &[&str]) {
    let out = Command::new(bin).args(args).output().expect("running a command");
    assert!(
        out.status.success(),
        "{bin} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn common_args(lab: &Lab, node: &str) -> Vec<String> {
    let roots = lab.state_dir.join("east/ca/root-cert.pem");
    [
        "--node",
        node,
        "--cluster",
        "east",
        "--trust-domain",
        "east.trellis.local",
        "--capture",
        "host",
        "--ca-roots",
        &roots.to_string_lossy(),
    ]
    .map(String::from)
    .to_vec()
}

fn billing_server() -> Vec<String> {
    [
        "demo",
        "server",
        "--name",
        "billing-vm",
        "--version",
        "v1",
        "--listen",
        "0.0.0.0:8080",
    ]
    .map(String::from)
    .to_vec()
}

/// What both variants must show once the VM's ztunnel is up.
fn check_both_directions(lab: &Lab, vm: &Vm, test: &str) {
    let alpha = lab.pod_ns("east", "mesh", "alpha");
    let marker = format!("marker-{test}-{}", std::process::id());
    let sniffer = Sniffer::start(&lab.underlay_ns()).expect("sniffer in the underlay");

    // A pod calls the VM's service: tunnelled from node-1 to the VM's ztunnel on 15008, which
    // delivers it to the VM's own server (from the VM's own address: the host is its node).
    let to_vm = lab.call_until(
        &alpha,
        &format!("{BILLING_VIP}/{marker}"),
        Duration::from_secs(10),
        |r| r.is_ok(),
    );
    let to_vm = to_vm.unwrap_or_else(|e| panic!("alpha → billing on the VM: {e}\n{}", vm.logs()));
    assert!(to_vm.contains("hello from billing-vm"), "{to_vm}");
    assert!(
        to_vm.contains(&format!("{VM_IP}:")),
        "delivered by the VM's ztunnel: {to_vm}"
    );

    // The VM's own process calls a pod service: captured by the output hook, tunnelled to node-1.
    let from_vm = lab.call_until(
        &vm.netns,
        &format!("{WEB_VIP}/{marker}"),
        Duration::from_secs(10),
        |r| r.is_ok(),
    );
    let from_vm = from_vm.unwrap_or_else(|e| panic!("VM → web: {e}\n{}", vm.logs()));
    assert!(from_vm.contains("hello from web"), "{from_vm}");
    let wire = sniffer.stop();

    let trellisd = std::net::Ipv4Addr::new(10, 1, 0, 2);
    let data: Vec<_> = wire.iter().filter(|s| s.src != trellisd && s.dst != trellisd).collect();
    assert!(
        data.iter().any(|s| s.dport == 15008 && s.dst.to_string() == VM_IP),
        "a tunnel to the VM crossed the wire"
    );
    assert!(
        data.iter().any(|s| s.dport == 15008 && s.src.to_string() == VM_IP),
        "a tunnel from the VM crossed the wire"
    );
    let other: Vec<_> = data.iter().filter(|s| s.dport != 15008 && s.sport != 15008).collect();
    assert!(
        other.is_empty(),
        "only HBONE between the VM and the node, saw {:?}",
        other.first()
    );
    assert!(
        !wire.iter().any(|s| s.carries(marker.as_bytes())),
        "the marker never crossed in plaintext"
    );

    // Both ztunnels saw the other side's workload identity over mutual TLS.
    let node = lab.metrics("east", "node-1");
    let on_node = metric_sum(
        &node,
        "trellis_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", BILLING_ID),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(
        on_node >= 1.0,
        "node-1 counted the VM's call as mutual TLS from billing:\n{node}"
    );
    let on_vm = vm.metrics(lab);
    let inbound = metric_sum(
        &on_vm,
        "trellis_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", "spiffe://east.trellis.local/ns/mesh/sa/alpha"),
        ],
    );
    assert!(inbound >= 1.0, "the VM counted alpha's call:\n{on_vm}");

    // Plaintext from outside the mesh (node-1's own namespace) to the VM is captured on 15006
    // and counted as such; it still arrives, as no policy forbids it.
    let node_ns = lab.node_ns("east", "node-1");
    let plain = lab.call(&node_ns, &format!("http://{VM_IP}:8080/plain"), 0);
    let plain = plain.unwrap_or_else(|e| panic!("node-1 → VM in plaintext: {e}\n{}", vm.logs()));
    assert!(
        plain.contains(&format!("{VM_IP}:")),
        "delivered by the VM's ztunnel, not directly: {plain}"
    );
    let on_vm = vm.metrics(lab);
    let unauthenticated = metric_sum(
        &on_vm,
        "trellis_tcp_connections_opened_total",
        &[("reporter", "destination"), ("connection_security_policy", "none")],
    );
    assert!(unauthenticated >= 1.0, "the VM counted the plaintext call:\n{on_vm}");
}

#[test]
fn a_host_configured_by_trellisd_meshes_both_ways() {
    let lab = Lab::up("e2ehost", TOPOLOGY);
    std::fs::write(lab.manifests("east").join("vm.yaml"), vm_manifest("vm-1")).expect("VM manifest");
    let mut vm = Vm::attach(&lab);
    let token = create_token(&lab.state_dir.join("east/ca"), "vm-1");
    assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
    let token_file = vm.log_dir.path().join("token");
    std::fs::write(&token_file, &token.stdout).expect("token file");
    let mut args = common_args(&lab, "vm-1");
    args.extend(["--ca-addr".into(), "10.1.0.2:15012".into(), "--join-token-file".into()]);
    args.push(token_file.to_string_lossy().into_owned());
    // A connection the host opened before its ztunnel started (as ztunnel's own to trellisd
    // are) must run on untouched once capture starts: only new connections are captured.
    let mut open = EchoConnection::open(&lab, &vm);
    open.round("before capture");
    vm.start("ztunnel", "ztunnel", &args);
    vm.start("billing", "trellis", &billing_server());
    vm.wait_ready(&lab);
    check_both_directions(&lab, &vm, "trellisd");
    open.round("after capture");
}

/// A TCP connection from the VM to an echo server in trellisd's namespace (outside the VM's
/// capture exemptions), opened before the VM's ztunnel runs.
struct EchoConnection {
    tcp: TcpStream,
}

impl EchoConnection {
    fn open(lab: &Lab, vm: &Vm) -> EchoConnection {
        let listener = in_netns(&lab.control_ns("east"), || TcpListener::bind("10.1.0.2:0")).expect("echo listener");
        let addr = listener.local_addr().expect("echo address");
        std::thread::spawn(move || {
            let Ok((mut tcp, _)) = listener.accept() else { return };
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = tcp.read(&mut buf) {
                if tcp.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
        let tcp = in_netns(&vm.netns, || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("the VM connecting to {addr}: {e}"));
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        EchoConnection { tcp }
    }

    /// Sends `text` and expects it back.
    fn round(&mut self, text: &str) {
        let mut back = vec![0u8; text.len()];
        let echoed = self
            .tcp
            .write_all(text.as_bytes())
            .and_then(|()| self.tcp.read_exact(&mut back));
        assert!(
            echoed.is_ok() && back == text.as_bytes(),
            "the connection opened before capture, {text}: {echoed:?}, got {:?}",
            String::from_utf8_lossy(&back)
        );
    }
}

#[test]
fn a_host_without_a_control_plane_runs_from_a_static_file_and_an_offline_svid() {
    let lab = Lab::up("e2estat", TOPOLOGY);
    // trellisd tells the node about the VM; the VM itself never talks to trellisd.
    std::fs::write(lab.manifests("east").join("vm.yaml"), vm_manifest("vm-1")).expect("VM manifest");
    let mut vm = Vm::attach(&lab);
    let dir = vm.log_dir.path().to_path_buf();
    let static_file = dir.join("mesh.yaml");
    std::fs::write(&static_file, all_manifests(&lab.manifests("east"))).expect("static config");
    let svid = dir.join("billing.pem");
    let issued = binary("trellis")
        .args(["identity", "issue", "--ca-dir"])
        .arg(lab.state_dir.join("east/ca"))
        .args(["--id", BILLING_ID, "--hours", "2", "--out"])
        .arg(&svid)
        .output()
        .expect("trellis identity issue");
    assert!(issued.status.success(), "{}", String::from_utf8_lossy(&issued.stderr));

    // trellisd is gone before the VM starts: nothing but the files configures it. node-1 keeps
    // what trellisd last told it (static stability), once that includes the VM.
    let node_admin = lab.node_ns("east", "node-1");
    let knows_vm = lab.call_until(
        &node_admin,
        "http://127.0.0.1:15000/config_dump",
        Duration::from_secs(10),
        |r| r.as_ref().is_ok_and(|dump| dump.contains(VM_IP)),
    );
    assert!(
        knows_vm.is_ok_and(|d| d.contains(VM_IP)),
        "node-1 never learnt the VM's service"
    );
    lab.kill_all_in(&lab.control_ns("east"));
    let mut args = common_args(&lab, "vm-1");
    args.extend(["--config-file".into(), static_file.to_string_lossy().into_owned()]);
    args.extend(["--identity-file".into(), svid.to_string_lossy().into_owned()]);
    vm.start("ztunnel", "ztunnel", &args);
    vm.start("billing", "trellis", &billing_server());
    vm.wait_ready(&lab);
    check_both_directions(&lab, &vm, "static");
    let dump = lab
        .call(&vm.netns, "http://127.0.0.1:15000/certs", 0)
        .expect("the VM's /certs");
    assert!(dump.contains(BILLING_ID), "{dump}");
}

/// Every manifest trellisd reads, as one multi-document file.
fn all_manifests(dir: &Path) -> String {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("manifest dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let docs: Vec<String> = files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("manifest"))
        .collect();
    docs.join("\n---\n")
}
