//! Deferred small writes: a small write logged inline or by the disk's writer thread may be
//! recorded as an extent flagged [`FLAG_DEFERRED`] — 40 bytes, its data in the image only —
//! and its bytes are logged later, by [`ExtentMap::log_deferred`], at the next FLUSH and
//! before every cut.
//!
//! **Why.** Copying each 4 KiB write into the log on the write path doubles the page-cache
//! copies of random small writes: a tracked disk ran random 4 KiB writes at 0.47–0.87× of an
//! untracked one (BENCHMARKS.md, "Change log"). ZFS's intent log does the same for
//! asynchronous writes: their data is copied into the log only when a sync asks for it.
//! Writes over the same bytes between two FLUSHes are logged once.
//!
//! **What holds** (beside the rules of the parent module, which a deferred piece follows as
//! any piece of an extent):
//! * *Durability.* A FLUSH logs every live deferred piece (one forward pass over the disk,
//!   every LSN) before its sync round, which then syncs the log only: a write acknowledged
//!   before the FLUSH is either logged with its bytes by that pass, synced already (see
//!   "Synced pieces" below), or covered by a later record (whose own bytes are logged or in
//!   the image as any record's are). With at least `image_flush_min` live bytes, or if the
//!   image cannot be read, the FLUSH syncs the image instead (`note_image_dependent`: the
//!   round syncs the image after every change up to the last LSN reached it, then appends
//!   the image-synced barrier that its log sync makes durable).
//! * *Cuts.* [`crate::Disk::cut`] runs passes while writes go on (repeated while they
//!   shrink, see `crate::disk::cut`), then one with writes paused, right before the
//!   barrier: a cut holds no deferred piece, so no copy-before-write is ever needed for one
//!   (a write-once overwrite after a cut would otherwise save and sync 4 KiB preimages one
//!   by one). If a pass fails, the cut fails and nothing was cut.
//! * *Order.* A piece's bytes are read while the log holds its range
//!   ([`ChangeLog::log_image_bytes`]), so the write record that follows the extent holds the
//!   image's bytes at its own LSN. Replay and the shipper take the later record over the
//!   extent, as for any two records.
//! * *Crashes.* The extent record is in the log's page cache before the image changes, as
//!   every record is, so a process crash leaves the log describing the image. After a host
//!   crash an unsynced piece's bytes may be lost from the image; its extent record, if it
//!   survived, says "the image's bytes", which is what the image then holds, and the hot
//!   extent rule makes recovery log that part again as for any write. Recovery syncs the
//!   image and records it, so a reopened map loads the deferred writes after the last cut
//!   as synced pieces (live ones if a host crash kept the redo point back), and the next
//!   cut logs their bytes.
//! * *Bound.* A write is deferred only while the deferred bytes stay within
//!   [`crate::changelog::LogOptions::defer_max`] (default 4 GiB), which bounds a FLUSH's or
//!   a cut's logging, and the deferred pieces within [`PIECES_MAX`], which bounds the map's
//!   memory; past either, small writes log their data with them as before. The disk
//!   also passes a bound of 0 while each FLUSH follows only a few small writes
//!   ([`crate::changelog::LogOptions::flush_heavy_writes`]): deferring then only adds a
//!   read and a record per write.
//!
//! **Synced pieces.** A deferred piece whose record is at or below the LSN through which
//! recovery after a host crash trusts the image ([`ChangeLog::image_trusted`]: the recorded
//! redo point of a checkpoint, or a sync round's image-synced barrier) has its bytes durable
//! where they are: the image was synced after the write reached it, nothing has changed
//! them since (any later change cuts the piece), and neither replay nor the relogging of
//! hot extents can put older bytes there (replay starts after the redo point and lets an
//! extent up to a barrier supersede earlier records). Such a piece is *synced*: a FLUSH's
//! pass ([`Pass::Flush`]) skips it, a cut's pass ([`Pass::Cut`]) still logs it (a cut holds
//! no deferred piece). [`ExtentMap::settle`] moves pieces from the live index to the synced
//! one when that LSN has moved (one walk of the live index each time: after a checkpoint,
//! or after a FLUSH that synced the image). So the pieces written before the background
//! checkpoint cost a FLUSH nothing, and a FLUSH facing many deferred bytes may sync the
//! image instead of copying them into the log (`LogOptions::image_flush_min`); the pieces
//! are then synced for the FLUSHes that follow. A piece written again gets a new LSN and is
//! live again.
//!
//! **Merged pieces.** A new live deferred piece is merged with the live deferred pieces that
//! end where it starts and start where it ends, as long as the result stays inside one
//! [`RUN_MAX`]-aligned window of the disk (1 MiB: the largest record a pass logs, so a merged
//! piece is never more than a pass reads at once); a write inside a live piece then only
//! gives it the write's LSN. The merged piece's LSN is the newest of its writes', which errs
//! the safe way everywhere the map compares it: it stays live (logged by the next FLUSH)
//! until that newest write is synced, a cut's pass logs it like any other, and releasing a
//! segment keeps it. Synced pieces are not merged (a write next to one would make the FLUSH
//! log bytes that are durable already). Why: random small writes over a disk leave one piece
//! per block until the FLUSH, ~500,000 of them on a 2 GiB disk, and the map's B-tree walk for
//! a random block missed the CPU caches on every write (about 1 µs of a logged write's
//! ~7 µs on this machine, BENCHMARKS.md); merged, the same writes leave at most one piece per
//! window once they cover it. What it must never do: fall into a cut unlogged — a preimage
//! saved under the newest LSN could not be found for the older writes' records — so
//! [`ExtentMap::cut_at`] refuses (the cut fails, nothing changed) rather than retire one;
//! the cut's own pass logs every deferred piece before its barrier, so that only happens
//! when a pass did not finish. A live piece that takes the LSN of a write strictly inside
//! it is marked merged for the same reason.
//!
//! **Absorbed writes.** A small write that lies inside one piece of a large write's extent
//! newer than the cut ([`Under::Absorbed`]) changes nothing in the map: that piece already
//! says "at the cut, ship the image's bytes here", and those bytes will be this write's (or
//! a later record's of the same cut). Its record is a deferred extent as any; what differs:
//! * *Durability*: no pass logs it. The map keeps the newest such LSN, and the next FLUSH
//!   ([`ExtentMap::settle`]) declares it image-dependent, so that FLUSH's sync round syncs
//!   the image (and appends the image-synced barrier) as for the large write itself; a host
//!   crash before that FLUSH is what it is for any unflushed write.
//! * *Shipping*: the shipper applies nothing for a deferred write of which the map holds no
//!   piece and no preimage ([`ExtentMap::data_of`]). Every other such write has its bytes
//!   from a later record of its cut (a pass's, or a write over it), and an absorbed one from
//!   the earlier piece, whose bytes a write after the cut saves first as for any piece in
//!   a cut — so the preimage is found under that piece's LSN.
//! * *After a restart* the map is loaded from the records, and the write is a deferred
//!   piece over part of the extent's, as before absorption: the next cut logs it.
//!
//! Why: after a sequential row (the disk covered by large writes since the last cut),
//! random small writes each split a piece into three — up to hundreds of thousands of
//! pieces, whose B-tree walks miss the CPU caches on every write (BENCHMARKS.md); absorbed,
//! the map keeps one piece per large write. Not with `defer_max` 0 (writes that carry
//! their data: a FLUSH after every few writes, where a sync of the image costs more).

