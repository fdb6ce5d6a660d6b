//! Helpers for the end-to-end suites in `tests/tests/`: find the workspace's binaries and run
//! them as child processes that are killed when the test ends, pass or fail.

pub mod etcd;
pub mod flood;
pub mod lab;
pub mod sniff;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The directory holding the workspace's binaries (`target/<profile>`), found from the test
/// executable's own path (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .to_path_buf()
}

/// A command for one of the workspace's binaries; panics with the fix if it was not built.
pub fn binary(name: &str) -> Command {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    Command::new(path)
}

/// `trellisd token create` for `node` of cluster `east`, as an operator runs it, with the CA in
/// `ca_dir` (the environment's `TRELLIS_*` settings do not leak in).
pub fn create_token(ca_dir: &std::path::Path, node: &str) -> std::process::Output {
    binary("trellisd")
        .args(["--cluster", "east", "--ca-dir"])
        .arg(ca_dir)
        .args(["token", "create", "--node", node])
        .env_remove("TRELLIS_CA_DIR")
        .env_remove("TRELLIS_CLUSTER")
        .output()
        .expect("running trellisd token create")
}

/// A child process killed on drop.
pub struct Process {
    pub child: Child,
    pub name: String,
}

impl Process {
    pub fn spawn(name: &str, mut command: Command) -> Self {
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `condition` holds, checking every 50 ms; panics naming `what` if it still does
/// not after `timeout`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Puts every listener of the ztunnel `cmd` starts on a free loopback port (outside the lab:
/// no node namespace, no capture) and returns its admin endpoint's address.
pub fn ztunnel_on_loopback(cmd: &mut Command) -> std::net::SocketAddr {
    for flag in [
        "--hbone-listen",
        "--outbound-listen",
        "--inbound-plain-listen",
        "--metrics-listen",
        "--readiness-listen",
    ] {
        cmd.arg(flag).arg(format!("127.0.0.1:{}", free_port()));
    }
    let quic = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    cmd.arg("--quic-listen").arg(quic.to_string());
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    cmd.arg("--admin-listen").arg(admin.to_string());
    admin
}

/// The Python that has aioquic, the independent HTTP/3 implementation the QUIC tests hold
/// Trellis against (installed by deploy/install-deps.sh; `TRELLIS_H3_PYTHON` overrides).
pub fn h3_python() -> std::path::PathBuf {
    let python = std::env::var_os("TRELLIS_H3_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/trellis/h3venv/bin/python".into());
    assert!(
        python.exists(),
        "{} is missing: run `bash deploy/install-deps.sh` (it installs aioquic for the QUIC tests)",
        python.display()
    );
    python
}

/// The aioquic HBONE client script (tests/h3/hbone_h3_client.py).
pub fn h3_client_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("h3/hbone_h3_client.py")
}

/// A free TCP port on loopback (bound and released, so a race is possible but unlikely).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `f` on a thread inside network namespace `ns`: sockets it opens stay in that namespace
/// after it returns.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: `file` is an open namespace file for the whole call; setns moves only this
            // short-lived thread.
            let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "entering {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|_| panic!("a thread in {ns} panicked"))
    })
}
