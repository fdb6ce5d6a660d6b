//! `trellis traffic shift | status` as an operator runs them, against a real etcd (Debian's
//! etcd-server: TLS, client certificates, the federation's users and roles) and a real trellisd
//! of cluster east joined to it: the weights land in etcd's `traffic/demo/hello`, reach the
//! Service trellisd publishes to its nodes, and show in `trellis traffic status` and `trellis
//! status`; `--clear` removes them; bad weights, a cluster outside the federation and a member's
//! credentials are refused, saying what to fix, and change nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};
use trellis_e2e::etcd::Etcd;
use trellis_e2e::{binary, free_port, wait_until, Process};
use trellis_federation::access::{cluster_user, OPERATOR_USER};
use trellis_federation::keys;
use trellis_federation::records::{decode, TrafficRecord};

const MANIFESTS: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {trellis.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: demo, labels: {trellis.io/global: "true"}}
spec: {selector: {app: hello}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: trellis.io/v1
kind: Workload
metadata: {name: hello-1, namespace: demo, labels: {app: hello}}
spec: {serviceAccount: hello, node: node-1, ip: 10.1.1.10, nodeIP: 10.1.0.11, ready: true}
"#;

/// `trellis` with no TRELLIS_* setting of the caller's environment.
fn trellis(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis"));
    for var in [
        "TRELLIS_MANIFESTS",
        "TRELLIS_ADMIN",
        "TRELLIS_ETCD",
        "TRELLIS_ETCD_CA",
        "TRELLIS_ETCD_CERT",
        "TRELLIS_ETCD_KEY",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(args).output().expect("running trellis")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a failing command said on stderr, checking it failed with `code`.
fn refused(out: &Output, code: i32, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: {}\n{}{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// `traffic/demo/hello` as etcd holds it, read with the operator's credentials.
fn stored(etcd: &Etcd) -> Option<TrafficRecord> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut client = trellis_federation::sync::connect(&etcd.config(OPERATOR_USER))
            .await
            .expect("the operator's etcd client");
        let got = client
            .get(keys::traffic("demo", "hello"), None)
            .await
            .expect("reading traffic/demo/hello");
        got.kvs()
            .first()
            .map(|kv| decode(kv.value()).expect("a traffic record"))
    })
}

/// The cluster weights of demo/hello in trellisd's `/config_dump`: what its nodes are sent.
fn published_weights(admin: SocketAddr) -> Value {
    let (status, body) =
        trellis_admin::client::get_blocking(admin, "/config_dump", Duration::from_secs(5)).expect("/config_dump");
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).expect("JSON");
    dump["services"]["demo/hello"]["cluster_weights"].clone()
}

#[test]
fn traffic_shift_writes_the_weights_trellisd_publishes_and_clear_removes_them() {
    let etcd = Etcd::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(etcd.provision(&[("east", "east.trellis.local"), ("west", "west.trellis.local")]));

    // East's trellisd, joined to the federation with its own etcd user.
    let dir = tempfile::tempdir().expect("temp dir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).expect("manifests");
    std::fs::write(manifests.join("demo.yaml"), MANIFESTS).expect("manifest");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = binary("trellisd");
    cmd.args(["--cluster", "east", "--listen", &listen.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .arg("--manifests")
        .arg(&manifests)
        .arg("--ca-dir")
        .arg(dir.path().join("ca"))
        .env("RUST_LOG", "warn");
    let _trellisd = Process::spawn("trellisd-east", cmd);
    let admin_text = admin.to_string();
    wait_until("trellisd answers /status", Duration::from_secs(20), || {
        trellis(&["status", "--admin", &admin_text]).status.success()
    });
    let member = dir.path().join("member");
    std::fs::create_dir(&member).expect("member dir");
    let (ca, cert, key) = etcd.write_credentials(&cluster_user("east"), &member);
    ok(
        &trellis(&[
            "federation",
            "join",
            "--cluster",
            "east",
            "--etcd",
            &etcd.client_url,
            "--etcd-ca",
            path(&ca),
            "--etcd-cert",
            path(&cert),
            "--etcd-key",
            path(&key),
            "--region",
            "eu-1",
            "--manifests",
            path(&manifests),
            "--admin",
            &admin_text,
        ]),
        "east joins",
    );

    let operator = dir.path().join("operator");
    std::fs::create_dir(&operator).expect("operator dir");
    let (op_ca, op_cert, op_key) = etcd.write_credentials(OPERATOR_USER, &operator);
    let shift_as = |cert: &Path, key: &Path, how: &[&str]| {
        let mut args = vec!["traffic", "shift", "-n", "demo", "hello"];
        args.extend_from_slice(how);
        args.extend([
            "--etcd",
            &etcd.client_url,
            "--etcd-ca",
            path(&op_ca),
            "--etcd-cert",
            path(cert),
            "--etcd-key",
            path(key),
        ]);
        trellis(&args)
    };
    let shift = |how: &[&str]| shift_as(&op_cert, &op_key, how);

    // 90/10: written, published, shown.
    let out = shift(&["--cluster", "east=90,west=10"]);
    let said = ok(&out, "traffic shift east=90,west=10");
    assert!(
        said.contains("demo/hello: new connections split by weight east=90 (90%), west=10 (10%)"),
        "{said}"
    );
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(
        warned.contains("warning: cluster west is not connected to the federation now"),
        "west is granted but has not joined: {warned}"
    );
    let want = TrafficRecord {
        weights: [("east".to_string(), 90), ("west".to_string(), 10)].into(),
    };
    assert_eq!(stored(&etcd), Some(want.clone()));
    wait_until(
        "trellisd publishes demo/hello with the weights",
        Duration::from_secs(30),
        || published_weights(admin) == json!({"east": 90, "west": 10}),
    );
    let status = ok(
        &trellis(&["traffic", "status", "-n", "demo", "hello", "--admin", &admin_text]),
        "traffic status",
    );
    eprintln!("{status}");
    assert!(status.starts_with("demo/hello, seen from cluster east\n"), "{status}");
    assert!(status.contains("  weights: east=90, west=10\n"), "{status}");
    assert!(
        status.contains("  east (here)      90      1          1        eu-1\n"),
        "{status}"
    );
    assert!(status.contains("  west             10      0          0"), "{status}");
    assert!(
        status.contains("serving: east 100% (by weight; no healthy endpoint in west: its share goes to the others)"),
        "{status}"
    );
    let full = ok(&trellis(&["status", "--admin", &admin_text]), "trellis status");
    assert!(
        full.contains("global services, seen from east")
            && full.contains("  demo/hello: weights east=90, west=10; healthy east 1/1, west 0/0; serving east 100%"),
        "{full}"
    );

    // Bad input is refused, saying what to fix, and leaves the weights as they were.
    for (how, why) in [
        (&["--cluster", "east=20000"][..], "weight 20000 for east: at most 10000"),
        (&["--cluster", "east"][..], "\"east\" is not CLUSTER=WEIGHT"),
        (&["--cluster", "east=0,west=0"][..], "every weight is 0"),
        (&["--cluster", "east=lots"][..], "not a whole number from 0 to 10000"),
        (
            &["--cluster", "east=50,north=50"][..],
            "cluster north is not a member of the federation (members: east, west)",
        ),
    ] {
        let said = refused(&shift(how), 1, &format!("traffic shift {how:?}"));
        assert!(said.contains(why), "{how:?}: {said}");
    }
    refused(&shift(&["--cluster", "east=1", "--clear"]), 2, "--cluster with --clear");
    refused(&shift(&[]), 2, "neither --cluster nor --clear");
    // A member's own etcd user may not write traffic/: only the operator's.
    let said = refused(
        &shift_as(&cert, &key, &["--cluster", "east=50,west=50"]),
        1,
        "traffic shift with east's member credentials",
    );
    assert!(
        said.contains("permission denied") && said.contains("CN trellis-operator"),
        "{said}"
    );
    assert_eq!(stored(&etcd), Some(want), "nothing refused was written");
    let said = refused(
        &trellis(&["traffic", "status", "-n", "demo", "nothing", "--admin", &admin_text]),
        1,
        "traffic status of a service that is not global",
    );
    assert!(
        said.contains("demo/nothing is not a global service of cluster east (global here: demo/hello)"),
        "{said}"
    );

    // --clear: the key goes, the service follows locality again.
    let said = ok(&shift(&["--clear"]), "traffic shift --clear");
    assert!(said.contains("demo/hello: weights cleared"), "{said}");
    assert_eq!(stored(&etcd), None);
    wait_until(
        "trellisd publishes demo/hello without weights",
        Duration::from_secs(30),
        || published_weights(admin) == json!({}),
    );
    let status = ok(
        &trellis(&["traffic", "status", "-n", "demo", "hello", "--admin", &admin_text]),
        "traffic status after --clear",
    );
    assert!(status.contains("  weights: none (by locality)\n"), "{status}");
    assert!(
        status.contains("serving: east 100% (by locality: this cluster)"),
        "{status}"
    );
    let said = ok(&shift(&["--clear"]), "traffic shift --clear again");
    assert!(said.contains("had no weights"), "{said}");
}
