//! The chunk pass of initial replication and resync: reads a disk's chunks (all of them, or
//! the ones a resync names), skips holes and zero chunks, hashes them off the runtime, and
//! stores those whose digest differs from the replica's index, at most 8 in flight, within the
//! policy's bandwidth.
//!
//! Invariant: a checkpoint names only chunks already committed to the store — it is written
//! after `writer.commit()`, every 2 s and at the end — so a pass killed at any moment resumes
//! from its last checkpoint without losing or re-sending what it recorded. Each checkpoint
//! records only the chunks stored since the previous one (the index the pass started from is
//! written once, when it starts), on the blocking pool: its cost follows the change, not the
//! disk's size, and never stalls a runtime worker.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use replica_store::{ChunkId, DiskIndex, PointBuilder, Store};

use super::super::db::{Checkpoint, VmRow};
use super::super::engine::{blocking, Engine, ReplError, BATCH_CHUNKS, CHECKPOINT_EVERY, R};
use super::super::policy::Policy;
use crate::disk::Disk;

/// How many times a pass copies again the chunks GC removed under it before the job fails
/// (and retries on the VM's schedule).
pub(crate) const RECOPY_ATTEMPTS: u32 = 3;

impl Engine {
    /// After a cut refused with [`replica_store::Error::ChunksGone`] (GC deleted chunks a pass
    /// stored, the pass having outlived the store's `max_session_secs`): reopens each affected
    /// disk's checkpoint with just those chunks to do, durably (a restart resumes the same
    /// work). Returns false, changing nothing, for any other error.
    pub(crate) fn requeue_gone(&self, cks: &mut [Checkpoint], e: &ReplError) -> R<bool> {
        let ReplError::Store(replica_store::Error::ChunksGone { gone, .. }) = e else {
            return Ok(false);
        };
        for (disk, chunks) in gone {
            let Some(ck) = cks.iter_mut().find(|c| &c.disk == disk) else {
                continue;
            };
            ck.todo = chunks.iter().flat_map(|c| c.to_le_bytes()).collect();
            ck.total = chunks.len() as u64;
            ck.position = 0;
            ck.done = false;
            tracing::warn!(vm = %ck.vm, disk = %disk, chunks = chunks.len(),
                "GC removed chunks this pass stored; copying them again");
            let c = ck.clone();
            self.db(|db| db.put_checkpoint(&c))?;
        }
        Ok(true)
    }

