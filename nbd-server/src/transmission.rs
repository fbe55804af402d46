//! The transmission phase: a pipelined request loop with out-of-order replies.
//!
//! One task reads requests (and write payloads) off the socket in order, validates them and
//! spawns one task per request; a single writer task sends replies as they complete, so a
//! reply is never interleaved with another. At most [`MAX_IN_FLIGHT`] requests and
//! [`MAX_IN_FLIGHT_BYTES`] payload bytes are outstanding per connection, and payload bytes of
//! all connections together come out of the server's memory budget; past that the reader
//! stops reading, which pushes back on the client through TCP. Every request, whatever its
//! command or outcome (errors included), holds its slot until its reply is on the socket: a
//! client that never reads its replies has at most [`MAX_IN_FLIGHT`] of them queued, and is
//! disconnected when it takes no byte of them for the reply timeout. BLOCK_STATUS and CACHE
//! work on at most [`MAX_BLOCK_STATUS_LEN`] / [`MAX_CACHE_LEN`] per request and
//! [`MAX_SCANS_IN_FLIGHT`] at once per connection.
//!
//! A write is handed to the device only once its whole payload has arrived, so a client that
//! vanishes mid-request never causes a partial write.
//!
//! On a plain socket, a read the device can offer as mapped memory
//! ([`BlockDevice::read_mapped`]) is queued as that range: the reply's `writev` copies it from
//! the page cache into the socket, one copy instead of two, on the writer's thread.

use std::io;
use std::sync::Arc;

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, trace};

use crate::device::{nbd_errno, BlockDevice, Extent, ZeroFlags};
use crate::direct::{error_parts, Direct, FlushReply, Sink, Wire};
use crate::export::Export;
use crate::handshake::{BoxStream, Negotiated};
use crate::proto::*;
use crate::reply::{
    split_holes, structured_data, structured_data_head, writer_loop, Held, Part, Reply,
    HOLE_SCAN_MIN,
};
use crate::SessionError;

/// What a session's transmission phase gets from the server.
pub struct Context {
    /// The server's payload memory budget, shared by all connections.
    pub memory: Arc<Semaphore>,
    pub idle_timeout: Option<Duration>,
    pub reply_timeout: Duration,
    /// Statistics of this session's export.
    pub observer: Option<Arc<dyn crate::observe::ExportObserver>>,
    /// A duplicate of a plain socket's descriptor: FLUSH replies may be sent from the
    /// device's thread (see `crate::direct`), and the reply writer's `writev` goes straight
    /// to the kernel, so mapped reads are allowed. `None` under TLS and for other streams.
    pub(crate) wire: Option<Wire>,
}

struct Conn<D> {
    export: Arc<Export<D>>,
    neg: Negotiated,
    size: u64,
    sink: Arc<Sink>,
    observer: Option<Arc<dyn crate::observe::ExportObserver>>,
}

impl<D: BlockDevice> Conn<D> {
    fn send_held(&self, parts: Vec<Part>, held: Held) {
        self.sink.queue(Reply { parts, _held: held });
    }

    /// Replies with an error, structured (with a message) when negotiated.
    fn error(&self, cookie: u64, errno: u32, msg: &str, mut held: Held) {
        if let Some(o) = held.observed.as_mut() {
            o.ok = false;
        }
        debug!(export = %self.export.name, cookie, errno, msg, "request failed");
        let parts = error_parts(self.neg.structured, cookie, errno, msg);
        self.send_held(parts, held);
    }

    fn ok(&self, cookie: u64, held: Held) {
        self.send_held(vec![simple_reply(0, cookie).to_vec().into()], held);
    }

    fn done(&self, cookie: u64, r: io::Result<()>, what: &str, held: Held) {
        match r {
            Ok(()) => self.ok(cookie, held),
            Err(e) => self.error(cookie, nbd_errno(&e), &format!("{what} failed: {e}"), held),
        }
    }

