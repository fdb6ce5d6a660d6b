//! A node joins a cluster the way an operator does it: start trellisd, create a join token,
//! start ztunnel with it. The node gets its SVID once; the token cannot be replayed.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use trellis_e2e::{binary, create_token, free_port, Process};

/// `trellisd` serving on `port` with its CA in `dir/ca` and manifests in `dir/manifests`.
fn trellisd(dir: &std::path::Path, port: u16) -> std::process::Command {
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let mut cmd = binary("trellisd");
    cmd.args(["--cluster", "east", "--admin-listen", "127.0.0.1:0", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--manifests")
        .arg(manifests)
        .arg("--ca-dir")
        .arg(dir.join("ca"));
    cmd
}

fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs ztunnel until it prints its first line or exits; returns (stdout, stderr, exited-ok).
fn run_ztunnel(
    ca_dir: &std::path::Path,
    port: u16,
    token_file: &std::path::Path,
    node: &str,
) -> (String, String, Option<bool>) {
    let mut cmd = binary("ztunnel");
    cmd.args(["--node", node, "--trust-domain", "east.trellis.local"])
        .arg("--ca-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ca-roots")
        .arg(ca_dir.join("root-cert.pem"))
        .arg("--join-token-file")
        .arg(token_file)
        .args(["--capture", "none"]);
    // Outside the lab: every listener on a free loopback port, no capture rules.
    trellis_e2e::ztunnel_on_loopback(&mut cmd);
    let mut zt = Process::spawn("ztunnel", cmd);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut stdout = String::new();
    let mut out = zt.child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut out), &mut line);
        line
    });
    let status = loop {
        if reader.is_finished() {
            break zt.child.try_wait().unwrap().map(|s| s.success());
        }
        if let Some(status) = zt.child.try_wait().unwrap() {
            break Some(status.success());
        }
        assert!(
            Instant::now() < deadline,
            "ztunnel neither joined nor failed within 15 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    stdout.push_str(&reader.join().unwrap());
    let mut stderr = String::new();
    if status.is_some() {
        zt.child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    }
    (stdout, stderr, status)
}

#[test]
fn a_node_joins_with_a_token_once_and_a_replay_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let port = free_port();
    let _trellisd = Process::spawn("trellisd", trellisd(dir.path(), port));
    wait_for_port(port, Duration::from_secs(15));

    let out = create_token(&ca_dir, "node-1");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &out.stdout).unwrap();

    let (stdout, _, _) = run_ztunnel(&ca_dir, port, &token_file, "node-1");
    assert!(
        stdout.contains("joined as spiffe://east.trellis.local/trellis/node/node-1"),
        "first join: {stdout}"
    );

    let (stdout, stderr, status) = run_ztunnel(&ca_dir, port, &token_file, "node-1");
    assert_eq!(status, Some(false), "replay must fail: {stdout}");
    assert!(stderr.contains("already used"), "the error says why: {stderr}");
}

#[test]
fn trellisd_refuses_a_ca_key_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    // First start creates the CA, then we loosen the key's mode.
    let out = create_token(&ca_dir, "node-1");
    assert!(out.status.success());
    let port = free_port();
    drop(Process::spawn("trellisd", trellisd(dir.path(), port)).wait_ready(port));
    std::fs::set_permissions(ca_dir.join("ca-key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = trellisd(dir.path(), free_port()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

trait WaitReady {
    fn wait_ready(self, port: u16) -> Self;
}

impl WaitReady for Process {
    fn wait_ready(self, port: u16) -> Self {
        wait_for_port(port, Duration::from_secs(15));
        self
    }
}
