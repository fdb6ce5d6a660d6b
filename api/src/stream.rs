//! The subscriber side of the config stream: keeps a node's slice in sync with trellisd,
//! reconnecting with backoff and resuming from the last version it applied.
//!
//! The rules are pure and fed with `now` (the quinn-proto shape): [`receive`] decides what one
//! update does to the applied state and what to acknowledge, [`Reconnect`] decides when to try
//! again after a failure. [`follow`] is the thin driver that does the gRPC I/O around them.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::config::v1 as pb;
use crate::config::v1::config_service_client::ConfigServiceClient;
use crate::slice::{apply, check, Slice};

/// The largest ConfigUpdate a node accepts. A snapshot is one message: a node of a federation
/// holding 100,000 remote endpoints gets some 15 MB at once, past gRPC's default 4 MiB.
pub const MAX_UPDATE_BYTES: usize = 256 * 1024 * 1024;

/// A node's applied view: the version it last applied, its resources, and whether the stream
/// that feeds it is up right now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub version: u64,
    pub slice: Slice,
    /// True while a stream to the control plane is open and delivering; the slice is kept
    /// (and served from) while it is false.
    pub connected: bool,
}

/// Applies one update to `applied` if it can be applied, and returns the acknowledgement to
/// send: an empty error for an applied update, the reason otherwise. A rejected update leaves
/// `applied` untouched (its version too, so a resume asks for what was missed).
///
/// Versions never go back: trellisd's are wall-clock milliseconds that only grow, across its
/// restarts too, so an update below the applied version is a replay (or a trellisd whose clock
/// stepped back by more than its restart took) and is refused; the node keeps what it holds.
/// The same version again is the same model (a resume's empty difference, a repeated snapshot).
pub fn receive(applied: &mut Applied, update: pb::ConfigUpdate) -> pb::Ack {
    let version = update.version;
    let checked = if version < applied.version {
        Err(format!(
            "version {version} is below the applied version {}: a replayed update, or trellisd's clock went back; keeping version {}",
            applied.version, applied.version
        ))
    } else {
        check(&update)
    };
    let error = match checked {
        Ok(()) => {
            // `check` vetted every key and kind, so applying cannot stop half-way.
            let _ = apply(&mut applied.slice, update);
            applied.version = version;
            String::new()
        }
        Err(e) => e,
    };
    pb::Ack { version, error }
}

/// The first message of a stream: who is asking, and from which version it can resume.
pub fn subscribe(node: &str, role: pb::Role, applied: &Applied) -> pb::StreamRequest {
    pb::StreamRequest {
        kind: Some(pb::stream_request::Kind::Subscribe(pb::Subscribe {
            node: node.to_string(),
            role: role as i32,
            resume_from: applied.version,
        })),
    }
}

/// Exponential backoff after `failures` consecutive failures (1 for the first), from `min` up
/// to `max`, scaled by a jitter sample in `[0.0, 1.0]` into `[0.5, 1.0]` of the step.
pub fn retry_delay(failures: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let step = min.saturating_mul(1u32 << exponent).min(max);
    step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0)).max(min.min(max))
}