    /// Is `[offset, offset+len)` inside the export?
    fn in_bounds(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    fn read_reply(&self, cookie: u64, offset: u64, data: Vec<u8>, df: bool, held: Held) {
        let parts = if !self.neg.structured {
            vec![simple_reply(0, cookie).to_vec().into(), data.into()]
        } else if df || data.len() < HOLE_SCAN_MIN {
            structured_data(cookie, offset, data, true)
        } else {
            split_holes(cookie, offset, data)
        };
        self.send_held(parts, held);
    }

    /// Answers a valid, non-empty read: as mapped memory, at once from the page cache, or
    /// from the blocking pool.
    fn read(self: &Arc<Self>, cookie: u64, offset: u64, len: u32, df: bool, held: Held) {
        if let Some(parts) = self.mapped_read(cookie, offset, len) {
            // The writer's `writev` does the only copy.
            self.send_held(parts, held);
            return;
        }
        let want = len as usize;
        match self.export.device.read_now(offset, want) {
            // Served without blocking: no task, no thread hop.
            Some(r) => self.read_done(cookie, offset, want, r, df, held),
            None => {
                let c = Arc::clone(self);
                tokio::spawn(async move {
                    let r = c.export.device.read(offset, want).await;
                    c.read_done(cookie, offset, want, r, df, held);
                });
            }
        }
    }

    fn read_done(
        &self,
        cookie: u64,
        offset: u64,
        want: usize,
        r: io::Result<Vec<u8>>,
        df: bool,
        held: Held,
    ) {
        match r {
            Ok(data) if data.len() == want => self.read_reply(cookie, offset, data, df, held),
            Ok(_) => self.error(cookie, EIO, "device returned a short read", held),
            Err(e) => self.error(cookie, nbd_errno(&e), &format!("read: {e}"), held),
        }
    }

    /// The reply to a read as mapped memory, if the device offers it on this connection.
    fn mapped_read(&self, cookie: u64, offset: u64, len: u32) -> Option<Vec<Part>> {
        // Only on a plain socket, whose writer's `writev` goes straight to the kernel.
        self.sink.direct.as_ref()?;
        let m = self.export.device.read_mapped(offset, len as usize)?;
        if m.len() != len as usize {
            // A device bug; the ordinary path answers instead.
            debug!(export = %self.export.name, offset, len, got = m.len(), "mapped read of the wrong length");
            return None;
        }
        let head = if self.neg.structured {
            structured_data_head(cookie, offset, len, true)
        } else {
            simple_reply(0, cookie).to_vec()
        };
        Some(vec![head.into(), Part::Mapped(m)])
    }

    fn block_status_reply(
        &self,
        cookie: u64,
        extents: &[Extent],
        len: u64,
        req_one: bool,
        held: Held,
    ) {
        let mut payload = Vec::with_capacity(4 + 8 * extents.len().min(MAX_EXTENTS));
        payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        let mut left = len;
        let mut count = 0usize;
        let mut last: Option<(u64, u32)> = None;
        let push = |payload: &mut Vec<u8>, (l, f): (u64, u32)| {
            payload.extend_from_slice(&(l as u32).to_be_bytes());
            payload.extend_from_slice(&f.to_be_bytes());
        };
        for e in extents {
            if left == 0 || count >= MAX_EXTENTS {
                break;
            }
            let l = e.length.min(left);
            if l == 0 {
                continue;
            }
            left -= l;
            let flags =
                (if e.hole { STATE_HOLE } else { 0 }) | (if e.zero { STATE_ZERO } else { 0 });
            match last {
                Some((pl, pf)) if pf == flags => last = Some((pl + l, pf)),
                Some(prev) => {
                    push(&mut payload, prev);
                    count += 1;
                    last = Some((l, flags));
                }
                None => last = Some((l, flags)),
            }
            if req_one {
                break;
            }
        }
        match last {
            Some(prev) => push(&mut payload, prev),
            None => {
                self.error(cookie, EIO, "device returned no extents", held);
                return;
            }
        }
        let hdr = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            payload.len() as u32,
        );
        self.send_held(vec![hdr.to_vec().into(), payload.into()], held);
    }
}

/// Reads a request payload of `len` bytes into a fresh buffer (without zero-filling it first).
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    len: usize,
) -> Result<Vec<u8>, SessionError> {
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let mut limited = (&mut *rd).take((len - data.len()) as u64);
        match limited.read_buf(&mut data).await {
            Ok(0) => return Err(SessionError::Disconnected),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(data)
}

/// Reads and discards `len` payload bytes.
async fn drain<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> Result<(), SessionError> {
    let n = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink()).await?;
    if n != len {
        return Err(SessionError::Disconnected);
    }
    Ok(())
}

