//! One seeded run: a tracked [`Disk`] (the real write path, log, checkpoints and recovery) on
//! [`SimStorage`], random operations, a crash at a random point, recovery, checks.

use std::fs::{self, OpenOptions};

use nbd_server::ZeroFlags;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::model::Model;
use super::storage::{materialize, CrashKind, SimStorage, SECTOR};
use crate::changelog::{replay_dir, LogOptions, LogState};
use crate::disk::Disk;

/// What one seed did (for the campaign's summary).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub ops: usize,
    pub host_crash: bool,
    /// The crash hit a sync (before it took effect) rather than falling between operations.
    pub crashed_in_sync: bool,
    /// Acknowledged writes that had to survive (FUA, or before a completed FLUSH).
    pub durable_writes: u64,
    pub redone: u64,
    pub relogged: u64,
    pub cut: bool,
    /// Writes acknowledged out of multi-write steps (batches of the writer thread, or
    /// logged inline while it was idle).
    pub batched_writes: u64,
    /// Bytes of the recovered disk whose last record is an extent (a large write, or a
    /// deferred one whose bytes were not logged before the crash): left out of the replay
    /// comparison.
    pub extent_bytes: u64,
    /// Windows of extents the first life's log heated ahead of streams.
    pub windows: u64,
    /// Records the first life's log copied into a segment's mapping.
    pub mapped: u64,
}

fn opts(rng: &mut StdRng) -> LogOptions {
    LogOptions {
        segment_size: [4096, 8192, 16384, 65536][rng.gen_range(0..4)],
        min_free_bytes: 0,
        min_free_percent: 0,
        checkpoint_interval: None,
        checkpoint_bytes: u64::MAX,
        hot_limit: usize::MAX,
        // Small extents, so that a disk of 32-256 KiB has many, hot and cold, and streams
        // heat windows ahead of them (`hot`, "Heating ahead").
        hot_extent_min: [1024, 4096, 16384, 1 << 22][rng.gen_range(0..4)],
        heat_ahead: [0, 1, 4, 32][rng.gen_range(0..4)],
        // Writes of 4-16 KiB become extents under the first two (their FLUSH syncs the image).
        extent_min: [4096, 8192, 65536, 65536][rng.gen_range(0..4)],
        // A small bound mixes deferred writes with writes logged with their data.
        defer_max: [0, 16384, 1 << 30, 1 << 30][rng.gen_range(0..4)],
        // A FLUSH with this many deferred bytes syncs the image instead of logging them.
        image_flush_min: [0, 4096, 16384, 1 << 30][rng.gen_range(0..4)],
        // While FLUSHes follow few small writes, those are logged with their data (0: never).
        flush_heavy_writes: [0, 2, 8, u32::MAX][rng.gen_range(0..4)],
        // Records without data copied into a mapping of the segment, or written (the
        // simulation's files are on a memory file system, where the mapping is allowed).
        mapped_records: rng.gen_range(0..4) != 0,
        ..LogOptions::default()
    }
}