/// When to connect again: backoff grows with consecutive failures and resets once a stream
/// has delivered an update.
#[derive(Debug, Clone)]
pub struct Reconnect {
    pub min: Duration,
    pub max: Duration,
    failures: u32,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Reconnect {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, failures: 0 }
    }

    /// A stream delivered an update: the next failure starts the backoff afresh.
    pub fn delivered(&mut self) {
        self.failures = 0;
    }

    /// The stream broke (or never opened) at `now`: when to try again. `jitter` is a sample in
    /// `[0.0, 1.0]`.
    pub fn broke(&mut self, now: Instant, jitter: f64) -> Instant {
        self.failures = self.failures.saturating_add(1);
        now + retry_delay(self.failures, self.min, self.max, jitter)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Follows the stream for `node` until `state`'s receivers are all gone, reconnecting with
/// backoff and resuming from the last applied version. `state.connected` tells whether a
/// stream is up.
pub async fn follow(channel: tonic::transport::Channel, node: String, role: pb::Role, state: watch::Sender<Applied>) {
    let mut reconnect = Reconnect::default();
    loop {
        let result = follow_once(channel.clone(), &node, role, &state).await;
        let delivered = state.send_if_modified(|applied| std::mem::replace(&mut applied.connected, false));
        if delivered {
            reconnect.delivered();
        }
        if let Err(status) = result {
            tracing::warn!(%node, code = ?status.code(), error = %status.message(), "config stream broke");
        }
        if state.is_closed() {
            return;
        }
        let at = reconnect.broke(Instant::now(), rand::random());
        tokio::time::sleep_until(at).await;
    }
}

/// One connection: subscribe, apply and acknowledge updates until the stream ends. Sets
/// `state.connected` once the first update arrives (the caller clears it).
pub async fn follow_once(
    channel: tonic::transport::Channel,
    node: &str,
    role: pb::Role,
    state: &watch::Sender<Applied>,
) -> Result<(), Status> {
    let (tx, rx) = mpsc::channel(16);
    let first = subscribe(node, role, &state.borrow());
    tx.send(first).await.map_err(|_| Status::cancelled("closed"))?;
    let mut client = ConfigServiceClient::new(channel).max_decoding_message_size(MAX_UPDATE_BYTES);
    let mut updates = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    while let Some(update) = updates.message().await? {
        let mut ack = None;
        state.send_modify(|applied| {
            ack = Some(receive(applied, update));
            applied.connected = true;
        });
        let ack = ack.unwrap_or_default();
        if !ack.error.is_empty() {
            tracing::warn!(%node, version = ack.version, error = %ack.error, "refused a config update");
        }
        let ack = pb::StreamRequest {
            kind: Some(pb::stream_request::Kind::Ack(ack)),
        };
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    fn workload(ns: &str, name: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Workload(pb::Workload {
                namespace: ns.into(),
                name: name.into(),
                ..Default::default()
            })),
        }
    }

    fn update(version: u64, snapshot: bool, upserts: Vec<pb::Resource>) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            version,
            snapshot,
            upserts,
            removals: vec![],
        }
    }

    #[test]
    fn a_snapshot_replaces_the_slice_and_is_acknowledged() {
        let mut applied = Applied::default();
        receive(&mut applied, update(1, true, vec![workload("a", "x")]));
        let ack = receive(&mut applied, update(2, true, vec![workload("a", "y")]));
        assert_eq!(
            ack,
            pb::Ack {
                version: 2,
                error: String::new()
            }
        );
        assert_eq!(applied.version, 2);
        let names: Vec<_> = applied.slice.keys().map(|k| k.name.to_string()).collect();
        assert_eq!(names, ["a/y"]);
    }

    #[test]
    fn a_rejected_update_leaves_the_slice_and_version_untouched() {
        let mut applied = Applied::default();
        receive(&mut applied, update(1, true, vec![workload("a", "x")]));
        let before = applied.clone();
        let bad = update(2, true, vec![pb::Resource { kind: None }]);
        let ack = receive(&mut applied, bad);
        assert_eq!(ack.version, 2);
        assert!(ack.error.contains("no kind"), "{}", ack.error);
        assert_eq!(applied, before, "a refused snapshot must not empty the slice");
    }

    #[test]
    fn an_update_below_the_applied_version_is_refused_as_a_replay() {
        let mut applied = Applied::default();
        receive(&mut applied, update(1_700_000_000_500, true, vec![workload("a", "x")]));
        let before = applied.clone();
        // A snapshot from before (a replay) would empty the slice down to "a/old".
        let ack = receive(
            &mut applied,
            update(1_700_000_000_400, true, vec![workload("a", "old")]),
        );
        assert_eq!(ack.version, 1_700_000_000_400);
        assert!(
            ack.error.contains("below the applied version 1700000000500"),
            "{}",
            ack.error
        );
        assert_eq!(applied, before);
        let ack = receive(
            &mut applied,
            update(1_700_000_000_499, false, vec![workload("a", "old")]),
        );
        assert!(!ack.error.is_empty());
        assert_eq!(applied, before);
        // The same version again (a resume's empty difference) and any later one apply.
        assert_eq!(
            receive(&mut applied, update(1_700_000_000_500, false, vec![])).error,
            ""
        );
        assert_eq!(
            receive(&mut applied, update(1_700_000_000_600, false, vec![workload("a", "y")])).error,
            ""
        );
        assert_eq!(applied.version, 1_700_000_000_600);
        assert_eq!(applied.slice.len(), 2);
    }

    #[test]
    fn subscribe_resumes_from_the_applied_version() {
        let applied = Applied {
            version: 7,
            slice: Slice::new(),
            connected: false,
        };
        let Some(pb::stream_request::Kind::Subscribe(s)) = subscribe("node-1", pb::Role::Ztunnel, &applied).kind else {
            panic!("not a subscribe");
        };
        assert_eq!(
            (s.node.as_str(), s.resume_from, s.role),
            ("node-1", 7, pb::Role::Ztunnel as i32)
        );
    }

    #[test]
    fn reconnect_backs_off_and_resets_after_a_delivery() {
        let now = Instant::now();
        let mut r = Reconnect::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<_> = (0..8).map(|_| r.broke(now, 1.0) - now).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[7], Duration::from_secs(5), "capped at max");
        r.delivered();
        assert_eq!(r.broke(now, 1.0) - now, Duration::from_millis(100));
        assert_eq!(r.failures(), 1);
    }

    #[test]
    fn retry_delay_grows_then_caps_and_never_goes_below_min() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(retry_delay(3, min, max, 0.0), 2 * min);
        assert_eq!(retry_delay(u32::MAX, min, max, 1.0), max);
        assert!(retry_delay(1, min, max, 0.0) >= min);
    }
}
