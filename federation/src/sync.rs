//! The sync with etcd: the I/O around [`View`] and [`writes`]. Two tasks share one client:
//!
//! - the **writer** keeps this cluster's keys in etcd: `clusters/<cluster>` and its endpoints
//!   under a lease of a few seconds kept alive (expiry means the cluster is gone), its bundle and
//!   services without one; it puts only what changed, and rewrites everything on a new lease.
//! - the **reader** lists `/trellis/v1/` and watches from the list's revision + 1, so no event is
//!   missed; a watch cancelled for compaction re-lists; a watch that answers neither events nor
//!   progress requests within [`WATCH_SILENCE`] is taken for dead and re-listed. While etcd is
//!   unreachable the last view stays, reported stale since when it broke (static stability).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::keys;

use crate::records::{encode, ClusterRecord, EndpointsRecord, ServiceRecord, MAX_VALUE_BYTES};
use crate::view::{Federation, Kv, View};
/// The etcd client the sync and the CLI's federation verbs use.
pub use etcd_client::Client as EtcdClient;

/// The lease of a cluster's live keys: a cluster silent this long is gone for everyone.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// How often a progress request goes down a quiet watch.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// A watch that answers nothing (neither events nor progress) for this long is dead.
pub const WATCH_SILENCE: Duration = Duration::from_secs(6);
/// Operations per transaction (etcd's `--max-txn-ops` default).
pub const MAX_TXN_OPS: usize = 128;
/// Bytes of keys and values per transaction: under etcd's `--max-request-bytes` (1.5 MiB).
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// Splits `ops` (key, size, op) into runs of at most `max_ops` operations and `max_bytes` bytes
/// (one larger operation travels alone).
pub fn batches<T>(ops: &[(String, usize, T)], max_ops: usize, max_bytes: usize) -> Vec<&[(String, usize, T)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, size, _)) in ops.iter().enumerate() {
        if i > start && (i - start == max_ops || bytes + size > max_bytes) {
            out.push(&ops[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < ops.len() {
        out.push(&ops[start..]);
    }
    out
}
/// How long one etcd call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where etcd is and how to prove who we are to it (TLS with a client certificate; etcd maps
/// the certificate's CN to its user).
#[derive(Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// Connects (lazily: a down etcd shows at the first call, not here).
pub async fn connect(config: &EtcdConfig) -> Result<Client, etcd_client::Error> {
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(&config.ca_pem))
        .identity(Identity::from_pem(&config.cert_pem, &config.key_pem));
    let options = ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(CALL_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    Client::connect(&config.endpoints, Some(options)).await
}

/// What this cluster publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    pub cluster: ClusterRecord,
    /// Its SPIFFE bundle (JSON), under `bundles/<trust domain>`.
    pub bundle_json: String,
    /// Global services and their endpoints, by (namespace, name).
    pub services: BTreeMap<(String, String), ServiceRecord>,
    pub endpoints: BTreeMap<(String, String), EndpointsRecord>,
}

/// A key this cluster owns, its value, and whether it lives on the cluster's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub value: String,
    pub leased: bool,
}

impl Publication {
    /// Every key the cluster owns, with its value.
    pub fn keys(&self) -> BTreeMap<String, Owned> {
        let c = &self.cluster.name;
        let mut out = BTreeMap::new();
        out.insert(
            keys::cluster(c),
            Owned {
                value: encode(&self.cluster),
                leased: true,
            },
        );
        out.insert(
            keys::bundle(&self.cluster.trust_domain),
            Owned {
                value: self.bundle_json.clone(),
                leased: false,
            },
        );
        for ((ns, name), s) in &self.services {
            out.insert(
                keys::service(c, ns, name),
                Owned {
                    value: encode(s),
                    leased: false,
                },
            );
        }
        for ((ns, name), e) in &self.endpoints {
            out.insert(
                keys::endpoints(c, ns, name),
                Owned {
                    value: encode(e),
                    leased: true,
                },
            );
        }
        out
    }
}

/// What to change in etcd to go from `written` to `wanted`: keys to put, keys to delete.
pub fn writes(written: &BTreeMap<String, Owned>, wanted: &BTreeMap<String, Owned>) -> (Vec<String>, Vec<String>) {
    let puts = wanted
        .iter()
        .filter(|(k, v)| written.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    let deletes = written.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
    (puts, deletes)
}

/// The sync's state as status, metrics and the model see it.
#[derive(Debug, Clone, Default)]
pub struct SyncState {
    /// The federation as last read (kept while etcd is unreachable).
    pub federation: Arc<Federation>,
    /// A full list has been read at least once.
    pub synced: bool,
    /// Since when the view may be out of date (the watch broke, etcd unreachable).
    pub stale_since: Option<SystemTime>,
    /// Whether this cluster's keys are written under a live lease.
    pub published: bool,
    pub last_error: Option<String>,
    /// Re-lists so far (after compaction, a dead watch or a reconnect).
    pub relists: u64,
}

/// Runs the writer and the reader until `publication`'s sender is dropped (then this cluster's
/// keys are removed and its lease revoked) or the task is aborted (then its live keys expire
/// with the lease); the state follows.
pub fn spawn(
    config: EtcdConfig,
    publication: watch::Receiver<Option<Publication>>,
) -> (watch::Receiver<SyncState>, tokio::task::JoinHandle<()>) {
    let (state_tx, state_rx) = watch::channel(SyncState::default());
    let state_tx = Arc::new(state_tx);
    let task = tokio::spawn(async move {
        let client = loop {
            match connect(&config).await {
                Ok(c) => break c,
                Err(e) => {
                    note_error(&state_tx, &format!("connecting to etcd {:?}: {e}", config.endpoints));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        // Trust from an etcd anyone may write is no trust: refuse to sync unless etcd denies us
        // root's keys (its authentication is on and we are a member, not root).
        let mut probe_client = client.clone();
        loop {
            match auth_is_enforced(&mut probe_client).await {
                Ok(()) => break,
                Err(e) => {
                    note_error(&state_tx, &e);
                    if state_tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
        // Aborting this task (a crash, a shutdown) stops the writer too, without revoking the
        // lease: the cluster's live keys then expire with it.
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let mut writer = AbortOnDrop(tokio::spawn(write_loop(client.clone(), publication, state_tx.clone())));
        // The writer ends once the publication is gone (the cluster left, its keys removed).
        tokio::select! {
            // The reader stops when nobody reads the state; a leave in progress still finishes.
            _ = read_loop(client, state_tx) => { let _ = (&mut writer.0).await; }
            _ = &mut writer.0 => {}
        }
    });
    (state_rx, task)
}

/// Whether etcd refuses this client a write to root's keys (`grants/`). A transaction whose
/// compare never holds writes nothing, but etcd checks the permission of every operation in
/// it all the same: "permission denied" means authentication is on and we are not root.
pub async fn auth_is_enforced(client: &mut Client) -> Result<(), String> {
    let probe = format!("{}grants/", keys::PREFIX);
    let txn = Txn::new()
        .when([Compare::version(probe.as_str(), CompareOp::Less, 0)])
        .and_then([TxnOp::put(probe.as_str(), "", None)]);
    match client.txn(txn).await {
        Ok(_) => Err(
            "etcd lets these credentials write root's keys (grants/): its authentication is off, or this is root's certificate; not joining (trellis federation grant --enable-auth, and join with the cluster's own certificate)"
                .into(),
        ),
        Err(e) if e.to_string().contains("permission denied") => Ok(()),
        Err(e) => Err(format!("checking etcd's authentication: {e}")),
    }
}

fn note_error(state: &watch::Sender<SyncState>, error: &str) {
    tracing::warn!(%error, "federation sync");
    state.send_modify(|s| {
        s.last_error = Some(error.to_string());
        if s.synced && s.stale_since.is_none() {
            s.stale_since = Some(SystemTime::now());
        }
    });
}

/// Backoff between failed rounds: 200 ms doubling to 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(200)
        .saturating_mul(1 << failures.min(5))
        .min(Duration::from_secs(5))
}

async fn read_loop(mut client: Client, state: Arc<watch::Sender<SyncState>>) {
    let mut view = View::default();
    let mut failures = 0u32;
    loop {
        match read_round(&mut client, &mut view, &state).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                note_error(&state, &e);
            }
        }
        if state.is_closed() {
            return;
        }
        tokio::time::sleep(backoff(failures)).await;
    }
}

fn publish(view: &View, state: &watch::Sender<SyncState>) {
    let federation = Arc::new(view.federation());
    state.send_modify(|s| s.federation = federation);
}

/// One list and the watch after it, until the watch ends (compaction, silence, an error).
async fn read_round(client: &mut Client, view: &mut View, state: &watch::Sender<SyncState>) -> Result<(), String> {
    let revision = list(client, view).await?;
    publish(view, state);
    state.send_modify(|s| {
        if s.synced {
            s.relists += 1;
        }
        s.synced = true;
        s.stale_since = None;
        s.last_error = None;
    });
    tracing::info!(revision, "federation listed");
    match follow(client, view, revision + 1, &|view| publish(view, state)).await? {
        Ended::Compacted(to) => {
            tracing::info!(compacted_to = to, "federation watch compacted; re-listing");
            Ok(())
        }
    }
}

/// Keys per page of a list: etcd answers a range in one message, which gRPC limits in size.
const PAGE_KEYS: i64 = 512;
/// The largest page accepted (values are at most [`crate::records::MAX_VALUE_BYTES`]; a page
/// over this is asked again in halves).
const MAX_PAGE_BYTES: usize = 64 * 1024 * 1024;

/// Reads the whole prefix into `view` at one revision, which it returns. A partial answer is an
/// error: it is never taken for the whole state.
pub async fn list(client: &mut Client, view: &mut View) -> Result<i64, String> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_PAGE_BYTES);
    let mut end = keys::PREFIX.as_bytes().to_vec();
    // The prefix ends in '/': the range ends before '0', the next byte.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let mut from = keys::PREFIX.as_bytes().to_vec();
    let mut revision = 0;
    let mut page = PAGE_KEYS;
    let mut kvs = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
        // Every page at the first page's revision: together they are one consistent list.
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let listed = match kv.get(from.clone(), Some(options)).await {
            Ok(listed) => listed,
            // Big values: the same page in halves, down to one key (at most etcd's own limit).
            Err(e) if page > 1 && e.to_string().contains("too large") => {
                page /= 2;
                continue;
            }
            Err(e) => return Err(format!("listing {}: {e}", keys::PREFIX)),
        };
        if revision == 0 {
            revision = listed
                .header()
                .map(|h| h.revision())
                .ok_or("the list came without a header")?;
        }
        kvs.extend(listed.kvs().iter().map(to_kv));
        if !listed.more() {
            break;
        }
        let last = listed
            .kvs()
            .last()
            .ok_or("etcd said more keys follow but sent none; keeping the last view")?;
        from = [last.key(), b"\0"].concat();
    }
    view.reset(kvs, revision);
    Ok(revision)
}

fn to_kv(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    }
}

/// How a watch ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// etcd compacted past the revision asked for (to this one): the caller must re-list.
    Compacted(i64),
}