/// Serves requests on a negotiated connection until the client disconnects or the server
/// shuts down; in-flight requests are completed and answered first.
pub async fn serve<D: BlockDevice>(
    stream: BoxStream,
    export: Arc<Export<D>>,
    neg: Negotiated,
    ctx: Context,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let (rd, wr) = stream.into_halves();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    // Unbounded only in type: every reply holds a slot, so at most MAX_IN_FLIGHT are queued.
    let (tx, rx) = mpsc::unbounded_channel();
    let direct = ctx.wire.map(|w| Arc::new(Direct::new(w)));
    let sink = Arc::new(Sink {
        tx,
        direct: direct.clone(),
    });
    let mut writer = tokio::spawn(writer_loop(wr, rx, ctx.reply_timeout, direct));
    let limits = ConnLimits {
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        bytes: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES)),
        memory: ctx.memory,
        scans: Arc::new(Semaphore::new(MAX_SCANS_IN_FLIGHT)),
        idle_timeout: ctx.idle_timeout,
    };
    let slots = Arc::clone(&limits.slots);
    let conn = Arc::new(Conn {
        size: export.device.size(),
        export,
        neg,
        sink,
        observer: ctx.observer,
    });

    let result = tokio::select! {
        r = request_loop(&mut rd, &conn, &limits, &mut shutdown) => r,
        // The writer only stops early when the socket failed (the client is gone, or a mapped
        // read's image shrank under it): stop reading requests and close the connection.
        w = &mut writer => {
            return Err(match w {
                Ok(Err(e)) if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) => SessionError::Disconnected,
                Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => SessionError::Io(e),
                Ok(Err(e)) => SessionError::Reply(e),
                Ok(Ok(())) => SessionError::Protocol("reply writer stopped"),
                Err(e) => SessionError::Io(io::Error::other(format!("reply writer task failed: {e}"))),
            });
        }
    };

    // Let every accepted request finish and queue its reply, then close the writer.
    let _all = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(conn);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => trace!("reply writer ended: {e}"),
        Err(e) => debug!("reply writer task failed: {e}"),
    }
    result
}

/// A connection's bounds on what its requests hold.
struct ConnLimits {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    scans: Arc<Semaphore>,
    idle_timeout: Option<Duration>,
}

impl ConnLimits {
    /// `n` payload bytes: the connection's share, then the server's.
    async fn payload(
        &self,
        n: u32,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), SessionError> {
        let closed = |_| SessionError::Protocol("semaphore closed");
        let mine = Arc::clone(&self.bytes)
            .acquire_many_owned(n)
            .await
            .map_err(closed)?;
        let server = Arc::clone(&self.memory)
            .acquire_many_owned(n)
            .await
            .map_err(closed)?;
        Ok((mine, server))
    }

    fn nothing_in_flight(&self) -> bool {
        self.slots.available_permits() == MAX_IN_FLIGHT
    }
}

/// Waits until the next request starts arriving (without consuming it): fails after the idle
/// timeout when nothing is in flight. `Ok(false)`: shutdown.
async fn await_request<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    limits: &ConnLimits,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, SessionError> {
    let Some(idle) = limits.idle_timeout else {
        return Ok(true);
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(false),
            // fill_buf consumes nothing, so giving up on it loses no byte.
            r = rd.fill_buf() => {
                r?;
                return Ok(true);
            }
            _ = tokio::time::sleep(idle) => {
                if limits.nothing_in_flight() {
                    return Err(SessionError::IdleTimeout(idle));
                }
            }
        }
    }
}

