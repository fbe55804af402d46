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
pub mod export;
pub mod handshake;
pub mod mem;
pub mod proto;
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
pub use device::{BlockDevice, BlockSize, DeviceFlags, Extent, MappedRead, ZeroFlags};
pub use export::{Export, Exports};
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
}

/// An NBD server over a table of exports.
pub struct Server<D> {
    exports: Arc<Exports<D>>,
    config: ServerConfig,
    shutdown: watch::Sender<bool>,
}

impl<D: BlockDevice> Server<D> {
    pub fn new(exports: Arc<Exports<D>>, config: ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            exports,
            config,
            shutdown: watch::channel(false).0,
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
            Ok((
                Box::new(sock) as handshake::BoxStream,
                peer.to_string(),
                Transport::Socket,
            ))
        })
        .await
    }

    /// Accepts Unix-socket connections until [`Server::shutdown`].
    pub async fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        self.accept_loop(|| async {
            let (sock, _) = listener.accept().await?;
            Ok((
                Box::new(sock) as handshake::BoxStream,
                "unix".to_string(),
                Transport::Socket,
            ))
        })
        .await
    }

    async fn accept_loop<F, Fut>(self: &Arc<Self>, mut accept: F) -> io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = io::Result<(handshake::BoxStream, String, Transport)>>,
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
                        let me = Arc::clone(self);
                        sessions.spawn(async move { me.session_on(stream, peer, transport).await });
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

    /// Runs one client session to its end over any byte stream, logging how it ended.
    pub async fn session(self: Arc<Self>, stream: handshake::BoxStream, peer: String) {
        self.session_on(stream, peer, Transport::Stream).await
    }

    async fn session_on(self: Arc<Self>, stream: handshake::BoxStream, peer: String, t: Transport) {
        match self.run_session(stream, t).await {
            Ok(()) | Err(SessionError::Disconnected) => debug!(%peer, "session closed"),
            Err(e) => info!(%peer, "session ended: {e}"),
        }
    }

    async fn run_session(
        &self,
        stream: handshake::BoxStream,
        transport: Transport,
    ) -> Result<(), SessionError> {
        let outcome = handshake::negotiate(
            stream,
            &self.exports,
            self.config.tls.as_ref(),
            &self.config.access,
        )
        .await?;
        match outcome {
            handshake::Outcome::Closed => Ok(()),
            handshake::Outcome::Transmission {
                stream,
                export,
                negotiated,
            } => {
                debug!(export = %export.name, structured = negotiated.structured, tls = negotiated.tls, "transmission");
                // Under TLS the payload is encrypted in user space: no mapped reads.
                let kernel_writes = transport == Transport::Socket && !negotiated.tls;
                let stop = self.shutdown.subscribe();
                transmission::serve(stream, export, negotiated, kernel_writes, stop).await
            }
        }
    }
}

/// What a session's stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// A TCP or Unix socket: `writev` hands its buffers straight to the kernel.
    Socket,
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
