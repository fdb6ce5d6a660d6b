//! How many inbound tunnels (15008 CONNECTs) one node carries, in total and per source identity.
//!
//! The rule is [`TunnelCount`], counters with no I/O: a CONNECT is admitted while the node holds
//! fewer than [`TunnelLimits::per_node`] tunnels and its source identity fewer than
//! [`TunnelLimits::per_identity`]; beyond, the answer is 503 (as for an unreachable pod: the
//! source tries the next endpoint). Every open tunnel costs a descriptor for its pod socket, so
//! `per_node` is fitted below the descriptor limit, keeping [`trellis_identity::limits::FD_RESERVE`]
//! for the listeners. [`Limited`] applies the rule in front of any [`Handler`], and gives freed
//! heap back to the kernel once a flood has drained ([`TunnelCount::release`] says when).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use trellis_identity::limits::FD_RESERVE;
use trellis_identity::SpiffeId;

use crate::hbone::server::{BoxFuture, ConnInfo, Handler};
use crate::hbone::tunnel::Reply;

/// Tunnels at or above which a drain back to [`TRIM_BELOW`] gives memory back.
pub const TRIM_AFTER_PEAK: usize = 1000;
/// Open tunnels below which memory is given back after a peak.
pub const TRIM_BELOW: usize = 64;

/// The bounds on inbound tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelLimits {
    pub per_node: usize,
    pub per_identity: usize,
}

impl TunnelLimits {
    /// `per_node` lowered so that open tunnels (one pod socket each, plus their share of HBONE
    /// connections) leave [`FD_RESERVE`] descriptors of the soft limit `nofile` free.
    pub fn fitted(self, nofile: u64) -> Self {
        let room = (nofile.saturating_sub(FD_RESERVE) * 9 / 10).max(1) as usize;
        let per_node = self.per_node.min(room);
        Self {
            per_node,
            per_identity: self.per_identity.min(per_node),
        }
    }
}

/// Why a CONNECT got 503 for want of room.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverLimit {
    #[error("this node carries its maximum of {0} tunnels")]
    Node(usize),
    #[error("{0} holds its maximum of {1} tunnels on this node")]
    Identity(SpiffeId, usize),
}

/// Open tunnels, in total and per source identity.
#[derive(Debug)]
pub struct TunnelCount {
    limits: TunnelLimits,
    open: usize,
    by_identity: HashMap<SpiffeId, usize>,
    /// Most tunnels open at once since memory was last given back.
    peak: usize,
}

impl TunnelCount {
    pub fn new(limits: TunnelLimits) -> Self {
        Self {
            limits,
            open: 0,
            by_identity: HashMap::new(),
            peak: 0,
        }
    }

    /// A CONNECT from `source`: counted if admitted.
    pub fn admit(&mut self, source: &SpiffeId) -> Result<(), OverLimit> {
        if self.open >= self.limits.per_node {
            return Err(OverLimit::Node(self.limits.per_node));
        }
        let mine = self.by_identity.get(source).copied().unwrap_or(0);
        if mine >= self.limits.per_identity {
            return Err(OverLimit::Identity(source.clone(), self.limits.per_identity));
        }
        self.open += 1;
        *self.by_identity.entry(source.clone()).or_default() += 1;
        self.peak = self.peak.max(self.open);
        Ok(())
    }

    /// A tunnel of `source` ended. True when a flood has just drained (the count fell below
    /// [`TRIM_BELOW`] after reaching [`TRIM_AFTER_PEAK`]): time to give memory back.
    pub fn release(&mut self, source: &SpiffeId) -> bool {
        self.open = self.open.saturating_sub(1);
        if let Some(n) = self.by_identity.get_mut(source) {
            *n -= 1;
            if *n == 0 {
                self.by_identity.remove(source);
            }
        }
        if self.peak >= TRIM_AFTER_PEAK && self.open < TRIM_BELOW {
            self.peak = self.open;
            return true;
        }
        false
    }

    pub fn open(&self) -> usize {
        self.open
    }
}

/// A [`Handler`] that admits each CONNECT within [`TunnelLimits`] (503 beyond) before passing it
/// on, and gives freed heap back to the kernel when a flood of tunnels has drained.
pub struct Limited<H> {
    inner: Arc<H>,
    count: Arc<Mutex<TunnelCount>>,
}

impl<H> Limited<H> {
    pub fn new(inner: Arc<H>, limits: TunnelLimits) -> Self {
        Self {
            inner,
            count: Arc::new(Mutex::new(TunnelCount::new(limits))),
        }
    }

    fn count(&self) -> std::sync::MutexGuard<'_, TunnelCount> {
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open tunnels.
    pub fn open(&self) -> usize {
        self.count().open()
    }
}

impl<H: Handler> Handler for Limited<H> {
    fn handle<R: Reply>(self: Arc<Self>, conn: Arc<ConnInfo>, request: Request<()>, reply: R) -> BoxFuture {
        Box::pin(async move {
            let admitted = self.count().admit(&conn.peer_id);
            if let Err(why) = admitted {
                tracing::warn!(peer = %conn.peer_addr, source = %conn.peer_id, error = %why, "tunnel refused (503)");
                reply.refuse(StatusCode::SERVICE_UNAVAILABLE).await;
                return;
            }
            let source = conn.peer_id.clone();
            self.inner.clone().handle(conn, request, reply).await;
            let drained = self.count().release(&source);
            if drained {
                give_memory_back().await;
            }
        })
    }
}

/// Returns freed heap to the kernel (glibc keeps it otherwise, up to `M_TRIM_THRESHOLD` per
/// arena and all of it in the middle of a heap).
async fn give_memory_back() {
    let _ = tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim only releases free memory of glibc's heaps.
        unsafe { libc::malloc_trim(0) };
        tracing::info!("tunnel flood drained: freed memory given back to the kernel");
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://td/ns/shop/sa/{sa}")).unwrap()
    }

    #[test]
    fn one_identity_cannot_take_the_whole_node() {
        let mut c = TunnelCount::new(TunnelLimits {
            per_node: 5,
            per_identity: 3,
        });
        for _ in 0..3 {
            c.admit(&id("flood")).unwrap();
        }
        assert_eq!(c.admit(&id("flood")), Err(OverLimit::Identity(id("flood"), 3)));
        c.admit(&id("web")).unwrap();
        c.admit(&id("web")).unwrap();
        assert_eq!(c.admit(&id("api")), Err(OverLimit::Node(5)));
        c.release(&id("flood"));
        assert_eq!(c.admit(&id("api")), Ok(()));
    }

    #[test]
    fn memory_is_given_back_once_after_a_flood_drains() {
        let mut c = TunnelCount::new(TunnelLimits {
            per_node: 5000,
            per_identity: 5000,
        });
        for _ in 0..TRIM_AFTER_PEAK {
            c.admit(&id("flood")).unwrap();
        }
        let trims = (0..TRIM_AFTER_PEAK).filter(|_| c.release(&id("flood"))).count();
        assert_eq!(trims, 1);
        assert_eq!(c.open(), 0);
        c.admit(&id("web")).unwrap();
        assert!(!c.release(&id("web")), "no flood, no trim");
    }

    #[test]
    fn fitted_limits_leave_descriptors_for_the_listeners() {
        let l = TunnelLimits {
            per_node: 16_384,
            per_identity: 4096,
        };
        assert_eq!(l.fitted(1 << 20), l);
        let small = l.fitted(20_000);
        assert!(small.per_node < 20_000 - FD_RESERVE as usize);
        assert_eq!(l.fitted(1024).per_identity, l.fitted(1024).per_node);
    }
}
