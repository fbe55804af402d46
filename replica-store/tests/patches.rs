//! Delta points: patches over a shared parent index, read back exactly, through pruning of
//! the parent, garbage collection and folding.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replica_store::testing::MemoryBackend;
use replica_store::{
    CreateOptions, GcOptions, Patch, PointBuilder, ReaderOptions, RetentionPolicy, Store,
};

const SIZE: u64 = 1 << 20;

/// Point ids order by millisecond, then a random suffix: points published within one
/// millisecond (as here) are read by id, not as "latest".
async fn read_all(store: &Store, vm: &str, id: &str) -> Vec<u8> {
    let p = store.load_point(vm, id).await.unwrap();
    let r = store
        .open_disk(&p, "d", ReaderOptions::default())
        .await
        .unwrap();
    r.read_at(0, SIZE as usize).await.unwrap().to_vec()
}

#[tokio::test]
async fn delta_points_share_the_parent_index_and_survive_prune_and_gc() {
    let store = Store::create(
        Arc::new(MemoryBackend::new()),
        CreateOptions {
            chunk_size: 64 * 1024,
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for (i, b) in model.iter_mut().enumerate().take(300_000) {
        *b = (i % 251) as u8 + 1;
    }
    let mut b = PointBuilder::new(&store, "vm").unwrap();
    b.add_disk("d", SIZE).unwrap();
    let cs = store.chunk_size() as usize;
    for (i, c) in model.chunks(cs).enumerate() {
        b.write_chunk("d", i as u64, Bytes::copy_from_slice(c))
            .await
            .unwrap();
    }
    let base = b.publish().await.unwrap();

    // Three deltas: each only adds a patch and refers to the first point's index.
    let mut parent = base.clone();
    for round in 0..3u8 {
        let mut p = Patch::new(SIZE);
        let off = 1000 + u64::from(round) * 70_000;
        p.write(off, &[round + 100; 5000]).unwrap();
        p.zero(900_000 + u64::from(round), 10).unwrap();
        model[off as usize..off as usize + 5000].fill(round + 100);
        model[900_000 + round as usize..900_010 + round as usize].fill(0);
        let mut b = PointBuilder::from_parent(&store, &parent).await.unwrap();
        b.add_patch("d", p).await.unwrap();
        parent = b.publish().await.unwrap();
        assert_eq!(parent.disks[0].index_key, base.disks[0].index_key);
        assert_eq!(parent.disks[0].patches.len(), round as usize + 1);
        assert_eq!(read_all(&store, "vm", &parent.id).await, model);
    }

    // Prune everything but the newest: the shared index must stay.
    store
        .prune(
            Some("vm"),
            RetentionPolicy {
                keep_last: Some(1),
                keep_within: None,
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(store.list_points(Some("vm")).await.unwrap().len(), 1);
    let gc = store
        .gc(GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
            fossil_delay: Some(Duration::ZERO),
            now: None,
        })
        .await
        .unwrap();
    assert_eq!(gc.orphan_indexes_deleted, 0, "{gc:?}");
    let gc = store
        .gc(GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
            fossil_delay: Some(Duration::ZERO),
            now: None,
        })
        .await
        .unwrap();
    assert_eq!(gc.orphan_indexes_deleted, 0, "{gc:?}");
    assert_eq!(read_all(&store, "vm", &parent.id).await, model);
    assert!(store.verify_all().await.unwrap().is_ok());

    // Folding writes a new index with no patches and the same bytes.
    let mut b = PointBuilder::from_parent(&store, &parent).await.unwrap();
    let (chunks, _) = b.fold("d").await.unwrap();
    assert!(chunks >= 3, "{chunks} chunks folded");
    let folded = b.publish().await.unwrap();
    assert!(folded.disks[0].patches.is_empty());
    assert_ne!(folded.disks[0].index_key, base.disks[0].index_key);
    assert_eq!(read_all(&store, "vm", &folded.id).await, model);
}
