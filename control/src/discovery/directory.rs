//! The manifest-directory source: every `*.yaml`/`*.yml` file under a directory, watched and
//! applied live.
//!
//! - [`state`]: the rules (pure): a file is applied whole or not at all, a bad or unreadable file
//!   keeps its last good version, and a file's objects go only when a complete listing no longer
//!   names it. Read this first.
//! - [`scan`]: the I/O edge, one pass over the directory, every failure returned as data.
//! - [`watch`]: when to scan: inotify events, debounced; polling only where inotify fails.
//!
//! [`ManifestDirectory`]'s task is the thin driver around them: wait for a reason to scan, scan
//! off the async threads, publish what changed.

pub mod scan;
pub mod state;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use tokio::sync::watch as channel;
use tokio::time::Instant;

use self::watch::{Armed, Debounce, Signal};
use super::{Discovered, DiscoverySource};
pub use scan::{Entry, Scan, Seen, Stamp};
pub use state::{Absorbed, DirectoryState, Parser};
pub use watch::POLL_INTERVAL;

/// How the directory is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// inotify, falling back to polling every [`POLL_INTERVAL`] when inotify cannot be had.
    Auto,
    /// Polling only, for file systems whose changes inotify does not see (NFS, some FUSE mounts).
    Poll,
}

/// Watches a manifest directory and publishes what it defines.
pub struct ManifestDirectory {
    dir: PathBuf,
    mode: WatchMode,
    parse: Parser,
}

/// The state and the stamps behind it, shared with the blocking scan.
#[derive(Default)]
struct Tracked {
    state: DirectoryState,
    seen: Seen,
}

/// What one scan gave the driver.
struct Outcome {
    absorbed: Absorbed,
    discovered: Discovered,
    /// The directory itself could be listed.
    root_listed: bool,
}

fn lock(tracked: &Mutex<Tracked>) -> std::sync::MutexGuard<'_, Tracked> {
    tracked.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the driver is told to scan.
enum Trigger {
    Inotify(Armed),
    Polling { rearm_at: Option<Instant> },
}

impl ManifestDirectory {
    /// The source for `dir`, watched with inotify (polling where inotify cannot be had).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            mode: WatchMode::Auto,
            parse: trellis_mesh::manifest::parse_file,
        }
    }

    /// The same source, watched as `mode` says.
    pub fn with_mode(self, mode: WatchMode) -> Self {
        Self { mode, ..self }
    }

    /// The same source with another parser (tests inject failures with it).
    #[cfg(test)]
    fn with_parser(self, parse: Parser) -> Self {
        Self { parse, ..self }
    }

    /// Reads the directory once into `state`; `seen` holds the stamps of what is in it, so that
    /// a second call reads only what changed. Returns whether the applied state changed.
    pub fn load(&self, state: &mut DirectoryState, seen: &mut Seen) -> bool {
        let scan = scan::read(&self.dir, seen);
        state.absorb(seen, scan).changed
    }

    /// Starts inotify on the directory, or says why it falls back to polling.
    fn trigger(&self, signal: &Arc<Signal>, why: &str) -> Trigger {
        if self.mode == WatchMode::Poll {
            tracing::info!(dir = %self.dir.display(), interval = ?POLL_INTERVAL, "polling the manifest directory (as configured)");
            return Trigger::Polling { rearm_at: None };
        }
        match watch::arm(&self.dir, signal.clone()) {
            Ok(armed) => {
                tracing::info!(dir = %self.dir.display(), why, "watching the manifest directory with inotify");
                Trigger::Inotify(armed)
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, interval = ?POLL_INTERVAL,
                    "inotify is not available; polling the manifest directory instead");
                Trigger::Polling {
                    rearm_at: Some(Instant::now() + watch::REARM_INTERVAL),
                }
            }
        }
    }

    /// The source's task: scan, publish, wait for the next reason to scan.
    async fn drive(self, out: channel::Sender<Arc<Discovered>>) {
        let tracked = Arc::new(Mutex::new(Tracked {
            state: DirectoryState::with_parser(self.parse),
            seen: Seen::new(),
        }));
        let signal = Arc::new(Signal::default());
        let mut trigger = self.trigger(&signal, "start");
        let mut last_problems = None;
        let mut failures = 0u32;
        loop {
            let dir = self.dir.clone();
            let Some(outcome) = scan_once(&tracked, move |t| {
                let scan = scan::read(&dir, &t.seen);
                let root_listed = !scan.unlisted.contains_key(&dir);
                let absorbed = t.state.absorb(&mut t.seen, scan);
                Outcome {
                    absorbed,
                    discovered: t.state.discovered(),
                    root_listed,
                }
            })
            .await
            else {
                return;
            };
            if outcome.absorbed.changed || last_problems.as_ref() != Some(&outcome.discovered.problems) {
                last_problems = Some(outcome.discovered.problems.clone());
                if out.send(Arc::new(outcome.discovered)).is_err() {
                    return;
                }
            }
            failures = if outcome.absorbed.retry {
                failures.saturating_add(1)
            } else {
                0
            };
            let retry_at = (failures > 0).then(|| Instant::now() + watch::retry_after(failures));
            tokio::select! {
                _ = out.closed() => return,
                _ = wait(&trigger, &signal, retry_at) => {}
            }
            // The directory came back (or went) under our watches: watch it anew.
            let reappeared = matches!(&trigger, Trigger::Inotify(a) if !a.root_watched && outcome.root_listed);
            if signal.take_rearm() || reappeared {
                trigger = self.trigger(&signal, "the directory was replaced");
            } else if let Trigger::Polling { rearm_at: Some(at) } = trigger {
                if Instant::now() >= at {
                    trigger = self.trigger(&signal, "inotify works again");
                }
            }
        }
    }
}

