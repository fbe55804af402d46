//! Crafted-store scenarios (feature `testing`): what whoever can write the store can put
//! there, and what the gateway must do about it. Run against every backend like the rest of
//! the conformance suite.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{image, test_options, write_point, BackendFactory, TEST_CHUNK};
use crate::chunk::{ChunkId, MAGIC_CHUNK, MAGIC_POINT};
use crate::error::Error;
use crate::gc::GcOptions;
use crate::point::{format_utc_ms, point_key, PointMeta};
use crate::store::Store;

/// Seals `json` as the point object `points/<vm>/<id>.point`, as a writer of the store could.
pub async fn put_point_json(store: &Store, vm: &str, id: &str, json: &[u8]) {
    store
        .put_object(MAGIC_POINT, &point_key(vm, id), json)
        .await
        .unwrap();
}

/// Writes `p` as its point object (whatever its content).
pub async fn put_point(store: &Store, p: &PointMeta) {
    put_point_json(store, &p.vm, &p.id, &serde_json::to_vec(p).unwrap()).await
}

/// A copy of `good` renamed to a newer id (in `vm`), with `edit` applied to its metadata.
pub fn crafted(
    good: &PointMeta,
    vm: &str,
    ms: u64,
    edit: impl FnOnce(&mut PointMeta),
) -> PointMeta {
    let mut p = good.clone();
    p.vm = vm.to_string();
    p.created_unix_ms = ms;
    p.id = format!("{}-{:016x}", format_utc_ms(ms), ms);
    edit(&mut p);
    p
}

/// A chunk envelope (zstd flag set) around `body` whose header claims `plain_len` bytes.
pub fn zstd_envelope(plain_len: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + body.len());
    out.extend_from_slice(&MAGIC_CHUNK);
    out.extend_from_slice(&[1, 1, 0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(body);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..16]), &out[20..]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Junk under `points/` (garbage, names that escape, index keys of another VM, a forged
/// creation time, keys that are no point keys) is reported and left out; listing, latest,
/// GC and reading the valid point go on.
pub async fn junk_points_are_reported_and_skipped(f: &dyn BackendFactory) {
    let backend = f.fresh("junk").await;
    let store = Store::create(backend.clone(), test_options(), None)
        .await
        .unwrap();
    let data = image(5, "rrzr");
    let good = write_point(&store, "web", &[("root", &data)]).await;
    let later = good.created_unix_ms + 60_000;

    // Garbage where a newer point would be.
    let garbage = crafted(&good, "web", later, |_| {});
    backend
        .put(
            &point_key("web", &garbage.id),
            Bytes::from_static(b"not a point"),
        )
        .await
        .unwrap();
    let mut junk_keys = vec![point_key("web", &garbage.id)];
    // Well-formed envelopes with hostile content.
    type Edit = Box<dyn FnOnce(&mut PointMeta)>;
    let edits: Vec<Edit> = vec![
        Box::new(|p| p.disks[0].name = "../../../../victim".into()),
        Box::new(|p| p.disks[0].name = "-rf".into()),
        Box::new(|p| p.disks[0].index_key = "indexes/other/x/root.idx".into()),
        Box::new(|p| p.disks.push(p.disks[0].clone())),
        Box::new(|p| p.created_unix_ms += 3_600_000),
        Box::new(|p| p.parent = Some("../x".into())),
    ];
    for (i, edit) in edits.into_iter().enumerate() {
        let p = crafted(&good, "web", later + 1 + i as u64, edit);
        put_point_json(&store, "web", &p.id, &serde_json::to_vec(&p).unwrap()).await;
        junk_keys.push(point_key("web", &p.id));
    }
    // Objects under points/ that are no point keys at all.
    for k in [
        "points/stray",
        "points/-x/1.point",
        "points/web/sub/x.point",
    ] {
        backend.put(k, Bytes::from_static(b"x")).await.unwrap();
        junk_keys.push(k.to_string());
    }

    let listing = store.list_points_checked(None).await.unwrap();
    assert_eq!(listing.points, vec![good.clone()]);
    let mut got: Vec<String> = listing.junk.iter().map(|j| j.key.clone()).collect();
    got.sort();
    junk_keys.sort();
    assert_eq!(got, junk_keys, "{:#?}", listing.junk);
    assert_eq!(
        store.list_points(Some("web")).await.unwrap(),
        vec![good.clone()]
    );
    assert_eq!(store.find_point("web/latest").await.unwrap(), good);
    for j in &listing.junk {
        if let Some(rest) = j.key.strip_prefix("points/web/") {
            if let Some(id) = rest.strip_suffix(".point") {
                assert!(store.load_point("web", id).await.is_err(), "{}", j.key);
            }
        }
    }

    // GC runs over the rest and keeps the valid point readable.
    let far = SystemTime::now() + Duration::from_secs(7 * 86400);
    for _ in 0..2 {
        store
            .gc(GcOptions {
                grace: Duration::ZERO,
                dry_run: false,
                fossil_delay: Some(Duration::ZERO),
                now: Some(far),
            })
            .await
            .unwrap();
    }
    let r = store
        .open_disk(&good, "root", crate::reader::ReaderOptions::default())
        .await
        .unwrap();
    assert_eq!(r.read_at(0, data.len()).await.unwrap().to_vec(), data);
}

/// A chunk whose header claims more than its index allows is refused before anything is
/// decompressed, and a decompression bomb stops at the chunk's length.
pub async fn zstd_output_bounded_by_chunk_size(f: &dyn BackendFactory) {
    let backend = f.fresh("zbomb").await;
    let store = Store::create(backend.clone(), test_options(), None)
        .await
        .unwrap();
    let id = ChunkId::from_hex(&"ab".repeat(32)).unwrap();
    let small = zstd::bulk::compress(&[7u8; 4096], 1).unwrap();
    // A header claiming 1 TiB (the bound the envelope used to accept).
    let liar = zstd_envelope(1 << 40, &small);
    backend
        .put(&store.chunk_key(&id), Bytes::from(liar))
        .await
        .unwrap();
    match store.get_chunk(&id, Some(TEST_CHUNK as usize)).await {
        Err(Error::CorruptChunk { reason, .. }) => {
            assert!(reason.contains("more than"), "{reason}")
        }
        other => panic!("a 1 TiB claim was not refused: {other:?}"),
    }
    match store.get_chunk(&id, None).await {
        Err(Error::CorruptChunk { reason, .. }) => {
            assert!(reason.contains("more than"), "{reason}")
        }
        other => panic!("a 1 TiB claim was not refused: {other:?}"),
    }
    // A bomb: 64 MiB of zeros behind a header claiming one chunk.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
    assert!(bomb.len() < 64 << 10);
    let obj = zstd_envelope(u64::from(TEST_CHUNK), &bomb);
    backend
        .put(&store.chunk_key(&id), Bytes::from(obj))
        .await
        .unwrap();
    match store.get_chunk(&id, Some(TEST_CHUNK as usize)).await {
        Err(Error::CorruptChunk { reason, .. }) => {
            assert!(reason.contains("differs from header"), "{reason}")
        }
        other => panic!("a decompression bomb was not refused: {other:?}"),
    }
}
