//! Large writes recorded as *extents*: the record says "these bytes were written to the image"
//! and carries no data; the bytes stay in the image, and the shipper reads them from there.
//!
//! **Why.** Copying every large write into the log means a second buffered copy of the data in
//! new page-cache pages, and write-back of twice the bytes (BENCHMARKS.md, "Change log"). An
//! extent record costs 40 bytes.
//!
//! **What a cut needs.** A recovery point is a cut of the log at a barrier
//! ([`crate::Disk::cut`]); its patch applies the records of the cut in LSN order, so for every
//! byte only the last record of the cut that covers it matters. An extent's bytes are read
//! from the image when the cut is shipped, which may be long after the cut: writes made after
//! the cut may have changed them. So, for every extent in a cut:
//!
//! * a *piece* of it is still needed where no later record covers it. Pieces never overlap:
//!   a later record of the same cut simply removes the part it covers (the patch takes that
//!   record's bytes there), and a later record after a cut first copies the bytes of the part
//!   it covers aside (*copy-before-write*), then removes that part;
//! * the copies are *preimages*, kept in a side file per segment of the extent
//!   (`NNNN….CHAIN.cbw` beside `NNNN….log`), fdatasynced before the write that overwrites the
//!   image goes ahead (so a host crash cannot leave the image overwritten and the preimage
//!   lost), and deleted when their segment has been shipped and released;
//! * [`ExtentMap::data_of`] (the shipper) rebuilds an extent's bytes: the image where a piece
//!   is still in place, the preimage where one was saved, and the image elsewhere — where a
//!   later record of the same cut covers the range and replaces those bytes anyway.
//!
//! Only the first write over a piece after a cut pays the copy; writes between two cuts never
//! do. The cut LSN is set by [`crate::Disk::cut`] while the disk's writes are paused, so it is
//! exact.
//!
//! **After a restart** (clean or not) the map is rebuilt from the unreleased segments, and the
//! cut LSN is the one the state file recorded ([`ChangeLog::note_cut`], written by
//! `Disk::cut` before the writes after the cut resume; a barrier record cannot be told from a
//! FLUSH's). Extents up to it are in a cut, later ones are not, deferred ones included (their
//! bytes are in the image, which recovery synced: they are synced pieces). A log whose state
//! file predates that record counts every extent as cut: at worst one extra copy per piece.
//!
//! **Deferred small writes** ([`deferred`]): small writes logged inline are extents too
//! (flagged deferred) until a FLUSH or cut logs their bytes; the map keeps them as *deferred
//! pieces*, which follow every rule here, and a cut never holds one. Those the image holds
//! durably already are *synced*: a FLUSH skips them, a cut still logs them.
//!
//! **Replay** (recovery's redo, `standby log replay`): an extent applies nothing (its bytes are
//! in the image), and a record applies nothing inside a range that a later extent covers — the
//! image holds that extent's bytes there, which are newer (after a host crash only for extents
//! up to the last image sync: `replay::replay_after_host_crash`).
//! [`super::replay::image_dependent`] says which records those are; `replay_after` applies
//! the rule.
//! Replaying onto a base copy of the image (not the image itself) therefore cannot reproduce
//! an extent's bytes: that needs the records' data, i.e. writes below the extent threshold.
//!
//! **Invariants.** Pieces never overlap; every piece is in an unreleased segment of the current
//! chain; a piece's range holds the bytes its cut needs there in the image — the extent's, or
//! those of small writes it absorbed (see [`deferred`], "Absorbed writes"), which are later
//! records of the same cut (nothing writes a tracked image except through
//! [`ExtentMap::before_write`] or `take_uncut`); a preimage is durable before the image
//! range it saves is overwritten. Overlapping requests are serialized by the log (its range
//! lock), so `before_write`, the image write and `insert` of one request never race another
//! request over the same bytes.
//!
//! About 820 lines: the pieces, copy-before-write (waiting, `before_write`, and not,
//! `take_uncut_extent` for an inline write) and the shipper's rebuild of an extent share one
//! lock and the invariants above, so they are kept in one read; deferred pieces
//! ([`deferred`]) and the tests are in files of their own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;

