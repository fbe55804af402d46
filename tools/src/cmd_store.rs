//! `standby store ...` and `standby points ...`: the replica store from the command line.
//!
//! Dependencies this module needs in tools/Cargo.toml:
//!   replica-store.workspace = true
//!   anyhow.workspace = true
//!   clap.workspace = true
//!   serde.workspace = true
//!   toml.workspace = true
//!   tokio.workspace = true
//!
//! Where the store is: `<data-dir>/replica-store.toml` (written by `standby store init`)
//! holds the location (`kind = "local"` + `path`, or `kind = "s3"` + endpoint, region,
//! bucket, prefix, path_style) and the key file of an encrypted store. Without that file the
//! store is the local directory `<data-dir>/store`. S3 credentials are never written there:
//! they come from the AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE).
//!
//! Longer than most files (~810 lines): one function per `store` and `point` subcommand, each
//! with its offline path and its path through a running gateway's API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use replica_store::{
    Cipher, Compression, Consistency, CreateOptions, GcOptions, RetentionPolicy, S3Config, Store,
    StoreKey, StoreLocation,
};

use gateway::api::handlers::store::VerifyView;
/// Name of the store location file in the data directory.
pub use gateway::site::{LocationFile, LOCATION_FILE};

/// `store init --layout`: the object layout of a new store.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LayoutArg {
    /// One object per chunk (format 4).
    Chunks,
    /// Chunks appended to pack objects with an index (format 5).
    Packs,
}

impl LayoutArg {
    fn layout(self) -> replica_store::Layout {
        match self {
            LayoutArg::Chunks => replica_store::Layout::Chunks,
            LayoutArg::Packs => replica_store::Layout::Packs,
        }
    }
}

/// `standby store ...`
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Create a replica store (local directory by default, or an S3 bucket).
    Init {
        /// Encrypt the store; creates a key file (see --key-file).
        #[arg(long)]
        encrypt: bool,
        /// Key file to create (default <data-dir>/store.key).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Cipher of an encrypted store: aes-256-gcm or chacha20-poly1305.
        #[arg(long, default_value = "aes-256-gcm")]
        cipher: String,
        /// Chunk size in bytes (power of two, 4096..=67108864; default 65536).
        #[arg(long)]
        chunk_size: Option<u32>,
        /// Hex digits of a chunk id that name its directory: 2 = 256 directories (default);
        /// 3 (4,096) suits stores that will hold more than ~50 million chunks.
        #[arg(long)]
        fan_out_digits: Option<u32>,
        /// Object layout: packs (format 5, the default on S3) or chunks (one object per
        /// chunk, format 4, the default on a local directory). `chunks` on S3 makes a store
        /// older builds can read, at one PUT per chunk.
        #[arg(long, value_enum)]
        layout: Option<LayoutArg>,
        /// Longest an upload session may run before it must start over (e.g. 6h, the
        /// default); GC deletes chunks it set aside only after this delay (docs/replica-store.md, GC).
        #[arg(long)]
        max_session: Option<String>,
        /// Chunk compression: zstd or none.
        #[arg(long, default_value = "zstd")]
        compression: String,
        /// Local store directory (default <data-dir>/store).
        #[arg(long, conflicts_with = "s3_bucket")]
        path: Option<PathBuf>,
        /// S3 endpoint URL (omit for AWS S3).
        #[arg(long)]
        s3_endpoint: Option<String>,
        /// S3 bucket: makes the store an S3 store.
        #[arg(long)]
        s3_bucket: Option<String>,
        /// S3 region (Garage: "garage").
        #[arg(long)]
        s3_region: Option<String>,
        /// Key prefix inside the bucket.
        #[arg(long, default_value = "")]
        s3_prefix: String,
        /// Use path-style addressing (most self-hosted S3 servers need it).
        #[arg(long)]
        path_style: bool,
    },
    /// Show the store's location, settings, VMs and size.
    Info {
        /// JSON (the fields of GET /api/v1/store, see docs/api.md).
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash every chunk (of one point, or of the whole store).
    ///
    /// While a gateway runs, it verifies (a `store-verify` job, also shown by `standby jobs`
    /// and the console) and this command follows the job: a progress bar on a terminal, a
    /// plain line every few seconds otherwise. Ctrl-C stops following; the job carries on in
    /// the gateway (`standby job show ID`). Without a gateway the CLI verifies itself. Exit
    /// status 1 when anything is missing or corrupt (the report says what).
    Verify {
        /// Only this point (VM/ID, ID or VM/latest); none: the whole store.
        #[arg(value_name = "POINT", conflicts_with = "point_flag")]
        point: Option<String>,
        /// Same as POINT (the older spelling).
        #[arg(long = "point", value_name = "POINT", hide = true)]
        point_flag: Option<String>,
        /// Print the report as JSON (the `result` of the job, see docs/api.md) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove chunks no recovery point references (two-phase, safe during uploads).
    Gc {
        /// Only report what would be done.
        #[arg(long)]
        dry_run: bool,
        /// Keep unreferenced chunks younger than this (e.g. 30m, 6h, 2d).
        #[arg(long, default_value = "1h")]
        grace: String,
    },
    /// Old spelling of `standby point prune` (kept for scripts).
    #[command(hide = true)]
    Prune(PruneArgs),
    /// Import raw disk images as a new recovery point: `import VM/DISK IMAGE [VM/DISK IMAGE ...]`
    /// (all disks of one VM go into one point).
    Import {
        /// Pairs of VM/DISK and image path.
        #[arg(required = true, num_args = 2.., value_names = ["VM/DISK", "IMAGE"])]
        items: Vec<String>,
        /// Consistency to record: crash or app.
        #[arg(long, default_value = "crash")]
        consistency: String,
    },
    /// Export one disk of a recovery point to a sparse raw file.
    Export {
        /// Point: VM/ID, ID, or VM/latest.
        point: String,
        /// Target file (created or truncated).
        file: PathBuf,
        /// Disk name (needed when the point has several disks).
        #[arg(long)]
        disk: Option<String>,
    },
}

/// What `point prune` (and its old spelling `store prune`) removes.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// Only this VM.
    #[arg(long)]
    vm: Option<String>,
    /// Keep the newest N points of each VM.
    #[arg(long)]
    keep_last: Option<usize>,
    /// Keep points younger than this (e.g. 7d, 12h).
    #[arg(long)]
    keep_within: Option<String>,
    /// Only report what would be removed.
    #[arg(long)]
    dry_run: bool,
}

