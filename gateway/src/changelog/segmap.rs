//! A writable shared mapping of the active segment: the inline path's records without data
//! (a deferred small write's or a large write's extent, 40 bytes each) are copied into the
//! log's page cache through it, without a system call.
//!
//! **Why.** On the random 4 KiB row the 40-byte record's `pwritev` was 11.7 % of the server's
//! samples (BENCHMARKS.md, "The writer thread defers small writes too"); a loop of 40-byte
//! appends into a zero-filled 64 MiB file took 1.29–1.34 µs per `pwritev` and 0.006 µs per
//! copy into a shared mapping of it (0.05–0.06 µs when every page had been written back and
//! write-protected, as after a log sync). The copy lands in the same page cache as a
//! `pwritev`, so nothing else changes: the record is in the log's page cache before the image
//! changes (a process crash loses nothing), `fdatasync` of the segment writes it back (Linux
//! write-protects a shared mapping's pages when it writes them back, and the next copy
//! dirties them again), reads of the file see it.
//!
//! **When a copy is allowed** (anything else takes the `pwritev`): only bytes the file
//! already holds *as written blocks* — below the zeroes the log writes ahead of its records
//! (`Active::fill_ahead`, which the mapped path calls when a record does not fit below them).
//! A copy into a mapping past the file's end, or into a block the file system must allocate
//! when the page is first written, raises `SIGBUS` on a full file system; an overwrite in
//! place of written blocks allocates nothing. So the mapping is made only on file systems
//! that overwrite in place (ext2/3/4, XFS, tmpfs: [`supported`]); on copy-on-write ones
//! (Btrfs, ZFS, bcachefs), which may need new space for any write, records keep the
//! `pwritev`. The file never shrinks while it is mapped: a segment is truncated only when it
//! is sealed, after it was retired, and the mapping is dropped when it is retired. An admin
//! truncating the active segment of a running log would make the next copy kill the
//! gateway (`SIGBUS`); recovery then treats it as any crash.
//!
//! **What user space does with the mapping**: copies bytes into it (`ptr::copy_nonoverlapping`
//! from a buffer of the caller's), never reads it and never makes a Rust reference to it
//! (firecracker's rule for guest memory): the kernel writes the same pages back at any time.
//! Every copy is made under the log's append lock, so two copies never touch the same bytes at
//! once, and a `pwritev` of the same segment is made under the same lock.
//!
//! **Resident set.** Pages the copies touch count in the process's resident size (file
//! pages). Each time the zeroes ahead are extended, the page tables of the part behind the
//! records are dropped (`MADV_DONTNEED`, which for a shared file mapping only unmaps: the
//! page cache keeps the data, dirty or not), so a disk's mapping keeps about [`DROP_STEP`]
//! plus the zeroes ahead mapped, whatever the segment size.

use std::fs::File;
use std::io;
use std::path::Path;
use std::ptr::NonNull;

use crate::mapped::{map_shared, page_size};

/// Page tables behind the records are dropped when at least this many bytes are mapped
/// behind them.
pub const DROP_STEP: u64 = 1 << 20;

/// A writable shared mapping of the first `len` bytes of a segment file.
pub struct SegMap {
    base: NonNull<u8>,
    len: usize,
    /// Page tables below this offset were dropped.
    dropped: u64,
    /// The start of the lowest page a copy may have mapped since (`None`: no copy above
    /// `dropped`), and the end of the copies.
    copied_from: Option<u64>,
    copied_end: u64,
}

// SAFETY: `SegMap` owns an address range of a `MAP_SHARED` mapping that lives until its
// `Drop`. Rust code never reads the bytes and never makes a reference to them; `write`
// copies into them from a caller's buffer and is called only under the log's append lock
// (`&mut self`), so no two threads copy at once. Moving it to another thread moves an address.
unsafe impl Send for SegMap {}

/// Whether the log directory `dir` lies on a file system that overwrites written blocks in
/// place (see the module documentation): ext2/3/4, XFS or tmpfs.
pub fn supported(dir: &Path) -> bool {
    const EXT_MAGIC: i64 = 0xEF53;
    const XFS_MAGIC: i64 = 0x5846_5342;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero `statfs` is a valid value of a plain C struct of integers.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a `statfs` the call fills; both outlive the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let magic = s.f_type as i64;
    matches!(magic, EXT_MAGIC | XFS_MAGIC | TMPFS_MAGIC)
}

