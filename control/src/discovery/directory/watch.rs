//! When to scan the manifest directory: on inotify events (through `notify`) when the kernel
//! gives us watches, on a slow poll when it does not. Pure rules first ([`classify`],
//! [`Debounce`], [`retry_after`]), then the one piece of I/O, [`arm`].
//!
//! - Events only say "look again": the scan compares stamps, so a lost or merged event costs
//!   nothing but latency, and the kernel's queue overflow is one more rescan.
//! - A burst (an editor's write-then-rename, a `git checkout`, `trellis lab up`) is scanned once,
//!   [`QUIET`] after its last event, and never later than [`MAX_DELAY`] after its first.
//! - The directory's parent is watched too, so that the directory being removed, renamed or
//!   created again re-arms the watches on the new directory.
//! - Our own reads (open, close without writing) wake nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::time::Instant;

/// A burst of events is scanned once it has been quiet this long...
pub const QUIET: Duration = Duration::from_millis(5);
/// ...or this long after its first event, whichever comes first.
pub const MAX_DELAY: Duration = Duration::from_millis(100);
/// How often the directory is scanned where inotify does not work.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often inotify is tried again while polling.
pub const REARM_INTERVAL: Duration = Duration::from_secs(30);
/// First and longest wait before scanning again after a scan that could not read everything.
pub const RETRY_MIN: Duration = Duration::from_millis(50);
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// What one event from the watcher means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Nothing we watch changed (our own reads, a sibling of the directory).
    Ignore,
    /// Something under the directory changed, or may have: scan.
    Rescan,
    /// The directory itself (or its parent) was removed, renamed or created: watch anew, then scan.
    Rearm,
}

/// What `event` means for the manifest directory `root` (an absolute path).
pub fn classify(root: &Path, event: &notify::Result<Event>) -> Wake {
    let Ok(event) = event else {
        return Wake::Rescan;
    };
    if event.need_rescan() || event.paths.is_empty() {
        return Wake::Rescan;
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return Wake::Ignore,
        _ => {}
    }
    if event.paths.iter().any(|p| root.starts_with(p)) {
        Wake::Rearm
    } else if event.paths.iter().any(|p| p.starts_with(root)) {
        Wake::Rescan
    } else {
        Wake::Ignore
    }
}

