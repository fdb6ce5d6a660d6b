//! Reading the manifest directory: the I/O edge. [`read`] lists every directory under the root
//! and reads the manifest files that changed since they were last absorbed; every failure is
//! returned as data ([`Scan::unlisted`], [`Entry::Unreadable`], [`Entry::Refused`]) for the state
//! to decide on, never turned into "no such file".
//!
//! trellisd runs as root, so what it opens is narrow: regular files, and symbolic links whose
//! target (resolved in full) is a regular file inside the manifest directory. Anything else (a
//! FIFO, a device, a socket, a link leading out) is reported by name and never opened. A file's
//! size is checked from its metadata before it is read, and the read stops one byte past the
//! limit whatever the metadata said.

use std::collections::BTreeMap;
use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use trellis_mesh::manifest::MAX_FILE_BYTES;

/// What identifies one version of a file on disk: when it differs, the file is read again.
/// The inode is part of it, so a file replaced by a rename is always re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub modified: SystemTime,
    pub len: u64,
    pub inode: u64,
}

impl Stamp {
    fn of(meta: &Metadata) -> Self {
        Self {
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            len: meta.len(),
            inode: meta.ino(),
        }
    }
}

/// The stamp of every file as it was last absorbed.
pub type Seen = BTreeMap<PathBuf, Stamp>;

/// One pass over the directory.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every manifest file listed, with what reading it gave.
    pub files: BTreeMap<PathBuf, Entry>,
    /// Directories (the root included) that could not be listed in full, with why: files last
    /// seen under them may still exist.
    pub unlisted: BTreeMap<PathBuf, String>,
}

/// What reading one listed manifest file gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Same stamp as when it was last absorbed: not read again.
    Unchanged,
    /// The file's text now.
    Read { stamp: Stamp, text: String },
    /// Larger than [`MAX_FILE_BYTES`] (`stamp.len` is its size; at most the limit only if it
    /// grew while being read): not read.
    TooLarge { stamp: Stamp },
    /// Listed but not readable now (vanished since the listing, a symlink loop, out of file
    /// descriptors, ...), with why: may work on the next try.
    Unreadable(String),
    /// Not a manifest file and never read as one until it changes (a FIFO, a device, a socket, a
    /// directory, a symbolic link leading outside the manifest directory), with why.
    Refused(String),
}

/// Whether `path` names a manifest: `*.yaml` or `*.yml`, not hidden.
fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Lists `root` recursively (hidden entries skipped, symlinked directories not followed) and
/// reads every manifest file whose stamp differs from `seen`.
pub fn read(root: &Path, seen: &Seen) -> Scan {
    let mut scan = Scan::default();
    // Symbolic links are followed only to files under this.
    let inside = std::fs::canonicalize(root).ok();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                scan.unlisted.insert(dir, e.to_string());
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    scan.unlisted.insert(dir.clone(), e.to_string());
                    break;
                }
            };
            let path = entry.path();
            if is_hidden(&path) {
                continue;
            }
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(_) if is_manifest(&path) => {
                    let read = read_file(&path, inside.as_deref(), seen.get(&path));
                    scan.files.insert(path, read);
                }
                Ok(_) => {}
                // Cannot tell what it is: if it is a directory, what is under it is unknown.
                Err(e) if is_manifest(&path) => {
                    scan.files.insert(path, Entry::Unreadable(e.to_string()));
                }
                Err(e) => {
                    scan.unlisted.insert(path, e.to_string());
                }
            }
        }
    }
    scan
}

/// What a file that is not a regular file is, for the problem line.
fn not_regular(meta: &Metadata) -> String {
    let t = meta.file_type();
    let what = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    };
    format!("{what}, not a regular file; only regular files are read")
}

/// Where the text of a listed manifest `path` is to be read from: the path itself, or the
/// target of a symbolic link that stays inside `root` (canonical). `Err` is the entry to report.
fn source_of(path: &Path, root: Option<&Path>) -> Result<PathBuf, Entry> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Entry::Unreadable(e.to_string()))?;
    if !meta.file_type().is_symlink() {
        return Ok(path.to_path_buf());
    }
    // A loop or a dangling link may be mid-edit: unreadable (tried again), not refused.
    let target = std::fs::canonicalize(path).map_err(|e| Entry::Unreadable(e.to_string()))?;
    match root {
        Some(root) if target.starts_with(root) => Ok(target),
        Some(_) => Err(Entry::Refused(format!(
            "a symbolic link to {}, outside the manifest directory; not followed",
            target.display()
        ))),
        None => Err(Entry::Unreadable(
            "the manifest directory cannot be resolved, so neither can this symbolic link".into(),
        )),
    }
}

