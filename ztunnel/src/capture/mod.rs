//! Transparent capture with nftables, in the node's network namespace, kept equal to the config
//! by a reconcile loop that never fails open.
//!
//! ztunnel owns one table, `ip trellis`. [`rules::desired`] renders it as a pure function of the
//! [`Plan`] (the enrolled pods, or host mode); it is always replaced whole, in one atomic `nft -f`
//! transaction. Only new connections are captured: a connection that was open before its pod was
//! enrolled runs on untouched. Non-enrolled pods match no rule.
//!
//! **Reconcile.** [`reconcile::Reconciler`] (no I/O) decides when to install and when to read the
//! table back; [`driver::run`] runs nft for it, with a timeout. Installs that fail or hang are
//! retried with backoff; the table is read back after every install and periodically, and
//! reinstalled when it differs. Readiness (`/healthz/ready`) and `trellis_capture_rules_in_sync`
//! are true only while a read back equals the desired table.
//!
//! **Fail closed.**
//! - The kernel holds a whole table or the previous one, never a mix: a pod enters the enrolled
//!   set in the same transaction as its redirect and its guard.
//! - Every capture rule has a guard twin after it (filter hook) with the same match that rejects
//!   with a TCP reset: a new connection of an enrolled pod that was not redirected (its nat
//!   chain flushed or deleted, a rule edited) is refused, never forwarded in plaintext.
//! - A failed or timed-out install leaves the last table in force, and ztunnel never removes the
//!   table: when ztunnel stops, enrolled pods' connections are redirected to closed ports and
//!   fail. `trellis lab down` (or deleting the table) removes it.
//! - What ztunnel cannot do: while nft cannot change the kernel at all, a pod enrolled after the
//!   last successful install is not yet in the kernel's enrolled set and keeps the treatment it
//!   had before (as in Istio ambient until its redirection is set up). ztunnel reports it: not
//!   ready, `trellis_capture_rules_in_sync` 0, `trellis_capture_apply_failures_total` rising.

pub mod driver;
pub mod installed;
pub mod reconcile;
pub mod rules;

pub use driver::{Nft, NftError};
pub use installed::Snapshot;
pub use reconcile::{Reconciler, Timing};
pub use rules::{desired, Plan, Ports, Table, TABLE};
