//! The HTTP API (`/api/v1/...`) and Prometheus metrics (`/metrics`), served by `standby serve`.
//!
//! Design:
//! - One listener, default `127.0.0.1:8080` (`[api] listen`, `--api-listen`). Who may reach it
//!   is decided at start-up like NBD's: on loopback, plain HTTP is allowed; beyond loopback the
//!   API needs HTTPS (`[api] tls_cert` + `tls_key`, loaded by the same code as NBD's
//!   certificates) unless the admin gives `insecure_no_tls`. Anything else refuses to start with
//!   an error that names the missing setting.
//! - Every request carries `Authorization: Bearer TOKEN` ([`tokens`]); read-only tokens may only
//!   read (403 on actions). Errors are one JSON shape ([`error`]).
//! - Handlers never block a tokio worker: database work runs on the blocking pool
//!   ([`ApiState::blocking`]); actions call the same functions as the CLI
//!   ([`crate::replication::actions`]); actions are handed to the replication engine as typed
//!   requests ([`crate::replication::requests`]), which it carries out at once.
//! - The CLI on the same host finds the API and authenticates through the local admin
//!   credential the gateway writes at start ([`local`]).
//! - At most [`MAX_API_CONNECTIONS`] connections; a client has [`HEADER_TIMEOUT`] for the TLS
//!   handshake and for each request's headers, so idle or slow clients cannot pile up.
//! - When the listen address is the default (nothing configured) and it is taken, the gateway
//!   serves its disks without the API and logs why; a configured address that cannot be bound is
//!   a start-up error.

pub mod auth;
pub mod error;
pub mod handlers;
pub mod local;
pub mod openapi;
pub mod router;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nbd_server::{Exports, TlsConfig};
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::catalog::DataDir;
use crate::failover::Device;
use crate::metrics::Metrics;
use crate::replication::{Db, EngineHandle};
use crate::serve::Reach;
use error::ApiError;
use tokens::TokenStore;

/// Default API listen address.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8080";
/// Open API connections at most; more are closed at once (and logged).
pub const MAX_API_CONNECTIONS: usize = 256;
/// A client has this long to send a request's headers (and, on HTTPS, finish the handshake).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ApiStartError {
    #[error("'{0}' is not an API listen address: use IP:PORT, e.g. 127.0.0.1:8080")]
    BadAddress(String),
    #[error("cannot listen for the API on {addr}: {source} (is another server using the port? set [api] listen or --api-listen)")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("API TLS needs both a certificate and a key ([api] tls_cert and tls_key)")]
    TlsIncomplete,
    #[error("API TLS: {0}")]
    Tls(#[from] nbd_server::TlsError),
    #[error(
        "refusing to serve the HTTP API in plain text on {0}, which is reachable beyond this \
         host: tokens would cross the network readable. Give [api] tls_cert and tls_key \
         (--api-tls-cert, --api-tls-key), listen on 127.0.0.1, or accept the exposure with \
         [api] insecure_no_tls"
    )]
    NetworkWithoutTls(SocketAddr),
    #[error("API tokens: {0}")]
    Tokens(#[from] tokens::TokenError),
    #[error(transparent)]
    Db(#[from] crate::replication::DbError),
}

/// Where and how to serve the API (command line over `[api]`).
#[derive(Debug, Clone, Default)]
pub struct ApiOptions {
    /// false: no API listener at all.
    pub disabled: bool,
    pub listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_no_tls: bool,
}

impl ApiOptions {
    pub fn merged_with(mut self, dd: &DataDir) -> Self {
        let c = &dd.config().api;
        self.disabled |= !c.enabled.unwrap_or(true);
        self.listen = self.listen.or_else(|| c.listen.clone());
        self.tls_cert = self.tls_cert.or_else(|| c.tls_cert.clone());
        self.tls_key = self.tls_key.or_else(|| c.tls_key.clone());
        self.insecure_no_tls |= c.insecure_no_tls;
        self
    }
}

/// What every handler shares.
pub struct ApiState {
    pub dd: DataDir,
    pub tokens: TokenStore,
    db: Mutex<Db>,
    pub exports: Arc<Exports<Device>>,
    pub metrics: Arc<Metrics>,
    /// Where actions go: the replication engine, as typed requests.
    pub engine: EngineHandle,
    /// The local admin credential of this process ([`local`]), if written.
    pub local: Option<Arc<local::LocalCredential>>,
}

impl ApiState {
    pub fn new(
        dd: DataDir,
        exports: Arc<Exports<Device>>,
        metrics: Arc<Metrics>,
        engine: EngineHandle,
        local: Option<Arc<local::LocalCredential>>,
    ) -> Result<Arc<Self>, ApiStartError> {
        Ok(Arc::new(Self {
            tokens: TokenStore::open(dd.root())?,
            db: Mutex::new(Db::open(dd.root())?),
            dd,
            exports,
            metrics,
            engine,
            local,
        }))
    }

    /// Runs `f` with the state database on the blocking pool.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ApiState, &Db) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let db = me.db.lock().unwrap_or_else(|p| p.into_inner());
            f(&me, &db)
        })
        .await
        .map_err(|e| ApiError::internal(format!("request task failed: {e}")))?
    }
}