/// Applies every event under the prefix from `from` on to `view`, calling `applied` after each
/// batch, until the watch is cancelled (compaction: `Ok`) or fails, or answers neither events nor
/// progress requests for [`WATCH_SILENCE`] (an error: a quiet watch answers progress requests).
pub async fn follow(
    client: &mut Client,
    view: &mut View,
    from: i64,
    applied: &(dyn Fn(&View) + Send + Sync),
) -> Result<Ended, String> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from)
        .with_progress_notify();
    // A catch-up response may carry many events: the same bound as a list's page.
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(MAX_PAGE_BYTES)
        .watch(keys::PREFIX, Some(options))
        .await
        .map_err(|e| format!("watching {}: {e}", keys::PREFIX))?;
    let mut heard = Instant::now();
    let mut ask = tokio::time::interval(PROGRESS_EVERY);
    ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ask.tick() => {
                if heard.elapsed() > WATCH_SILENCE {
                    return Err(format!("the watch answered nothing for {} s; re-listing", WATCH_SILENCE.as_secs()));
                }
                stream.request_progress().await.map_err(|e| format!("watch progress request: {e}"))?;
            }
            message = stream.message() => {
                let response = message
                    .map_err(|e| format!("watch: {e}"))?
                    .ok_or("the watch ended")?;
                heard = Instant::now();
                if response.compact_revision() > 0 {
                    return Ok(Ended::Compacted(response.compact_revision()));
                }
                if response.canceled() {
                    return Err(format!("the watch was cancelled: {}", response.cancel_reason()));
                }
                if response.events().is_empty() {
                    continue;
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => view.put(to_kv(kv)),
                        EventType::Delete => view.delete(kv.key(), kv.mod_revision()),
                    }
                }
                applied(view);
            }
        }
    }
}

