//! `standby serve`: every disk of the data directory as an NBD export.
//!
//! Who may connect is decided once, at start-up, from the listen address and the TLS settings
//! ([`client_policy`]): on loopback, TLS is as configured; beyond loopback (any other address,
//! including `0.0.0.0` and `::`), STARTTLS is always required and clients must present a
//! certificate from `--tls-client-ca`, unless the admin gives `--insecure-no-tls`, which is
//! logged as a warning naming what it exposes. Anything else is a start-up error that says
//! which flag is missing. The Unix socket is local (file permissions guard it) and shares the
//! TCP listener's TLS settings.
//!
//! The HTTP API and `/metrics` ([`crate::api`]) are served alongside, with their own listener
//! and the same rule (TLS beyond loopback); the NBD server reports every request to the
//! metrics through its observer hook.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use nbd_server::{Access, BlockDevice, Export, Exports, Limits, Server, ServerConfig, TlsConfig};
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
    #[error(
        "refusing to serve plaintext NBD on {0}, which is reachable beyond this host: anyone who \
         can reach the port could read and write every disk. Give --tls-cert, --tls-key and \
         --tls-client-ca (clients then need a certificate from that CA), listen on 127.0.0.1, or \
         accept the exposure with --insecure-no-tls"
    )]
    NetworkWithoutTls(SocketAddr),
    #[error(
        "refusing to serve on {0}, which is reachable beyond this host, without client \
         authentication: with TLS alone anyone who can reach the port could read and write every \
         disk. Give --tls-client-ca FILE (clients then need a certificate signed by that CA), \
         listen on 127.0.0.1, or accept the exposure with --insecure-no-tls"
    )]
    NetworkWithoutClientAuth(SocketAddr),
    #[error(
        "[serve.allow] restricts exports to client certificates, but no client CA is configured: \
         give --tls-client-ca (or tls_client_ca in [serve])"
    )]
    AllowListWithoutClientCa,
    #[error("{0}: {1}")]
    BadLimit(&'static str, String),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot write the API's local credential file in the data directory: {0}")]
    LocalCredential(std::io::Error),
    #[error(transparent)]
    Api(#[from] crate::api::ApiStartError),
    #[error(
        "the replication engine cannot start, so protected VMs would not be replicated: {0}. \
         Fix or restore that file (it holds the protection state), then start again"
    )]
    Engine(crate::replication::DbError),
    #[error(
        "shutdown was not clean: {}. Data written before the failure may not be durable: \
         check the file system of the data directory before starting again",
        .0.join("; ")
    )]
    Shutdown(Vec<String>),
}