use std::io;

use std::collections::BTreeSet;

use super::{lock, ExtentMap, Inner, Piece};
use crate::changelog::format::FLAG_DEFERRED;
use crate::changelog::ChangeLog;

/// Most deferred pieces a map holds (live and synced): 1,048,576, one per 4 KiB of the
/// default `defer_max` (4 GiB), so random 4 KiB writes reach both bounds together and
/// smaller writes cannot make the map larger. A piece costs the map about 50 bytes (an entry
/// of the pieces' B-tree and one of an index's), so this is about 50–64 MiB per disk at
/// most. Past it, small writes are logged with their data until a FLUSH or cut logs the
/// deferred ones.
///
/// Why the bound is this high (it was 1 GiB, i.e. 262,144 such pieces): random 4 KiB
/// writes over a 2 GiB disk with no FLUSH and no cut, 12 s at QD32, reached 1 GiB of pieces
/// within seconds, and every later write carried its 4 KiB into the log — 0.61× the
/// untracked disk's IOPS; with the bound at 4 GiB, 0.91×, at the same CPU per GB as the
/// untracked disk and 58 MiB of peak resident set against 50 (BENCHMARKS.md, "The
/// deferred-write bound").
pub const PIECES_MAX: usize = 1 << 20;

/// Largest run of adjacent deferred pieces logged as one record (pieces are not split to
/// meet it; none is larger than the largest write logged inline, 1 MiB).
const RUN_MAX: u64 = 1 << 20;

