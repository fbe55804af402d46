//! Failover: recovery points presented as disks (lazily, copy-on-write), attached as NBD
//! exports, test failover, failover with hydration into local images, and commit.
//!
//! Requests are rows in the replication state database (`attachments`): the CLI adds and
//! removes them, the gateway's engine ([`crate::replication::Engine`]) turns them into exports
//! within a second and reports back (state `served`, hydration progress): [`attachments`] serves
//! and removes them, [`hydrate`] copies a failed-over disk into its overlay.

pub mod actions;
pub mod attachments;
pub mod device;
pub mod hydrate;
pub mod replica;

pub use device::Device;
pub use replica::{is_overlay_dir, overlay_dir, Handover, Overlay, OverlayKind, ReplicaDisk};