/// `standby point ...` (also spelled `points`): the recovery points in the store.
#[derive(Debug, clap::Subcommand)]
pub enum PointsCommand {
    /// List recovery points (of one VM, or all).
    List {
        /// VM name.
        vm: Option<String>,
        /// JSON (the fields of GET /api/v1/points, see docs/api.md).
        #[arg(long)]
        json: bool,
    },
    /// One recovery point: its time, consistency and disks.
    Show {
        /// Point: VM/ID, ID, or VM/latest.
        point: String,
        /// JSON (the fields of one element of GET /api/v1/points).
        #[arg(long)]
        json: bool,
    },
    /// Delete recovery points by retention policy (the newest point of a VM is always kept).
    Prune(PruneArgs),
}

pub async fn open_store(data_dir: &Path) -> anyhow::Result<Store> {
    Ok(gateway::site::open_store(data_dir).await?)
}

/// Parse `30s`, `15m`, `6h`, `7d`, `2w` (a bare number is seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    Ok(gateway::units::parse_duration(s)?)
}

pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// UTC time with milliseconds.
pub fn time_of_ms(ms: u64) -> String {
    let id = replica_store::point::format_utc_ms(ms);
    format!("{}.{}", time_of(ms).trim_end_matches('Z'), &id[16..20])
}

pub fn time_of(ms: u64) -> String {
    let id = replica_store::point::format_utc_ms(ms);
    format!(
        "{}-{}-{} {}:{}:{}Z",
        &id[0..4],
        &id[4..6],
        &id[6..8],
        &id[9..11],
        &id[11..13],
        &id[13..15]
    )
}

