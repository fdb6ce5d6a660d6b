//! Discovery: what exists in the cluster (namespaces, services, workloads, routes, policies,
//! waypoints), behind one trait so that a Kubernetes source can sit next to the manifest
//! directory without touching the rest.
//!
//! A source publishes [`Discovered`] snapshots: the full [`Inventory`] plus the problems it found.
//! A source never publishes less than it knows exists: a bad or unreadable file, or a directory
//! that cannot be listed, is reported and keeps its last good objects.

pub mod directory;

pub use trellis_mesh::inventory::*;

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;

/// One snapshot from a discovery source.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    pub inventory: Inventory,
    /// What is wrong right now, one line each (`path: line N: what`); the inventory still holds
    /// the last good state of every file named here.
    pub problems: Vec<String>,
    /// Whether the source has seen everything once. Until then the inventory may be partial,
    /// and no model is built from it.
    pub synced: bool,
}

/// A discovery source: runs until the receiving side is gone, publishing a fresh snapshot
/// every time what it watches changes.
pub trait DiscoverySource: Send + 'static {
    fn run(self: Box<Self>, out: watch::Sender<Arc<Discovered>>) -> BoxFuture<'static, ()>;
}