async fn write_loop(
    mut client: Client,
    mut publication: watch::Receiver<Option<Publication>>,
    state: Arc<watch::Sender<SyncState>>,
) {
    let mut failures = 0u32;
    loop {
        let result = write_round(&mut client, &mut publication, &state).await;
        state.send_modify(|s| s.published = false);
        match result {
            Ok(()) => return,
            Err(e) => {
                failures = failures.saturating_add(1);
                note_error(&state, &e);
            }
        }
        tokio::time::sleep(backoff(failures)).await;
    }
}

/// One lease: grant it, write every key, then keep it alive and follow the publication until
/// something fails. `Ok` when the publication's sender is gone.
async fn write_round(
    client: &mut Client,
    publication: &mut watch::Receiver<Option<Publication>>,
    state: &watch::Sender<SyncState>,
) -> Result<(), String> {
    let ttl = i64::try_from(LEASE_TTL.as_secs()).unwrap_or(6);
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| format!("granting a lease: {e}"))?
        .id();
    let (mut keeper, mut alive) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| format!("keeping lease {lease:x} alive: {e}"))?;
    // What etcd holds of ours already (from before a restart or an outage): anything of it no
    // longer wanted is deleted by the first write, the rest rewritten under the new lease.
    let mut written: BTreeMap<String, Owned> = BTreeMap::new();
    let own = publication.borrow().as_ref().map(|p| p.cluster.name.clone());
    if let Some(c) = own {
        for prefix in [
            format!("{}services/{c}/", keys::PREFIX),
            format!("{}endpoints/{c}/", keys::PREFIX),
        ] {
            let held = client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix().with_keys_only()))
                .await
                .map_err(|e| format!("listing {prefix}: {e}"))?;
            for kv in held.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                written.insert(
                    key,
                    Owned {
                        value: String::new(),
                        leased: false,
                    },
                );
            }
        }
    }
    let mut tick = tokio::time::interval(LEASE_TTL / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    publication.mark_changed();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await.map_err(|e| format!("lease keep-alive: {e}"))?;
                let answer = tokio::time::timeout(CALL_TIMEOUT, alive.message())
                    .await
                    .map_err(|_| "the lease keep-alive got no answer".to_string())?
                    .map_err(|e| format!("lease keep-alive: {e}"))?;
                if answer.is_none_or(|a| a.ttl() <= 0) {
                    return Err(format!("lease {lease:x} expired; writing everything again under a new one"));
                }
            }
            changed = publication.changed() => {
                if changed.is_err() {
                    // Leaving: every key of ours goes, the unleased ones too.
                    // The last publication stays readable after its sender is gone: its keys
                    // are removed even when this is a retry on a fresh lease (`written` empty).
                    let mut ours: std::collections::BTreeSet<String> = written.keys().cloned().collect();
                    ours.extend(publication.borrow().as_ref().map(Publication::keys).unwrap_or_default().into_keys());
                    let ops: Vec<TxnOp> = ours.iter().map(|k| TxnOp::delete(k.as_str(), None)).collect();
                    for batch in ops.chunks(MAX_TXN_OPS) {
                        client
                            .txn(Txn::new().and_then(batch.to_vec()))
                            .await
                            .map_err(|e| format!("removing this cluster's keys: {e}"))?;
                    }
                    let _ = client.lease_revoke(lease).await;
                    tracing::info!(keys = ours.len(), "left the federation: this cluster's keys are removed");
                    return Ok(());
                }
                let wanted = publication.borrow_and_update().as_ref().map(Publication::keys).unwrap_or_default();
                let (puts, deletes) = writes(&written, &wanted);
                // In transactions (etcd's default limit is 128 operations each), so that readers
                // see a publication whole rather than key by key.
                // A value every reader would refuse is not written: said once, here.
                let (puts, too_big): (Vec<String>, Vec<String>) =
                    puts.into_iter().partition(|k| wanted[k].value.len() <= MAX_VALUE_BYTES);
                for key in &too_big {
                    tracing::warn!(%key, bytes = wanted[key].value.len(), limit = MAX_VALUE_BYTES, "not published: larger than any member reads");
                }
                let ops: Vec<(String, usize, TxnOp)> = puts
                    .into_iter()
                    .map(|key| {
                        let owned = &wanted[&key];
                        let options = owned.leased.then(|| PutOptions::new().with_lease(lease));
                        let op = TxnOp::put(key.as_str(), owned.value.as_str(), options);
                        let size = key.len() + owned.value.len();
                        (key, size, op)
                    })
                    .chain(deletes.into_iter().map(|key| {
                        let op = TxnOp::delete(key.as_str(), None);
                        (key.clone(), key.len(), op)
                    }))
                    .collect();
                for batch in batches(&ops, MAX_TXN_OPS, MAX_TXN_BYTES) {
                    let first = &batch[0].0;
                    client
                        .txn(Txn::new().and_then(batch.iter().map(|(_, _, op)| op.clone()).collect::<Vec<_>>()))
                        .await
                        .map_err(|e| format!("writing {} keys from {first}: {e}", batch.len()))?;
                    for (key, _, _) in batch {
                        match wanted.get(key) {
                            Some(owned) => written.insert(key.clone(), owned.clone()),
                            None => written.remove(key),
                        };
                    }
                    // A long publication must not starve the lease between its transactions.
                    keeper.keep_alive().await.map_err(|e| format!("lease keep-alive: {e}"))?;
                }
                state.send_modify(|s| s.published = !wanted.is_empty());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(value: &str, leased: bool) -> Owned {
        Owned {
            value: value.into(),
            leased,
        }
    }

    #[test]
    fn only_changed_keys_are_written_and_dropped_ones_deleted() {
        let written = BTreeMap::from([
            ("a".to_string(), owned("1", true)),
            ("b".to_string(), owned("2", false)),
            ("c".to_string(), owned("3", true)),
        ]);
        let wanted = BTreeMap::from([
            ("a".to_string(), owned("1", true)),
            ("b".to_string(), owned("changed", false)),
            ("d".to_string(), owned("4", true)),
        ]);
        let (puts, deletes) = writes(&written, &wanted);
        assert_eq!(puts, ["b", "d"]);
        assert_eq!(deletes, ["c"]);
        assert_eq!(writes(&wanted, &wanted), (vec![], vec![]));
    }

    #[test]
    fn transactions_stay_under_etcd_limits_by_count_and_by_bytes() {
        let ops: Vec<(String, usize, ())> = (0..10).map(|i| (format!("k{i}"), 400, ())).collect();
        let sizes: Vec<usize> = batches(&ops, 4, 1000).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [2, 2, 2, 2, 2], "1,000 bytes hold two 400-byte operations");
        let sizes: Vec<usize> = batches(&ops, 3, usize::MAX).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [3, 3, 3, 1]);
        let big = vec![("a".to_string(), 5000, ()), ("b".to_string(), 10, ())];
        assert_eq!(
            batches(&big, 128, 1000).len(),
            2,
            "an oversized operation travels alone"
        );
        assert!(batches::<()>(&[], 128, 1000).is_empty());
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(200));
        assert_eq!(backoff(2), Duration::from_millis(800));
        assert_eq!(backoff(30), Duration::from_secs(5));
    }
}
