//! `standby`: the Standby command-line tool.

mod api_client;
mod cmd_failover;
mod cmd_log;
mod cmd_mount;
mod cmd_repl;
mod cmd_store;
mod cmd_token;
mod pinned_tls;
mod progress;
mod store_seen;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gateway::serve::ServeOptions;
use gateway::units::{format_size, parse_size};
use gateway::{Config, DataDir};

/// mimalloc keeps large I/O buffers (up to 32 MiB per request) in process instead of mapping and
/// unmapping them for every request, as the system allocator does above its mmap threshold.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "standby",
    version,
    about = "Keeps VM disks recoverable: serves them over NBD, logs every write, replicates them"
)]
struct Cli {
    /// Data directory (disks, change logs, state).
    #[arg(
        long,
        global = true,
        env = "STANDBY_DATA_DIR",
        default_value = "./standby-data"
    )]
    data_dir: PathBuf,
    /// Configuration file (default: DATA_DIR/standby.toml if it exists).
    #[arg(long, global = true, env = "STANDBY_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter (e.g. info, debug, gateway=trace); also RUST_LOG.
    #[arg(long, global = true, env = "STANDBY_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every disk as an NBD export named after the disk.
    Serve(ServeArgs),
    /// Manage disks.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Change tracking and change logs.
    #[command(subcommand)]
    Log(cmd_log::LogCommand),
    /// Mount the FUSE view: DIR/disks/NAME for every disk (until SIGINT/SIGTERM).
    Mount(cmd_mount::MountArgs),
    /// Replica store: init, info, verify, gc, import, export.
    #[command(subcommand)]
    Store(cmd_store::StoreCommand),
    /// Recovery points: list, show, prune (also spelled `points`).
    #[command(subcommand, alias = "points")]
    Point(cmd_store::PointsCommand),
    /// Protect a VM: enable protection, initial replication, then delta replication.
    Protect(cmd_repl::ProtectArgs),
    /// Stop protecting a VM (its recovery points stay in the store).
    Unprotect { vm: String },
    /// The site's replication policy.
    #[command(subcommand)]
    Policy(cmd_repl::PolicyCommand),
    /// Resynchronize a VM now (instead of waiting for the resync window).
    Resync {
        vm: String,
        /// Hash every chunk instead of only those the change records name.
        #[arg(long)]
        full: bool,
    },
    /// Resume a Critical VM (after fixing the cause) or retry a waiting one now.
    Resume { vm: String },
    /// Protection state, health, RPO and log backlog of every protected VM.
    Status {
        /// JSON (the fields of GET /api/v1/vms and /api/v1/attachments, see docs/api.md).
        #[arg(long)]
        json: bool,
    },
    /// Replication jobs, newest first.
    Jobs(cmd_repl::JobsArgs),
    /// One job in detail.
    #[command(subcommand)]
    Job(cmd_repl::JobCommand),
    /// Serve a recovery point as an NBD export (read-only, or --rw through an overlay).
    Attach(cmd_failover::AttachArgs),
    /// Stop serving an attached recovery point.
    Detach { export: String },
    /// Failover: `test`, `cleanup`, `prepare`, `start`, `commit` (then the VM).
    #[command(subcommand)]
    Failover(cmd_failover::FailoverCommand),
    /// API tokens for the HTTP API and /metrics: create, list, revoke.
    #[command(subcommand)]
    Token(cmd_token::TokenCommand),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TCP address to listen on [default: 127.0.0.1:10809]. Beyond loopback (any other
    /// address, 0.0.0.0 included) clients must use TLS with a client certificate, unless
    /// --insecure-no-tls. Given twice, the last one counts.
    #[arg(long, overrides_with = "listen")]
    listen: Option<String>,
    /// Also listen on this Unix socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// TLS certificate (PEM) for STARTTLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Refuse clients that do not start TLS (always on beyond loopback).
    #[arg(long)]
    tls_required: bool,
    /// Demand a client certificate signed by a CA in this PEM file (mutual TLS); implies
    /// --tls-required. [serve.allow] in the configuration restricts exports to named clients.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve beyond loopback without TLS, or with TLS but without client certificates:
    /// anyone who can reach the port can then read and write every disk.
    #[arg(long)]
    insecure_no_tls: bool,
    /// Seconds a client has to finish the NBD and TLS handshake [default: 30].
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<u64>,
    /// Close a connection with no request in flight after this many idle seconds
    /// [default: 0, never: qemu does not reconnect a dropped disk by default].
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Disconnect a client that takes no byte of its replies for this many seconds [default: 60].
    #[arg(long, value_name = "SECS")]
    reply_timeout: Option<u64>,
    /// Most open connections in total [default: 1024].
    #[arg(long, value_name = "N")]
    max_sessions: Option<usize>,
    /// Most open connections per client IP address [default: 256].
    #[arg(long, value_name = "N")]
    max_sessions_per_client: Option<usize>,
    /// Payload memory (write data, read replies) of all connections together, e.g. 512M
    /// [default: 1G].
    #[arg(long, value_name = "SIZE")]
    memory_budget: Option<String>,
    /// If the data directory has no disk yet, create a 1 GiB disk named "demo".
    #[arg(long)]
    demo: bool,
    /// Address of the HTTP API and /metrics [default: 127.0.0.1:8080]; beyond loopback it needs
    /// --api-tls-cert and --api-tls-key.
    #[arg(long, value_name = "IP:PORT")]
    api_listen: Option<String>,
    /// TLS certificate (PEM) for the API (HTTPS).
    #[arg(long, requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the API.
    #[arg(long, requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
    /// Serve no HTTP API (and no /metrics).
    #[arg(long, conflicts_with_all = ["api_listen", "api_tls_cert"])]
    no_api: bool,
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Create a sparse raw disk in the data directory.
    Create {
        name: String,
        /// Size, e.g. 20G, 512M, 1T.
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
    },
    /// Adopt an existing raw image where it is (nothing is copied).
    Import {
        name: String,
        image: PathBuf,
        /// Serve it read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// List disks.
    List {
        /// JSON (the fields of GET /api/v1/disks, see docs/api.md); `served` comes from the
        /// running gateway (false when none runs).
        #[arg(long)]
        json: bool,
    },
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn open_data_dir(cli: &Cli) -> Result<DataDir> {
    let config = Config::locate(cli.config.as_deref(), &cli.data_dir)?;
    DataDir::open(&cli.data_dir, config).with_context(|| {
        format!(
            "cannot use data directory {} (set --data-dir or STANDBY_DATA_DIR)",
            cli.data_dir.display()
        )
    })
}

fn main() -> ExitCode {
    // Everything this program creates — disk images, change-log segments, store chunks and
    // indexes, the state database, the Unix socket, overlays — is the gateway's alone: files
    // 0600, directories 0700, whatever the caller's umask.
    // SAFETY: umask(2) only sets this process's file-creation mask; no memory is involved.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_) | Command::Mount(_)) {
        // A CLI writing into a closed pipe (`standby status | head`) ends quietly, as
        // command-line tools do; the servers keep ignoring SIGPIPE (sockets report EPIPE).
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_logging(&cli.log);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("standby: error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: many messages already end with their cause (`cannot
/// read FILE: Permission denied (os error 13)`, from `{source}` in the message), and anyhow's
/// `{:#}` would print that cause a second time. A cause whose text the line already holds is
/// left out.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.is_empty() {
            text = c;
        } else if !c.is_empty() && !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

fn run(cli: Cli) -> Result<()> {
    let dd = open_data_dir(&cli)?;
    match cli.command {
        Command::Serve(args) => serve(&dd, args),
        Command::Disk(cmd) => disk(&dd, cmd),
        Command::Log(cmd) => cmd_log::run_log(&dd, cmd),
        Command::Mount(args) => cmd_mount::run_mount(&dd, args),
        Command::Store(cmd) => runtime()?.block_on(cmd_store::run_store(cmd, dd.root())),
        Command::Point(cmd) => runtime()?.block_on(cmd_store::run_points(cmd, dd.root())),
        Command::Protect(a) => runtime()?.block_on(cmd_repl::protect(&dd, a)),
        Command::Unprotect { vm } => runtime()?.block_on(cmd_repl::unprotect(&dd, &vm)),
        Command::Policy(cmd) => runtime()?.block_on(cmd_repl::policy(&dd, cmd)),
        Command::Resync { vm, full } => runtime()?.block_on(cmd_repl::resync(&dd, &vm, full)),
        Command::Resume { vm } => runtime()?.block_on(cmd_repl::resume(&dd, &vm)),
        Command::Status { json } => cmd_repl::status(&dd, json),
        Command::Jobs(a) => runtime()?.block_on(cmd_repl::jobs(&dd, a)),
        Command::Job(cmd) => cmd_repl::job(&dd, cmd),
        Command::Attach(a) => runtime()?.block_on(cmd_failover::attach(&dd, a)),
        Command::Detach { export } => runtime()?.block_on(cmd_failover::detach(&dd, &export)),
        Command::Token(cmd) => cmd_token::run(&dd, cmd),
        Command::Failover(cmd) => runtime()?.block_on(cmd_failover::failover(&dd, cmd)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(dd: &DataDir, args: ServeArgs) -> Result<()> {
    if args.demo && dd.disks()?.is_empty() {
        dd.create_disk("demo", 1 << 30)?;
        eprintln!("standby: created a 1 GiB demo disk named 'demo'");
    }
    let disks = dd.disks()?;
    if disks.is_empty() {
        eprintln!(
            "standby: no disks yet: create one with `standby disk create NAME --size 20G` (or use --demo)"
        );
    }
    let listen = args
        .listen
        .clone()
        .or_else(|| dd.config().serve.listen.clone())
        .unwrap_or_else(|| gateway::config::DEFAULT_LISTEN.to_string());
    for name in disks.keys() {
        eprintln!("standby: connect with: qemu-img info nbd://{listen}/{name}");
    }
    let opts = ServeOptions {
        listen: args.listen,
        socket: args.socket,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_required: args.tls_required,
        tls_client_ca: args.tls_client_ca,
        insecure_no_tls: args.insecure_no_tls,
        handshake_timeout: args.handshake_timeout,
        idle_timeout: args.idle_timeout,
        reply_timeout: args.reply_timeout,
        max_sessions: args.max_sessions,
        max_sessions_per_client: args.max_sessions_per_client,
        memory_budget: args.memory_budget,
        api: gateway::api::ApiOptions {
            disabled: args.no_api,
            listen: args.api_listen,
            tls_cert: args.api_tls_cert,
            tls_key: args.api_tls_key,
            insecure_no_tls: false,
        },
    };
    runtime()?.block_on(gateway::serve::serve(dd, opts))?;
    Ok(())
}

fn disk(dd: &DataDir, cmd: DiskCommand) -> Result<()> {
    match cmd {
        DiskCommand::Create { name, size } => {
            let rec = dd.create_disk(&name, size)?;
            println!(
                "created disk {} ({}) at {}",
                rec.name,
                format_size(size),
                rec.image.display()
            );
        }
        DiskCommand::Import {
            name,
            image,
            read_only,
        } => {
            let rec = dd.import_disk(&name, &image, read_only)?;
            println!("imported disk {} from {}", rec.name, rec.image.display());
        }
        DiskCommand::List { json: true } => {
            let list = match api_client::target(dd.root())? {
                api_client::Target::Gateway(api) => runtime()?.block_on(api.get("/disks"))?,
                api_client::Target::Offline => {
                    let db = gateway::replication::Db::open(dd.root())
                        .context("opening the replication state")?;
                    let mut v = Vec::new();
                    for rec in dd.disks()?.into_values() {
                        v.push(gateway::api::handlers::disks::disk_view(&db, rec, false)?);
                    }
                    serde_json::to_value(v)?
                }
            };
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        DiskCommand::List { json: false } => {
            let disks = dd.disks()?;
            println!(
                "{:<24} {:>12} {:<9} {:<4} IMAGE",
                "NAME", "SIZE", "ORIGIN", "MODE"
            );
            for rec in disks.values() {
                let size = image_size(&rec.image)
                    .map(format_size)
                    .unwrap_or_else(|| "missing".into());
                println!(
                    "{:<24} {:>12} {:<9} {:<4} {}",
                    rec.name,
                    size,
                    format!("{:?}", rec.origin).to_lowercase(),
                    if rec.read_only { "ro" } else { "rw" },
                    rec.image.display()
                );
            }
        }
    }
    Ok(())
}

fn image_size(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug)]
    struct Read(std::io::Error);

    impl std::fmt::Display for Read {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot read x.toml: {}", self.0)
        }
    }

    impl std::error::Error for Read {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        let os = io.to_string();
        let e = anyhow::Error::new(Read(io)).context("opening the store");
        let t = error_text(&e);
        assert_eq!(t.matches(&os).count(), 1, "{t}");
        assert!(
            t.starts_with("opening the store: cannot read x.toml: "),
            "{t}"
        );
        // A cause not in the message is still shown.
        let e = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOENT))
            .context("opening a");
        let t = error_text(&e);
        assert!(
            t.starts_with("opening a: ") && t.contains("os error 2"),
            "{t}"
        );
    }
}