mod deferred;

pub use deferred::{Pass, PIECES_MAX};

#[cfg(any(test, feature = "testing"))]
pub use deferred::DEFERRED_LOGGED;

use super::bufpool::BufPool;
use super::durable::{Durability, Target};
use super::format::{self, Kind, RecordHeader};
use super::{ChangeLog, LogError};

/// Default smallest write recorded as an extent.
pub const DEFAULT_EXTENT_MIN: u64 = 64 * 1024;

const CBW_MAGIC: [u8; 4] = *b"CBW1";
const CBW_HEADER_LEN: usize = 32;

/// File name of the preimage side file of segment `seq` of chain `chain_id`.
pub fn side_file_name(seq: u64, chain_id: u64) -> String {
    format!("{seq:020}.{chain_id:016x}.cbw")
}

fn parse_side_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".cbw")?;
    let (seq, chain) = stem.split_once('.')?;
    if seq.len() != 20 || chain.len() != 16 {
        return None;
    }
    Some((seq.parse().ok()?, u64::from_str_radix(chain, 16).ok()?))
}

/// Encodes a preimage entry header: magic, CRC32C (of bytes 8..32 and the data), extent LSN,
/// offset, length.
fn encode_entry(lsn: u64, offset: u64, data: &[u8]) -> [u8; CBW_HEADER_LEN] {
    let mut b = [0u8; CBW_HEADER_LEN];
    b[0..4].copy_from_slice(&CBW_MAGIC);
    b[8..16].copy_from_slice(&lsn.to_le_bytes());
    b[16..24].copy_from_slice(&offset.to_le_bytes());
    b[24..32].copy_from_slice(&(data.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[8..]), data);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One whole entry at `at` of a side file's bytes: (lsn, offset, len, data position).
fn decode_entry(b: &[u8], at: usize) -> Option<(u64, u64, u64, usize)> {
    let h = b.get(at..at + CBW_HEADER_LEN)?;
    if h[0..4] != CBW_MAGIC {
        return None;
    }
    let len = u64_at(h, 24);
    let end = (at + CBW_HEADER_LEN).checked_add(usize::try_from(len).ok()?)?;
    let data = b.get(at + CBW_HEADER_LEN..end)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[8..]), data);
    if crc.to_le_bytes() != h[4..8] {
        return None;
    }
    Some((u64_at(h, 8), u64_at(h, 16), len, at + CBW_HEADER_LEN))
}

/// Where a preimage of part of an extent is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Saved {
    offset: u64,
    len: u64,
    seq: u64,
    /// Position of the entry (its header) in the side file.
    pos: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    end: u64,
    lsn: u64,
    /// Part of a deferred small write: its bytes are to be logged at the next FLUSH or cut
    /// (see [`deferred`]). Counted in [`Inner::deferred`] while uncut.
    deferred: bool,
    /// Live deferred pieces of several writes merged into one (see [`deferred`], "Merged
    /// pieces"): `lsn` is the newest of their records, not the record of every byte.
    merged: bool,
}

struct SideFile {
    file: File,
    len: u64,
}

