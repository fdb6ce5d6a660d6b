//! The manifest-directory source: every `*.yaml`/`*.yml` file under a directory, watched and
//! applied live. A file is applied whole or not at all: when it is malformed, or defines what
//! another file already defines, or claims a VIP or workload IP already in use, the problem is
//! reported with its path and line, and the file's last good version stays in force.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{Discovered, DiscoverySource, Inventory, ObjectKey};
use trellis_mesh::manifest::{parse_file, MAX_FILE_BYTES};

/// How often the directory is scanned for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// What the directory looks like, file by file: the last good objects of each file, and the
/// current problem of each file that has one.
#[derive(Debug, Default, Clone)]
pub struct DirectoryState {
    files: BTreeMap<PathBuf, Inventory>,
    problems: BTreeMap<PathBuf, String>,
}

/// Conflicts between `candidate` (the new version of `path`) and every other file.
fn conflicts(files: &BTreeMap<PathBuf, Inventory>, path: &Path, candidate: &Inventory) -> Result<(), String> {
    macro_rules! unique {
        ($field:ident, $kind:literal) => {
            for (key, (_, line)) in &candidate.$field {
                for (other, inv) in files.iter().filter(|(p, _)| p.as_path() != path) {
                    if let Some((_, at)) = inv.$field.get(key) {
                        return Err(format!(
                            "line {line}: {} {key} is already defined in {} line {at}",
                            $kind,
                            other.display()
                        ));
                    }
                }
            }
        };
    }
    unique!(namespaces, "Namespace");
    unique!(services, "Service");
    unique!(workloads, "Workload");
    unique!(routes, "HTTPRoute");
    unique!(policies, "AuthorizationPolicy");
    unique!(waypoints, "Waypoint");

    // A VIP belongs to one service, and a workload IP to one workload, across all files. The
    // maps hold references; text is only made for an actual conflict.
    let mut vips: BTreeMap<IpAddr, (&ObjectKey, Option<&Path>, u64)> = BTreeMap::new();
    let mut ips: BTreeMap<IpAddr, (&ObjectKey, Option<&Path>, u64)> = BTreeMap::new();
    for (p, inv) in files.iter().filter(|(p, _)| p.as_path() != path) {
        for (key, (svc, line)) in &inv.services {
            for vip in &svc.vips {
                vips.insert(*vip, (key, Some(p.as_path()), *line));
            }
        }
        for (key, (w, line)) in &inv.workloads {
            ips.insert(w.ip, (key, Some(p.as_path()), *line));
        }
    }
    let place = |file: Option<&Path>, line: u64| match file {
        Some(f) => format!("{} line {line}", f.display()),
        None => format!("line {line}"),
    };
    for (key, (svc, line)) in &candidate.services {
        for vip in &svc.vips {
            if let Some((owner, file, at)) = vips.get(vip) {
                return Err(format!(
                    "line {line}: Service {key} claims VIP {vip}, which Service {owner} ({}) already has",
                    place(*file, *at)
                ));
            }
            vips.insert(*vip, (key, None, *line));
        }
    }
    for (key, (w, line)) in &candidate.workloads {
        if let Some((owner, file, at)) = ips.get(&w.ip) {
            return Err(format!(
                "line {line}: Workload {key} claims IP {}, which Workload {owner} ({}) already has",
                w.ip,
                place(*file, *at)
            ));
        }
        ips.insert(w.ip, (key, None, *line));
    }
    Ok(())
}

impl DirectoryState {
    /// Applies the new text of `path`. On any problem the file's previous objects stay and the
    /// problem is recorded; returns whether the applied state changed.
    pub fn apply(&mut self, path: &Path, text: &str) -> bool {
        let parsed = parse_file(text).map_err(|e| e.to_string()).and_then(|inv| {
            conflicts(&self.files, path, &inv)?;
            Ok(inv)
        });
        match parsed {
            Ok(inv) => {
                self.problems.remove(path);
                let changed = self.files.get(path) != Some(&inv);
                self.files.insert(path.to_path_buf(), inv);
                changed
            }
            Err(problem) => {
                tracing::warn!(file = %path.display(), %problem, "manifest refused; its last good version stays");
                self.problems.insert(path.to_path_buf(), problem);
                false
            }
        }
    }

    /// Forgets a deleted file and its objects; returns whether the applied state changed.
    pub fn remove(&mut self, path: &Path) -> bool {
        self.problems.remove(path);
        self.files.remove(path).is_some()
    }

    /// The merged view of every file.
    pub fn discovered(&self) -> Discovered {
        let mut inventory = Inventory::default();
        for inv in self.files.values() {
            inventory.namespaces.extend(inv.namespaces.clone());
            inventory.services.extend(inv.services.clone());
            inventory.workloads.extend(inv.workloads.clone());
            inventory.routes.extend(inv.routes.clone());
            inventory.policies.extend(inv.policies.clone());
            inventory.waypoints.extend(inv.waypoints.clone());
        }
        let problems = self
            .problems
            .iter()
            .map(|(p, problem)| format!("{}: {problem}", p.display()))
            .collect();
        Discovered { inventory, problems }
    }
}

/// Every manifest file under `dir`, with its modification time and length.
fn scan(dir: &Path) -> BTreeMap<PathBuf, (SystemTime, u64)> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            let Ok(meta) = entry.metadata() else { continue };
            if hidden {
                continue;
            }
            if meta.is_dir() {
                pending.push(path);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                found.insert(path, (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len()));
            }
        }
    }
    found
}

