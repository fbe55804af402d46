//! The sync thread of a disk: FLUSHes run here and are answered from here.
//!
//! **Design.** One std thread per disk, started by the disk's first FLUSH from an NBD
//! connection. The connection's task only pushes the request's [`FlushReply`] into a channel
//! (never blocks). The thread takes every FLUSH waiting in the channel, runs one flush for all
//! of them ([`super::flush_blocking`]: the change log's sync round, or the image's
//! `fdatasync` on an untracked disk) and sends each its reply, which on a plain socket is
//! written to the socket by this thread. A FLUSH so costs one thread wake-up (the request's
//! hand-over) instead of three (to the blocking pool, back to the runtime, to the reply
//! writer); BENCHMARKS.md, "FLUSH answered by the thread that synced", has the figures.
//!
//! **Invariants.** A FLUSH is answered only by a flush that started after it was queued, and
//! every write it covers completed before it was queued: so taking all waiting FLUSHes into
//! one flush keeps the guarantee of each. The result is the flush's own (an error answers
//! every FLUSH of the batch with that error; the fsync latch then fails all later ones).
//!
//! **Lifetime.** The thread holds the disk weakly and ends when the disk (and with it the
//! channel's sender) is dropped; a FLUSH that finds the disk gone is answered `ESHUTDOWN`.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Weak};

use nbd_server::FlushReply;
use tracing::warn;

use super::{flush_blocking, Inner};

/// The sending side of a disk's sync thread.
pub(super) struct Syncer {
    tx: mpsc::Sender<FlushReply>,
}

impl Syncer {
    /// Starts the sync thread of `inner` (`None` if no thread can be started).
    pub(super) fn start(inner: &Arc<Inner>) -> Option<Syncer> {
        let (tx, rx) = mpsc::channel();
        let weak = Arc::downgrade(inner);
        match std::thread::Builder::new()
            .name(format!("disk-sync-{}", inner.name))
            .spawn(move || run(&weak, &rx))
        {
            Ok(_) => Some(Syncer { tx }),
            Err(e) => {
                warn!(disk = %inner.name, "cannot start the disk's sync thread ({e}); FLUSH uses the blocking pool");
                None
            }
        }
    }

    /// Queues a FLUSH for the thread; gives the reply back (`Some`) if the thread has stopped.
    pub(super) fn submit(&self, reply: FlushReply) -> Option<FlushReply> {
        self.tx.send(reply).err().map(|e| e.0)
    }
}

fn run(weak: &Weak<Inner>, rx: &mpsc::Receiver<FlushReply>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = match weak.upgrade() {
            Some(inner) => flush_blocking(&inner),
            None => Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)),
        };
        for reply in batch {
            reply.send(copy_error(&result));
        }
    }
}

/// The same result for every FLUSH of a batch (`io::Error` is not `Clone`): the OS error
/// number when there is one, else the kind and message.
fn copy_error(r: &io::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        }),
    }
}
