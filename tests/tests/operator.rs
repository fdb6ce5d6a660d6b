//! The operator's loop against a real trellisd: label a namespace with the CLI, see it enrolled
//! in `trellis status`.

use std::time::{Duration, Instant};

use trellis_e2e::{binary, free_port, Process};

const MANIFESTS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {selector: {app: cart}, clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {serviceAccount: cart, node: node-1, ip: 10.1.1.5}
";

fn trellis(args: &[&str]) -> (bool, String, String) {
    let out = binary("trellis").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Polls `trellis status` until `pred` holds on its output (trellisd applies changes live).
fn status_until(admin: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, out, err) = trellis(&["status", "--admin", admin]);
        if ok && pred(&out) {
            return out;
        }
        assert!(Instant::now() < deadline, "status never showed {what}:\n{out}{err}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn labelling_a_namespace_enrols_it_as_status_shows() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("shop.yaml"), MANIFESTS).unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = binary("trellisd");
    cmd.args(["--cluster", "east", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--admin-listen", &admin])
        .arg("--manifests")
        .arg(&manifests)
        .arg("--ca-dir")
        .arg(dir.path().join("ca"));
    let _trellisd = Process::spawn("trellisd", cmd);

    let before = status_until(&admin, "cart-1", |s| s.contains("shop/cart-1"));
    assert!(before.contains("enrolled namespaces: none"), "{before}");
    assert!(before.contains("plain"), "{before}");

    let dir_arg = manifests.to_str().unwrap();
    let (ok, out, err) = trellis(&[
        "namespace",
        "label",
        "shop",
        "trellis.io/dataplane-mode=ambient",
        "--manifests",
        dir_arg,
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("namespace/shop labelled trellis.io/dataplane-mode=ambient"),
        "{out}"
    );
    // The namespace line comes from discovery and the workload's mode from the published model,
    // which follows a few milliseconds later: wait for both.
    status_until(&admin, "shop enrolled, its workload in mTLS", |s| {
        s.contains("enrolled namespaces: shop") && s.contains("mTLS")
    });

    let (ok, _, _) = trellis(&[
        "namespace",
        "label",
        "shop",
        "trellis.io/dataplane-mode",
        "--remove",
        "--manifests",
        dir_arg,
    ]);
    assert!(ok);
    status_until(&admin, "shop out again, its workload plain", |s| {
        s.contains("enrolled namespaces: none") && s.contains("plain") && !s.contains("mTLS")
    });

    // A bad edit is refused by the CLI before it reaches trellisd.
    let (ok, _, err) = trellis(&["namespace", "label", "Shop!", "a=b", "--manifests", dir_arg]);
    assert!(!ok);
    assert!(err.contains("not a valid name"), "{err}");
}

#[test]
fn status_says_how_to_fix_an_unreachable_trellisd() {
    let admin = format!("127.0.0.1:{}", free_port());
    let (ok, _, err) = trellis(&["status", "--admin", &admin]);
    assert!(!ok);
    assert!(err.contains("is trellisd running?"), "{err}");
}
