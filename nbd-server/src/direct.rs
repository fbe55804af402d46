//! Replies a device sends from its own thread: a FLUSH's reply written to the socket by the
//! thread that ran the sync, without a trip back through the runtime.
//!
//! **Why.** A FLUSH waits for an `fdatasync` on some thread off the runtime. Answering it the
//! ordinary way costs two wake-ups after the sync: the runtime's (to resume the request's
//! task) and the reply writer's. On a write+FLUSH loop at queue depth 1 that was 55–65 µs per
//! pair, most of the gap between a gateway disk and `nbdkit file` (BENCHMARKS.md, "FLUSH
//! answered by the thread that synced"). So the device may take the reply along
//! ([`crate::BlockDevice::flush_detached`]) and send it when its sync is done: a
//! [`FlushReply`] writes the reply straight to the socket when it can, and queues it for the
//! connection's writer task when it cannot.
//!
//! **Invariants.**
//! - Replies never interleave on the wire. The writer task marks itself busy (under
//!   [`Direct::state`]'s lock) before it writes a batch and idle once every byte of it is
//!   written; a direct send happens under that lock, only while the writer is idle and no
//!   earlier direct send left bytes behind. A partly written direct reply leaves its rest as
//!   the *tail*, which the writer takes (under the lock, as it marks itself busy) and writes
//!   before anything else; an empty reply on the writer's queue wakes it for that.
//! - A direct send never blocks: the socket is non-blocking (the descriptor is a duplicate of
//!   the runtime's, which shares its file status flags), so a full socket buffer returns
//!   `WouldBlock` and the reply goes to the writer's queue whole. The lock is held for that
//!   one `send` and, by the writer, for flipping its flag: never across a wait.
//! - A reply's permits ([`Held`]) are released only after its last byte is written, as on the
//!   writer's path.
//! - The duplicate descriptor is owned by the connection's [`Sink`], so it stays valid while
//!   any reply can still use it; a closed connection's number cannot be reused under it.
//! - Only plain TCP and Unix sockets get direct sends: under TLS the writer task encrypts
//!   every byte, so every reply goes through its queue.
//! - A [`FlushReply`] dropped unsent (a device bug, a thread that died) still answers its
//!   request, with an I/O error, so the client is never left waiting.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use tracing::debug;

use crate::device::nbd_errno;
use crate::proto::*;
use crate::reply::{Held, Part, Reply};

/// A duplicate of a connection's socket descriptor, for sends from outside the runtime.
pub(crate) enum Wire {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
    /// Testing only: a socket that takes at most this many bytes per send (a short write).
    #[cfg(test)]
    Short(std::os::unix::net::UnixStream, usize),
}

impl Wire {
    /// A duplicate of `sock`'s descriptor (`None` if the process has no descriptor left).
    pub(crate) fn tcp(sock: &tokio::net::TcpStream) -> Option<Wire> {
        let fd = sock.as_fd().try_clone_to_owned().ok()?;
        Some(Wire::Tcp(std::net::TcpStream::from(fd)))
    }

    /// A duplicate of `sock`'s descriptor (`None` if the process has no descriptor left).
    pub(crate) fn unix(sock: &tokio::net::UnixStream) -> Option<Wire> {
        let fd = sock.as_fd().try_clone_to_owned().ok()?;
        Some(Wire::Unix(std::os::unix::net::UnixStream::from(fd)))
    }

    /// One non-blocking `send`: the descriptor shares the runtime's `O_NONBLOCK`.
    fn send(&self, b: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Tcp(s) => (&*s).write(b),
            Wire::Unix(s) => (&*s).write(b),
            #[cfg(test)]
            Wire::Short(s, max) => (&*s).write(&b[..b.len().min(*max)]),
        }
    }
}

/// What the writer task and direct senders agree on.
#[derive(Default)]
pub(crate) struct State {
    /// The writer task has taken replies and not yet written all their bytes.
    writer_busy: bool,
    /// The unwritten rest of a direct send: the next bytes on the wire.
    tail: Option<Reply>,
    /// Testing only: direct sends that wrote their whole reply.
    #[cfg(test)]
    pub(crate) sent: usize,
}

/// The socket's direct side: the duplicate descriptor and the state shared with the writer.
pub(crate) struct Direct {
    wire: Wire,
    state: Mutex<State>,
}

