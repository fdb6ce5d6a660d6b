//! Trellis wire contracts, compiled from `proto/` at build time, and the subscriber side of the
//! config stream.
//!
//! - [`identity::v1`]: the cluster CA's issuance service (`CertificateService`).
//! - [`config::v1`]: the node-scoped config stream (`ConfigService`) and the resource model
//!   (`Workload`, `Service`, `AuthorizationPolicy`, `Waypoint`, `HTTPRoute`, `RemoteCluster`,
//!   `TrustBundle`).
//! - [`slice`]: a subscriber's copy of its node slice and the pure rules that update it.
//! - [`stream`]: the config-stream client every ztunnel and waypoint runs ([`stream::follow`]).
//! - [`spiffe_workload`]: the SPIFFE Workload API, which every ztunnel serves to its workloads.
//!
//! Every Trellis package is versioned (`trellis.<area>.v1`); a breaking change gets a new
//! version next to the old one.

pub mod addr;
pub mod slice;
pub mod stream;

/// Protobuf packages of Trellis itself.
pub mod identity {
    /// `trellis.identity.v1`: certificate issuance.
    pub mod v1 {
        tonic::include_proto!("trellis.identity.v1");
    }
}

/// The config stream and resource model.
pub mod config {
    /// `trellis.config.v1`: the config stream and the resource model.
    pub mod v1 {
        tonic::include_proto!("trellis.config.v1");
    }
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`, no protobuf package), as the SPIFFE
/// standard defines it.
pub mod spiffe_workload {
    tonic::include_proto!("_");
}
