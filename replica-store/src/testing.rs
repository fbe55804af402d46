//! Backend conformance suite (feature `testing`): the same scenarios run against every
//! backend (local directory, in-memory, a real S3 server). Each scenario panics on failure.
//!
//! Long (~950 lines) because it is a list: each scenario is a self-contained function that
//! every backend runs, so adding one never changes another.

// Test-support code: panicking on unexpected errors is the point.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

pub use crate::backend::faulty::{FaultConfig, FaultyBackend};
pub use crate::backend::memory::MemoryBackend;
use crate::backend::Backend;
use crate::chunk::ChunkId;
use crate::crypto::{Cipher, StoreKey};
use crate::error::Error;
use crate::gc::GcOptions;
use crate::point::PointMeta;
use crate::reader::ReaderOptions;
use crate::retention::RetentionPolicy;
use crate::store::{CreateOptions, PutKind, Store};

pub mod hostile;
pub mod packs;

/// Chunk size used by the scenarios (small, so tests are fast).
pub const TEST_CHUNK: u32 = 64 * 1024;

/// Supplies fresh, empty backends to the scenarios.
#[async_trait]
pub trait BackendFactory: Send + Sync {
    /// A new empty backend; `name` is unique per call within a run.
    async fn fresh(&self, name: &str) -> Arc<dyn Backend>;
}

/// Options of a small test store.
pub fn test_options() -> CreateOptions {
    CreateOptions {
        chunk_size: TEST_CHUNK,
        layout: Some(crate::pack::Layout::Chunks),
        ..Default::default()
    }
}

/// Options of a small test store whose chunks live in packs of 1 MiB (16 test chunks).
pub fn pack_options() -> CreateOptions {
    CreateOptions {
        chunk_size: TEST_CHUNK,
        layout: Some(crate::pack::Layout::Packs),
        pack_size: 1 << 20,
        ..Default::default()
    }
}

/// Deterministic random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// An image of `chunks` test chunks: pattern per chunk from `layout` ('r' random unique,
/// 'z' zeros, 'a'/'b' two repeated random chunks, 'c' compressible text).
pub fn image(seed: u64, layout: &str) -> Vec<u8> {
    let cs = TEST_CHUNK as usize;
    let a = random_bytes(seed ^ 0xaaaa, cs);
    let b = random_bytes(seed ^ 0xbbbb, cs);
    let mut out = Vec::with_capacity(layout.len() * cs);
    for (i, c) in layout.chars().enumerate() {
        match c {
            'r' => out.extend(random_bytes(
                seed.wrapping_mul(1000).wrapping_add(i as u64),
                cs,
            )),
            'z' => out.extend(std::iter::repeat_n(0u8, cs)),
            'a' => out.extend_from_slice(&a),
            'b' => out.extend_from_slice(&b),
            'c' => out.extend(
                format!("line {i} of compressible text\n")
                    .bytes()
                    .cycle()
                    .take(cs),
            ),
            _ => panic!("bad layout char {c}"),
        }
    }
    out
}

pub(crate) async fn write_point(store: &Store, vm: &str, disks: &[(&str, &[u8])]) -> PointMeta {
    let mut b = store.point_builder(vm).unwrap();
    for (name, data) in disks {
        b.add_disk(name, data.len() as u64).unwrap();
        let cs = store.chunk_size() as usize;
        for (i, c) in data.chunks(cs).enumerate() {
            b.write_chunk(name, i as u64, Bytes::copy_from_slice(c))
                .await
                .unwrap();
        }
        b.set_source_lsn(name, 42).unwrap();
    }
    b.publish().await.unwrap()
}

pub(crate) async fn read_all(store: &Store, p: &PointMeta, disk: &str) -> Vec<u8> {
    let r = store
        .open_disk(p, disk, ReaderOptions::default())
        .await
        .unwrap();
    r.read_at(0, r.size() as usize).await.unwrap().to_vec()
}

pub(crate) async fn count(b: &Arc<dyn Backend>, prefix: &str) -> usize {
    b.list(prefix).await.unwrap().len()
}