impl Direct {
    pub(crate) fn new(wire: Wire) -> Self {
        Self {
            wire,
            state: Mutex::new(State::default()),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer task is about to write a batch: from now on no direct send. Returns the
    /// tail of a partly written direct send, to be written first.
    pub(crate) fn writer_begins(&self) -> Option<Reply> {
        let mut s = self.state();
        s.writer_busy = true;
        s.tail.take()
    }

    /// Every byte the writer task took is written: direct sends may go again.
    pub(crate) fn writer_ends(&self) {
        self.state().writer_busy = false;
    }
}

/// Where a connection's replies go: the writer task's queue, and for plain sockets the
/// socket itself.
pub(crate) struct Sink {
    pub(crate) tx: mpsc::UnboundedSender<Reply>,
    pub(crate) direct: Option<Arc<Direct>>,
}

impl Sink {
    /// Queues a reply for the writer task.
    pub(crate) fn queue(&self, reply: Reply) {
        // The writer only goes away when the client has; the reader will notice too.
        let _ = self.tx.send(reply);
    }

    /// Sends a reply on the socket at once when the writer is idle and the socket takes it,
    /// else queues it.
    fn send_now(&self, bytes: Vec<u8>, held: Held) {
        let Some(d) = &self.direct else {
            return self.queue(Reply {
                parts: vec![bytes.into()],
                _held: held,
            });
        };
        let mut s = d.state();
        if s.writer_busy || s.tail.is_some() {
            drop(s);
            return self.queue(Reply {
                parts: vec![bytes.into()],
                _held: held,
            });
        }
        match d.wire.send(&bytes) {
            Ok(n) if n == bytes.len() => {
                #[cfg(test)]
                {
                    s.sent += 1;
                }
                drop(s);
                // Written: the permits go now.
                drop(held);
            }
            Ok(n) if n > 0 => {
                // The socket took a part: the rest must be the next bytes on the wire.
                s.tail = Some(Reply {
                    parts: vec![bytes[n..].to_vec().into()],
                    _held: held,
                });
                drop(s);
                // Wakes the writer, which takes the tail before anything else.
                self.queue(Reply {
                    parts: Vec::new(),
                    _held: Held::default(),
                });
            }
            // Nothing written (a full socket buffer, or a broken connection the writer will
            // report): the writer sends it, or fails on it.
            Ok(_) | Err(_) => {
                drop(s);
                self.queue(Reply {
                    parts: vec![bytes.into()],
                    _held: held,
                });
            }
        }
    }
}

/// A FLUSH's reply, handed to the device (see [`crate::BlockDevice::flush_detached`]): send it
/// with the flush's result from whatever thread ran the flush.
pub struct FlushReply {
    cookie: u64,
    structured: bool,
    held: Option<Held>,
    sink: Arc<Sink>,
}

impl FlushReply {
    pub(crate) fn new(cookie: u64, structured: bool, held: Held, sink: Arc<Sink>) -> Self {
        Self {
            cookie,
            structured,
            held: Some(held),
            sink,
        }
    }

    /// Answers the FLUSH: success, or the error (mapped to an NBD error number, with its
    /// message when structured replies were negotiated). Never blocks.
    pub fn send(mut self, result: io::Result<()>) {
        self.answer(result);
    }

    fn answer(&mut self, result: io::Result<()>) {
        let Some(mut held) = self.held.take() else {
            return;
        };
        let bytes = match result {
            Ok(()) => simple_reply(0, self.cookie).to_vec(),
            Err(e) => {
                if let Some(o) = held.observed.as_mut() {
                    o.ok = false;
                }
                let msg = format!("flush failed: {e}");
                debug!(cookie = self.cookie, errno = nbd_errno(&e), %msg, "request failed");
                let parts = error_parts(self.structured, self.cookie, nbd_errno(&e), &msg);
                parts
                    .into_iter()
                    .flat_map(|p| match p {
                        Part::Bytes(b) => b,
                        Part::Mapped(_) => Vec::new(),
                    })
                    .collect()
            }
        };
        self.sink.send_now(bytes, held);
    }
}

impl Drop for FlushReply {
    fn drop(&mut self) {
        if self.held.is_some() {
            self.answer(Err(io::Error::other(
                "the device dropped the flush unanswered",
            )));
        }
    }
}

impl std::fmt::Debug for FlushReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushReply")
            .field("cookie", &self.cookie)
            .finish()
    }
}

