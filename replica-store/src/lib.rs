//! Chunk-addressed replica store: where Standby's recovery points live.
//!
//! - [`backend`]: the object-store trait and its local / S3 (and, with the `testing` feature,
//!   in-memory and fault-injecting) implementations.
//! - [`Store`]: an opened store (`store.toml`), chunk put/get with dedup, zero elision,
//!   compression, encryption and verification.
//! - [`PointBuilder`] / [`PointMeta`]: recovery points (all disks of a VM), published atomically.
//! - [`DiskReader`]: random access to a point's disk with an LRU cache and read-ahead.
//! - GC ([`Store::gc`]), retention ([`Store::prune`]), verification ([`Store::verify_all`]).
//!
//! The on-store format is described in `docs/replica-store.md`.

pub mod backend;
pub mod blob;
pub mod catalog;
pub mod chunk;
pub mod config;
pub mod crypto;
pub mod error;
pub mod gc;
pub mod image;
pub mod manifest;
pub mod pack;
pub mod patch;
pub mod point;
pub mod reader;
pub mod retention;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod usage;
pub mod verify;

pub use backend::s3::S3Config;
pub use backend::{Backend, ObjectMeta, RequestCounts};
pub use chunk::{ChunkId, Compression};
pub use config::StoreLocation;
pub use crypto::{Cipher, StoreKey};
pub use error::{Error, Recoverability, Result};
pub use gc::{GcOptions, GcReport};
pub use image::{export_disk, import_disk, ImportStats};
pub use manifest::DiskIndex;
pub use pack::{Layout, PackTotals};
pub use patch::Patch;
pub use point::{
    ChunkWriter, Consistency, Consolidated, DiskEntry, PatchRef, PointBuilder, PointMeta,
    RebaseSkipped, UploadStats,
};
pub use reader::{cache_stats, CacheStats, DiskReader, Extent, ReaderOptions};
pub use retention::{PruneReport, RetentionPolicy};
pub use store::{CreateOptions, PutKind, PutOutcome, Store, StoreSettings};
pub use usage::{SizeClass, Usage};
pub use verify::{ChunkProblem, VerifyCounts, VerifyProgress, VerifyReport};
