//! Prometheus metrics of the gateway, served at `/metrics` in the OpenMetrics text format.
//!
//! The figures (every name is documented in docs/metrics.md):
//! - Live counters of the NBD data path ([`nbd`]): fed by the NBD server's observer hook as
//!   each reply is written; cheap (atomics, one histogram lock per request).
//! - Per-disk figures of the disks served ([`disks`]): change-log bytes written, dirty-bitmap
//!   fill; read from memory when `/metrics` is scraped.
//! - The replication state ([`state`]): read from the state database when `/metrics` is
//!   scraped (VM state, health, RPO, last point, failures, log backlog, jobs). Gauges of VMs
//!   and disks that are no longer there disappear; job counters count each finished job once
//!   (from the job history, which keeps the newest 500 finished jobs).
//! - The replica store ([`store`]): objects and bytes from a listing that a background task
//!   refreshes (never one per scrape), and the replica readers' chunk-cache hits and misses.
//!
//! Names carry their unit (`_seconds`, `_bytes`, `_ratio`); counters end in `_total`.

pub mod disks;
pub mod nbd;
pub mod state;
pub mod store;

use std::sync::{Arc, Mutex};

use nbd_server::Exports;
use prometheus_client::registry::Registry;

use crate::failover::Device;

use crate::replication::Db;

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    pub nbd: nbd::NbdMetrics,
    disks: disks::DiskMetrics,
    state: Mutex<state::StateMetrics>,
    pub store: store::StoreMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let nbd = nbd::NbdMetrics::new(&mut registry);
        let state = state::StateMetrics::new(&mut registry);
        let disks = disks::DiskMetrics::new(&mut registry);
        let store = store::StoreMetrics::new(&mut registry);
        Arc::new(Self {
            registry,
            nbd,
            disks,
            state: Mutex::new(state),
            store,
        })
    }

    /// Refreshes the replication figures from the database and the disk figures from the
    /// disks `exports` serves, and encodes everything. Synchronous (SQLite): call on a
    /// blocking thread.
    pub fn scrape(&self, db: &Db, exports: &Exports<Device>) -> Result<String, String> {
        // One scrape at a time: a refresh clears and refills the state gauges.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.refresh(db).map_err(|e| e.to_string())?;
        self.disks.refresh(exports);
        self.store.refresh();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| format!("encoding metrics: {e}"))?;
        Ok(out)
    }
}