const _: () = assert!(FLAG_DEFERRED != 0);

/// Whether `[a, b)` (not empty) lies inside one [`RUN_MAX`]-aligned window: how far pieces
/// are merged (see "Merged pieces").
fn one_window(a: u64, b: u64) -> bool {
    a / RUN_MAX == (b - 1) / RUN_MAX
}

impl Piece {
    /// A deferred piece whose record is newer than `floor`: live for a pass (or a merge)
    /// whose floor that is.
    fn live_above(&self, floor: u64) -> bool {
        self.deferred && self.lsn > floor
    }
}

/// Testing only: bytes of deferred writes logged by [`ExtentMap::log_deferred`] (all maps).
#[cfg(any(test, feature = "testing"))]
pub static DEFERRED_LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A small write's request to the map, as [`Inner::take_uncut`] and its reference model
/// (`take_tests`) see it.
pub(super) struct Write {
    pub(super) lsn: u64,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) end: u64,
    defer_max: u64,
    cut: u64,
    synced_lsn: u64,
}

/// What a write does with a piece under it.
pub(super) enum Under {
    /// The piece is in a cut: its bytes must be saved first (the path that may wait).
    Decline,
    /// The write lies inside a live deferred piece, which took its LSN: nothing else changes.
    Renumbered,
    /// The write's exact range was a synced deferred piece, which took its LSN (the old one
    /// given): it may move to the live index ([`Inner::renumber_exact`]).
    Exact(u64),
    /// The write lies inside a piece of a large write's extent newer than the cut, which
    /// holds it (see "Absorbed writes"): nothing changes but [`Inner::absorbed_lsn`].
    Absorbed,
    /// Anything else: the write's range is removed from the piece.
    Hit,
}

impl Write {
    pub(super) fn new(m: &Inner, lsn: u64, offset: u64, len: u64, defer_max: u64) -> Write {
        Write {
            lsn,
            offset,
            len,
            end: offset.saturating_add(len),
            defer_max,
            cut: m.cut_lsn,
            synced_lsn: m.synced_lsn,
        }
    }

    /// Whether the write may be deferred: the deferred bytes within `defer_max` with it (`0`:
    /// never) and the deferred pieces within `pieces_max`.
    pub(super) fn fits(&self, m: &Inner, pieces_max: usize) -> bool {
        self.defer_max > 0
            && (m.deferred + m.synced_bytes).saturating_add(self.len) <= self.defer_max
            && m.live.len() + m.synced.len() < pieces_max
    }

    /// What the write does with the piece `[s, p.end)`, which lies under it (renumbering it
    /// where the answer says so).
    pub(super) fn under(&self, s: u64, p: &mut Piece) -> Under {
        if p.lsn <= self.cut {
            return Under::Decline;
        }
        let deferred = self.defer_max > 0 && p.deferred;
        let inside = s <= self.offset && self.end <= p.end;
        // Inside a live deferred piece (a block written again between two FLUSHes, or next
        // to others merged with it): the piece is the new record's now — every byte of it is
        // still the image's and still to be logged — nothing else changes. Being inside it,
        // no other piece lies there.
        if deferred && p.lsn > self.synced_lsn && inside {
            // Strictly inside, the piece's LSN no longer names the record of every byte.
            p.merged |= s != self.offset || p.end != self.end;
            p.lsn = self.lsn;
            return Under::Renumbered;
        }
        // Inside an extent's piece newer than the cut (see "Absorbed writes"); not when
        // writes are to carry their data (`defer_max` 0: the disk wants no image sync).
        if self.defer_max > 0 && !p.deferred && inside {
            return Under::Absorbed;
        }
        // The same range written again over a synced deferred piece (live ones were taken
        // just above; being exact, it is the only piece there): the piece is the new
        // record's now and live again (its new bytes are not durable).
        if deferred && s == self.offset && p.end == self.end {
            return Under::Exact(std::mem::replace(&mut p.lsn, self.lsn));
        }
        Under::Hit
    }
}