struct Inner {
    chain_id: u64,
    /// Parts of extents whose bytes are still the image's, by start offset; never overlapping.
    pieces: BTreeMap<u64, Piece>,
    /// Extents with an LSN up to this one are in a cut: a later write saves their bytes first.
    cut_lsn: u64,
    /// Preimages by extent LSN.
    saved: BTreeMap<u64, Vec<Saved>>,
    files: HashMap<u64, SideFile>,
    /// Start offsets of the deferred pieces newer than the cut and than `synced_lsn` (the
    /// *live* ones, which the next FLUSH must log), so that a FLUSH finds them without
    /// walking every piece.
    live: BTreeSet<u64>,
    /// Their bytes.
    deferred: u64,
    /// Deferred pieces newer than the cut are *synced* up to this LSN: the image holding
    /// their bytes is durable where recovery trusts it (see [`deferred`], "Synced pieces"),
    /// so a FLUSH skips them; a cut still logs them.
    synced_lsn: u64,
    /// Start offsets of the synced deferred pieces newer than the cut, and their bytes.
    synced: BTreeSet<u64>,
    synced_bytes: u64,
    /// The newest small write absorbed by a large write's piece since the last FLUSH (see
    /// [`deferred`], "Absorbed writes"), 0 if none: the next FLUSH syncs the image for it.
    absorbed_lsn: u64,
}

impl Inner {
    fn new(chain_id: u64) -> Inner {
        Inner {
            chain_id,
            pieces: BTreeMap::new(),
            cut_lsn: 0,
            saved: BTreeMap::new(),
            files: HashMap::new(),
            live: BTreeSet::new(),
            deferred: 0,
            synced_lsn: 0,
            synced: BTreeSet::new(),
            synced_bytes: 0,
            absorbed_lsn: 0,
        }
    }

    /// The pieces overlapping `[offset, end)`, the last one first (pieces never overlap, so
    /// walking back their ends decrease too).
    fn overlapping(&self, offset: u64, end: u64) -> impl Iterator<Item = (&u64, &Piece)> {
        self.pieces
            .range(..end)
            .rev()
            .take_while(move |(_, p)| p.end > offset)
    }

    /// Whether a piece or a preimage of record `h` is left in its range.
    fn holds(&self, h: &RecordHeader) -> bool {
        self.saved.contains_key(&h.lsn)
            || self
                .overlapping(h.offset, h.offset.saturating_add(h.length))
                .any(|(_, p)| p.lsn == h.lsn)
    }

    /// Removes the parts of pieces inside `[start, end)` (see [`cut_out`]), keeping the live
    /// deferred pieces' index and bytes.
    fn remove(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let hit = cut_out(&mut self.pieces, start, end);
        let cut = self.cut_lsn;
        let mut deferred_hit = false;
        for &(a, b, lsn, deferred) in &hit {
            if deferred && lsn > cut {
                let n = self.bytes_of(lsn);
                *n = n.saturating_sub(b - a);
                deferred_hit = true;
            }
        }
        if deferred_hit {
            // A piece starting before `start` kept its key; those starting inside are gone,
            // and what ran past `end` is a piece starting at `end` now.
            for set in [&mut self.live, &mut self.synced] {
                let gone: Vec<u64> = set.range(start..end).copied().collect();
                for k in gone {
                    set.remove(&k);
                }
            }
            if let Some(&p) = self.pieces.get(&end) {
                if p.deferred && p.lsn > cut {
                    self.index_of(p.lsn).insert(end);
                }
            }
        }
        hit.into_iter().map(|(a, b, lsn, _)| (a, b, lsn)).collect()
    }

    /// `[offset, offset + len)` is a piece of extent `lsn` now.
    fn insert(&mut self, lsn: u64, offset: u64, len: u64, deferred: bool) {
        self.remove(offset, offset.saturating_add(len));
        self.insert_free(lsn, offset, len, deferred, false);
    }

    /// [`Inner::insert`] where no piece overlaps `[offset, offset + len)`; `merged` for a
    /// live deferred piece that several writes' pieces make up (see [`deferred`]).
    fn insert_free(&mut self, lsn: u64, offset: u64, len: u64, deferred: bool, merged: bool) {
        let end = offset.saturating_add(len);
        debug_assert!(self
            .pieces
            .range(..end)
            .next_back()
            .is_none_or(|(_, p)| p.end <= offset));
        self.pieces.insert(
            offset,
            Piece {
                end,
                lsn,
                deferred,
                merged,
            },
        );
        if deferred && lsn > self.cut_lsn {
            self.index_piece(offset, lsn, end - offset);
        }
    }
}

