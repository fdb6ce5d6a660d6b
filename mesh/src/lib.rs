//! The mesh model, shared by trellisd, ztunnel's static mode and the CLI: what exists, read
//! from Kubernetes-shaped manifests, and the pure rules from it to what each node needs.
//!
//! Read first:
//! - [`inventory::Inventory`]: what exists (namespaces, services, workloads, routes, policies).
//! - [`model::build`]: the mesh model of one cluster, namespace by namespace.
//! - [`model::node_slice`] and [`model::advance`]: what a node gets, cut fresh or moved forward
//!   over the namespaces that changed (one rule, two entry points, property-tested equal).
//! - [`traffic::serving`]: which clusters serve a global service now, by weight or locality
//!   (the data plane's rule, for status).

pub mod edit;
pub mod inventory;
pub mod manifest;
pub mod model;
pub mod traffic;
