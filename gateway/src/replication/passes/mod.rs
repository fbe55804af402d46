//! The engine's passes, one file each: enabling protection ([`enable`]), initial replication
//! and finalizing ([`initial`]), the chunk pass both initial replication and resync run
//! ([`copy`]), cutting and publishing a point ([`cut`]), delta replication ([`delta`]) and
//! resynchronization ([`resync`]).
//!
//! Each pass is a method of [`super::engine::Engine`] run by the VM's state machine
//! ([`super::vm`]) as one job; each either moves the VM to its next phase or returns a
//! [`super::engine::ReplError`] the state machine records. A pass never deletes change-log
//! segments before the point holding their records is published.

pub mod copy;
pub mod cut;
pub mod delta;
pub mod enable;
pub mod initial;
pub mod resync;
