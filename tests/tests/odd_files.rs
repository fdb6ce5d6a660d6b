//! Odd files in the manifest directory, end to end in the lab (issue 12, item 6): a named pipe,
//! a symbolic link to /dev/zero, one to /etc/shadow and a 50 MB file are each reported by name
//! in `trellis status`, trellisd reads none of them (its memory stays put), and discovery goes
//! on: a namespace labelled afterwards is enrolled and its pod's calls are tunnelled.
//!
//! Addresses (deploy/lab/README.md): node-1's pod tgt 10.1.1.10 (demo server on 8080, service
//! VIP 10.101.0.10:80); node-2's pod cli 10.1.2.10, in namespace `late`, enrolled only later.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use trellis_e2e::lab::{metric_sum, Lab};
use trellis_e2e::wait_until;

const TOPOLOGY: &str = r#"
clusters:
  - {name: east, nodes: 2}
namespaces:
  - {name: mesh, ambient: true}
  - {name: late, ambient: false}
services:
  - {name: tgt, namespace: mesh, port: 80, targetPort: 8080, selector: {app: tgt}}
pods:
  - {name: tgt, namespace: mesh, node: node-1, serviceAccount: tgt, labels: {app: tgt}, run: {server: {version: v1, port: 8080}}}
  - {name: cli, namespace: late, node: node-2, serviceAccount: cli}
"#;

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {}",
        path.display()
    );
}

/// `trellis status` run next to trellisd (its admin endpoint is on the control namespace's
/// loopback).
fn status(lab: &Lab) -> String {
    let out = lab.exec(
        &lab.control_ns("east"),
        "trellis",
        &["status", "--admin", "127.0.0.1:15014"],
    );
    assert!(
        out.status.success(),
        "trellis status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_fifo_device_links_and_a_huge_file_are_reported_by_name_and_discovery_goes_on() {
    let lab = Lab::up("e2efiles", TOPOLOGY);
    let manifests = lab.manifests("east");
    let before = lab.rss_kib("trellisd-east");

    mkfifo(&manifests.join("a-pipe.yaml"));
    std::os::unix::fs::symlink("/dev/zero", manifests.join("a-zero.yaml")).expect("symlink to /dev/zero");
    std::os::unix::fs::symlink("/etc/shadow", manifests.join("a-shadow.yaml")).expect("symlink to /etc/shadow");
    let big = std::fs::File::create(manifests.join("a-big.yaml")).expect("a-big.yaml");
    big.set_len(50 << 20).expect("a 50 MB file");

    let mut shown = String::new();
    wait_until("status reports all four files", Duration::from_secs(20), || {
        shown = status(&lab);
        ["a-pipe.yaml", "a-zero.yaml", "a-shadow.yaml", "a-big.yaml"]
            .iter()
            .all(|f| shown.contains(f))
    });
    let line = |file: &str| {
        shown
            .lines()
            .find(|l| l.contains(file))
            .unwrap_or_else(|| panic!("no line for {file}:\n{shown}"))
            .to_string()
    };
    assert!(line("a-pipe.yaml").contains("a FIFO, not a regular file"), "{shown}");
    assert!(
        line("a-zero.yaml").contains("/dev/zero, outside the manifest directory"),
        "{shown}"
    );
    assert!(
        line("a-shadow.yaml").contains("/etc/shadow, outside the manifest directory"),
        "{shown}"
    );
    assert!(line("a-big.yaml").contains("52428800 bytes"), "the real size: {shown}");
    let after = lab.rss_kib("trellisd-east");
    eprintln!("trellisd RSS {before} KiB before the odd files, {after} KiB once all four were reported");
    let grown = after.saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "trellisd's resident memory grew by {grown} KiB: it read a file it refused"
    );

    // Discovery goes on beside them: enrolling `late` reaches trellisd, node-2 and node-1. The
    // odd files sort before ns-late.yaml, so the CLI's own scan meets them first (and must
    // neither hang on the FIFO nor read /dev/zero).
    lab.label_namespace("east", "late", "trellis.io/dataplane-mode=ambient");
    wait_until("status shows late enrolled", Duration::from_secs(20), || {
        shown = status(&lab);
        shown
            .lines()
            .any(|l| l.starts_with("enrolled namespaces:") && l.contains("late"))
    });
    let cli = lab.pod_ns("east", "late", "cli");
    let tunnelled = [
        ("reporter", "destination"),
        ("source_principal", "spiffe://east.trellis.local/ns/late/sa/cli"),
        ("connection_security_policy", "mutual_tls"),
    ];
    wait_until("a call from cli is tunnelled", Duration::from_secs(20), || {
        let answered = lab
            .call(&cli, "http://10.101.0.10/", 0)
            .is_ok_and(|b| b.contains("hello from tgt"));
        answered
            && metric_sum(
                &lab.metrics("east", "node-1"),
                "trellis_tcp_connections_opened_total",
                &tunnelled,
            ) >= 1.0
    });
    // The files are still reported while they are there.
    assert!(status(&lab).contains("a-pipe.yaml"), "{shown}");
    for f in ["a-pipe.yaml", "a-zero.yaml", "a-shadow.yaml", "a-big.yaml"] {
        std::fs::remove_file(manifests.join(f)).expect("removing the odd file");
    }
    wait_until("the problems are cleared", Duration::from_secs(20), || {
        shown = status(&lab);
        shown.contains("problems: none")
    });
}