/// Waits for the next reason to scan: a debounced burst of events, the next poll, or `retry_at`.
async fn wait(trigger: &Trigger, signal: &Signal, retry_at: Option<Instant>) {
    let retry = async {
        match retry_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    match trigger {
        Trigger::Polling { .. } => {
            let next = Instant::now() + POLL_INTERVAL;
            tokio::time::sleep_until(retry_at.map_or(next, |r| r.min(next))).await;
        }
        Trigger::Inotify(armed) => {
            tokio::select! {
                _ = signal.wake.notified() => {}
                _ = retry => return,
            }
            let mut burst = Debounce::default();
            burst.event(Instant::now());
            // The directory is gone: there is nothing to wait for, the parent's events are all.
            if !armed.root_watched {
                return;
            }
            while let Some(due) = burst.due() {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => return,
                    _ = signal.wake.notified() => burst.event(Instant::now()),
                }
            }
        }
    }
}

/// Runs `step` on the state off the async threads. A panic anywhere in it leaves every file at
/// its last good version (the state changes one whole file at a time) and is reported as a
/// problem; `None` only when the runtime is shutting down.
async fn scan_once(
    tracked: &Arc<Mutex<Tracked>>,
    step: impl FnOnce(&mut Tracked) -> Outcome + Send + 'static,
) -> Option<Outcome> {
    let shared = tracked.clone();
    let failed = match tokio::task::spawn_blocking(move || step(&mut lock(&shared))).await {
        Ok(outcome) => return Some(outcome),
        Err(e) if e.is_panic() => state::panic_text(e.into_panic().as_ref()),
        Err(_) => return None,
    };
    let shared = tracked.clone();
    let discovered = tokio::task::spawn_blocking(move || {
        let mut t = lock(&shared);
        t.state.note_crash(failed);
        t.state.discovered()
    })
    .await
    .ok()?;
    Some(Outcome {
        absorbed: Absorbed {
            changed: true,
            retry: true,
        },
        discovered,
        root_listed: true,
    })
}