    /// Reads, hashes and stores chunks of a disk (all of them, or `ck.todo`), comparing with
    /// `base` (the replica's index) to send only what differs. Checkpoints as it goes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn pass(
        &self,
        job: i64,
        row: &VmRow,
        d: &Disk,
        store: &Store,
        ck: &mut Checkpoint,
        base: Option<&(DiskIndex, BTreeSet<u64>)>,
        policy: &Policy,
        done_before: u64,
        total_bytes: u64,
    ) -> R<()> {
        let mut index = DiskIndex::from_bytes(&ck.index, "checkpoint")?;
        let todo: Vec<u64> = ck
            .todo
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .collect();
        let full = todo.is_empty();
        let count = if full { index.len() } else { todo.len() as u64 };
        let writer = PointBuilder::new(store, &row.name)?.writer();
        let cs = index.chunk_size() as u64;
        let started = Instant::now();
        let sent_at_start = ck.bytes_sent;
        let mut last_ck = Instant::now();
        // Chunks set in `index` since the last checkpoint: what the next one records.
        let mut stored: Vec<(u64, ChunkId)> = Vec::new();
        while ck.position < count {
            if self.stopping() {
                writer.commit().await?;
                let p = ck.progress(std::mem::take(&mut stored));
                let (vm, up) = (row.name.clone(), writer.upload_stats());
                self.db_blocking(move |db| {
                    db.checkpoint_progress(&p)?;
                    db.add_upload(&vm, 0, up.puts, up.bytes)
                })
                .await?;
                return Err(ReplError::Shutdown);
            }
            let end = (ck.position + BATCH_CHUNKS as u64).min(count);
            let batch: Vec<u64> = (ck.position..end)
                .map(|p| if full { p } else { todo[p as usize] })
                .collect();
            // Chunks that are holes in the image are zero chunks: never read.
            let holes = if full {
                hole_chunks(d, ck.position, end, &index).await?
            } else {
                BTreeSet::new()
            };
            let results: Vec<(u64, ChunkId, u64, u64)> =
                futures::stream::iter(batch.into_iter().map(|ci| {
                    let (d, store, writer) = (d.clone(), store.clone(), writer.clone());
                    let len = index.chunk_len(ci);
                    let known = base.and_then(|(b, patched)| {
                        (!patched.contains(&ci)).then(|| b.get(ci)).flatten()
                    });
                    let hole = holes.contains(&ci);
                    async move {
                        if hole {
                            return Ok::<_, ReplError>((ci, ChunkId::ZERO, 0, 0));
                        }
                        let data = d.read(ci * cs, len).await.map_err(|e| ReplError::Io {
                            disk: d.name().to_string(),
                            source: e,
                        })?;
                        let s2 = store.clone();
                        let (id, data) = blocking(move || (s2.digest(&data), data)).await;
                        if known == Some(id) || id.is_zero() {
                            return Ok::<_, ReplError>((ci, id, len as u64, 0));
                        }
                        let out = writer.put_with_id(id, Bytes::from(data)).await?;
                        Ok((ci, id, len as u64, out.uploaded_bytes))
                    }
                }))
                .buffer_unordered(8)
                .try_collect()
                .await?;
            for (ci, id, read, sent) in results {
                index.set(ci, id)?;
                stored.push((ci, id));
                ck.bytes_read += read;
                ck.bytes_sent += sent;
            }
            ck.position = end;
            if policy.bandwidth_bytes_per_sec > 0 {
                let want = Duration::from_secs_f64(
                    (ck.bytes_sent - sent_at_start) as f64 / policy.bandwidth_bytes_per_sec as f64,
                );
                if let Some(wait) = want.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if last_ck.elapsed() >= CHECKPOINT_EVERY || ck.position == count {
                // Only chunks in the store are recorded (committed first); the record holds
                // what changed since the last one, off the runtime's workers.
                writer.commit().await?;
                ck.done = ck.position == count;
                if ck.done {
                    // The cut builds the point from the complete index.
                    ck.index = index.to_bytes();
                }
                let p = ck.progress(std::mem::take(&mut stored));
                let disk_done = (d.size() * ck.position)
                    .checked_div(count)
                    .unwrap_or(d.size());
                let pct = 100.0 * (done_before + disk_done) as f64 / total_bytes as f64;
                let detail = format!(
                    "{}: {} of {} chunks, {} bytes read, {} bytes sent",
                    d.name(),
                    ck.position,
                    count,
                    ck.bytes_read,
                    ck.bytes_sent
                );
                let vm = row.name.clone();
                self.db_blocking(move |db| {
                    db.checkpoint_progress(&p)?;
                    db.job_progress(job, pct, &detail)?;
                    db.modify_vm(&vm, |v| v.progress = pct).map(|_| ())
                })
                .await?;
                last_ck = Instant::now();
            }
        }
        // What this pass's session wrote (the cut's session records only its own writes).
        let (vm, up) = (row.name.clone(), writer.upload_stats());
        self.db_blocking(move |db| db.add_upload(&vm, 0, up.puts, up.bytes))
            .await?;
        Ok(())
    }
}

/// Chunks `first..end` of `d` that lie entirely in holes of its image (`SEEK_HOLE`).
async fn hole_chunks(d: &Disk, first: u64, end: u64, index: &DiskIndex) -> R<BTreeSet<u64>> {
    let cs = u64::from(index.chunk_size());
    let start = first * cs;
    let stop = (end * cs).min(d.size());
    let mut out = BTreeSet::new();
    if stop <= start {
        return Ok(out);
    }
    let ext = d
        .extents(start, stop - start)
        .await
        .map_err(|e| ReplError::Io {
            disk: d.name().to_string(),
            source: e,
        })?;
    let mut pos = start;
    for e in ext {
        if e.hole {
            let (a, b) = (pos.div_ceil(cs), (pos + e.length) / cs);
            out.extend(a..b);
            // A hole ending at the disk's end covers its last, shorter chunk too.
            if pos + e.length == d.size() && (d.size() / cs) * cs != d.size() {
                out.insert(d.size() / cs);
            }
        }
        pos += e.length;
    }
    Ok(out)
}
