//! Store figures: objects and bytes of the replica store, and the hit rate of the replica
//! readers' chunk cache.
//!
//! Objects and bytes come from [`replica_store::Store::usage`] (what `standby store info`
//! shows), which lists the whole store: it never runs on the scrape path. A background task
//! ([`spawn_refresh`]) keeps a cached figure: at start, after jobs finish (publishes and
//! prunes happen in jobs; the task looks at the job history every [`POLL`]), and at least
//! every [`MAX_AGE`]; one listing at a time, and the next one no sooner than [`MIN_SPACING`]
//! or [`SPACING_FACTOR`] times as long as the last one took, whichever is longer (a large S3
//! store's listing takes at most a small share of the time and requests). A scrape
//! only reads the cached figure and says how old it is (`standby_store_usage_age_seconds`);
//! the figures are absent until the first listing succeeds, and a failed listing keeps the
//! previous figure (its age grows).
//!
//! Cache hits and misses are the process-wide counts of [`replica_store::cache_stats`],
//! copied into the counters at each scrape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use replica_store::Usage;
use tracing::{debug, warn};

use crate::catalog::DataDir;
use crate::replication::Db;

/// How often the refresh task looks at the job history.
pub const POLL: Duration = Duration::from_secs(5);
/// Least time between two listings of the store.
pub const MIN_SPACING: Duration = Duration::from_secs(15);
/// The next listing waits at least this many times as long as the last one took.
pub const SPACING_FACTOR: u32 = 20;
/// Oldest the cached figure gets while the store can be listed.
pub const MAX_AGE: Duration = Duration::from_secs(300);

/// Which objects a figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// Every object of the store.
    All,
    /// Distinct stored chunks, and the bytes of the objects holding chunk data.
    Chunks,
    /// Live pack objects (0 for a store of one object per chunk).
    Packs,
}

