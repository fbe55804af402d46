//! Patches: the changes of one replication interval, stored as they were written.
//!
//! A delta of a few scattered 4 KiB writes would cost a whole chunk each if it were folded
//! into chunks at once (16× more upload than written with 64 KiB chunks). Instead the
//! replicator stores the interval's changes as a *patch*: a sorted list of non-overlapping
//! extents (data or zeroes), later writes already applied over earlier ones. A point's disk
//! is its base index plus the patches listed in its [`crate::DiskEntry`], applied in order.
//! Patches are folded into chunks lazily ([`crate::PointBuilder::fold`]) when a disk's patch
//! chain grows past a limit, so readers stay fast and hold a bounded amount of patch data.
//!
//! **Chunk references.** An interval that rewrites a whole, aligned chunk does not carry the
//! chunk's bytes: the cut stores the chunk as a chunk ([`crate::PointBuilder::add_patch`],
//! through the session's `ChunkWriter`: dedup, zero elision, packs) and the patch holds a
//! *chunk extent*: "these bytes are bytes `from..` of chunk `id`". Folding such a chunk is then
//! an index update — its data is encoded once, at the cut, never again. Chunk extents obey the
//! same order as data: a later extent carves an earlier one, so a chunk reference in chain
//! element k supersedes the base and every element before k for that chunk, and later data
//! still applies over it (a carved reference keeps `from`, so it stays exact).
//! [`crate::Store::load_disk`] turns a chain into "index with overrides + residual patch"
//! (whole references become index entries, partial ones are read into data): the one function
//! readers, export, resync, fold and consolidation all use. A cut stores its references in
//! separate, data-free patch objects whose [`crate::PatchRef::chunk_refs`] is non-zero, so GC
//! and verify read only those small objects to find the chunks they reference.
//!
//! **Buffers.** Data extents hold shared [`Bytes`]: a cut hands over the buffers it read
//! ([`Patch::write_bytes`]), a later write carves an earlier one by slicing it, and a whole
//! chunk one extent covers leaves as a slice ([`Patch::take_whole_chunks`]). A cut's bytes
//! are therefore held once, in the buffers they were read into, and copied only into the
//! stored form of the residual patch (or a chunk pieced together from several writes).
//!
//! A patch object is stored like a chunk (same envelope: compression, encryption, id = digest
//! of the plaintext, verified on every read), under `chunks/`, so dedup, GC and verification
//! treat it like any other chunk. Its plaintext:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `SBPA` |
//! | 4 | format version (1: no chunk extents; 2: may hold them), little endian |
//! | 8 | disk size |
//! | 8 | extent count N |
//! | N × 24 | extents: offset u64, length u64, kind u64 (0 data, 1 zeroes, 2 chunk, version 2) |
//! | … | per extent in order: data extents their bytes, chunk extents id (32) + `from` u64 |
//!
//! Version 1 is still written for patches without chunk extents, so such objects are
//! byte-identical to older builds' (same ids, same dedup).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::manifest::DiskIndex;

const MAGIC: [u8; 4] = *b"SBPA";
/// Version without chunk extents.
const VERSION: u32 = 1;
/// Version that may hold chunk extents.
const VERSION_REFS: u32 = 2;
/// Stored size of a chunk extent's reference (id, `from`).
const REF_BYTES: usize = 40;
const HEADER: usize = 24;
const EXTENT: usize = 24;

/// Largest amount of data one patch object holds; a bigger interval is split into several.
pub const MAX_PATCH_DATA: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    /// Shared, immutable bytes: carving an extent slices them, never copies.
    Data(Bytes),
    Zero,
    /// Bytes `from..from+len` of the chunk `id`'s plaintext.
    Chunk {
        id: ChunkId,
        from: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ext {
    len: u64,
    body: Body,
}

/// A chunk extent that does not cover its whole chunk: (offset, length, chunk, from).
pub type PartialRef = (u64, u64, ChunkId, u64);

/// What an extent of a patch holds (see [`Patch::extents`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// These bytes.
    Data(&'a [u8]),
    /// Zeroes.
    Zero,
    /// Bytes `from..` of chunk `id` (resolved by [`crate::Store::load_disk`]).
    Chunk { id: ChunkId, from: u64 },
}

/// A set of non-overlapping changes to a disk. Inserting over existing extents replaces the
/// overlapped parts (the newest change wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patch {
    disk_size: u64,
    map: BTreeMap<u64, Ext>,
    data_bytes: u64,
}

