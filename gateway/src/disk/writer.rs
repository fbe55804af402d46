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
//! nor a lock hand-over per write. A write the extent map lets defer is logged as a 40-byte
//! deferred extent, as inline (`crate::changelog::log`'s `batch`, "Deferred records").
//!
//! **Invariants** (those of the change log, see `crate::changelog::log`): records reach the
//! log in LSN order as one contiguous run; overlapping requests are never in one batch, and a
//! batch registers its ranges before it appends, so overlapping requests reach log and image
//! in the same order; every record of a batch is in the log (page cache) before any change of
//! it reaches the image; the hot-extent rule and the fsync latch are those of `record`.
//! A request that finds the disk no longer tracked (or its size now an extent) is done the way
//! [`super::write_blocking`] does it, on this thread.
//!
//! Most small writes never come here: `Disk::write_now` logs them on the connection's
//! task when nothing has to wait (`ChangeLog::try_record_now`) and this thread is idle. This
//! thread takes those that would wait (a cold extent's log sync, a rotation, a busy lock,
//! an overlapping request) and everything queued behind them.
//!
//! **Lifetime.** The thread holds the disk weakly and ends when the disk (and with it the
//! channel's sender) is dropped.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};

use tokio::sync::oneshot;
use tracing::warn;

use super::{read_lock, write_blocking, write_image, Inner};
use crate::changelog::log::BatchWrite;
#[cfg(doc)]
use crate::changelog::ChangeLog;

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
    /// Requests submitted and not yet answered.
    queued: Arc<AtomicUsize>,
    /// Testing only: held, the thread waits before taking a batch (see [`Writer::hold`]).
    #[cfg(any(test, feature = "testing"))]
    gate: Arc<std::sync::Mutex<()>>,
}

impl Writer {
    /// Starts the writer thread of `inner` (`None` if no thread can be started).
    pub(super) fn start(inner: &Arc<Inner>) -> Option<Writer> {
        let (tx, rx) = mpsc::channel();
        let weak = Arc::downgrade(inner);
        let queued = Arc::new(AtomicUsize::new(0));
        let q = Arc::clone(&queued);
        #[cfg(any(test, feature = "testing"))]
        let gate = Arc::new(std::sync::Mutex::new(()));
        #[cfg(any(test, feature = "testing"))]
        let g = Gate(Some(Arc::clone(&gate)));
        #[cfg(not(any(test, feature = "testing")))]
        let g = Gate(None);
        match std::thread::Builder::new()
            .name(format!("disk-writer-{}", inner.name))
            .spawn(move || run(weak, rx, &q, &g))
        {
            Ok(_) => Some(Writer {
                tx,
                queued,
                #[cfg(any(test, feature = "testing"))]
                gate,
            }),
            Err(e) => {
                warn!(disk = %inner.name, "cannot start the disk's writer thread ({e}); small writes use the blocking pool");
                None
            }
        }
    }

    /// Queues a write; the reply says when it is logged and applied. Never blocks.
    pub(super) async fn submit(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.tx
            .send(Req {
                offset,
                data,
                reply,
            })
            .map_err(|_| {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                io::Error::other("the disk's writer thread has stopped")
            })?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("the disk's writer thread has stopped")))
    }
}

/// Testing only: batches of more than one request logged by [`ChangeLog::record_writes`]
/// (all disks of the process), so the simulation can show it exercised them.
#[cfg(any(test, feature = "testing"))]
pub static MULTI_WRITE_BATCHES: AtomicUsize = AtomicUsize::new(0);

/// Testing only: a lock the thread passes before it takes a batch (`None` in production).
struct Gate(Option<Arc<std::sync::Mutex<()>>>);

impl Gate {
    fn pass(&self) {
        if let Some(m) = &self.0 {
            drop(m.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
}

impl Writer {
    /// Testing only: while the guard is held, the thread takes no new batch, so requests
    /// submitted meanwhile form one batch (the simulation's multi-write steps).
    #[cfg(any(test, feature = "testing"))]
    pub(super) fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether requests are queued or being done (the inline path then stays out of the
    /// way, so small writes are taken in arrival order).
    pub(super) fn busy(&self) -> bool {
        self.queued.load(Ordering::SeqCst) > 0
    }
}

fn overlaps(batch: &[Req], r: &Req) -> bool {
    let end = r.offset.saturating_add(r.data.len() as u64);
    batch
        .iter()
        .any(|b| b.offset < end && r.offset < b.offset.saturating_add(b.data.len() as u64))
}

fn run(weak: Weak<Inner>, rx: mpsc::Receiver<Req>, queued: &AtomicUsize, gate: &Gate) {
    let mut carry: Option<Req> = None;
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => match rx.recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        gate.pass();
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
        let n = batch.len();
        let Some(inner) = weak.upgrade() else {
            for r in batch {
                let _ = r
                    .reply
                    .send(Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)));
            }
            queued.fetch_sub(n, Ordering::SeqCst);
            return;
        };
        process(&inner, batch, queued);
    }
}

/// Logs and applies one batch and answers its requests.
fn process(inner: &Inner, batch: Vec<Req>, queued: &AtomicUsize) {
    let n = batch.len();
    let tracking = read_lock(&inner.tracking);
    let Some(t) = tracking
        .as_ref()
        .filter(|t| batch.iter().all(|r| (r.data.len() as u64) < t.extent_min))
    else {
        drop(tracking);
        let results: Vec<_> = batch
            .iter()
            .map(|r| write_blocking(inner, r.offset, &r.data, false))
            .collect();
        // Idle before the replies go out: a write sent after one of them may be inline.
        queued.fetch_sub(n, Ordering::SeqCst);
        for (r, res) in batch.into_iter().zip(results) {
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
    #[cfg(any(test, feature = "testing"))]
    if writes.len() > 1 {
        MULTI_WRITE_BATCHES.fetch_add(1, Ordering::Relaxed);
    }
    // As inline (`Disk::write_now`): a write the extent map lets defer is logged without
    // its bytes, and its piece is in the map already; any other saves what a cut still needs
    // before the image changes.
    let results = t.log.record_writes(
        &writes,
        |i, chain, lsn| {
            let w = &writes[i];
            t.extents
                .take_uncut(chain, lsn, w.offset, w.data.len() as u64, t.defer_max())
        },
        |i, deferred| {
            let w = &writes[i];
            if !deferred {
                t.before_write(w.offset, w.data.len() as u64)?;
            }
            write_image(inner, w.offset, w.data)
        },
    );
    drop(writes);
    for (r, res) in batch.iter().zip(&results) {
        if res.is_ok() {
            t.note(r.offset, r.data.len() as u64);
        }
    }
    // Idle before the replies go out: a write sent after one of them may be inline.
    queued.fetch_sub(n, Ordering::SeqCst);
    for (r, res) in batch.into_iter().zip(results) {
        let _ = r.reply.send(res);
    }
}