impl SegMap {
    /// Maps the first `len` bytes of `file` (a segment opened read-write) shared and
    /// writable. Nothing is copied until [`Self::write`] is called.
    pub fn new(file: &File, len: u64) -> io::Result<Self> {
        let (base, len) = map_shared(file, len, libc::PROT_WRITE)?;
        Ok(Self {
            base,
            len,
            dropped: 0,
            copied_from: None,
            copied_end: 0,
        })
    }

    /// Copies `parts`, one after the other, to offset `pos` of the file if they lie inside
    /// the mapping and below `written` — the end of the bytes the file holds as written
    /// blocks (the caller's zeroes ahead); `false`, nothing copied, otherwise.
    pub fn write(&mut self, pos: u64, parts: &[&[u8]], written: u64) -> bool {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let Some(end) = pos.checked_add(total) else {
            return false;
        };
        if end > written || end > self.len as u64 {
            return false;
        }
        let mut at = pos as usize;
        for p in parts {
            // SAFETY: `[at, at + p.len())` lies inside `[pos, end)`, which is inside the
            // mapping (`end <= self.len`, checked above) and below `written`, so the file
            // holds written blocks there and is at least that long (it never shrinks while
            // mapped: see the module documentation) — the copy cannot fault past the file's
            // end nor need new space. The source is the caller's buffer, which cannot overlap
            // a shared file mapping; no reference to the mapping is made.
            unsafe {
                std::ptr::copy_nonoverlapping(p.as_ptr(), self.base.as_ptr().add(at), p.len());
            }
            at += p.len();
        }
        let page = (pos / page_size() as u64) * page_size() as u64;
        self.copied_from = Some(self.copied_from.map_or(page, |f| f.min(page)));
        self.copied_end = self.copied_end.max(end);
        true
    }

    /// No page of the file below this offset is mapped by this mapping: the page cache may
    /// free those pages (see `DROP_SPAN` in the log); pages above it may be mapped.
    pub fn mapped_from(&self) -> u64 {
        self.copied_from.unwrap_or(u64::MAX)
    }

    /// Drops the page tables of the whole pages below `upto` (the records' end) once at
    /// least [`DROP_STEP`] bytes are mapped behind it (see "Resident set"). The page cache
    /// keeps the pages, dirty or clean.
    pub fn drop_behind(&mut self, upto: u64) {
        let page = page_size() as u64;
        let upto = (upto.min(self.len as u64) / page) * page;
        if upto < self.dropped + DROP_STEP {
            return;
        }
        // SAFETY: `[dropped, upto)` is page-aligned (`dropped` is 0 or an earlier `upto`) and
        // inside the mapping; `MADV_DONTNEED` on a shared file mapping unmaps the pages and
        // leaves their data (and dirty state) in the page cache. No reference to the range
        // exists.
        let r = unsafe {
            libc::madvise(
                self.base.as_ptr().add(self.dropped as usize).cast(),
                (upto - self.dropped) as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r == 0 {
            self.dropped = upto;
            self.copied_from = match self.copied_end > upto {
                true => self.copied_from.map(|f| f.max(upto)),
                false => None,
            };
        }
    }
}

impl Drop for SegMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; nothing refers to it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn copies_land_in_the_file_and_only_below_the_written_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&vec![0u8; 3 << 20], 0).unwrap();
        let mut m = SegMap::new(&f, 4 << 20).unwrap();
        assert!(m.write(100, &[b"head", b"tail"], 3 << 20));
        // Past the written end, and past the mapping: refused, nothing copied.
        assert!(!m.write((3 << 20) - 4, &[b"12345"], 3 << 20));
        assert!(!m.write((4 << 20) - 2, &[b"abc"], 8 << 20));
        let mut got = [0u8; 8];
        f.read_exact_at(&mut got, 100).unwrap();
        assert_eq!(&got, b"headtail");
        let mut end = [9u8; 4];
        f.read_exact_at(&mut end, (3 << 20) - 4).unwrap();
        assert_eq!(end, [0u8; 4]);
        // Dropping the page tables keeps the data; later copies still land.
        assert_eq!(m.mapped_from(), 0, "a copy maps its page");
        m.drop_behind(2 << 20);
        assert_eq!(m.dropped, 2 << 20);
        assert_eq!(m.mapped_from(), u64::MAX, "every copied page was unmapped");
        assert!(m.write(200, &[b"again"], 3 << 20));
        assert_eq!(m.mapped_from(), 0);
        drop(m);
        let mut got = [0u8; 5];
        f.read_exact_at(&mut got, 200).unwrap();
        assert_eq!(&got, b"again");
        f.read_exact_at(&mut got[..4], 100).unwrap();
        assert_eq!(&got[..4], b"head");
    }
}
