//! Raw disk images: import a file into a point, export a point's disk to a sparse file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{self, StreamExt};

use crate::error::{Error, Result};
use crate::point::{PointBuilder, PointMeta};
use crate::store::{PutKind, Store};

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

/// Default number of chunks in flight during import/export.
pub const DEFAULT_CONCURRENCY: usize = 16;

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

/// Read a raw image into disk `disk` of `builder` (added or replaced with the image's size).
pub async fn import_disk(
    builder: &mut PointBuilder,
    disk: &str,
    image: &Path,
    concurrency: usize,
) -> Result<ImportStats> {
    let start = Instant::now();
    let (file, size) = open_image(image)?;
    let file = Arc::new(file);
    builder.add_disk(disk, size)?;
    let index = builder.index(disk)?.clone();
    let writer = builder.writer();
    let mut stats = ImportStats {
        chunks: index.len(),
        ..Default::default()
    };
    let mut results = stream::iter(0..index.len())
        .map(|ci| {
            let file = file.clone();
            let writer = writer.clone();
            let off = index.chunk_offset(ci);
            let len = index.chunk_len(ci);
            async move {
                let data = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, off).map(|_| Bytes::from(buf))
                })
                .await
                .map_err(|e| Error::Config(format!("read task failed: {e}")))?
                .map_err(|e| Error::io(format!("reading image at offset {off}"), e))?;
                writer.put(data).await.map(|o| (ci, len, o))
            }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(r) = results.next().await {
        let (ci, len, out) = r?;
        stats.bytes_read += len as u64;
        match out.kind {
            PutKind::Zero => stats.zero_chunks += 1,
            PutKind::Deduplicated => stats.dedup_chunks += 1,
            PutKind::Uploaded => stats.uploaded_chunks += 1,
        }
        stats.uploaded_bytes += out.uploaded_bytes;
        builder.set_chunk(disk, ci, out.id)?;
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
    let index = store.load_index(point, disk).await?;
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
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", target.display()), e))?;
    Ok(written)
}
