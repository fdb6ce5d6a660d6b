//! The manifest-directory source running for real on a temporary directory: edits arrive
//! through inotify (or the polling fallback), and every failure a real file system can produce
//! (a FIFO or a symlink loop where a manifest was, a file that vanished after the listing, the
//! whole directory removed, no file descriptor left) keeps the last good objects of every file
//! that still exists, and says why. Nothing but regular files inside the directory is read: a
//! FIFO, a link to a device or out of the directory is reported by name, never opened.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use trellis_control::discovery::directory::{DirectoryState, ManifestDirectory, Seen, WatchMode};
use trellis_control::discovery::{Discovered, DiscoverySource};

fn ns(name: &str, mode: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    trellis.io/dataplane-mode: {mode}\n")
}

/// Writes a manifest atomically (as editors and `trellis namespace label` do).
fn write(dir: &Path, name: &str, text: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn mode_of(d: &Discovered, ns: &str) -> Option<String> {
    let (obj, _) = d.inventory.namespaces.get(ns)?;
    obj.labels.get("trellis.io/dataplane-mode").cloned()
}

fn names(d: &Discovered) -> Vec<String> {
    d.inventory.namespaces.keys().cloned().collect()
}

/// A running source; stopped when dropped.
struct Source {
    rx: watch::Receiver<Arc<Discovered>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Source {
    fn start(dir: &Path, mode: WatchMode) -> Self {
        let (tx, rx) = watch::channel(Arc::new(Discovered::default()));
        let source = Box::new(ManifestDirectory::new(dir).with_mode(mode));
        Self {
            rx,
            task: tokio::spawn(source.run(tx)),
        }
    }

    /// The first published snapshot that satisfies `f`.
    async fn until(&mut self, what: &str, f: impl Fn(&Discovered) -> bool) -> Arc<Discovered> {
        let found = match tokio::time::timeout(Duration::from_secs(10), self.rx.wait_for(|d| f(d))).await {
            Ok(Ok(d)) => Some(d.clone()),
            _ => None,
        };
        found.unwrap_or_else(|| panic!("timed out waiting for {what}; last: {:?}", self.rx.borrow()))
    }
}

/// A directory with `a.yaml` (namespace `shop`, ambient) and `sub/b.yaml` (`cart`, ambient), and
/// a source on it that has published both.
async fn two_files(mode: WatchMode) -> (tempfile::TempDir, Source) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", ns("shop", "ambient").as_bytes());
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(&dir.path().join("sub"), "b.yaml", ns("cart", "ambient").as_bytes());
    let mut source = Source::start(dir.path(), mode);
    let first = source.until("both files", |d| names(d) == ["cart", "shop"]).await;
    assert!(first.synced && first.problems.is_empty(), "{first:?}");
    (dir, source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_renamed_into_place_are_picked_up_at_once() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    for (i, mode) in ["none", "ambient", "none"].into_iter().enumerate() {
        let started = Instant::now();
        write(dir.path(), "a.yaml", ns("shop", mode).as_bytes());
        source
            .until("the edit", |d| mode_of(d, "shop").as_deref() == Some(mode))
            .await;
        println!("edit {i} seen after {:?}", started.elapsed());
    }
    // A new subdirectory, and a file written in place rather than renamed.
    std::fs::create_dir(dir.path().join("new")).unwrap();
    std::fs::write(dir.path().join("new/c.yaml"), ns("web", "ambient")).unwrap();
    source
        .until("a file in a new subdirectory", |d| names(d) == ["cart", "shop", "web"])
        .await;
    std::fs::remove_file(dir.path().join("sub/b.yaml")).unwrap();
    source.until("a deletion", |d| names(d) == ["shop", "web"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_polling_fallback_picks_up_edits_and_deletions() {
    let (dir, mut source) = two_files(WatchMode::Poll).await;
    write(dir.path(), "a.yaml", ns("shop", "none").as_bytes());
    source
        .until("the edit", |d| mode_of(d, "shop").as_deref() == Some("none"))
        .await;
    std::fs::remove_file(dir.path().join("sub/b.yaml")).unwrap();
    source.until("a deletion", |d| names(d) == ["shop"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_is_published_in_a_few_snapshots() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    let mut rx = source.rx.clone();
    let counter = tokio::spawn(async move {
        let mut published = 0;
        while rx.changed().await.is_ok() {
            published += 1;
            if rx.borrow_and_update().inventory.namespaces.len() == 22 {
                return published;
            }
        }
        published
    });
    let root = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        for i in 0..20 {
            write(
                &root,
                &format!("burst-{i}.yaml"),
                ns(&format!("burst-{i}"), "ambient").as_bytes(),
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .await
    .unwrap();
    source
        .until("the whole burst", |d| d.inventory.namespaces.len() == 22)
        .await;
    let published = tokio::time::timeout(Duration::from_secs(5), counter)
        .await
        .unwrap()
        .unwrap();
    assert!(published < 20, "20 writes in a burst made {published} snapshots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_removed_keeps_its_last_good_state_until_it_is_back() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    std::fs::remove_dir_all(dir.path()).unwrap();
    let d = source.until("the problem", |d| !d.problems.is_empty()).await;
    assert_eq!(names(&d), ["cart", "shop"], "nothing published as deleted");
    assert!(
        d.problems[0].contains("cannot list: No such file or directory"),
        "{:?}",
        d.problems
    );
    // Back, with one file: the other one was really deleted.
    std::fs::create_dir(dir.path()).unwrap();
    write(dir.path(), "a.yaml", ns("shop", "none").as_bytes());
    let d = source
        .until("the new directory", |d| names(d) == ["shop"] && d.problems.is_empty())
        .await;
    assert_eq!(mode_of(&d, "shop").as_deref(), Some("none"));
    // And the new directory is watched.
    write(dir.path(), "a.yaml", ns("shop", "ambient").as_bytes());
    source
        .until("an edit in the new directory", |d| {
            mode_of(d, "shop").as_deref() == Some("ambient")
        })
        .await;
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {}",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_place_of_a_manifest_keeps_its_last_good_version_and_does_not_stall_the_scan() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    let tmp = dir.path().join(".fifo");
    mkfifo(&tmp);
    std::fs::rename(&tmp, dir.path().join("a.yaml")).unwrap();
    let d = source.until("the problem", |d| !d.problems.is_empty()).await;
    assert_eq!(names(&d), ["cart", "shop"]);
    assert!(
        d.problems[0].ends_with("a.yaml: not read: a FIFO, not a regular file; only regular files are read"),
        "{:?}",
        d.problems
    );
    // Other files still apply: the scan did not hang on the FIFO.
    write(&dir.path().join("sub"), "b.yaml", ns("cart", "none").as_bytes());
    let d = source
        .until("the other edit", |d| mode_of(d, "cart").as_deref() == Some("none"))
        .await;
    assert_eq!(mode_of(&d, "shop").as_deref(), Some("ambient"));
    write(dir.path(), "a.yaml", ns("shop", "none").as_bytes());
    source
        .until("the fixed file", |d| {
            mode_of(d, "shop").as_deref() == Some("none") && d.problems.is_empty()
        })
        .await;
}

fn problem_of<'a>(d: &'a Discovered, file: &str) -> Option<&'a String> {
    d.problems.iter().find(|p| p.contains(file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_fifo_is_reported_by_name_without_stalling_and_its_removal_clears_the_problem() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    mkfifo(&dir.path().join("pipe.yaml"));
    let d = source
        .until("the FIFO reported", |d| problem_of(d, "pipe.yaml").is_some())
        .await;
    assert!(
        problem_of(&d, "pipe.yaml")
            .unwrap()
            .contains("a FIFO, not a regular file"),
        "{:?}",
        d.problems
    );
    assert!(d.synced);
    // Discovery goes on around it.
    write(dir.path(), "a.yaml", ns("shop", "none").as_bytes());
    source
        .until("an edit beside the FIFO", |d| {
            mode_of(d, "shop").as_deref() == Some("none")
        })
        .await;
    std::fs::remove_file(dir.path().join("pipe.yaml")).unwrap();
    source
        .until("no problem once the FIFO is gone", |d| d.problems.is_empty())
        .await;
    write(dir.path(), "a.yaml", ns("shop", "ambient").as_bytes());
    source
        .until("edits still applied", |d| {
            mode_of(d, "shop").as_deref() == Some("ambient")
        })
        .await;
}

/// Resident memory of this process, in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_to_a_device_is_refused_by_name_without_reading_it() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    let before = rss_bytes();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.yaml")).unwrap();
    let d = source
        .until("the link reported", |d| problem_of(d, "zero.yaml").is_some())
        .await;
    let problem = problem_of(&d, "zero.yaml").unwrap();
    assert!(
        problem.contains("a symbolic link to /dev/zero, outside the manifest directory"),
        "{problem}"
    );
    assert_eq!(names(&d), ["cart", "shop"]);
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 64 << 20, "resident memory grew by {grown} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_leading_out_of_the_directory_is_not_followed() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    // A valid manifest outside: followed, it would define `outside`.
    let elsewhere = tempfile::tempdir().unwrap();
    write(elsewhere.path(), "x.yaml", ns("outside", "ambient").as_bytes());
    let target = elsewhere.path().join("x.yaml").canonicalize().unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("out.yaml")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.path().join("host.yaml")).unwrap();
    // Relative, through the parent.
    std::os::unix::fs::symlink("../../../../../../../../etc/passwd", dir.path().join("sub/up.yaml")).unwrap();
    let d = source
        .until("all three reported", |d| {
            ["out.yaml", "host.yaml", "up.yaml"]
                .iter()
                .all(|f| problem_of(d, f).is_some())
        })
        .await;
    assert!(
        problem_of(&d, "out.yaml").unwrap().contains(&format!(
            "a symbolic link to {}, outside the manifest directory",
            target.display()
        )),
        "{:?}",
        d.problems
    );
    assert!(
        problem_of(&d, "host.yaml").unwrap().contains("/etc/hostname, outside"),
        "{:?}",
        d.problems
    );
    assert!(
        problem_of(&d, "up.yaml").unwrap().contains("/etc/passwd, outside"),
        "{:?}",
        d.problems
    );
    assert_eq!(names(&d), ["cart", "shop"], "nothing from outside applied");
    assert!(d.synced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_to_a_file_inside_the_directory_is_read_and_follows_its_target() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    std::fs::create_dir(dir.path().join("data")).unwrap();
    write(&dir.path().join("data"), "web.txt", ns("web", "ambient").as_bytes());
    std::os::unix::fs::symlink("data/web.txt", dir.path().join("web.yaml")).unwrap();
    source
        .until("the linked manifest", |d| {
            names(d) == ["cart", "shop", "web"] && d.problems.is_empty()
        })
        .await;
    // An edit of the target is an edit of the manifest.
    write(&dir.path().join("data"), "web.txt", ns("web", "none").as_bytes());
    source
        .until("the target's edit", |d| mode_of(d, "web").as_deref() == Some("none"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_over_the_limit_is_reported_with_its_real_size() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    let big = std::fs::File::create(dir.path().join(".big.tmp")).unwrap();
    big.set_len(50_000_000).unwrap();
    drop(big);
    std::fs::rename(dir.path().join(".big.tmp"), dir.path().join("big.yaml")).unwrap();
    let d = source
        .until("the size reported", |d| problem_of(d, "big.yaml").is_some())
        .await;
    assert!(
        problem_of(&d, "big.yaml")
            .unwrap()
            .contains("the file is 50000000 bytes; the limit is 16777216"),
        "{:?}",
        d.problems
    );
    assert_eq!(names(&d), ["cart", "shop"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_cannot_be_read_keeps_its_last_good_version() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    // Not UTF-8.
    write(dir.path(), "a.yaml", b"kind: \xff\xfe\n");
    let d = source.until("the problem", |d| !d.problems.is_empty()).await;
    assert!(
        d.problems[0].contains("a.yaml: cannot read: stream did not contain valid UTF-8"),
        "{:?}",
        d.problems
    );
    assert_eq!(names(&d), ["cart", "shop"]);
    // A symlink loop.
    let tmp = dir.path().join(".loop");
    std::os::unix::fs::symlink(dir.path().join("a.yaml"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.path().join("a.yaml")).unwrap();
    let d = source
        .until("the loop", |d| d.problems.iter().any(|p| p.contains("symbolic links")))
        .await;
    assert_eq!(names(&d), ["cart", "shop"]);
    assert_eq!(mode_of(&d, "shop").as_deref(), Some("ambient"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_vanishes_after_the_listing_is_removed_only_once_it_is_really_gone() {
    let (dir, mut source) = two_files(WatchMode::Auto).await;
    // A dangling symlink: listed, but gone by the time it is opened, on every scan.
    let tmp = dir.path().join(".dangling");
    std::os::unix::fs::symlink(dir.path().join("nowhere.yaml"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.path().join("a.yaml")).unwrap();
    let d = source.until("the problem", |d| !d.problems.is_empty()).await;
    assert!(
        d.problems[0].contains("a.yaml: cannot read: No such file or directory"),
        "{:?}",
        d.problems
    );
    assert_eq!(names(&d), ["cart", "shop"]);
    // Really deleted: its objects go, and so does the problem.
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    source
        .until("the deletion", |d| names(d) == ["cart"] && d.problems.is_empty())
        .await;
}

const FD_CHILD: &str = "TRELLIS_TEST_FD_EXHAUSTION_CHILD";

/// Runs in a child process of its own (it uses up every file descriptor).
#[test]
fn running_out_of_file_descriptors_keeps_the_last_good_inventory() {
    let name = "running_out_of_file_descriptors_keeps_the_last_good_inventory";
    if std::env::var_os(FD_CHILD).is_some() {
        return without_file_descriptors();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(FD_CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

fn without_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", ns("shop", "ambient").as_bytes());
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(&dir.path().join("sub"), "b.yaml", ns("cart", "ambient").as_bytes());
    let source = ManifestDirectory::new(dir.path());
    let mut state = DirectoryState::default();
    let mut seen = Seen::new();
    assert!(source.load(&mut state, &mut seen));
    // An edit the next scan must open the file for.
    write(dir.path(), "a.yaml", ns("shop", "none").as_bytes());

    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_cur.min(128);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let mut held = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                break;
            }
        }
    }

    // Not one descriptor: the directory cannot even be listed.
    assert!(!source.load(&mut state, &mut seen));
    let d = state.discovered();
    assert_eq!(names(&d), ["cart", "shop"]);
    assert_eq!(mode_of(&d, "shop").as_deref(), Some("ambient"));
    assert!(
        d.problems[0].contains("cannot list: Too many open files"),
        "{:?}",
        d.problems
    );

    // One descriptor: the directory is listed (holding it), so the changed file cannot be opened.
    held.pop();
    assert!(!source.load(&mut state, &mut seen));
    let d = state.discovered();
    assert_eq!(names(&d), ["cart", "shop"]);
    assert_eq!(mode_of(&d, "shop").as_deref(), Some("ambient"));
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    assert!(
        d.problems[0].contains("a.yaml: cannot read: Too many open files"),
        "{:?}",
        d.problems
    );

    // Descriptors back: the edit applies, the problems go.
    drop(held);
    assert!(source.load(&mut state, &mut seen));
    let d = state.discovered();
    assert_eq!(mode_of(&d, "shop").as_deref(), Some("none"));
    assert!(d.problems.is_empty(), "{:?}", d.problems);
}