/// Dedup across disks, VMs and points; zero chunks never stored; compression.
pub async fn dedup_and_zero_elision(f: &dyn BackendFactory) {
    let backend = f.fresh("dedup").await;
    let store = Store::create(backend.clone(), test_options(), None)
        .await
        .unwrap();
    let img = image(1, "rzaabzzarcc");
    let mut b = store.point_builder("vm1").unwrap();
    b.add_disk("d0", img.len() as u64).unwrap();
    let mut kinds = Vec::new();
    for (i, c) in img.chunks(TEST_CHUNK as usize).enumerate() {
        kinds.push(
            b.write_chunk("d0", i as u64, Bytes::copy_from_slice(c))
                .await
                .unwrap()
                .kind,
        );
    }
    let p1 = b.publish().await.unwrap();
    assert_eq!(kinds.iter().filter(|k| **k == PutKind::Zero).count(), 3);
    // distinct non-zero: r, a, b, r(2nd unique), c(two different texts)
    assert_eq!(kinds.iter().filter(|k| **k == PutKind::Uploaded).count(), 6);
    assert_eq!(count(&backend, "chunks/").await, 6);
    // compressible chunks are stored smaller than they are
    let idx = store.load_index(&p1, "d0").await.unwrap();
    let c_id = idx.get(9).unwrap();
    let c_size = backend
        .head(&store.chunk_key(&c_id))
        .await
        .unwrap()
        .unwrap()
        .size;
    assert!(
        c_size < TEST_CHUNK as u64 / 4,
        "compressible chunk stored in {c_size} bytes"
    );
    // Same data on another VM and disk: nothing new uploaded.
    let p2 = write_point(&store, "vm2", &[("other", &img)]).await;
    assert_eq!(count(&backend, "chunks/").await, 6);
    assert_eq!(read_all(&store, &p2, "other").await, img);
    assert_eq!(read_all(&store, &p1, "d0").await, img);
    // A fully zero disk stores no chunk at all.
    let zeros = vec![0u8; 5 * TEST_CHUNK as usize + 17];
    let p3 = write_point(&store, "vm3", &[("z", &zeros)]).await;
    assert_eq!(count(&backend, "chunks/").await, 6);
    assert_eq!(read_all(&store, &p3, "z").await, zeros);
}

/// Multi-disk points: publish, list, catalog from a second handle, random reads, extents,
/// delta from a parent.
pub async fn point_publish_list_read(f: &dyn BackendFactory) {
    let backend = f.fresh("points").await;
    let store = Store::create(backend.clone(), test_options(), None)
        .await
        .unwrap();
    let mut d0 = image(2, "rrzzrrzr");
    d0.extend_from_slice(&random_bytes(77, 1000)); // partial last chunk
    let d1 = image(3, "zzzzrz");
    let p = write_point(&store, "web", &[("root", &d0), ("data", &d1)]).await;
    assert_eq!(p.disks.len(), 2);
    assert_eq!(p.disk("root").unwrap().size, d0.len() as u64);
    assert_eq!(p.disk("root").unwrap().source_lsn, 42);

    // A second gateway opening the same store sees the same catalog.
    let other = Store::open(backend.clone(), None).await.unwrap();
    assert_eq!(other.list_vms().await.unwrap(), vec!["web".to_string()]);
    let listed = other.list_points(Some("web")).await.unwrap();
    assert_eq!(listed, vec![p.clone()]);
    assert_eq!(other.find_point(&p.id).await.unwrap(), p);
    assert_eq!(other.find_point("web/latest").await.unwrap(), p);
    assert!(matches!(
        other.load_point("web", "nope").await,
        Err(Error::PointNotFound { .. })
    ));

    // Random reads against the reference, including across chunk boundaries.
    let r = other
        .open_disk(
            &p,
            "root",
            ReaderOptions {
                cache_bytes: 2 * TEST_CHUNK as u64,
                readahead_bytes: 2 * TEST_CHUNK as u64,
            },
        )
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    for _ in 0..200 {
        let off = rng.gen_range(0..d0.len() as u64);
        let len = rng.gen_range(0..3 * TEST_CHUNK as usize);
        let got = r.read_at(off, len).await.unwrap();
        let end = (off as usize + len).min(d0.len());
        assert_eq!(&got[..], &d0[off as usize..end]);
    }
    // Sequential reads (read-ahead path).
    let mut pos = 0u64;
    while pos < r.size() {
        let got = r.read_at(pos, 4096).await.unwrap();
        assert_eq!(&got[..], &d0[pos as usize..pos as usize + got.len()]);
        pos += got.len() as u64;
    }
    // Extents: holes are reported as zero.
    let ext = r.extents(0, r.size());
    let cs = TEST_CHUNK as u64;
    assert_eq!(
        ext[0],
        crate::reader::Extent {
            offset: 0,
            length: 2 * cs,
            zero: false
        }
    );
    assert_eq!(
        ext[1],
        crate::reader::Extent {
            offset: 2 * cs,
            length: 2 * cs,
            zero: true
        }
    );
    assert!(r.is_zero(2 * cs + 5, 100));
    assert!(!r.is_zero(0, 1));

    // Delta point from the parent: replace two chunks, others copied without reading data.
    let mut b = crate::point::PointBuilder::from_parent(&store, &p)
        .await
        .unwrap();
    assert_eq!(
        b.index("root").unwrap(),
        &store.load_index(&p, "root").await.unwrap()
    );
    let new_chunk = random_bytes(1234, TEST_CHUNK as usize);
    let out = b
        .write_chunk("root", 2, Bytes::from(new_chunk.clone()))
        .await
        .unwrap();
    assert_eq!(out.kind, PutKind::Uploaded);
    let again = b
        .write_chunk(
            "data",
            0,
            Bytes::copy_from_slice(&d0[..TEST_CHUNK as usize]),
        )
        .await
        .unwrap();
    assert_eq!(again.kind, PutKind::Deduplicated);
    b.set_source_lsn("root", 43).unwrap();
    let child = b.publish().await.unwrap();
    assert_eq!(child.parent.as_deref(), Some(p.id.as_str()));
    let mut expect0 = d0.clone();
    expect0[2 * TEST_CHUNK as usize..3 * TEST_CHUNK as usize].copy_from_slice(&new_chunk);
    let mut expect1 = d1.clone();
    expect1[..TEST_CHUNK as usize].copy_from_slice(&d0[..TEST_CHUNK as usize]);
    assert_eq!(read_all(&store, &child, "root").await, expect0);
    assert_eq!(read_all(&store, &child, "data").await, expect1);
    assert_eq!(read_all(&store, &p, "root").await, d0);
    assert_eq!(store.list_points(Some("web")).await.unwrap().len(), 2);
    assert_eq!(
        store.latest_point("web").await.unwrap().unwrap().id,
        child.id
    );
    // The digest API matches the index (resync support).
    let idx = store.load_index(&child, "root").await.unwrap();
    assert_eq!(store.digest(&new_chunk), idx.get(2).unwrap());
    assert_eq!(store.digest(&vec![0u8; TEST_CHUNK as usize]), ChunkId::ZERO);
}

