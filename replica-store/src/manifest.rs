//! The fixed index (manifest) of one disk in one recovery point: one chunk id per chunk of the
//! disk, [`ChunkId::ZERO`] for holes.
//!
//! Serialized form (inside an `SBIX` envelope, little-endian):
//! `"SBIXDATA"`, version u32 (1), disk size u64, chunk size u32, chunk count u64,
//! count × 32-byte ids, SHA-256 over all ids (32 bytes).

use sha2::{Digest, Sha256};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};

const INDEX_TAG: &[u8; 8] = b"SBIXDATA";
const INDEX_VERSION: u32 = 1;
const FIXED_LEN: usize = 8 + 4 + 8 + 4 + 8;

/// Chunk index of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIndex {
    disk_size: u64,
    chunk_size: u32,
    entries: Vec<ChunkId>,
}

impl DiskIndex {
    /// An index of a disk of `disk_size` bytes made only of holes.
    pub fn new(disk_size: u64, chunk_size: u32) -> Result<Self> {
        if chunk_size == 0 {
            return Err(Error::InvalidArgument("chunk size 0".into()));
        }
        let n = disk_size.div_ceil(chunk_size as u64);
        Ok(DiskIndex {
            disk_size,
            chunk_size,
            entries: vec![ChunkId::ZERO; n as usize],
        })
    }

    /// Disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// True for a zero-sized disk.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Id of chunk `i`.
    pub fn get(&self, i: u64) -> Option<ChunkId> {
        self.entries.get(i as usize).copied()
    }

    /// All ids.
    pub fn entries(&self) -> &[ChunkId] {
        &self.entries
    }

    /// Replace chunk `i`'s id.
    pub fn set(&mut self, i: u64, id: ChunkId) -> Result<()> {
        let n = self.entries.len();
        let slot = self.entries.get_mut(i as usize).ok_or_else(|| {
            Error::InvalidArgument(format!("chunk index {i} out of range ({n} chunks)"))
        })?;
        *slot = id;
        Ok(())
    }

    /// Byte offset of chunk `i`.
    pub fn chunk_offset(&self, i: u64) -> u64 {
        i * self.chunk_size as u64
    }

    /// Length of chunk `i` (the last chunk may be short).
    pub fn chunk_len(&self, i: u64) -> usize {
        let off = self.chunk_offset(i);
        (self.disk_size.saturating_sub(off)).min(self.chunk_size as u64) as usize
    }

    /// Change the disk size; new chunks are holes, dropped chunks disappear. A partial last
    /// chunk whose length changes becomes a hole only if it was one; otherwise the caller must
    /// rewrite it (its length, and so its id, changes).
    pub fn resize(&mut self, new_size: u64) -> Vec<u64> {
        let old_last = self.entries.len().checked_sub(1);
        self.disk_size = new_size;
        let n = new_size.div_ceil(self.chunk_size as u64) as usize;
        self.entries.resize(n, ChunkId::ZERO);
        // Chunks whose length changed and that are not holes must be rewritten by the caller.
        let mut stale = Vec::new();
        if let Some(l) = old_last {
            if l < n && !self.entries[l].is_zero() {
                stale.push(l as u64);
            }
        }
        if let Some(last) = n.checked_sub(1) {
            if !self.entries[last].is_zero() && !stale.contains(&(last as u64)) {
                stale.push(last as u64);
            }
        }
        stale
    }

    /// Number of non-hole chunks.
    pub fn data_chunks(&self) -> u64 {
        self.entries.iter().filter(|e| !e.is_zero()).count() as u64
    }

    /// SHA-256 over all ids (recorded in the point and in the index itself).
    pub fn checksum(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for e in &self.entries {
            h.update(e.0);
        }
        h.finalize().into()
    }

    /// Serialize.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FIXED_LEN + 32 * self.entries.len() + 32);
        v.extend_from_slice(INDEX_TAG);
        v.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        v.extend_from_slice(&self.disk_size.to_le_bytes());
        v.extend_from_slice(&self.chunk_size.to_le_bytes());
        v.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            v.extend_from_slice(&e.0);
        }
        v.extend_from_slice(&self.checksum());
        v
    }

    /// Parse and check a serialized index. `key` names the object in errors.
    pub fn from_bytes(b: &[u8], key: &str) -> Result<Self> {
        let bad = |r: &str| Error::corrupt_object(key, r.to_string());
        if b.len() < FIXED_LEN + 32 || &b[..8] != INDEX_TAG {
            return Err(bad("not an index"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(8) != INDEX_VERSION {
            return Err(bad("unknown index version"));
        }
        let disk_size = u64_at(12);
        let chunk_size = u32_at(20);
        let count = u64_at(24);
        if chunk_size == 0 || disk_size.div_ceil(chunk_size as u64) != count {
            return Err(bad("inconsistent disk size / chunk size / count"));
        }
        let expect = (count as usize)
            .checked_mul(32)
            .and_then(|x| x.checked_add(FIXED_LEN + 32))
            .ok_or_else(|| bad("implausible count"))?;
        if b.len() != expect {
            return Err(bad("length does not match chunk count"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for c in b[FIXED_LEN..FIXED_LEN + 32 * count as usize].chunks_exact(32) {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            entries.push(ChunkId(a));
        }
        let idx = DiskIndex {
            disk_size,
            chunk_size,
            entries,
        };
        if idx.checksum()[..] != b[expect - 32..] {
            return Err(bad("checksum over chunk ids does not match"));
        }
        Ok(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut i = DiskIndex::new(10 * 1024 + 5, 1024).unwrap();
        assert_eq!(i.len(), 11);
        assert_eq!(i.chunk_len(10), 5);
        i.set(3, ChunkId([7; 32])).unwrap();
        let b = i.to_bytes();
        assert_eq!(DiskIndex::from_bytes(&b, "k").unwrap(), i);
        let mut bad = b.clone();
        bad[FIXED_LEN + 3 * 32] ^= 1;
        assert!(DiskIndex::from_bytes(&bad, "k").is_err());
        assert!(i.set(11, ChunkId::ZERO).is_err());
    }
}