/// Watches a manifest directory by polling it every [`POLL_INTERVAL`].
pub struct ManifestDirectory {
    dir: PathBuf,
}

impl ManifestDirectory {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    /// Reads the directory once: the state every file defines now.
    pub fn load(&self, state: &mut DirectoryState, seen: &mut BTreeMap<PathBuf, (SystemTime, u64)>) -> bool {
        let now = scan(&self.dir);
        let mut changed = false;
        let gone: BTreeSet<PathBuf> = seen.keys().filter(|p| !now.contains_key(*p)).cloned().collect();
        for path in gone {
            changed |= state.remove(&path);
            seen.remove(&path);
        }
        for (path, stamp) in now {
            if seen.get(&path) == Some(&stamp) {
                continue;
            }
            seen.insert(path.clone(), stamp);
            if stamp.1 > MAX_FILE_BYTES as u64 {
                changed |= state.apply(&path, &"#".repeat(MAX_FILE_BYTES + 1));
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => changed |= state.apply(&path, &text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => changed |= state.remove(&path),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read manifest");
                    state.problems.insert(path.clone(), format!("cannot read: {e}"));
                }
            }
        }
        changed
    }
}

impl DiscoverySource for ManifestDirectory {
    fn run(self: Box<Self>, out: watch::Sender<Arc<Discovered>>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut state = DirectoryState::default();
            let mut seen = BTreeMap::new();
            let mut last_problems = Vec::new();
            loop {
                let dir = self.dir.clone();
                let (changed, s, seen_after) = tokio::task::spawn_blocking({
                    let mut state = std::mem::take(&mut state);
                    let mut seen = std::mem::take(&mut seen);
                    let source = ManifestDirectory { dir };
                    move || {
                        let changed = source.load(&mut state, &mut seen);
                        (changed, state, seen)
                    }
                })
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "manifest scan failed");
                    (false, DirectoryState::default(), BTreeMap::new())
                });
                state = s;
                seen = seen_after;
                let discovered = state.discovered();
                if changed || discovered.problems != last_problems {
                    last_problems = discovered.problems.clone();
                    if out.send(Arc::new(discovered)).is_err() {
                        return;
                    }
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, mode: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    trellis.io/dataplane-mode: {mode}\n"
        )
    }

    fn svc(name: &str, vip: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  clusterIP: {vip}\n  ports: [{{port: 80}}]\n")
    }

    #[test]
    fn a_bad_file_keeps_its_last_good_version_and_says_where() {
        let mut state = DirectoryState::default();
        let a = Path::new("/m/a.yaml");
        assert!(state.apply(a, &ns("shop", "ambient")));
        assert!(!state.apply(a, "apiVersion: v1\nkind: Namespace\nmetadata: {name: [\n"));
        let d = state.discovered();
        assert!(d.inventory.namespaces.contains_key("shop"), "last good state kept");
        assert_eq!(d.problems.len(), 1);
        assert!(d.problems[0].starts_with("/m/a.yaml: line "), "{:?}", d.problems);
        assert!(
            state.apply(a, &ns("shop", "none")),
            "a fixed file applies and clears the problem"
        );
        assert!(state.discovered().problems.is_empty());
    }

    #[test]
    fn a_name_defined_in_two_files_is_refused_in_the_second() {
        let mut state = DirectoryState::default();
        state.apply(Path::new("/m/a.yaml"), &ns("shop", "ambient"));
        assert!(!state.apply(Path::new("/m/b.yaml"), &ns("shop", "none")));
        let d = state.discovered();
        assert_eq!(
            d.inventory.namespaces["shop"].0.labels["trellis.io/dataplane-mode"],
            "ambient"
        );
        assert!(
            d.problems[0].contains("already defined in /m/a.yaml line 1"),
            "{:?}",
            d.problems
        );
    }

    #[test]
    fn conflicting_vips_are_refused() {
        let mut state = DirectoryState::default();
        state.apply(Path::new("/m/a.yaml"), &svc("cart", "10.96.0.10"));
        assert!(!state.apply(Path::new("/m/b.yaml"), &svc("web", "10.96.0.10")));
        let d = state.discovered();
        assert!(d.problems[0].contains("claims VIP 10.96.0.10"), "{:?}", d.problems);
        assert!(!d.inventory.services.keys().any(|k| k.name == "web"));
        // Within one file too.
        let both = format!("{}---\n{}", svc("x", "10.96.0.20"), svc("y", "10.96.0.20"));
        assert!(!state.apply(Path::new("/m/c.yaml"), &both));
    }

    #[test]
    fn deleting_a_file_removes_its_objects() {
        let mut state = DirectoryState::default();
        state.apply(Path::new("/m/a.yaml"), &ns("shop", "ambient"));
        assert!(state.remove(Path::new("/m/a.yaml")));
        assert!(state.discovered().inventory.is_empty());
    }

    #[test]
    fn the_directory_is_read_recursively_and_hidden_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.yaml"), ns("shop", "ambient")).unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), ns("hidden", "ambient")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        let source = ManifestDirectory::new(dir.path());
        let mut state = DirectoryState::default();
        let mut seen = BTreeMap::new();
        assert!(source.load(&mut state, &mut seen));
        let d = state.discovered();
        assert_eq!(d.inventory.namespaces.keys().collect::<Vec<_>>(), vec!["shop"]);
        assert!(!source.load(&mut state, &mut seen), "nothing changed");
    }
}