/// GC with a concurrent uploader: chunks of unpublished sessions survive, deduplicated chunks
/// that GC collected are resurrected, garbage is eventually deleted, nothing published breaks.
pub async fn gc_with_concurrent_uploader(f: &dyn BackendFactory) {
    let backend = f.fresh("gc").await;
    let opts = CreateOptions {
        max_session_secs: 3600,
        ..test_options()
    };
    let store = Store::create(backend.clone(), opts, None).await.unwrap();
    // GC's clock is injected: "later" is a moved clock, never a sleep. The fossil delay is an
    // hour, so a run that deleted fossils too early (or compared the wrong times) fails here
    // whatever the scheduler does.
    let fossil_delay = Duration::from_secs(3600);
    let mut clock = SystemTime::now() + Duration::from_secs(1);
    let gc_at = move |now: SystemTime| GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
        fossil_delay: Some(fossil_delay),
        now: Some(now),
    };

    // Old point A with shared and private chunks.
    let shared_and_private = image(10, "aabrr");
    let a = write_point(&store, "vm", &[("d", &shared_and_private)]).await;
    // Session S starts, dedups against A's chunks (they are present), uploads one new chunk.
    let mut s = store.point_builder("vm").unwrap();
    s.add_disk("d", 3 * TEST_CHUNK as u64).unwrap();
    let cs = TEST_CHUNK as usize;
    assert_eq!(
        s.write_chunk(
            "d",
            0,
            Bytes::copy_from_slice(&shared_and_private[3 * cs..4 * cs])
        )
        .await
        .unwrap()
        .kind,
        PutKind::Deduplicated
    );
    let fresh = random_bytes(555, cs);
    s.write_chunk("d", 1, Bytes::from(fresh.clone()))
        .await
        .unwrap();

    // Meanwhile A is pruned and GC runs: with a 1 h grace nothing young is touched...
    store.delete_point(&a).await.unwrap();
    let r = store
        .gc(GcOptions {
            grace: Duration::from_secs(3600),
            ..gc_at(clock)
        })
        .await
        .unwrap();
    assert_eq!(r.fossilized, 0, "{r:?}");
    // ...with no grace everything unreferenced (including what S relies on) becomes a fossil.
    let r = store.gc(gc_at(clock)).await.unwrap();
    assert!(r.fossilized >= 3, "{r:?}");
    // S publishes; its point is readable at once (fossil fallback)...
    let sp = s.publish().await.unwrap();
    let mut expect = vec![0u8; 3 * cs];
    expect[..cs].copy_from_slice(&shared_and_private[3 * cs..4 * cs]);
    expect[cs..2 * cs].copy_from_slice(&fresh);
    assert_eq!(read_all(&store, &sp, "d").await, expect);
    // Before the fossil delay nothing is deleted for good, though S's fossil is restored.
    let r = store.gc(gc_at(clock)).await.unwrap();
    assert_eq!(r.deleted, 0, "{r:?}");
    assert!(r.resurrected >= 1, "{r:?}");
    assert!(count(&backend, "fossils/").await > 0);
    // ...and after the fossil delay the next runs delete the rest.
    clock += fossil_delay;
    let r = store.gc(gc_at(clock)).await.unwrap();
    assert!(r.deleted >= 1, "{r:?}");
    clock += fossil_delay;
    let r = store.gc(gc_at(clock)).await.unwrap();
    assert_eq!(r.fossilized, 0, "{r:?}");
    assert_eq!(read_all(&store, &sp, "d").await, expect);
    let v = store.verify_all().await.unwrap();
    assert!(v.is_ok(), "{v:?}");
    assert_eq!(count(&backend, "fossils/").await, 0);
    assert_eq!(count(&backend, "chunks/").await, 2);

    // Truly concurrent: GC loops while an uploader writes points that reuse old chunks.
    let gc_store = store.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let gc_task = tokio::spawn(async move {
        let mut runs = 0;
        // The one place on the wall clock: a stress of GC runs, with fossils deleted after
        // 300 ms, against an uploader whose sessions last a few milliseconds (the sleep only
        // paces the loop).
        let stress = GcOptions {
            fossil_delay: Some(Duration::from_millis(300)),
            now: None,
            ..gc_at(clock)
        };
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            gc_store.gc(stress).await.unwrap();
            runs += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        runs
    });
    let mut published = Vec::new();
    for round in 0..6u64 {
        let data = image(100 + round % 2, "rarbzr");
        let p = write_point(&store, "vm2", &[("d", &data)]).await;
        published.push((p.clone(), data));
        if round % 2 == 1 {
            store
                .prune(
                    Some("vm2"),
                    RetentionPolicy {
                        keep_last: Some(1),
                        keep_within: None,
                    },
                    false,
                )
                .await
                .unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(gc_task.await.unwrap() > 0);
    clock = SystemTime::now() + fossil_delay;
    store.gc(gc_at(clock)).await.unwrap();
    store.gc(gc_at(clock + fossil_delay)).await.unwrap();
    let live = store.list_points(Some("vm2")).await.unwrap();
    assert_eq!(live.len(), 1);
    let (lp, ldata) = published.iter().find(|(p, _)| p.id == live[0].id).unwrap();
    assert_eq!(&read_all(&store, lp, "d").await, ldata);
    let v = store.verify_all().await.unwrap();
    assert!(v.is_ok(), "{v:?}");
}

/// Verify finds corrupted (tampered through the backend) and missing chunks and names the
/// points they break; reads of a corrupt chunk fail instead of returning data.
pub async fn verify_detects_corruption(f: &dyn BackendFactory) {
    let backend = f.fresh("verify").await;
    let store = Store::create(backend.clone(), test_options(), None)
        .await
        .unwrap();
    let img = image(20, "rrrzr");
    let p = write_point(&store, "vm", &[("d", &img)]).await;
    let p2 = write_point(&store, "vm", &[("d", &img[..2 * TEST_CHUNK as usize])]).await;
    let progress = crate::verify::VerifyProgress::default();
    let clean = store.verify_all_with(&progress).await.unwrap();
    assert!(clean.is_ok(), "{clean:?}");
    assert_eq!(clean.chunks_checked, 4);
    // The progress counters end where the report does.
    let c = progress.counts();
    assert_eq!((c.points_total, c.points_read), (2, 2), "{c:?}");
    assert_eq!((c.chunks_total, c.chunks_done), (4, 4), "{c:?}");
    assert_eq!(c.bytes_checked, clean.bytes_checked, "{c:?}");
    assert_eq!(c.bytes_total, clean.bytes_checked, "{c:?}");
    assert_eq!(c.percent(), 100.0);
    let idx = store.load_index(&p, "d").await.unwrap();
    let victim = idx.get(1).unwrap();
    let mut obj = backend
        .get(&store.chunk_key(&victim))
        .await
        .unwrap()
        .to_vec();
    let n = obj.len();
    obj[n - 10] ^= 0x01;
    backend
        .put(&store.chunk_key(&victim), Bytes::from(obj))
        .await
        .unwrap();
    let gone = idx.get(4).unwrap();
    backend.delete(&store.chunk_key(&gone)).await.unwrap();

    let v = store.verify_all().await.unwrap();
    assert!(!v.is_ok());
    assert_eq!(v.corrupt.len(), 1);
    assert_eq!(v.corrupt[0].id, victim);
    assert_eq!(v.corrupt[0].points.len(), 2);
    assert_eq!(v.missing.len(), 1);
    assert_eq!(v.missing[0].id, gone);
    assert_eq!(v.missing[0].points, vec![p.full_id()]);
    assert_eq!(v.broken_points.len(), 2);
    let vp = store.verify_point(&p2).await.unwrap();
    assert_eq!(vp.corrupt.len(), 1);
    assert!(vp.missing.is_empty());

    let r = store
        .open_disk(&p, "d", ReaderOptions::default())
        .await
        .unwrap();
    let e = r.read_at(TEST_CHUNK as u64 + 5, 10).await.unwrap_err();
    assert!(matches!(e, Error::CorruptChunk { .. }), "{e}");
    assert!(e.to_string().contains(&victim.to_hex()));
    assert!(!e.is_recoverable());
    let e = r.read_at(4 * TEST_CHUNK as u64, 10).await.unwrap_err();
    assert!(matches!(e, Error::MissingChunk { .. }), "{e}");
    // Holes and intact chunks still read.
    assert_eq!(&r.read_at(0, 100).await.unwrap()[..], &img[..100]);

    // A tampered index makes the point unreadable with a clear error.
    let key = p.disks[0].index_key.clone();
    let mut obj = backend.get(&key).await.unwrap().to_vec();
    let last = obj.len() - 1;
    obj[last] ^= 0xff;
    backend.put(&key, Bytes::from(obj)).await.unwrap();
    let e = store.load_index(&p, "d").await.unwrap_err();
    assert!(matches!(e, Error::CorruptObject { .. }), "{e}");
}

/// Encryption: right key reads, wrong/missing key refused, nothing readable at rest.
pub async fn encryption_right_and_wrong_key(f: &dyn BackendFactory) {
    for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
        let backend = f.fresh(&format!("enc-{cipher:?}")).await;
        let key = StoreKey::generate();
        let opts = CreateOptions {
            cipher,
            ..test_options()
        };
        let store = Store::create(backend.clone(), opts, Some(&key))
            .await
            .unwrap();
        let img = image(30, "crzr");
        let p = write_point(&store, "secret-vm", &[("d", &img)]).await;
        store
            .put_blob("state", "engine/cursor", b"lsn=42 plaintext-marker")
            .await
            .unwrap();

        let again = Store::open(backend.clone(), Some(&key)).await.unwrap();
        assert_eq!(read_all(&again, &p, "d").await, img);
        assert_eq!(
            &again
                .get_blob("state", "engine/cursor")
                .await
                .unwrap()
                .unwrap()[..],
            b"lsn=42 plaintext-marker"
        );
        assert!(again.verify_all().await.unwrap().is_ok());

        let wrong = Store::open(backend.clone(), Some(&StoreKey::generate()))
            .await
            .unwrap_err();
        assert!(matches!(wrong, Error::WrongKey { .. }), "{wrong}");
        assert!(!wrong.is_recoverable());
        assert!(wrong.to_string().contains(&key.fingerprint()));
        let none = Store::open(backend.clone(), None).await.unwrap_err();
        assert!(matches!(none, Error::KeyRequired { .. }), "{none}");

        // Chunk ids are keyed: the plain SHA-256 of the content is not in the store.
        let plain_id = ChunkId(
            sha2::Digest::finalize(sha2::Digest::chain_update(
                <sha2::Sha256 as sha2::Digest>::new(),
                &img[..TEST_CHUNK as usize],
            ))
            .into(),
        );
        assert!(backend
            .head(&store.chunk_key(&plain_id))
            .await
            .unwrap()
            .is_none());
        // No object contains recognizable plaintext.
        let needle = b"compressible text";
        for o in backend.list("").await.unwrap() {
            if o.key == "store.toml" {
                continue;
            }
            let data = backend.get(&o.key).await.unwrap();
            assert!(
                !data.windows(needle.len()).any(|w| w == needle),
                "plaintext in {}",
                o.key
            );
            assert!(
                !data.windows(6).any(|w| w == b"lsn=42"),
                "plaintext in {}",
                o.key
            );
            assert!(!data.windows(9).any(|w| w == b"secret-vm") || o.key.contains("secret-vm"));
        }
    }
}

