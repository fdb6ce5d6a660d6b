//! `trellis federation join | status | leave` with two real trellisd (east and west) and a real
//! etcd (TLS, client certificates, one etcd user per cluster), as an operator runs them: after
//! both joined, each trellisd lists both members with their bundles and west's global service;
//! the membership survives a trellisd restart; after west leaves, east no longer lists it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use trellis_e2e::etcd::Etcd;
use trellis_e2e::{binary, free_port, Process};

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
spec: {serviceAccount: hello, node: node-1, ip: 10.1.1.10, ready: true}
"#;

struct Cluster {
    name: &'static str,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    listen: SocketAddr,
    trellisd: Option<Process>,
}

impl Cluster {
    fn new(name: &'static str, ip_octet: u8) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("manifests")).expect("manifests");
        let text = MANIFESTS.replace("10.1.1.10", &format!("10.{ip_octet}.1.10"));
        std::fs::write(dir.path().join("manifests").join("demo.yaml"), text).expect("manifest");
        let mut c = Cluster {
            name,
            dir,
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            trellisd: None,
        };
        c.start();
        c
    }

    fn manifests(&self) -> std::path::PathBuf {
        self.dir.path().join("manifests")
    }

    fn start(&mut self) {
        let mut cmd = binary("trellisd");
        cmd.args(["--cluster", self.name, "--listen", &self.listen.to_string()])
            .args(["--admin-listen", &self.admin.to_string()])
            .arg("--manifests")
            .arg(self.manifests())
            .arg("--ca-dir")
            .arg(self.dir.path().join("ca"))
            .env("RUST_LOG", "warn");
        self.trellisd = Some(Process::spawn(&format!("trellisd-{}", self.name), cmd));
        let admin = self.admin.to_string();
        trellis_e2e::wait_until("trellisd answers /status", Duration::from_secs(20), || {
            trellis(&["status", "--admin", &admin]).status.success()
        });
    }

    fn join(&self, etcd: &Etcd, gateway: &str) -> Output {
        let user = trellis_federation::access::cluster_user(self.name);
        let (ca, cert, key) = etcd.write_credentials(&user, self.dir.path());
        let manifests = self.manifests();
        trellis(&[
            "federation",
            "join",
            "--cluster",
            self.name,
            "--etcd",
            &etcd.client_url,
            "--etcd-ca",
            path(&ca),
            "--etcd-cert",
            path(&cert),
            "--etcd-key",
            path(&key),
            "--gateway",
            gateway,
            "--region",
            "eu-1",
            "--manifests",
            path(&manifests),
            "--admin",
            &self.admin.to_string(),
        ])
    }

