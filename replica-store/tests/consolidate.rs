//! Background consolidation and rebase: a chain of delta points, consolidations started on
//! published points and finished at random later cuts (some discarded, some aborted midway,
//! some overtaken by an inline fold), garbage collection with consolidations in flight —
//! every point must read back exactly the reference model of its cut, on the local and the
//! in-memory backend, with chunk files and with packs. Cuts with whole-chunk writes store those
//! chunks once and refer to them from the chain; the chains mix both kinds, and a delta of
//! whole chunks on packs stays within one PUT per MiB and consolidates without rewriting any.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use replica_store::backend::local::LocalBackend;
use replica_store::testing::MemoryBackend;
use replica_store::{
    Backend, Consolidated, CreateOptions, GcOptions, Layout, Patch, PointBuilder, PointMeta,
    ReaderOptions, RebaseSkipped, Store,
};

const CS: u64 = 64 * 1024;
const SIZE: u64 = 24 * CS + 5000; // a short last chunk

async fn read_all(store: &Store, p: &PointMeta) -> Vec<u8> {
    let r = store
        .open_disk(p, "d", ReaderOptions::default())
        .await
        .unwrap();
    r.read_at(0, SIZE as usize).await.unwrap().to_vec()
}

fn gc_now(fossil_delay: Option<Duration>) -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
        fossil_delay,
        now: None,
    }
}