/// Faults: errors, lost acks, latency and corrupted reads. Reads never return wrong data,
/// and a point is never published with a missing chunk.
pub async fn faults_never_wrong_data(f: &dyn BackendFactory) {
    faults_never_wrong_data_with(f, test_options(), "chunks/").await
}

/// [`faults_never_wrong_data`] for a store of `opts`; reads of keys under `prefix` are
/// corrupted.
pub(crate) async fn faults_never_wrong_data_with(
    f: &dyn BackendFactory,
    opts: CreateOptions,
    prefix: &str,
) {
    let inner = f.fresh("faults").await;
    let store = Store::create(inner.clone(), opts, None).await.unwrap();
    let img = image(40, "rrzarrbrrz");
    let good = write_point(&store, "vm", &[("d", &img)]).await;

    let faulty = Arc::new(FaultyBackend::new(
        inner.clone(),
        FaultConfig {
            seed: 7,
            error_rate: 0.08,
            lost_ack_rate: 0.05,
            corrupt_read_rate: 0.0,
            max_latency: Duration::from_millis(5),
            key_prefix: String::new(),
        },
    ));
    let fstore = loop {
        match Store::open(faulty.clone(), None).await {
            Ok(s) => break s,
            Err(e) => assert!(e.is_recoverable(), "{e}"),
        }
    };
    // Uploads through the faulty backend: a chunk whose put failed is never recorded, so a
    // publish either fails or yields a complete point.
    let mut published = Vec::new();
    for attempt in 0..12u64 {
        let data = image(50 + attempt, "rrzrar");
        let res: Result<PointMeta, Error> = async {
            let mut b = fstore.point_builder("vm")?;
            b.add_disk("d", data.len() as u64)?;
            for (i, c) in data.chunks(TEST_CHUNK as usize).enumerate() {
                let mut tries = 0;
                loop {
                    match b
                        .write_chunk("d", i as u64, Bytes::copy_from_slice(c))
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if e.is_recoverable() && tries < 3 => tries += 1,
                        Err(e) => return Err(e),
                    }
                }
            }
            b.publish().await
        }
        .await;
        match res {
            Ok(p) => published.push((p, data)),
            Err(e) => assert!(e.is_recoverable(), "{e}"),
        }
    }
    assert!(!published.is_empty(), "no publish succeeded");
    // Every published point is complete (checked without faults).
    for (p, data) in &published {
        assert!(store.verify_point(p).await.unwrap().is_ok());
        assert_eq!(&read_all(&store, p, "d").await, data);
    }
    // A point whose manifest was acknowledged-lost may exist too; it must be complete as well.
    let v = store.verify_all().await.unwrap();
    assert!(v.missing.is_empty() && v.corrupt.is_empty(), "{v:?}");

    // Reads through errors and corrupted bytes: Ok is always the right data.
    faulty.set_config(FaultConfig {
        seed: 8,
        error_rate: 0.1,
        lost_ack_rate: 0.0,
        corrupt_read_rate: 0.3,
        max_latency: Duration::from_millis(2),
        key_prefix: prefix.into(),
    });
    let r = fstore
        .open_disk(
            &good,
            "d",
            ReaderOptions {
                cache_bytes: TEST_CHUNK as u64,
                readahead_bytes: 0,
            },
        )
        .await
        .unwrap();
    let (mut ok, mut err) = (0, 0);
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..300 {
        let off = rng.gen_range(0..img.len() as u64);
        let len = rng.gen_range(1..2 * TEST_CHUNK as usize);
        match r.read_at(off, len).await {
            Ok(b) => {
                let end = (off as usize + len).min(img.len());
                assert_eq!(
                    &b[..],
                    &img[off as usize..end],
                    "wrong data returned at {off}+{len}"
                );
                ok += 1;
            }
            Err(e) => {
                assert!(
                    matches!(e, Error::Injected { .. } | Error::CorruptChunk { .. }),
                    "unexpected error {e}"
                );
                err += 1;
            }
        }
    }
    assert!(ok > 0 && err > 0, "ok={ok} err={err}");
}

