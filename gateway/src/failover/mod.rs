//! Failover: recovery points presented as disks (lazily, copy-on-write), attached as NBD
//! exports, test failover, failover with hydration into local images, and commit.
//!
//! Requests reach the gateway's engine ([`crate::replication::Engine`]) as typed messages
//! ([`crate::replication::requests`]); their durable record is rows of the replication state
//! database (`attachments`), which the engine turns into exports at once (and again at each
//! start), reporting back there (state `served`, hydration progress): [`attachments`] serves
//! and removes them, [`hydrate`] copies a failed-over disk into its overlay. A test
//! failover's VM is launched, reaped and stopped by the gateway ([`test_vm`], with the
//! process mechanics in [`launch`]).

pub mod actions;
pub mod attachments;
pub mod device;
pub mod hydrate;
pub mod launch;
pub mod replica;
pub mod test_vm;

pub use device::Device;
pub use replica::{is_overlay_dir, overlay_dir, Handover, Overlay, OverlayKind, ReplicaDisk};