/// Where and how to serve.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub listen: Option<String>,
    pub socket: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
    pub tls_client_ca: Option<PathBuf>,
    pub insecure_no_tls: bool,
    pub handshake_timeout: Option<u64>,
    pub idle_timeout: Option<u64>,
    pub reply_timeout: Option<u64>,
    pub max_sessions: Option<usize>,
    pub max_sessions_per_client: Option<usize>,
    pub memory_budget: Option<String>,
    /// The HTTP API's listener.
    pub api: crate::api::ApiOptions,
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
        self.tls_client_ca = self.tls_client_ca.or_else(|| c.tls_client_ca.clone());
        self.insecure_no_tls |= c.insecure_no_tls;
        self.handshake_timeout = self.handshake_timeout.or(c.handshake_timeout);
        self.idle_timeout = self.idle_timeout.or(c.idle_timeout);
        self.reply_timeout = self.reply_timeout.or(c.reply_timeout);
        self.max_sessions = self.max_sessions.or(c.max_sessions);
        self.max_sessions_per_client = self.max_sessions_per_client.or(c.max_sessions_per_client);
        self.memory_budget = self.memory_budget.or_else(|| c.memory_budget.clone());
        self.api = self.api.merged_with(dd);
        self
    }

    /// The server's resource limits: the defaults, overridden where set.
    pub fn limits(&self) -> Result<Limits, ServeError> {
        let d = Limits::default();
        let secs = |v: Option<u64>, what: &'static str, def: Duration| match v {
            None => Ok(def),
            Some(0) => Err(ServeError::BadLimit(
                what,
                "must be at least 1 second".into(),
            )),
            Some(s) => Ok(Duration::from_secs(s)),
        };
        let count = |v: Option<usize>, what: &'static str, def: usize| match v {
            None => Ok(def),
            Some(0) => Err(ServeError::BadLimit(what, "must be at least 1".into())),
            Some(n) => Ok(n),
        };
        let memory_budget = match &self.memory_budget {
            None => d.memory_budget,
            Some(s) => {
                let n = crate::units::parse_size(s)
                    .map_err(|e| ServeError::BadLimit("memory budget", e.to_string()))?;
                // One largest request must fit, or it would wait forever.
                if n < u64::from(nbd_server::proto::MAX_PAYLOAD) {
                    return Err(ServeError::BadLimit(
                        "memory budget",
                        format!("{s} is less than one 32M request"),
                    ));
                }
                usize::try_from(n).unwrap_or(usize::MAX)
            }
        };
        Ok(Limits {
            handshake_timeout: secs(
                self.handshake_timeout,
                "handshake timeout",
                d.handshake_timeout,
            )?,
            idle_timeout: match self.idle_timeout {
                None | Some(0) => None,
                Some(s) => Some(Duration::from_secs(s)),
            },
            reply_timeout: secs(self.reply_timeout, "reply timeout", d.reply_timeout)?,
            max_sessions: count(self.max_sessions, "max sessions", d.max_sessions)?,
            max_sessions_per_client: count(
                self.max_sessions_per_client,
                "max sessions per client",
                d.max_sessions_per_client,
            )?,
            memory_budget,
        })
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
///
/// Fails (and `standby serve` exits non-zero) when the replication engine cannot start, or
/// when any step of the shutdown fails — a final flush, closing a change log, the engine or
/// the API task — naming each failure.
pub async fn serve(dd: &DataDir, opts: ServeOptions) -> Result<(), ServeError> {
    // Handlers first: a SIGTERM arriving any time after start-up is a clean shutdown.
    let signals = Signals::install()?;
    // One server per data directory, taken before any disk or log is opened.
    let _lock = crate::datadir_lock::DataDirLock::acquire(dd.root())?;
    let opts = opts.merged_with(dd);
    let exports = exports(dd)?;
    // Whatever happens once the disks are open, they are flushed and their change logs sealed
    // (a start-up error after this point must not leave a log looking like a crash).
    let served = run(dd, &opts, signals, Arc::clone(&exports)).await;
    let mut failures = match served {
        Ok(f) => f,
        Err(e) => {
            for f in close_disks(&exports).await {
                error!("{f}");
            }
            return Err(e);
        }
    };
    failures.extend(close_disks(&exports).await);
    if !failures.is_empty() {
        return Err(ServeError::Shutdown(failures));
    }
    info!("stopped cleanly; all disks flushed");
    Ok(())
}

/// Flushes every disk and seals the change log of each tracked one; returns what failed.
async fn close_disks(exports: &Exports<Device>) -> Vec<String> {
    let mut failures = Vec::new();
    for e in exports.list() {
        if let Err(err) = e.device.flush().await {
            error!(disk = %e.name, "final flush failed: {err}");
            failures.push(format!("disk {}: final flush failed: {err}", e.name));
        }
        // Seals the change log of a tracked disk (clean shutdown).
        if let Err(err) = e.device.close().await {
            error!(disk = %e.name, "closing the change log failed: {err}");
            failures.push(format!(
                "disk {}: closing its change log failed: {err}",
                e.name
            ));
        }
    }
    failures
}