/// Blobs: put/get/list/delete.
pub async fn blobs(f: &dyn BackendFactory) {
    let backend = f.fresh("blobs").await;
    let store = Store::create(backend, test_options(), None).await.unwrap();
    store
        .put_blob("wal", "vm1/0000000001", b"segment one")
        .await
        .unwrap();
    store
        .put_blob("wal", "vm1/0000000002", &random_bytes(1, 100_000))
        .await
        .unwrap();
    store.put_blob("wal", "vm2/0000000001", b"x").await.unwrap();
    assert_eq!(
        store.list_blobs("wal", "vm1/").await.unwrap(),
        vec!["vm1/0000000001", "vm1/0000000002"]
    );
    assert_eq!(
        &store
            .get_blob("wal", "vm1/0000000001")
            .await
            .unwrap()
            .unwrap()[..],
        b"segment one"
    );
    assert_eq!(
        store
            .get_blob("wal", "vm1/0000000002")
            .await
            .unwrap()
            .unwrap()
            .len(),
        100_000
    );
    store.delete_blob("wal", "vm1/0000000001").await.unwrap();
    assert!(store
        .get_blob("wal", "vm1/0000000001")
        .await
        .unwrap()
        .is_none());
    assert!(store.put_blob("wal", "../escape", b"x").await.is_err());
}

