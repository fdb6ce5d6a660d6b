//! `ztunnel`: Trellis's per-node zero-trust tunnel proxy.
//!
//! It joins the cluster with a one-time token (node SVID), follows trellisd's config stream
//! for its node, holds SVIDs for the enrolled workloads on the node, captures their TCP with
//! nftables and carries it in HBONE tunnels (HTTP/2 CONNECT inside TLS 1.3 mutual auth)
//! presenting the source workload's SVID. At the destination it authorizes each tunnel (L4
//! policy) and delivers it to the pod.
//!
//! Read first: [`app::run`] (how the parts fit), [`proxy::outbound`] and [`proxy::inbound`]
//! (the two halves of a tunnel), [`state::ProxyState`] (what a node knows).

pub mod admin;
pub mod app;
pub mod capture;
pub mod config;
pub mod hbone;
pub mod lb;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod shard;
pub mod state;
pub mod static_config;
pub mod trust;
