//! Scenarios of the packs layout (format 5), run against every backend like the rest of the
//! suite: a reference model (what was written) against what the store returns, PUT counts,
//! GC and repacking racing upload sessions, faults, and the format checks.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{
    count, faults_never_wrong_data_with, image, pack_options, random_bytes, read_all, test_options,
    write_point, BackendFactory, TEST_CHUNK,
};
use crate::chunk::ChunkId;
use crate::gc::GcOptions;
use crate::pack::Layout;
use crate::point::PointMeta;
use crate::store::{PutKind, Store};

/// Objects under `prefix`, by key.
async fn keys(store: &Store, prefix: &str) -> Vec<String> {
    store
        .backend()
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// Points written, chunks in packs, reads from a second handle, dedup, deltas, and the PUTs
/// each session made.
pub async fn packs_roundtrip_and_requests(f: &dyn BackendFactory) {
    let backend = f.fresh("packs-roundtrip").await;
    let store = Store::create(backend.clone(), pack_options(), None)
        .await
        .unwrap();
    assert_eq!(store.layout(), Layout::Packs);
    assert_eq!(store.settings().format_version, 5);
    // 40 random chunks (2.5 MiB: two full 1 MiB packs and a partial one), zeros, repeats.
    let layout: String = "r".repeat(40) + "zzaabc";
    let img = image(7, &layout);
    let p = write_point(&store, "vm", &[("d", &img)]).await;
    assert_eq!(count(&backend, "chunks/").await, 0, "no chunk objects");
    let packs = count(&backend, "packs/").await;
    assert_eq!(packs, 3, "2.6 MiB of chunks in 1 MiB packs");
    assert_eq!(count(&backend, "packidx/").await, packs);
    let up = p.upload.unwrap();
    // Three packs and their indexes, one disk index, the point.
    assert_eq!(up.puts, 2 * packs as u64 + 2, "{up:?}");
    assert_eq!(up.chunks, 40 + 3);
    assert!(
        up.puts as f64 <= up.bytes as f64 / 1048576.0 * 4.0,
        "{up:?}"
    );

    // A second handle (another gateway) reads everything back.
    let other = Store::open(backend.clone(), None).await.unwrap();
    assert_eq!(read_all(&other, &p, "d").await, img);
    assert!(other.verify_all().await.unwrap().is_ok());
    let some = other.load_index(&p, "d").await.unwrap().get(3).unwrap();
    assert!(other.has_chunk(&some).await.unwrap());
    assert!(!other.has_chunk(&ChunkId([9; 32])).await.unwrap());

    // The same image again: nothing uploaded, only the index and the point are written.
    let again = write_point(&other, "vm2", &[("d", &img)]).await;
    let up = again.upload.unwrap();
    assert_eq!((up.puts, up.chunks), (2, 0), "{up:?}");
    assert_eq!(count(&backend, "packs/").await, packs);

    // A delta changing one chunk: one small pack, its index, the index, the point.
    let mut d = crate::point::PointBuilder::from_parent(&other, &p)
        .await
        .unwrap();
    let new_chunk = random_bytes(99, TEST_CHUNK as usize);
    let out = d
        .write_chunk("d", 5, Bytes::copy_from_slice(&new_chunk))
        .await
        .unwrap();
    assert_eq!(out.kind, PutKind::Uploaded);
    let dp = d.publish().await.unwrap();
    assert_eq!(dp.upload.unwrap().puts, 4, "{:?}", dp.upload);
    let mut want = img.clone();
    let cs = TEST_CHUNK as usize;
    want[5 * cs..6 * cs].copy_from_slice(&new_chunk);
    assert_eq!(read_all(&store, &dp, "d").await, want);
    assert_eq!(read_all(&store, &p, "d").await, img);

    // Backend counters (where kept) agree: well under one PUT per MiB stored.
    if let Some(r) = store.requests() {
        assert!(r.puts > 0 && r.put_bytes > 0, "{r:?}");
    }
}

/// GC and repacking against a reference model, with upload sessions that started before
/// and after the run: a published point never loses a chunk, a session that started after
/// a pack was set aside uploads its chunks again, and fossil packs are deleted only after
/// the fossil delay and only when no point needs them.
pub async fn packs_gc_repack_with_sessions(f: &dyn BackendFactory) {
    let backend = f.fresh("packs-gc").await;
    let store = Store::create(backend.clone(), pack_options(), None)
        .await
        .unwrap();
    let cs = TEST_CHUNK as usize;
    let fossil_delay = Duration::from_secs(3600);
    let gc_at = move |now: SystemTime| GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
        fossil_delay: Some(fossil_delay),
        now: Some(now),
    };
    let mut clock = SystemTime::now() + Duration::from_secs(1);
    // Model: point -> image.
    let mut model: HashMap<String, (PointMeta, Vec<u8>)> = HashMap::new();

    // A: 16 random chunks = exactly one full pack P1.
    let a_img = image(20, &"r".repeat(16));
    let a = write_point(&store, "vm", &[("d", &a_img)]).await;
    assert_eq!(count(&backend, "packs/").await, 1);
    // B shares A's first two chunks, plus 6 of its own.
    let mut b_img = a_img[..2 * cs].to_vec();
    b_img.extend(image(21, "rrrrrr"));
    let b = write_point(&store, "vm", &[("d", &b_img)]).await;
    model.insert(b.full_id(), (b.clone(), b_img.clone()));

    // Session S1 starts now (before GC) and deduplicates against A's chunk 5.
    let chunk5 = Bytes::copy_from_slice(&a_img[5 * cs..6 * cs]);
    let mut s1 = store.point_builder("vm1").unwrap();
    s1.add_disk("d", cs as u64).unwrap();
    let o = s1.write_chunk("d", 0, chunk5.clone()).await.unwrap();
    assert_eq!(o.kind, PutKind::Deduplicated);

    // A goes away: P1 now has 2 of 16 chunks referenced and is repacked.
    store.delete_point(&a).await.unwrap();
    clock += Duration::from_secs(10);
    let r = store.gc(gc_at(clock)).await.unwrap();
    assert_eq!((r.packs_repacked, r.chunks_repacked), (1, 2), "{r:?}");
    assert_eq!(count(&backend, "packfossils/").await, 1);

    // S1 publishes after the run: its chunk lives in a fossil pack, still readable.
    let s1p = s1.publish().await.unwrap();
    model.insert(s1p.full_id(), (s1p.clone(), chunk5.to_vec()));
    // A session that starts after the run uploads A's chunk 7 again.
    let gw2 = Store::open(backend.clone(), None).await.unwrap();
    let mut s2 = gw2.point_builder("vm2").unwrap();
    s2.add_disk("d", cs as u64).unwrap();
    let chunk7 = Bytes::copy_from_slice(&a_img[7 * cs..8 * cs]);
    let o = s2.write_chunk("d", 0, chunk7.clone()).await.unwrap();
    assert_eq!(
        o.kind,
        PutKind::Uploaded,
        "a fossil pack is never deduplicated against"
    );
    // The same process's handle, too (its cache was loaded before the run).
    let mut s3 = store.point_builder("vm3").unwrap();
    s3.add_disk("d", cs as u64).unwrap();
    let chunk9 = Bytes::copy_from_slice(&a_img[9 * cs..10 * cs]);
    assert_eq!(
        s3.write_chunk("d", 0, chunk9.clone()).await.unwrap().kind,
        PutKind::Uploaded
    );
    let s2p = s2.publish().await.unwrap();
    model.insert(s2p.full_id(), (s2p.clone(), chunk7.to_vec()));
    let s3p = s3.publish().await.unwrap();
    model.insert(s3p.full_id(), (s3p.clone(), chunk9.to_vec()));

    check(&backend, &model, "after repack").await;

    // Past the fossil delay: S1's point references the fossil pack, which comes back.
    clock += fossil_delay + Duration::from_secs(60);
    let r = store.gc(gc_at(clock)).await.unwrap();
    assert_eq!(r.resurrected, 1, "{r:?}");
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    check(&backend, &model, "after resurrection").await;

    // That run repacked P1 again (3 of its 16 chunks referenced). S1's point goes: P1 holds
    // nothing a live pack lacks, so a fossil delay later it is deleted; every other point
    // stays whole.
    store.delete_point(&s1p).await.unwrap();
    model.remove(&s1p.full_id());
    clock += Duration::from_secs(10);
    store.gc(gc_at(clock)).await.unwrap();
    clock += fossil_delay + Duration::from_secs(60);
    let r = store.gc(gc_at(clock)).await.unwrap();
    assert!(r.packs_deleted >= 1, "{r:?}");
    assert_eq!(count(&backend, "packfossils/").await, 0);
    check(&backend, &model, "after deletion").await;
    // Every pack object left has an index; nothing under chunks/.
    assert_eq!(
        count(&backend, "packs/").await,
        count(&backend, "packidx/").await
    );
    assert_eq!(count(&backend, "chunks/").await, 0);

    // A pack object whose index never came (an interrupted upload) is deleted after the
    // grace period; a young one is kept.
    let orphan = format!("packs/ab/ab{}", "0".repeat(30));
    backend
        .put(&orphan, Bytes::from_static(b"interrupted"))
        .await
        .unwrap();
    let r = store
        .gc(GcOptions {
            grace: Duration::from_secs(3600),
            ..gc_at(SystemTime::now())
        })
        .await
        .unwrap();
    assert_eq!(r.orphan_packs_deleted, 0);
    let r = store.gc(gc_at(clock + fossil_delay)).await.unwrap();
    assert_eq!(r.orphan_packs_deleted, 1, "{r:?}");
    assert!(keys(&store, "packs/ab/").await.iter().all(|k| *k != orphan));
    check(&backend, &model, "after orphan").await;
}