impl Inner {
    /// The index a deferred piece of record `lsn` newer than the cut belongs in: live, or
    /// synced.
    pub(super) fn index_of(&mut self, lsn: u64) -> &mut BTreeSet<u64> {
        match lsn > self.synced_lsn {
            true => &mut self.live,
            false => &mut self.synced,
        }
    }

    /// The byte count of [`Inner::index_of`]'s index.
    pub(super) fn bytes_of(&mut self, lsn: u64) -> &mut u64 {
        match lsn > self.synced_lsn {
            true => &mut self.deferred,
            false => &mut self.synced_bytes,
        }
    }

    /// Enters the deferred piece starting at `k`, of record `lsn` (newer than the cut) and
    /// `len` bytes, in its index and byte count.
    pub(super) fn index_piece(&mut self, k: u64, lsn: u64, len: u64) {
        *self.bytes_of(lsn) += len;
        self.index_of(lsn).insert(k);
    }

    /// Takes it out of them again.
    pub(super) fn unindex_piece(&mut self, k: u64, lsn: u64, len: u64) {
        let n = self.bytes_of(lsn);
        *n = n.saturating_sub(len);
        self.index_of(lsn).remove(&k);
    }

    /// After [`Under::Exact`]: the piece of exactly `w`'s range, of record `old` before, moves
    /// between the synced and the live index if its new LSN puts it in the other.
    pub(super) fn renumber_exact(&mut self, w: &Write, old: u64) {
        if (old > self.synced_lsn) != (w.lsn > self.synced_lsn) {
            self.unindex_piece(w.offset, old, w.len);
            self.index_piece(w.offset, w.lsn, w.len);
        }
    }

    /// The LSN above which a deferred piece is live (newer than the cut and than the synced
    /// point): what a FLUSH logs and what merges.
    fn live_floor(&self) -> u64 {
        self.cut_lsn.max(self.synced_lsn)
    }

    /// Takes out the live piece starting at `at`, to be joined into the one before it (its
    /// bytes leave the count; the piece that takes it in counts them again).
    fn take_joined(&mut self, at: u64) {
        if let Some(p) = self.pieces.remove(&at) {
            self.live.remove(&at);
            self.deferred = self.deferred.saturating_sub(p.end - at);
        }
    }

    /// Enters a deferred piece of record `lsn` (newer than the cut and than `synced_lsn`, as
    /// every new record is) over `[offset, offset + len)`, where no piece lies, merged with
    /// the live deferred pieces that end where it starts and start where it ends, as long as
    /// the result stays inside one [`RUN_MAX`]-aligned window (see "Merged pieces").
    pub(super) fn insert_deferred(&mut self, lsn: u64, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let floor = self.live_floor();
        if lsn <= floor {
            // Not live (never so for a new record): entered as it is, unmerged.
            self.insert_free(lsn, offset, len, true, false);
            return;
        }
        let left = self
            .pieces
            .range(..offset)
            .next_back()
            .filter(|(&s, p)| p.end == offset && p.live_above(floor) && one_window(s, end))
            .map(|(&s, _)| s);
        let start = left.unwrap_or(offset);
        let right = self
            .pieces
            .get(&end)
            .filter(|p| p.live_above(floor) && one_window(start, p.end))
            .map(|p| p.end);
        if right.is_some() {
            self.take_joined(end);
        }
        let merged_end = right.unwrap_or(end);
        match left.and_then(|s| self.pieces.get_mut(&s)) {
            Some(p) => {
                p.end = merged_end;
                p.lsn = lsn;
                p.merged = true;
                self.deferred += merged_end - offset;
            }
            None => self.insert_free(lsn, offset, merged_end - offset, true, right.is_some()),
        }
    }

