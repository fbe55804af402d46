//! [`Disk::cut`]: one barrier across several tracked disks, so that a write acknowledged on
//! one disk before a write on another never lands in a later cut than it.
//!
//! **Design.** A cut holds no deferred small write (see [`crate::changelog::extent`],
//! "Deferred small writes"): their bytes are logged first. Most of that copying runs while
//! writes go on (*pre-copy*, as live migration copies memory): a pass over each disk logs
//! the deferred pieces it finds, and writes made meanwhile leave new pieces behind it. Then
//! the disks' writes are held back (those in flight complete first), a last pass logs what
//! the earlier ones left, each log gets its barrier, and writes resume. So writes are held
//! for about as long as the last unheld pass took to be overtaken — what was written during
//! it.
//!
//! One unheld pass is not enough after a long stretch without a cut (replication paused,
//! or a store out of reach): up to `defer_max` (4 GiB) of deferred writes take seconds to
//! copy while the VM keeps writing, and the held pass then copies what was written
//! meanwhile, with writes held. Measured with one unheld pass, 2 GiB of deferred 4 KiB
//! writes and a QD32 writer going on: the slowest writes at the cut's end took 68–1,715 ms
//! in four runs (BENCHMARKS.md, "A cut after 2 GiB of deferred writes"). So unheld passes
//! repeat ([`precopy_again`]) while each logs less than the one before and more than
//! [`PRECOPY_DONE`], at most [`PRECOPY_PASSES`] times; a workload that writes new blocks
//! faster than a pass copies them stops the repetition at once. Then the held pass logged
//! nothing and writes were held 2–340 ms (the barrier and the state file's sync under heavy
//! write-back). Still open: writes also stall for seconds *during* the unheld passes of such
//! a cut (log syncs that write back what the pass appended; see the BENCHMARKS entry).
//!
//! **Invariants.** Every pass is
//! [`ExtentMap::log_deferred`](crate::changelog::extent::ExtentMap::log_deferred), safe
//! while writes go on; only the held pass, the barrier and the cut LSN's record in the
//! state file run with writes held, so the cut is exact and holds no deferred piece. If a
//! pass fails, the cut fails and nothing was cut. Disks are locked in name order, so two
//! cuts of overlapping sets cannot deadlock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::{deferred_error, read_lock, write_lock, Disk, DiskError};
use crate::changelog::extent::Pass;

/// Most unheld passes of a cut.
pub const PRECOPY_PASSES: usize = 8;

/// An unheld pass that logged at most this many bytes ends the pre-copy: the held pass then
/// has about what was written during a pass this short.
pub const PRECOPY_DONE: u64 = 16 << 20;

/// What a cut did (for its log line and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutStats {
    /// Bytes of deferred writes each unheld pass logged (all disks).
    pub passes: Vec<u64>,
    /// Bytes the held pass logged.
    pub held_bytes: u64,
    /// How long writes were held back ...
    pub held: Duration,
    /// ... of which the held pass took this long (the rest: barriers, state files).
    pub held_pass: Duration,
}

/// After unheld passes that logged `passes` bytes (the last one last): whether to run
/// another before holding writes.
pub fn precopy_again(passes: &[u64]) -> bool {
    let Some(&last) = passes.last() else {
        return true;
    };
    let shrinking = match passes.len() {
        1 => true,
        n => last < passes[n - 2],
    };
    passes.len() < PRECOPY_PASSES && last > PRECOPY_DONE && shrinking
}

impl Disk {
    /// Cuts the change logs of `disks` at one instant (see the module documentation).
    /// Returns each disk's last LSN in the cut. Blocking.
    pub fn cut(disks: &[Disk]) -> Result<Vec<u64>, DiskError> {
        Self::cut_with_stats(disks).map(|(lsns, _)| lsns)
    }