/// The extents of one disk's log that a cut may still need (see the module documentation).
pub struct ExtentMap {
    dir: PathBuf,
    image: File,
    dur: Arc<Durability>,
    inner: Mutex<Inner>,
    /// [`PIECES_MAX`] (tests lower it: [`ExtentMap::set_pieces_max`]).
    pieces_max: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for ExtentMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtentMap").field("dir", &self.dir).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Extent maps by log directory, so the shipper ([`super::ship`]) finds the one of a log.
static REGISTRY: Mutex<Vec<(PathBuf, Weak<ExtentMap>)>> = Mutex::new(Vec::new());

/// The extent map registered for a log directory (by [`ExtentMap::open`]).
pub fn registered(dir: &Path) -> Option<Arc<ExtentMap>> {
    let mut r = lock(&REGISTRY);
    r.retain(|(_, w)| w.strong_count() > 0);
    r.iter()
        .rev()
        .find(|(d, _)| d == dir)
        .and_then(|(_, w)| w.upgrade())
}

/// Where to start walking the pieces that overlap a range starting at `start`: the piece
/// that begins before `start` and runs past it, if there is one, else `start`.
fn first_overlapping(pieces: &BTreeMap<u64, Piece>, start: u64) -> u64 {
    pieces
        .range(..start)
        .next_back()
        .filter(|(_, p)| p.end > start)
        .map(|(&s, _)| s)
        .unwrap_or(start)
}

/// Removes the parts of pieces inside `[start, end)`; returns the removed parts as
/// (start, end, lsn, deferred), by offset.
///
/// One walk back from `end` (pieces never overlap, so their ends fall as their starts do,
/// and the first piece ending at or before `start` ends it): a piece that starts before
/// `start` is shortened in place, those starting inside are removed, and the part of the
/// last one that runs past `end` becomes a piece starting at `end`.
fn cut_out(pieces: &mut BTreeMap<u64, Piece>, start: u64, end: u64) -> Vec<(u64, u64, u64, bool)> {
    let mut hit = Vec::new();
    if start >= end {
        return hit;
    }
    let mut gone = Vec::new();
    let mut past_end = None;
    for (&s, p) in pieces.range_mut(..end).rev() {
        if p.end <= start {
            break;
        }
        let (a, b) = (s.max(start), p.end.min(end));
        hit.push((a, b, p.lsn, p.deferred));
        if b < p.end {
            past_end = Some(Piece { end: p.end, ..*p });
        }
        if s < a {
            p.end = a;
        } else {
            gone.push(s);
        }
    }
    for s in gone {
        pieces.remove(&s);
    }
    if let Some(p) = past_end {
        pieces.insert(end, p);
    }
    hit.reverse();
    hit
}

impl ExtentMap {
    /// Builds the map of a log just opened: every extent of its unreleased segments, minus
    /// what later records cover, in a cut up to the recorded cut LSN (deferred ones after it
    /// are deferred pieces again); the preimages saved before; stale side
    /// files (released segments, other chains) deleted. Registers it for the shipper.
    pub fn open(
        log: &ChangeLog,
        image: &File,
        dur: Arc<Durability>,
    ) -> Result<Arc<Self>, LogError> {
        let dir = log.dir().to_path_buf();
        let image = image
            .try_clone()
            .map_err(LogError::io("cannot duplicate image descriptor for", &dir))?;
        let map = Arc::new(ExtentMap {
            dir: dir.clone(),
            image,
            dur,
            pieces_max: std::sync::atomic::AtomicUsize::new(PIECES_MAX),
            inner: Mutex::new(Inner::new(log.chain_id())),
        });
        if log.state().is_healthy() {
            if let Err(e) = map.load(log) {
                // Without its extents the log cannot be shipped exactly: full resync.
                let _ = log.break_chain(format!("cannot load the extents of the change log: {e}"));
            }
        }
        lock(&REGISTRY).push((dir, Arc::downgrade(&map)));
        Ok(map)
    }