/// Starts the listeners, the replication engine and the API over the opened disks, serves
/// until a signal, and stops them; returns the shutdown steps that failed.
async fn run(
    dd: &DataDir,
    opts: &ServeOptions,
    mut signals: Signals,
    exports: Arc<Exports<Device>>,
) -> Result<Vec<String>, ServeError> {
    let listen = opts
        .listen
        .clone()
        .unwrap_or_else(|| crate::config::DEFAULT_LISTEN.to_string());
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| ServeError::BadAddress(listen.clone()))?;
    let policy = client_policy(Reach::of(&addr), opts, !dd.config().serve.allow.is_empty())?;
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Some(TlsConfig::from_pem_files(
            c,
            k,
            opts.tls_client_ca.as_deref(),
            policy.tls_required(),
        )?),
        _ => None,
    };
    let limits = opts.limits()?;
    let mut access = Access::open();
    for (export, names) in &dd.config().serve.allow {
        access.restrict(export.clone(), names.clone());
    }
    let metrics = crate::metrics::Metrics::new();
    let server = Server::new(
        Arc::clone(&exports),
        ServerConfig {
            tls: tls.clone(),
            access,
            limits: limits.clone(),
            observer: Some(Arc::new(metrics.nbd.clone())),
        },
    );

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
    policy.log(&bound);
    info!(
        handshake_timeout = ?limits.handshake_timeout,
        idle_timeout = ?limits.idle_timeout,
        reply_timeout = ?limits.reply_timeout,
        max_sessions = limits.max_sessions,
        max_sessions_per_client = limits.max_sessions_per_client,
        memory_budget = limits.memory_budget,
        "client limits"
    );
    let unix = match &opts.socket {
        Some(p) => Some(nbd_server::bind_unix(p).map_err(|source| ServeError::Bind {
            addr: p.display().to_string(),
            source,
        })?),
        None => None,
    };

    // The replication engine drives protected VMs while the disks are served. It is created
    // before anything is announced: a gateway that cannot replicate says why and exits
    // instead of serving protected disks unreplicated.
    let (stop_engine, engine_stop_rx) = tokio::sync::watch::channel(false);
    let engine = crate::replication::Engine::new(
        dd.clone(),
        crate::replication::engine::disk_map(
            exports
                .list()
                .iter()
                .filter_map(|e| e.device.live().cloned()),
        ),
        Arc::clone(&exports),
        bound.to_string(),
        engine_stop_rx,
    )
    .map_err(ServeError::Engine)?;

    let mut local = None;
    let api = match crate::api::bind(&opts.api).await? {
        Some(l) => {
            // The CLI's way in (written before the API line is printed, removed at exit).
            let url = crate::api::local::local_url(l.bound, l.https());
            let cert = if l.https() {
                opts.api.tls_cert.clone()
            } else {
                None
            };
            let cred = crate::api::local::LocalCredential::create(dd.root(), url, cert)
                .map_err(ServeError::LocalCredential)?;
            let cred = Arc::new(cred);
            local = Some(Arc::clone(&cred));
            Some((
                l,
                crate::api::ApiState::new(
                    dd.clone(),
                    Arc::clone(&exports),
                    Arc::clone(&metrics),
                    engine.handle(),
                    Some(cred),
                )?,
            ))
        }
        None => None,
    };
    if let Some((l, _)) = &api {
        // Before the "serving" line: whoever waits for that one can read this one first.
        println!("standby: API on {}", l.url());
    }

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

    let engine = tokio::spawn(engine.run());
    let (stop_api, api_stop_rx) = tokio::sync::watch::channel(false);
    let store_usage =
        crate::metrics::store::spawn_refresh(Arc::clone(&metrics), dd.clone(), api_stop_rx.clone());
    let api_task = api.map(|(l, state)| tokio::spawn(crate::api::serve(l, state, api_stop_rx)));

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
    let _ = stop_api.send(true);
    let mut failures = Vec::new();
    if let Some(h) = api_task {
        if let Err(e) = h.await {
            error!("API task failed: {e}");
            failures.push(format!("the API task failed: {e}"));
        }
    }
    // The API is down: its local credential goes (the state holding the other reference
    // ended with the API task).
    if let Some(l) = local.take() {
        l.remove();
    }
    if let Err(e) = store_usage.await {
        error!("store usage task failed: {e}");
    }
    if let Err(e) = engine.await {
        error!("replication engine task failed: {e}");
        failures.push(format!("the replication engine failed: {e}"));
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
    Ok(failures)
}

