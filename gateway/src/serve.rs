//! `standby serve`: every disk of the data directory as an NBD export.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use nbd_server::{BlockDevice, Export, Exports, Server, ServerConfig, TlsConfig};
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::catalog::{CatalogError, DataDir};
use crate::failover::Device;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("'{0}' is not a listen address: use IP:PORT, e.g. 127.0.0.1:10809")]
    BadAddress(String),
    #[error("cannot listen on {addr}: {source} (is another server using the port?)")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] nbd_server::TlsError),
    #[error("TLS needs both a certificate and a key (--tls-cert and --tls-key)")]
    TlsIncomplete,
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}

/// Where and how to serve.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub listen: Option<String>,
    pub socket: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
}

impl ServeOptions {
    /// Command-line values override the configuration file.
    pub fn merged_with(mut self, dd: &DataDir) -> Self {
        let c = &dd.config().serve;
        self.listen = self.listen.or_else(|| c.listen.clone());
        self.socket = self.socket.or_else(|| c.socket.clone());
        self.tls_cert = self.tls_cert.or_else(|| c.tls_cert.clone());
        self.tls_key = self.tls_key.or_else(|| c.tls_key.clone());
        self.tls_required |= c.tls_required;
        self
    }
}

/// Opens every disk of the data directory as an export.
pub fn exports(dd: &DataDir) -> Result<Arc<Exports<Device>>, ServeError> {
    let exports = Arc::new(Exports::new());
    for rec in dd.disks()?.values() {
        let disk = dd.open_disk(rec)?;
        exports.insert(Export {
            name: rec.name.clone(),
            description: format!("standby disk {}", rec.name),
            read_only: rec.read_only,
            device: Arc::new(Device::Live(disk)),
        });
    }
    Ok(exports)
}

/// Serves until SIGINT or SIGTERM, then finishes in-flight requests and flushes every disk.
pub async fn serve(dd: &DataDir, opts: ServeOptions) -> Result<(), ServeError> {
    // Handlers first: a SIGTERM arriving any time after start-up is a clean shutdown.
    let mut signals = Signals::install()?;
    // One server per data directory, taken before any disk or log is opened.
    let _lock = crate::datadir_lock::DataDirLock::acquire(dd.root())?;
    let opts = opts.merged_with(dd);
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Some(TlsConfig::from_pem_files(c, k, opts.tls_required)?),
        (None, None) if !opts.tls_required => None,
        _ => return Err(ServeError::TlsIncomplete),
    };
    let exports = exports(dd)?;
    let server = Server::new(Arc::clone(&exports), ServerConfig { tls: tls.clone() });

    let listen = opts
        .listen
        .clone()
        .unwrap_or_else(|| crate::config::DEFAULT_LISTEN.to_string());
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| ServeError::BadAddress(listen.clone()))?;
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen.clone(),
            source,
        })?;
    let bound = tcp.local_addr().map_err(|source| ServeError::Bind {
        addr: listen.clone(),
        source,
    })?;
    let unix = match &opts.socket {
        Some(p) => Some(nbd_server::bind_unix(p).map_err(|source| ServeError::Bind {
            addr: p.display().to_string(),
            source,
        })?),
        None => None,
    };

    let names: Vec<String> = exports.list().iter().map(|e| e.name.clone()).collect();
    info!(%bound, disks = names.len(), tls = tls.is_some(), "serving");
    // One line on stdout that scripts (and tests) can wait for.
    println!(
        "standby: serving {} disk(s) on nbd://{bound}{}{}",
        names.len(),
        opts.socket
            .as_ref()
            .map(|p| format!(" and unix socket {}", p.display()))
            .unwrap_or_default(),
        if tls.is_some() { " (TLS)" } else { "" }
    );

    // The replication engine drives protected VMs while the disks are served.
    let (stop_engine, engine_stop_rx) = tokio::sync::watch::channel(false);
    let served = crate::replication::engine::disk_map(
        exports
            .list()
            .iter()
            .filter_map(|e| e.device.live().cloned()),
    );
    let engine = match crate::replication::Engine::new(
        dd.clone(),
        served,
        Arc::clone(&exports),
        bound.to_string(),
        engine_stop_rx,
    ) {
        Ok(engine) => Some(tokio::spawn(engine.run())),
        Err(e) => {
            error!("replication engine not started: {e}");
            None
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    {
        let s = Arc::clone(&server);
        tasks.spawn(async move { s.serve_tcp(tcp).await });
    }
    if let Some(u) = unix {
        let s = Arc::clone(&server);
        tasks.spawn(async move { s.serve_unix(u).await });
    }

    signals.wait().await;
    info!("shutting down: stopping replication, finishing in-flight requests");
    let _ = stop_engine.send(true);
    if let Some(h) = engine {
        if let Err(e) = h.await {
            error!("replication engine task failed: {e}");
        }
    }
    server.shutdown();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("listener ended with error: {e}"),
            Err(e) => error!("listener task failed: {e}"),
        }
    }
    if let Some(p) = &opts.socket {
        let _ = std::fs::remove_file(p);
    }
    let mut failed = false;
    for e in exports.list() {
        if let Err(err) = e.device.flush().await {
            error!(disk = %e.name, "final flush failed: {err}");
            failed = true;
        }
        // Seals the change log of a tracked disk (clean shutdown).
        if let Err(err) = e.device.close().await {
            error!(disk = %e.name, "closing the change log failed: {err}");
            failed = true;
        }
    }
    if !failed {
        info!("stopped cleanly; all disks flushed");
    }
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, ServeError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(ServeError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(ServeError::Signal)?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM received"),
            _ = self.int.recv() => info!("SIGINT received"),
        }
    }
}
