//! The FUSE view: every disk of the data directory as a regular file.
//!
//! ```text
//! MOUNT/disks/NAME      one file per live disk: size = disk size, read-write
//!                       (mode 0444 and EROFS for read-only disks)
//! MOUNT/replicas/       recovery points (empty for now)
//! ```
//!
//! Every read, write, flush, trim and zero goes through the gateway's [`crate::Disk`], the
//! same path NBD clients use, so a tracked disk logs writes made through the mount too. See
//! `docs/fuse.md` for semantics (no growing, no truncating, direct I/O, fsync = flush).
//!
//! The mount is pure Rust (`fuser` without libfuse): it needs `/dev/fuse` and, when not run as
//! root, the `fusermount3` helper from the fuse3 package.

mod fs;
mod mount;
pub mod tree;

pub use fs::{StandbyFs, BLOCK_SIZE, MAX_IO};
pub use mount::{check_mount_point, mounted_fs_type, serve_mount, FuseError, MountOptions};
