//! Raw disk images: import a file into a point, export a point's disk to a sparse file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{self, StreamExt};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::patch::Piece;
use crate::point::{PointBuilder, PointMeta};
use crate::store::{PutKind, PutOutcome, Store};

/// Counters of an import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// All-zero chunks (not stored).
    pub zero_chunks: u64,
    /// Chunks already in the store.
    pub dedup_chunks: u64,
    /// Chunks uploaded.
    pub uploaded_chunks: u64,
    /// Bytes uploaded (encoded objects).
    pub uploaded_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Default number of chunks (export) or batches (import) in flight.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Bytes of image an import reads, hashes and encodes in one blocking task.
const IMPORT_BATCH_BYTES: usize = 1 << 20;

fn open_image(path: &Path) -> Result<(File, u64)> {
    use std::io::{Seek, SeekFrom};
    let mut f =
        File::open(path).map_err(|e| Error::io(format!("opening image {}", path.display()), e))?;
    // seek(End) works for regular files and block devices alike.
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
    Ok((f, size))
}

/// Data extents of a sparse file as `(start, end)` pairs, found with `SEEK_DATA`/`SEEK_HOLE`
/// once per extent (instead of once per chunk). `None` when the filesystem cannot tell (then
/// every chunk is read).
fn data_extents(file: &File, size: u64) -> Option<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek(2) on a descriptor owned by `file`. Image reads use pread, which
        // ignores the file offset this moves.
        let d = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => Some(out), // no data after `pos`
                _ => None,
            };
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            return None;
        }
        let (d, h) = (d as u64, (h as u64).min(size));
        if h <= d {
            return None;
        }
        out.push((d, h));
        pos = h;
    }
    Some(out)
}

/// True if `[off, off+len)` overlaps no data extent (a hole of a sparse file: zeros that need
/// not be read). `extents` is sorted; `None` means unknown (read everything).
fn is_hole(extents: Option<&[(u64, u64)]>, off: u64, len: usize) -> bool {
    let Some(ext) = extents else { return false };
    let end = off + len as u64;
    // First extent ending after `off`.
    let i = ext.partition_point(|&(_, e)| e <= off);
    ext.get(i).is_none_or(|&(s, _)| s >= end)
}

