//! The lab's state directory: everything `lab up` made is recorded here, so `lab down` removes
//! exactly that and nothing else.
//!
//! ```text
//! <state>/lab                    the lab's name
//! <state>/spec.yaml              the topology it was built from
//! <state>/created                every network namespace it made, one a line (written before each is made)
//! <state>/ready                  present once `lab up` finished
//! <state>/<cluster>/manifests/   what trellisd discovers (ns-<namespace>.yaml, lab.yaml)
//! <state>/<cluster>/ca/          the cluster CA (trellisd's --ca-dir)
//! <state>/<cluster>/tokens/<node> one-time join tokens (0600)
//! <state>/<cluster>/nodes/<node>/ a ztunnel's --state-dir (the gateway's too: east-west-gateway)
//! <state>/<cluster>/edge.nft     a federated cluster's gateway ruleset, as installed
//! <state>/etcd/pki/              a federation's etcd CA, server and client certificates (keys 0600)
//! <state>/etcd/data/             etcd's --data-dir
//! <state>/logs/<process>.log     stdout and stderr of each process
//! <state>/pids/<process>.pid     its pid; <process>.argv: its command line, NUL-separated
//! ```

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// One lab's state directory.
#[derive(Debug, Clone)]
pub struct State {
    pub dir: PathBuf,
}

/// A process `lab up` started, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub name: String,
    pub pid: u32,
    /// The command line it was started with (what /proc/<pid>/cmdline must end with).
    pub argv: Vec<String>,
}

impl State {
    pub fn new(dir: PathBuf) -> State {
        State { dir }
    }

    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    /// Whether the directory is a lab's state (it names its lab), so removing it is ours to do.
    /// An empty directory counts as none.
    pub fn check_ours(&self) -> anyhow::Result<bool> {
        if self.lab_name().is_file() {
            return Ok(true);
        }
        let empty = fs::read_dir(&self.dir).map(|mut d| d.next().is_none()).unwrap_or(true);
        if empty {
            return Ok(false);
        }
        anyhow::bail!(
            "{} exists and is not a lab's state directory (it has no `lab` file); nothing was changed: pick another --state-dir",
            self.dir.display()
        )
    }

    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.yaml")
    }

    pub fn lab_name(&self) -> PathBuf {
        self.dir.join("lab")
    }

    pub fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }

    pub fn manifests(&self, cluster: &str) -> PathBuf {
        self.dir.join(cluster).join("manifests")
    }

    pub fn ca(&self, cluster: &str) -> PathBuf {
        self.dir.join(cluster).join("ca")
    }

    pub fn token(&self, cluster: &str, node: &str) -> PathBuf {
        self.dir.join(cluster).join("tokens").join(node)
    }

    /// A node's ztunnel state directory (its saved node SVID).
    pub fn node_state(&self, cluster: &str, node: &str) -> PathBuf {
        self.dir.join(cluster).join("nodes").join(node)
    }

    /// The nftables ruleset of a federated cluster's gateway namespace.
    pub fn edge_rules(&self, cluster: &str) -> PathBuf {
        self.dir.join(cluster).join("edge.nft")
    }

    /// etcd's certificates and keys: `ca.pem`, `server.pem`, and `<user>.pem` per etcd user,
    /// each key next to its certificate as `<name>-key.pem`.
    pub fn etcd_pki(&self) -> PathBuf {
        self.dir.join("etcd").join("pki")
    }

    /// The certificate `<name>.pem` in [`State::etcd_pki`].
    pub fn etcd_cert(&self, name: &str) -> PathBuf {
        self.etcd_pki().join(format!("{name}.pem"))
    }

    /// The key `<name>-key.pem` in [`State::etcd_pki`].
    pub fn etcd_key(&self, name: &str) -> PathBuf {
        self.etcd_pki().join(format!("{name}-key.pem"))
    }

    /// etcd's `--data-dir`.
    pub fn etcd_data(&self) -> PathBuf {
        self.dir.join("etcd").join("data")
    }

    pub fn log(&self, process: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{process}.log"))
    }

    fn pids(&self) -> PathBuf {
        self.dir.join("pids")
    }

    /// Creates the directory skeleton (0700: it holds CA keys and join tokens).
    pub fn create(&self, lab: &str, spec: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [self.dir.clone(), self.dir.join("logs"), self.pids()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .with_context(|| format!("creating {}", d.display()))?;
        }
        write(&self.lab_name(), &format!("{lab}\n"))?;
        write(&self.spec(), spec)
    }

    /// Records network namespace `ns` as made by this lab (before it is made).
    pub fn record_netns(&self, ns: &str) -> anyhow::Result<()> {
        let path = self.dir.join("created");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{ns}")
            .and_then(|_| f.sync_data())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The network namespaces recorded, in creation order.
    pub fn recorded_netns(&self) -> Vec<String> {
        let text = fs::read_to_string(self.dir.join("created")).unwrap_or_default();
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// Records a started process.
    pub fn record_process(&self, p: &Recorded) -> anyhow::Result<()> {
        write(&self.pids().join(format!("{}.argv", p.name)), &p.argv.join("\0"))?;
        write(&self.pids().join(format!("{}.pid", p.name)), &format!("{}\n", p.pid))
    }

    /// Every recorded process, sorted by name. Unreadable records are skipped.
    pub fn recorded_processes(&self) -> Vec<Recorded> {
        let Ok(entries) = fs::read_dir(self.pids()) else {
            return Vec::new();
        };
        let mut all: Vec<Recorded> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".pid")?.to_string();
                let pid = fs::read_to_string(e.path()).ok()?.trim().parse().ok()?;
                let argv = fs::read_to_string(self.pids().join(format!("{name}.argv"))).ok()?;
                let argv = argv.split('\0').map(String::from).collect();
                Some(Recorded { name, pid, argv })
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Removes the whole directory.
    pub fn remove(&self) -> anyhow::Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Writes `text` to `path`, creating its parent directories.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes a secret readable by its owner only (0600 from creation).
pub fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path().join("lab"));
        state.create("t", "clusters: []\n").unwrap();
        state.record_netns("tl-t-u").unwrap();
        state.record_netns("tl-t-a-cp").unwrap();
        assert_eq!(state.recorded_netns(), ["tl-t-u", "tl-t-a-cp"]);
        let p = Recorded {
            name: "trellisd-a".into(),
            pid: 42,
            argv: vec!["/bin/trellisd".into(), "--cluster".into(), "a b".into()],
        };
        state.record_process(&p).unwrap();
        assert_eq!(state.recorded_processes(), [p]);
        state.remove().unwrap();
        assert!(!state.exists());
        state.remove().unwrap();
    }
}