/// Where seeds keep their files: `STANDBY_SIM_DIR`, else the memory file system `/dev/shm`
/// when there is one (the state file's real fsyncs would otherwise dominate the run time;
/// durability is the simulation's business, not the file system's), else the temporary
/// directory.
pub fn sim_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("STANDBY_SIM_DIR") {
        return d.into();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// Runs seed `seed`. `Err` is a violation (with what was violated).
pub fn run_seed(seed: u64, rt: &tokio::runtime::Runtime) -> Result<Outcome, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let t = tempfile::tempdir_in(sim_dir()).map_err(|e| e.to_string())?;
    let life1 = t.path().join("life1");
    let life2 = t.path().join("life2");
    fs::create_dir_all(&life1).map_err(|e| e.to_string())?;
    let size = rng.gen_range(8..=64u64) * 4096;
    let mut initial = vec![0u8; size as usize];
    rng.fill_bytes(&mut initial);
    let img = life1.join("d.img");
    fs::write(&img, &initial).map_err(|e| e.to_string())?;
    let sim = SimStorage::new(&life1);
    sim.mark_durable(&img).map_err(|e| e.to_string())?;
    let o = opts(&mut rng);
    let (disk, _) =
        Disk::open_tracked_with_sync("d", &img, &life1.join("d.hrl"), "sim-disk", o, sim.clone())
            .map_err(|e| format!("first open: {e}"))?;
    let log = disk.change_log().ok_or("not tracked")?;
    let mut model = Model::new(&initial);
    let mut out = Outcome {
        ops: rng.gen_range(4..80),
        host_crash: rng.gen_bool(0.75),
        ..Outcome::default()
    };
    let crash_op = rng.gen_range(0..out.ops);
    let in_sync = rng.gen_bool(0.6);
    let sectors = size / SECTOR as u64;
    let mut stream_end = sectors;
    for i in 0..out.ops {
        if i == crash_op && in_sync {
            sim.crash_at_sync(rng.gen_range(1..=3));
        }
        let pick = rng.gen_range(0..100);
        match pick {
            0..=59 => {
                // One write, or a burst of several that the writer thread takes as one batch.
                let burst = if rng.gen_bool(0.35) {
                    rng.gen_range(2..=6)
                } else {
                    1
                };
                let mut writes: Vec<(u64, Vec<u8>, bool)> = Vec::new();
                for _ in 0..burst * 4 {
                    if writes.len() == burst {
                        break;
                    }
                    // Half the writes continue a stream (where the last one ended).
                    let first = match stream_end < sectors && rng.gen_bool(0.5) {
                        true => stream_end,
                        false => rng.gen_range(0..sectors),
                    };
                    let n = rng.gen_range(1..=(sectors - first).min(32));
                    stream_end = first + n;
                    let (off, len) = (first * SECTOR as u64, n * SECTOR as u64);
                    if writes
                        .iter()
                        .any(|(o, d, _)| *o < off + len && off < *o + d.len() as u64)
                    {
                        continue;
                    }
                    let mut data = vec![0u8; len as usize];
                    rng.fill_bytes(&mut data);
                    let fua = burst == 1 && rng.gen_bool(0.1);
                    writes.push((off, data, fua));
                }
                let results = rt.block_on(write_all(&disk, &writes));
                for ((off, data, fua), r) in writes.iter().zip(results) {
                    let acked = r.is_ok() && !sim.crashed();
                    if r.is_err() && !sim.crashed() {
                        return Err(format!("write at {off} failed: {r:?}"));
                    }
                    model.change(*off, data, acked, *fua);
                    if acked && *fua {
                        out.durable_writes += 1;
                    }
                    if writes.len() > 1 && r.is_ok() {
                        out.batched_writes += 1;
                    }
                }
            }
            60..=69 => {
                let first = rng.gen_range(0..sectors);
                let n = rng.gen_range(1..=(sectors - first).min(16));
                let (off, len) = (first * SECTOR as u64, n * SECTOR as u64);
                let r = if rng.gen_bool(0.5) {
                    rt.block_on(disk.trim(off, len, false))
                } else {
                    let flags = ZeroFlags {
                        may_trim: rng.gen_bool(0.5),
                        ..ZeroFlags::default()
                    };
                    rt.block_on(disk.write_zeroes(off, len, flags))
                };
                let acked = r.is_ok() && !sim.crashed();
                if r.is_err() && !sim.crashed() {
                    return Err(format!("trim/zero at {off} failed: {r:?}"));
                }
                model.change(off, &vec![0u8; len as usize], acked, false);
            }
            70..=84 => {
                let r = rt.block_on(disk.flush());
                if !sim.crashed() {
                    r.map_err(|e| format!("flush failed: {e}"))?;
                    model.flushed();
                }
            }
            85..=92 => {
                let r = log.checkpoint();
                if !sim.crashed() {
                    r.map_err(|e| format!("checkpoint failed: {e}"))?;
                }
            }
            _ => {
                // As the replicator cuts: the deferred writes' bytes are logged first.
                let r = Disk::cut(std::slice::from_ref(&disk))
                    .map_err(|e| e.to_string())
                    .and_then(|_| log.take().map_err(|e| e.to_string()));
                if !sim.crashed() {
                    r.map_err(|e| format!("take failed: {e}"))?;
                }
            }
        }
        // Background seals finish before the next operation (determinism).
        let _ = log.wait_sealed();
        if let Some(m) = crate::changelog::extent::registered(log.dir()) {
            m.check_deferred_index()
                .map_err(|e| format!("extent map after operation {i}: {e}"))?;
        }
        if sim.crashed() {
            out.crashed_in_sync = true;
            out.ops = i + 1;
            break;
        }
        if i == crash_op {
            sim.crash_now();
            out.ops = i + 1;
            break;
        }
    }
    sim.crash_now();
    let snap = sim.snapshot().ok_or("no snapshot")?;
    out.windows = log.hot_counters().1;
    out.mapped = log.mapped_records();
    drop(log);
    drop(disk);
    let kind = if out.host_crash {
        CrashKind::Host
    } else {
        CrashKind::Process
    };
    materialize(&snap, kind, &life2, &mut rng).map_err(|e| format!("materialize: {e}"))?;

    // Recovery: the real open path, on what the crash left.
    let img2 = life2.join("d.img");
    let sim2 = SimStorage::new(&life2);
    let (disk, report) =
        Disk::open_tracked_with_sync("d", &img2, &life2.join("d.hrl"), "sim-disk", o, sim2)
            .map_err(|e| format!("recovery open: {e}"))?;
    out.redone = report.redone;
    out.relogged = report.relogged;
    out.cut = report.cut.is_some();
    if report.state != LogState::Healthy {
        return Err(format!("a crash broke the chain: {}", report.state));
    }
    if report.host_crash != out.host_crash {
        return Err(format!(
            "recovery saw host crash = {}, the simulation did {:?}",
            report.host_crash, kind
        ));
    }
    // Recovery's own records (extents logged again) may have started segments whose seals
    // run in the background; the replay below reads the directory as sealed.
    if let Some(l) = disk.change_log() {
        let _ = l.wait_sealed();
    }
    let image = rt
        .block_on(disk.read(0, size as usize))
        .map_err(|e| format!("read after recovery: {e}"))?;
    model
        .check(&image)
        .map_err(|e| format!("after recovery: {e}"))?;
    // The log replays to the image: from the chain's start (nothing was released) onto the
    // initial image.
    let base = life2.join("replayed.img");
    fs::write(&base, &initial).map_err(|e| e.to_string())?;
    {
        let f = OpenOptions::new()
            .write(true)
            .open(&base)
            .map_err(|e| e.to_string())?;
        replay_dir(&life2.join("d.hrl"), &f).map_err(|e| format!("replay: {e}"))?;
    }
    let replayed = fs::read(&base).map_err(|e| e.to_string())?;
    // Except where an extent is the last record: its bytes are the image's by definition
    // (the shipper reads them there), and a base copy cannot have them.
    let extents = disk.extent_ranges();
    out.extent_bytes = extents.iter().map(|(a, b)| b - a).sum();
    let in_extent = |i: usize| {
        extents
            .iter()
            .any(|&(a, b)| a <= i as u64 && (i as u64) < b)
    };
    if let Some(i) = (0..image.len()).find(|&i| image[i] != replayed[i] && !in_extent(i)) {
        return Err(format!(
            "replaying the recovered log does not give the recovered image (first difference at byte {i})"
        ));
    }
    // The disk works on: a write (which a FLUSH must find if it was deferred), a flush and
    // a clean close, then a clean reopen.
    rt.block_on(write_all(&disk, &[(0, vec![0xA5; SECTOR], false)]))
        .into_iter()
        .collect::<std::io::Result<Vec<()>>>()
        .map_err(|e| format!("write after recovery: {e}"))?;
    let map = disk
        .change_log()
        .and_then(|l| crate::changelog::extent::registered(l.dir()))
        .ok_or("no extent map after recovery")?;
    map.check_deferred_index()
        .map_err(|e| format!("extent map after recovery and a write: {e}"))?;
    rt.block_on(async {
        disk.flush().await?;
        disk.close().await
    })
    .map_err(|e| format!("after recovery: {e}"))?;
    drop(disk);
    let (_d, r2) = Disk::open_tracked_with_sync(
        "d",
        &img2,
        &life2.join("d.hrl"),
        "sim-disk",
        o,
        SimStorage::new(&life2),
    )
    .map_err(|e| format!("reopen: {e}"))?;
    if r2.state != LogState::Healthy || r2.redone != 0 {
        return Err(format!("reopen after a clean close: {r2:?}"));
    }
    Ok(out)
}