impl DiscoverySource for ManifestDirectory {
    fn run(self: Box<Self>, out: channel::Sender<Arc<Discovered>>) -> BoxFuture<'static, ()> {
        Box::pin(self.drive(out))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::discovery::Inventory;
    use trellis_mesh::manifest::{parse_file, ManifestError};

    fn ns(name: &str, mode: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    trellis.io/dataplane-mode: {mode}\n"
        )
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    fn mode_of(d: &Discovered, ns: &str) -> Option<String> {
        let (obj, _) = d.inventory.namespaces.get(ns)?;
        obj.labels.get("trellis.io/dataplane-mode").cloned()
    }

    fn panics_on_boom(text: &str) -> Result<Inventory, ManifestError> {
        if text.contains("boom") {
            panic!("injected parser panic");
        }
        parse_file(text)
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
        let mut seen = Seen::new();
        assert!(source.load(&mut state, &mut seen));
        let d = state.discovered();
        assert_eq!(d.inventory.namespaces.keys().collect::<Vec<_>>(), vec!["shop"]);
        assert!(d.synced);
        assert!(!source.load(&mut state, &mut seen), "nothing changed");
    }

    #[tokio::test]
    async fn a_parser_panic_in_the_running_source_keeps_the_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &ns("shop", "ambient"));
        let (tx, mut rx) = channel::channel(Arc::new(Discovered::default()));
        let source = Box::new(ManifestDirectory::new(dir.path()).with_parser(panics_on_boom));
        let task = tokio::spawn(source.run(tx));
        let within = Duration::from_secs(10);
        tokio::time::timeout(
            within,
            rx.wait_for(|d| mode_of(d, "shop").as_deref() == Some("ambient")),
        )
        .await
        .unwrap()
        .unwrap();
        write(dir.path(), "a.yaml", &format!("# boom\n{}", ns("shop", "none")));
        let d = tokio::time::timeout(within, rx.wait_for(|d| !d.problems.is_empty()))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert!(
            d.problems[0].contains("parser crashed on this file (injected parser panic)"),
            "{:?}",
            d.problems
        );
        assert_eq!(
            mode_of(&d, "shop").as_deref(),
            Some("ambient"),
            "last good version kept"
        );
        // The source lives on: a fixed file applies.
        write(dir.path(), "a.yaml", &ns("shop", "none"));
        tokio::time::timeout(
            within,
            rx.wait_for(|d| d.problems.is_empty() && mode_of(d, "shop").as_deref() == Some("none")),
        )
        .await
        .unwrap()
        .unwrap();
        task.abort();
    }

    fn outcome(t: &Tracked) -> Outcome {
        Outcome {
            absorbed: Absorbed::default(),
            discovered: t.state.discovered(),
            root_listed: true,
        }
    }

    #[tokio::test]
    async fn a_scan_that_panics_keeps_every_file_and_says_so() {
        let tracked = Arc::new(Mutex::new(Tracked::default()));
        scan_once(&tracked, |t| {
            t.state.apply(Path::new("/m/a.yaml"), &ns("shop", "ambient"));
            t.state.apply(Path::new("/m/b.yaml"), &ns("cart", "ambient"));
            outcome(t)
        })
        .await
        .unwrap();
        let crashed = scan_once(&tracked, |t| {
            t.state.apply(Path::new("/m/a.yaml"), &ns("shop", "none"));
            panic!("injected scan panic");
        })
        .await
        .unwrap();
        assert!(crashed.absorbed.retry, "scanned again soon");
        let d = crashed.discovered;
        assert_eq!(d.inventory.namespaces.keys().collect::<Vec<_>>(), ["cart", "shop"]);
        assert_eq!(
            d.problems,
            ["manifest scan crashed: injected scan panic; serving the last good version"]
        );
        // The state is usable after the panic (the lock is not left poisoned for good).
        let after = scan_once(&tracked, |t| outcome(t)).await.unwrap();
        assert_eq!(after.discovered.inventory.namespaces.len(), 2);
    }
}
