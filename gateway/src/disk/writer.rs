//! The writer thread of a tracked disk: small writes (below `extent_min`, without FUA) are
//! logged and applied here, in batches, instead of one trip to tokio's blocking pool each.
//!
//! **Design.** One std thread per disk, started at the disk's first small tracked write. The
//! runtime side ([`Writer::submit`]) only pushes the request into a channel (never blocks) and
//! awaits a oneshot reply. The thread takes every request waiting in the channel (up to
//! [`MAX_BATCH`] requests or [`MAX_BATCH_BYTES`]), stopping before one that overlaps a request
//! already in the batch, and hands the batch to [`ChangeLog::record_writes`]: one `pwritev`
//! appends all records, then each change is applied to the image and its request answered.
//! With many requests in flight the thread rarely sleeps, so there is neither a thread wake-up
//! nor a lock hand-over per write.
//!
//! **Invariants** (those of the change log, see `crate::changelog::log`): records reach the
//! log in LSN order as one contiguous run; overlapping requests are never in one batch, and a
//! batch registers its ranges before it appends, so overlapping requests reach log and image
//! in the same order; every record of a batch is in the log (page cache) before any change of
//! it reaches the image; the hot-extent rule and the fsync latch are those of `record`.
//! A request that finds the disk no longer tracked (or its size now an extent) is done the way
//! [`super::write_blocking`] does it, on this thread.
//!
//! **Lifetime.** The thread holds the disk weakly and ends when the disk (and with it the
//! channel's sender) is dropped.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Weak};

use tokio::sync::oneshot;
use tracing::warn;

use super::{read_lock, write_blocking, write_image, Inner};
use crate::changelog::log::BatchWrite;

/// Most requests in one batch.
pub const MAX_BATCH: usize = 64;
/// Most data bytes in one batch (then the batch is closed).
pub const MAX_BATCH_BYTES: usize = 1 << 20;

struct Req {
    offset: u64,
    data: Vec<u8>,
    reply: oneshot::Sender<io::Result<()>>,
}

/// The sending side of a disk's writer thread.
pub(super) struct Writer {
    tx: mpsc::Sender<Req>,
}

impl Writer {
    /// Starts the writer thread of `inner` (`None` if no thread can be started).
    pub(super) fn start(inner: &Arc<Inner>) -> Option<Writer> {
        let (tx, rx) = mpsc::channel();
        let weak = Arc::downgrade(inner);
        match std::thread::Builder::new()
            .name(format!("disk-writer-{}", inner.name))
            .spawn(move || run(weak, rx))
        {
            Ok(_) => Some(Writer { tx }),
            Err(e) => {
                warn!(disk = %inner.name, "cannot start the disk's writer thread ({e}); small writes use the blocking pool");
                None
            }
        }
    }

    /// Queues a write; the reply says when it is logged and applied. Never blocks.
    pub(super) async fn submit(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req {
                offset,
                data,
                reply,
            })
            .map_err(|_| io::Error::other("the disk's writer thread has stopped"))?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("the disk's writer thread has stopped")))
    }
}

fn overlaps(batch: &[Req], r: &Req) -> bool {
    let end = r.offset.saturating_add(r.data.len() as u64);
    batch
        .iter()
        .any(|b| b.offset < end && r.offset < b.offset.saturating_add(b.data.len() as u64))
}

fn run(weak: Weak<Inner>, rx: mpsc::Receiver<Req>) {
    let mut carry: Option<Req> = None;
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => match rx.recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        let mut bytes = first.data.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) if overlaps(&batch, &r) => {
                    carry = Some(r);
                    break;
                }
                Ok(r) => {
                    bytes += r.data.len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let Some(inner) = weak.upgrade() else {
            for r in batch {
                let _ = r
                    .reply
                    .send(Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)));
            }
            return;
        };
        process(&inner, batch);
    }
}

/// Logs and applies one batch and answers its requests.
fn process(inner: &Inner, batch: Vec<Req>) {
    let tracking = read_lock(&inner.tracking);
    let Some(t) = tracking
        .as_ref()
        .filter(|t| batch.iter().all(|r| (r.data.len() as u64) < t.extent_min))
    else {
        drop(tracking);
        for r in batch {
            let res = write_blocking(inner, r.offset, &r.data, false);
            let _ = r.reply.send(res);
        }
        return;
    };
    let writes: Vec<BatchWrite<'_>> = batch
        .iter()
        .map(|r| BatchWrite {
            offset: r.offset,
            data: &r.data,
            flags: 0,
        })
        .collect();
    let results = t.log.record_writes(&writes, |i| {
        let w = &writes[i];
        t.before_write(w.offset, w.data.len() as u64)?;
        write_image(inner, w.offset, w.data)
    });
    drop(writes);
    for (r, res) in batch.into_iter().zip(results) {
        if res.is_ok() {
            t.note(r.offset, r.data.len() as u64);
        }
        let _ = r.reply.send(res);
    }
}
