//! SPIFFE identity for Trellis: who every workload, node and control plane is, and how they
//! prove it.
//!
//! Read first:
//! - [`SpiffeId`] and [`TrustDomain`]: identities, parsed strictly.
//! - [`CertificateAuthority`]: the cluster CA (on-disk key material, CSR checks, TTL policy),
//!   served over gRPC by [`issuance::CaServer`] with join tokens ([`JoinTokens`]) and an
//!   authorization hook ([`issuance::IssuanceAuthorizer`]).
//! - [`CertManager`]: holds and rotates SVIDs on a node, and plugs into rustls.
//! - [`BundleSet`] with [`verify::SpiffeServerVerifier`] / [`verify::SpiffeClientVerifier`]:
//!   SPIFFE federation, each peer checked against its own trust domain's bundle.
//! - [`workload_api`]: the SPIFFE Workload API that ztunnel serves to workloads.
//!
//! The only TLS crypto provider is aws-lc-rs ([`tls::provider`]).

pub mod bundle;
pub mod ca;
pub mod caclient;
pub mod csr;
pub mod id;
pub mod issuance;
pub mod limits;
pub mod manager;
pub mod principal;
pub mod renewal;
pub mod saved;
pub mod svid;
pub mod tls;
pub mod token;
pub mod verify;
pub mod workload_api;

pub use bundle::{BundleSet, TrustBundle};
pub use ca::{CertificateAuthority, IssuancePolicy};
pub use caclient::CaClient;
pub use id::{IdKind, SpiffeId, TrustDomain};
pub use manager::{CertManager, HeldSvid, ManagerConfig};
pub use principal::Principal;
pub use svid::Svid;
pub use token::JoinTokens;