/// The NBD server's write path (see `nbd_server`'s transmission): inline when the disk
/// takes it (`write_now`), else `write`. A burst's writes are all submitted before the
/// disk's writer thread may take any of them (it is held meanwhile), so those that reach it
/// form one batch — deterministically, as the seed's repro needs.
async fn write_all(disk: &Disk, writes: &[(u64, Vec<u8>, bool)]) -> Vec<std::io::Result<()>> {
    let hold = if writes.len() > 1 {
        disk.hold_writer()
    } else {
        None
    };
    let futs: Vec<_> = writes
        .iter()
        .map(|(off, data, fua)| {
            let now = disk.write_now(*off, data, *fua);
            async move {
                match now {
                    Some(r) => r,
                    None => disk.write(*off, data.clone(), *fua).await,
                }
            }
        })
        .collect();
    // `join_all` polls every write once, in order (each submits itself), before the second
    // future lets the writer thread go.
    let (results, ()) = futures::future::join(futures::future::join_all(futs), async move {
        drop(hold);
    })
    .await;
    results
}

/// The command that runs one seed again.
pub fn repro(seed: u64) -> String {
    format!("STANDBY_SIM_SEED={seed} cargo nextest run -p gateway --features testing sim_seeds")
}

/// Runs seeds `first..first+count`; returns the outcomes and the failures (seed, message).
pub fn campaign(first: u64, count: u64) -> (Vec<Outcome>, Vec<(u64, String)>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for seed in first..first + count {
        match run_seed(seed, &rt) {
            Ok(o) => ok.push(o),
            Err(e) => {
                eprintln!("sim seed {seed} FAILED: {e}\n  repro: {}", repro(seed));
                bad.push((seed, e));
            }
        }
    }
    (ok, bad)
}