    /// [`ExtentMap::take_uncut`] under the map's lock, with the map's bound on pieces.
    ///
    /// One walk of the pieces back from `end` decides the common paths: the piece starting
    /// at `end` (a right neighbour to merge with), the pieces over the write (one of a cut:
    /// decline; a live deferred one around it: renumbered, as is a synced one of exactly its
    /// range; a large write's one around it: absorbed, see "Absorbed writes"), and the first
    /// piece ending at or before `offset` (a left neighbour, grown in
    /// place over the write, and over the right one too when both fit one window). So a
    /// write next to a live piece costs that one walk (and a removal if it joins two), a
    /// write with no live neighbour one walk and two inserts. A write over other pieces
    /// removes them first and then enters its piece as [`Inner::insert_deferred`] does:
    /// the same rules, in more walks.
    pub(super) fn take_uncut(
        &mut self,
        lsn: u64,
        offset: u64,
        len: u64,
        defer_max: u64,
        pieces_max: usize,
    ) -> Option<bool> {
        if len == 0 {
            // Nothing to keep track of (never asked: an empty write logs nothing).
            return Some(false);
        }
        let w = Write::new(self, lsn, offset, len, defer_max);
        let end = w.end;
        let floor = self.live_floor();
        let fits = |m: &Inner| w.fits(m, pieces_max);
        // Only a new piece that is live merges (see "Merged pieces").
        let merges = fits(self) && lsn > floor;
        let mut right = None;
        let mut hit = false;
        let mut renumbered = None;
        let mut grown = None;
        // Pieces never overlap, so walking back from the one that starts at `end`, the ends
        // decrease too: the first one ending at or before `offset` ends the walk.
        for (&s, p) in self.pieces.range_mut(..=end).rev() {
            if s == end {
                // Starts where the write ends: a neighbour, not under the write.
                right = Some(p.end).filter(|_| p.live_above(floor));
                continue;
            }
            if p.end <= offset {
                if !hit && merges && p.end == offset && p.live_above(floor) && one_window(s, end) {
                    // The left neighbour takes the write in, and the right one if the
                    // result stays in its window; its key, and so its index entry, stays.
                    let joined = right.filter(|&e| one_window(s, e));
                    p.end = joined.unwrap_or(end);
                    p.lsn = lsn;
                    p.merged = true;
                    grown = Some(p.end);
                }
                break;
            }
            match w.under(s, p) {
                Under::Decline => return None,
                Under::Renumbered => return Some(true),
                Under::Absorbed => {
                    self.absorbed_lsn = lsn;
                    return Some(true);
                }
                Under::Exact(old) => {
                    renumbered = Some(old);
                    break;
                }
                Under::Hit => hit = true,
            }
        }
        if let Some(old) = renumbered {
            self.renumber_exact(&w, old);
            return Some(true);
        }
        if hit {
            self.remove(offset, end);
            let deferred = fits(self);
            if deferred {
                self.insert_deferred(lsn, offset, len);
            }
            return Some(deferred);
        }
        if let Some(grown_end) = grown {
            if grown_end > end {
                self.take_joined(end);
            }
            // The grown piece's bytes past `offset`: the write's and the joined piece's.
            self.deferred += grown_end - offset;
            return Some(true);
        }
        if !merges {
            if fits(self) {
                // Not live (never so for a new record): entered as it is.
                self.insert_free(lsn, offset, len, true, false);
                return Some(true);
            }
            return Some(false);
        }
        let joined = right.filter(|&e| one_window(offset, e));
        if joined.is_some() {
            self.take_joined(end);
        }
        let new_end = joined.unwrap_or(end);
        self.insert_free(lsn, offset, new_end - offset, true, joined.is_some());
        Some(true)
    }

    /// [`ExtentMap::settle`]'s change: the image is trusted through `trusted` (above
    /// `synced_lsn`), so the live pieces at or below it are synced now.
    pub(super) fn settle_to(&mut self, trusted: u64) {
        self.synced_lsn = trusted;
        if self.live.is_empty() {
            return;
        }
        // One walk, in offset order (so both sets are built by appending).
        let (mut kept, mut moved) = (BTreeSet::new(), BTreeSet::new());
        for k in std::mem::take(&mut self.live) {
            match self.pieces.get(&k).map(|p| (p.lsn, p.end - k)) {
                Some((lsn, len)) if lsn <= trusted => {
                    self.deferred = self.deferred.saturating_sub(len);
                    self.synced_bytes += len;
                    moved.insert(k);
                }
                _ => {
                    kept.insert(k);
                }
            }
        }
        self.live = kept;
        self.synced.append(&mut moved);
    }

