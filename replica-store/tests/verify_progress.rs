//! Verify's progress counters move while it runs (a backend slowed by the fault-injecting
//! wrapper, so the run lasts long enough to be watched) and end at the report's figures.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replica_store::testing::{FaultConfig, FaultyBackend, MemoryBackend};
use replica_store::{CreateOptions, PointBuilder, Store, VerifyProgress};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_counts_move_while_it_runs() {
    let mem: Arc<MemoryBackend> = Arc::new(MemoryBackend::new());
    let store = Store::create(
        mem.clone(),
        CreateOptions {
            chunk_size: 64 * 1024,
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    // 64 distinct chunks.
    let mut b = PointBuilder::new(&store, "vm").unwrap();
    b.add_disk("d", 64 * 64 * 1024).unwrap();
    for i in 0..64u64 {
        let data = vec![i as u8 + 1; 64 * 1024];
        b.write_chunk("d", i, Bytes::from(data)).await.unwrap();
    }
    b.publish().await.unwrap();

    // The same objects behind a backend whose chunk reads take up to 20 ms each.
    let slow = Arc::new(FaultyBackend::new(
        mem,
        FaultConfig {
            seed: 1,
            error_rate: 0.0,
            lost_ack_rate: 0.0,
            corrupt_read_rate: 0.0,
            max_latency: Duration::from_millis(20),
            key_prefix: "chunks/".into(),
        },
    ));
    let store = Store::open(slow, None).await.unwrap();
    let progress = Arc::new(VerifyProgress::default());
    let watched = Arc::clone(&progress);
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            let c = watched.counts();
            seen.push(c);
            if c.chunks_total > 0 && c.chunks_done == c.chunks_total {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let report = store.verify_all_with(&progress).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .unwrap()
        .unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.chunks_checked, 64);
    // Seen part-way: the totals known, some chunks done, not all.
    assert!(
        seen.iter()
            .any(|c| c.chunks_total == 64 && c.chunks_done > 0 && c.chunks_done < 64),
        "{seen:?}"
    );
    // Never backwards, and the percent follows.
    for w in seen.windows(2) {
        assert!(w[1].chunks_done >= w[0].chunks_done && w[1].bytes_checked >= w[0].bytes_checked);
        assert!(w[1].percent() >= w[0].percent());
    }
    let end = progress.counts();
    assert_eq!(end.bytes_checked, report.bytes_checked);
    assert_eq!(end.bytes_total, 64 * 64 * 1024);
    assert_eq!(end.percent(), 100.0);
}