/// Read a raw image into disk `disk` of `builder` (added or replaced with the image's size).
pub async fn import_disk(
    builder: &mut PointBuilder,
    disk: &str,
    image: &Path,
    concurrency: usize,
) -> Result<ImportStats> {
    let start = Instant::now();
    let (file, size) = open_image(image)?;
    let extents = Arc::new(data_extents(&file, size));
    let file = Arc::new(file);
    builder.add_disk(disk, size)?;
    let index = builder.index(disk)?.clone();
    let writer = builder.writer();
    let mut stats = ImportStats {
        chunks: index.len(),
        ..Default::default()
    };
    // Work in batches of IMPORT_BATCH_BYTES: one blocking task reads, hashes and encodes a
    // batch (data stays hot in the CPU cache, one thread hand-off per batch), one backend call
    // stages its new chunks. `concurrency` batches are in flight, so every core hashes while
    // others wait for I/O.
    let per_batch = (IMPORT_BATCH_BYTES / index.chunk_size() as usize).max(1) as u64;
    let batches = index.len().div_ceil(per_batch);
    let mut results = stream::iter(0..batches)
        .map(|b| {
            let file = file.clone();
            let extents = extents.clone();
            let writer = writer.clone();
            let index = &index;
            let range = b * per_batch..((b + 1) * per_batch).min(index.len());
            let chunks: Vec<(u64, u64, usize)> = range
                .map(|ci| (ci, index.chunk_offset(ci), index.chunk_len(ci)))
                .collect();
            async move {
                let w = writer.clone();
                // (chunk index, len, id, encoded object if it must be stored)
                type Item = (u64, usize, ChunkId, Option<Bytes>);
                let items = tokio::task::spawn_blocking(move || -> Result<Vec<Item>> {
                    let codec = w.store().codec();
                    let mut buf = Vec::new();
                    let mut out = Vec::with_capacity(chunks.len());
                    for (ci, off, len) in chunks {
                        if is_hole(extents.as_deref(), off, len) {
                            out.push((ci, len, ChunkId::ZERO, None));
                            continue;
                        }
                        buf.resize(len, 0);
                        file.read_exact_at(&mut buf, off)
                            .map_err(|e| Error::io(format!("reading image at offset {off}"), e))?;
                        let id = codec.digest(&buf);
                        if w.knows(&id) {
                            out.push((ci, len, id, None));
                        } else {
                            out.push((ci, len, id, Some(codec.encode_chunk(&id, &buf)?)));
                        }
                    }
                    Ok(out)
                })
                .await
                .map_err(|e| Error::Config(format!("read task failed: {e}")))??;
                let mut outcomes = Vec::with_capacity(items.len());
                let mut to_stage = Vec::new();
                for (ci, len, id, obj) in items {
                    let kind = if id.is_zero() {
                        PutKind::Zero
                    } else {
                        PutKind::Deduplicated
                    };
                    let slot = obj.map(|obj| {
                        to_stage.push((id, obj));
                        to_stage.len() - 1
                    });
                    let out = PutOutcome {
                        id,
                        uploaded_bytes: 0,
                        kind,
                    };
                    outcomes.push((ci, len, out, slot));
                }
                let staged = if to_stage.is_empty() {
                    Vec::new()
                } else {
                    writer.stage_encoded(to_stage).await?
                };
                let outcomes: Vec<(u64, usize, PutOutcome)> = outcomes
                    .into_iter()
                    .map(|(ci, len, out, slot)| (ci, len, slot.map_or(out, |i| staged[i])))
                    .collect();
                Ok::<_, Error>(outcomes)
            }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(r) = results.next().await {
        for (ci, len, out) in r? {
            stats.bytes_read += len as u64;
            match out.kind {
                PutKind::Zero => stats.zero_chunks += 1,
                PutKind::Deduplicated => stats.dedup_chunks += 1,
                PutKind::Uploaded => stats.uploaded_chunks += 1,
            }
            stats.uploaded_bytes += out.uploaded_bytes;
            builder.set_chunk(disk, ci, out.id)?;
        }
    }
    stats.elapsed = start.elapsed();
    tracing::info!(disk, ?stats, "imported image");
    Ok(stats)
}

/// Write disk `disk` of `point` to a new sparse file `target` (holes are not written).
pub async fn export_disk(
    store: &Store,
    point: &PointMeta,
    disk: &str,
    target: &Path,
    concurrency: usize,
) -> Result<u64> {
    // The index with the chunks the patches refer to whole, and the rest of the patches.
    let (index, patch) = store.load_disk(point, disk).await?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(target)
        .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
    file.set_len(index.disk_size())
        .map_err(|e| Error::io(format!("sizing {}", target.display()), e))?;
    let file = Arc::new(file);
    let mut written = 0u64;
    let mut results = stream::iter(0..index.len())
        .filter(|ci| std::future::ready(index.get(*ci).is_some_and(|e| !e.is_zero())))
        .map(|ci| {
            let (id, len, off) = (index.get(ci), index.chunk_len(ci), index.chunk_offset(ci));
            let file = file.clone();
            async move {
                let id = id.ok_or_else(|| Error::InvalidArgument(format!("chunk {ci}")))?;
                let data = store.get_chunk(&id, Some(len)).await?;
                let n = data.len() as u64;
                tokio::task::spawn_blocking(move || file.write_all_at(&data, off))
                    .await
                    .map_err(|e| Error::Config(format!("write task failed: {e}")))?
                    .map_err(|e| Error::io(format!("writing export at offset {off}"), e))?;
                Ok::<u64, Error>(n)
            }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(r) = results.next().await {
        written += r?;
    }
    // The rest of the point's patches go over the chunks (merged into one).
    if !patch.is_empty() {
        let f = file.clone();
        written += tokio::task::spawn_blocking(move || -> Result<u64> {
            let zeros = vec![0u8; 1 << 20];
            let mut n = 0;
            for (off, len, piece) in patch.extents() {
                let r = match piece {
                    Piece::Data(d) => {
                        n += len;
                        f.write_all_at(d, off)
                    }
                    Piece::Chunk { id, .. } => {
                        return Err(Error::Config(format!(
                            "export: chunk reference {} at {off} left unresolved",
                            id.to_hex()
                        )))
                    }
                    Piece::Zero => (0..len).step_by(zeros.len()).try_for_each(|at| {
                        let l = (len - at).min(zeros.len() as u64) as usize;
                        f.write_all_at(&zeros[..l], off + at)
                    }),
                };
                r.map_err(|e| Error::io(format!("writing export at offset {off}"), e))?;
            }
            Ok(n)
        })
        .await
        .map_err(|e| Error::Config(format!("write task failed: {e}")))??;
    }
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", target.display()), e))?;
    Ok(written)
}
