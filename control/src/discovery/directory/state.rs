//! What the manifest directory defines, file by file, and the rules for folding a [`Scan`] into
//! it. Pure: no I/O, no clock.
//!
//! - A file is applied whole or not at all. When it is malformed, defines what another file
//!   already defines, claims a VIP or workload IP already in use, cannot be read, is too large,
//!   is no file to read at all (a FIFO, a device, a symbolic link leading out of the directory),
//!   or crashes the parser, the problem is recorded and the file's last good version stays in
//!   force.
//! - A file's objects go only when a complete listing of its directory no longer names it: a
//!   directory that could not be listed (gone, out of file descriptors, ...) keeps every file
//!   last seen under it.
//! - A file refused only because it clashes with another is tried again whenever another file
//!   changes, so moving an object from one file to another converges whatever the order.
//! - Until every directory has been listed once, and every file in it read once (or found
//!   unreadable [`UNREAD_SCANS_BEFORE_SYNC`] times), the state is not [`Discovered::synced`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use super::scan::{Entry, Scan, Seen};
use crate::discovery::{Discovered, Inventory, ObjectKey};
use trellis_mesh::manifest::{parse_file, ManifestError, MAX_FILE_BYTES};

/// Turns a file's text into its objects; [`parse_file`] outside tests.
pub type Parser = fn(&str) -> Result<Inventory, ManifestError>;

/// What the directory looks like, file by file: the last good objects of each file, and the
/// current problem of each file or directory that has one.
#[derive(Debug, Clone)]
pub struct DirectoryState {
    files: BTreeMap<PathBuf, Inventory>,
    problems: BTreeMap<PathBuf, String>,
    /// Directories that could not be listed in full, with why.
    unlisted: BTreeMap<PathBuf, String>,
    /// Files refused only for a clash with another file, parsed, waiting for it to let go.
    blocked: BTreeMap<PathBuf, Inventory>,
    /// What the last scan died of, until a scan completes.
    crashed: Option<String>,
    /// Files that could not be read and have no good version yet, with how many scans failed.
    unread: BTreeMap<PathBuf, u32>,
    synced: bool,
    parse: Parser,
}

/// Scans that a file which exists but cannot be read (and has no good version yet) may hold
/// back the first publication: with the retry backoff, about a second and a half. A file that
/// stays unreadable longer is reported and the mesh is served without it, rather than never.
pub const UNREAD_SCANS_BEFORE_SYNC: u32 = 5;

impl Default for DirectoryState {
    fn default() -> Self {
        Self::with_parser(parse_file)
    }
}

/// What folding one scan did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Absorbed {
    /// The merged objects may differ from before.
    pub changed: bool,
    /// Something could not be listed or read: scan again soon, even if nothing signals a change.
    pub retry: bool,
}

/// Why a file's text was not applied.
enum Refusal {
    /// The file itself is wrong (or crashed the parser): only an edit can fix it.
    Invalid(String),
    /// It clashes with another file, which may let go.
    Clash(Box<Inventory>, String),
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

/// The text of a panic's payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

impl DirectoryState {
    /// An empty state whose files are parsed by `parse`.
    pub fn with_parser(parse: Parser) -> Self {
        Self {
            files: BTreeMap::new(),
            problems: BTreeMap::new(),
            unlisted: BTreeMap::new(),
            blocked: BTreeMap::new(),
            crashed: None,
            unread: BTreeMap::new(),
            synced: false,
            parse,
        }
    }