    /// [`ExtentMap::check_deferred_index`] on the map's state (testing only): the indexes of
    /// live and synced deferred pieces and their byte counts match the pieces themselves, and
    /// no deferred piece is at or below the cut (a cut holds none: no pass would log it).
    #[cfg(any(test, feature = "testing"))]
    pub(super) fn check_deferred_index(&self) -> Result<(), String> {
        let (cut, synced) = (self.cut_lsn, self.synced_lsn);
        if let Some((s, p)) = self.pieces.iter().find(|(_, p)| p.deferred && p.lsn <= cut) {
            return Err(format!(
                "deferred piece at {s} with LSN {} at or below the cut {cut}",
                p.lsn
            ));
        }
        for (name, index, counted, is_live) in [
            ("live", &self.live, self.deferred, true),
            ("synced", &self.synced, self.synced_bytes, false),
        ] {
            let want: Vec<u64> = self
                .pieces
                .iter()
                .filter(|(_, p)| p.deferred && p.lsn > cut && (p.lsn > synced) == is_live)
                .map(|(&s, _)| s)
                .collect();
            let have: Vec<u64> = index.iter().copied().collect();
            if want != have {
                return Err(format!("{name} index {have:?}, deferred pieces {want:?}"));
            }
            let bytes: u64 = want.iter().map(|s| self.pieces[s].end - s).sum();
            if bytes != counted {
                return Err(format!(
                    "{counted} {name} deferred bytes counted, {bytes} held"
                ));
            }
        }
        Ok(())
    }

    /// The start of a merged deferred piece whose LSN is at or below `cut`, if any.
    pub(super) fn merged_at_or_below(&self, cut: u64) -> Option<u64> {
        self.live
            .iter()
            .chain(&self.synced)
            .copied()
            .find(|k| self.pieces.get(k).is_some_and(|p| p.merged && p.lsn <= cut))
    }

    /// After the cut LSN moved: deferred pieces it covers are extents of a cut like any
    /// other (their bytes are needed by that cut; a FLUSH no longer logs them).
    pub(super) fn retire_cut_deferred(&mut self) {
        let cut = self.cut_lsn;
        let keys: Vec<u64> = self.live.iter().chain(&self.synced).copied().collect();
        for k in keys {
            let Some(p) = self.pieces.get_mut(&k) else {
                continue;
            };
            if p.lsn > cut {
                continue;
            }
            p.deferred = false;
            let (lsn, len) = (p.lsn, p.end - k);
            self.unindex_piece(k, lsn, len);
        }
    }
}

/// Which deferred pieces a pass logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// A FLUSH's: the live ones (not synced).
    Flush,
    /// A cut's: all newer than the last cut, synced or not.
    Cut,
}

impl ExtentMap {
    /// Bytes of the live deferred pieces (newer than the last cut, not synced): what the
    /// next FLUSH logs.
    pub fn deferred_bytes(&self) -> u64 {
        lock(&self.inner).deferred
    }

    /// Bytes of the synced deferred pieces (which a FLUSH skips and a cut logs).
    pub fn synced_bytes(&self) -> u64 {
        lock(&self.inner).synced_bytes
    }

    /// For a FLUSH, before its pass: brings the synced index up to the log's trusted image
    /// LSN ([`ChangeLog::image_trusted`]): the live pieces at or below it become synced (see
    /// "Synced pieces"); and declares the writes absorbed since the last FLUSH image-dependent
    /// (see "Absorbed writes"), so that its sync round syncs the image. Returns the live
    /// bytes left, what the FLUSH's pass would log.
    pub fn settle(&self, log: &ChangeLog) -> u64 {
        let (chain, trusted) = log.image_trusted();
        let mut inner = lock(&self.inner);
        self.follow_chain(&mut inner, log);
        let absorbed = std::mem::take(&mut inner.absorbed_lsn);
        if absorbed > 0 {
            log.note_image_dependent(absorbed);
        }
        if inner.chain_id != chain || trusted <= inner.synced_lsn {
            return inner.deferred;
        }
        inner.settle_to(trusted);
        inner.deferred
    }

