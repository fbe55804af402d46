//! A disk image mapped into memory, for NBD reads the kernel copies straight from the page
//! cache into the socket (one copy where `pread` + `writev` make two).
//!
//! Nothing in user space ever reads or writes the mapping, which is read-only: ranges leave
//! here as [`MappedRead`]s, which the NBD server only hands to `writev`. If the image shrinks
//! under the mapping, the kernel's copy fails with `EFAULT` instead of the process taking
//! `SIGBUS`: the read's connection closes.
//!
//! A range is offered only when the socket write will not wait for the disk and the reply
//! does not need to look inside it:
//! - it is at least [`MAPPED_READ_MIN`] bytes (below that, copying is cheaper than the checks);
//! - every page of it is in the page cache (`mincore`), so the copy does not block a worker
//!   thread on disk reads (a page evicted after the check is read in by the copy);
//! - it holds no hole (`SEEK_HOLE`), so a structured reply loses nothing by sending it as
//!   one data chunk (holes still go out as `OFFSET_HOLE` through the ordinary path).
//!
//! Writes do not use the mapping (they did until 2026-12-04, for 64 KiB and more, copied in by
//! `process_vm_readv`). That paid off while the mapping kept its pages mapped, so later writes
//! found them dirty and writable; with the resident bound below, a pass over an image larger
//! than the bound faults every page again, and each write fault prepares the page's whole
//! folio in the file system. Measured on 1 MiB sequential writes into a cached 512 MiB image,
//! one process per build alternated ABBA: `pwrite` 3,208–3,339 MB/s at 0.40–0.41 s of server
//! CPU per GB, the mapping 2,879–3,088 MB/s at 0.42–0.46; after random 4 KiB writes,
//! 3,247–3,318 against 2,866–2,933.
//!
//! The kernel fills the process's page tables as it copies, and mapped pages count in the
//! process's resident size (and its OOM score). After every [`MAP_CHECK_BYTES`] of mapped
//! reads a map looks at the process's resident file pages; past [`RESIDENT_LIMIT`] it drops
//! its page tables (`MADV_DONTNEED`, which for a shared file mapping only unmaps: the page
//! cache keeps the data). So the gateway's file pages stay under the limit plus one check
//! interval per busy disk, whatever the disks' sizes. (An earlier build allowed an eighth of
//! RAM: after one 2 GiB pass the gateway held 2.1 GB of file pages, and the random 4 KiB
//! writes that followed ran 0.76–0.82× nbdkit's rate where a fresh process ran 1.2–1.3×.)
//! The price is that a pass over an image larger than the limit faults its pages back in.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbd_server::MappedRead;
use tracing::debug;

/// Smallest read served from the mapping.
pub const MAPPED_READ_MIN: usize = 64 * 1024;
/// Mapped bytes read between two looks at the process's resident file pages.
pub const MAP_CHECK_BYTES: u64 = 32 << 20;
/// The process's resident file pages may reach this before a map drops its page tables.
pub const RESIDENT_LIMIT: u64 = 128 << 20;
/// Pages checked per `mincore` call (the answer buffer lives on the stack).
const MINCORE_PAGES: usize = 512;

/// A read-only shared mapping of a whole image.
pub struct ImageMap {
    base: NonNull<u8>,
    len: usize,
    /// Mapped bytes since the last look at the resident size.
    since_check: AtomicU64,
}

// SAFETY: `ImageMap` owns an address range of a read-only `MAP_SHARED` mapping that lives
// until its `Drop`. Rust code never reads the bytes and never makes a reference to them:
// reads leave as `MappedRead`s (address + length, copied by the kernel in `writev`), and the
// other calls (`mincore`, `madvise`, `munmap`) pass the address only. Other writers of the
// file change the bytes at any time, which is fine for memory only the kernel touches.
// Moving it to another thread moves an address; the counter is atomic.
unsafe impl Send for ImageMap {}
// SAFETY: as above: every method takes `&self`, touches the mapping only through system
// calls and the counter only atomically, so concurrent calls from threads are fine.
unsafe impl Sync for ImageMap {}

impl ImageMap {
    /// Maps the first `size` bytes of `file`, read-only.
    pub fn new(file: &File, size: u64) -> io::Result<Self> {
        let (base, len) = map_shared(file, size, libc::PROT_READ)?;
        Ok(Self {
            base,
            len,
            since_check: AtomicU64::new(0),
        })
    }

