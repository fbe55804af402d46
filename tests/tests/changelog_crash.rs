//! Crash test of the change log with real processes.
//!
//! Each iteration starts `standby serve` on a tracked disk, runs two clients at once — fio
//! (nbd engine, random 4 KiB writes, crc32c verify headers) for load on one half of the disk
//! and an oracle client on the other half that pipelines writes with a FLUSH every few
//! writes (3 or 12, by iteration: small writes logged with their data, or deferred) and
//! records exactly which writes were acknowledged before each completed flush — then
//! `kill -9`s the gateway at a random moment, restarts it (recovery) and stops it cleanly, and
//! checks:
//!
//! (a) every write acknowledged before the last completed flush is in the image (or a later
//!     write to the same block is);
//! (b) replaying the change log from its beginning onto the image as it was when the chain
//!     started reproduces the current image byte for byte, except where an extent is the
//!     last record (a large write, or a deferred small write whose bytes the next FLUSH or
//!     cut would have logged: the image holds them, a base copy cannot; the summary line
//!     counts those bytes);
//! plus: the log is healthy and `standby log verify` passes.
//!
//! Every `REBASE` iterations the chain is restarted (tracking disabled and enabled) with a
//! fresh copy of the image as the new base, so long campaigns keep the log small.
//!
//! `STANDBY_CRASH_ITERATIONS` sets the number of iterations (default 20; the long campaign
//! uses 1000). `STANDBY_CRASH_SEED` fixes the random seed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use standby_e2e::cli_json::json;
use standby_e2e::nbd_client::{RawClient, CMD_FLUSH, CMD_WRITE, REP_ACK};
use standby_e2e::{random_file, require_tool, run, standby, test_dir, Gateway};

const DISK: &str = "crash";
const SIZE: u64 = 32 << 20;
/// The oracle writes in [0, HALF), fio in [HALF, SIZE).
const HALF: u64 = SIZE / 2;
const BLOCK: u64 = 4096;
const WINDOW: usize = 8;
/// The oracle's FLUSH comes after this many writes: every 12 in even iterations (the gateway
/// defers the small writes' bytes to the FLUSH), every 3 in odd ones, which also send no
/// write while the FLUSH is in flight (at most `flush_heavy_writes` per FLUSH with fio's: the
/// gateway logs them with their data).
fn flush_every(iter: u64) -> u64 {
    [12, 3][(iter % 2) as usize]
}
const REBASE: u64 = 5;

/// The oracle's writes, in blocks: mostly one (4 KiB: a small write, logged with its data
/// or deferred), one in sixteen an extent (64 KiB to 1 MiB: logged as a 40-byte record, its
/// bytes in the image only, mostly on the connection's task). A FLUSH after one syncs the
/// image too: an iteration's oracle acknowledges about 500 writes with this mix, about 230
/// with one in four, about 9,000 with 4 KiB writes only.
const WRITE_BLOCKS: [u64; 16] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 16, 64, 256];

/// The bytes of block `k` of write `idx`.
fn block_data(iter: u64, idx: u64, k: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    rand::rngs::StdRng::seed_from_u64((iter << 32) ^ (k << 20) ^ idx ^ 0x5eed_0000_0000_0000)
        .fill_bytes(&mut b);
    b[0..8].copy_from_slice(&iter.to_le_bytes());
    b[8..16].copy_from_slice(&idx.to_le_bytes());
    b[16..24].copy_from_slice(&k.to_le_bytes());
    b
}

/// What the oracle client saw before the gateway died.
#[derive(Default)]
struct Oracle {
    /// Writes in send order: (first block, blocks).
    writes: Vec<(u64, u64)>,
    /// For each write index: was it acknowledged (successfully)?
    acked: Vec<bool>,
    /// Writes made durable by a completed flush (indices into `writes`).
    durable: Vec<usize>,
    flushes_completed: u64,
}

