//! Staged chunk writes on the local backend: nothing is visible before the point's commit, a
//! crash between staging and commit leaves only temporary files (removed on open) and the next
//! import stores the chunks again; a published point's chunks are all present.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use replica_store::backend::local::LocalBackend;
use replica_store::{Backend, CreateOptions, Store};

const CHUNK: usize = 64 * 1024;

/// An image of 4 random chunks, a hole of 2 chunks (sparse) and 1 random chunk.
fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("image.raw");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut buf = vec![0u8; 4 * CHUNK];
    rand::thread_rng().fill_bytes(&mut buf);
    f.write_all(&buf).unwrap();
    f.set_len(6 * CHUNK as u64).unwrap();
    let mut last = vec![0u8; CHUNK];
    rand::thread_rng().fill_bytes(&mut last);
    use std::os::unix::fs::FileExt;
    f.write_all_at(&last, 6 * CHUNK as u64).unwrap();
    path
}

/// Staging files (beside their chunks' final names) under the store root.
fn tmp_files(root: &std::path::Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".stage-") {
                n += 1;
            }
        }
    }
    n
}

/// This process's staging marker exists.
fn marker(root: &std::path::Path) -> bool {
    root.join(".tmp")
        .join(format!("staging-{}", std::process::id()))
        .exists()
}

/// A new store of `CHUNK`-sized chunks on `backend`.
async fn create_store(backend: &LocalBackend) -> Store {
    let opts = CreateOptions {
        chunk_size: CHUNK as u32,
        ..Default::default()
    };
    Store::create(Arc::new(backend.clone()), opts, None)
        .await
        .unwrap()
}

async fn chunk_count(b: &LocalBackend) -> usize {
    b.list("chunks/").await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_staging_and_commit() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let root = dir.path().join("store");
    let backend = LocalBackend::open(&root).unwrap();
    let store = create_store(&backend).await;

    let mut b = store.point_builder("vm").unwrap();
    let stats = replica_store::import_disk(&mut b, "d", &img, 4)
        .await
        .unwrap();
    assert_eq!(stats.uploaded_chunks, 5);
    assert_eq!(stats.zero_chunks, 2);
    // Staged, not committed: no chunk under its final name, and listing skips staging files.
    assert_eq!(chunk_count(&backend).await, 0);
    assert_eq!(tmp_files(&root), 5);
    assert!(marker(&root));
    // "Crash": the builder vanishes without running any destructor.
    std::mem::forget(b);
    assert!(store.list_points(Some("vm")).await.unwrap().is_empty());

    // A restarted process (dead pid) or an old enough file is cleaned up at open.
    let reopened = LocalBackend::open(&root).unwrap();
    assert_eq!(reopened.remove_stale_tmp(Duration::ZERO).unwrap(), 5);
    assert_eq!(tmp_files(&root), 0);
    assert!(!marker(&root));
    assert_eq!(chunk_count(&reopened).await, 0);

    // The next import stores every chunk again and publishes a complete point.
    let store = Store::open(Arc::new(reopened.clone()), None).await.unwrap();
    let mut b = store.point_builder("vm").unwrap();
    let stats = replica_store::import_disk(&mut b, "d", &img, 4)
        .await
        .unwrap();
    assert_eq!(stats.uploaded_chunks, 5);
    let p = b.publish().await.unwrap();
    assert_eq!(chunk_count(&reopened).await, 5);
    assert_eq!(tmp_files(&root), 0);
    assert!(!marker(&root), "the marker goes with the last staged file");
    let idx = store.load_index(&p, "d").await.unwrap();
    for id in idx.entries().iter().filter(|e| !e.is_zero()) {
        assert!(store.has_chunk(id).await.unwrap(), "chunk {id} missing");
        store.get_chunk(id, Some(CHUNK)).await.unwrap();
    }
    assert_eq!(idx.data_chunks(), 5);

    // Re-importing the same image into the same store stages nothing new.
    let mut b = store.point_builder("vm").unwrap();
    let stats = replica_store::import_disk(&mut b, "d", &img, 4)
        .await
        .unwrap();
    assert_eq!((stats.uploaded_chunks, stats.dedup_chunks), (0, 5));
    b.publish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_session_discards_staged_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let root = dir.path().join("store");
    let backend = LocalBackend::open(&root).unwrap();
    let store = create_store(&backend).await;
    let mut b = store.point_builder("vm").unwrap();
    replica_store::import_disk(&mut b, "d", &img, 4)
        .await
        .unwrap();
    assert_eq!(tmp_files(&root), 5);
    drop(b);
    assert_eq!(tmp_files(&root), 0);
    assert!(!marker(&root));
    assert_eq!(chunk_count(&backend).await, 0);
    // Chunks staged by one session are deduplicated within it, and committed by publish.
    let mut b = store.point_builder("vm").unwrap();
    replica_store::import_disk(&mut b, "d1", &img, 4)
        .await
        .unwrap();
    let s = replica_store::import_disk(&mut b, "d2", &img, 4)
        .await
        .unwrap();
    assert_eq!((s.uploaded_chunks, s.dedup_chunks), (0, 5));
    let p = b.publish().await.unwrap();
    assert_eq!(chunk_count(&backend).await, 5);
    for d in ["d1", "d2"] {
        let idx = store.load_index(&p, d).await.unwrap();
        for id in idx.entries().iter().filter(|e| !e.is_zero()) {
            assert!(store.has_chunk(id).await.unwrap());
        }
    }
}

#[test]
fn open_removes_staging_files_of_a_dead_process_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    LocalBackend::open(&root).unwrap();
    // A crashed process (no such pid) left a marker and staging files; a live one (this
    // process) has a marker and a staging file in flight.
    let dead = 999_999_999;
    let live = std::process::id();
    let chunk_dir = root.join("chunks").join("abc");
    std::fs::create_dir_all(&chunk_dir).unwrap();
    for (pid, n) in [(dead, 1), (dead, 2), (live, 3)] {
        std::fs::write(root.join(".tmp").join(format!("staging-{pid}")), b"").unwrap();
        std::fs::write(chunk_dir.join(format!(".stage-{pid}-{n}-7")), b"x").unwrap();
    }
    std::fs::write(chunk_dir.join("abcdef"), b"a chunk").unwrap();
    LocalBackend::open(&root).unwrap();
    assert!(!root.join(".tmp").join(format!("staging-{dead}")).exists());
    assert!(marker(&root));
    assert_eq!(tmp_files(&root), 1, "only the live process's file is left");
    assert!(chunk_dir.join("abcdef").exists());
}