    /// `[offset, offset + len)` as a mapped read, if it is big enough, all in the page cache
    /// and free of holes; `None` sends the caller down the ordinary read path. `file` is the
    /// mapped image (for the hole check).
    pub fn read(self: &Arc<Self>, file: &File, offset: u64, len: usize) -> Option<MappedRead> {
        if len < MAPPED_READ_MIN {
            return None;
        }
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len).filter(|&e| e <= self.len)?;
        if !self.resident(start, end) || !has_no_hole(file, offset, len as u64) {
            return None;
        }
        self.count(len as u64);
        let owner: Arc<dyn Send + Sync> = Arc::clone(self) as Arc<dyn Send + Sync>;
        // SAFETY: `start..end` lies inside the mapping (checked above), which stays mapped
        // until the last `Arc<ImageMap>` (held by `owner`) is dropped.
        let ptr = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(start)) };
        // SAFETY: as above.
        Some(unsafe { MappedRead::new(ptr, len, owner) })
    }

    /// Is every page of `[start, end)` in the page cache?
    fn resident(&self, start: usize, end: usize) -> bool {
        let page_size = page_size();
        let mut page = start & !(page_size - 1);
        let mut vec = [0u8; MINCORE_PAGES];
        while page < end {
            let n = (end - page).div_ceil(page_size).min(MINCORE_PAGES);
            // SAFETY: `page` is page-aligned and inside the mapping; `n` pages from it end at
            // or before the mapping's last page; `vec` has room for `n` answers.
            let r = unsafe {
                libc::mincore(
                    self.base.as_ptr().add(page).cast(),
                    n * page_size,
                    vec.as_mut_ptr(),
                )
            };
            if r != 0 {
                debug!(error = %io::Error::last_os_error(), "mincore failed");
                return false;
            }
            if vec[..n].iter().any(|v| v & 1 == 0) {
                return false;
            }
            page += n * page_size;
        }
        true
    }

    /// Counts mapped bytes; every [`MAP_CHECK_BYTES`], drops the page tables if the
    /// process's resident file pages are over [`RESIDENT_LIMIT`].
    fn count(&self, len: u64) {
        let before = self.since_check.fetch_add(len, Ordering::Relaxed);
        if before + len < MAP_CHECK_BYTES {
            return;
        }
        self.since_check.store(0, Ordering::Relaxed);
        match resident_file_bytes() {
            Some(r) if r > RESIDENT_LIMIT => {
                debug!(resident = r, "dropping an image mapping's page tables");
                self.trim();
            }
            Some(_) => {}
            None => self.trim(),
        }
    }

    /// Drops the mapping's page tables.
    fn trim(&self) {
        // SAFETY: the whole mapping; for a shared file mapping MADV_DONTNEED only removes
        // page-table entries (later copies fault them back in from the page cache).
        let r = unsafe { libc::madvise(self.base.as_ptr().cast(), self.len, libc::MADV_DONTNEED) };
        if r != 0 {
            debug!(error = %io::Error::last_os_error(), "madvise(MADV_DONTNEED) failed");
        }
    }
}

impl Drop for ImageMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no `MappedRead` outlives it (each holds an Arc).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The process's resident file-backed and shared pages, in bytes (`/proc/self/statm`).
fn resident_file_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(2)?.parse().ok()?;
    Some(pages * page_size() as u64)
}

/// A new shared mapping of the first `size` bytes of `file` with protection `prot` (the
/// kernel picks the address): its base and length. The caller owns it and unmaps it
/// (`munmap(base, len)`) when done.
pub(crate) fn map_shared(file: &File, size: u64, prot: i32) -> io::Result<(NonNull<u8>, usize)> {
    let len = usize::try_from(size)
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "size not mappable"))?;
    // SAFETY: a new shared mapping of an open descriptor; the kernel picks the address, so no
    // existing memory is replaced. The result is checked before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
    Ok((base, len))
}

/// The system's page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// Does `[offset, offset + len)` of `file` hold data only? (`SEEK_HOLE` finds the first hole
/// at or after `offset`; block devices and file systems without hole reporting say "none".)
fn has_no_hole(file: &File, offset: u64, len: u64) -> bool {
    let Ok(off) = i64::try_from(offset) else {
        return false;
    };
    // SAFETY: lseek on an open descriptor. Every read and write of an image is positioned,
    // so moving the file offset disturbs nothing.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_HOLE) };
    hole >= 0 && hole as u64 >= offset + len
}