/// Run a `standby store` subcommand.
pub async fn run_store(cmd: StoreCommand, data_dir: &Path) -> anyhow::Result<()> {
    match cmd {
        StoreCommand::Init {
            encrypt,
            key_file,
            cipher,
            chunk_size,
            fan_out_digits,
            layout,
            max_session,
            compression,
            path,
            s3_endpoint,
            s3_bucket,
            s3_region,
            s3_prefix,
            path_style,
        } => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("creating data directory {}", data_dir.display()))?;
            // Record absolute paths: the location file must not depend on the current directory.
            let data_dir = &std::path::absolute(data_dir)
                .with_context(|| format!("resolving {}", data_dir.display()))?;
            let path = path
                .map(std::path::absolute)
                .transpose()
                .context("resolving --path")?;
            let key_file = key_file
                .map(std::path::absolute)
                .transpose()
                .context("resolving --key-file")?;
            let loc_path = data_dir.join(LOCATION_FILE);
            if loc_path.exists() {
                bail!(
                    "{} already exists: a store is already configured",
                    loc_path.display()
                );
            }
            let location = match s3_bucket {
                Some(bucket) => StoreLocation::S3(S3Config {
                    endpoint: s3_endpoint,
                    region: s3_region,
                    bucket,
                    prefix: s3_prefix,
                    path_style,
                    ..Default::default()
                }),
                None => {
                    if s3_endpoint.is_some() {
                        bail!("--s3-endpoint needs --s3-bucket");
                    }
                    StoreLocation::Local {
                        path: path.unwrap_or_else(|| data_dir.join("store")),
                    }
                }
            };
            let mut opts = CreateOptions {
                compression: match compression.as_str() {
                    "zstd" => Compression::Zstd,
                    "none" => Compression::None,
                    other => bail!("unknown compression {other:?} (zstd or none)"),
                },
                cipher: Cipher::parse(&cipher)?,
                ..Default::default()
            };
            if let Some(cs) = chunk_size {
                opts.chunk_size = cs;
            }
            if let Some(d) = fan_out_digits {
                opts.fan_out_digits = d;
            }
            opts.layout = layout.map(LayoutArg::layout);
            if let Some(m) = max_session {
                let secs = parse_duration(&m)?.as_secs();
                if secs == 0 {
                    bail!("--max-session must be at least 1s");
                }
                opts.max_session_secs = secs;
            }
            let (key, key_path) = if encrypt {
                let kp = key_file.unwrap_or_else(|| data_dir.join("store.key"));
                let k = StoreKey::generate();
                k.write_new(&kp)?;
                (Some(k), Some(kp))
            } else {
                (None, None)
            };
            let store = match location.create(opts, key.as_ref()).await {
                Ok(s) => s,
                Err(e) => {
                    if let Some(kp) = &key_path {
                        let _ = std::fs::remove_file(kp);
                    }
                    return Err(e.into());
                }
            };
            let file = LocationFile {
                location,
                key_file: key_path.clone(),
            };
            std::fs::write(&loc_path, toml::to_string(&file)?)
                .with_context(|| format!("writing {}", loc_path.display()))?;
            println!("created replica store at {}", store.backend().describe());
            println!(
                "chunk size {}, compression {:?}",
                human(store.chunk_size() as u64),
                store.settings().compression
            );
            if let Some(kp) = key_path {
                println!(
                    "encrypted ({:?}); key file {} (fingerprint {}). Back it up: without it the store is unreadable.",
                    store.settings().encryption.as_ref().map(|e| e.cipher),
                    kp.display(),
                    key.map(|k| k.fingerprint()).unwrap_or_default()
                );
            }
            Ok(())
        }
        StoreCommand::Info { json } => {
            let store = open_store(data_dir).await?;
            let info = gateway::api::handlers::store::store_info(&store).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(());
            }
            let s = store.settings();
            println!("location:        {}", store.backend().describe());
            println!("store id:        {}", s.store_id);
            println!("format version:  {}", s.format_version);
            println!("chunk size:      {}", human(s.chunk_size as u64));
            println!(
                "chunk fan-out:   {} hex digits ({} directories)",
                s.fan_out_digits,
                1u32 << (4 * s.fan_out_digits)
            );
            println!(
                "compression:     {:?} (level {})",
                s.compression, s.compression_level
            );
            match &s.encryption {
                Some(e) => println!(
                    "encryption:      {:?}, key fingerprint {}",
                    e.cipher, e.key_fingerprint
                ),
                None => println!("encryption:      none"),
            }
            println!(
                "layout:          {}",
                match s.layout {
                    replica_store::Layout::Chunks => "chunks (one object per chunk)".to_string(),
                    replica_store::Layout::Packs =>
                        format!("packs of {} (format 5)", human(s.pack_size as u64)),
                }
            );
            let u = &info.usage;
            println!("chunks:          {} ({})", u.chunks, human(u.chunk_bytes));
            if s.layout == replica_store::Layout::Packs {
                println!("packs:           {} live packs", u.packs);
            }
            println!(
                "objects:         {} ({}), by size:",
                u.objects,
                human(u.object_bytes)
            );
            for c in &u.sizes {
                println!(
                    "  {:>9} .. < {:>9}: {:>9} objects {:>10}",
                    human(c.min_bytes),
                    human(c.below_bytes),
                    c.objects,
                    human(c.bytes)
                );
            }
            let points = store.list_points(None).await?;
            println!("points:          {}", points.len());
            for vm in store.list_vms().await? {
                let vp: Vec<_> = points.iter().filter(|p| p.vm == vm).collect();
                let disks: Vec<String> = vp
                    .last()
                    .map(|p| {
                        p.disks
                            .iter()
                            .map(|d| format!("{} ({})", d.name, human(d.size)))
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "  vm {vm}: {} points, disks: {}",
                    vp.len(),
                    disks.join(", ")
                );
            }
            Ok(())
        }
        StoreCommand::Verify {
            point,
            point_flag,
            json,
        } => {
            let point = point.or(point_flag);
            if let crate::api_client::Target::Gateway(api) = crate::api_client::target(data_dir)? {
                return verify_through(&api, point, json).await;
            }
            let counters = std::sync::Arc::new(replica_store::VerifyProgress::default());
            let p = crate::progress::Progress::percent("store verify");
            let work = gateway::site::verify_store(data_dir, point.as_deref(), &counters);
            tokio::pin!(work);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let report = loop {
                tokio::select! {
                    r = &mut work => break r,
                    _ = tick.tick() => {
                        let c = counters.counts();
                        p.set_percent_with(c.percent(), &verify_line(&c));
                    }
                }
            };
            let c = counters.counts();
            p.set_percent_with(c.percent(), &verify_line(&c));
            p.finish();
            print_verify(&VerifyView::from(report?), json)
        }
        StoreCommand::Gc { dry_run, grace } => {
            let store = open_store(data_dir).await?;
            let work = store.gc(GcOptions {
                grace: parse_duration(&grace)?,
                dry_run,
                fossil_delay: None,
                now: None,
            });
            let r = crate::progress::around("store gc: read", None, "rchar", work).await?;
            let verb = if dry_run { "would move" } else { "moved" };
            println!(
                "{} points reference {} chunks; {} chunk objects listed, {} young unreferenced kept",
                r.points, r.referenced_chunks, r.chunks_listed, r.kept_young
            );
            println!(
                "{verb} {} unreferenced chunks ({}) to fossils; {} fossils restored; {} fossils deleted ({}); {} orphan indexes removed",
                r.fossilized,
                human(r.fossilized_bytes),
                r.resurrected,
                r.deleted,
                human(r.deleted_bytes),
                r.orphan_indexes_deleted
            );
            if store.layout() == replica_store::Layout::Packs {
                println!(
                    "packs: {} listed, {} set aside, {} repacked ({} chunks, {}), {} deleted, {} without an index deleted",
                    r.packs_listed,
                    r.packs_fossilized,
                    r.packs_repacked,
                    r.chunks_repacked,
                    human(r.bytes_repacked),
                    r.packs_deleted,
                    r.orphan_packs_deleted
                );
            }
            Ok(())
        }
        StoreCommand::Prune(PruneArgs {
            vm,
            keep_last,
            keep_within,
            dry_run,
        }) => {
            let store = open_store(data_dir).await?;
            let policy = RetentionPolicy {
                keep_last,
                keep_within: keep_within.as_deref().map(parse_duration).transpose()?,
            };
            let r = store.prune(vm.as_deref(), policy, dry_run).await?;
            for p in &r.removed {
                println!("{} {p}", if dry_run { "would remove" } else { "removed" });
            }
            println!(
                "kept {} points, {} {}",
                r.kept.len(),
                if dry_run { "would remove" } else { "removed" },
                r.removed.len()
            );
            if !dry_run && !r.removed.is_empty() {
                println!("run `standby store gc` to free the chunks they used");
            }
            Ok(())
        }
        StoreCommand::Import { items, consistency } => {
            if items.len() % 2 != 0 {
                bail!("import takes pairs: VM/DISK IMAGE [VM/DISK IMAGE ...]");
            }
            let store = open_store(data_dir).await?;
            let mut vm_name: Option<String> = None;
            let mut pairs = Vec::new();
            for pair in items.chunks(2) {
                let (vm, disk) = pair[0]
                    .split_once('/')
                    .with_context(|| format!("{:?}: expected VM/DISK", pair[0]))?;
                if vm_name.get_or_insert_with(|| vm.to_string()) != vm {
                    bail!("all disks of one import must belong to the same VM");
                }
                pairs.push((disk.to_string(), PathBuf::from(&pair[1])));
            }
            let vm = vm_name.context("nothing to import")?;
            let mut b = store.point_builder(&vm)?;
            b.set_consistency(match consistency.as_str() {
                "crash" => Consistency::Crash,
                "app" => Consistency::App,
                other => bail!("unknown consistency {other:?} (crash or app)"),
            });
            for (disk, image) in &pairs {
                let work = replica_store::import_disk(
                    &mut b,
                    disk,
                    image,
                    replica_store::image::DEFAULT_CONCURRENCY,
                );
                let size = std::fs::metadata(image).ok().map(|m| m.len());
                let label = format!("import {vm}/{disk}");
                let st = crate::progress::around(&label, size, "rchar", work).await?;
                let secs = st.elapsed.as_secs_f64().max(1e-9);
                println!(
                    "{vm}/{disk}: {} in {:.2}s ({:.0} MB/s): {} chunks uploaded ({}), {} already stored, {} zero",
                    human(st.bytes_read),
                    secs,
                    st.bytes_read as f64 / secs / 1e6,
                    st.uploaded_chunks,
                    human(st.uploaded_bytes),
                    st.dedup_chunks,
                    st.zero_chunks
                );
            }
            let p = b.publish().await?;
            println!("published recovery point {}", p.full_id());
            Ok(())
        }
        StoreCommand::Export { point, file, disk } => {
            let store = open_store(data_dir).await?;
            let meta = store.find_point(&point).await?;
            let disk = match disk {
                Some(d) => d,
                None if meta.disks.len() == 1 => meta.disks[0].name.clone(),
                None => bail!(
                    "point {} has several disks ({}); choose one with --disk",
                    meta.full_id(),
                    meta.disks
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let work = replica_store::export_disk(
                &store,
                &meta,
                &disk,
                &file,
                replica_store::image::DEFAULT_CONCURRENCY,
            );
            let size = meta.disk(&disk).ok().map(|d| d.size);
            let label = format!("export {}:{disk}", meta.full_id());
            let n = crate::progress::around(&label, size, "wchar", work).await?;
            println!(
                "exported {}:{} to {} ({} of data, {} disk size)",
                meta.full_id(),
                disk,
                file.display(),
                human(n),
                human(meta.disk(&disk)?.size)
            );
            Ok(())
        }
    }
}

