//! Running code inside a lab network namespace, and the small TCP probe the lab makes from
//! there. HTTP probes (readiness, metrics, trellisd's admin endpoint) use
//! [`trellis_admin::client::get_blocking`] inside [`in_netns`].

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Runs `f` on a thread that has entered network namespace `ns` (`/run/netns/<ns>`): sockets it
/// creates live in that namespace. The calling thread's namespace is untouched.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: `file` is an open network-namespace file for the whole call, and setns
                // changes the namespace of this (short-lived) thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(e.kind(), format!("entering {path}: {e}")));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other(format!("the probe in {ns} panicked")))?
    })
}

/// Whether `addr` accepts a TCP connection within a second.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::process::Command;

    use trellis_admin::client::get_blocking;

    use super::*;

    /// A network namespace made for one test and deleted when dropped.
    struct TestNetns(String);

    impl TestNetns {
        /// `None` when this process may not make namespaces (not root, no `ip`).
        fn new(name: &str) -> Option<TestNetns> {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return None;
            }
            let ip = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
            let name = format!("{name}-{}", std::process::id());
            if !ip(&["netns", "add", &name]) {
                return None;
            }
            let ns = TestNetns(name);
            ip(&["-n", &ns.0, "link", "set", "lo", "up"]).then_some(ns)
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn an_http_probe_made_in_a_namespace_reaches_the_server_inside_it() {
        let Some(ns) = TestNetns::new("trellis-cli-probe") else {
            eprintln!("skipped: needs root and iproute2 to make a network namespace");
            return;
        };
        let listener = in_netns(&ns.0, || std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\ninside")
                .unwrap();
        });
        let answer = in_netns(&ns.0, || get_blocking(addr, "/healthz/ready", Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        server.join().unwrap();
        assert_eq!(answer, (200, "inside".to_string()));
    }
}
