//! `standby log …`: change tracking and change-log inspection.

use anyhow::{bail, Context, Result};
use gateway::changelog::format::{End, FLAG_DEFERRED, FLAG_FUA, FLAG_IMAGE_SYNCED, FLAG_MAY_TRIM};
use gateway::changelog::log::{is_locked, read_state, remove_log_dir, ChainHealth};
use gateway::changelog::segment::{inspect_file, list_segments, segment_path};
use gateway::units::format_size;
use gateway::DataDir;

#[derive(clap::Subcommand)]
pub enum LogCommand {
    /// Start keeping a change log for a disk (from the next time it is opened).
    Enable { disk: String },
    /// Stop keeping a change log for a disk and delete its log (refused while it is served).
    Disable { disk: String },
    /// List the segments of a disk's change log: LSN ranges, sizes, sealed or active.
    List {
        disk: String,
        /// JSON: `disk`, `state` (the log's state file: `state`, `reason`, `chain_id`,
        /// `applied_lsn`, `clean`, …), `segments` and `total_bytes` (see docs/changelog.md).
        #[arg(long)]
        json: bool,
    },
    /// Check a disk's change log: headers, record checksums, footer hashes, LSN continuity.
    Verify {
        disk: String,
        /// JSON: `disk`, `consistent`, `segments`, `records`, `last_lsn`, `problems` and
        /// `notes` (lists of sentences). The exit status is the same as without it.
        #[arg(long)]
        json: bool,
    },
    /// Print the records of one segment, one per line.
    Dump {
        disk: String,
        /// Segment sequence number (see `standby log list`).
        #[arg(long)]
        segment: u64,
        /// JSON: `segment`, `chain_id` (hex), `first_lsn`, `disk_size`, `records` (each
        /// `lsn`, `kind`, `offset`, `length`, `flags`, `at`) and `end` (`sealed`, `active` or
        /// `torn`, with `reason`, `valid_len`, `sha256` where they apply).
        #[arg(long)]
        json: bool,
    },
    /// Apply every record of a disk's change log, oldest first, to an image file (for
    /// example a copy of the disk taken when tracking started).
    Replay {
        disk: String,
        /// The image to change in place.
        #[arg(long)]
        onto: std::path::PathBuf,
    },
}

pub fn run_log(dd: &DataDir, cmd: LogCommand) -> Result<()> {
    match cmd {
        LogCommand::Enable { disk } => {
            let rec = dd.disk(&disk)?;
            if rec.read_only {
                bail!("disk '{disk}' is read-only: there is nothing to track");
            }
            if rec.tracked {
                println!("disk {disk} is already tracked");
                return Ok(());
            }
            dd.set_tracked(&disk, true)?;
            println!(
                "change tracking enabled for disk {disk}; it starts when the disk is next opened (restart `standby serve` if it is running)"
            );
        }
        LogCommand::Disable { disk } => {
            let rec = dd.disk(&disk)?;
            let dir = dd.log_dir(&disk);
            if dir.exists() && is_locked(&dir) {
                bail!("disk '{disk}' is being served with its change log open: stop `standby serve` first");
            }
            if rec.tracked {
                dd.set_tracked(&disk, false)?;
            }
            let had = dir.exists();
            remove_log_dir(&dir)?;
            println!(
                "change tracking disabled for disk {disk}{}",
                if had {
                    "; its change log was deleted (the replica will need a full resync)"
                } else {
                    ""
                }
            );
        }
        LogCommand::List { disk, json } => {
            if json {
                list_json(dd, &disk)?
            } else {
                list(dd, &disk)?
            }
        }
        LogCommand::Verify { disk, json } => verify(dd, &disk, json)?,
        LogCommand::Dump {
            disk,
            segment,
            json,
        } => dump(dd, &disk, segment, json)?,
        LogCommand::Replay { disk, onto } => {
            let dir = log_dir_of(dd, &disk)?;
            let img = std::fs::OpenOptions::new()
                .write(true)
                .open(&onto)
                .with_context(|| format!("cannot open {} for writing", onto.display()))?;
            let stats = gateway::changelog::replay_dir(&dir, &img)?;
            img.sync_data()
                .with_context(|| format!("cannot sync {}", onto.display()))?;
            println!(
                "replayed {} record(s) from {} segment(s) onto {} (LSN {} to {})",
                stats.records,
                stats.segments,
                onto.display(),
                stats.first_lsn.unwrap_or(0),
                stats.last_lsn.unwrap_or(0)
            );
        }
    }
    Ok(())
}

fn log_dir_of(dd: &DataDir, disk: &str) -> Result<std::path::PathBuf> {
    let rec = dd.disk(disk)?;
    let dir = dd.log_dir(disk);
    if !dir.exists() {
        if rec.tracked {
            bail!("disk '{disk}' is tracked but has no change log yet (it is created when the disk is next opened)");
        }
        bail!("disk '{disk}' is not tracked: enable it with `standby log enable {disk}`");
    }
    Ok(dir)
}