/// A bound API listener, ready to serve.
pub struct ApiListener {
    tcp: TcpListener,
    tls: Option<TlsConfig>,
    pub bound: SocketAddr,
}

impl ApiListener {
    /// Whether it serves HTTPS.
    pub fn https(&self) -> bool {
        self.tls.is_some()
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!(
            "{}://{}/api/v1",
            if self.tls.is_some() { "https" } else { "http" },
            self.bound
        )
    }
}

/// Checks the options and binds; `Ok(None)` when the API is off (disabled, or the default port
/// is taken, which is logged).
pub async fn bind(opts: &ApiOptions) -> Result<Option<ApiListener>, ApiStartError> {
    if opts.disabled {
        info!("HTTP API disabled");
        return Ok(None);
    }
    let explicit = opts.listen.is_some();
    let listen = opts
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_API_LISTEN.to_string());
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| ApiStartError::BadAddress(listen.clone()))?;
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Some(TlsConfig::from_pem_files(c, k, None, true)?),
        (None, None) => None,
        _ => return Err(ApiStartError::TlsIncomplete),
    };
    if tls.is_none() && Reach::of(&addr) == Reach::Network {
        if !opts.insecure_no_tls {
            return Err(ApiStartError::NetworkWithoutTls(addr));
        }
        warn!(%addr, "[api] insecure_no_tls: API tokens cross the network in plain text");
    }
    let tcp = match TcpListener::bind(addr).await {
        Ok(t) => t,
        Err(source) if !explicit && source.kind() == std::io::ErrorKind::AddrInUse => {
            warn!(
                %addr,
                "HTTP API not started: the default address is in use; set [api] listen \
                 (or --api-listen) to serve it elsewhere"
            );
            return Ok(None);
        }
        Err(source) => {
            return Err(ApiStartError::Bind {
                addr: listen,
                source,
            })
        }
    };
    let bound = tcp.local_addr().map_err(|source| ApiStartError::Bind {
        addr: listen.clone(),
        source,
    })?;
    Ok(Some(ApiListener { tcp, tls, bound }))
}

/// Serves the API until `stop` turns true.
pub async fn serve(
    l: ApiListener,
    state: Arc<ApiState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let app = router::router(state);
    info!(url = %l.url(), "HTTP API serving");
    let mut conns = tokio::task::JoinSet::new();
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_API_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            r = l.tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("API accept failed: {e}");
                    // Out of descriptors and the like: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            warn!(%peer, "API connection refused: {MAX_API_CONNECTIONS} connections are open");
            continue;
        };
        let app = app.clone();
        let tls = l.tls.clone();
        conns.spawn(async move {
            let _permit = permit;
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let r = match tls {
                None => {
                    builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                }
                Some(t) => {
                    let accept =
                        tokio::time::timeout(HEADER_TIMEOUT, t.acceptor.accept(stream)).await;
                    match accept {
                        Ok(Ok(s)) => {
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                                .await
                        }
                        Ok(Err(e)) => {
                            info!(%peer, "API TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            info!(%peer, "API TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, "API connection ended: {e}");
            }
        });
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
    conns.abort_all();
}
