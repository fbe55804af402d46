//! An NBD (Network Block Device) server over tokio.
//!
//! The protocol is implemented from the NBD specification: fixed-newstyle handshake with
//! `NO_ZEROES`; options `EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT`, `SET_META_CONTEXT` (`base:allocation`); commands
//! `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `BLOCK_STATUS`, `CACHE` with flags
//! `FUA`, `NO_HOLE`, `DF`, `REQ_ONE`, `FAST_ZERO`. Requests are pipelined and answered out of
//! order. Unknown options are drained and refused with `NBD_REP_ERR_UNSUP`.
//!
//! The server knows nothing about what is behind an export: it is generic over
//! [`BlockDevice`]. Limits are the named constants in [`proto`].

pub mod access;
pub mod device;
mod direct;
pub mod export;
pub mod handshake;
pub mod limits;
pub mod mem;
pub mod observe;
pub mod proto;
mod reply;
pub mod tls;
mod transmission;

use std::io;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use access::Access;
pub use device::{BlockDevice, BlockSize, DeviceFlags, Extent, FlushReply, MappedRead, ZeroFlags};
pub use export::{Export, Exports};
pub use limits::Limits;
pub use observe::{ExportObserver, Observer};
pub use tls::{ClientIdentity, TlsConfig, TlsError};

/// Why a client session ended abnormally. None of these affect other sessions.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("client disconnected")]
    Disconnected,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("bad request: {0}")]
    Decode(proto::DecodeError),
    #[error("client asked for unknown export '{0}'")]
    UnknownExport(String),
    #[error("handshake not finished within {0:?}: closed")]
    HandshakeTimeout(std::time::Duration),
    #[error("no request for {0:?} with nothing in flight: closed (idle timeout)")]
    IdleTimeout(std::time::Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("sending a reply failed: {0}{hint}", hint = reply_hint(.0))]
    Reply(io::Error),
}

fn reply_hint(e: &io::Error) -> &'static str {
    /// Linux's EFAULT: the kernel could not copy a mapped read, e.g. the file behind it shrank.
    const EFAULT: i32 = 14;
    if e.raw_os_error() == Some(EFAULT) {
        " (the memory of a mapped read went away: did a disk image shrink while it was served?)"
    } else {
        ""
    }
}

/// Server settings.
#[derive(Clone, Default)]
pub struct ServerConfig {
    /// STARTTLS support (and whether it is mandatory).
    pub tls: Option<TlsConfig>,
    /// Which client may see and open which export.
    pub access: Access,
    pub limits: Limits,
    /// Told about every answered request (statistics); none by default.
    pub observer: Option<Arc<dyn Observer>>,
}

/// An NBD server over a table of exports.
pub struct Server<D> {
    exports: Arc<Exports<D>>,
    config: ServerConfig,
    shutdown: watch::Sender<bool>,
    admission: Arc<limits::Admission>,
    /// Payload bytes all connections together may hold ([`Limits::memory_budget`]).
    memory: Arc<tokio::sync::Semaphore>,
    /// When a refused connection was last logged (seconds since start), to log bursts once.
    last_refusal_log: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

impl<D: BlockDevice> Server<D> {
    pub fn new(exports: Arc<Exports<D>>, config: ServerConfig) -> Arc<Self> {
        let l = &config.limits;
        let admission = limits::Admission::new(l.max_sessions, l.max_sessions_per_client);
        let memory = Arc::new(tokio::sync::Semaphore::new(
            l.memory_budget.min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        Arc::new(Self {
            exports,
            config,
            shutdown: watch::channel(false).0,
            admission,
            memory,
            last_refusal_log: std::sync::atomic::AtomicU64::new(u64::MAX),
            started: std::time::Instant::now(),
        })
    }

    pub fn exports(&self) -> &Arc<Exports<D>> {
        &self.exports
    }

    /// Asks every listener to stop accepting and every connection to finish its in-flight
    /// requests and close.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Accepts TCP connections until [`Server::shutdown`]; then waits for open sessions.
    pub async fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        self.accept_loop(|| async {
            let (sock, peer) = listener.accept().await?;
            let _ = sock.set_nodelay(true);
            let wire = direct::Wire::tcp(&sock);
            Ok((
                Box::new(sock) as handshake::BoxStream,
                Peer::Ip(peer),
                Transport::Socket(wire),
            ))
        })
        .await
    }

    /// Accepts Unix-socket connections until [`Server::shutdown`].
    pub async fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        self.accept_loop(|| async {
            let (sock, _) = listener.accept().await?;
            let wire = direct::Wire::unix(&sock);
            Ok((
                Box::new(sock) as handshake::BoxStream,
                Peer::Unix,
                Transport::Socket(wire),
            ))
        })
        .await
    }

