//! The replica store's conformance suite against a real S3 server (Garage on 127.0.0.1),
//! plus S3-only checks: authentication failures, missing bucket, multipart objects.
//!
//! Fails (does not skip) when the `garage` binary is missing. `STANDBY_SKIP_S3=1 tools/test-all.sh`
//! leaves this binary out of the run (nextest reports it as skipped).

use std::sync::Arc;

use bytes::Bytes;
use replica_store::backend::s3::S3Backend;
use replica_store::testing::{self, BackendFactory};
use replica_store::{Backend, Error, Store};
use standby_e2e::garage::{s3_config, S3Factory};

macro_rules! s3_scenarios {
    ($($name:ident),* $(,)?) => { $(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let f = S3Factory::start().await;
            testing::$name(&f).await
        }
    )* };
}

s3_scenarios!(
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

macro_rules! s3_pack_scenarios {
    ($($name:ident),* $(,)?) => { $(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let f = S3Factory::start().await;
            testing::packs::$name(&f).await
        }
    )* };
}

s3_pack_scenarios!(
    packs_format,
    packs_roundtrip_and_requests,
    packs_gc_repack_with_sessions,
    packs_faults_never_wrong_data,
);

/// A store created on S3 with default options keeps its chunks in packs, and the S3
/// backend's own request counters show at most one PUT per MiB for a multi-MiB import.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_default_layout_is_packs_and_puts_are_counted() {
    let f = S3Factory::start().await;
    let backend = f.fresh("default-layout").await;
    let store = Store::create(
        backend.clone(),
        replica_store::CreateOptions::default(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(store.layout(), replica_store::Layout::Packs);
    assert_eq!(store.settings().format_version, 5);
    let before = store.requests().expect("the S3 backend counts requests");
    // 24 MiB of random data: two packs of 16 MiB at most.
    let data = testing::random_bytes(11, 24 << 20);
    let mut b = store.point_builder("vm").unwrap();
    b.add_disk("d", data.len() as u64).unwrap();
    let w = b.writer();
    for (i, c) in data.chunks(store.chunk_size() as usize).enumerate() {
        let out = w.put(Bytes::copy_from_slice(c)).await.unwrap();
        b.set_chunk("d", i as u64, out.id).unwrap();
    }
    let p = b.publish().await.unwrap();
    let after = store.requests().unwrap();
    let puts = after.puts - before.puts;
    let mib = (after.put_bytes - before.put_bytes) as f64 / 1048576.0;
    assert!(mib >= 24.0, "{mib} MiB uploaded");
    assert!(puts as f64 <= mib, "{puts} PUTs for {mib:.1} MiB");
    assert_eq!(p.upload.unwrap().puts, puts, "{:?}", p.upload);
    assert_eq!(after.heads, before.heads, "no HEAD per chunk");
    let other = Store::open(backend, None).await.unwrap();
    let r = other
        .open_disk(&p, "d", replica_store::ReaderOptions::default())
        .await
        .unwrap();
    assert_eq!(&r.read_at(0, data.len()).await.unwrap()[..], &data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_non_recoverable() {
    let f = S3Factory::start().await;
    let mut cfg = s3_config(&f.garage, "auth");
    cfg.secret_access_key = Some("0".repeat(64));
    let b: Arc<dyn Backend> = Arc::new(S3Backend::connect(&cfg).await.unwrap());
    let e = b.put("x", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    assert!(!e.is_recoverable());
    let e = Store::open(b.clone(), None).await.unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");

    let mut cfg = s3_config(&f.garage, "auth");
    cfg.access_key_id = Some("GK000000000000000000000000".into());
    let b = S3Backend::connect(&cfg).await.unwrap();
    let e = b.list("").await.unwrap_err();
    assert!(!e.is_recoverable(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bucket_and_unreachable_server() {
    let f = S3Factory::start().await;
    let mut cfg = s3_config(&f.garage, "");
    cfg.bucket = "no-such-bucket-standby".into();
    let b = S3Backend::connect(&cfg).await.unwrap();
    let e = b.get("store.toml").await.unwrap_err();
    assert!(!e.is_recoverable(), "{e}");

    // Nothing listens there: a network error, recoverable.
    let mut cfg = s3_config(&f.garage, "");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.endpoint = Some(format!("http://127.0.0.1:{port}"));
    let b = S3Backend::connect(&cfg).await.unwrap();
    let e = b.head("store.toml").await.unwrap_err();
    assert!(matches!(e, Error::Network { .. }), "{e}");
    assert!(e.is_recoverable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_ranges_and_listing() {
    let f = S3Factory::start().await;
    let b = f.fresh("mp").await;
    // Larger than the multipart threshold.
    let big = testing::random_bytes(5, 40 << 20);
    b.put("big/object", Bytes::from(big.clone())).await.unwrap();
    assert_eq!(
        b.head("big/object").await.unwrap().unwrap().size,
        big.len() as u64
    );
    assert_eq!(
        &b.get_range("big/object", 17 << 20, 1000).await.unwrap()[..],
        &big[17 << 20..(17 << 20) + 1000]
    );
    assert_eq!(b.get("big/object").await.unwrap().len(), big.len());
    assert!(b
        .get_range("big/object", (40 << 20) + 5, 10)
        .await
        .unwrap()
        .is_empty());
    // Pagination: more than one ListObjectsV2 page.
    for i in 0..1100 {
        b.put(&format!("many/{i:05}"), Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    assert_eq!(b.list("many/").await.unwrap().len(), 1100);
    // Garage ignores If-None-Match (overwrites): only ever used for content-addressed keys,
    // so a second put of the same content must simply succeed and leave the content intact.
    b.put_if_absent("many/00001", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(&b.get("many/00001").await.unwrap()[..], b"x");
    assert!(b.head("missing").await.unwrap().is_none());
    assert!(b.get("missing").await.unwrap_err().is_not_found());
    b.delete("missing").await.unwrap();
}

/// The CI failure this guards against: the S3 port chosen for Garage was taken by another
/// process before Garage bound it; Garage's admin API came up healthy, its S3 listener did not,
/// and the test failed on "connection reset". Now the start verifies that Garage holds all
/// three ports and retries with new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_start_retries_when_its_port_is_taken() {
    use standby_e2e::garage::{free_port, Garage};
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr").port();
    let g = Garage::start_with(Some([free_port(), taken, free_port()]));
    assert_ne!(g.s3_endpoint, format!("http://127.0.0.1:{taken}"));
    let backend = S3Backend::connect(&s3_config(&g, "retry"))
        .await
        .expect("S3 client");
    backend
        .put("k", Bytes::from_static(b"v"))
        .await
        .expect("the retried server serves S3");
    drop(squatter);
}