/// How far a listen address reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// 127.0.0.0/8 or ::1: only users of this host.
    Loopback,
    /// Any other address, the wildcards `0.0.0.0` and `::` included.
    Network,
}

impl Reach {
    pub fn of(addr: &SocketAddr) -> Self {
        if addr.ip().to_canonical().is_loopback() {
            Reach::Loopback
        } else {
            Reach::Network
        }
    }
}

/// What the listener demands of a client, decided at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPolicy {
    /// Loopback, no TLS configured.
    LocalPlaintext,
    /// Loopback, STARTTLS offered, plaintext still accepted.
    TlsOptional,
    /// STARTTLS required; any client that completes it is served (on loopback by choice,
    /// beyond it only with `--insecure-no-tls`).
    TlsRequired(Reach),
    /// STARTTLS required and the client's certificate verified against the client CA.
    MutualTls(Reach),
    /// Plaintext beyond loopback, by `--insecure-no-tls`.
    InsecurePlaintext,
}

impl ClientPolicy {
    pub fn tls_required(self) -> bool {
        matches!(self, Self::TlsRequired(_) | Self::MutualTls(_))
    }

    /// Says at start-up whom the server admits, and why.
    fn log(self, bound: &SocketAddr) {
        match self {
            Self::LocalPlaintext => info!(
                %bound,
                "loopback only: plaintext NBD for users of this host (a non-loopback address \
                 needs TLS with client certificates)"
            ),
            Self::TlsOptional => info!(
                %bound,
                "loopback: STARTTLS offered, plaintext accepted (--tls-required refuses it)"
            ),
            Self::TlsRequired(Reach::Loopback) => info!(
                %bound,
                "loopback: STARTTLS required; clients are not authenticated (no --tls-client-ca)"
            ),
            Self::TlsRequired(Reach::Network) => warn!(
                %bound,
                "--insecure-no-tls: STARTTLS required but clients are NOT authenticated: anyone \
                 who can reach this address can read and write every disk"
            ),
            Self::MutualTls(reach) => info!(
                %bound,
                ?reach,
                "STARTTLS required; clients must present a certificate from the client CA"
            ),
            Self::InsecurePlaintext => warn!(
                %bound,
                "--insecure-no-tls: plaintext NBD beyond loopback: anyone who can reach this \
                 address can read and write every disk"
            ),
        }
    }
}

/// Decides whom to admit from the listen address's reach and the TLS settings, or refuses to
/// start with an error that names the missing flag. `allow_lists`: some export is restricted
/// to client identities.
pub fn client_policy(
    reach: Reach,
    opts: &ServeOptions,
    allow_lists: bool,
) -> Result<ClientPolicy, ServeError> {
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(_), Some(_)) => true,
        (None, None) if !opts.tls_required && opts.tls_client_ca.is_none() => false,
        _ => return Err(ServeError::TlsIncomplete),
    };
    let client_ca = opts.tls_client_ca.is_some();
    if allow_lists && !client_ca {
        return Err(ServeError::AllowListWithoutClientCa);
    }
    Ok(match (reach, tls, client_ca) {
        // A client CA always means TLS is required: plaintext would bypass it.
        (_, true, true) => ClientPolicy::MutualTls(reach),
        (Reach::Loopback, false, _) => ClientPolicy::LocalPlaintext,
        (Reach::Loopback, true, false) if opts.tls_required => {
            ClientPolicy::TlsRequired(Reach::Loopback)
        }
        (Reach::Loopback, true, false) => ClientPolicy::TlsOptional,
        (Reach::Network, false, _) if opts.insecure_no_tls => ClientPolicy::InsecurePlaintext,
        (Reach::Network, true, false) if opts.insecure_no_tls => {
            ClientPolicy::TlsRequired(Reach::Network)
        }
        (Reach::Network, false, _) => return Err(ServeError::NetworkWithoutTls(addr_hint(opts))),
        (Reach::Network, true, false) => {
            return Err(ServeError::NetworkWithoutClientAuth(addr_hint(opts)))
        }
    })
}