/// A directory on a file system whose clean pages leave the page cache on request
/// (`POSIX_FADV_DONTNEED`), which the page-cache tests rely on. tmpfs and ramfs keep every
/// page, so the system's temporary directory is passed over when it is one of them. `None`
/// (the test is reported as skipped, with the reason) when no candidate qualifies; under
/// `CI=true` that fails the test instead.
#[cfg(test)]
pub(crate) fn page_cache_dir(test: &str) -> Option<tempfile::TempDir> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let candidates = [
        std::env::temp_dir(),
        std::path::PathBuf::from("/var/tmp"),
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ];
    for dir in &candidates {
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: `libc::statfs` is plain integers, for which all-zero bytes are valid.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: statfs with a NUL-terminated path and a zeroed struct it fills in.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            continue;
        }
        let kind = st.f_type as i64;
        if kind != TMPFS_MAGIC && kind != RAMFS_MAGIC {
            if let Ok(d) = tempfile::tempdir_in(dir) {
                return Some(d);
            }
        }
    }
    let why = format!(
        "{test}: SKIPPED: no directory on a file system that drops clean pages on request \
         (tried {candidates:?}: tmpfs, ramfs or not writable); set TMPDIR to a directory on \
         a disk file system to run it"
    );
    assert!(std::env::var("CI").map_or(true, |v| v != "true"), "{why}");
    eprintln!("{why}");
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn image(size: usize) -> (tempfile::TempDir, File) {
        image_in(tempfile::tempdir().unwrap(), size)
    }

    fn image_in(dir: tempfile::TempDir, size: usize) -> (tempfile::TempDir, File) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        (dir, f)
    }

    /// Writes a mapped read into a pipe and reads the pipe back: the way the kernel sees it.
    fn through_kernel(m: &MappedRead) -> io::Result<Vec<u8>> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) writes two descriptors into `fds`, which has room for two.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // Room for the whole read in the pipe.
        // SAFETY: fcntl on the pipe's write end just created; no memory is passed.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 1 << 20) };
        let (base, len) = m.raw_parts(0);
        // SAFETY: write(2) from the mapped range (address and length of a live `MappedRead`):
        // the kernel copies it, nothing reads it in user space.
        let r = unsafe { libc::write(fds[1], base.cast(), len) };
        let res = if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            let mut out = vec![0u8; r as usize];
            // SAFETY: read(2) into `out`, a live buffer of `out.len()` bytes.
            let got = unsafe { libc::read(fds[0], out.as_mut_ptr().cast(), out.len()) };
            assert_eq!(got, r);
            Ok(out)
        };
        // SAFETY: closes the two descriptors pipe(2) made above, used by nothing else.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        res
    }

    #[test]
    fn offers_cached_data_and_refuses_small_reads_holes_and_ranges_past_the_end() {
        let size = 1 << 20;
        let (_d, f) = image(size);
        let map = Arc::new(ImageMap::new(&f, size as u64).unwrap());
        let m = map
            .read(&f, 4096, 256 * 1024)
            .expect("cached data is offered");
        assert_eq!(m.len(), 256 * 1024);
        let mut want = vec![0u8; 256 * 1024];
        f.read_exact_at(&mut want, 4096).unwrap();
        assert_eq!(through_kernel(&m).unwrap(), want);

        assert!(map.read(&f, 0, MAPPED_READ_MIN - 1).is_none(), "small read");
        assert!(
            map.read(&f, (size - 4096) as u64, MAPPED_READ_MIN)
                .is_none(),
            "past the end"
        );
        assert!(
            map.read(&f, u64::MAX - 10, MAPPED_READ_MIN).is_none(),
            "overflow"
        );

        // Punch a hole: ranges touching it go the ordinary way, others still qualify.
        // SAFETY: fallocate on the test image's open descriptor; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                512 * 1024,
                128 * 1024,
            )
        };
        if r == 0 {
            assert!(
                map.read(&f, 448 * 1024, 128 * 1024).is_none(),
                "range with a hole"
            );
            assert!(map.read(&f, 0, 256 * 1024).is_some());
        }
    }

    #[test]
    fn pages_out_of_the_page_cache_are_not_offered() {
        let size = 4 << 20;
        let Some(dir) = page_cache_dir("pages_out_of_the_page_cache_are_not_offered") else {
            return;
        };
        let (_d, f) = image_in(dir, size);
        f.sync_all().unwrap();
        let map = Arc::new(ImageMap::new(&f, size as u64).unwrap());
        // Clean pages leave the cache on request.
        // SAFETY: posix_fadvise on an open descriptor; no memory is passed.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        assert!(
            !map.resident(0, size),
            "clean pages stayed in the page cache after POSIX_FADV_DONTNEED"
        );
        assert!(map.read(&f, 0, 1 << 20).is_none());
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(
            map.read(&f, 0, 1 << 20).is_some(),
            "read back into the cache"
        );
    }

    #[test]
    fn a_shrunken_image_fails_the_kernel_copy_instead_of_killing_the_process() {
        let size = 1 << 20;
        let (_d, f) = image(size);
        let map = Arc::new(ImageMap::new(&f, size as u64).unwrap());
        let m = map.read(&f, 0, 512 * 1024).unwrap();
        // Drop the page tables so the copy has to fault the pages in, then shrink the file.
        map.trim();
        f.set_len(4096).unwrap();
        match through_kernel(&m) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EFAULT)),
            // The kernel may copy what was still mapped and stop at the fault.
            Ok(got) => assert!(got.len() < 512 * 1024, "copied {} bytes", got.len()),
        }
    }

    /// The resident bytes of `map`'s own mapping (its `Rss:` in `/proc/self/smaps`).
    fn mapping_rss(map: &ImageMap) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{:08x}-", map.base.as_ptr() as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        assert!(lines.next().is_some(), "mapping {head} not in smaps");
        let rss = lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .expect("an Rss line");
        let kib: u64 = rss.trim().trim_end_matches("kB").trim().parse().unwrap();
        kib * 1024
    }

    #[test]
    fn trimming_drops_resident_pages_and_keeps_the_data() {
        let size = 16 << 20;
        let (_d, f) = image(size);
        let map = Arc::new(ImageMap::new(&f, size as u64).unwrap());
        // This mapping's own resident bytes: the process's total moves with the tests that
        // run beside this one.
        assert_eq!(mapping_rss(&map), 0);
        let mut want = vec![0u8; 1 << 20];
        for i in 0..16u64 {
            let m = map.read(&f, i << 20, 1 << 20).unwrap();
            f.read_exact_at(&mut want, i << 20).unwrap();
            assert_eq!(through_kernel(&m).unwrap(), want);
        }
        let mapped = mapping_rss(&map);
        assert!(mapped >= 15 << 20, "resident after the reads: {mapped}");
        map.trim();
        let after = mapping_rss(&map);
        assert_eq!(after, 0, "resident after the trim ({mapped} before it)");
        // Still readable after the trim.
        let m = map.read(&f, 0, size).unwrap();
        let mut all = vec![0u8; size];
        f.read_exact_at(&mut all, 0).unwrap();
        let mut got = Vec::new();
        for chunk in 0..16 {
            let part = map.read(&f, chunk << 20, 1 << 20).unwrap();
            got.extend(through_kernel(&part).unwrap());
        }
        assert_eq!(m.len(), size);
        assert_eq!(got, all);
    }

    #[test]
    fn the_resident_check_runs_every_check_interval() {
        let (_d, f) = image(1 << 20);
        let map = ImageMap::new(&f, 1 << 20).unwrap();
        map.count(MAP_CHECK_BYTES - 1);
        assert_eq!(map.since_check.load(Ordering::Relaxed), MAP_CHECK_BYTES - 1);
        map.count(1);
        assert_eq!(map.since_check.load(Ordering::Relaxed), 0);
    }

    /// Mapped reads over an image twice the resident limit leave the process's file pages
    /// bounded (limit + one check interval + the program's own pages).
    #[test]
    fn mapped_reads_keep_the_resident_set_bounded() {
        let size = 2 * RESIDENT_LIMIT as usize + (64 << 20);
        let (_d, f) = image(4096);
        f.set_len(size as u64).unwrap();
        // Data, not holes: a range with a hole is not offered.
        let chunk = vec![0x5au8; 1 << 20];
        for off in (0..size).step_by(chunk.len()) {
            f.write_all_at(&chunk, off as u64).unwrap();
        }
        let map = Arc::new(ImageMap::new(&f, size as u64).unwrap());
        let before = resident_file_bytes().unwrap();
        let mut peak = 0;
        let mut cached = vec![0u8; chunk.len()];
        for off in (0..size).step_by(chunk.len()) {
            // A range is offered only when it is all in the page cache, and the kernel may
            // have reclaimed some of what was written above (a loaded machine): read it once
            // through the kernel first (page-cache pages, not the process's resident set).
            f.read_exact_at(&mut cached, off as u64).unwrap();
            let m = map
                .read(&f, off as u64, chunk.len())
                .unwrap_or_else(|| panic!("read at {off} not offered"));
            assert!(through_kernel(&m).unwrap() == chunk);
            peak = peak.max(resident_file_bytes().unwrap());
        }
        let bound = before + RESIDENT_LIMIT + MAP_CHECK_BYTES + (1 << 20);
        assert!(
            peak <= bound,
            "resident file pages peaked at {peak} bytes (before {before}, bound {bound})"
        );
    }
}
