//! [`ReplicaDisk`]: one disk of a recovery point as a block device, read lazily from the
//! store, writable only through a local copy-on-write overlay.
//!
//! Reads of a grain (one store chunk) the overlay does not hold go to the store through the
//! point's [`DiskReader`] (verified chunks, LRU cache, read-ahead); nothing is restored before
//! the first read. A write copies its grain into the overlay first (the grain's replica bytes
//! with the write applied; a write covering a whole grain needs no read), so the recovery point
//! in the store is never modified.
//!
//! The overlay is a sparse file of the disk's size plus a bitmap of the grains it holds
//! (`overlay.img`, `overlay.map`). A flush snapshots the bitmap, makes the overlay's data
//! durable, then saves the snapshot (atomically), so after a crash the bitmap never names a
//! grain whose data was lost — not even one copied in while the flush ran.
//! [`ReplicaDisk::hydrate`] copies every remaining grain in, after which the overlay file is a
//! complete local image of the disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nbd_server::{BlockDevice, DeviceFlags, Extent, ZeroFlags};
use replica_store::DiskReader;

use crate::catalog::write_atomic;
use crate::disk::Disk;

/// File names inside an overlay directory.
pub const OVERLAY_IMAGE: &str = "overlay.img";
pub const OVERLAY_MAP: &str = "overlay.map";
const MAP_MAGIC: [u8; 4] = *b"SBOV";
const MAP_HEADER: usize = 24;

fn store_err(e: replica_store::Error) -> io::Error {
    io::Error::other(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("I/O task failed: {e}"))))
}

/// The copy-on-write overlay of a replica disk.
#[derive(Debug)]
pub struct Overlay {
    dir: PathBuf,
    file: File,
    grain: u64,
    size: u64,
    present: Vec<AtomicU64>,
    /// Serializes copy-ups (so two writes to one new grain cannot both copy it).
    copy: tokio::sync::Mutex<()>,
    dirty: AtomicBool,
}