impl ObjectKind {
    fn as_str(self) -> &'static str {
        match self {
            ObjectKind::All => "all",
            ObjectKind::Chunks => "chunks",
            ObjectKind::Packs => "packs",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StoreLabel {
    pub store: String,
}

type FGauge = Gauge<f64, AtomicU64>;

pub struct StoreMetrics {
    objects: Family<KindLabel, Gauge>,
    bytes: Family<KindLabel, Gauge>,
    age: Family<StoreLabel, FGauge>,
    hits: Counter,
    misses: Counter,
    /// When the cached figure was taken, and of which store.
    refreshed: Mutex<Option<(Instant, String)>>,
}

impl StoreMetrics {
    pub fn new(r: &mut Registry) -> Self {
        let m = Self {
            objects: Family::default(),
            bytes: Family::default(),
            age: Family::default(),
            hits: Counter::default(),
            misses: Counter::default(),
            refreshed: Mutex::new(None),
        };
        r.register(
            "standby_store_objects",
            "Objects of the replica store by kind (all objects, distinct chunks, live packs), as of its last listing",
            m.objects.clone(),
        );
        r.register_with_unit(
            "standby_store",
            "Bytes of the replica store's objects by kind (all objects, objects holding chunk data), as of its last listing",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register_with_unit(
            "standby_store_usage_age",
            "Age of the store's object and byte figures (seconds since the listing they come from)",
            Unit::Seconds,
            m.age.clone(),
        );
        r.register(
            "standby_store_cache_hits",
            "Reads of stored chunks by replica readers (attached points, failover disks) found in their cache",
            m.hits.clone(),
        );
        r.register(
            "standby_store_cache_misses",
            "Reads of stored chunks by replica readers that waited for a fetch from the store",
            m.misses.clone(),
        );
        m
    }

    /// Keeps `usage` (of the store `store_id`) as the cached figure, taken now.
    pub fn set_usage(&self, store_id: &str, usage: &Usage) {
        let set = |f: &Family<KindLabel, Gauge>, k: ObjectKind, v: u64| {
            f.get_or_create(&KindLabel {
                kind: k.as_str().to_string(),
            })
            .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.objects, ObjectKind::All, usage.objects);
        set(&self.objects, ObjectKind::Chunks, usage.chunks);
        set(&self.objects, ObjectKind::Packs, usage.packs);
        set(&self.bytes, ObjectKind::All, usage.object_bytes);
        set(&self.bytes, ObjectKind::Chunks, usage.chunk_bytes);
        let mut r = self.refreshed.lock().unwrap_or_else(|p| p.into_inner());
        if r.as_ref().is_some_and(|(_, id)| id != store_id) {
            self.age.clear();
        }
        *r = Some((Instant::now(), store_id.to_string()));
    }

    /// At a scrape: the cached figure's age and the cache counts of this process.
    pub fn refresh(&self) {
        if let Some((at, id)) = &*self.refreshed.lock().unwrap_or_else(|p| p.into_inner()) {
            self.age
                .get_or_create(&StoreLabel { store: id.clone() })
                .set(at.elapsed().as_secs_f64());
        }
        let c = replica_store::cache_stats();
        self.hits.inner().store(c.hits, Ordering::Relaxed);
        self.misses.inner().store(c.misses, Ordering::Relaxed);
    }

    fn age(&self) -> Option<Duration> {
        self.refreshed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(at, _)| at.elapsed())
    }
}

/// Ids of the finished jobs among the newest ones: a change means a job ended since.
fn finished_jobs(db: &Db) -> Vec<i64> {
    match db.jobs(50, None) {
        Ok(jobs) => jobs
            .iter()
            .filter(|j| j.finished_ms.is_some())
            .map(|j| j.id)
            .collect(),
        Err(e) => {
            debug!("store usage refresh: reading the job history failed: {e}");
            Vec::new()
        }
    }
}

/// Starts the task that keeps the store's usage figure of `metrics` current (see the module
/// documentation). It ends when `stop` turns true.
pub fn spawn_refresh(
    metrics: Arc<super::Metrics>,
    dd: DataDir,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let root = dd.root().to_path_buf();
        let db = {
            let root = root.clone();
            match tokio::task::spawn_blocking(move || Db::open(&root)).await {
                Ok(Ok(db)) => Some(Arc::new(Mutex::new(db))),
                Ok(Err(e)) => {
                    warn!("store usage figures refresh only every {MAX_AGE:?}: the state database cannot be opened: {e}");
                    None
                }
                Err(_) => None,
            }
        };
        let mut seen: Option<Vec<i64>> = None;
        let mut last_try: Option<Instant> = None;
        let mut spacing = MIN_SPACING;
        loop {
            let jobs = match &db {
                Some(db) => {
                    let db = Arc::clone(db);
                    tokio::task::spawn_blocking(move || {
                        finished_jobs(&db.lock().unwrap_or_else(|p| p.into_inner()))
                    })
                    .await
                    .unwrap_or_default()
                }
                None => Vec::new(),
            };
            let changed = seen.as_ref() != Some(&jobs);
            let stale = metrics.store.age().is_none_or(|a| a >= MAX_AGE);
            let spaced = last_try.is_none_or(|t| t.elapsed() >= spacing);
            if (changed || stale) && spaced {
                let started = Instant::now();
                last_try = Some(started);
                match crate::site::open_store(&root).await {
                    Ok(store) => match store.usage().await {
                        Ok(u) => {
                            spacing = MIN_SPACING.max(started.elapsed() * SPACING_FACTOR);
                            metrics.store.set_usage(&store.settings().store_id, &u);
                            seen = Some(jobs);
                        }
                        Err(e) => warn!(
                            "listing the replica store for its usage figures failed (retried): {e}"
                        ),
                    },
                    Err(e) => {
                        debug!("no store usage figures: the replica store cannot be opened: {e}")
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(objects: u64, bytes: u64) -> Usage {
        Usage {
            chunks: 3,
            chunk_bytes: 300,
            packs: 0,
            objects,
            object_bytes: bytes,
            sizes: Vec::new(),
        }
    }

    fn encode(r: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, r).unwrap();
        out
    }

    #[test]
    fn figures_are_absent_until_a_listing_then_follow_the_newest() {
        let mut r = Registry::default();
        let m = StoreMetrics::new(&mut r);
        m.refresh();
        let text = encode(&r);
        assert!(!text.contains("standby_store_objects{"), "{text}");
        assert!(!text.contains("standby_store_usage_age_seconds{"), "{text}");
        assert!(text.contains("standby_store_cache_hits_total "), "{text}");

        m.set_usage("s1", &usage(7, 1000));
        m.set_usage("s1", &usage(8, 1200));
        m.refresh();
        let text = encode(&r);
        for line in [
            "standby_store_objects{kind=\"all\"} 8",
            "standby_store_objects{kind=\"chunks\"} 3",
            "standby_store_objects{kind=\"packs\"} 0",
            "standby_store_bytes{kind=\"all\"} 1200",
            "standby_store_bytes{kind=\"chunks\"} 300",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        let age: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("standby_store_usage_age_seconds{store=\"s1\"} "))
            .expect("age")
            .parse()
            .unwrap();
        assert!((0.0..5.0).contains(&age), "{age}");
    }
}