/// Run a `standby points` subcommand.
pub async fn run_points(cmd: PointsCommand, data_dir: &Path) -> anyhow::Result<()> {
    match cmd {
        PointsCommand::Prune(args) => run_store(StoreCommand::Prune(args), data_dir).await,
        PointsCommand::Show { point, json } => {
            let store = open_store(data_dir).await?;
            let p = store.find_point(&point).await?;
            if json {
                let v: gateway::replication::status::PointView = p.into();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("point {}", p.full_id());
            println!("  created      {}", time_of(p.created_unix_ms));
            println!(
                "  consistency  {}",
                format!("{:?}", p.consistency).to_lowercase()
            );
            for d in &p.disks {
                println!(
                    "  disk {:<12} {} (log position {})",
                    d.name,
                    human(d.size),
                    d.source_lsn
                );
            }
            Ok(())
        }
        PointsCommand::List { vm, json } => {
            let store = open_store(data_dir).await?;
            let listing = store.list_points_checked(vm.as_deref()).await?;
            crate::store_seen::report_junk(&listing.junk);
            let points = listing.points;
            if let Ok(db) = gateway::replication::db::Db::open(data_dir) {
                let vms: std::collections::BTreeSet<&str> = points
                    .iter()
                    .map(|p| p.vm.as_str())
                    .chain(vm.as_deref())
                    .collect();
                let mut rolled = false;
                for v in vms {
                    if let Some((mark, newest)) = crate::store_seen::rollback(&db, v, &points)? {
                        rolled = true;
                        eprintln!("warning: the store went back in time for VM {v}: this gateway has seen point {mark}, the store's newest is {newest}");
                    }
                }
                if !rolled {
                    crate::store_seen::record(&db, &points)?;
                }
            }
            if json {
                let v: Vec<gateway::replication::status::PointView> =
                    points.into_iter().map(Into::into).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if points.is_empty() {
                println!("no recovery points");
                return Ok(());
            }
            println!(
                "{:<16} {:<40} {:<21} {:<6} DISKS",
                "VM", "POINT", "CREATED", "CONS"
            );
            for p in points {
                let disks: Vec<String> = p
                    .disks
                    .iter()
                    .map(|d| format!("{}:{}@lsn{}", d.name, human(d.size), d.source_lsn))
                    .collect();
                println!(
                    "{:<16} {:<40} {:<21} {:<6} {}",
                    p.vm,
                    p.id,
                    time_of(p.created_unix_ms),
                    format!("{:?}", p.consistency).to_lowercase(),
                    disks.join(" ")
                );
            }
            Ok(())
        }
    }
}

/// A running verification in a few words.
fn verify_line(c: &replica_store::VerifyCounts) -> String {
    if c.points_total == 0 && c.chunks_total == 0 {
        "listing the store".to_string()
    } else if c.chunks_total == 0 {
        format!("indexes of {} of {} points", c.points_read, c.points_total)
    } else {
        format!(
            "{} of {} chunks ({})",
            c.chunks_done,
            c.chunks_total,
            human(c.bytes_checked)
        )
    }
}

/// Prints a verification's report (text, or the JSON of `--json`); an error when anything is
/// wrong, so the exit status says it.
fn print_verify(r: &VerifyView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!(
            "checked {} points, {} chunks ({})",
            r.points_checked,
            r.chunks_checked,
            human(r.bytes_checked)
        );
        for b in &r.bad_objects {
            println!("BAD OBJECT {}: {}", b.key, b.reason);
        }
        for m in &r.missing {
            println!(
                "MISSING chunk {} (used by {})",
                m.chunk,
                m.points.join(", ")
            );
        }
        for c in &r.corrupt {
            println!(
                "CORRUPT chunk {}: {} (used by {})",
                c.chunk,
                c.reason,
                c.points.join(", ")
            );
        }
        if r.ok {
            println!("OK");
        } else {
            println!("broken points: {}", r.broken_points.join(", "));
        }
    }
    if r.ok {
        return Ok(());
    }
    bail!(
        "verification failed: {} missing, {} corrupt chunks, {} bad objects",
        r.missing.len(),
        r.corrupt.len(),
        r.bad_objects.len()
    )
}

/// `store verify` while a gateway runs: the gateway verifies as a job
/// (`POST /api/v1/store/verify`); the CLI follows it (`GET /api/v1/jobs/{id}`) with a progress
/// display and prints its result as the offline verification does. Ctrl-C stops following,
/// not the job.
async fn verify_through(
    api: &crate::api_client::Api,
    point: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let started = api
        .post("/store/verify", Some(serde_json::json!({ "point": point })))
        .await?;
    let Some(job) = started["job"].as_i64() else {
        bail!("the gateway's answer names no job: {started}");
    };
    eprintln!("store verify: the running gateway verifies the store (job {job})");
    let p = crate::progress::Progress::percent(&format!("store verify (job {job})"));
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    let j = loop {
        let j = api.get(&format!("/jobs/{job}")).await?;
        p.set_percent_with(
            j["progress_percent"].as_f64().unwrap_or(0.0),
            j["detail"].as_str().unwrap_or_default(),
        );
        if j["state"].as_str() != Some("running") {
            break j;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = &mut interrupt => {
                drop(p);
                bail!(
                    "stopped following: job {job} carries on in the gateway (see `standby job \
                     show {job}`)"
                );
            }
        }
    };
    p.finish();
    if j["result"].is_null() {
        bail!(
            "store verification job {job} ended {}: {}",
            j["state"].as_str().unwrap_or("?"),
            j["error"].as_str().unwrap_or_default()
        );
    }
    let r: VerifyView = serde_json::from_value(j["result"].clone())
        .with_context(|| format!("the result of job {job} is not a verification report"))?;
    print_verify(&r, json)
}