impl Patch {
    /// An empty patch of a disk of `disk_size` bytes.
    pub fn new(disk_size: u64) -> Self {
        Patch {
            disk_size,
            map: BTreeMap::new(),
            data_bytes: 0,
        }
    }

    /// Size of the disk the patch applies to.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// No extents.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of extents.
    pub fn extent_count(&self) -> usize {
        self.map.len()
    }

    /// Bytes of data held (zero and chunk extents hold none).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Number of chunk extents.
    pub fn chunk_refs(&self) -> u64 {
        self.map
            .values()
            .filter(|e| matches!(e.body, Body::Chunk { .. }))
            .count() as u64
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.disk_size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "patch extent {offset}+{len} is outside the {}-byte disk",
                self.disk_size
            ))),
        }
    }

    fn insert(&mut self, offset: u64, e: Ext) {
        self.carve(offset, offset + e.len);
        if let Body::Data(d) = &e.body {
            self.data_bytes += d.len() as u64;
        }
        self.map.insert(offset, e);
    }

    /// Record a write of `data` at `offset` (copies `data`; see [`Self::write_bytes`]).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_bytes(offset, Bytes::copy_from_slice(data))
    }

    /// Record a write of `data` at `offset`, keeping `data` itself (no copy): the cut hands
    /// over the buffers it read, and whole chunks leave the patch as slices of them
    /// ([`Self::take_whole_chunks`]).
    pub fn write_bytes(&mut self, offset: u64, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check(offset, data.len() as u64)?;
        self.insert(
            offset,
            Ext {
                len: data.len() as u64,
                body: Body::Data(data),
            },
        );
        Ok(())
    }

    /// Record that `[offset, offset+len)` reads as zeroes (trim, write-zeroes).
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check(offset, len)?;
        self.insert(
            offset,
            Ext {
                len,
                body: Body::Zero,
            },
        );
        Ok(())
    }

    /// Record that `[offset, offset+len)` reads as bytes `from..from+len` of chunk `id`.
    pub fn refer(&mut self, offset: u64, len: u64, id: ChunkId, from: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check(offset, len)?;
        self.insert(
            offset,
            Ext {
                len,
                body: Body::Chunk { id, from },
            },
        );
        Ok(())
    }

    /// Apply every extent of `other` over this patch (`other` is newer).
    pub fn merge(&mut self, other: &Patch) -> Result<()> {
        for (&off, e) in &other.map {
            self.check(off, e.len)?;
            self.insert(off, e.clone());
        }
        Ok(())
    }

    /// Remove whatever covers `[start, end)`, keeping the parts of extents outside it.
    fn carve(&mut self, start: u64, end: u64) {
        let mut hit: Vec<u64> = Vec::new();
        if let Some((&s, e)) = self.map.range(..start).next_back() {
            if s + e.len > start {
                hit.push(s);
            }
        }
        hit.extend(self.map.range(start..end).map(|(&s, _)| s));
        for s in hit {
            let Some(e) = self.map.remove(&s) else {
                continue;
            };
            let eend = s + e.len;
            if let Body::Data(d) = &e.body {
                self.data_bytes -= d.len() as u64;
            }
            if s < start {
                self.keep(s, &e, 0, start - s);
            }
            if eend > end {
                self.keep(end, &e, end - s, eend - end);
            }
        }
    }

    /// Insert at `at` the part `skip..skip+len` of extent `e` (no overlap: called by carve).
    fn keep(&mut self, at: u64, e: &Ext, skip: u64, len: u64) {
        let body = match &e.body {
            Body::Data(d) => {
                self.data_bytes += len;
                Body::Data(d.slice(skip as usize..(skip + len) as usize))
            }
            Body::Zero => Body::Zero,
            Body::Chunk { id, from } => Body::Chunk {
                id: *id,
                from: from + skip,
            },
        };
        self.map.insert(at, Ext { len, body });
    }

    fn first_from(&self, start: u64) -> u64 {
        match self.map.range(..start).next_back() {
            Some((&s, e)) if s + e.len > start => s,
            _ => start,
        }
    }

    /// Overlay the patch on `buf`, which holds the disk's bytes from `start`. A chunk extent
    /// in the range is an error: resolve the chain first ([`crate::Store::load_disk`]).
    pub fn apply(&self, start: u64, buf: &mut [u8]) -> Result<()> {
        let end = start + buf.len() as u64;
        for (&s, e) in self.map.range(self.first_from(start)..end) {
            let a = s.max(start);
            let b = (s + e.len).min(end);
            if a >= b {
                continue;
            }
            let dst = &mut buf[(a - start) as usize..(b - start) as usize];
            match &e.body {
                Body::Data(d) => dst.copy_from_slice(&d[(a - s) as usize..(b - s) as usize]),
                Body::Zero => dst.fill(0),
                Body::Chunk { id, .. } => {
                    return Err(Error::InvalidArgument(format!(
                        "patch extent at {s} refers to chunk {} and was not resolved",
                        id.to_hex()
                    )))
                }
            }
        }
        Ok(())
    }

    /// True if any extent intersects `[start, end)`; `data_only` ignores zero extents.
    pub fn touches(&self, start: u64, end: u64, data_only: bool) -> bool {
        self.map
            .range(self.first_from(start)..end)
            .any(|(&s, e)| s + e.len > start && (!data_only || e.body != Body::Zero))
    }

    /// True if extents cover all of `[start, end)` (no byte of the base shows).
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for (&s, e) in self.map.range(self.first_from(start)..end) {
            if s > at {
                return false;
            }
            at = at.max(s + e.len);
            if at >= end {
                return true;
            }
        }
        at >= end
    }

    /// The extents in offset order: (offset, length, content).
    pub fn extents(&self) -> impl Iterator<Item = (u64, u64, Piece<'_>)> + '_ {
        self.map.iter().map(|(&s, e)| {
            let p = match &e.body {
                Body::Data(d) => Piece::Data(d),
                Body::Zero => Piece::Zero,
                Body::Chunk { id, from } => Piece::Chunk {
                    id: *id,
                    from: *from,
                },
            };
            (s, e.len, p)
        })
    }

    /// Chunk indexes (of `chunk_size`-byte chunks) any extent touches.
    pub fn touched_chunks(&self, chunk_size: u64) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for (&s, e) in &self.map {
            let first = s / chunk_size;
            let last = (s + e.len - 1) / chunk_size;
            out.extend(first..=last);
        }
        out
    }

    /// Takes out the chunks (of `chunk_size` bytes; the last one may be shorter) that the
    /// patch rewrites whole and with some data: returns each one's index and full content,
    /// and leaves the patch without them. A chunk only zeroed stays (zero extents cost
    /// nothing). Used by the cut to store them as chunks (see the module header).
    ///
    /// A chunk one data extent covers is returned as a slice of that extent's bytes (no copy,
    /// no allocation: the common case of writes of a chunk or more); only a chunk pieced
    /// together from several extents is assembled into a new buffer.
    pub fn take_whole_chunks(&mut self, chunk_size: u64) -> Result<Vec<(u64, Bytes)>> {
        let mut out = Vec::new();
        for ci in self.touched_chunks(chunk_size) {
            let start = ci * chunk_size;
            let end = (start + chunk_size).min(self.disk_size);
            if let Some(b) = self.single_data(start, end) {
                self.carve(start, end);
                out.push((ci, b));
                continue;
            }
            if !self.covers(start, end) || !self.touches(start, end, true) {
                continue;
            }
            let mut buf = vec![0u8; (end - start) as usize];
            self.apply(start, &mut buf)?;
            self.carve(start, end);
            out.push((ci, Bytes::from(buf)));
        }
        Ok(out)
    }

    /// The bytes `[start, end)` as a slice of one data extent, if one covers all of them.
    fn single_data(&self, start: u64, end: u64) -> Option<Bytes> {
        let (&s, e) = self.map.range(..=start).next_back()?;
        match &e.body {
            Body::Data(d) if s + e.len >= end => {
                Some(d.slice((start - s) as usize..(end - s) as usize))
            }
            _ => None,
        }
    }

    /// First half of resolving a chain (see [`crate::Store::load_disk`]): every chunk extent
    /// that covers a whole chunk of `index` from its start becomes that chunk's index entry
    /// and leaves the patch (it superseded the base and every earlier element; nothing later
    /// touches it, or it would have been carved). Returns the partial chunk extents left:
    /// (offset, length, chunk, from), which the caller reads and [`Self::write`]s over them.
    /// Returns the number of index entries set as well.
    pub fn resolve_whole(&mut self, index: &mut DiskIndex) -> Result<(u64, Vec<PartialRef>)> {
        if index.disk_size() != self.disk_size {
            return Err(Error::InvalidArgument(format!(
                "patch of a {}-byte disk resolved against an index of {} bytes",
                self.disk_size,
                index.disk_size()
            )));
        }
        let cs = u64::from(index.chunk_size());
        let mut whole = Vec::new();
        let mut partial = Vec::new();
        for (&s, e) in &self.map {
            let Body::Chunk { id, from } = e.body else {
                continue;
            };
            let ci = s / cs;
            if s % cs == 0 && from == 0 && e.len == index.chunk_len(ci) as u64 {
                whole.push((s, ci, id));
            } else {
                partial.push((s, e.len, id, from));
            }
        }
        for &(s, ci, id) in &whole {
            index.set(ci, id)?;
            self.map.remove(&s);
        }
        Ok((whole.len() as u64, partial))
    }

    /// Split into patches of at most [`MAX_PATCH_DATA`] stored bytes each (extents whole, so
    /// one huge write may exceed it alone). Their extents are disjoint, so their order is free.
    pub fn split(self) -> Vec<Patch> {
        let mut out = Vec::new();
        let mut cur = Patch::new(self.disk_size);
        let mut weight = 0u64;
        for (s, e) in self.map {
            let n = match &e.body {
                Body::Data(d) => d.len() as u64,
                Body::Zero => 0,
                Body::Chunk { .. } => REF_BYTES as u64,
            };
            if weight > 0 && weight + n > MAX_PATCH_DATA {
                out.push(std::mem::replace(&mut cur, Patch::new(self.disk_size)));
                weight = 0;
            }
            weight += n;
            if let Body::Data(d) = &e.body {
                cur.data_bytes += d.len() as u64;
            }
            cur.map.insert(s, e);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// The stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let refs = self.chunk_refs() as usize;
        let mut b = Vec::with_capacity(
            HEADER + self.map.len() * EXTENT + self.data_bytes as usize + refs * REF_BYTES,
        );
        let version = if refs > 0 { VERSION_REFS } else { VERSION };
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        b.extend_from_slice(&(self.map.len() as u64).to_le_bytes());
        for (&s, e) in &self.map {
            let kind: u64 = match e.body {
                Body::Data(_) => 0,
                Body::Zero => 1,
                Body::Chunk { .. } => 2,
            };
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&e.len.to_le_bytes());
            b.extend_from_slice(&kind.to_le_bytes());
        }
        for e in self.map.values() {
            match &e.body {
                Body::Data(d) => b.extend_from_slice(d),
                Body::Zero => {}
                Body::Chunk { id, from } => {
                    b.extend_from_slice(&id.0);
                    b.extend_from_slice(&from.to_le_bytes());
                }
            }
        }
        b
    }

    /// Parse the stored form; `what` names the object in errors.
    pub fn from_bytes(b: &[u8], what: &str) -> Result<Self> {
        let bad = |m: String| Error::corrupt_object(what.to_string(), m);
        if b.len() < HEADER || b[..4] != MAGIC {
            return Err(bad("not a patch (bad magic)".into()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let version = u32::from_le_bytes(b[4..8].try_into().unwrap_or([0; 4]));
        if version != VERSION && version != VERSION_REFS {
            return Err(bad(format!(
                "unsupported patch version {version} (this build reads 1 and 2)"
            )));
        }
        let disk_size = u64_at(8);
        let count = u64_at(16);
        let table_end = count
            .checked_mul(EXTENT as u64)
            .and_then(|n| n.checked_add(HEADER as u64))
            .filter(|&n| n <= b.len() as u64)
            .ok_or_else(|| bad(format!("extent table of {count} entries is truncated")))?
            as usize;
        let mut p = Patch::new(disk_size);
        let mut data_at = table_end;
        let mut prev_end = 0u64;
        for i in 0..count as usize {
            let o = HEADER + i * EXTENT;
            let (s, len, kind) = (u64_at(o), u64_at(o + 8), u64_at(o + 16));
            let end = s
                .checked_add(len)
                .filter(|&e| e <= disk_size && len > 0 && s >= prev_end)
                .ok_or_else(|| bad(format!("extent {i} ({s}+{len}) is invalid")))?;
            prev_end = end;
            let mut take = |n: usize| {
                let e = data_at
                    .checked_add(n)
                    .filter(|&e| e <= b.len())
                    .ok_or_else(|| bad(format!("data of extent {i} is truncated")))?;
                let r = &b[data_at..e];
                data_at = e;
                Ok::<_, Error>(r)
            };
            let body = match kind {
                0 => {
                    let d = Bytes::copy_from_slice(take(len as usize)?);
                    p.data_bytes += len;
                    Body::Data(d)
                }
                1 => Body::Zero,
                2 if version == VERSION_REFS => {
                    let r = take(REF_BYTES)?;
                    let mut id = [0u8; 32];
                    id.copy_from_slice(&r[..32]);
                    let from = u64::from_le_bytes(r[32..40].try_into().unwrap_or([0; 8]));
                    Body::Chunk {
                        id: ChunkId(id),
                        from,
                    }
                }
                k => return Err(bad(format!("extent {i} has unknown kind {k}"))),
            };
            p.map.insert(s, Ext { len, body });
        }
        if data_at != b.len() {
            return Err(bad(format!(
                "{} trailing bytes after the last extent",
                b.len() - data_at
            )));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const SIZE: u64 = 4400;
    const CS: u64 = 512;

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
        /// Chunk `ci` rewritten whole with the content of seed `s` (as a cut stores it).
        Refer(u64, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..4000, proptest::collection::vec(1u8..=255, 1..300))
                .prop_map(|(o, d)| Op::Write(o, d)),
            (0u64..4000, 1u64..300).prop_map(|(o, l)| Op::Zero(o, l)),
            (0u64..SIZE.div_ceil(CS), 1u8..=255).prop_map(|(c, s)| Op::Refer(c, s)),
        ]
    }

    fn ref_content(ci: u64, seed: u8) -> Vec<u8> {
        let len = (SIZE - ci * CS).min(CS) as usize;
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    fn ref_id(seed: u8, ci: u64) -> ChunkId {
        let mut id = [0xC0u8; 32];
        id[1] = seed;
        id[2] = ci as u8;
        id.iter_mut().skip(3).for_each(|b| *b = 0xC1);
        ChunkId(id)
    }

    proptest! {
        /// A patch (and its stored form, and its split pieces) overlays a buffer exactly as
        /// applying the operations one by one does; with chunk references, resolved against
        /// an index (whole ones into the index, partial ones read) it gives the same bytes.
        #[test]
        fn patch_matches_reference(ops in proptest::collection::vec(op(), 0..40),
                                   base in proptest::collection::vec(any::<u8>(), SIZE as usize)) {
            let size = SIZE;
            let mut model = base.clone();
            let mut p = Patch::new(size);
            let mut chunks: HashMap<ChunkId, Vec<u8>> = HashMap::new();
            let mut hit = vec![false; size as usize];
            let mut refs = false;
            for o in &ops {
                match o {
                    Op::Write(off, d) => {
                        p.write(*off, d).unwrap();
                        model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
                        hit[*off as usize..*off as usize + d.len()].fill(true);
                    }
                    Op::Zero(off, l) => {
                        p.zero(*off, *l).unwrap();
                        model[*off as usize..(*off + *l) as usize].fill(0);
                        hit[*off as usize..(*off + *l) as usize].fill(true);
                    }
                    Op::Refer(ci, seed) => {
                        let c = ref_content(*ci, *seed);
                        let id = ref_id(*seed, *ci);
                        let off = (ci * CS) as usize;
                        p.refer(ci * CS, c.len() as u64, id, 0).unwrap();
                        model[off..off + c.len()].copy_from_slice(&c);
                        hit[off..off + c.len()].fill(true);
                        chunks.insert(id, c);
                        refs = true;
                    }
                }
            }
            // `covers` agrees with the bytes: a window is covered iff every byte in it was
            // written, zeroed or referred to by some operation.
            for (a, b) in [(0u64, 4400u64), (0, 512), (512, 1024), (1000, 1100), (4000, 4400)] {
                prop_assert_eq!(p.covers(a, b), hit[a as usize..b as usize].iter().all(|&h| h));
            }
            let q = Patch::from_bytes(&p.to_bytes(), "t").unwrap();
            prop_assert_eq!(&q, &p);
            let mut pieces = Patch::new(size);
            for piece in p.clone().split() {
                pieces.merge(&piece).unwrap();
            }
            prop_assert_eq!(&pieces, &p);
            prop_assert_eq!(p.to_bytes()[4], if p.chunk_refs() > 0 { 2 } else { 1 });
            // Resolve: base chunks are in a store under their own ids.
            let mut index = DiskIndex::new(size, CS as u32).unwrap();
            for ci in 0..index.len() {
                let mut id = [0xB0u8; 32];
                id[1] = ci as u8;
                let id = ChunkId(id);
                index.set(ci, id).unwrap();
                let off = (ci * CS) as usize;
                chunks.insert(id, base[off..off + index.chunk_len(ci)].to_vec());
            }
            let mut r = p.clone();
            let (_, partial) = r.resolve_whole(&mut index).unwrap();
            for (off, len, id, from) in partial {
                let c = &chunks[&id];
                r.write(off, &c[from as usize..(from + len) as usize]).unwrap();
            }
            prop_assert_eq!(r.chunk_refs(), 0);
            let mut got: Vec<u8> = Vec::new();
            for ci in 0..index.len() {
                got.extend_from_slice(&chunks[&index.get(ci).unwrap()]);
            }
            r.apply(0, &mut got).unwrap();
            prop_assert_eq!(&got, &model);
            // Applied piecewise (as chunks are).
            let mut got2: Vec<u8> = Vec::new();
            for ci in 0..index.len() {
                let mut c = chunks[&index.get(ci).unwrap()].clone();
                r.apply(ci * CS, &mut c).unwrap();
                got2.extend_from_slice(&c);
            }
            prop_assert_eq!(&got2, &model);
            if !refs {
                let mut got3 = base.clone();
                p.apply(0, &mut got3).unwrap();
                prop_assert_eq!(&got3, &model);
            }
            // Taking whole chunks out and referring to them instead keeps the content.
            let mut t = r.clone();
            let taken = t.take_whole_chunks(CS).unwrap();
            for (ci, c) in &taken {
                prop_assert!(!t.touches(ci * CS, ci * CS + c.len() as u64, false));
                let id = ref_id(0, *ci);
                t.refer(ci * CS, c.len() as u64, id, 0).unwrap();
                chunks.insert(id, c.to_vec());
            }
            let mut index2 = DiskIndex::new(size, CS as u32).unwrap();
            for ci in 0..index.len() {
                index2.set(ci, index.get(ci).unwrap()).unwrap();
            }
            let (n, partial) = t.resolve_whole(&mut index2).unwrap();
            prop_assert_eq!(n as usize, taken.len());
            prop_assert!(partial.is_empty());
            let mut got4: Vec<u8> = Vec::new();
            for ci in 0..index2.len() {
                got4.extend_from_slice(&chunks[&index2.get(ci).unwrap()]);
            }
            t.apply(0, &mut got4).unwrap();
            prop_assert_eq!(&got4, &model);
            let stored: u64 = p.map.values().filter_map(|e| match &e.body { Body::Data(d) => Some(d.len() as u64), _ => None }).sum();
            prop_assert_eq!(stored, p.data_bytes());
        }
    }

    /// A chunk one write covers leaves the patch as a slice of that write's buffer (no copy);
    /// one pieced together from several writes is assembled; a partly written one stays.
    #[test]
    fn whole_chunks_leave_as_slices_of_the_written_buffers() {
        let mut p = Patch::new(4 * CS);
        let big = Bytes::from(vec![7u8; 2 * CS as usize]);
        p.write_bytes(CS, big.clone()).unwrap();
        p.write(0, &[1; 100]).unwrap();
        p.write(100, &[2; (CS - 100) as usize]).unwrap();
        p.write(3 * CS, &[3; 10]).unwrap();
        // A later write over part of the big one carves it by slicing, not copying.
        p.write(CS + 10, &[9; 5]).unwrap();
        let taken = p.take_whole_chunks(CS).unwrap();
        let idx: Vec<u64> = taken.iter().map(|(ci, _)| *ci).collect();
        assert_eq!(idx, vec![0, 1, 2]);
        assert_eq!(&taken[0].1[..100], &[1; 100][..]);
        assert_eq!(&taken[0].1[100..], &[2; (CS - 100) as usize][..]);
        assert_eq!(
            &taken[1].1[10..15],
            &[9; 5][..],
            "chunk 1 is pieced: assembled"
        );
        assert_eq!(
            taken[2].1.as_ptr(),
            big[CS as usize..].as_ptr(),
            "chunk 2 was copied"
        );
        assert_eq!(taken[2].1.len() as u64, CS);
        assert_eq!(p.data_bytes(), 10);
        assert_eq!(p.extent_count(), 1);
        // Without the later write, chunk 1 is a slice of the big write too.
        let mut q = Patch::new(4 * CS);
        q.write_bytes(CS, big.clone()).unwrap();
        let taken = q.take_whole_chunks(CS).unwrap();
        assert_eq!(taken[0].1.as_ptr(), big.as_ptr());
        assert!(q.is_empty());
    }

    #[test]
    fn rejects_bad_input() {
        let mut p = Patch::new(100);
        assert!(p.write(90, &[1; 20]).is_err());
        assert!(p.zero(u64::MAX, 2).is_err());
        assert!(p.refer(64, 64, ChunkId([1; 32]), 0).is_err());
        p.write(10, &[1; 10]).unwrap();
        let mut b = p.to_bytes();
        assert!(Patch::from_bytes(&b[..b.len() - 1], "x").is_err());
        b[0] = b'X';
        assert!(Patch::from_bytes(&b, "x").is_err());
        // A chunk extent in a version-1 object is refused; an unresolved one is not applied.
        p.refer(32, 32, ChunkId([1; 32]), 0).unwrap();
        let mut b = p.to_bytes();
        assert!(Patch::from_bytes(&b, "x").is_ok());
        b[4] = 1;
        assert!(Patch::from_bytes(&b, "x").is_err());
        assert!(p.apply(0, &mut [0u8; 100]).is_err());
    }
}