fn addr_hint(opts: &ServeOptions) -> SocketAddr {
    opts.listen
        .as_deref()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(listen: &str, cert: bool, ca: bool, required: bool, insecure: bool) -> ServeOptions {
        ServeOptions {
            listen: Some(listen.into()),
            tls_cert: cert.then(|| "c.pem".into()),
            tls_key: cert.then(|| "k.pem".into()),
            tls_client_ca: ca.then(|| "ca.pem".into()),
            tls_required: required,
            insecure_no_tls: insecure,
            ..ServeOptions::default()
        }
    }

    fn policy(listen: &str, cert: bool, ca: bool, req: bool, insecure: bool) -> String {
        let o = opts(listen, cert, ca, req, insecure);
        let reach = Reach::of(&listen.parse().unwrap());
        match client_policy(reach, &o, false) {
            Ok(p) => format!("{p:?}"),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn reach_of_addresses() {
        for a in [
            "127.0.0.1:1",
            "127.8.9.1:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(Reach::of(&a.parse().unwrap()), Reach::Loopback, "{a}");
        }
        for a in ["0.0.0.0:1", "[::]:1", "192.0.2.2:1", "[fd00::2]:1"] {
            assert_eq!(Reach::of(&a.parse().unwrap()), Reach::Network, "{a}");
        }
    }

    #[test]
    fn policy_table() {
        let lo = "127.0.0.1:10809";
        let net = "0.0.0.0:10809";
        assert_eq!(policy(lo, false, false, false, false), "LocalPlaintext");
        assert_eq!(policy(lo, true, false, false, false), "TlsOptional");
        assert_eq!(
            policy(lo, true, false, true, false),
            "TlsRequired(Loopback)"
        );
        assert_eq!(policy(lo, true, true, false, false), "MutualTls(Loopback)");
        assert_eq!(policy(net, true, true, false, false), "MutualTls(Network)");
        assert_eq!(policy(net, false, false, false, true), "InsecurePlaintext");
        assert_eq!(
            policy(net, true, false, false, true),
            "TlsRequired(Network)"
        );
        let e = policy(net, false, false, false, false);
        assert!(
            e.contains("refusing to serve plaintext NBD on 0.0.0.0:10809"),
            "{e}"
        );
        assert!(e.contains("--insecure-no-tls"), "{e}");
        let e = policy(net, true, false, true, false);
        assert!(e.contains("--tls-client-ca"), "{e}");
        // Half a TLS configuration is an error wherever the server listens.
        assert!(policy(lo, false, true, false, false).contains("both a certificate"));
        assert!(policy(lo, false, false, true, false).contains("both a certificate"));
        // An allow-list needs client certificates to check.
        let o = opts(lo, true, false, false, false);
        assert!(matches!(
            client_policy(Reach::Loopback, &o, true),
            Err(ServeError::AllowListWithoutClientCa)
        ));
    }

    #[test]
    fn limits_from_flags() {
        let d = ServeOptions::default().limits().unwrap();
        assert_eq!(d, Limits::default());
        let o = ServeOptions {
            handshake_timeout: Some(5),
            idle_timeout: Some(0),
            max_sessions: Some(10),
            memory_budget: Some("256M".into()),
            ..ServeOptions::default()
        };
        let l = o.limits().unwrap();
        assert_eq!(l.handshake_timeout, Duration::from_secs(5));
        assert_eq!(l.idle_timeout, None);
        assert_eq!(l.max_sessions, 10);
        assert_eq!(l.memory_budget, 256 << 20);
        let bad = |o: ServeOptions| o.limits().unwrap_err().to_string();
        let e = bad(ServeOptions {
            memory_budget: Some("1M".into()),
            ..ServeOptions::default()
        });
        assert!(e.contains("less than one 32M request"), "{e}");
        let e = bad(ServeOptions {
            max_sessions_per_client: Some(0),
            ..ServeOptions::default()
        });
        assert!(e.contains("at least 1"), "{e}");
    }
}