    /// `trellis federation status` until `pred` holds on its output.
    fn status_until(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = trellis(&["federation", "status", "--admin", &self.admin.to_string()]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && pred(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{}'s federation status never showed {what}:\n{text}{}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn trellis(args: &[&str]) -> Output {
    binary("trellis")
        .args(args)
        .env_remove("TRELLIS_MANIFESTS")
        .env_remove("TRELLIS_ADMIN")
        .output()
        .expect("running trellis")
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

/// The row of `cluster` in a federation status table.
fn row<'a>(status: &'a str, cluster: &str) -> Option<&'a str> {
    status
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{cluster} ")))
}

#[test]
fn clusters_join_see_each_other_survive_a_restart_and_leave() {
    let etcd = Etcd::start();
    // The operator grants each member its etcd user, then turns etcd's authentication on.
    let operator = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = etcd.write_credentials("root", operator.path());
    for (cluster, extra) in [("east", None), ("west", Some("--enable-auth"))] {
        let mut args = vec!["federation", "grant", "--cluster", cluster, "--etcd", &etcd.client_url];
        args.extend([
            "--etcd-ca",
            path(&ca),
            "--etcd-cert",
            path(&cert),
            "--etcd-key",
            path(&key),
        ]);
        args.extend(extra);
        let said = ok(&trellis(&args), "federation grant");
        assert!(
            said.contains(&format!("etcd user trellis-cluster-{cluster} may now write")),
            "{said}"
        );
    }
    let mut east = Cluster::new("east", 1);
    let west = Cluster::new("west", 2);

    let said = ok(&east.join(&etcd, "10.1.0.20"), "east joins");
    assert!(said.contains("cluster east joined the federation"), "{said}");
    ok(&west.join(&etcd, "10.2.0.20:15008"), "west joins");

    let waited = ok(
        &trellis(&[
            "federation",
            "status",
            "--wait",
            "--wait-seconds",
            "30",
            "--admin",
            &east.admin.to_string(),
        ]),
        "federation status --wait",
    );
    eprintln!("{waited}");
    let w = row(&waited, "west").unwrap_or_else(|| panic!("no west row:\n{waited}"));
    assert!(w.contains("west.trellis.local") && w.contains("10.2.0.20:15008"), "{w}");
    assert!(
        w.contains("yes") && w.contains("demo/hello"),
        "west's bundle and global service: {w}"
    );
    assert!(
        row(&waited, "east").is_some_and(|e| e.contains("10.1.0.20:15008")),
        "{waited}"
    );
    assert!(waited.contains("this cluster registered"), "{waited}");
    let full = ok(
        &trellis(&["status", "--admin", &east.admin.to_string()]),
        "trellis status",
    );
    assert!(
        full.contains("federation: etcd https://127.0.0.1:"),
        "trellis status shows the federation:\n{full}"
    );

    let (_, metrics) =
        trellis_admin::client::get_blocking(east.admin, "/metrics", Duration::from_secs(5)).expect("metrics");
    for line in [
        "trellis_federation_members 2",
        "trellis_federation_synced 1",
        "trellis_federation_stale 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }

    // A node of east trusts west's trust domain, with west's roots, from the config stream.
    let node = east.ztunnel();
    let trusts = |td: &str| {
        node.config_dump()["trust_domains"]
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["trust_domain"] == td))
    };
    trellis_e2e::wait_until("east's node trusts west.trellis.local", Duration::from_secs(20), || {
        trusts("west.trellis.local")
    });
    assert!(trusts("east.trellis.local"));

    // The membership is a manifest: a restarted trellisd joins again on its own.
    east.trellisd = None;
    east.start();
    east.status_until("both members after east's restart", |s| {
        row(s, "west").is_some() && row(s, "east").is_some() && s.contains("synced at revision")
    });

    let said = ok(
        &trellis(&[
            "federation",
            "leave",
            "--manifests",
            path(&west.manifests()),
            "--admin",
            &west.admin.to_string(),
        ]),
        "west leaves",
    );
    assert!(said.contains("left the federation"), "{said}");
    let after = east.status_until("west gone", |s| row(s, "west").is_none() && row(s, "east").is_some());
    assert!(
        !after.contains("west.trellis.local"),
        "west's bundle is gone too:\n{after}"
    );
    trellis_e2e::wait_until("east's node no longer trusts west", Duration::from_secs(20), || {
        !trusts("west.trellis.local")
    });
    assert!(trusts("east.trellis.local"), "its own trust domain stays");
}

/// A ztunnel of a cluster, tunnels only (no capture), on loopback ports of its own.
struct Node {
    admin: SocketAddr,
    _process: Process,
}

impl Node {
    fn config_dump(&self) -> serde_json::Value {
        let (status, body) = trellis_admin::client::get_blocking(self.admin, "/config_dump", Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("ztunnel's /config_dump: {e}"));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    }
}

impl Cluster {
    fn ztunnel(&self) -> Node {
        let ca = self.dir.path().join("ca");
        let out = binary("trellisd")
            .args(["--cluster", self.name, "--ca-dir"])
            .arg(&ca)
            .args(["token", "create", "--node", "node-1"])
            .env_remove("TRELLIS_CA_DIR")
            .env_remove("TRELLIS_CLUSTER")
            .output()
            .expect("trellisd token create");
        let token = self.dir.path().join("token");
        std::fs::write(&token, &out.stdout).expect("token file");
        let mut cmd = binary("ztunnel");
        cmd.args(["--node", "node-1", "--cluster", self.name])
            .args(["--trust-domain", &format!("{}.trellis.local", self.name)])
            .args(["--ca-addr", &self.listen.to_string()])
            .arg("--ca-roots")
            .arg(ca.join("root-cert.pem"))
            .arg("--join-token-file")
            .arg(&token)
            .args(["--capture", "none"])
            .env("RUST_LOG", "warn");
        let admin = trellis_e2e::ztunnel_on_loopback(&mut cmd);
        let node = Node {
            admin,
            _process: Process::spawn("ztunnel", cmd),
        };
        trellis_e2e::wait_until("the ztunnel serves /config_dump", Duration::from_secs(20), || {
            trellis_admin::client::get_blocking(admin, "/config_dump", Duration::from_secs(1))
                .is_ok_and(|(s, _)| s == 200)
        });
        node
    }
}
