//! Drives a lab (`trellis lab up/down`) for an end-to-end test, and reaches into its network
//! namespaces. The lab is torn down when the [`Lab`] drops, whether the test passed or not.
//!
//! For failover: [`load`] opens new connections from a pod and times them; [`blackhole`] makes
//! a namespace drop every packet; [`config_dump`] reads what a ztunnel holds.

pub mod load;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use trellis_identity::{BundleSet, CertificateAuthority, IssuancePolicy, TrustBundle, TrustDomain};

use crate::{bin_dir, binary};

/// A lab brought up for one test.
pub struct Lab {
    pub name: String,
    pub state_dir: PathBuf,
    _dir: tempfile::TempDir,
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Lab {
    /// Cluster `cluster`'s CA as trellisd holds it (trust domain `<cluster>.trellis.local`), and
    /// a bundle set trusting it: for a test that holds SVIDs of the lab's mesh, as a compromised
    /// node or a foreign mesh sharing the root CA would.
    pub fn ca(&self, cluster: &str) -> (CertificateAuthority, BundleSet) {
        let td = TrustDomain::new(&format!("{cluster}.trellis.local")).expect("trust domain");
        let ca = CertificateAuthority::load(&self.state_dir.join(cluster).join("ca"), &td, IssuancePolicy::default())
            .expect("the lab's CA");
        let bundles = BundleSet::with(TrustBundle::new(td, ca.roots().to_vec()));
        (ca, bundles)
    }

    /// Brings up lab `name` (≤ 8 characters) from the topology YAML `topology`. Panics with
    /// trellis's output if it fails; the lab is removed either way.
    pub fn up(name: &str, topology: &str) -> Lab {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("topology.yaml");
        std::fs::write(&file, topology).expect("writing the topology");
        let lab = Lab {
            name: name.to_string(),
            state_dir: dir.path().join("state"),
            _dir: dir,
        };
        let out = lab.trellis(&["lab", "up", "--file"], Some(&file));
        assert!(out.status.success(), "{}", describe("trellis lab up", &out));
        lab
    }

    /// Runs `trellis lab up` again with the same topology (it restarts what died); its stdout.
    /// Panics with trellis's output if it fails.
    pub fn up_again(&self) -> String {
        let out = self.trellis(&["lab", "up", "--file"], Some(&self._dir.path().join("topology.yaml")));
        assert!(out.status.success(), "{}", describe("trellis lab up (again)", &out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The resident set of lab process `process` (its record's name), in KiB.
    pub fn rss_kib(&self, process: &str) -> u64 {
        let pid_file = self.state_dir.join("pids").join(format!("{process}.pid"));
        let pid = std::fs::read_to_string(&pid_file).expect("the process's pid file");
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// `trellis lab status`'s report.
    pub fn status(&self) -> String {
        let out = self.trellis(&["lab", "status"], None);
        assert!(out.status.success(), "{}", describe("trellis lab status", &out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn trellis(&self, verb: &[&str], file: Option<&Path>) -> Output {
        let mut cmd = binary("trellis");
        cmd.args(verb);
        if let Some(file) = file {
            cmd.arg(file);
        }
        cmd.args(["--name", &self.name]).arg("--state-dir").arg(&self.state_dir);
        if verb.contains(&"up") {
            cmd.arg("--bin-dir").arg(bin_dir());
        }
        cmd.output().expect("running trellis")
    }

    /// The network namespace of a pod.
    pub fn pod_ns(&self, cluster: &str, namespace: &str, pod: &str) -> String {
        format!("tl-{}-{cluster}-{namespace}-{pod}", self.name)
    }

    /// The network namespace of a node.
    pub fn node_ns(&self, cluster: &str, node: &str) -> String {
        format!("tl-{}-{cluster}-{node}", self.name)
    }

    /// The network namespace of a cluster's trellisd.
    pub fn control_ns(&self, cluster: &str) -> String {
        format!("tl-{}-{cluster}-cp", self.name)
    }

    /// The underlay namespace, which carries every packet between nodes.
    pub fn underlay_ns(&self) -> String {
        format!("tl-{}-u", self.name)
    }

    /// Where trellisd of `cluster` reads its manifests.
    pub fn manifests(&self, cluster: &str) -> PathBuf {
        self.state_dir.join(cluster).join("manifests")
    }

    /// Runs a workspace binary inside network namespace `netns`.
    pub fn exec(&self, netns: &str, bin: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(bin_dir().join(bin))
            .args(args)
            .output()
            .expect("running ip netns exec")
    }

    /// One HTTP call from a pod with `trellis demo call`: the body on success, the error
    /// otherwise.
    pub fn call(&self, netns: &str, url: &str, send_bytes: usize) -> Result<String, String> {
        let bytes = send_bytes.to_string();
        let mut args = vec!["demo", "call", "--url", url, "--timeout-ms", "5000"];
        if send_bytes > 0 {
            args.extend(["--send-bytes", &bytes]);
        }
        let out = self.exec(netns, "trellis", &args);
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    /// Calls until `check` accepts the outcome or `timeout` passes; returns the last outcome.
    pub fn call_until(
        &self,
        netns: &str,
        url: &str,
        timeout: Duration,
        check: impl Fn(&Result<String, String>) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let outcome = self.call(netns, url, 0);
            if check(&outcome) || Instant::now() > deadline {
                return outcome;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The Prometheus text of the ztunnel on `node`.
    pub fn metrics(&self, cluster: &str, node: &str) -> String {
        self.call(&self.node_ns(cluster, node), "http://127.0.0.1:15020/metrics", 0)
            .unwrap_or_else(|e| panic!("scraping ztunnel on {node}: {e}"))
    }

    /// The value of `metric` on the ztunnel of `node`, summed over the samples whose labels
    /// include every `(key, value)` of `with`.
    pub fn metric(&self, cluster: &str, node: &str, metric: &str, with: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(cluster, node), metric, with)
    }

    /// The log so far of a lab process (`trellisd-east`, `ztunnel-east-node-1`,
    /// `pod-east-mesh-srv`).
    pub fn log(&self, process: &str) -> String {
        let path = self.state_dir.join("logs").join(format!("{process}.log"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Kills (SIGKILL) every process in network namespace `netns` (e.g. trellisd's) and waits
    /// until each one has died; returns their pids. Panics if there was none to kill, or naming
    /// the survivors if one still runs after 10 s.
    pub fn kill_all_in(&self, netns: &str) -> Vec<u32> {
        kill_all_in(netns)
    }

    /// Starts a recorded lab process again (after it was killed) with its recorded command
    /// line, and records the new pid so that `lab down` stops it.
    pub fn restart(&self, process: &str, netns: &str) {
        let pids = self.state_dir.join("pids");
        let argv = std::fs::read_to_string(pids.join(format!("{process}.argv"))).expect("recorded command line");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.state_dir.join("logs").join(format!("{process}.log")))
            .expect("the process's log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(argv.split('\0'))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("restarting the process");
        std::fs::write(pids.join(format!("{process}.pid")), format!("{}\n", child.id())).expect("pid file");
        // `lab down` kills it; this thread reaps it then.
        std::thread::spawn(move || child.wait());
    }

    /// Runs `trellis namespace label` against the lab's manifests; panics if it fails or takes
    /// more than 30 s (it is killed then: a scan stuck on a file must fail the test, not hang it).
    pub fn label_namespace(&self, cluster: &str, namespace: &str, label: &str) {
        let mut child = binary("trellis")
            .args(["namespace", "label", namespace, label, "--manifests"])
            .arg(self.manifests(cluster))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("trellis namespace label");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("waiting for trellis namespace label").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("trellis namespace label's output");
                panic!(
                    "{}",
                    describe("trellis namespace label did not finish within 30 s", &out)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("trellis namespace label's output");
        assert!(out.status.success(), "{}", describe("trellis namespace label", &out));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.trellis(&["lab", "down"], None);
        // A leaked lab would break the next run: fail loudly, unless already unwinding.
        if !out.status.success() && !std::thread::panicking() {
            panic!("{}", describe("trellis lab down", &out));
        }
        if !out.status.success() {
            eprintln!("{}", describe("trellis lab down", &out));
        }
    }
}

/// Kills (SIGKILL) every process in network namespace `netns` and waits until each one has
/// died; returns their pids. Panics if there was none to kill, or naming the survivors if one
/// still runs after 10 s.
pub fn kill_all_in(netns: &str) -> Vec<u32> {
    let pids = pids_in(netns);
    assert!(!pids.is_empty(), "no process runs in {netns}: nothing to kill");
    for &pid in &pids {
        let pid_t = libc::pid_t::try_from(pid).unwrap_or_else(|_| panic!("pid {pid} out of range"));
        // SAFETY: kill(2) takes no pointers; `pid` was just listed in `netns`.
        if unsafe { libc::kill(pid_t, libc::SIGKILL) } != 0 {
            let e = std::io::Error::last_os_error();
            // ESRCH: it exited on its own meanwhile, which is what we want.
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ESRCH),
                "SIGKILL to pid {pid} in {netns}: {e}"
            );
        }
    }
    crate::wait_until(
        &format!("every process in {netns} is dead"),
        Duration::from_secs(10),
        || pids.iter().all(|&pid| !is_running(pid)) && pids_in(netns).is_empty(),
    );
    pids
}

/// The pids of the processes in network namespace `netns`.
pub fn pids_in(netns: &str) -> Vec<u32> {
    let out = Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .expect("running ip netns pids");
    assert!(
        out.status.success(),
        "{}",
        describe(&format!("ip netns pids {netns}"), &out)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|pid| pid.parse().unwrap_or_else(|_| panic!("ip netns pids printed {pid:?}")))
        .collect()
}

/// Whether `pid` still runs: it exists and is neither a zombie nor dead (a killed process whose
/// parent has not reaped it yet runs no more).
pub fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sums the samples of `metric` whose labels include every `(key, value)` of `with`.
pub fn metric_sum(text: &str, metric: &str, with: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            if name != metric {
                return None;
            }
            let all = with.iter().all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// etcd's client URL in a lab of several clusters.
pub const LAB_ETCD_URL: &str = "https://10.200.0.2:2379";
/// ztunnel's admin port (`/config_dump`), on loopback inside its namespace.
pub const ZTUNNEL_ADMIN_PORT: u16 = 15000;
/// The nftables table [`blackhole`] adds.
pub const BLACKHOLE_TABLE: &str = "trellis_test_blackhole";

/// A federated lab's other parts: etcd, the gateways, traffic shifting as the operator does it,
/// and what a node's ztunnel holds.
impl Lab {
    /// etcd's network namespace.
    pub fn etcd_ns(&self) -> String {
        format!("tl-{}-etcd", self.name)
    }

    /// The network namespace of a cluster's east-west gateway (`ztunnel-<cluster>-gw`).
    pub fn gateway_ns(&self, cluster: &str) -> String {
        format!("tl-{}-{cluster}-gw", self.name)
    }

    /// Runs `trellis traffic <args>` with the operator's etcd credentials (the etcd user that may
    /// write `traffic/`), from etcd's namespace: its stdout, or what it said when it failed.
    pub fn traffic(&self, args: &[&str]) -> Result<String, String> {
        let mut argv: Vec<String> = std::iter::once("traffic".to_string())
            .chain(args.iter().map(|a| a.to_string()))
            .collect();
        argv.extend(operator_etcd_flags(&self.state_dir));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = self.exec(&self.etcd_ns(), "trellis", &argv);
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(describe(&format!("trellis {}", argv.join(" ")), &out)),
        }
    }

    /// The `/config_dump` of the ztunnel on `node` of `cluster`; panics if it does not answer.
    pub fn config_dump(&self, cluster: &str, node: &str) -> serde_json::Value {
        config_dump(&self.node_ns(cluster, node)).unwrap_or_else(|e| panic!("config dump of {cluster}/{node}: {e}"))
    }
}

/// The flags that give `trellis traffic` the operator's etcd credentials in the lab whose state
/// is in `state_dir` (the lab made a client certificate for etcd user `trellis-operator`).
pub fn operator_etcd_flags(state_dir: &Path) -> Vec<String> {
    let pki = state_dir.join("etcd").join("pki");
    let file = |name: &str| pki.join(name).display().to_string();
    vec![
        "--etcd".into(),
        LAB_ETCD_URL.into(),
        "--etcd-ca".into(),
        file("ca.pem"),
        "--etcd-cert".into(),
        file("trellis-operator.pem"),
        "--etcd-key".into(),
        file("trellis-operator-key.pem"),
    ]
}

/// The `/config_dump` of the ztunnel in node namespace `node_ns`, fetched from inside it.
pub fn config_dump(node_ns: &str) -> Result<serde_json::Value, String> {
    let admin = SocketAddr::from(([127, 0, 0, 1], ZTUNNEL_ADMIN_PORT));
    let body = crate::in_netns(node_ns, || {
        load::http_get(admin, "/config_dump", Duration::from_secs(5))
    })?;
    serde_json::from_str(&body).map_err(|e| format!("the config dump is not JSON: {e}"))
}

fn dump_service<'a>(dump: &'a serde_json::Value, namespace: &str, name: &str) -> Option<&'a serde_json::Value> {
    dump["services"]
        .as_array()?
        .iter()
        .find(|s| s["namespace"] == namespace && s["name"] == name)
}

/// The clusters of service `namespace/name`'s endpoints in a config dump, sorted, each once.
pub fn endpoint_clusters(dump: &serde_json::Value, namespace: &str, name: &str) -> Vec<String> {
    let mut clusters: Vec<String> = dump_service(dump, namespace, name)
        .and_then(|s| s["endpoints"].as_array())
        .map(|eps| {
            eps.iter()
                .filter_map(|e| e["cluster"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    clusters.sort();
    clusters.dedup();
    clusters
}

/// The cluster weights of service `namespace/name` in a config dump (empty: by locality).
pub fn service_weights(dump: &serde_json::Value, namespace: &str, name: &str) -> BTreeMap<String, u64> {
    dump_service(dump, namespace, name)
        .and_then(|s| s["weights"].as_object())
        .map(|w| w.iter().filter_map(|(c, v)| Some((c.clone(), v.as_u64()?))).collect())
        .unwrap_or_default()
}

/// Makes network namespace `netns` a black hole: every packet in or out on any interface but
/// `lo` is dropped, answered by nothing (no reset, no ICMP), as a machine that lost power.
/// Undone by [`lift_blackhole`], or with the namespace when the lab goes down.
pub fn blackhole(netns: &str) -> Result<(), String> {
    use std::io::Write;
    let rules = format!(
        "table ip {BLACKHOLE_TABLE} {{\n\
         \x20 chain input {{\n    type filter hook input priority -300; policy accept;\n    iifname != \"lo\" drop\n  }}\n\
         \x20 chain forward {{\n    type filter hook forward priority -300; policy accept;\n    drop\n  }}\n\
         \x20 chain output {{\n    type filter hook output priority -300; policy accept;\n    oifname != \"lo\" drop\n  }}\n\
         }}\n"
    );
    let mut file = tempfile::NamedTempFile::new().map_err(|e| format!("a file for the ruleset: {e}"))?;
    file.write_all(rules.as_bytes())
        .map_err(|e| format!("writing the ruleset: {e}"))?;
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f"])
        .arg(file.path())
        .output()
        .map_err(|e| format!("running nft: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(describe(&format!("nft -f (blackhole {netns})\n{rules}"), &out)),
    }
}

/// Removes what [`blackhole`] added to `netns`: its packets flow again.
pub fn lift_blackhole(netns: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "delete", "table", "ip", BLACKHOLE_TABLE])
        .output()
        .map_err(|e| format!("running nft: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(describe(
            &format!("nft delete table ip {BLACKHOLE_TABLE} in {netns}"),
            &out,
        )),
    }
}

/// The value of field `key` in a `tracing` log line: `key=value`, or `key="value"` for a string.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split(' ').next(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_field_is_read_quoted_or_not() {
        let line = r#"2026-12-03T15:49:29Z  INFO access: connection closed reporter="source" dst=10.101.0.10:80 dst_cluster=west locality="remote" attempts=2"#;
        assert_eq!(log_field(line, "dst_cluster"), Some("west"));
        assert_eq!(log_field(line, "locality"), Some("remote"));
        assert_eq!(log_field(line, "attempts"), Some("2"));
        assert_eq!(log_field(line, "dst"), Some("10.101.0.10:80"));
        assert_eq!(log_field(line, "src"), None);
    }

    #[test]
    fn a_dump_names_a_services_clusters_and_weights() {
        let dump = serde_json::json!({"services": [
            {"name": "hello", "namespace": "demo", "weights": {"east": 90, "west": 10},
             "endpoints": [{"cluster": "west"}, {"cluster": "east"}, {"cluster": "east"}]},
            {"name": "other", "namespace": "demo", "weights": {}, "endpoints": [{"cluster": "north"}]},
        ]});
        assert_eq!(endpoint_clusters(&dump, "demo", "hello"), ["east", "west"]);
        let weights = service_weights(&dump, "demo", "hello");
        assert_eq!(weights.get("east"), Some(&90));
        assert_eq!(weights.len(), 2);
        assert!(service_weights(&dump, "demo", "other").is_empty());
        assert!(endpoint_clusters(&dump, "demo", "missing").is_empty());
    }
}