    async fn accept_loop<F, Fut>(self: &Arc<Self>, mut accept: F) -> io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = io::Result<(handshake::BoxStream, Peer, Transport)>>,
    {
        let mut stop = self.shutdown.subscribe();
        let mut sessions = JoinSet::new();
        loop {
            if *stop.borrow_and_update() {
                break;
            }
            tokio::select! {
                _ = stop.changed() => {}
                r = accept() => match r {
                    Ok((stream, peer, transport)) => {
                        let ip = match peer {
                            Peer::Ip(a) => Some(a.ip().to_canonical()),
                            Peer::Unix => None,
                        };
                        match self.admission.admit(ip) {
                            Ok(ticket) => {
                                let me = Arc::clone(self);
                                let peer = peer.to_string();
                                sessions.spawn(async move {
                                    me.session_on(stream, peer, transport).await;
                                    drop(ticket);
                                });
                            }
                            // Closed at once: nothing is sent, nothing is held.
                            Err(why) => self.log_refusal(&peer, why),
                        }
                    }
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        while sessions.join_next().await.is_some() {}
        Ok(())
    }

    /// Logs a refused connection; a burst of them is logged once every 10 s.
    fn log_refusal(&self, peer: &Peer, why: limits::Refusal) {
        use std::sync::atomic::Ordering;
        let now = self.started.elapsed().as_secs();
        let last = self.last_refusal_log.load(Ordering::Relaxed);
        let l = &self.config.limits;
        if last == u64::MAX || now >= last + 10 {
            self.last_refusal_log.store(now, Ordering::Relaxed);
            match why {
                limits::Refusal::TooManySessions => warn!(
                    %peer, max = l.max_sessions,
                    "connection refused: the server has its maximum of sessions open (more refusals are logged at most every 10 s)"
                ),
                limits::Refusal::TooManyFromClient => warn!(
                    %peer, max = l.max_sessions_per_client,
                    "connection refused: this client address has its maximum of sessions open (more refusals are logged at most every 10 s)"
                ),
            }
        } else {
            debug!(%peer, ?why, "connection refused");
        }
    }

    /// Open sessions (admitted connections) across all listeners.
    pub fn open_sessions(&self) -> usize {
        self.admission.open_sessions()
    }

    /// Runs one client session to its end over any byte stream, logging how it ended.
    pub async fn session(self: Arc<Self>, stream: handshake::BoxStream, peer: String) {
        self.session_on(stream, peer, Transport::Stream).await
    }

    async fn session_on(self: Arc<Self>, stream: handshake::BoxStream, peer: String, t: Transport) {
        match self.run_session(stream, t).await {
            Ok(()) | Err(SessionError::Disconnected) => debug!(%peer, "session closed"),
            // Many at once under a connection flood: not worth a line each.
            Err(e @ SessionError::HandshakeTimeout(_)) => debug!(%peer, "session ended: {e}"),
            Err(e) => info!(%peer, "session ended: {e}"),
        }
    }

    async fn run_session(
        &self,
        stream: handshake::BoxStream,
        transport: Transport,
    ) -> Result<(), SessionError> {
        let limit = self.config.limits.handshake_timeout;
        let outcome = tokio::time::timeout(
            limit,
            handshake::negotiate(
                stream,
                &self.exports,
                self.config.tls.as_ref(),
                &self.config.access,
            ),
        )
        .await
        .map_err(|_| SessionError::HandshakeTimeout(limit))??;
        match outcome {
            handshake::Outcome::Closed => Ok(()),
            handshake::Outcome::Transmission {
                stream,
                export,
                negotiated,
            } => {
                debug!(export = %export.name, structured = negotiated.structured, tls = negotiated.tls, "transmission");
                // Under TLS the payload is encrypted in user space: no mapped reads, and no
                // reply written past the TLS writer.
                let wire = match transport {
                    Transport::Socket(wire) if !negotiated.tls => wire,
                    Transport::Socket(_) | Transport::Stream => None,
                };
                let stop = self.shutdown.subscribe();
                let ctx = transmission::Context {
                    memory: Arc::clone(&self.memory),
                    idle_timeout: self.config.limits.idle_timeout,
                    reply_timeout: self.config.limits.reply_timeout,
                    observer: self
                        .config
                        .observer
                        .as_ref()
                        .map(|o| o.export(&export.name)),
                    wire,
                };
                transmission::serve(stream, export, negotiated, ctx, stop).await
            }
        }
    }
}

/// Where a connection comes from.
enum Peer {
    Ip(std::net::SocketAddr),
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Ip(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// What a session's stream is.
enum Transport {
    /// A TCP or Unix socket: `writev` hands its buffers straight to the kernel. With a
    /// duplicate of its descriptor for replies sent from a device's thread (`None` if the
    /// process had no descriptor left for it: then the socket is served as a stream).
    Socket(Option<direct::Wire>),
    /// Some other byte stream, which may read the buffers it is given in user space.
    Stream,
}

/// Binds a Unix socket listener, replacing a stale socket file left by a previous run.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path)?;
            info!(path = %path.display(), "removed stale socket");
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}
