//! A node's own SVID kept on disk, so that a restarted node carries on without a new join token
//! (SPIRE's agent keeps its SVID in its data directory the same way). It is written after Join
//! and after every renewal, read once at start, and used only while it still verifies against
//! the cluster's trust bundle and has enough life left to renew with.
//!
//! The file is the node's key: it is written owner-only (0600) through a temporary file and a
//! rename, so a crash leaves the old SVID or the new one, never half of either; one that anyone
//! but its owner could read or replace is refused rather than trusted.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls_pki_types::UnixTime;
use webpki::KeyUsage;

use crate::bundle::BundleSet;
use crate::id::SpiffeId;
use crate::manager::HeldSvid;
use crate::svid::{parse_pem_svid, to_unix, Svid};
use crate::verify::verify_svid_chain;

/// The file, in the state directory, holding the node SVID (chain, then PKCS#8 key, as PEM).
pub const NODE_SVID_FILE: &str = "node-svid.pem";
/// Larger than any chain and key Trellis writes by far; a bigger file is not ours.
const MAX_FILE_BYTES: u64 = 64 * 1024;
/// A saved SVID with less life left than this is not used: renewing it would race its expiry.
pub const MIN_LIFE_LEFT: Duration = Duration::from_secs(10);

/// Where the node SVID lives in `dir`.
pub fn node_svid_path(dir: &Path) -> PathBuf {
    dir.join(NODE_SVID_FILE)
}