/// Every point of the model reads back whole from a fresh handle, and verify finds nothing.
async fn check(
    backend: &std::sync::Arc<dyn crate::backend::Backend>,
    model: &HashMap<String, (PointMeta, Vec<u8>)>,
    label: &str,
) {
    let fresh = Store::open(backend.clone(), None).await.unwrap();
    for (id, (p, img)) in model {
        assert_eq!(&read_all(&fresh, p, "d").await, img, "{label}: {id}");
    }
    let v = fresh.verify_all().await.unwrap();
    assert!(v.is_ok(), "{label}: {v:?}");
}

/// Faults (errors, lost acknowledgements, latency, corrupted reads of packs): a published
/// point is complete and a read never returns wrong bytes.
pub async fn packs_faults_never_wrong_data(f: &dyn BackendFactory) {
    faults_never_wrong_data_with(f, pack_options(), "packs/").await
}

/// Format: packs stores are format 5 and name their pack size, chunk-layout stores stay
/// format 4 (older builds read them), and a `store.toml` mixing the two is refused.
pub async fn packs_format(f: &dyn BackendFactory) {
    let backend = f.fresh("packs-format").await;
    Store::create(backend.clone(), pack_options(), None)
        .await
        .unwrap();
    let text = String::from_utf8(backend.get("store.toml").await.unwrap().to_vec()).unwrap();
    assert!(text.contains("format_version = 5"), "{text}");
    assert!(text.contains("layout = \"packs\""), "{text}");
    assert!(text.contains("pack_size = 1048576"), "{text}");
    let reopened = Store::open(backend.clone(), None).await.unwrap();
    assert_eq!(reopened.layout(), Layout::Packs);
    for bad in [
        text.replace("format_version = 5", "format_version = 4"),
        text.replace("pack_size = 1048576", "pack_size = 12"),
    ] {
        backend
            .put("store.toml", Bytes::from(bad.clone()))
            .await
            .unwrap();
        let e = Store::open(backend.clone(), None).await.unwrap_err();
        assert!(e.to_string().contains("store.toml"), "{bad}: {e}");
    }

    // A chunk-layout store is format 4 and is read and written by this build as before.
    let old = f.fresh("packs-format-old").await;
    Store::create(old.clone(), test_options(), None)
        .await
        .unwrap();
    let text = String::from_utf8(old.get("store.toml").await.unwrap().to_vec()).unwrap();
    assert!(text.contains("format_version = 4"), "{text}");
    assert!(
        !text.contains("layout") && !text.contains("pack_size"),
        "{text}"
    );
    let s = Store::open(old.clone(), None).await.unwrap();
    let img = image(3, "rzab");
    let p = write_point(&s, "vm", &[("d", &img)]).await;
    assert_eq!(read_all(&s, &p, "d").await, img);
    assert_eq!(count(&old, "packs/").await, 0);
    assert_eq!(count(&old, "chunks/").await, 3);
}

/// Run every packs scenario.
pub async fn run_all(f: &dyn BackendFactory) {
    packs_format(f).await;
    packs_roundtrip_and_requests(f).await;
    packs_gc_repack_with_sessions(f).await;
    packs_faults_never_wrong_data(f).await;
}
