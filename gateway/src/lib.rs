//! The Standby gateway: tracked disks, serving them, and (in later modules) the change log,
//! replication engine, jobs and failover.

pub mod api;
pub mod catalog;
pub mod changelog;
pub mod config;
pub mod console;
pub mod datadir_lock;
pub mod disk;
pub mod failover;
pub mod fastio;
pub mod fuse;
pub mod mapped;
pub mod metrics;
pub mod replication;
pub mod serve;
pub mod site;
pub mod units;

pub use catalog::{DataDir, DiskRecord};
pub use config::Config;
pub use disk::Disk;