/// The pending burst of events, if any.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Debounce {
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debounce {
    /// One more event at `now`.
    pub fn event(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When to scan for the burst so far; `None` when nothing is pending.
    pub fn due(&self) -> Option<Instant> {
        Some((self.last? + QUIET).min(self.first? + MAX_DELAY))
    }
}

/// How long to wait before scanning again after `failures` scans in a row (at least one) could
/// not read everything.
pub fn retry_after(failures: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(RETRY_MAX)
}

/// What the watcher's thread tells the driver.
#[derive(Debug, Default)]
pub struct Signal {
    /// Woken on every event that is not ignored.
    pub wake: tokio::sync::Notify,
    rearm: AtomicBool,
}

impl Signal {
    /// Whether a [`Wake::Rearm`] came since the last call.
    pub fn take_rearm(&self) -> bool {
        self.rearm.swap(false, Ordering::Relaxed)
    }

    fn deliver(&self, wake: Wake) {
        match wake {
            Wake::Ignore => return,
            Wake::Rearm => self.rearm.store(true, Ordering::Relaxed),
            Wake::Rescan => {}
        }
        self.wake.notify_one();
    }
}

/// Live inotify watches on the directory and its parent; dropping it stops them.
pub struct Armed {
    _watcher: RecommendedWatcher,
    /// Whether the directory itself is watched (it may not exist right now).
    pub root_watched: bool,
}

/// Watches `root` recursively and its parent (if it has one), feeding `signal`. Fails when the
/// kernel gives no inotify instance or not enough watches.
pub fn arm(root: &Path, signal: Arc<Signal>) -> notify::Result<Armed> {
    let root: PathBuf = std::path::absolute(root).map_err(notify::Error::io)?;
    let watched = root.clone();
    let mut watcher = notify::recommended_watcher(move |event| signal.deliver(classify(&watched, &event)))?;
    if let Some(parent) = root.parent() {
        watcher.watch(parent, RecursiveMode::NonRecursive)?;
    }
    let root_watched = match watcher.watch(&root, RecursiveMode::Recursive) {
        Ok(()) => true,
        // Gone for now: the parent's watch says when it is back.
        Err(_) if !root.is_dir() && root.parent().is_some() => false,
        Err(e) => return Err(e),
    };
    Ok(Armed {
        _watcher: watcher,
        root_watched,
    })
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};
    use notify::Error;

    use super::*;

    fn event(kind: EventKind, path: &str) -> notify::Result<Event> {
        Ok(Event::new(kind).add_path(path.into()))
    }

    const ROOT: &str = "/lab/east/manifests";

    #[test]
    fn changes_under_the_directory_rescan() {
        let root = Path::new(ROOT);
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ] {
            assert_eq!(
                classify(root, &event(kind, "/lab/east/manifests/sub/a.yaml")),
                Wake::Rescan,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn our_own_reads_wake_nothing() {
        let root = Path::new(ROOT);
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert_eq!(classify(root, &event(kind, "/lab/east/manifests/a.yaml")), Wake::Ignore);
            assert_eq!(
                classify(root, &event(kind, ROOT)),
                Wake::Ignore,
                "listing the directory"
            );
        }
    }

    #[test]
    fn the_directory_removed_renamed_or_created_rearms() {
        let root = Path::new(ROOT);
        for kind in [
            EventKind::Remove(RemoveKind::Folder),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Create(CreateKind::Folder),
        ] {
            assert_eq!(classify(root, &event(kind, ROOT)), Wake::Rearm, "{kind:?}");
        }
        assert_eq!(
            classify(root, &event(EventKind::Remove(RemoveKind::Folder), "/lab/east")),
            Wake::Rearm
        );
    }

    #[test]
    fn siblings_of_the_directory_are_ignored() {
        let root = Path::new(ROOT);
        let beside = event(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            "/lab/east/ca/key.pem",
        );
        assert_eq!(classify(root, &beside), Wake::Ignore);
        // A sibling whose name starts like ours is not under it.
        let prefix = event(EventKind::Create(CreateKind::File), "/lab/east/manifests-old");
        assert_eq!(classify(root, &prefix), Wake::Ignore);
    }

    #[test]
    fn an_overflow_or_a_watcher_error_rescans() {
        let root = Path::new(ROOT);
        let overflow = Ok(Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan));
        assert_eq!(classify(root, &overflow), Wake::Rescan);
        assert_eq!(
            classify(root, &Err(Error::generic("inotify read failed"))),
            Wake::Rescan
        );
    }

    #[test]
    fn a_burst_is_scanned_once_after_it_goes_quiet() {
        let t0 = Instant::now();
        let mut d = Debounce::default();
        assert_eq!(d.due(), None);
        d.event(t0);
        assert_eq!(d.due(), Some(t0 + QUIET));
        d.event(t0 + Duration::from_millis(3));
        assert_eq!(d.due(), Some(t0 + Duration::from_millis(3) + QUIET));
    }

    #[test]
    fn a_burst_that_never_goes_quiet_is_scanned_after_the_max_delay() {
        let t0 = Instant::now();
        let mut d = Debounce::default();
        let mut t = t0;
        while t < t0 + 2 * MAX_DELAY {
            d.event(t);
            t += QUIET / 2;
        }
        assert_eq!(d.due(), Some(t0 + MAX_DELAY));
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        assert_eq!(retry_after(1), RETRY_MIN);
        assert_eq!(retry_after(2), RETRY_MIN * 2);
        assert_eq!(retry_after(3), RETRY_MIN * 4);
        assert_eq!(retry_after(40), RETRY_MAX);
    }
}