/// How a segment ends, as `log list --json` reports it.
#[derive(serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum SegmentEnd {
    Sealed,
    Active,
    Torn,
    Unreadable,
}

/// One segment in `log list --json`; the LSNs and record count are None when it is unreadable.
#[derive(serde::Serialize)]
struct SegmentView {
    seq: u64,
    first_lsn: Option<u64>,
    last_lsn: Option<u64>,
    records: Option<usize>,
    bytes: u64,
    end: SegmentEnd,
    /// `standby log list`'s status column ("sealed", "torn at byte N: why", …).
    status: String,
}

fn list_json(dd: &DataDir, disk: &str) -> Result<()> {
    let dir = log_dir_of(dd, disk)?;
    let state = read_state(&dir)?;
    let mut segments = Vec::new();
    for (seq, path) in list_segments(&dir)? {
        let (s, _) = inspect_file(seq, &path)?;
        let (first_lsn, last_lsn, records, end) = match &s.decoded {
            Ok(d) => (
                Some(d.header.first_lsn),
                Some(d.last_lsn()),
                Some(d.records.len()),
                match d.end {
                    End::Sealed(_) => SegmentEnd::Sealed,
                    End::Open => SegmentEnd::Active,
                    End::Torn { .. } => SegmentEnd::Torn,
                },
            ),
            Err(_) => (None, None, None, SegmentEnd::Unreadable),
        };
        segments.push(SegmentView {
            seq,
            first_lsn,
            last_lsn,
            records,
            bytes: s.bytes,
            end,
            status: s.status(),
        });
    }
    let total_bytes: u64 = segments.iter().map(|s| s.bytes).sum();
    let out = serde_json::json!({
        "disk": disk,
        "state": state,
        "segments": segments,
        "total_bytes": total_bytes,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn list(dd: &DataDir, disk: &str) -> Result<()> {
    let dir = log_dir_of(dd, disk)?;
    if let Some(st) = read_state(&dir)? {
        println!(
            "disk {disk}: log {}{}; chain {}; redo point LSN {}; {}",
            st.state,
            if st.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", st.reason)
            },
            st.chain_id,
            st.applied_lsn,
            if st.clean {
                "closed cleanly"
            } else {
                "open or not closed cleanly"
            }
        );
    }
    println!(
        "{:>6} {:>12} {:>12} {:>8} {:>10}  STATUS",
        "SEQ", "FIRST_LSN", "LAST_LSN", "RECORDS", "SIZE"
    );
    let mut total = 0;
    for (seq, path) in list_segments(&dir)? {
        let (s, _) = inspect_file(seq, &path)?;
        total += s.bytes;
        match &s.decoded {
            Ok(d) => println!(
                "{:>6} {:>12} {:>12} {:>8} {:>10}  {}",
                seq,
                d.header.first_lsn,
                d.last_lsn(),
                d.records.len(),
                format_size(s.bytes),
                s.status()
            ),
            Err(_) => println!(
                "{:>6} {:>12} {:>12} {:>8} {:>10}  {}",
                seq,
                "-",
                "-",
                "-",
                format_size(s.bytes),
                s.status()
            ),
        }
    }
    println!("total {}", format_size(total));
    Ok(())
}

fn verify(dd: &DataDir, disk: &str, json: bool) -> Result<()> {
    let dir = log_dir_of(dd, disk)?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let st = read_state(&dir)?;
    let (mut expect_seq, mut expect_lsn) = match &st {
        Some(s) => {
            if s.state != ChainHealth::Healthy {
                problems.push(format!("log state is {}: {}", s.state, s.reason));
            }
            (Some(s.first_seq), Some(s.first_lsn))
        }
        None => {
            problems.push("state file is missing".to_string());
            (None, None)
        }
    };
    let segs = list_segments(&dir)?;
    let n = segs.len();
    let mut records = 0u64;
    for (i, (seq, path)) in segs.into_iter().enumerate() {
        let (s, _) = inspect_file(seq, &path)?;
        if expect_seq.is_some_and(|e| seq < e) {
            notes.push(format!("segment {seq} was released but not yet deleted"));
            continue;
        }
        if let Some(e) = expect_seq {
            if seq != e {
                problems.push(format!("segment {e} is missing"));
            }
        }
        expect_seq = Some(seq + 1);
        let d = match &s.decoded {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("segment {seq}: {e}"));
                continue;
            }
        };
        if let Some(e) = expect_lsn {
            if d.header.first_lsn != e {
                problems.push(format!(
                    "LSN gap: segment {seq} starts at LSN {} where {e} was expected",
                    d.header.first_lsn
                ));
            }
        }
        expect_lsn = Some(d.last_lsn() + 1);
        records += d.records.len() as u64;
        let last = i + 1 == n;
        match &d.end {
            End::Sealed(_) => {}
            End::Open if last => notes.push(format!("segment {seq} is the active segment")),
            End::Torn { reason } if last => notes.push(format!(
                "segment {seq} (active) ends with an incomplete record at byte {} ({reason}): it is cut when the disk is next opened, or it is being written",
                d.valid_len
            )),
            End::Open => notes.push(format!(
                "segment {seq} is not sealed yet (sealed when the disk is next opened)"
            )),
            End::Torn { reason } => problems.push(format!(
                "segment {seq} is damaged at byte {}: {reason}",
                d.valid_len
            )),
        }
    }
    let last_lsn = expect_lsn.unwrap_or(1).saturating_sub(1);
    if json {
        let v = serde_json::json!({
            "disk": disk,
            "consistent": problems.is_empty(),
            "segments": n,
            "records": records,
            "last_lsn": last_lsn,
            "problems": problems,
            "notes": notes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for note in &notes {
            println!("note: {note}");
        }
    }
    if problems.is_empty() {
        if !json {
            println!(
                "log of disk {disk} is consistent: {n} segment(s), {records} record(s), up to LSN {last_lsn}"
            );
        }
        Ok(())
    } else {
        if !json {
            for p in &problems {
                println!("problem: {p}");
            }
        }
        bail!(
            "the change log of disk '{disk}' is not consistent ({} problem(s)): the disk needs a full resync",
            problems.len()
        )
    }
}

fn dump(dd: &DataDir, disk: &str, seq: u64, json: bool) -> Result<()> {
    let dir = log_dir_of(dd, disk)?;
    let path = segment_path(&dir, seq);
    if !path.exists() {
        bail!("disk '{disk}' has no segment {seq} (see `standby log list {disk}`)");
    }
    let (s, _) = inspect_file(seq, &path).with_context(|| format!("reading {}", path.display()))?;
    let d = match s.decoded {
        Ok(d) => d,
        Err(e) => bail!("segment {seq}: {e}"),
    };
    let flags_of = |f: u8| {
        let mut flags = Vec::new();
        if f & FLAG_FUA != 0 {
            flags.push("fua");
        }
        if f & FLAG_MAY_TRIM != 0 {
            flags.push("may_trim");
        }
        if f & FLAG_DEFERRED != 0 {
            flags.push("deferred");
        }
        if f & FLAG_IMAGE_SYNCED != 0 {
            flags.push("image_synced");
        }
        flags
    };
    if json {
        let records: Vec<_> = d
            .records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "lsn": r.header.lsn,
                    "kind": r.header.kind.name(),
                    "offset": r.header.offset,
                    "length": r.header.length,
                    "flags": flags_of(r.header.flags),
                    "ahead": r.header.ahead,
                    "at": r.at,
                })
            })
            .collect();
        let end = match &d.end {
            End::Sealed(f) => serde_json::json!({
                "state": "sealed",
                "record_count": f.record_count,
                "last_lsn": f.last_lsn,
                "sha256": f.sha256.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            }),
            End::Open => serde_json::json!({"state": "active"}),
            End::Torn { reason } => serde_json::json!({
                "state": "torn",
                "reason": reason.to_string(),
                "valid_len": d.valid_len,
            }),
        };
        let v = serde_json::json!({
            "segment": d.header.seq,
            "chain_id": format!("{:016x}", d.header.chain_id),
            "first_lsn": d.header.first_lsn,
            "disk_size": d.header.disk_size,
            "records": records,
            "end": end,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "segment {} chain {:016x} first_lsn {} disk_size {}",
        d.header.seq, d.header.chain_id, d.header.first_lsn, d.header.disk_size
    );
    for r in &d.records {
        let h = &r.header;
        let flags = flags_of(h.flags);
        // A window of extents heated ahead of a stream, only when there is one.
        let ahead = match h.ahead {
            0 => String::new(),
            n => format!(" ahead={n}"),
        };
        println!(
            "lsn={} kind={} offset={} length={} flags={}{ahead} at={}",
            h.lsn,
            h.kind.name(),
            h.offset,
            h.length,
            if flags.is_empty() {
                "-".to_string()
            } else {
                flags.join(",")
            },
            r.at
        );
    }
    match &d.end {
        End::Sealed(f) => println!(
            "sealed: {} records, last LSN {}, sha256 {}",
            f.record_count,
            f.last_lsn,
            f.sha256
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
        End::Open => println!("active: {} records so far", d.records.len()),
        End::Torn { reason } => println!("torn at byte {}: {reason}", d.valid_len),
    }
    Ok(())
}
