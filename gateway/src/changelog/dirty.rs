//! The dirty-chunk bitmap: what changed while the change log could not record.
//!
//! When a log overflows (its file system nearly full) writes keep working unlogged; each one
//! sets the bits of the 64 KiB grains it touches here, so the resynchronization that follows
//! hashes and sends only those grains instead of the whole disk (as DRBD's bitmap does).
//!
//! The bitmap is kept in memory and written to `dirty.bitmap` in the log directory at every
//! flush and at clean shutdown. The file carries a *trusted* byte: the first bit set after a
//! save clears it on disk, a save sets it again. So after a crash that lost bits the file says
//! "untrusted" and the resync falls back to hashing the whole disk.
//!
//! File layout: magic `SBDM` (4), trusted (1), 3 reserved, grain size u64 LE, disk size u64
//! LE, then the bitmap as u64 LE words (bit i of word w = grain 64·w + i).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::catalog::write_atomic;

/// Bitmap granularity.
pub const DIRTY_GRAIN: u64 = 64 * 1024;
/// File name inside the log directory.
pub const DIRTY_FILE: &str = "dirty.bitmap";
const MAGIC: [u8; 4] = *b"SBDM";
const HEADER: usize = 24;
const TRUSTED_AT: u64 = 4;

/// See the module documentation.
#[derive(Debug)]
pub struct DirtyMap {
    path: PathBuf,
    disk_size: u64,
    words: Vec<AtomicU64>,
    marks: AtomicU64,
    /// The file on disk says "trusted" and no bit was set since.
    armed: AtomicBool,
    /// The state when opened: false if the file was missing, unreadable or untrusted.
    loaded_trusted: bool,
    io: Mutex<()>,
}

impl DirtyMap {
    /// Loads `dir/dirty.bitmap` (an empty, trusted map if there is none and `fresh`).
    pub fn open(dir: &Path, disk_size: u64, fresh: bool) -> Self {
        let path = dir.join(DIRTY_FILE);
        let n = disk_size.div_ceil(DIRTY_GRAIN).div_ceil(64) as usize;
        let mut words: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let loaded_trusted = match std::fs::read(&path) {
            Ok(b) => parse(&b, disk_size, &mut words).unwrap_or(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => fresh,
            Err(_) => false,
        };
        DirtyMap {
            path,
            disk_size,
            words,
            marks: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            loaded_trusted,
            io: Mutex::new(()),
        }
    }

    /// Whether the bitmap can be believed: it was saved after every bit it lost.
    pub fn trusted(&self) -> bool {
        self.loaded_trusted
    }

    /// Marks `[offset, offset+len)` dirty.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let first = offset / DIRTY_GRAIN;
        let last = (offset.saturating_add(len).min(self.disk_size) - 1) / DIRTY_GRAIN;
        for g in first..=last {
            if let Some(w) = self.words.get((g / 64) as usize) {
                w.fetch_or(1 << (g % 64), Ordering::Relaxed);
            }
        }
        self.marks.fetch_add(1, Ordering::AcqRel);
        if self.armed.swap(false, Ordering::AcqRel) {
            self.write_untrusted();
        }
    }

    fn write_untrusted(&self) {
        let _g = self.io.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(f) = OpenOptions::new().write(true).open(&self.path) {
            let _ = f.write_all_at(&[0], TRUSTED_AT);
        }
    }

    /// Writes the bitmap (trusted) to its file.
    pub fn save(&self) -> io::Result<()> {
        let _g = self.io.lock().unwrap_or_else(|p| p.into_inner());
        let g0 = self.marks.load(Ordering::Acquire);
        let mut b = Vec::with_capacity(HEADER + self.words.len() * 8);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&[1, 0, 0, 0]);
        b.extend_from_slice(&DIRTY_GRAIN.to_le_bytes());
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        for w in &self.words {
            b.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        write_atomic(&self.path, &b)?;
        self.armed.store(true, Ordering::Release);
        if self.marks.load(Ordering::Acquire) != g0 && self.armed.swap(false, Ordering::AcqRel) {
            let f = File::options().write(true).open(&self.path)?;
            f.write_all_at(&[0], TRUSTED_AT)?;
        }
        Ok(())
    }

    /// Clears every bit and saves (after a resynchronization sent everything).
    pub fn clear(&self) -> io::Result<()> {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
        self.save()
    }

    /// Fraction of the disk's grains marked dirty (0 while the log records every change).
    /// A scan of the in-memory bitmap (16 Ki words for 64 GiB): no I/O.
    pub fn dirty_ratio(&self) -> f64 {
        let set: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        set as f64 / self.disk_size.div_ceil(DIRTY_GRAIN).max(1) as f64
    }

    /// True if no bit is set.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }

    /// Indexes of the `chunk_size`-byte chunks that hold a dirty grain.
    pub fn dirty_chunks(&self, chunk_size: u64) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for (wi, w) in self.words.iter().enumerate() {
            let mut v = w.load(Ordering::Relaxed);
            while v != 0 {
                let bit = v.trailing_zeros() as u64;
                v &= v - 1;
                let g = wi as u64 * 64 + bit;
                let start = g * DIRTY_GRAIN;
                let end = (start + DIRTY_GRAIN).min(self.disk_size);
                out.extend(start / chunk_size..=(end - 1) / chunk_size);
            }
        }
        out
    }
}

fn parse(b: &[u8], disk_size: u64, words: &mut [AtomicU64]) -> Option<bool> {
    if b.len() != HEADER + words.len() * 8 || b[..4] != MAGIC {
        return None;
    }
    let grain = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let size = u64::from_le_bytes(b[16..24].try_into().ok()?);
    if grain != DIRTY_GRAIN || size != disk_size {
        return None;
    }
    for (i, w) in words.iter_mut().enumerate() {
        let o = HEADER + i * 8;
        *w.get_mut() = u64::from_le_bytes(b[o..o + 8].try_into().ok()?);
    }
    Some(b[TRUSTED_AT as usize] == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_save_and_a_lost_save_is_untrusted() {
        let d = tempfile::tempdir().unwrap();
        let size = 10 * DIRTY_GRAIN + 100;
        let m = DirtyMap::open(d.path(), size, true);
        assert!(m.trusted() && m.is_clean());
        m.mark(DIRTY_GRAIN * 3 + 5, 10);
        m.mark(size - 1, 1);
        m.save().unwrap();
        let m2 = DirtyMap::open(d.path(), size, false);
        assert!(m2.trusted());
        assert_eq!(
            m2.dirty_chunks(DIRTY_GRAIN).into_iter().collect::<Vec<_>>(),
            vec![3, 10]
        );
        // A mark after the save that is never saved: the file now says untrusted.
        m.mark(0, 1);
        let m3 = DirtyMap::open(d.path(), size, false);
        assert!(!m3.trusted());
        // No file at all: trusted only for a fresh log.
        let e = tempfile::tempdir().unwrap();
        assert!(!DirtyMap::open(e.path(), size, false).trusted());
        assert_eq!(
            m2.dirty_chunks(4 * DIRTY_GRAIN)
                .into_iter()
                .collect::<Vec<_>>(),
            vec![0, 2]
        );
    }
}
