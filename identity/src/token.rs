//! One-time join tokens: how a node proves it may have its first node SVID.
//!
//! A token reads `<id>.<secret>` (both hex), is bound to one node name, expires, and can be
//! redeemed once. Only the SHA-256 of the secret is stored, in a JSON file (mode 0600) next to
//! the CA, so a used token stays used across restarts.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::{check_name, IdError};
use crate::svid::to_unix;

/// Why a token was refused (gRPC `UNAUTHENTICATED` for everything but `Store`).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the join token is malformed: expected <id>.<secret> in hex")]
    Malformed,
    #[error("the join token is unknown")]
    Unknown,
    #[error("the join token has expired")]
    Expired,
    #[error("the join token was already used")]
    Used,
    #[error("the join token was issued for node {issued_for}, not {presented}")]
    WrongNode { issued_for: String, presented: String },
    #[error(transparent)]
    BadNode(#[from] IdError),
    #[error("the join token's lifetime is too long")]
    TtlTooLong,
    #[error("join token store {path}: {why}")]
    Store { path: PathBuf, why: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    node: String,
    secret_sha256: String,
    expires_unix: i64,
    used: bool,
}

/// The set of join tokens a CA accepts.
///
/// With a file, every operation re-reads the file under an exclusive lock (`<file>.lock`), so
/// `trellisd token create` and a running `trellisd` can share it safely.
#[derive(Debug)]
pub struct JoinTokens {
    path: Option<PathBuf>,
    records: Mutex<BTreeMap<String, Record>>,
}

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl JoinTokens {
    /// Tokens that live only in memory (tests, one-shot tools).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            records: Mutex::new(BTreeMap::new()),
        }
    }

    /// Tokens kept in `path`; the file is checked now and created on first write.
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let tokens = Self {
            path: Some(path.to_path_buf()),
            records: Mutex::new(BTreeMap::new()),
        };
        tokens.with_records(|_| Ok(()))?;
        Ok(tokens)
    }

    /// Creates a token for `node`, valid for `ttl`, and returns its text.
    pub fn create(&self, node: &str, ttl: Duration) -> Result<String, TokenError> {
        check_name(node)?;
        let id = hex::encode(rand::random::<[u8; 6]>());
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let record = Record {
            node: node.to_string(),
            secret_sha256: hash(&secret),
            expires_unix: to_unix(SystemTime::now().checked_add(ttl).ok_or(TokenError::TtlTooLong)?),
            used: false,
        };
        self.with_records(|records| {
            // Forget tokens that expired a day ago, so the file does not grow forever.
            let horizon = to_unix(SystemTime::now()) - 24 * 3600;
            records.retain(|_, r| r.expires_unix > horizon);
            records.insert(id.clone(), record);
            Ok(())
        })?;
        Ok(format!("{id}.{secret}"))
    }

    /// Checks `token` for `node` at `now` without spending it: `Ok` when [`Self::redeem`] would
    /// succeed right now. Nothing is written, so a forged token costs a read and a hash.
    pub fn check(&self, token: &str, node: &str, now: SystemTime) -> Result<(), TokenError> {
        let (id, secret) = split(token)?;
        self.read_records(|records| valid(records, id, secret, node, now).map(|_| ()))
    }

    /// Redeems `token` for `node` at `now`: succeeds once, and only for the node it was
    /// issued for, before it expires. The token is marked used (on disk) before this returns.
    pub fn redeem(&self, token: &str, node: &str, now: SystemTime) -> Result<(), TokenError> {
        let (id, secret) = split(token)?;
        self.with_records(|records| {
            valid(records, id, secret, node, now)?;
            if let Some(record) = records.get_mut(id) {
                record.used = true;
            }
            Ok(())
        })
    }

    /// Runs `f` on the current records without changing them. With a file: under a shared lock.
    fn read_records<R>(
        &self,
        f: impl FnOnce(&BTreeMap<String, Record>) -> Result<R, TokenError>,
    ) -> Result<R, TokenError> {
        let memory = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.path else {
            return f(&memory);
        };
        let store_err = |why: String| TokenError::Store {
            path: path.clone(),
            why,
        };
        let lock = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path.with_extension("lock"))
            .map_err(|e| store_err(e.to_string()))?;
        lock.lock_shared().map_err(|e| store_err(format!("cannot lock: {e}")))?;
        let records: BTreeMap<String, Record> = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| store_err(format!("not a token file: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(store_err(e.to_string())),
        };
        f(&records)
    }

    /// Runs `f` on the current records and saves them if it succeeds. With a file: under the
    /// file lock, reading the file first; a failed save leaves the file as it was.
    fn with_records<R>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Record>) -> Result<R, TokenError>,
    ) -> Result<R, TokenError> {
        let mut memory = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.path else {
            return f(&mut memory);
        };
        let store_err = |why: String| TokenError::Store {
            path: path.clone(),
            why,
        };
        let lock = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path.with_extension("lock"))
            .map_err(|e| store_err(e.to_string()))?;
        lock.lock().map_err(|e| store_err(format!("cannot lock: {e}")))?;
        let mut records: BTreeMap<String, Record> = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| store_err(format!("not a token file: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(store_err(e.to_string())),
        };
        let result = f(&mut records)?;
        persist(path, &records).map_err(|e| store_err(e.to_string()))?;
        Ok(result)
    }
}

