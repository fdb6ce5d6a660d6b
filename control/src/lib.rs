//! trellisd: the per-cluster control plane, as a library the `trellisd` binary drives.
//!
//! Read first:
//! - [`discovery`]: what exists ([`discovery::DiscoverySource`], the manifest directory).
//! - `trellis_mesh::model`: pure rules from what exists to what each node needs.
//! - [`stream`]: the node-scoped config stream over gRPC.

pub mod admin;
pub mod discovery;
pub mod federate;
pub mod hub;
pub mod metrics;
pub mod server;
pub mod stream;
pub mod wire;