/// An error reply: structured (with the message) when negotiated, else simple.
pub(crate) fn error_parts(structured: bool, cookie: u64, errno: u32, msg: &str) -> Vec<Part> {
    if structured {
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        let mut payload = Vec::with_capacity(6 + msg.len());
        payload.extend_from_slice(&errno.to_be_bytes());
        payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        payload.extend_from_slice(msg);
        let hdr = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            payload.len() as u32,
        );
        vec![hdr.to_vec().into(), payload.into()]
    } else {
        vec![simple_reply(errno, cookie).to_vec().into()]
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::*;

    /// A connection's sink over one end of a socket pair; the other end is the client's.
    fn sink(
        wire: impl FnOnce(UnixStream) -> Wire,
    ) -> (Arc<Sink>, mpsc::UnboundedReceiver<Reply>, UnixStream) {
        let (server, client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let direct = Some(Arc::new(Direct::new(wire(server))));
        (Arc::new(Sink { tx, direct }), rx, client)
    }

    fn read_exact(c: &mut UnixStream, n: usize) -> Vec<u8> {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = vec![0u8; n];
        c.read_exact(&mut b).unwrap();
        b
    }

    fn nothing_to_read(c: &UnixStream) -> bool {
        c.set_nonblocking(true).unwrap();
        let r = (&*c).read(&mut [0u8; 1]);
        c.set_nonblocking(false).unwrap();
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    #[test]
    fn an_idle_writer_lets_the_reply_go_straight_to_the_socket() {
        let (sink, mut rx, mut client) = sink(Wire::Unix);
        FlushReply::new(7, false, Held::default(), Arc::clone(&sink)).send(Ok(()));
        assert_eq!(read_exact(&mut client, 16), simple_reply(0, 7).to_vec());
        assert!(rx.try_recv().is_err(), "nothing was queued");
        assert_eq!(sink.direct.as_ref().unwrap().state().sent, 1);
    }

    #[test]
    fn a_busy_writer_gets_the_reply_on_its_queue() {
        let (sink, mut rx, client) = sink(Wire::Unix);
        let d = Arc::clone(sink.direct.as_ref().unwrap());
        assert!(d.writer_begins().is_none());
        FlushReply::new(8, false, Held::default(), Arc::clone(&sink)).send(Ok(()));
        assert!(
            nothing_to_read(&client),
            "nothing may be written while the writer is busy"
        );
        let queued = rx.try_recv().expect("the reply is queued");
        assert!(matches!(&queued.parts[..], [Part::Bytes(b)] if *b == simple_reply(0, 8).to_vec()));
        d.writer_ends();
        FlushReply::new(9, false, Held::default(), Arc::clone(&sink)).send(Ok(()));
        assert!(rx.try_recv().is_err(), "idle again: sent directly");
    }

    /// A short send leaves the rest of the reply as the tail: the writer task writes it
    /// before a reply queued after it, so the two never interleave on the wire.
    #[tokio::test]
    async fn a_short_send_leaves_a_tail_the_writer_writes_first() {
        let (server, mut client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let dup = server.try_clone().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let direct = Arc::new(Direct::new(Wire::Short(dup, 5)));
        let sink = Arc::new(Sink {
            tx,
            direct: Some(Arc::clone(&direct)),
        });
        FlushReply::new(1, false, Held::default(), Arc::clone(&sink)).send(Ok(()));
        assert!(direct.state().tail.is_some(), "11 bytes left behind");
        // Queued after the short send: must come after the tail.
        sink.queue(Reply {
            parts: vec![simple_reply(0, 2).to_vec().into()],
            _held: Held::default(),
        });
        // Another FLUSH while the tail waits: queued, not sent (the tail comes first).
        FlushReply::new(3, false, Held::default(), Arc::clone(&sink)).send(Ok(()));
        drop(sink);
        let wr = tokio::net::UnixStream::from_std(server).unwrap();
        let writer = tokio::spawn(crate::reply::writer_loop(
            wr,
            rx,
            Duration::from_secs(5),
            Some(Arc::clone(&direct)),
        ));
        let got = tokio::task::spawn_blocking(move || read_exact(&mut client, 48))
            .await
            .unwrap();
        let mut want = simple_reply(0, 1).to_vec();
        want.extend_from_slice(&simple_reply(0, 2));
        want.extend_from_slice(&simple_reply(0, 3));
        assert_eq!(got, want);
        writer.await.unwrap().unwrap();
        assert!(direct.state().tail.is_none());
    }

    #[test]
    fn a_full_socket_sends_the_reply_through_the_queue_whole() {
        let (sink, mut rx, client) = sink(Wire::Unix);
        let d = Arc::clone(sink.direct.as_ref().unwrap());
        // Fill the socket until it takes nothing more.
        let filler = [0u8; 65536];
        while !matches!(d.wire.send(&filler), Err(e) if e.kind() == io::ErrorKind::WouldBlock) {}
        FlushReply::new(4, false, Held::default(), Arc::clone(&sink)).send(Ok(()));
        let queued = rx.try_recv().expect("queued whole");
        assert!(matches!(&queued.parts[..], [Part::Bytes(b)] if *b == simple_reply(0, 4).to_vec()));
        assert!(d.state().tail.is_none());
        drop(client);
    }

    #[test]
    fn errors_and_dropped_replies_are_answered() {
        let (sink, _rx, mut client) = sink(Wire::Unix);
        let enospc = io::Error::from_raw_os_error(28);
        FlushReply::new(5, false, Held::default(), Arc::clone(&sink)).send(Err(enospc));
        assert_eq!(
            read_exact(&mut client, 16),
            simple_reply(ENOSPC, 5).to_vec()
        );
        drop(FlushReply::new(
            6,
            false,
            Held::default(),
            Arc::clone(&sink),
        ));
        assert_eq!(read_exact(&mut client, 16), simple_reply(EIO, 6).to_vec());
        // Structured: an error chunk carrying the message.
        FlushReply::new(7, true, Held::default(), Arc::clone(&sink))
            .send(Err(io::Error::from_raw_os_error(5)));
        let head = read_exact(&mut client, STRUCTURED_HEADER_LEN);
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let body = read_exact(&mut client, len);
        assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), EIO);
        let msg = String::from_utf8_lossy(&body[6..]);
        assert!(msg.starts_with("flush failed:"), "{msg}");
    }
}