impl Overlay {
    /// Opens (creating if needed) the overlay in `dir` for a disk of `size` bytes.
    pub fn open(dir: &Path, size: u64, grain: u64) -> io::Result<Overlay> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(OVERLAY_IMAGE))?;
        if file.metadata()?.len() != size {
            file.set_len(size)?;
        }
        let grains = size.div_ceil(grain);
        let words: Vec<AtomicU64> = (0..grains.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        match std::fs::read(dir.join(OVERLAY_MAP)) {
            Ok(b) => {
                let ok = b.len() == MAP_HEADER + words.len() * 8
                    && b[..4] == MAP_MAGIC
                    && b[8..16] == grain.to_le_bytes()
                    && b[16..24] == size.to_le_bytes();
                if !ok {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "overlay map {} does not match this disk (size {size}, grain {grain})",
                            dir.join(OVERLAY_MAP).display()
                        ),
                    ));
                }
                for (i, w) in words.iter().enumerate() {
                    let o = MAP_HEADER + i * 8;
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&b[o..o + 8]);
                    w.store(u64::from_le_bytes(v), Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Overlay {
            dir: dir.to_path_buf(),
            file,
            grain,
            size,
            present: words,
            copy: tokio::sync::Mutex::new(()),
            dirty: AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn has(&self, g: u64) -> bool {
        self.present
            .get((g / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (g % 64)) != 0)
    }

    fn set(&self, g: u64) {
        if let Some(w) = self.present.get((g / 64) as usize) {
            w.fetch_or(1 << (g % 64), Ordering::AcqRel);
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Grains held.
    pub fn grains_present(&self) -> u64 {
        self.present
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    pub fn grains(&self) -> u64 {
        self.size.div_ceil(self.grain)
    }

    /// The map as saved: header and the present bits as they are now.
    fn map_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAP_HEADER + self.present.len() * 8);
        b.extend_from_slice(&MAP_MAGIC);
        b.extend_from_slice(&[1, 0, 0, 0]);
        b.extend_from_slice(&self.grain.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        for w in &self.present {
            b.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        b
    }

    /// Snapshot the map, then make the data durable, then save the snapshot.
    ///
    /// A grain's data is written before its bit is set ([`Overlay::set`] follows every
    /// write), so every bit in the snapshot names data written before the snapshot, which
    /// the following `sync_data` makes durable. A grain copied in after the snapshot is not
    /// in the saved map (the dirty flag makes the next flush save it); taking the snapshot
    /// after the data sync instead would save such a grain as present without its data
    /// being durable, and a crash would then serve (or `failover commit` adopt) garbage.
    fn sync(&self) -> io::Result<()> {
        self.sync_with(|| {})
    }

    /// [`Self::sync`], calling `after_data_sync` between the data sync and the map save.
    fn sync_with(&self, after_data_sync: impl FnOnce()) -> io::Result<()> {
        let dirty = self.dirty.swap(false, Ordering::AcqRel);
        let snapshot = dirty.then(|| self.map_bytes());
        if let Err(e) = self.file.sync_data() {
            if dirty {
                self.dirty.store(true, Ordering::Release);
            }
            return Err(e);
        }
        after_data_sync();
        if let Some(b) = snapshot {
            if let Err(e) = write_atomic(&self.dir.join(OVERLAY_MAP), &b) {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }
}

struct Inner {
    name: String,
    reader: DiskReader,
    size: u64,
    grain: u64,
    overlay: Option<Arc<Overlay>>,
    /// Set by `failover commit`: the live disk that took this replica's place. Every I/O
    /// through [`crate::failover::Device`] holds this lock for reading while it runs and goes
    /// to the successor once there is one; the commit holds it for writing while it flushes
    /// and adopts the overlay (see [`ReplicaDisk::begin_handover`]).
    successor: tokio::sync::RwLock<Option<Disk>>,
}

/// A commit in progress: no I/O runs on the replica while it lives. Dropped without
/// [`Handover::complete`], I/O resumes on the replica.
pub struct Handover<'a> {
    guard: tokio::sync::RwLockWriteGuard<'a, Option<Disk>>,
}

impl Handover<'_> {
    /// From now on, every I/O of the replica's export — connections opened before the
    /// commit included — goes to `live` (its change log records the writes).
    pub fn complete(mut self, live: Disk) {
        *self.guard = Some(live);
    }
}

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct ReplicaDisk {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ReplicaDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaDisk")
            .field("name", &self.inner.name)
            .field("size", &self.inner.size)
            .field("writable", &self.inner.overlay.is_some())
            .finish()
    }
}

impl ReplicaDisk {
    /// A replica disk over `reader`; with `overlay`, writable through it.
    pub fn new(name: &str, reader: DiskReader, overlay: Option<Overlay>) -> Self {
        let size = reader.size();
        let grain = u64::from(reader.index().chunk_size());
        ReplicaDisk {
            inner: Arc::new(Inner {
                name: name.to_string(),
                reader,
                size,
                grain,
                overlay: overlay.map(Arc::new),
                successor: tokio::sync::RwLock::new(None),
            }),
        }
    }

    /// Waits for the I/O in flight to finish and holds off new I/O until the returned
    /// [`Handover`] is completed (I/O then goes to the live disk) or dropped.
    pub async fn begin_handover(&self) -> Handover<'_> {
        Handover {
            guard: self.inner.successor.write().await,
        }
    }

    /// The live disk that replaced this replica, if committed; held for reading while an
    /// I/O runs (see [`Inner::successor`]).
    pub(crate) async fn successor(&self) -> tokio::sync::RwLockReadGuard<'_, Option<Disk>> {
        self.inner.successor.read().await
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn size(&self) -> u64 {
        self.inner.size
    }

    pub fn read_only(&self) -> bool {
        self.inner.overlay.is_none()
    }

    /// The grain size (the store's chunk size).
    pub fn grain(&self) -> u64 {
        self.inner.grain
    }

    pub fn overlay(&self) -> Option<&Arc<Overlay>> {
        self.inner.overlay.as_ref()
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn writable(&self) -> io::Result<&Arc<Overlay>> {
        self.inner
            .overlay
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EPERM))
    }

    /// Reads `len` bytes at `offset`: overlay grains from the overlay, the rest from the store.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.check(offset, len as u64)?;
        let mut out = vec![0u8; len];
        let end = offset + len as u64;
        let g = self.inner.grain;
        let mut pos = offset;
        while pos < end {
            let gi = pos / g;
            let in_overlay = self.inner.overlay.as_ref().is_some_and(|o| o.has(gi));
            // A run of grains with the same source.
            let mut run_end = ((gi + 1) * g).min(end);
            while run_end < end {
                let next = run_end / g;
                let same = self.inner.overlay.as_ref().is_some_and(|o| o.has(next)) == in_overlay;
                if !same {
                    break;
                }
                run_end = ((next + 1) * g).min(end);
            }
            let (a, b) = ((pos - offset) as usize, (run_end - offset) as usize);
            if in_overlay {
                let o = Arc::clone(self.writable()?);
                let n = b - a;
                let p = pos;
                let data = blocking(move || crate::fastio::pread_exact(&o.file, p, n)).await?;
                out[a..b].copy_from_slice(&data);
            } else {
                let data = self
                    .inner
                    .reader
                    .read_at(pos, b - a)
                    .await
                    .map_err(store_err)?;
                out[a..b].copy_from_slice(&data);
            }
            pos = run_end;
        }
        Ok(out)
    }

    /// Brings grain `gi` into the overlay (its replica bytes), unless it is there.
    async fn copy_up(&self, o: &Arc<Overlay>, gi: u64) -> io::Result<()> {
        if o.has(gi) {
            return Ok(());
        }
        let _g = o.copy.lock().await;
        self.copy_up_locked(o, gi).await
    }

    /// [`Self::copy_up`] with the copy lock held by the caller.
    async fn copy_up_locked(&self, o: &Arc<Overlay>, gi: u64) -> io::Result<()> {
        if o.has(gi) {
            return Ok(());
        }
        let g = self.inner.grain;
        let start = gi * g;
        let len = g.min(self.inner.size - start) as usize;
        if !self.inner.reader.is_zero(start, len as u64) {
            let data = self
                .inner
                .reader
                .read_at(start, len)
                .await
                .map_err(store_err)?;
            let o2 = Arc::clone(o);
            blocking(move || o2.file.write_all_at(&data, start)).await?;
        }
        o.set(gi);
        Ok(())
    }

    /// Writes `data` at `offset` into the overlay (copying grains in first).
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        let o = Arc::clone(self.writable()?);
        let g = self.inner.grain;
        let end = offset + data.len() as u64;
        if data.is_empty() {
            return Ok(());
        }
        let grains = offset / g..=(end - 1) / g;
        // Grains new to the overlay are copied in and written under the copy lock, so a
        // concurrent copy-up of the same grain cannot overwrite this write.
        let _guard = if grains.clone().all(|gi| o.has(gi)) {
            None
        } else {
            Some(o.copy.lock().await)
        };
        for gi in grains.clone() {
            let (gs, ge) = (gi * g, ((gi + 1) * g).min(self.inner.size));
            if offset <= gs && end >= ge {
                // Fully overwritten: no need for the old bytes; marked after the write below.
                continue;
            }
            if _guard.is_some() {
                self.copy_up_locked(&o, gi).await?;
            }
        }
        let o2 = Arc::clone(&o);
        blocking(move || {
            o2.file.write_all_at(&data, offset)?;
            if fua {
                o2.file.sync_data()?;
            }
            Ok(())
        })
        .await?;
        for gi in offset / g..=(end - 1) / g {
            o.set(gi);
        }
        if fua {
            let o3 = Arc::clone(&o);
            blocking(move || o3.sync()).await?;
        }
        Ok(())
    }

    /// Zeroes a range (trim and write-zeroes): whole grains become holes in the overlay.
    pub async fn zero(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check(offset, len)?;
        let o = Arc::clone(self.writable()?);
        if len == 0 {
            return Ok(());
        }
        let g = self.inner.grain;
        let end = offset + len;
        let _guard = o.copy.lock().await;
        for gi in offset / g..=(end - 1) / g {
            let (gs, ge) = (gi * g, ((gi + 1) * g).min(self.inner.size));
            let (a, b) = (offset.max(gs), end.min(ge));
            if a == gs && b == ge {
                let o2 = Arc::clone(&o);
                blocking(move || {
                    if crate::disk::punch_hole(&o2.file, gs, ge - gs).is_err() {
                        crate::disk::write_zero_buffers(&o2.file, gs, ge - gs)?;
                    }
                    Ok(())
                })
                .await?;
                o.set(gi);
            } else {
                self.copy_up_locked(&o, gi).await?;
                let o2 = Arc::clone(&o);
                blocking(move || o2.file.write_all_at(&vec![0u8; (b - a) as usize], a)).await?;
            }
        }
        drop(_guard);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes the overlay durable (data, then its map).
    pub async fn flush(&self) -> io::Result<()> {
        match &self.inner.overlay {
            Some(o) => {
                let o = Arc::clone(o);
                blocking(move || o.sync()).await
            }
            None => Ok(()),
        }
    }

    /// Allocation map: overlay grains are data, the rest follows the point (holes = zero
    /// chunks, never fetched).
    pub async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check(offset, len)?;
        let g = self.inner.grain;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let gi = pos / g;
            let ge = ((gi + 1) * g).min(end);
            let hole = match &self.inner.overlay {
                Some(o) if o.has(gi) => false,
                _ => self.inner.reader.is_zero(pos, ge - pos),
            };
            match out.last_mut() {
                Some(l) if l.hole == hole => l.length += ge - pos,
                _ => out.push(Extent {
                    length: ge - pos,
                    hole,
                    zero: hole,
                }),
            }
            pos = ge;
        }
        Ok(out)
    }

    /// Copies every grain not yet in the overlay from the store (the overlay becomes a full
    /// local image). `progress(done, total)` is called now and then; returns when complete.
    pub async fn hydrate(&self, mut progress: impl FnMut(u64, u64)) -> io::Result<()> {
        let o = Arc::clone(self.writable()?);
        let total = o.grains();
        let mut since_sync = 0u64;
        for gi in 0..total {
            if !o.has(gi) {
                self.copy_up(&o, gi).await?;
                since_sync += 1;
            }
            if since_sync >= 256 {
                self.flush().await?;
                since_sync = 0;
                progress(o.grains_present(), total);
            }
        }
        self.flush().await?;
        progress(total, total);
        Ok(())
    }
}

