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
//! A patch object is stored like a chunk (same envelope: compression, encryption, id = digest
//! of the plaintext, verified on every read), under `chunks/`, so dedup, GC and verification
//! treat it like any other chunk. Its plaintext:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `SBPA` |
//! | 4 | format version (1), little endian |
//! | 8 | disk size |
//! | 8 | extent count N |
//! | N × 24 | extents: offset u64, length u64, kind u64 (0 data, 1 zeroes) |
//! | … | data of the data extents, in extent order |

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};

const MAGIC: [u8; 4] = *b"SBPA";
const VERSION: u32 = 1;
const HEADER: usize = 24;
const EXTENT: usize = 24;

/// Largest amount of data one patch object holds; a bigger interval is split into several.
pub const MAX_PATCH_DATA: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ext {
    len: u64,
    /// `None`: zeroes.
    data: Option<Vec<u8>>,
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

    /// Bytes of data held (zero extents hold none).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
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

    /// Record a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check(offset, data.len() as u64)?;
        self.carve(offset, offset + data.len() as u64);
        self.data_bytes += data.len() as u64;
        self.map.insert(
            offset,
            Ext {
                len: data.len() as u64,
                data: Some(data.to_vec()),
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
        self.carve(offset, offset + len);
        self.map.insert(offset, Ext { len, data: None });
        Ok(())
    }

    /// Apply every extent of `other` over this patch (`other` is newer).
    pub fn merge(&mut self, other: &Patch) -> Result<()> {
        for (&off, e) in &other.map {
            match &e.data {
                Some(d) => self.write(off, d)?,
                None => self.zero(off, e.len)?,
            }
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
            if let Some(d) = &e.data {
                self.data_bytes -= d.len() as u64;
            }
            if s < start {
                let keep = (start - s) as usize;
                let data = e.data.as_ref().map(|d| d[..keep].to_vec());
                self.data_bytes += data.as_ref().map_or(0, |d| d.len() as u64);
                self.map.insert(
                    s,
                    Ext {
                        len: keep as u64,
                        data,
                    },
                );
            }
            if eend > end {
                let from = (end - s) as usize;
                let data = e.data.as_ref().map(|d| d[from..].to_vec());
                self.data_bytes += data.as_ref().map_or(0, |d| d.len() as u64);
                self.map.insert(
                    end,
                    Ext {
                        len: eend - end,
                        data,
                    },
                );
            }
        }
    }

    /// Overlay the patch on `buf`, which holds the disk's bytes from `start`.
    pub fn apply(&self, start: u64, buf: &mut [u8]) {
        let end = start + buf.len() as u64;
        let mut first = start;
        if let Some((&s, e)) = self.map.range(..start).next_back() {
            if s + e.len > start {
                first = s;
            }
        }
        for (&s, e) in self.map.range(first..end) {
            let a = s.max(start);
            let b = (s + e.len).min(end);
            if a >= b {
                continue;
            }
            let dst = &mut buf[(a - start) as usize..(b - start) as usize];
            match &e.data {
                Some(d) => dst.copy_from_slice(&d[(a - s) as usize..(b - s) as usize]),
                None => dst.fill(0),
            }
        }
    }

    /// True if any extent intersects `[start, end)`; `data_only` ignores zero extents.
    pub fn touches(&self, start: u64, end: u64, data_only: bool) -> bool {
        let mut first = start;
        if let Some((&s, e)) = self.map.range(..start).next_back() {
            if s + e.len > start {
                first = s;
            }
        }
        self.map
            .range(first..end)
            .any(|(&s, e)| s + e.len > start && (!data_only || e.data.is_some()))
    }

    /// True if data or zero extents cover all of `[start, end)` (no byte of the base shows).
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        let mut first = start;
        if let Some((&s, e)) = self.map.range(..start).next_back() {
            if s + e.len > start {
                first = s;
            }
        }
        for (&s, e) in self.map.range(first..end) {
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

    /// The extents in offset order: (offset, length, data or `None` for zeroes).
    pub fn extents(&self) -> impl Iterator<Item = (u64, u64, Option<&[u8]>)> + '_ {
        self.map.iter().map(|(&s, e)| (s, e.len, e.data.as_deref()))
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

    /// Split into patches of at most [`MAX_PATCH_DATA`] data bytes each (extents whole, so one
    /// huge write may exceed it alone). Their extents are disjoint, so their order is free.
    pub fn split(self) -> Vec<Patch> {
        let mut out = Vec::new();
        let mut cur = Patch::new(self.disk_size);
        for (s, e) in self.map {
            let n = e.data.as_ref().map_or(0, |d| d.len() as u64);
            if cur.data_bytes > 0 && cur.data_bytes + n > MAX_PATCH_DATA {
                out.push(std::mem::replace(&mut cur, Patch::new(self.disk_size)));
            }
            cur.data_bytes += n;
            cur.map.insert(s, e);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// The stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.map.len() * EXTENT + self.data_bytes as usize);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        b.extend_from_slice(&(self.map.len() as u64).to_le_bytes());
        for (&s, e) in &self.map {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&e.len.to_le_bytes());
            b.extend_from_slice(&(u64::from(e.data.is_none())).to_le_bytes());
        }
        for e in self.map.values() {
            if let Some(d) = &e.data {
                b.extend_from_slice(d);
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
        if version != VERSION {
            return Err(bad(format!("unsupported patch version {version}")));
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
            let data = match kind {
                0 => {
                    let e = data_at
                        .checked_add(len as usize)
                        .filter(|&e| e <= b.len())
                        .ok_or_else(|| bad(format!("data of extent {i} is truncated")))?;
                    let d = b[data_at..e].to_vec();
                    data_at = e;
                    p.data_bytes += len;
                    Some(d)
                }
                1 => None,
                k => return Err(bad(format!("extent {i} has unknown kind {k}"))),
            };
            p.map.insert(s, Ext { len, data });
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

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..4000, proptest::collection::vec(1u8..=255, 1..300))
                .prop_map(|(o, d)| Op::Write(o, d)),
            (0u64..4000, 1u64..300).prop_map(|(o, l)| Op::Zero(o, l)),
        ]
    }

    proptest! {
        /// A patch (and its stored form, and its split pieces) overlays a buffer exactly as
        /// applying the operations one by one does.
        #[test]
        fn patch_matches_reference(ops in proptest::collection::vec(op(), 0..40),
                                   base in proptest::collection::vec(any::<u8>(), 4400)) {
            let size = 4400u64;
            let mut model = base.clone();
            let mut p = Patch::new(size);
            for o in &ops {
                match o {
                    Op::Write(off, d) => {
                        p.write(*off, d).unwrap();
                        model[*off as usize..*off as usize + d.len()].copy_from_slice(d);
                    }
                    Op::Zero(off, l) => {
                        p.zero(*off, *l).unwrap();
                        model[*off as usize..(*off + *l) as usize].fill(0);
                    }
                }
            }
            let mut got = base.clone();
            p.apply(0, &mut got);
            prop_assert_eq!(&got, &model);
            // `covers` agrees with the bytes: a window is covered iff every byte in it was
            // written or zeroed by some operation.
            let mut hit = vec![false; size as usize];
            for o in &ops {
                let (off, l) = match o {
                    Op::Write(off, d) => (*off, d.len() as u64),
                    Op::Zero(off, l) => (*off, *l),
                };
                hit[off as usize..(off + l) as usize].fill(true);
            }
            for (a, b) in [(0u64, 4400u64), (0, 512), (512, 1024), (1000, 1100), (4000, 4400)] {
                prop_assert_eq!(p.covers(a, b), hit[a as usize..b as usize].iter().all(|&h| h));
            }
            // Applied piecewise (as chunks are).
            let mut got2 = base.clone();
            for (i, c) in got2.chunks_mut(512).enumerate() {
                p.apply(i as u64 * 512, c);
            }
            prop_assert_eq!(&got2, &model);
            let q = Patch::from_bytes(&p.to_bytes(), "t").unwrap();
            prop_assert_eq!(&q, &p);
            let mut got3 = base.clone();
            for piece in p.clone().split() {
                piece.apply(0, &mut got3);
            }
            prop_assert_eq!(&got3, &model);
            let stored: u64 = p.map.values().filter_map(|e| e.data.as_ref()).map(|d| d.len() as u64).sum();
            prop_assert_eq!(stored, p.data_bytes());
        }
    }

    #[test]
    fn rejects_bad_input() {
        let mut p = Patch::new(100);
        assert!(p.write(90, &[1; 20]).is_err());
        assert!(p.zero(u64::MAX, 2).is_err());
        p.write(10, &[1; 10]).unwrap();
        let mut b = p.to_bytes();
        assert!(Patch::from_bytes(&b[..b.len() - 1], "x").is_err());
        b[0] = b'X';
        assert!(Patch::from_bytes(&b, "x").is_err());
    }
}