    /// Testing only: every piece, as `[start, end)`.
    #[cfg(any(test, feature = "testing"))]
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        lock(&self.inner)
            .pieces
            .iter()
            .map(|(&s, p)| (s, p.end))
            .collect()
    }

    /// Testing only: the indexes of live and synced deferred pieces and their byte counts
    /// match the pieces themselves, and no deferred piece is at or below the cut (a cut holds
    /// none: no pass would log it).
    #[cfg(any(test, feature = "testing"))]
    pub fn check_deferred_index(&self) -> Result<(), String> {
        lock(&self.inner).check_deferred_index()
    }

    /// Logs the image's bytes of the deferred pieces newer than the last cut that `pass`
    /// takes (a FLUSH's: the live ones — the FLUSH calls [`Self::settle`] first, to skip
    /// the synced ones; a cut's: all) as write records, in one forward pass over the disk;
    /// writes may go on meanwhile (pieces added behind the pass are left for the next one).
    /// Returns the bytes logged. Blocking.
    pub fn log_deferred(&self, log: &ChangeLog, pass: Pass) -> io::Result<u64> {
        let mut from = 0u64;
        let mut logged = 0u64;
        while let Some((start, end)) = self.deferred_run(log, from, pass) {
            let (mut next, mut got) = (end, 0);
            let lsn = log.log_image_bytes(start, end, || {
                let Some((a, b)) = self.held_run(start, end, pass) else {
                    return Ok(None);
                };
                let data = crate::fastio::pread_exact(&self.image, a, (b - a) as usize)?;
                // The range is held: nothing changed the pieces there since `held_run`.
                lock(&self.inner).remove(a, b);
                (next, got) = (b, b - a);
                Ok(Some((a, data)))
            })?;
            if lsn.is_some() {
                logged += got;
            }
            from = next;
        }
        #[cfg(any(test, feature = "testing"))]
        DEFERRED_LOGGED.fetch_add(logged, std::sync::atomic::Ordering::Relaxed);
        Ok(logged)
    }

    /// The first run of adjacent deferred pieces newer than the cut that `pass` takes and
    /// that starts at or after `from`, at most [`RUN_MAX`] long (unless its first piece is
    /// longer).
    fn deferred_run(&self, log: &ChangeLog, from: u64, pass: Pass) -> Option<(u64, u64)> {
        let mut inner = lock(&self.inner);
        self.follow_chain(&mut inner, log);
        let mut run: Option<(u64, u64)> = None;
        let mut live = inner.live.range(from..).copied().peekable();
        let mut synced = inner.synced.range(from..).copied().peekable();
        // The live index alone, or both merged by offset.
        let keys = std::iter::from_fn(|| match (pass, live.peek(), synced.peek()) {
            (Pass::Cut, Some(&a), Some(&b)) if b < a => synced.next(),
            (Pass::Cut, None, Some(_)) => synced.next(),
            _ => live.next(),
        });
        for s in keys {
            let Some(p) = inner.pieces.get(&s) else { break };
            match run {
                None => run = Some((s, p.end)),
                Some((a, b)) if s == b && p.end - a <= RUN_MAX => run = Some((a, p.end)),
                Some(_) => break,
            }
        }
        run
    }

    /// With `[start, end)` held by the log: the first run of adjacent deferred pieces newer
    /// than the cut that `pass` takes inside it, clipped to it (requests that ran since
    /// [`Self::deferred_run`] may have replaced or split pieces).
    fn held_run(&self, start: u64, end: u64, pass: Pass) -> Option<(u64, u64)> {
        let inner = lock(&self.inner);
        let floor = match pass {
            Pass::Flush => inner.live_floor(),
            Pass::Cut => inner.cut_lsn,
        };
        let first = super::first_overlapping(&inner.pieces, start);
        let mut run: Option<(u64, u64)> = None;
        for (&s, p) in inner.pieces.range(first..end) {
            let live = p.live_above(floor);
            let (a, b) = (s.max(start), p.end.min(end));
            match run {
                None if live => run = Some((a, b)),
                None => {}
                Some((ra, rb)) if live && a == rb => run = Some((ra, b)),
                Some(_) => break,
            }
        }
        run
    }
}