    fn load(&self, log: &ChangeLog) -> Result<(), LogError> {
        let segs = log.segments();
        let mut inner = lock(&self.inner);
        let cut = log.last_cut();
        for seg in &segs {
            let bytes = match fs::read(&seg.path) {
                Ok(b) => b,
                Err(e) => return Err(LogError::io("cannot read", &seg.path)(e)),
            };
            // Recovery has proven these whole; a partial record at the end of the active
            // segment (none after open) would simply end the scan.
            let Ok(d) = format::decode_segment(&bytes) else {
                continue;
            };
            for r in &d.records {
                let h = &r.header;
                if h.kind == Kind::Flush || h.length == 0 {
                    continue;
                }
                let end = h.offset.saturating_add(h.length);
                cut_out(&mut inner.pieces, h.offset, end);
                if h.kind == Kind::Extent {
                    // A deferred write after the last cut is a deferred piece again (a
                    // cut's pass logged the earlier ones' bytes); every other extent is
                    // a plain one, in a cut or not by its LSN.
                    let piece = Piece {
                        end,
                        lsn: h.lsn,
                        deferred: h.flags & format::FLAG_DEFERRED != 0 && h.lsn > cut,
                        merged: false,
                    };
                    inner.pieces.insert(h.offset, piece);
                }
            }
        }
        inner.cut_lsn = cut;
        // Recovery synced the image and recorded it (the redo point): the deferred pieces
        // up to it are synced, as a checkpoint would have made them.
        let (chain, trusted) = log.image_trusted();
        if chain == inner.chain_id {
            inner.synced_lsn = trusted.max(log.checkpoint_lsn());
        }
        let deferred: Vec<(u64, u64, u64)> = inner
            .pieces
            .iter()
            .filter(|(_, p)| p.deferred)
            .map(|(&s, p)| (s, p.end - s, p.lsn))
            .collect();
        for (start, len, lsn) in deferred {
            inner.index_piece(start, lsn, len);
        }
        let first_seq = segs.first().map(|s| s.seq).unwrap_or(u64::MAX);
        let chain = inner.chain_id;
        let entries = fs::read_dir(&self.dir).map_err(LogError::io("cannot list", &self.dir))?;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some((seq, c)) = name.to_str().and_then(parse_side_file_name) else {
                continue;
            };
            let path = e.path();
            if c != chain || seq < first_seq {
                fs::remove_file(&path).map_err(LogError::io("cannot remove", &path))?;
                continue;
            }
            let bytes = fs::read(&path).map_err(LogError::io("cannot read", &path))?;
            let mut at = 0usize;
            while let Some((lsn, offset, len, data_at)) = decode_entry(&bytes, at) {
                inner.saved.entry(lsn).or_default().push(Saved {
                    offset,
                    len,
                    seq,
                    pos: at as u64,
                });
                at = data_at + len as usize;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(LogError::io("cannot open", &path))?;
            // A torn last entry: its write never reached the image (the preimage is synced
            // before the image write starts), so it is dropped.
            file.set_len(at as u64)
                .map_err(LogError::io("cannot truncate", &path))?;
            inner.files.insert(
                seq,
                SideFile {
                    file,
                    len: at as u64,
                },
            );
        }
        Ok(())
    }

    /// A new chain (after a full resync): nothing of the old one is needed any more.
    fn follow_chain(&self, inner: &mut Inner, log: &ChangeLog) {
        let chain = log.chain_id();
        if chain == inner.chain_id {
            return;
        }
        inner.chain_id = chain;
        inner.pieces.clear();
        inner.saved.clear();
        inner.cut_lsn = 0;
        inner.files.clear();
        inner.live.clear();
        inner.deferred = 0;
        inner.synced_lsn = 0;
        inner.synced.clear();
        inner.synced_bytes = 0;
        inner.absorbed_lsn = 0;
        self.remove_side_files(|_, c| c != chain);
    }

