//! Seeded storage-fault simulation of the change log and the image (in the style of
//! TigerBeetle's `testing/storage.zig`), behind the crate's `testing` feature.
//!
//! **The logic that is tested is the logic that runs**: each seed opens a real tracked
//! [`crate::disk::Disk`] — its write path, change log, sync rounds, checkpoints, seals and,
//! after the crash, its recovery — on real files whose syncs go through [`SimStorage`] (the
//! disk's [`crate::changelog::FileSync`] seam). From the seed it draws the disk size, the
//! segment size, `extent_min`, `defer_max` and `image_flush_min` (extents, deferred small
//! writes and FLUSHes that sync the image instead of logging them, see
//! [`crate::changelog::extent`]), a sequence of writes (some FUA; about a third of the write
//! steps submit 2–6 concurrent writes, which the disk's writer thread takes as one batch —
//! its `record_writes` — unless they are logged inline), trims, write-zeroes, FLUSHes,
//! checkpoints and takes (cut through `Disk::cut`), and a crash point: the n-th sync during
//! one operation (before that sync takes effect) or the end of an operation; then a process
//! crash (page cache kept) or a host crash (unsynced writes lost, torn per sector or written
//! back out of order; see [`storage`]).
//! Recovery runs on what the crash left, and the run checks:
//!
//! 1. the chain is healthy (a crash alone never breaks it) and recovery saw a host crash
//!    exactly when there was one;
//! 2. every sector holds a value the NBD contract allows: the one made durable by the last
//!    completed FLUSH or FUA write, or one written since (acknowledged or in flight)
//!    ([`model`]) — so no write acknowledged before a completed FLUSH is lost;
//! 3. replaying the recovered log from the chain's start onto the initial image gives the
//!    recovered image byte for byte (the log describes the image, so replicas stay exact),
//!    except where an extent is the last record (its bytes are the image's by definition;
//!    a base copy cannot have them);
//! 4. the disk works on: a write, a FLUSH, a clean close, a clean reopen with nothing to redo.
//!
//! A failing seed prints itself and the command that runs it alone ([`run::repro`]).
//! `cargo nextest run -p gateway --features testing sim_seeds` runs 200 seeds;
//! `STANDBY_SIM_SEEDS=N` (and `STANDBY_SIM_SEED_START=S`) run N seeds from S;
//! `STANDBY_SIM_SEED=S` runs seed S alone; `STANDBY_SIM_DIR` sets where seeds keep their files
//! (default: a memory file system when there is one).

pub mod model;
pub mod run;
pub mod storage;

pub use self::run::{campaign, repro, run_seed, sim_dir, Outcome};
pub use self::storage::{CrashKind, SimStorage};

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<u64> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }

    #[test]
    fn sim_seeds() {
        let (first, count) = match env("STANDBY_SIM_SEED") {
            Some(s) => (s, 1),
            None => (
                env("STANDBY_SIM_SEED_START").unwrap_or(0),
                env("STANDBY_SIM_SEEDS").unwrap_or(200),
            ),
        };
        let started = std::time::Instant::now();
        let batches0 = crate::disk::MULTI_WRITE_BATCHES.load(std::sync::atomic::Ordering::Relaxed);
        let deferred0 =
            crate::changelog::extent::DEFERRED_LOGGED.load(std::sync::atomic::Ordering::Relaxed);
        let heavy0 = crate::disk::FLUSH_HEAVY_WRITES.load(std::sync::atomic::Ordering::Relaxed);
        let (ok, bad) = campaign(first, count);
        let batches =
            crate::disk::MULTI_WRITE_BATCHES.load(std::sync::atomic::Ordering::Relaxed) - batches0;
        let burst_writes: u64 = ok.iter().map(|o| o.batched_writes).sum();
        let host = ok.iter().filter(|o| o.host_crash).count();
        let in_sync = ok.iter().filter(|o| o.crashed_in_sync).count();
        let cut = ok.iter().filter(|o| o.cut).count();
        let relog = ok.iter().filter(|o| o.relogged > 0).count();
        let durable: u64 = ok.iter().map(|o| o.durable_writes).sum();
        let deferred = crate::changelog::extent::DEFERRED_LOGGED
            .load(std::sync::atomic::Ordering::Relaxed)
            - deferred0;
        let heavy =
            crate::disk::FLUSH_HEAVY_WRITES.load(std::sync::atomic::Ordering::Relaxed) - heavy0;
        let mapped: u64 = ok.iter().map(|o| o.mapped).sum();
        let extent_seeds = ok.iter().filter(|o| o.extent_bytes > 0).count();
        let windows: u64 = ok.iter().map(|o| o.windows).sum();
        eprintln!(
            "sim: seeds {first}..{} — {} passed, {} failed; {host} host crashes, {in_sync} crashes inside a sync, {cut} torn log tails cut, {relog} recoveries logged hot extents again, {durable} FUA writes checked, {burst_writes} writes of multi-write steps acknowledged, {batches} multi-write batches logged, {deferred} bytes of deferred writes logged, {heavy} small writes logged with their data between frequent FLUSHes, {extent_seeds} recoveries with extents left out of the replay check, {windows} windows of extents heated ahead of streams, {mapped} records copied into a segment's mapping; {:.1} s",
            first + count,
            ok.len(),
            bad.len(),
            started.elapsed().as_secs_f64()
        );
        assert!(
            bad.is_empty(),
            "{} seeds failed; first: seed {} — {}\n  repro: {}",
            bad.len(),
            bad[0].0,
            bad[0].1,
            repro(bad[0].0)
        );
        // The campaign explores what it claims to.
        if count >= 100 {
            assert!(host > 0 && in_sync > 0 && cut > 0 && relog > 0 && batches > 0);
            assert!(deferred > 0 && extent_seeds > 0 && windows > 0);
            // Where the seeds' files are on a file system that allows the mapping.
            assert!(mapped > 0 || !crate::changelog::segmap::supported(&sim_dir()));
        }
    }
}
