//! Benchmark helper for tools/bench/store.sh and the chunk-size measurements in
//! docs/replica-store.md.
//!
//! ```text
//! store_bench import STORE IMAGE [--chunk-size N] [--compression zstd|none] [--encrypt]
//!                    [--layout chunks|packs] [--pack-size BYTES] [--uploads N]
//! store_bench du STORE
//! store_bench delta STORE IMAGE --writes N [--chunk-size N] [--seed S] [layout options]
//! ```
//! `--layout` defaults to the backend's preference (packs on S3, chunks locally); `puts` is
//! the number of PUT requests the session made (pack, pack index, disk index and point
//! objects, or one per chunk), `puts_per_mib` that per MiB uploaded.
//! STORE is a directory or `s3://BUCKET/PREFIX` (endpoint from STANDBY_BENCH_S3_ENDPOINT,
//! credentials from the AWS environment). Prints one `key=value` line.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow_free::*;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use replica_store::{Compression, CreateOptions, Layout, S3Config, StoreKey, StoreLocation};

mod anyhow_free {
    pub type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn location(s: &str) -> StoreLocation {
    match s.strip_prefix("s3://") {
        Some(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            StoreLocation::S3(S3Config {
                endpoint: std::env::var("STANDBY_BENCH_S3_ENDPOINT").ok(),
                region: Some(std::env::var("AWS_REGION").unwrap_or_else(|_| "garage".into())),
                bucket: bucket.into(),
                prefix: prefix.into(),
                path_style: true,
                ..Default::default()
            })
        }
        None => StoreLocation::Local {
            path: PathBuf::from(s),
        },
    }
}

async fn stored_bytes(store: &replica_store::Store) -> R<(u64, usize)> {
    let objs = store.backend().list("").await?;
    Ok((objs.iter().map(|o| o.size).sum(), objs.len()))
}

#[tokio::main]
async fn main() -> R<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    if mode == "du" {
        // Bytes and objects under a location (any prefix, a store or not).
        let Some(store_arg) = args.get(2) else {
            eprintln!("usage: store_bench du STORE");
            std::process::exit(2);
        };
        let objs = location(store_arg).backend().await?.list("").await?;
        println!(
            "mode=du objects={} bytes={}",
            objs.len(),
            objs.iter().map(|o| o.size).sum::<u64>()
        );
        return Ok(());
    }
    let (Some(store_arg), Some(image)) = (args.get(2), args.get(3)) else {
        eprintln!("usage: store_bench import|delta STORE IMAGE [options]");
        std::process::exit(2);
    };
    let chunk_size: u32 = arg(&args, "--chunk-size")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(0);
    let compression = match arg(&args, "--compression").as_deref() {
        Some("none") => Compression::None,
        _ => Compression::Zstd,
    };
    let key = args
        .iter()
        .any(|a| a == "--encrypt")
        .then(StoreKey::generate);
    let mut opts = CreateOptions {
        compression,
        ..Default::default()
    };
    if chunk_size > 0 {
        opts.chunk_size = chunk_size;
    }
    opts.layout = match arg(&args, "--layout").as_deref() {
        Some("chunks") => Some(Layout::Chunks),
        Some("packs") => Some(Layout::Packs),
        _ => None,
    };
    if let Some(n) = arg(&args, "--pack-size") {
        opts.pack_size = n.parse()?;
    }
    let loc = location(store_arg);
    let store = loc.create(opts, key.as_ref()).await?;
    if let Some(n) = arg(&args, "--uploads") {
        store.set_pack_uploads(n.parse()?);
    }
    let image = PathBuf::from(image);

    let t = Instant::now();
    let mut b = store.point_builder("bench")?;
    let stats = replica_store::import_disk(&mut b, "disk0", &image, 16).await?;
    let import_secs = t.elapsed().as_secs_f64();
    let p = b.publish().await?;
    let secs = t.elapsed().as_secs_f64();
    let (stored, objects) = stored_bytes(&store).await?;
    let up = p.upload.unwrap_or_default();
    if mode == "import" {
        println!(
            "mode=import layout={:?} chunk_size={} bytes={} secs={:.3} publish_secs={:.3} mbps={:.0} stored_bytes={} objects={} puts={} put_bytes={} puts_per_mib={:.3} uploaded_chunks={} zero_chunks={}",
            store.layout(),
            store.chunk_size(),
            stats.bytes_read,
            secs,
            secs - import_secs,
            stats.bytes_read as f64 / secs / 1e6,
            stored,
            objects,
            up.puts,
            up.bytes,
            up.puts as f64 / (up.bytes as f64 / 1048576.0).max(1e-9),
            stats.uploaded_chunks,
            stats.zero_chunks
        );
        return Ok(());
    }
    // delta: N random 4 KiB writes into the image, then a point from the parent that
    // re-reads and re-uploads only the chunks containing a write.
    let writes: u64 = arg(&args, "--writes")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5243);
    let seed: u64 = arg(&args, "--seed")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)?;
    let size = f.metadata()?.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut touched = std::collections::BTreeSet::new();
    let cs = store.chunk_size() as u64;
    for _ in 0..writes {
        let off = rng.gen_range(0..size / 4096) * 4096;
        let mut buf = [0u8; 4096];
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, off)?;
        touched.insert(off / cs);
    }
    let t = Instant::now();
    let mut d = replica_store::PointBuilder::from_parent(&store, &p).await?;
    let mut uploaded = 0u64;
    for ci in &touched {
        let len = d.index("disk0")?.chunk_len(*ci);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, ci * cs)?;
        uploaded += d
            .write_chunk("disk0", *ci, Bytes::from(buf))
            .await?
            .uploaded_bytes;
    }
    let dp = d.publish().await?;
    let up = dp.upload.unwrap_or_default();
    let (stored2, _) = stored_bytes(&store).await?;
    println!(
        "mode=delta layout={:?} puts={} puts_per_mib={:.3} chunk_size={} writes={} written_bytes={} chunks_touched={} uploaded_bytes={} amplification={:.1} store_growth={} secs={:.3}",
        store.layout(),
        up.puts,
        up.puts as f64 / (up.bytes as f64 / 1048576.0).max(1e-9),
        cs,
        writes,
        writes * 4096,
        touched.len(),
        uploaded,
        uploaded as f64 / (writes * 4096) as f64,
        stored2 - stored,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