async fn store_on(backend: Arc<dyn Backend>, layout: Layout, max_session_secs: u64) -> Store {
    Store::create(
        backend,
        CreateOptions {
            chunk_size: CS as u32,
            layout: Some(layout),
            pack_size: 1 << 20,
            max_session_secs,
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap()
}

/// One random interval of writes: whole chunks (stored by the cut as chunks, referred to
/// from the chain; some all zeroes, and the short last one), partial writes and zeroing.
fn random_patch(rng: &mut StdRng, model: &mut [u8]) -> Patch {
    let mut p = Patch::new(SIZE);
    for _ in 0..rng.gen_range(1..6) {
        let (off, len) = match rng.gen_range(0..5) {
            0 | 3 => {
                let c = rng.gen_range(0..SIZE.div_ceil(CS));
                let len = (SIZE - c * CS).min(CS);
                if rng.gen_bool(0.2) {
                    p.write(c * CS, &vec![0u8; len as usize]).unwrap();
                    model[(c * CS) as usize..(c * CS + len) as usize].fill(0);
                    continue;
                }
                (c * CS, len)
            }
            1 => {
                let off = rng.gen_range(0..SIZE - 1);
                (off, rng.gen_range(1..=(SIZE - off).min(3 * CS)))
            }
            _ => {
                let off = rng.gen_range(0..SIZE - 1);
                let len = rng.gen_range(1..=(SIZE - off).min(CS));
                p.zero(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                continue;
            }
        };
        let mut d = vec![0u8; len as usize];
        rng.fill_bytes(&mut d);
        p.write(off, &d).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
    p
}

async fn chain_of_cuts(store: Store, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE as usize];
    rng.fill_bytes(&mut model[..(SIZE / 2) as usize]);
    let mut b = PointBuilder::new(&store, "vm").unwrap();
    b.add_disk("d", SIZE).unwrap();
    for (i, c) in model.chunks(CS as usize).enumerate() {
        b.write_chunk("d", i as u64, Bytes::copy_from_slice(c))
            .await
            .unwrap();
    }
    let mut parent = b.publish().await.unwrap();
    let mut cuts: Vec<(PointMeta, Vec<u8>)> = vec![(parent.clone(), model.clone())];
    let mut running: Option<tokio::task::JoinHandle<replica_store::Result<Consolidated>>> = None;
    let (mut rebased, mut dropped, mut aborted) = (0, 0, 0);
    let (mut ref_objects, mut data_objects) = (0, 0);
    for step in 0..30 {
        let patch = random_patch(&mut rng, &mut model);
        let mut b = PointBuilder::from_parent(&store, &parent).await.unwrap();
        // A consolidation finishes at a random later cut (or is aborted: a crash).
        if running.is_some() && rng.gen_bool(0.4) {
            let h = running.take().unwrap();
            if rng.gen_bool(0.15) {
                h.abort();
                aborted += 1;
            } else {
                let c = h.await.unwrap().unwrap();
                match b.rebase(&c).unwrap() {
                    Ok(()) => rebased += 1,
                    Err(RebaseSkipped::OtherBase) => dropped += 1,
                    Err(other) => panic!("unexpected skip at step {step}: {other}"),
                }
            }
        }
        b.add_patch("d", patch).await.unwrap();
        if rng.gen_bool(0.15) {
            b.fold("d").await.unwrap(); // the hard limit: inline fold
        }
        parent = b.publish().await.unwrap();
        for r in &parent.disks[0].patches {
            if r.chunk_refs > 0 {
                assert_eq!(r.data_bytes, 0, "reference objects carry no data");
                ref_objects += 1;
            } else {
                data_objects += 1;
            }
        }
        assert_eq!(read_all(&store, &parent).await, model, "step {step}");
        cuts.push((parent.clone(), model.clone()));
        if running.is_none() && !parent.disks[0].patches.is_empty() && rng.gen_bool(0.5) {
            let (s, p) = (store.clone(), parent.clone());
            running = Some(tokio::spawn(async move { s.consolidate(&p, "d").await }));
        }
        if rng.gen_bool(0.15) {
            // GC while a consolidation may be in flight (fossils kept for max_session_secs).
            store.gc(gc_now(None)).await.unwrap();
        }
    }
    if let Some(h) = running.take() {
        let _ = h.await;
    }
    assert!(rebased > 0, "seed {seed}: no rebase happened");
    assert!(
        ref_objects > 0 && data_objects > 0,
        "seed {seed}: chains must mix chunk references ({ref_objects}) and data ({data_objects})"
    );
    eprintln!("seed {seed}: {rebased} rebased, {dropped} dropped, {aborted} aborted");
    for (p, m) in &cuts {
        assert_eq!(&read_all(&store, p).await, m, "point {}", p.id);
    }
    // Collect everything unreferenced (aborted or dropped consolidations): nothing a point
    // needs goes.
    store.gc(gc_now(None)).await.unwrap();
    store.gc(gc_now(Some(Duration::ZERO))).await.unwrap();
    for (p, m) in &cuts {
        assert_eq!(&read_all(&store, p).await, m, "point {} after gc", p.id);
    }
    assert!(store.verify_all().await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebased_points_read_like_the_model_memory() {
    for seed in 0..2 {
        for layout in [Layout::Chunks, Layout::Packs] {
            let s = store_on(Arc::new(MemoryBackend::new()), layout, 21_600).await;
            chain_of_cuts(s, seed).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebased_points_read_like_the_model_local() {
    let dir = tempfile::tempdir().unwrap();
    for (i, layout) in [Layout::Chunks, Layout::Packs].into_iter().enumerate() {
        let be = Arc::new(LocalBackend::open(dir.path().join(format!("s{i}"))).unwrap());
        chain_of_cuts(store_on(be, layout, 21_600).await, 100 + i as u64).await;
    }
}

/// A consolidation is refused once it is as old as half the store's session limit (GC may
/// otherwise have deleted its unreferenced chunks), and when the chain no longer starts with
/// the folded patches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_or_unrelated_consolidations_are_refused() {
    let store = store_on(Arc::new(MemoryBackend::new()), Layout::Chunks, 2).await;
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = StdRng::seed_from_u64(7);
    let mut b = PointBuilder::new(&store, "vm").unwrap();
    b.add_disk("d", SIZE).unwrap();
    let base = b.publish().await.unwrap();
    let mut b = PointBuilder::from_parent(&store, &base).await.unwrap();
    b.add_patch("d", random_patch(&mut rng, &mut model))
        .await
        .unwrap();
    let p1 = b.publish().await.unwrap();
    let c = store.consolidate(&p1, "d").await.unwrap();
    assert_eq!(c.covered, p1.disks[0].patches);

    // A sibling of p1 (same base, other patches) cannot use it.
    let mut other = vec![0u8; SIZE as usize];
    let mut b = PointBuilder::from_parent(&store, &base).await.unwrap();
    b.add_patch("d", random_patch(&mut rng, &mut other))
        .await
        .unwrap();
    assert_eq!(b.rebase(&c).unwrap(), Err(RebaseSkipped::OtherPatches));

    // A descendant can, until the consolidation is too old.
    let mut b = PointBuilder::from_parent(&store, &p1).await.unwrap();
    assert_eq!(b.rebase(&c).unwrap(), Ok(()));
    let p2 = b.publish().await.unwrap();
    assert!(p2.disks[0].patches.is_empty());
    assert_eq!(p2.disks[0].index_key, c.index_key);
    assert_eq!(read_all(&store, &p2).await, model);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut b = PointBuilder::from_parent(&store, &p1).await.unwrap();
    assert_eq!(b.rebase(&c).unwrap(), Err(RebaseSkipped::TooOld));
}

/// Read cost at the hard limit's object count: opening a disk whose chain holds 1,024 patch
/// objects (the most a cut lets through) on the local backend. Prints the time; run with
/// `cargo test --release -p replica-store --test consolidate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn open_cost_of_a_chain_at_the_object_limit() {
    const N: usize = 1024;
    const PIECE: usize = 64 << 10;
    let size: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let be = Arc::new(LocalBackend::open(dir.path().join("s")).unwrap());
    let store = store_on(be, Layout::Chunks, 21_600).await;
    let mut b = PointBuilder::new(&store, "vm").unwrap();
    b.add_disk("d", size).unwrap();
    let mut p = b.publish().await.unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut b = PointBuilder::from_parent(&store, &p).await.unwrap();
    for i in 0..N {
        let mut patch = Patch::new(size);
        let mut d = vec![0u8; PIECE];
        rng.fill_bytes(&mut d);
        patch
            .write((i as u64 * 3 % 4096) * PIECE as u64, &d)
            .unwrap();
        b.add_patch("d", patch).await.unwrap();
    }
    p = b.publish().await.unwrap();
    assert_eq!(p.disks[0].patches.len(), N);
    let t = std::time::Instant::now();
    let r = store
        .open_disk(&p, "d", ReaderOptions::default())
        .await
        .unwrap();
    let open = t.elapsed();
    let t = std::time::Instant::now();
    let c = store.consolidate(&p, "d").await.unwrap();
    eprintln!(
        "{N} patch objects of {PIECE} bytes: open_disk {open:?}; consolidate {:?} ({} chunks)",
        t.elapsed(),
        c.chunks
    );
    drop(r);
}

/// A delta of whole random chunks on packs (the S3 default): the cut stores them as chunks in
/// the session's packs, so the point's request count stays at most one PUT per MiB uploaded,
/// its chain holds one data-free reference object, and consolidating it reads and stores no
/// chunk (an index update).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_chunk_deltas_on_packs_cost_at_most_one_put_per_mib() {
    let be: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    let store = Store::create(
        be,
        CreateOptions {
            chunk_size: CS as u32,
            layout: Some(Layout::Packs),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    const BIG: u64 = 1024 * CS; // 64 MiB
    let mut b = PointBuilder::new(&store, "vm").unwrap();
    b.add_disk("d", BIG).unwrap();
    let base = b.publish().await.unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut model = vec![0u8; BIG as usize];
    let mut p = Patch::new(BIG);
    for _ in 0..512 {
        let c = rng.gen_range(0..BIG / CS);
        let mut d = vec![0u8; CS as usize];
        rng.fill_bytes(&mut d);
        p.write(c * CS, &d).unwrap();
        model[(c * CS) as usize..((c + 1) * CS) as usize].copy_from_slice(&d);
    }
    let mut b = PointBuilder::from_parent(&store, &base).await.unwrap();
    let uploaded = b.add_patch("d", p).await.unwrap();
    let point = b.publish().await.unwrap();
    let up = point.upload.unwrap();
    let mib = up.bytes as f64 / f64::from(1 << 20);
    assert!(uploaded > 0 && mib > 8.0, "{up:?}");
    assert!(up.puts as f64 <= mib, "{} PUTs for {mib:.1} MiB", up.puts);
    let chain = &point.disks[0].patches;
    assert_eq!(chain.len(), 1, "{chain:?}");
    assert!(
        chain[0].chunk_refs > 300 && chain[0].data_bytes == 0,
        "{chain:?}"
    );
    let r = store
        .open_disk(&point, "d", ReaderOptions::default())
        .await
        .unwrap();
    assert_eq!(r.read_at(0, BIG as usize).await.unwrap().to_vec(), model);
    let c = store.consolidate(&point, "d").await.unwrap();
    // Only the folded index is written: no chunk rewritten.
    assert!(
        c.uploaded < 4 * BIG / CS * 32,
        "{} bytes uploaded",
        c.uploaded
    );
    let mut b = PointBuilder::from_parent(&store, &point).await.unwrap();
    b.rebase(&c).unwrap().unwrap();
    let folded = b.publish().await.unwrap();
    assert!(folded.disks[0].patches.is_empty());
    let r = store
        .open_disk(&folded, "d", ReaderOptions::default())
        .await
        .unwrap();
    assert_eq!(r.read_at(0, BIG as usize).await.unwrap().to_vec(), model);
    store.gc(gc_now(Some(Duration::ZERO))).await.unwrap();
    assert!(store.verify_all().await.unwrap().is_ok());
}