/// Writes `svid` to `dir` (created 0700 if missing) atomically, readable by the owner only.
pub fn save(dir: &Path, svid: &Svid) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating the state directory {}: {e}", dir.display()))?;
    let path = node_svid_path(dir);
    let tmp = dir.join(format!(".{NODE_SVID_FILE}.{}.tmp", std::process::id()));
    let written = (|| {
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(svid.to_pem().as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}

/// Reads the node SVID saved in `dir`: `Ok(None)` when there is none, an error saying why when
/// there is one that must not be used, and the SVID when it is `expected`'s, chains to
/// `bundles` and stays valid for at least [`MIN_LIFE_LEFT`] after `now`.
pub fn load(dir: &Path, expected: &SpiffeId, bundles: &BundleSet, now: SystemTime) -> Result<Option<HeldSvid>, String> {
    let path = node_svid_path(dir);
    let meta = match fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let text = read_private(&path, &meta)?;
    let svid = parse_pem_svid(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    usable(&svid, expected, bundles, now).map_err(|e| format!("{}: {e}", path.display()))?;
    let roots = bundles.roots(expected.trust_domain()).unwrap_or_default();
    HeldSvid::new(svid, roots)
        .map(Some)
        .map_err(|e| format!("{}: rustls cannot use the saved SVID: {e}", path.display()))
}

/// The checks on a file before its contents are trusted: a regular file (not a symlink, a pipe
/// or a device), owned by us, not readable or writable by anyone else, of a sane size.
fn read_private(path: &Path, meta: &fs::Metadata) -> Result<String, String> {
    let what = path.display();
    if !meta.file_type().is_file() {
        return Err(format!("{what} is not a regular file; remove it"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(format!(
            "{what} is owned by uid {}, not by us (uid {euid}); remove it",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} has mode {mode:o}: a node key must be readable by its owner only; remove it (or chmod 600)"
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{what} is {} bytes, more than {MAX_FILE_BYTES}; remove it",
            meta.len()
        ));
    }
    fs::read_to_string(path).map_err(|e| format!("reading {what}: {e}"))
}

/// Whether a saved SVID may be used at `now` as `expected`'s: its identity, a chain to the
/// trust bundle of its own trust domain, and enough life left.
pub fn usable(svid: &Svid, expected: &SpiffeId, bundles: &BundleSet, now: SystemTime) -> Result<(), String> {
    if &svid.id != expected {
        return Err(format!("holds {} instead of {expected}", svid.id));
    }
    let (leaf, intermediates) = svid.chain.split_first().ok_or("holds no certificate")?;
    let unix = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    verify_svid_chain(bundles, leaf, intermediates, unix, KeyUsage::client_auth())
        .map_err(|e| format!("does not verify against the trust bundle (was the CA replaced?): {e}"))?;
    let left = svid.not_after.duration_since(now).unwrap_or_default();
    if left < MIN_LIFE_LEFT {
        return Err(format!(
            "expired or about to (not after unix time {}): a new join token is needed",
            to_unix(svid.not_after)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertificateAuthority, IssuancePolicy};
    use crate::csr::new_csr;
    use crate::id::TrustDomain;
    use crate::TrustBundle;
    use rustls_pki_types::PrivatePkcs8KeyDer;

    struct Fixture {
        dir: tempfile::TempDir,
        ca: CertificateAuthority,
        td: TrustDomain,
        id: SpiffeId,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let td: TrustDomain = "east.trellis.local".parse().unwrap();
        let ca = CertificateAuthority::load_or_create(&dir.path().join("ca"), &td, IssuancePolicy::default()).unwrap();
        let id = SpiffeId::node(&td, "node-1").unwrap();
        Fixture { dir, ca, td, id }
    }

    fn issue(ca: &CertificateAuthority, id: &SpiffeId, ttl: Duration) -> Svid {
        let (csr, key) = new_csr(id).unwrap();
        let issued = ca.sign(csr.as_bytes(), id, ttl).unwrap();
        Svid::new(issued.chain, PrivatePkcs8KeyDer::from(key)).unwrap()
    }

    fn bundles(f: &Fixture) -> BundleSet {
        BundleSet::with(TrustBundle::new(f.td.clone(), f.ca.roots().to_vec()))
    }

    #[test]
    fn a_saved_svid_comes_back_owner_only_and_replaces_the_last() {
        let f = fixture();
        let state = f.dir.path().join("state");
        let now = SystemTime::now();
        assert!(
            load(&state, &f.id, &bundles(&f), now).unwrap().is_none(),
            "nothing saved yet"
        );
        save(&state, &issue(&f.ca, &f.id, Duration::from_secs(600))).unwrap();
        let second = issue(&f.ca, &f.id, Duration::from_secs(900));
        save(&state, &second).unwrap();
        let mode = fs::metadata(node_svid_path(&state)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let held = load(&state, &f.id, &bundles(&f), now).unwrap().unwrap();
        assert_eq!(held.svid.chain, second.chain, "the latest save wins");
        let leftovers: Vec<_> = fs::read_dir(&state).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers, [NODE_SVID_FILE], "no temporary file left behind");
    }

    #[test]
    fn an_expired_foreign_or_unverifiable_svid_is_refused_with_the_reason() {
        let f = fixture();
        let state = f.dir.path().join("state");
        save(&state, &issue(&f.ca, &f.id, Duration::from_secs(600))).unwrap();
        let later = SystemTime::now() + Duration::from_secs(595);
        let e = load(&state, &f.id, &bundles(&f), later).unwrap_err();
        assert!(e.contains("a new join token is needed"), "{e}");

        let other = SpiffeId::node(&f.td, "node-2").unwrap();
        let e = load(&state, &other, &bundles(&f), SystemTime::now()).unwrap_err();
        assert!(e.contains("instead of"), "{e}");

        // A CA replaced since (new roots): the old chain no longer verifies.
        let other_ca =
            CertificateAuthority::load_or_create(&f.dir.path().join("ca2"), &f.td, IssuancePolicy::default()).unwrap();
        let replaced = BundleSet::with(TrustBundle::new(f.td.clone(), other_ca.roots().to_vec()));
        let e = load(&state, &f.id, &replaced, SystemTime::now()).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
    }

    #[test]
    fn a_file_others_can_read_a_symlink_or_a_pipe_is_not_trusted() {
        let f = fixture();
        let state = f.dir.path().join("state");
        save(&state, &issue(&f.ca, &f.id, Duration::from_secs(600))).unwrap();
        let path = node_svid_path(&state);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&state, &f.id, &bundles(&f), SystemTime::now()).unwrap_err();
        assert!(e.contains("mode 644"), "{e}");

        fs::rename(&path, state.join("elsewhere.pem")).unwrap();
        std::os::unix::fs::symlink(state.join("elsewhere.pem"), &path).unwrap();
        let e = load(&state, &f.id, &bundles(&f), SystemTime::now()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");

        fs::remove_file(&path).unwrap();
        let fifo = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = load(&state, &f.id, &bundles(&f), SystemTime::now()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