    fn remove_side_files(&self, doomed: impl Fn(u64, u64) -> bool) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if let Some((seq, c)) = name.to_str().and_then(parse_side_file_name) {
                if doomed(seq, c) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// Called by [`crate::Disk::cut`] with the barrier LSN while the disk's writes are
    /// paused: every extent up to it belongs to a cut. Also deletes the side files of
    /// released segments.
    ///
    /// Fails, changing nothing, where a merged deferred piece (see [`deferred`], "Merged
    /// pieces") would fall into the cut: its record LSN is the newest of its writes', so a
    /// preimage saved for it could not be found for the others. The cut's own pass logs
    /// every deferred piece first, so this is a pass that did not finish; the cut then
    /// fails as a failed pass does, and the next one logs them.
    pub fn cut_at(&self, log: &ChangeLog, lsn: u64) -> io::Result<()> {
        let mut inner = lock(&self.inner);
        self.follow_chain(&mut inner, log);
        let cut = inner.cut_lsn.max(lsn);
        if let Some(at) = inner.merged_at_or_below(cut) {
            return Err(io::Error::other(format!(
                "deferred writes at offset {at} are not logged yet (the pass before the \
                 barrier did not finish); the cut is not taken, the next one logs them"
            )));
        }
        inner.cut_lsn = cut;
        if !inner.live.is_empty() || !inner.synced.is_empty() {
            inner.retire_cut_deferred();
        }
        let segs = log.segments();
        let first = segs.first().map(|s| s.seq).unwrap_or(u64::MAX);
        // Pieces of released (shipped) extents are needed by no cut any more.
        if let Some(first_lsn) = segs.first().map(|s| s.first_lsn) {
            inner.pieces.retain(|_, p| p.lsn >= first_lsn);
            let Inner {
                live,
                synced,
                pieces,
                deferred,
                synced_bytes,
                ..
            } = &mut *inner;
            for (set, bytes) in [(live, deferred), (synced, synced_bytes)] {
                if !set.is_empty() {
                    set.retain(|k| pieces.contains_key(k));
                    *bytes = set
                        .iter()
                        .filter_map(|k| pieces.get(k).map(|p| p.end - k))
                        .sum();
                }
            }
        }
        let gone: Vec<u64> = inner.files.keys().copied().filter(|&s| s < first).collect();
        if gone.is_empty() {
            return Ok(());
        }
        for s in &gone {
            inner.files.remove(s);
        }
        inner.saved.retain(|_, v| {
            v.retain(|s| s.seq >= first);
            !v.is_empty()
        });
        let chain = inner.chain_id;
        self.remove_side_files(|seq, c| c == chain && seq < first);
        Ok(())
    }

    /// For the inline write path, found without waiting: whether [`Self::before_write`] of
    /// `[offset, offset + len)` on the chain `chain_id` would copy nothing — no piece lies
    /// there, or only pieces of extents newer than the last cut, which the write's record (a
    /// later record of the same cut) replaces. If so, forgets the parts of those pieces the
    /// write covers, as `before_write` does, and returns `Some(deferred)`: whether the write
    /// is logged as a deferred extent (its bytes logged at the next FLUSH or cut, see
    /// [`deferred`]), i.e. whether the deferred bytes stay within `defer_max` with it (`0`:
    /// never) and the deferred pieces within [`PIECES_MAX`] — if so its range is a deferred
    /// piece of record `lsn` from here on, or lies inside a large write's piece that absorbs
    /// it (`deferred`, "Absorbed writes") (one lock for both: a second one after the image
    /// write could find the map busy and send the next write the slow way). `None`, nothing
    /// changed: the map is busy, follows another chain, or a piece there belongs to a cut
    /// (its bytes must be saved first: the caller takes the path that may wait).
    ///
    /// Call it only where the write's record is certain to follow (the log asks last, under
    /// its append lock). Pieces are added only by cuts and extent writes, which cannot
    /// overlap that write while it holds its range and the disk's tracking lock. The piece is
    /// in the map before the image write: only a FLUSH's or cut's pass reads a deferred
    /// piece's bytes, and it holds the range first, so it waits for this write.
    ///
    /// Cost (it runs on every small write): one walk of the pieces' B-tree back from `end`
    /// on the common paths (see `Inner::take_uncut`), plus an insert into the pieces and the
    /// live index for a new piece that no live piece before it takes in.
    pub fn take_uncut(
        &self,
        chain_id: u64,
        lsn: u64,
        offset: u64,
        len: u64,
        defer_max: u64,
    ) -> Option<bool> {
        let mut inner = self.inner.try_lock().ok()?;
        if inner.chain_id != chain_id {
            return None;
        }
        let pieces_max = self.pieces_max.load(std::sync::atomic::Ordering::Relaxed);
        inner.take_uncut(lsn, offset, len, defer_max, pieces_max)
    }

    /// Testing only: lowers the bound on deferred pieces ([`PIECES_MAX`]).
    #[cfg(any(test, feature = "testing"))]
    pub fn set_pieces_max(&self, n: usize) {
        self.pieces_max
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// For a large write logged inline as extent `lsn` (`ChangeLog::try_record_extent_now`):
    /// if no piece under `[offset, offset + len)` belongs to a cut (nothing to save), makes
    /// the range a piece of `lsn` — what [`Self::before_write`] and [`Self::insert`] do
    /// around the image write on the path that may wait — and returns `Some(())`. `None`,
    /// nothing changed: the map is busy, follows another chain, or a piece there belongs to
    /// a cut. The piece is in the map before the image write: only a cut's extents are read
    /// back (by the shipper), and no cut can be taken while the write holds the disk's
    /// tracking lock.
    pub fn take_uncut_extent(&self, chain_id: u64, lsn: u64, offset: u64, len: u64) -> Option<()> {
        let mut inner = self.inner.try_lock().ok()?;
        if inner.chain_id != chain_id {
            return None;
        }
        let end = offset.saturating_add(len);
        let cut = inner.cut_lsn;
        let in_cut = inner.overlapping(offset, end).any(|(_, p)| p.lsn <= cut);
        if in_cut {
            return None;
        }
        inner.insert(lsn, offset, len, false);
        Some(())
    }

    /// Before a change to `[offset, offset + len)` of the image (any kind, any size): saves
    /// the bytes of the pieces it overwrites that belong to a cut, then forgets those parts.
    /// The preimages are durable when this returns. Blocking.
    pub fn before_write(&self, log: &ChangeLog, offset: u64, len: u64) -> io::Result<()> {
        let mut inner = lock(&self.inner);
        self.follow_chain(&mut inner, log);
        if inner.pieces.is_empty() || len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let hit = inner.remove(offset, end);
        let cut = inner.cut_lsn;
        let mut synced = Vec::new();
        let mut shipped: Option<u64> = None;
        let mut segs: Option<Vec<super::SegmentInfo>> = None;
        for (a, b, lsn) in hit {
            // Shipped (in the store) though perhaps not yet deleted: nothing needs these
            // bytes. (Asked only when a piece of a cut is hit, as the segments are.)
            if lsn > cut || lsn <= *shipped.get_or_insert_with(|| log.shipped_through()) {
                continue;
            }
            let segs = segs.get_or_insert_with(|| log.segments());
            let Some(seq) = segs
                .iter()
                .find(|s| s.first_lsn <= lsn && lsn <= s.last_lsn)
                .map(|s| s.seq)
            else {
                // Released already: shipped, nothing needs these bytes.
                continue;
            };
            let data = crate::fastio::pread_exact(&self.image, a, (b - a) as usize)?;
            let head = encode_entry(lsn, a, &data);
            if !inner.files.contains_key(&seq) {
                let path = self.dir.join(side_file_name(seq, inner.chain_id));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                let len = file.metadata()?.len();
                inner.files.insert(seq, SideFile { file, len });
                self.dur.sync_dir(&self.dir)?;
            }
            let Some(side) = inner.files.get_mut(&seq) else {
                continue;
            };
            let pos = side.len;
            super::segment::pwritev_all(&side.file, &[&head, &data], pos)?;
            side.len += (CBW_HEADER_LEN + data.len()) as u64;
            inner.saved.entry(lsn).or_default().push(Saved {
                offset: a,
                len: b - a,
                seq,
                pos,
            });
            if !synced.contains(&seq) {
                synced.push(seq);
            }
        }
        for seq in synced {
            if let Some(side) = inner.files.get(&seq) {
                self.dur.sync_data(Target::Log, &side.file)?;
            }
        }
        Ok(())
    }

    /// After the image write of extent `lsn`: its range is a piece now.
    pub fn insert(&self, lsn: u64, offset: u64, len: u64) {
        lock(&self.inner).insert(lsn, offset, len, false);
    }

    /// The bytes of extent record `h` as of its cut (see the module documentation), in a
    /// buffer of the shippers' pool ([`super::bufpool`]: reused across cuts, returned when the
    /// last reference to it is dropped). An error with `InvalidData` means a preimage does not
    /// match its checksum.
    ///
    /// `None` for a deferred write of which the map holds neither a piece nor a preimage:
    /// its cut has its bytes from other records — a later one over its range (the pass that
    /// logged it, or a write over it) or an earlier extent's piece that absorbed it (see
    /// [`deferred`], "Absorbed writes") — so it applies nothing. Reading the image for it
    /// would be wrong for an absorbed write the image no longer holds after the cut.
    pub fn data_of(&self, h: &RecordHeader) -> io::Result<Option<Bytes>> {
        let inner = lock(&self.inner);
        if h.flags & format::FLAG_DEFERRED != 0 && !inner.holds(h) {
            return Ok(None);
        }
        let len =
            usize::try_from(h.length).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let data = BufPool::shared().read(len, |buf| {
            crate::fastio::pread_into(&self.image, buf, h.offset, len)?;
            for s in inner.saved.get(&h.lsn).map(|v| &v[..]).unwrap_or(&[]) {
                let Some(side) = inner.files.get(&s.seq) else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the preimage file of segment {} is gone", s.seq),
                    ));
                };
                let mut e = vec![0u8; CBW_HEADER_LEN + s.len as usize];
                side.file.read_exact_at(&mut e, s.pos)?;
                match decode_entry(&e, 0) {
                    Some((lsn, off, l, _)) if lsn == h.lsn && off == s.offset && l == s.len => {}
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                            "the preimage of LSN {} at {}+{} in segment {}'s side file is damaged",
                            h.lsn, s.offset, s.len, s.seq
                        ),
                        ))
                    }
                }
                let (Some(from), Some(to)) = (
                    s.offset.checked_sub(h.offset),
                    (s.offset + s.len).checked_sub(h.offset),
                ) else {
                    continue;
                };
                if to as usize <= buf.len() {
                    buf[from as usize..to as usize].copy_from_slice(&e[CBW_HEADER_LEN..]);
                }
            }
            Ok(())
        })?;
        Ok(Some(data))
    }

    /// Pieces and preimages held (for tests and accounting): (pieces, preimage bytes).
    pub fn usage(&self) -> (usize, u64) {
        let inner = lock(&self.inner);
        let bytes = inner.saved.values().flatten().map(|s| s.len).sum();
        (inner.pieces.len(), bytes)
    }
}

#[cfg(test)]
#[path = "extent_tests.rs"]
mod model_tests;

#[cfg(test)]
mod deferred_tests;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod merge_tests;

#[cfg(test)]
mod take_tests;

#[cfg(test)]
mod absorb_tests;
