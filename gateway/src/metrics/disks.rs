//! Per-disk figures read from the disks this gateway serves at each scrape, from memory only
//! (no I/O): bytes appended to each disk's change log since the gateway started and the disk
//! bytes those records cover (large writes are extent records whose data stays in the
//! image), the log syncs its hot-extent rule made writers wait for and the windows of
//! extents it heated ahead of sequential writers (see `changelog::hot`), and the fill of its
//! dirty bitmap (the changes the log could not record: overflow or broken chain,
//! to be resynchronized).
//!
//! The families are cleared and refilled on each scrape, so a disk no longer served (or no
//! longer logging) disappears; the log counter restarts with the gateway, which Prometheus'
//! `rate()` treats as a counter reset.

use std::sync::atomic::{AtomicU64, Ordering};

use nbd_server::Exports;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::failover::Device;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DiskLabel {
    pub disk: String,
}

pub struct DiskMetrics {
    log_written: Family<DiskLabel, Counter>,
    log_recorded: Family<DiskLabel, Counter>,
    hot_syncs: Family<DiskLabel, Counter>,
    windows: Family<DiskLabel, Counter>,
    dirty: Family<DiskLabel, Gauge<f64, AtomicU64>>,
}

impl DiskMetrics {
    pub fn new(r: &mut Registry) -> Self {
        let m = Self {
            log_written: Family::default(),
            log_recorded: Family::default(),
            hot_syncs: Family::default(),
            windows: Family::default(),
            dirty: Family::default(),
        };
        r.register_with_unit(
            "standby_disk_log_written",
            "Change-log record bytes (headers and data) appended for a disk since the gateway started",
            Unit::Bytes,
            m.log_written.clone(),
        );
        r.register_with_unit(
            "standby_disk_log_recorded",
            "Disk bytes covered by the change-log records appended for a disk since the gateway started (writes, zeroes, trims)",
            Unit::Bytes,
            m.log_recorded.clone(),
        );
        r.register(
            "standby_disk_log_hot_syncs",
            "Change-log syncs writes to a disk waited for before reaching a cold part of the image, or to heat extents ahead of a sequential writer, since the disk was opened",
            m.hot_syncs.clone(),
        );
        r.register(
            "standby_disk_log_windows_heated",
            "Windows of extents heated ahead of a sequential writer on a disk (one log sync for many extents) since the disk was opened",
            m.windows.clone(),
        );
        r.register_with_unit(
            "standby_disk_dirty",
            "Fraction of a disk's 64 KiB grains marked in its dirty bitmap (changes the log did not record)",
            Unit::Other("ratio".into()),
            m.dirty.clone(),
        );
        m
    }

    /// Refills the families from the live disks of `exports`.
    pub fn refresh(&self, exports: &Exports<Device>) {
        self.log_written.clear();
        self.log_recorded.clear();
        self.hot_syncs.clear();
        self.windows.clear();
        self.dirty.clear();
        for e in exports.list() {
            let Some(d) = e.device.live() else { continue };
            let l = DiskLabel {
                disk: d.name().to_string(),
            };
            if let Some(log) = d.change_log() {
                self.log_written
                    .get_or_create(&l)
                    .inner()
                    .store(log.appended_bytes(), Ordering::Relaxed);
                self.log_recorded
                    .get_or_create(&l)
                    .inner()
                    .store(log.recorded_bytes(), Ordering::Relaxed);
                let (syncs, windows) = log.hot_counters();
                self.hot_syncs
                    .get_or_create(&l)
                    .inner()
                    .store(syncs, Ordering::Relaxed);
                self.windows
                    .get_or_create(&l)
                    .inner()
                    .store(windows, Ordering::Relaxed);
            }
            if let Some(m) = d.dirty_map() {
                self.dirty.get_or_create(&l).set(m.dirty_ratio());
            }
        }
    }
}
