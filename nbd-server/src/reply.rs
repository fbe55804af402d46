//! Replies: what a reply holds until it is written, how read data is encoded (structured
//! chunks, zero runs as holes), and the writer that sends queued replies with as few `writev`
//! calls as possible.
//!
//! A [`Reply`] carries its request's [`Held`] permits; the writer drops them only after the
//! reply's bytes are on the socket, which is what bounds what a client that does not read its
//! replies can make the server hold. A client that takes no byte for the reply timeout makes
//! the writer fail with `TimedOut`.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::device::MappedRead;
use crate::direct::Direct;
use crate::proto::*;

/// Reads shorter than this never get holes split out of them.
pub(crate) const HOLE_SCAN_MIN: usize = 64 * 1024;
/// Granularity (and minimum run) of zero detection in structured reads.
const HOLE_BLOCK: usize = 4096;
static ZERO_BLOCK: [u8; HOLE_BLOCK] = [0u8; HOLE_BLOCK];

/// A reply, written to the socket as one unit.
pub(crate) struct Reply {
    pub(crate) parts: Vec<Part>,
    /// Released once the reply is written.
    pub(crate) _held: Held,
}

/// A request's in-flight slot and payload bytes (of its connection and of the server's
/// budget), held until its reply is on the socket.
#[derive(Default)]
pub(crate) struct Held {
    pub(crate) _slot: Option<OwnedSemaphorePermit>,
    pub(crate) _bytes: Option<OwnedSemaphorePermit>,
    pub(crate) _memory: Option<OwnedSemaphorePermit>,
    pub(crate) _scan: Option<OwnedSemaphorePermit>,
    /// Reports the request to the server's observer when the reply is written.
    pub(crate) observed: Option<crate::observe::Observed>,
}

impl Held {
    pub(crate) fn slot(slot: OwnedSemaphorePermit) -> Self {
        Self {
            _slot: Some(slot),
            ..Self::default()
        }
    }
}

/// A piece of a reply.
pub(crate) enum Part {
    Bytes(Vec<u8>),
    /// Read data the kernel copies straight from a mapping (only on kernel-written sockets).
    Mapped(MappedRead),
}

impl Part {
    pub(crate) fn len(&self) -> usize {
        match self {
            Part::Bytes(b) => b.len(),
            Part::Mapped(m) => m.len(),
        }
    }

    pub(crate) fn io_slice(&self, from: usize) -> io::IoSlice<'_> {
        match self {
            Part::Bytes(b) => io::IoSlice::new(&b[from..]),
            Part::Mapped(m) => m.io_slice(from),
        }
    }
}

impl From<Vec<u8>> for Part {
    fn from(b: Vec<u8>) -> Self {
        Part::Bytes(b)
    }
}

pub(crate) fn structured_data(cookie: u64, offset: u64, data: Vec<u8>, done: bool) -> Vec<Part> {
    let head = structured_data_head(cookie, offset, data.len() as u32, done);
    vec![head.into(), data.into()]
}

/// The header of an `OFFSET_DATA` chunk carrying `len` bytes read at `offset`.
pub(crate) fn structured_data_head(cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut head = Vec::with_capacity(STRUCTURED_HEADER_LEN + 8);
    head.extend_from_slice(&structured_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + len,
    ));
    head.extend_from_slice(&offset.to_be_bytes());
    head
}

pub(crate) fn structured_hole(cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = Vec::with_capacity(STRUCTURED_HEADER_LEN + 12);
    b.extend_from_slice(&structured_header(
        flags,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Sends runs of all-zero blocks as `OFFSET_HOLE` chunks and the rest as `OFFSET_DATA`.
pub(crate) fn split_holes(cookie: u64, offset: u64, data: Vec<u8>) -> Vec<Part> {
    // Find runs: (start, end, is_zero), block-granular, the tail block possibly short.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + HOLE_BLOCK).min(data.len());
        let zero = data[pos..end] == ZERO_BLOCK[..end - pos];
        match runs.last_mut() {
            Some(r) if r.2 == zero => r.1 = end,
            _ => runs.push((pos, end, zero)),
        }
        pos = end;
    }
    if runs.len() == 1 && !runs[0].2 {
        return structured_data(cookie, offset, data, true);
    }
    let n = runs.len();
    let mut parts = Vec::with_capacity(n * 2);
    for (i, (s, e, zero)) in runs.into_iter().enumerate() {
        let done = i + 1 == n;
        let off = offset + s as u64;
        if zero {
            parts.push(structured_hole(cookie, off, (e - s) as u32, done).into());
        } else {
            parts.extend(structured_data(cookie, off, data[s..e].to_vec(), done));
        }
    }
    parts
}

/// Most replies gathered into one `writev`.
const WRITE_BATCH_REPLIES: usize = 64;
/// Most iovecs handed to one `writev` (Linux's IOV_MAX is 1024).
const MAX_IOVECS: usize = 1024;

/// Sends queued replies until every sender is gone. With `direct`, replies may also be sent
/// by other threads (see `crate::direct`): the writer marks itself busy while it holds
/// replies, and writes a direct send's unwritten tail before its own batch.
pub(crate) async fn writer_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    reply_timeout: Duration,
    direct: Option<std::sync::Arc<Direct>>,
) -> io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(WRITE_BATCH_REPLIES);
    let mut parts: Vec<Part> = Vec::new();
    while let Some(first) = rx.recv().await {
        if let Some(tail) = direct.as_ref().and_then(|d| d.writer_begins()) {
            batch.push(tail);
        }
        batch.push(first);
        // Gather whatever else is ready: one system call for many replies.
        while batch.len() < WRITE_BATCH_REPLIES {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        parts.extend(batch.iter_mut().flat_map(|r| r.parts.drain(..)));
        write_all_vectored(&mut wr, &parts, reply_timeout).await?;
        parts.clear();
        // Written: release the replies' slots and bytes.
        batch.clear();
        if let Some(d) = &direct {
            d.writer_ends();
        }
    }
    wr.shutdown().await
}

/// Writes every byte of `parts` with as few `writev` calls as the kernel allows; fails with
/// `TimedOut` when the client takes no byte for `stall` (it does not read its replies).
pub(crate) async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    parts: &[Part],
    stall: Duration,
) -> io::Result<()> {
    let stalled = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no reply byte for {stall:?}"),
        )
    };
    let mut idx = 0; // first part not fully written
    let mut off = 0; // bytes of parts[idx] already written
    while idx < parts.len() {
        if parts[idx].len() == off {
            idx += 1;
            off = 0;
            continue;
        }
        let mut slices = Vec::with_capacity((parts.len() - idx).min(MAX_IOVECS));
        slices.push(parts[idx].io_slice(off));
        for p in parts[idx + 1..].iter().take(MAX_IOVECS - 1) {
            if p.len() > 0 {
                slices.push(p.io_slice(0));
            }
        }
        let mut written = tokio::time::timeout(stall, wr.write_vectored(&slices))
            .await
            .map_err(|_| stalled())??;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 && idx < parts.len() {
            let left = parts[idx].len() - off;
            if written >= left {
                written -= left;
                idx += 1;
                off = 0;
            } else {
                off += written;
                written = 0;
            }
        }
    }
    tokio::time::timeout(stall, wr.flush())
        .await
        .map_err(|_| stalled())?
}