impl BlockDevice for ReplicaDisk {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn flags(&self) -> DeviceFlags {
        DeviceFlags {
            flush_covers_all_connections: true,
            trim: true,
            fast_zero: true,
            block_status: true,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        ReplicaDisk::read(self, offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        ReplicaDisk::write(self, offset, data, fua).await
    }

    async fn flush(&self) -> io::Result<()> {
        ReplicaDisk::flush(self).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.zero(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.zero(offset, len, flags.fua).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.extents(offset, len).await
    }
}

crate::replication::states::stored_enum! {
    /// What an overlay serves; a directory level of its path, and the `kind` of its
    /// attachment rows ([`crate::replication::db::Attachment`]).
    pub enum OverlayKind("attachment kind") {
        /// `standby attach` (`--rw`: with an overlay).
        Attach = "attach",
        /// A test failover.
        Test = "test",
        /// A failover (hydrated, then committed).
        Failover = "failover",
    }
}

/// Where a gateway keeps overlays: `<data-dir>/failover/<vm>/<kind>/<leaf>/`, where `leaf` is
/// a disk name or `DISK@POINT`. The VM, disk and point names may come from a store others
/// can write: each is checked with [`replica_store::point::validate_name`] (no `/`, never
/// `.` or `..`), so the directory is always inside `<data-dir>/failover/`.
pub fn overlay_dir(
    data_dir: &Path,
    vm: &str,
    kind: OverlayKind,
    disk: &str,
    point: Option<&str>,
) -> Result<PathBuf, replica_store::Error> {
    use replica_store::point::validate_name;
    validate_name("VM", vm)?;
    validate_name("disk", disk)?;
    let leaf = match point {
        Some(p) => {
            validate_name("point", p)?;
            format!("{disk}@{p}")
        }
        None => disk.to_string(),
    };
    Ok(data_dir
        .join("failover")
        .join(vm)
        .join(kind.as_str())
        .join(leaf))
}

/// True if `dir` is an overlay directory of `data_dir` (as [`overlay_dir`] makes them:
/// exactly three normal components below `<data-dir>/failover/`). Checked before removing a
/// directory named by the state database.
pub fn is_overlay_dir(data_dir: &Path, dir: &Path) -> bool {
    use std::path::Component;
    let Ok(rest) = dir.strip_prefix(data_dir.join("failover")) else {
        return false;
    };
    let comps: Vec<Component<'_>> = rest.components().collect();
    comps.len() == 3
        && comps.iter().all(|c| match c {
            Component::Normal(s) => s
                .to_str()
                .is_some_and(|s| !s.starts_with('.') && !s.contains('/')),
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved_bits(dir: &Path) -> Vec<u64> {
        let b = std::fs::read(dir.join(OVERLAY_MAP)).unwrap();
        b[MAP_HEADER..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// A grain copied in after the data sync must not be saved as present by that flush
    /// (its data is not durable yet); the next flush saves it.
    #[test]
    fn flush_never_saves_a_grain_copied_after_the_data_sync() {
        let t = tempfile::tempdir().unwrap();
        let o = Overlay::open(t.path(), 8 * 4096, 4096).unwrap();
        o.file.write_all_at(&[1u8; 4096], 0).unwrap();
        o.set(0);
        o.sync_with(|| {
            // A copy-up racing with the flush: data written, bit set.
            o.file.write_all_at(&[2u8; 4096], 4096).unwrap();
            o.set(1);
        })
        .unwrap();
        assert_eq!(
            saved_bits(t.path()),
            vec![0b01],
            "grain 1 saved before its data sync"
        );
        o.sync().unwrap();
        assert_eq!(saved_bits(t.path()), vec![0b11]);
        // Reopened, the map is what was saved.
        let o2 = Overlay::open(t.path(), 8 * 4096, 4096).unwrap();
        assert_eq!(o2.grains_present(), 2);
    }
}