    /// Parses `text`, a parser panic included in the refusals.
    fn parse(&self, text: &str) -> Result<Inventory, String> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| (self.parse)(text))) {
            Ok(parsed) => parsed.map_err(|e| e.to_string()),
            Err(payload) => Err(format!(
                "the manifest parser crashed on this file ({}); please report it",
                panic_text(payload.as_ref())
            )),
        }
    }

    /// Puts `inv` in force for `path` unless it clashes with another file.
    fn admit(&mut self, path: &Path, inv: Inventory) -> Result<bool, Refusal> {
        if let Err(clash) = conflicts(&self.files, path, &inv) {
            return Err(Refusal::Clash(Box::new(inv), clash));
        }
        self.problems.remove(path);
        self.blocked.remove(path);
        let changed = self.files.get(path) != Some(&inv);
        self.files.insert(path.to_path_buf(), inv);
        Ok(changed)
    }

    /// Records `problem` for `path`, logging it when it is new.
    fn refuse(&mut self, path: &Path, problem: String) {
        if self.problems.get(path) != Some(&problem) {
            tracing::warn!(file = %path.display(), %problem, "manifest refused; its last good version stays");
        }
        self.problems.insert(path.to_path_buf(), problem);
    }

    /// Applies the new text of `path`. On any problem the file's previous objects stay and the
    /// problem is recorded; returns whether the applied state changed.
    pub fn apply(&mut self, path: &Path, text: &str) -> bool {
        let result = self
            .parse(text)
            .map_err(Refusal::Invalid)
            .and_then(|inv| self.admit(path, inv));
        match result {
            Ok(changed) => changed,
            Err(Refusal::Invalid(problem)) => {
                self.blocked.remove(path);
                self.refuse(path, problem);
                false
            }
            Err(Refusal::Clash(inv, problem)) => {
                self.blocked.insert(path.to_path_buf(), *inv);
                self.refuse(path, problem);
                false
            }
        }
    }

    /// Forgets a deleted file and its objects; returns whether the applied state changed.
    pub fn remove(&mut self, path: &Path) -> bool {
        self.problems.remove(path);
        self.blocked.remove(path);
        self.unread.remove(path);
        self.files.remove(path).is_some()
    }

    /// Tries again every file refused for a clash, until none more applies.
    fn retry_blocked(&mut self) -> bool {
        let mut changed = false;
        loop {
            let mut progress = false;
            for (path, inv) in self.blocked.clone() {
                if let Ok(c) = self.admit(&path, inv) {
                    progress = true;
                    changed |= c;
                }
            }
            if !progress {
                return changed;
            }
        }
    }

    /// Folds one scan in, with the stamps of what was absorbed in `seen` (see the module doc for
    /// the rules).
    pub fn absorb(&mut self, seen: &mut Seen, scan: Scan) -> Absorbed {
        let Scan { files, unlisted } = scan;
        let mut changed = false;
        // Deletions first, so that an object moving from a deleted file to a new one is no clash.
        let listed_in_full = |p: &Path| !unlisted.keys().any(|d| p.starts_with(d));
        let gone: BTreeSet<PathBuf> = (self.files.keys())
            .chain(self.problems.keys())
            .chain(seen.keys())
            .filter(|p| !files.contains_key(*p) && listed_in_full(p))
            .cloned()
            .collect();
        for path in gone {
            changed |= self.remove(&path);
            seen.remove(&path);
        }
        for (dir, why) in &unlisted {
            if self.unlisted.get(dir) != Some(why) {
                tracing::warn!(dir = %dir.display(), error = %why, "cannot list manifests; the files last seen there keep their last good version");
            }
        }
        let mut retry = !unlisted.is_empty();
        self.unlisted = unlisted;
        for (path, entry) in files {
            match entry {
                Entry::Unchanged => {}
                Entry::Read { stamp, text } => {
                    self.unread.remove(&path);
                    changed |= self.apply(&path, &text);
                    seen.insert(path, stamp);
                }
                Entry::TooLarge { stamp } => {
                    let message = if stamp.len > MAX_FILE_BYTES as u64 {
                        format!("the file is {} bytes; the limit is {MAX_FILE_BYTES}", stamp.len)
                    } else {
                        format!("the file grew past the limit of {MAX_FILE_BYTES} bytes while being read")
                    };
                    let problem = ManifestError { line: 0, message };
                    self.blocked.remove(&path);
                    self.refuse(&path, problem.to_string());
                    seen.insert(path, stamp);
                }
                // Not a file we read (a FIFO, a device, a link leading out): reported, never
                // retried until it changes, and never holding back the first publication.
                Entry::Refused(why) => {
                    self.unread.remove(&path);
                    self.blocked.remove(&path);
                    self.refuse(&path, format!("not read: {why}"));
                    seen.remove(&path);
                }
                Entry::Unreadable(why) => {
                    if !self.files.contains_key(&path) {
                        *self.unread.entry(path.clone()).or_default() += 1;
                    }
                    self.refuse(&path, format!("cannot read: {why}"));
                    seen.remove(&path);
                    retry = true;
                }
            }
        }
        if changed && !self.blocked.is_empty() {
            changed |= self.retry_blocked();
        }
        // Not synced while a file that exists was never read (up to a bound): publishing without
        // it would take its objects (a DENY policy, say) from every node until it is read.
        let waiting = self.unread.values().any(|n| *n < UNREAD_SCANS_BEFORE_SYNC);
        self.synced |= self.unlisted.is_empty() && !waiting;
        self.crashed = None;
        Absorbed { changed, retry }
    }

    /// Records that a scan died (`what` says of what): every file keeps what it had.
    pub fn note_crash(&mut self, what: String) {
        tracing::error!(problem = %what, "manifest scan crashed; every file keeps its last good version");
        self.crashed = Some(what);
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
            inventory.federations.extend(inv.federations.clone());
        }
        let crashed = self
            .crashed
            .iter()
            .map(|c| format!("manifest scan crashed: {c}; serving the last good version"));
        let unlisted = self.unlisted.iter().map(|(d, why)| {
            format!(
                "{}: cannot list: {why}; the files last seen under it keep their last good version",
                d.display()
            )
        });
        let files = (self.problems.iter()).map(|(p, problem)| format!("{}: {problem}", p.display()));
        Discovered {
            inventory,
            problems: crashed.chain(unlisted).chain(files).collect(),
            synced: self.synced,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::discovery::directory::scan::Stamp;

    fn ns(name: &str, mode: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    trellis.io/dataplane-mode: {mode}\n"
        )
    }

    fn svc(name: &str, vip: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  clusterIP: {vip}\n  ports: [{{port: 80}}]\n")
    }

    fn stamp(n: u64) -> Stamp {
        Stamp {
            modified: SystemTime::UNIX_EPOCH,
            len: n,
            inode: n,
        }
    }

    fn read(n: u64, text: &str) -> Entry {
        Entry::Read {
            stamp: stamp(n),
            text: text.to_string(),
        }
    }

    fn scan<const N: usize>(files: [(&str, Entry); N]) -> Scan {
        Scan {
            files: files.into_iter().map(|(p, e)| (PathBuf::from(p), e)).collect(),
            unlisted: BTreeMap::new(),
        }
    }

    fn namespaces(state: &DirectoryState) -> Vec<String> {
        state.discovered().inventory.namespaces.into_keys().collect()
    }

    /// `/m/a.yaml` defines `shop`, `/m/sub/b.yaml` defines `cart`: both absorbed.
    fn two_files() -> (DirectoryState, Seen) {
        let mut state = DirectoryState::default();
        let mut seen = Seen::new();
        let first = state.absorb(
            &mut seen,
            scan([
                ("/m/a.yaml", read(1, &ns("shop", "ambient"))),
                ("/m/sub/b.yaml", read(2, &ns("cart", "ambient"))),
            ]),
        );
        assert_eq!(
            first,
            Absorbed {
                changed: true,
                retry: false
            }
        );
        (state, seen)
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
    fn a_file_missing_from_a_complete_listing_is_deleted() {
        let (mut state, mut seen) = two_files();
        let absorbed = state.absorb(&mut seen, scan([("/m/a.yaml", Entry::Unchanged)]));
        assert_eq!(
            absorbed,
            Absorbed {
                changed: true,
                retry: false
            }
        );
        assert_eq!(namespaces(&state), ["shop"]);
        assert!(!seen.contains_key(Path::new("/m/sub/b.yaml")));
    }

    #[test]
    fn files_under_a_directory_that_could_not_be_listed_keep_their_last_good_version() {
        let (mut state, mut seen) = two_files();
        // The subdirectory could not be listed: b.yaml may still be there.
        let mut s = scan([("/m/a.yaml", Entry::Unchanged)]);
        s.unlisted
            .insert("/m/sub".into(), "Too many open files (os error 24)".into());
        assert_eq!(
            state.absorb(&mut seen, s),
            Absorbed {
                changed: false,
                retry: true
            }
        );
        assert_eq!(namespaces(&state), ["cart", "shop"]);
        let problems = state.discovered().problems;
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("/m/sub: cannot list: Too many open files"),
            "{problems:?}"
        );
        // The root itself: nothing is listed, everything stays.
        let mut s = Scan::default();
        s.unlisted
            .insert("/m".into(), "No such file or directory (os error 2)".into());
        assert!(!state.absorb(&mut seen, s).changed);
        assert_eq!(namespaces(&state), ["cart", "shop"]);
        // Listed again in full: the problem goes, and so does a file that really went.
        let absorbed = state.absorb(&mut seen, scan([("/m/a.yaml", Entry::Unchanged)]));
        assert_eq!(
            absorbed,
            Absorbed {
                changed: true,
                retry: false
            }
        );
        assert_eq!(namespaces(&state), ["shop"]);
        assert!(state.discovered().problems.is_empty());
    }

    #[test]
    fn an_unreadable_file_keeps_its_last_good_version_and_is_read_again() {
        let (mut state, mut seen) = two_files();
        let s = scan([
            (
                "/m/a.yaml",
                Entry::Unreadable("No such file or directory (os error 2)".into()),
            ),
            ("/m/sub/b.yaml", Entry::Unchanged),
        ]);
        assert_eq!(
            state.absorb(&mut seen, s),
            Absorbed {
                changed: false,
                retry: true
            }
        );
        assert_eq!(namespaces(&state), ["cart", "shop"]);
        assert_eq!(
            state.discovered().problems,
            ["/m/a.yaml: cannot read: No such file or directory (os error 2)"]
        );
        assert!(
            !seen.contains_key(Path::new("/m/a.yaml")),
            "its stamp is forgotten, so it is read again"
        );
        let s = scan([
            ("/m/a.yaml", read(1, &ns("shop", "none"))),
            ("/m/sub/b.yaml", Entry::Unchanged),
        ]);
        assert_eq!(
            state.absorb(&mut seen, s),
            Absorbed {
                changed: true,
                retry: false
            }
        );
        assert!(state.discovered().problems.is_empty());
    }

    #[test]
    fn a_too_large_file_is_refused_and_keeps_its_last_good_version() {
        let (mut state, mut seen) = two_files();
        let big = stamp(MAX_FILE_BYTES as u64 + 1);
        let s = scan([
            ("/m/a.yaml", Entry::TooLarge { stamp: big }),
            ("/m/sub/b.yaml", Entry::Unchanged),
        ]);
        assert_eq!(
            state.absorb(&mut seen, s),
            Absorbed {
                changed: false,
                retry: false
            }
        );
        assert_eq!(namespaces(&state), ["cart", "shop"]);
        assert!(state.discovered().problems[0].contains("the limit is"));
        assert_eq!(seen[Path::new("/m/a.yaml")], big, "not read again until it changes");
    }

    fn panics_on_boom(text: &str) -> Result<Inventory, ManifestError> {
        if text.contains("boom") {
            panic!("injected parser panic");
        }
        parse_file(text)
    }

    #[test]
    fn a_parser_panic_keeps_the_files_last_good_version_and_is_reported() {
        let mut state = DirectoryState::with_parser(panics_on_boom);
        let mut seen = Seen::new();
        state.absorb(&mut seen, scan([("/m/a.yaml", read(1, &ns("shop", "ambient")))]));
        let absorbed = state.absorb(&mut seen, scan([("/m/a.yaml", read(2, "# boom\n"))]));
        assert_eq!(
            absorbed,
            Absorbed {
                changed: false,
                retry: false
            }
        );
        let d = state.discovered();
        assert_eq!(d.inventory.namespaces.keys().collect::<Vec<_>>(), ["shop"]);
        assert_eq!(
            d.problems,
            ["/m/a.yaml: the manifest parser crashed on this file (injected parser panic); please report it"]
        );
    }

    #[test]
    fn an_object_moved_between_files_applies_whatever_the_order() {
        let mut state = DirectoryState::default();
        let mut seen = Seen::new();
        state.absorb(&mut seen, scan([("/m/b.yaml", read(1, &ns("shop", "ambient")))]));
        // One edit moves `shop` from b.yaml to a.yaml; a.yaml is folded in first and clashes.
        let s = scan([("/m/a.yaml", read(2, &ns("shop", "none"))), ("/m/b.yaml", read(3, ""))]);
        assert!(state.absorb(&mut seen, s).changed);
        let d = state.discovered();
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(
            d.inventory.namespaces["shop"].0.labels["trellis.io/dataplane-mode"],
            "none"
        );
    }

    #[test]
    fn a_clash_clears_when_the_other_file_lets_go_later() {
        let mut state = DirectoryState::default();
        let mut seen = Seen::new();
        state.absorb(&mut seen, scan([("/m/a.yaml", read(1, &ns("shop", "ambient")))]));
        let s = scan([
            ("/m/a.yaml", Entry::Unchanged),
            ("/m/b.yaml", read(2, &ns("shop", "none"))),
        ]);
        state.absorb(&mut seen, s);
        assert_eq!(state.discovered().problems.len(), 1);
        let s = scan([("/m/a.yaml", read(3, "")), ("/m/b.yaml", Entry::Unchanged)]);
        assert!(state.absorb(&mut seen, s).changed);
        let d = state.discovered();
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        assert_eq!(
            d.inventory.namespaces["shop"].0.labels["trellis.io/dataplane-mode"],
            "none"
        );
    }

    #[test]
    fn nothing_is_synced_until_every_directory_was_listed() {
        let mut state = DirectoryState::default();
        let mut seen = Seen::new();
        let mut s = scan([("/m/a.yaml", read(1, &ns("shop", "ambient")))]);
        s.unlisted
            .insert("/m/sub".into(), "Too many open files (os error 24)".into());
        state.absorb(&mut seen, s);
        assert!(!state.discovered().synced);
        state.absorb(&mut seen, scan([("/m/a.yaml", Entry::Unchanged)]));
        assert!(state.discovered().synced);
        let mut s = Scan::default();
        s.unlisted.insert("/m".into(), "gone".into());
        state.absorb(&mut seen, s);
        assert!(
            state.discovered().synced,
            "once synced, a failed listing keeps the last good state instead"
        );
    }

    #[test]
    fn a_file_that_exists_but_cannot_be_read_yet_holds_back_the_first_publication() {
        let mut state = DirectoryState::default();
        let mut seen = Seen::new();
        let unreadable = || Entry::Unreadable("Too many open files (os error 24)".into());
        state.absorb(
            &mut seen,
            scan([
                ("/m/a.yaml", read(1, &ns("shop", "ambient"))),
                ("/m/deny.yaml", unreadable()),
            ]),
        );
        assert!(
            !state.discovered().synced,
            "deny.yaml's policy would be missing everywhere"
        );
        state.absorb(
            &mut seen,
            scan([
                ("/m/a.yaml", Entry::Unchanged),
                ("/m/deny.yaml", read(2, &ns("legacy", "ambient"))),
            ]),
        );
        let d = state.discovered();
        assert!(d.synced);
        assert_eq!(d.inventory.namespaces.len(), 2);

        let mut stuck = DirectoryState::default();
        let mut seen = Seen::new();
        for n in 1..=UNREAD_SCANS_BEFORE_SYNC {
            assert!(!stuck.discovered().synced);
            stuck.absorb(&mut seen, scan([("/m/fifo.yaml", unreadable())]));
            assert_eq!(stuck.discovered().synced, n == UNREAD_SCANS_BEFORE_SYNC, "scan {n}");
        }
        assert!(
            stuck.discovered().problems.iter().any(|p| p.contains("fifo.yaml")),
            "and it says why"
        );
    }

    #[test]
    fn a_refused_file_is_reported_but_neither_retried_nor_holding_back_the_first_publication() {
        let mut state = DirectoryState::default();
        let mut seen = Seen::new();
        let fifo = || Entry::Refused("a FIFO, not a regular file; only regular files are read".into());
        let absorbed = state.absorb(
            &mut seen,
            scan([("/m/a.yaml", read(1, &ns("shop", "ambient"))), ("/m/pipe.yaml", fifo())]),
        );
        assert_eq!(
            absorbed,
            Absorbed {
                changed: true,
                retry: false
            }
        );
        let d = state.discovered();
        assert!(d.synced, "a FIFO never becomes readable: nothing to wait for");
        assert_eq!(
            d.problems,
            ["/m/pipe.yaml: not read: a FIFO, not a regular file; only regular files are read"]
        );
        // Removed: the problem goes with it.
        state.absorb(&mut seen, scan([("/m/a.yaml", Entry::Unchanged)]));
        assert!(state.discovered().problems.is_empty());
    }

    #[test]
    fn a_file_that_grew_past_the_limit_while_being_read_says_so() {
        let (mut state, mut seen) = two_files();
        let s = scan([
            ("/m/a.yaml", Entry::TooLarge { stamp: stamp(10) }),
            ("/m/sub/b.yaml", Entry::Unchanged),
        ]);
        state.absorb(&mut seen, s);
        let problems = state.discovered().problems;
        assert!(problems[0].contains("grew past the limit"), "{problems:?}");
    }

    #[test]
    fn a_crash_is_reported_until_a_scan_completes() {
        let (mut state, mut seen) = two_files();
        state.note_crash("index out of bounds".into());
        let d = state.discovered();
        assert_eq!(d.inventory.namespaces.len(), 2);
        assert_eq!(
            d.problems,
            ["manifest scan crashed: index out of bounds; serving the last good version"]
        );
        state.absorb(
            &mut seen,
            scan([("/m/a.yaml", Entry::Unchanged), ("/m/sub/b.yaml", Entry::Unchanged)]),
        );
        assert!(state.discovered().problems.is_empty());
    }
}