/// Pipelined writes (never two in flight over the same block) with periodic flushes, until
/// the connection breaks.
fn oracle_client(addr: std::net::SocketAddr, iter: u64, seed: u64) -> Oracle {
    let mut o = Oracle::default();
    let Ok(mut c) = RawClient::connect(addr) else {
        return o;
    };
    match c.go(DISK) {
        Ok(REP_ACK) => {}
        _ => return o,
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // cookie → Some(write index) for writes, None for a flush (with its covered set).
    let mut inflight_writes: HashMap<u64, usize> = HashMap::new();
    let mut busy_blocks: HashMap<u64, usize> = HashMap::new();
    let mut flush_inflight: Option<(u64, Vec<usize>)> = None;
    let mut acked_not_durable: Vec<usize> = Vec::new();
    let mut cookie = 1u64;
    let mut since_flush = 0;
    loop {
        // Send while there is room.
        while inflight_writes.len() + usize::from(flush_inflight.is_some()) < WINDOW {
            if since_flush >= flush_every(iter) {
                if flush_inflight.is_none() {
                    let covered = std::mem::take(&mut acked_not_durable);
                    if c.send_request(0, CMD_FLUSH, cookie, 0, 0, &[]).is_err() {
                        return o;
                    }
                    flush_inflight = Some((cookie, covered));
                    cookie += 1;
                    since_flush = 0;
                    continue;
                }
                if iter % 2 == 1 {
                    // Odd iterations send no write while their FLUSH is in flight: at most 3
                    // writes per FLUSH, so the gateway logs them with their data.
                    break;
                }
            }
            let n = WRITE_BLOCKS[rng.gen_range(0..WRITE_BLOCKS.len())];
            let first = loop {
                let b = rng.gen_range(0..=HALF / BLOCK - n);
                if (b..b + n).all(|b| !busy_blocks.contains_key(&b)) {
                    break b;
                }
            };
            let idx = o.writes.len();
            o.writes.push((first, n));
            o.acked.push(false);
            let data: Vec<u8> = (0..n)
                .flat_map(|k| block_data(iter, idx as u64, k))
                .collect();
            if c.send_request(
                0,
                CMD_WRITE,
                cookie,
                first * BLOCK,
                data.len() as u32,
                &data,
            )
            .is_err()
            {
                return o;
            }
            inflight_writes.insert(cookie, idx);
            for b in first..first + n {
                busy_blocks.insert(b, idx);
            }
            cookie += 1;
            since_flush += 1;
        }
        let Ok(r) = c.read_reply(|_| 0) else {
            return o;
        };
        assert_eq!(
            r.error, 0,
            "the gateway failed a request (cookie {})",
            r.cookie
        );
        if let Some(idx) = inflight_writes.remove(&r.cookie) {
            o.acked[idx] = true;
            let (first, n) = o.writes[idx];
            for b in first..first + n {
                busy_blocks.remove(&b);
            }
            acked_not_durable.push(idx);
        } else if flush_inflight.as_ref().is_some_and(|(k, _)| *k == r.cookie) {
            let (_, covered) = flush_inflight.take().unwrap_or_default();
            o.durable.extend(covered);
            o.flushes_completed += 1;
        } else {
            panic!("reply with unknown cookie {}", r.cookie);
        }
    }
}

fn start_fio(uri: &str, out: &Path, seed: u64) -> Child {
    Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--rate_iops=1500",
            &format!("--offset={HALF}"),
            &format!("--size={HALF}"),
            "--time_based",
            "--runtime=30",
            "--verify=crc32c",
            "--do_verify=0",
            "--verify_state_save=0",
            // One process: killing it stops the job too (a forked job would outlive the kill
            // and, with its server gone, keep writing errors to its output file).
            "--thread",
            &format!("--randseed={seed}"),
            "--output-format=json",
        ])
        .arg(format!("--output={}", out.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio")
}

/// Byte ranges (start → end) whose last record in the log is an extent, from `log dump` of
/// every segment in `list` (`log list --json`), oldest first.
fn extent_ranges(dd: &Path, list: &serde_json::Value) -> BTreeMap<u64, u64> {
    let mut cover: BTreeMap<u64, u64> = BTreeMap::new();
    for seg in list["segments"].as_array().into_iter().flatten() {
        if seg["records"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        let dump = json(
            dd,
            &["log", "dump", DISK, "--segment", &seg["seq"].to_string()],
        );
        for r in dump["records"].as_array().into_iter().flatten() {
            let (Some(off), Some(len)) = (r["offset"].as_u64(), r["length"].as_u64()) else {
                continue;
            };
            if r["kind"] == "flush" || len == 0 {
                continue;
            }
            let end = off + len;
            // Remove [off, end) from the cover, keeping the parts outside it.
            let first = cover
                .range(..off)
                .next_back()
                .filter(|(_, &e)| e > off)
                .map(|(&s, _)| s)
                .unwrap_or(off);
            let hit: Vec<(u64, u64)> = cover.range(first..end).map(|(&s, &e)| (s, e)).collect();
            for (s, e) in hit {
                cover.remove(&s);
                if s < off {
                    cover.insert(s, off);
                }
                if e > end {
                    cover.insert(end, e);
                }
            }
            if r["kind"] == "extent" {
                cover.insert(off, end);
            }
        }
    }
    cover
}

fn image_path(dd: &Path) -> std::path::PathBuf {
    dd.join("disks").join(format!("{DISK}.img"))
}

/// (a): every block of every durable write (or of a later write over that block) is in the
/// image.
fn check_durable(image: &[u8], iter: u64, o: &Oracle) -> usize {
    // block → the writes over it, in send order.
    let mut writes_over: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, &(first, n)) in o.writes.iter().enumerate() {
        for b in first..first + n {
            writes_over.entry(b).or_default().push(i);
        }
    }
    let mut checked = 0;
    for &d in &o.durable {
        let (first, n) = o.writes[d];
        for block in first..first + n {
            let at = (block * BLOCK) as usize;
            let got = &image[at..at + BLOCK as usize];
            let ok = writes_over[&block].iter().filter(|&&i| i >= d).any(|&i| {
                let k = block - o.writes[i].0;
                got == block_data(iter, i as u64, k).as_slice()
            });
            assert!(
                ok,
                "iteration {iter}: write #{d} ({n} blocks from block {first}) was acknowledged before a completed flush but its block {block} is not in the image after the crash"
            );
        }
        checked += 1;
    }
    checked
}

#[test]
fn kill9_loses_no_acknowledged_write_and_log_replays_to_the_image() {
    require_tool("fio");
    let iterations: u64 = std::env::var("STANDBY_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("STANDBY_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("crash test: {iterations} iterations, seed {seed} (STANDBY_CRASH_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = test_dir("changelog-crash");
    let dd = t.path().join("data");
    let base = t.path().join("base.img");
    let replay_img = t.path().join("replay.img");
    run(standby(&dd).args(["disk", "create", DISK, "--size", "32M"]));
    random_file(&image_path(&dd), SIZE, seed);
    run(standby(&dd).args(["log", "enable", DISK]));
    std::fs::copy(image_path(&dd), &base).expect("copy base image");

    let started = Instant::now();
    let (mut total_durable, mut total_acked, mut total_flushes, mut cuts) = (0, 0, 0, 0);
    let mut total_extent_bytes = 0u64;
    // (deferred extents, write records) of the oracle's half, for FLUSHes every 12 and 3.
    let mut oracle_records = [(0u64, 0u64); 2];
    // The oracle's writes of 64 KiB and more logged as extents (40-byte records).
    let mut oracle_extents = 0u64;
    // The newest segment seen by the last iteration (`None` on a new chain).
    let mut last_seq: Option<u64> = None;
    for iter in 0..iterations {
        if iter > 0 && iter % REBASE == 0 {
            // New chain: the current image becomes the base.
            run(standby(&dd).args(["log", "disable", DISK]));
            run(standby(&dd).args(["log", "enable", DISK]));
            std::fs::copy(image_path(&dd), &base).expect("copy base image");
            last_seq = None;
        }
        let verbose = std::env::var_os("STANDBY_CRASH_VERBOSE").is_some();
        let t0 = Instant::now();
        let gw = Gateway::start(&dd, &[]);
        if gw.log().contains("cutting torn tail") {
            cuts += 1;
        }
        let fio_out = t.path().join("fio.json");
        let mut fio = start_fio(&gw.uri(DISK), &fio_out, rng.gen());
        let addr = gw.addr;
        let oseed = rng.gen();
        let client = std::thread::spawn(move || oracle_client(addr, iter, oseed));
        let delay = if rng.gen_bool(0.1) {
            rng.gen_range(0..60)
        } else {
            rng.gen_range(150..700)
        };
        std::thread::sleep(Duration::from_millis(delay));
        gw.kill9();
        let oracle = client.join().expect("oracle client");
        let _ = fio.kill();
        let _ = fio.wait();

        let t1 = Instant::now();
        // Restart: recovery runs at open. Then a clean stop seals the log.
        let gw = Gateway::start(&dd, &[]);
        let t2 = Instant::now();
        let log = gw.log();
        if log.contains("cutting torn tail") {
            cuts += 1;
        }
        assert!(
            !log.contains("change log is broken") && !log.contains("is now broken"),
            "iteration {iter}: the log is broken after recovery:\n{log}"
        );
        // `standby serve` installs its SIGTERM handler before it announces itself, so the
        // stop below is a clean shutdown however soon it comes.
        let stop_log_dir = dd.clone();
        let status = gw.stop();
        if !status.success() {
            let mut logs = String::new();
            for e in std::fs::read_dir(&stop_log_dir)
                .expect("data dir")
                .flatten()
            {
                if e.file_name().to_string_lossy().starts_with("serve-") {
                    logs += &std::fs::read_to_string(e.path()).unwrap_or_default();
                }
            }
            panic!("iteration {iter}: clean stop failed ({status}):\n{logs}");
        }

        let t3 = Instant::now();
        let image = std::fs::read(image_path(&dd)).expect("read image");
        total_durable += check_durable(&image, iter, &oracle);
        total_acked += oracle.acked.iter().filter(|&&a| a).count();
        total_flushes += oracle.flushes_completed;

        let health = standby_e2e::cli_json::log_health(&dd, DISK);
        assert_eq!(health, "healthy", "iteration {iter}");
        let v = json(&dd, &["log", "verify", DISK]);
        assert!(
            v["consistent"] == true && v["problems"].as_array().is_some_and(Vec::is_empty),
            "log verify: {v}"
        );
        // The newest segment holding records, as `log dump --json` reads it: its records in
        // LSN order, the last one at `log verify`'s last LSN (every iteration writes, so
        // there is always such a segment).
        let list = standby_e2e::cli_json::log_list(&dd, DISK);
        let seq = list["segments"]
            .as_array()
            .and_then(|s| s.iter().rev().find(|s| s["records"].as_u64() > Some(0)))
            .map(|s| s["seq"].to_string())
            .unwrap_or_else(|| panic!("no segment with records: {list}"));
        let dump = json(&dd, &["log", "dump", DISK, "--segment", &seq]);
        let lsns: Vec<u64> = dump["records"]
            .as_array()
            .map(|r| r.iter().filter_map(|r| r["lsn"].as_u64()).collect())
            .unwrap_or_default();
        assert!(!lsns.is_empty(), "{dump}");
        assert!(lsns.windows(2).all(|w| w[1] == w[0] + 1), "{dump}");
        assert_eq!(lsns.last().copied(), v["last_lsn"].as_u64(), "{dump}");
        // How the oracle's small writes were logged in this iteration's segments (every
        // start of the gateway begins a new one): deferred (an extent flagged so) or with
        // their data (a write record; a FLUSH's copy of a deferred write is one too).
        let tally = &mut oracle_records[(iter % 2) as usize];
        for seg in list["segments"].as_array().into_iter().flatten() {
            let seq = seg["seq"].as_u64().unwrap_or(0);
            if last_seq.is_some_and(|l| seq <= l) || seg["records"].as_u64() == Some(0) {
                continue;
            }
            let dump = json(&dd, &["log", "dump", DISK, "--segment", &seq.to_string()]);
            for r in dump["records"].as_array().into_iter().flatten() {
                if r["offset"].as_u64().is_none_or(|o| o >= HALF) {
                    continue;
                }
                if r["kind"] == "extent" && r["length"].as_u64() >= Some(16 * BLOCK) {
                    oracle_extents += 1;
                }
                if r["length"] != 4096 {
                    continue;
                }
                let deferred = r["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == "deferred"));
                match r["kind"].as_str() {
                    Some("extent") if deferred => tally.0 += 1,
                    Some("write") => tally.1 += 1,
                    _ => {}
                }
            }
        }
        last_seq = list["segments"]
            .as_array()
            .and_then(|s| s.iter().filter_map(|s| s["seq"].as_u64()).max());

        // (b): base image + whole log == current image, except where an extent is the last
        // record (a large write, or a small write whose bytes the next FLUSH or cut would
        // have logged): its bytes are the image's by definition, and a base copy cannot have
        // them.
        std::fs::copy(&base, &replay_img).expect("copy base");
        run(standby(&dd)
            .args(["log", "replay", DISK, "--onto"])
            .arg(&replay_img));
        let replayed = std::fs::read(&replay_img).expect("read replayed image");
        let extents = extent_ranges(&dd, &list);
        total_extent_bytes += extents.iter().map(|(a, b)| b - a).sum::<u64>();
        let in_extent = |i: usize| {
            let i = i as u64;
            extents
                .range(..=i)
                .next_back()
                .is_some_and(|(_, &end)| i < end)
        };
        if let Some(first) = replayed
            .iter()
            .zip(&image)
            .enumerate()
            .position(|(i, (a, b))| a != b && !in_extent(i))
        {
            panic!(
                "iteration {iter} (seed {seed}): replaying the log onto the base image differs from the image, first at byte {first}"
            );
        }
        if verbose {
            eprintln!(
                "  iteration {iter}: run {:?}, restart {:?}, stop {:?}, checks {:?}",
                t1 - t0,
                t2 - t1,
                t3 - t2,
                t3.elapsed()
            );
        }
        if iterations > 50 && (iter + 1) % 50 == 0 {
            eprintln!(
                "  {} iterations, {:?}: {total_acked} acknowledged writes, {total_durable} durable checked, 0 lost",
                iter + 1,
                started.elapsed()
            );
        }
    }
    eprintln!(
        "crash test: {iterations} kill -9 iterations in {:?}: oracle writes acknowledged {total_acked}, flushes completed {total_flushes}, durable writes checked {total_durable}, lost 0; torn tails cut {cuts}; bytes whose last record was an extent (left out of the replay check) {total_extent_bytes}; the oracle's 4 KiB records, FLUSH every 12 writes: {} deferred extents, {} write records; every 3: {} deferred extents, {} write records; its writes of 64 KiB and more: {oracle_extents} extent records",
        started.elapsed(),
        oracle_records[0].0,
        oracle_records[0].1,
        oracle_records[1].0,
        oracle_records[1].1,
    );
    assert!(
        total_durable > 0,
        "no flush completed in any iteration: the test checked nothing"
    );
    assert!(
        oracle_extents > 0,
        "no large write of the oracle was logged as an extent: the test missed that path"
    );
}