/// Where the open file `file` really is, when the kernel says (`/proc/self/fd`).
fn opened_path(file: &File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

/// Reads one manifest file, unless its stamp is `seen`: a regular file, or a symbolic link to a
/// regular file inside `root` (the canonical manifest directory). Its size is checked from its
/// metadata before a byte is read, and the read is bounded all the same.
fn read_file(path: &Path, root: Option<&Path>, seen: Option<&Stamp>) -> Entry {
    let source = match source_of(path, root) {
        Ok(source) => source,
        Err(entry) => return entry,
    };
    let meta = match std::fs::symlink_metadata(&source) {
        Ok(meta) => meta,
        Err(e) => return Entry::Unreadable(e.to_string()),
    };
    if !meta.is_file() {
        return Entry::Refused(not_regular(&meta));
    }
    if seen == Some(&Stamp::of(&meta)) {
        return Entry::Unchanged;
    }
    if meta.len() > MAX_FILE_BYTES as u64 {
        return Entry::TooLarge {
            stamp: Stamp::of(&meta),
        };
    }
    // Non-blocking, so that a FIFO swapped in after the check cannot hang the scan; no
    // following, so that a symbolic link swapped in cannot lead outside the directory.
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(&source)
        .and_then(|f| f.metadata().map(|m| (f, m)));
    let (file, meta): (File, Metadata) = match opened {
        Ok(opened) => opened,
        Err(e) => return Entry::Unreadable(e.to_string()),
    };
    if !meta.is_file() {
        return Entry::Refused(not_regular(&meta));
    }
    // A directory on the way swapped for a symbolic link after the listing.
    if let (Some(root), Some(real)) = (root, opened_path(&file)) {
        if !real.starts_with(root) {
            return Entry::Refused(format!(
                "resolves to {}, outside the manifest directory; not read",
                real.display()
            ));
        }
    }
    // The stamp of the open file is the stamp of the text read.
    let stamp = Stamp::of(&meta);
    if stamp.len > MAX_FILE_BYTES as u64 {
        return Entry::TooLarge { stamp };
    }
    let mut text = String::with_capacity(stamp.len as usize);
    if let Err(e) = file.take(MAX_FILE_BYTES as u64 + 1).read_to_string(&mut text) {
        return Entry::Unreadable(e.to_string());
    }
    if text.len() > MAX_FILE_BYTES {
        return Entry::TooLarge { stamp };
    }
    Entry::Read { stamp, text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_read_once_is_not_read_again_until_its_stamp_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        std::fs::write(&a, "x: 1\n").unwrap();
        let scan = read(dir.path(), &Seen::new());
        let Some(Entry::Read { stamp, text }) = scan.files.get(&a) else {
            panic!("{scan:?}")
        };
        assert_eq!(text, "x: 1\n");
        let seen = Seen::from([(a.clone(), *stamp)]);
        assert_eq!(read(dir.path(), &seen).files[&a], Entry::Unchanged);
        // Replaced by a rename: same length, maybe the same mtime, another inode.
        std::fs::write(dir.path().join(".a.tmp"), "x: 2\n").unwrap();
        std::fs::rename(dir.path().join(".a.tmp"), &a).unwrap();
        assert!(matches!(&read(dir.path(), &seen).files[&a], Entry::Read { text, .. } if text == "x: 2\n"));
    }

    #[test]
    fn a_missing_root_is_reported_as_unlisted_not_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let scan = read(&gone, &Seen::new());
        assert!(scan.files.is_empty());
        assert!(scan.unlisted[&gone].contains("No such file"), "{scan:?}");
    }

    #[test]
    fn a_symlink_loop_named_yaml_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        std::os::unix::fs::symlink(&a, &a).unwrap();
        let scan = read(dir.path(), &Seen::new());
        assert!(
            matches!(&scan.files[&a], Entry::Unreadable(why) if why.contains("symbolic links")),
            "{scan:?}"
        );
    }
}
