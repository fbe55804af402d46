//! The conformance suite against the local-directory and in-memory backends.
//! (The same suite runs against a real S3 server in the workspace's end-to-end tests.)

use std::sync::Arc;

use async_trait::async_trait;
use replica_store::backend::local::LocalBackend;
use replica_store::testing::{self, BackendFactory, MemoryBackend};
use replica_store::Backend;

struct Local(tempfile::TempDir);

#[async_trait]
impl BackendFactory for Local {
    async fn fresh(&self, name: &str) -> Arc<dyn Backend> {
        Arc::new(LocalBackend::open(self.0.path().join(name)).expect("local backend"))
    }
}

struct Memory;

#[async_trait]
impl BackendFactory for Memory {
    async fn fresh(&self, _name: &str) -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new())
    }
}

fn local() -> Local {
    Local(tempfile::tempdir().expect("tempdir"))
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod local_dir { use super::*; $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { testing::$name(&local()).await }
        )* }
        mod memory { use super::*; $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { testing::$name(&Memory).await }
        )* }
    };
}

scenarios!(
    store_format,
    dedup_and_zero_elision,
    point_publish_list_read,
    blobs,
    prune_policy,
    verify_detects_corruption,
    encryption_right_and_wrong_key,
    gc_with_concurrent_uploader,
    adopted_index_after_gc,
    faults_never_wrong_data,
);

macro_rules! hostile {
    ($($name:ident),* $(,)?) => {
        mod hostile_local_dir { use super::*; $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { testing::hostile::$name(&local()).await }
        )* }
        mod hostile_memory { use super::*; $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { testing::hostile::$name(&Memory).await }
        )* }
    };
}

macro_rules! packs {
    ($($name:ident),* $(,)?) => {
        mod packs_local_dir { use super::*; $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { testing::packs::$name(&local()).await }
        )* }
        mod packs_memory { use super::*; $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { testing::packs::$name(&Memory).await }
        )* }
    };
}

packs!(
    packs_format,
    packs_roundtrip_and_requests,
    packs_gc_repack_with_sessions,
    packs_faults_never_wrong_data,
);

hostile!(
    junk_points_are_reported_and_skipped,
    zstd_output_bounded_by_chunk_size,
);