/// The id and secret of a token's text, if it has the shape of one.
fn split(token: &str) -> Result<(&str, &str), TokenError> {
    let (id, secret) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
    let hexish = |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hexish(id) || !hexish(secret) {
        return Err(TokenError::Malformed);
    }
    Ok((id, secret))
}

/// The record of token `id` if `secret` matches it and it may be redeemed by `node` at `now`.
fn valid<'r>(
    records: &'r BTreeMap<String, Record>,
    id: &str,
    secret: &str,
    node: &str,
    now: SystemTime,
) -> Result<&'r Record, TokenError> {
    let record = records.get(id).ok_or(TokenError::Unknown)?;
    if record.secret_sha256 != hash(secret) {
        return Err(TokenError::Unknown);
    }
    if record.used {
        return Err(TokenError::Used);
    }
    if to_unix(now) >= record.expires_unix {
        return Err(TokenError::Expired);
    }
    if record.node != node {
        return Err(TokenError::WrongNode {
            issued_for: record.node.clone(),
            presented: node.to_string(),
        });
    }
    Ok(record)
}

/// Writes the records atomically (temp file + rename), owner-only.
fn persist(path: &Path, records: &BTreeMap<String, Record>) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec_pretty(records)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&json)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    // Make the rename itself durable: a spent token must not come back after a crash.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_works_once_for_its_node_only() {
        let tokens = JoinTokens::in_memory();
        let t = tokens.create("node-1", Duration::from_secs(60)).unwrap();
        let now = SystemTime::now();
        assert!(matches!(
            tokens.redeem(&t, "node-2", now),
            Err(TokenError::WrongNode { .. })
        ));
        tokens.redeem(&t, "node-1", now).unwrap();
        assert!(matches!(tokens.redeem(&t, "node-1", now), Err(TokenError::Used)));
    }

    #[test]
    fn checking_a_token_does_not_spend_it() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = JoinTokens::open(&dir.path().join("join-tokens.json")).unwrap();
        let t = tokens.create("node-1", Duration::from_secs(60)).unwrap();
        let now = SystemTime::now();
        tokens.check(&t, "node-1", now).unwrap();
        tokens.check(&t, "node-1", now).unwrap();
        assert!(matches!(
            tokens.check(&t, "node-2", now),
            Err(TokenError::WrongNode { .. })
        ));
        assert!(matches!(tokens.check("ab.cd", "node-1", now), Err(TokenError::Unknown)));
        assert!(matches!(
            tokens.check("nope", "node-1", now),
            Err(TokenError::Malformed)
        ));
        tokens.redeem(&t, "node-1", now).unwrap();
        assert!(matches!(tokens.check(&t, "node-1", now), Err(TokenError::Used)));
    }

    #[test]
    fn expired_unknown_and_malformed_tokens_are_refused() {
        let tokens = JoinTokens::in_memory();
        let t = tokens.create("node-1", Duration::from_secs(60)).unwrap();
        let later = SystemTime::now() + Duration::from_secs(61);
        assert!(matches!(tokens.redeem(&t, "node-1", later), Err(TokenError::Expired)));
        let (id, _) = t.split_once('.').unwrap();
        let forged = format!("{id}.{}", "0".repeat(32));
        assert!(matches!(
            tokens.redeem(&forged, "node-1", SystemTime::now()),
            Err(TokenError::Unknown)
        ));
        for bad in ["", "abc", "zz.zz", ".", "a.", &format!("a.{}", "b".repeat(65))] {
            assert!(
                matches!(
                    tokens.redeem(bad, "node-1", SystemTime::now()),
                    Err(TokenError::Malformed)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_used_token_stays_used_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("join-tokens.json");
        let server = JoinTokens::open(&path).unwrap();
        // A token created by another process (the CLI) after the server opened the file.
        let t = JoinTokens::open(&path)
            .unwrap()
            .create("node-1", Duration::from_secs(60))
            .unwrap();
        server.redeem(&t, "node-1", SystemTime::now()).unwrap();
        let reopened = JoinTokens::open(&path).unwrap();
        assert!(matches!(
            reopened.redeem(&t, "node-1", SystemTime::now()),
            Err(TokenError::Used)
        ));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(&path, "{not json").unwrap();
        let err = JoinTokens::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("join-tokens.json") && err.contains("not a token file"),
            "{err}"
        );
    }
}