/// Retention: keep-last and keep-within, newest always kept.
pub async fn prune_policy(f: &dyn BackendFactory) {
    let backend = f.fresh("prune").await;
    let store = Store::create(backend.clone(), test_options(), None)
        .await
        .unwrap();
    let img = image(60, "rz");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(write_point(&store, "vm", &[("d", &img)]).await.id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    write_point(&store, "other", &[("d", &img)]).await;
    assert!(store
        .prune(None, RetentionPolicy::default(), false)
        .await
        .is_err());
    let dry = store
        .prune(
            Some("vm"),
            RetentionPolicy {
                keep_last: Some(2),
                keep_within: None,
            },
            true,
        )
        .await
        .unwrap();
    assert_eq!(dry.removed.len(), 2);
    assert_eq!(store.list_points(Some("vm")).await.unwrap().len(), 4);
    let r = store
        .prune(
            None,
            RetentionPolicy {
                keep_last: Some(2),
                keep_within: None,
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        r.removed,
        vec![format!("vm/{}", ids[0]), format!("vm/{}", ids[1])]
    );
    let left: Vec<String> = store
        .list_points(Some("vm"))
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(left, ids[2..].to_vec());
    assert_eq!(count(&backend, "indexes/vm/").await, 2);
    // keep-within 0 still keeps the newest of each VM.
    let r = store
        .prune(
            None,
            RetentionPolicy {
                keep_last: None,
                keep_within: Some(Duration::ZERO),
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(r.kept.len(), 2);
    assert_eq!(store.list_points(None).await.unwrap().len(), 2);
}

/// Store self-description: format check, reopen settings, refuse double init.
pub async fn store_format(f: &dyn BackendFactory) {
    let backend = f.fresh("format").await;
    assert!(matches!(
        Store::open(backend.clone(), None).await,
        Err(Error::NotAStore { .. })
    ));
    let s = Store::create(backend.clone(), test_options(), None)
        .await
        .unwrap();
    assert!(matches!(
        Store::create(backend.clone(), test_options(), None).await,
        Err(Error::AlreadyExists { .. })
    ));
    let again = Store::open(backend.clone(), None).await.unwrap();
    assert_eq!(again.settings(), s.settings());
    let text = String::from_utf8(backend.get("store.toml").await.unwrap().to_vec()).unwrap();
    // New stores fan chunks out by the first 2 hex digits of their id.
    let id = s.digest(b"fan-out");
    assert_eq!(
        s.chunk_key(&id),
        format!("chunks/{}/{id}", &id.to_hex()[..2])
    );
    // store.toml as written, but claiming format `v` (formats before 4 do not name their
    // fan-out).
    let with_version = |v: u32| {
        let t = text.replace(
            &format!("format_version = {}", crate::store::CHUNKS_FORMAT_VERSION),
            &format!("format_version = {v}"),
        );
        Bytes::from(if v < 4 {
            t.replace("fan_out_digits = 2\n", "")
        } else {
            t
        })
    };
    let bad_fan_out = Bytes::from(text.replace("fan_out_digits = 2", "fan_out_digits = 9"));
    backend.put("store.toml", bad_fan_out).await.unwrap();
    let e = Store::open(backend.clone(), None).await.unwrap_err();
    assert!(matches!(e, Error::CorruptObject { .. }), "{e}");
    backend.put("store.toml", with_version(99)).await.unwrap();
    let e = Store::open(backend.clone(), None).await.unwrap_err();
    assert!(matches!(e, Error::UnsupportedFormat { .. }), "{e}");
    assert!(!e.is_recoverable());

    // A format-3 store is still opened, with its 3-digit fan-out.
    backend.put("store.toml", with_version(3)).await.unwrap();
    let v3 = Store::open(backend.clone(), None).await.unwrap();
    assert_eq!(v3.settings().fan_out_digits, 3);
    let data = Bytes::from(random_bytes(6, s.chunk_size() as usize));
    let out = v3.put_chunk(data.clone()).await.unwrap();
    let key = format!("chunks/{}/{}", &out.id.to_hex()[..3], out.id);
    assert_eq!(v3.chunk_key(&out.id), key);
    assert_eq!(backend.get(&key).await.unwrap(), data);
    assert_eq!(v3.get_chunk(&out.id, None).await.unwrap(), data);

    // A format-2 store is still opened, and its chunks keep their envelopes.
    backend.put("store.toml", with_version(2)).await.unwrap();
    let v2 = Store::open(backend.clone(), None).await.unwrap();
    let data = Bytes::from(random_bytes(7, s.chunk_size() as usize));
    let out = v2.put_chunk(data.clone()).await.unwrap();
    let obj = backend.get(&v2.chunk_key(&out.id)).await.unwrap();
    assert!(v2
        .chunk_key(&out.id)
        .starts_with(&format!("chunks/{}/", &out.id.to_hex()[..3])));
    assert_eq!(&obj[..4], b"SBCK");
    assert_eq!(v2.get_chunk(&out.id, None).await.unwrap(), data);
}

/// A point cut from an index another session stored (`PointBuilder::set_index`, as the
/// gateway's initial replication does): chunks GC set aside are made live again, chunks it
/// deleted (set aside longer than the fossil delay) fail the publish with `ChunksGone` naming
/// their positions and nothing is published; once they are stored again the point publishes
/// and survives the next GC runs.
pub async fn adopted_index_after_gc(f: &dyn BackendFactory) {
    let backend = f.fresh("adopt").await;
    let store = Store::create(backend.clone(), test_options(), None)
        .await
        .unwrap();
    let fossil_delay = Duration::from_secs(3600);
    let t0 = SystemTime::now() + Duration::from_secs(1);
    let gc_at = |now: SystemTime| GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
        fossil_delay: Some(fossil_delay),
        now: Some(now),
    };
    let cs = TEST_CHUNK as usize;
    let data: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(700 + i, cs)).collect();
    let mut index = crate::manifest::DiskIndex::new(3 * cs as u64, TEST_CHUNK).unwrap();
    // The pass's session stores chunk 0; GC sets it aside, and a run past the fossil delay
    // deletes it. Then chunks 1 and 2, which the next run sets aside.
    let pass_session = store.point_builder("vm").unwrap();
    let pass = pass_session.writer();
    let put = |i: usize| {
        let (w, d) = (pass.clone(), Bytes::from(data[i].clone()));
        async move {
            let out = w.put(d).await.unwrap();
            w.commit().await.unwrap();
            out.id
        }
    };
    index.set(0, put(0).await).unwrap();
    assert_eq!(store.gc(gc_at(t0)).await.unwrap().fossilized, 1);
    let later = t0 + fossil_delay + Duration::from_secs(1);
    index.set(1, put(1).await).unwrap();
    index.set(2, put(2).await).unwrap();
    let r = store.gc(gc_at(later)).await.unwrap();
    assert_eq!((r.deleted, r.fossilized), (1, 2), "{r:?}");

    // The cut: chunk 0 is gone, nothing is published.
    let mut cut = store.point_builder("vm").unwrap();
    cut.add_disk("d", 3 * cs as u64).unwrap();
    cut.set_index("d", index.clone()).unwrap();
    match cut.publish().await {
        Err(Error::ChunksGone { gone, .. }) => assert_eq!(gone, vec![("d".to_string(), vec![0])]),
        other => panic!("expected ChunksGone, got {other:?}"),
    }
    assert!(store.list_points(Some("vm")).await.unwrap().is_empty());
    // Chunks 1 and 2 are live again (not only readable as fossils).
    for i in 1..3 {
        let id = index.get(i).unwrap();
        assert!(backend.head(&store.chunk_key(&id)).await.unwrap().is_some());
    }
    // Chunk 0 stored again (the gateway re-reads it from the disk), then the cut publishes.
    let mut cut = store.point_builder("vm").unwrap();
    cut.writer()
        .put(Bytes::from(data[0].clone()))
        .await
        .unwrap();
    cut.add_disk("d", 3 * cs as u64).unwrap();
    cut.set_index("d", index).unwrap();
    let p = cut.publish().await.unwrap();
    assert_eq!(read_all(&store, &p, "d").await, data.concat());
    // Later GC runs keep everything the point references.
    for now in [later, later + fossil_delay * 2] {
        store.gc(gc_at(now)).await.unwrap();
    }
    assert!(store.verify_point(&p).await.unwrap().is_ok());
    assert_eq!(read_all(&store, &p, "d").await, data.concat());
}

/// Run every scenario.
pub async fn run_all(f: &dyn BackendFactory) {
    store_format(f).await;
    dedup_and_zero_elision(f).await;
    point_publish_list_read(f).await;
    blobs(f).await;
    prune_policy(f).await;
    verify_detects_corruption(f).await;
    encryption_right_and_wrong_key(f).await;
    gc_with_concurrent_uploader(f).await;
    adopted_index_after_gc(f).await;
    faults_never_wrong_data(f).await;
    packs::run_all(f).await;
}