async fn request_loop<D: BlockDevice, R: AsyncBufRead + Unpin>(
    rd: &mut R,
    conn: &Arc<Conn<D>>,
    limits: &ConnLimits,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if !await_request(rd, limits, shutdown).await? {
            return Ok(());
        }
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            r = rd.read_exact(&mut hdr) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(SessionError::Disconnected)
                }
                Err(e) => return Err(e.into()),
            },
        }
        let started = std::time::Instant::now();
        let req = decode_request(&hdr).map_err(SessionError::Decode)?;
        trace!(?req, "request");
        if req.command == CMD_DISC {
            return Ok(());
        }
        // Every request, answered or refused, holds a slot until its reply is written.
        let slot = Arc::clone(&limits.slots)
            .acquire_owned()
            .await
            .map_err(|_| SessionError::Protocol("semaphore closed"))?;
        let mut held = Held::slot(slot);
        if let Some(o) = &conn.observer {
            held.observed = Some(crate::observe::Observed::new(
                Arc::clone(o),
                req.command,
                req.length,
                started,
            ));
        }
        let c = Arc::clone(conn);
        let cookie = req.cookie;
        let len = u64::from(req.length);
        let ro = c.export.read_only;
        let bad_flags = |allowed: u16| req.flags & !allowed != 0;

        match req.command {
            CMD_WRITE => {
                if req.length > MAX_PAYLOAD {
                    drain(rd, len).await?;
                    c.error(
                        cookie,
                        EINVAL,
                        "write larger than the maximum payload",
                        held,
                    );
                    continue;
                }
                let (bytes, memory) = limits.payload(req.length.max(1)).await?;
                // Client vanished mid-payload: nothing is written.
                let data = read_payload(rd, req.length as usize).await?;
                // The payload is in memory until the device has it; the reply is small.
                let held = Held {
                    _bytes: Some(bytes),
                    _memory: Some(memory),
                    ..held
                };
                if bad_flags(CMD_FLAG_FUA) {
                    c.error(cookie, EINVAL, "unsupported flags for WRITE", held);
                } else if ro {
                    c.error(cookie, EPERM, "export is read-only", held);
                } else if !c.in_bounds(req.offset, len) {
                    c.error(cookie, ENOSPC, "write beyond the end of the export", held);
                } else if len == 0 {
                    c.ok(cookie, held);
                } else {
                    let fua = req.flags & CMD_FLAG_FUA != 0;
                    if let Some(r) = c.export.device.write_now(req.offset, &data, fua) {
                        // Done on this task: no thread hop, and writes to one export from one
                        // connection do not contend for the file's lock.
                        drop(data);
                        c.done(cookie, r, "write", held);
                    } else {
                        tokio::spawn(async move {
                            let r = c.export.device.write(req.offset, data, fua).await;
                            c.done(cookie, r, "write", held);
                        });
                    }
                }
            }
            CMD_READ => {
                let allowed = if c.neg.structured { CMD_FLAG_DF } else { 0 };
                if bad_flags(allowed) {
                    c.error(cookie, EINVAL, "unsupported flags for READ", held);
                } else if req.length > MAX_PAYLOAD {
                    c.error(cookie, EINVAL, "read larger than the maximum payload", held);
                } else if !c.in_bounds(req.offset, len) {
                    c.error(cookie, EINVAL, "read beyond the end of the export", held);
                } else if len == 0 {
                    c.read_reply(cookie, req.offset, Vec::new(), true, held);
                } else {
                    // The slot and the bytes stay held until the reply has been written, so
                    // a client that does not read its replies cannot make them pile up.
                    let (bytes, memory) = limits.payload(req.length).await?;
                    let held = Held {
                        _bytes: Some(bytes),
                        _memory: Some(memory),
                        ..held
                    };
                    let df = req.flags & CMD_FLAG_DF != 0;
                    c.read(cookie, req.offset, req.length, df, held);
                }
            }
            CMD_FLUSH => {
                if bad_flags(0) {
                    c.error(cookie, EINVAL, "unsupported flags for FLUSH", held);
                } else {
                    let sink = Arc::clone(&c.sink);
                    let reply = FlushReply::new(cookie, c.neg.structured, held, sink);
                    // The device may run the flush on a thread of its own and answer from
                    // there (no trip back through the runtime); else a task awaits it.
                    if let Some(reply) = c.export.device.flush_detached(reply) {
                        tokio::spawn(async move {
                            reply.send(c.export.device.flush().await);
                        });
                    }
                }
            }
            CMD_TRIM => {
                if bad_flags(CMD_FLAG_FUA) {
                    c.error(cookie, EINVAL, "unsupported flags for TRIM", held);
                } else if ro {
                    c.error(cookie, EPERM, "export is read-only", held);
                } else if !c.export.device.flags().trim {
                    c.error(cookie, EINVAL, "trim is not supported by this export", held);
                } else if !c.in_bounds(req.offset, len) {
                    c.error(cookie, EINVAL, "trim beyond the end of the export", held);
                } else if len == 0 {
                    c.ok(cookie, held);
                } else {
                    tokio::spawn(async move {
                        let fua = req.flags & CMD_FLAG_FUA != 0;
                        let r = c.export.device.trim(req.offset, len, fua).await;
                        c.done(cookie, r, "trim", held);
                    });
                }
            }
            CMD_WRITE_ZEROES => {
                let allowed = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO;
                if bad_flags(allowed) {
                    c.error(cookie, EINVAL, "unsupported flags for WRITE_ZEROES", held);
                } else if ro {
                    c.error(cookie, EPERM, "export is read-only", held);
                } else if !c.in_bounds(req.offset, len) {
                    let msg = "write zeroes beyond the end of the export";
                    c.error(cookie, ENOSPC, msg, held);
                } else if len == 0 {
                    c.ok(cookie, held);
                } else {
                    tokio::spawn(async move {
                        let flags = ZeroFlags {
                            may_trim: req.flags & CMD_FLAG_NO_HOLE == 0,
                            fast_only: req.flags & CMD_FLAG_FAST_ZERO != 0,
                            fua: req.flags & CMD_FLAG_FUA != 0,
                        };
                        let r = c.export.device.write_zeroes(req.offset, len, flags).await;
                        c.done(cookie, r, "write zeroes", held);
                    });
                }
            }
            CMD_BLOCK_STATUS => {
                let negotiated = c.neg.structured
                    && c.neg.meta_export.as_deref() == Some(c.export.name.as_str());
                if bad_flags(CMD_FLAG_REQ_ONE) {
                    c.error(cookie, EINVAL, "unsupported flags for BLOCK_STATUS", held);
                } else if !negotiated {
                    c.error(cookie, EINVAL, "no metadata context was negotiated", held);
                } else if len == 0 || !c.in_bounds(req.offset, len) {
                    let msg = "block status range is empty or out of bounds";
                    c.error(cookie, EINVAL, msg, held);
                } else {
                    let held = Held {
                        _scan: Some(scan_permit(limits).await?),
                        ..held
                    };
                    // The reply may cover less than asked; the client asks again for the rest.
                    let len = len.min(MAX_BLOCK_STATUS_LEN);
                    tokio::spawn(async move {
                        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
                        let r = if c.export.device.flags().block_status {
                            c.export.device.block_status(req.offset, len).await
                        } else {
                            Ok(vec![Extent {
                                length: len,
                                hole: false,
                                zero: false,
                            }])
                        };
                        match r {
                            Ok(ext) => c.block_status_reply(cookie, &ext, len, req_one, held),
                            Err(e) => {
                                let msg = format!("block status: {e}");
                                c.error(cookie, nbd_errno(&e), &msg, held)
                            }
                        }
                    });
                }
            }
            CMD_CACHE => {
                if bad_flags(0) {
                    c.error(cookie, EINVAL, "unsupported flags for CACHE", held);
                } else if !c.in_bounds(req.offset, len) {
                    c.error(cookie, EINVAL, "cache beyond the end of the export", held);
                } else {
                    let held = Held {
                        _scan: Some(scan_permit(limits).await?),
                        ..held
                    };
                    // A hint: past MAX_CACHE_LEN it is ignored, and the reply is still success.
                    let len = len.min(MAX_CACHE_LEN);
                    tokio::spawn(async move {
                        let r = c.export.device.cache(req.offset, len).await;
                        c.done(cookie, r, "cache", held);
                    });
                }
            }
            _ => c.error(cookie, EINVAL, "unknown command", held),
        }
    }
}

/// One of the connection's BLOCK_STATUS/CACHE places, held until the reply is written.
async fn scan_permit(limits: &ConnLimits) -> Result<OwnedSemaphorePermit, SessionError> {
    Arc::clone(&limits.scans)
        .acquire_owned()
        .await
        .map_err(|_| SessionError::Protocol("semaphore closed"))
}