    /// [`Disk::cut`], with what it did.
    pub fn cut_with_stats(disks: &[Disk]) -> Result<(Vec<u64>, CutStats), DiskError> {
        let mut stats = CutStats::default();
        while precopy_again(&stats.passes) {
            let mut logged = 0;
            for d in disks {
                if let Some(t) = read_lock(&d.inner.tracking).as_ref() {
                    logged += t
                        .extents
                        .log_deferred(&t.log, Pass::Cut)
                        .map_err(|e| deferred_error(&t.log, e))?;
                }
            }
            stats.passes.push(logged);
        }
        let mut order: Vec<&Disk> = disks.iter().collect();
        order.sort_by(|a, b| a.inner.name.cmp(&b.inner.name));
        let guards: Vec<_> = order
            .iter()
            .map(|d| write_lock(&d.inner.tracking))
            .collect();
        let held_from = Instant::now();
        let mut out = Vec::with_capacity(disks.len());
        for d in disks {
            let i = order
                .iter()
                .position(|o| Arc::ptr_eq(&o.inner, &d.inner))
                .unwrap_or(0);
            match guards[i].as_ref() {
                Some(t) => {
                    let pass_from = Instant::now();
                    stats.held_bytes += t
                        .extents
                        .log_deferred(&t.log, Pass::Cut)
                        .map_err(|e| deferred_error(&t.log, e))?;
                    stats.held_pass += pass_from.elapsed();
                    let lsn = t.log.barrier()?;
                    // Writes from here on save the bytes of this cut's extents first; the
                    // state file says where the cut is before any of them runs, so a
                    // reopened map knows it too.
                    t.extents
                        .cut_at(&t.log, lsn)
                        .map_err(|e| deferred_error(&t.log, e))?;
                    t.log.note_cut(lsn)?;
                    out.push(lsn);
                }
                None => return Err(DiskError::NotTracked(d.inner.name.clone())),
            }
        }
        drop(guards);
        stats.held = held_from.elapsed();
        let names: Vec<&str> = disks.iter().map(|d| d.name()).collect();
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let passes: Vec<String> = stats
            .passes
            .iter()
            .map(|&b| format!("{:.1}", mib(b)))
            .collect();
        if stats.held >= Duration::from_millis(100) {
            info!(
                disks = ?names,
                held_ms = stats.held.as_millis() as u64,
                held_pass_ms = stats.held_pass.as_millis() as u64,
                held_mib = mib(stats.held_bytes),
                unheld_passes_mib = ?passes,
                "a cut held the disks' writes for {} ms while it logged {:.1} MiB of deferred \
                 writes",
                stats.held.as_millis(),
                mib(stats.held_bytes)
            );
        } else {
            debug!(
                disks = ?names,
                held_us = stats.held.as_micros() as u64,
                held_pass_us = stats.held_pass.as_micros() as u64,
                held_mib = mib(stats.held_bytes),
                unheld_passes_mib = ?passes,
                "cut"
            );
        }
        Ok((out, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{LogOptions, LogState};
    use crate::replication::engine::patch_from_log;

    /// 48 MiB of deferred 4 KiB writes, more than [`PRECOPY_DONE`]: the first unheld pass
    /// logs them all, the second finds nothing (no write ran meanwhile), and the held pass
    /// logs nothing; the cut ships the image exactly.
    #[test]
    fn a_second_unheld_pass_leaves_nothing_for_the_held_one() {
        const SIZE: u64 = 64 << 20;
        const DEFERRED: u64 = 48 << 20;
        let t = tempfile::tempdir().unwrap();
        let image = t.path().join("d.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        let opts = LogOptions {
            min_free_bytes: 0,
            min_free_percent: 0,
            // No checkpoint: extents heated stay hot, so later writes are taken inline.
            checkpoint_interval: None,
            ..LogOptions::default()
        };
        let (disk, report) =
            Disk::open_tracked("d", &image, &t.path().join("d.hrl"), "id", opts).unwrap();
        assert_eq!(report.state, LogState::Healthy);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut deferred = 0;
        for off in (0..DEFERRED).step_by(4096) {
            let data = vec![(off / 4096 % 251) as u8 + 1; 4096];
            // The first write into a cold extent syncs the log, the one that crosses a
            // free-space check checks: not inline, but deferred by the writer thread too.
            match disk.write_now(off, &data, false) {
                Some(r) => r.unwrap(),
                None => rt.block_on(disk.write(off, data, false)).unwrap(),
            }
            deferred += 4096;
        }
        assert!(
            deferred > DEFERRED - DEFERRED / 64,
            "{deferred} bytes deferred"
        );
        let map = crate::changelog::extent::registered(disk.change_log().unwrap().dir()).unwrap();
        assert_eq!(map.deferred_bytes() + map.synced_bytes(), deferred);
        let (lsns, stats) = Disk::cut_with_stats(std::slice::from_ref(&disk)).unwrap();
        assert_eq!(stats.passes, vec![deferred, 0]);
        assert_eq!(stats.held_bytes, 0);
        assert_eq!(map.deferred_bytes() + map.synced_bytes(), 0);
        let log = disk.change_log().unwrap();
        let patch = patch_from_log(&log, 0, lsns[0], SIZE).unwrap();
        let mut replica = vec![0u8; SIZE as usize];
        patch.apply(0, &mut replica).unwrap();
        assert!(
            replica == std::fs::read(&image).unwrap(),
            "the cut ships the image"
        );
        rt.block_on(disk.close()).unwrap();
    }

    #[test]
    fn the_precopy_repeats_while_passes_shrink_and_stay_large() {
        let mib = 1u64 << 20;
        assert!(precopy_again(&[]));
        // A first pass that logged much is repeated; one that logged little is not.
        assert!(precopy_again(&[2048 * mib]));
        assert!(!precopy_again(&[PRECOPY_DONE]));
        assert!(!precopy_again(&[0]));
        // Shrinking passes repeat until one is small.
        assert!(precopy_again(&[2048 * mib, 500 * mib]));
        assert!(precopy_again(&[2048 * mib, 500 * mib, 120 * mib]));
        assert!(!precopy_again(&[
            2048 * mib,
            500 * mib,
            120 * mib,
            10 * mib
        ]));
        // Writes as fast as the copy: no point going on.
        assert!(!precopy_again(&[300 * mib, 300 * mib]));
        assert!(!precopy_again(&[300 * mib, 310 * mib]));
        // At most PRECOPY_PASSES passes.
        let slow: Vec<u64> = (0..PRECOPY_PASSES as u64)
            .map(|i| (1000 - i) * mib)
            .collect();
        assert!(precopy_again(&slow[..PRECOPY_PASSES - 1]));
        assert!(!precopy_again(&slow));
    }
}
