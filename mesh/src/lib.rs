//! The mesh model, shared by trellisd, ztunnel's static mode and the CLI: what exists, read
//! from Kubernetes-shaped manifests, and the pure rules from it to what each node needs.
//!
//! Read first:
//! - [`inventory::Inventory`]: what exists (namespaces, services, workloads, routes, policies).
//! - [`model::build`]: the mesh model of one cluster, namespace by namespace.
//! - [`model::node_slice`] and [`model::advance`]: what a node gets, cut fresh or moved forward
//!   over the namespaces that changed (one rule, two entry points, property-tested equal).

pub mod edit;
pub mod inventory;
pub mod manifest;
pub mod model;
