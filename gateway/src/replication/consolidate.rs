//! Background consolidation of patch chains: keeps folding off the cut path.
//!
//! Every delta appends a patch to each changed disk's chain. When a chain passes the soft
//! limit (`fold_patch_bytes`, or [`CONSOLIDATE_PATCHES`] objects), the cut that saw it
//! publishes as usual and then starts a consolidation of the point it just published
//! ([`replica_store::Store::consolidate`]: fold into chunks, in its own upload session, and
//! store the folded index). The cut never waits for it. The first cut after it finished
//! rebases ([`replica_store::PointBuilder::rebase`]) each disk whose chain still starts with
//! the folded patches: the new point's disk is the folded index plus the patches after them
//! plus the new one. A point's content never depends on when (or whether) a consolidation ran.
//! Chunks a cut stored whole (the chain refers to them) cost a consolidation only an index
//! update; only partial-chunk patch data is read, patched and encoded again.
//!
//! **Bound.** If a chain reaches the hard limit anyway — [`INLINE_FACTOR`] × `fold_patch_bytes`
//! or [`INLINE_PATCHES`] objects, because writes outpace consolidation — the cut folds inline
//! as before (back-pressure: the RPO grows, a reader never loads more than the bound).
//!
//! Invariants: at most one consolidation per VM runs at a time; a failed one is logged and
//! retried after a back-off (replication goes on, chains keep growing up to the hard limit);
//! a result is used at most once and only if it still applies (the rebase checks it);
//! results live in memory only, so a restart forgets them (their chunks and index become
//! garbage for GC).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replica_store::{Consolidated, PointMeta, Store};
use tracing::{info, warn};

/// A chain of more patch objects than this is consolidated in the background.
pub const CONSOLIDATE_PATCHES: usize = 256;
/// A chain of more patch objects than this is folded inline by the cut.
pub const INLINE_PATCHES: usize = 4 * CONSOLIDATE_PATCHES;
/// A chain of more than this × `fold_patch_bytes` bytes is folded inline by the cut.
pub const INLINE_FACTOR: u64 = 4;
/// First wait after a failed consolidation (doubling up to [`RETRY_MAX`]).
const RETRY_FIRST: Duration = Duration::from_secs(15);
const RETRY_MAX: Duration = Duration::from_secs(600);

/// What a disk's patch chain calls for after a cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainAction {
    /// Short enough.
    Keep,
    /// Past the soft limit: consolidate in the background.
    Consolidate,
    /// Past the hard limit: fold now, before publishing.
    FoldInline,
}

/// The decision for a chain of `bytes` bytes in `objects` patch objects.
pub fn chain_action(bytes: u64, objects: usize, fold_patch_bytes: u64) -> ChainAction {
    if bytes > fold_patch_bytes.saturating_mul(INLINE_FACTOR) || objects > INLINE_PATCHES {
        ChainAction::FoldInline
    } else if bytes > fold_patch_bytes || objects > CONSOLIDATE_PATCHES {
        ChainAction::Consolidate
    } else {
        ChainAction::Keep
    }
}

#[derive(Debug, Default)]
struct Slot {
    running: bool,
    ready: Vec<Consolidated>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The consolidations of every VM of the engine.
#[derive(Debug, Default)]
pub struct Consolidations {
    vms: Mutex<HashMap<String, Slot>>,
}

impl Consolidations {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the finished consolidations of `vm` (each is offered to one cut only).
    pub fn take_ready(&self, vm: &str) -> Vec<Consolidated> {
        self.slots()
            .get_mut(vm)
            .map(|s| std::mem::take(&mut s.ready))
            .unwrap_or_default()
    }

    /// Is a consolidation of `vm` running or waiting to be used?
    pub fn busy(&self, vm: &str) -> bool {
        self.slots()
            .get(vm)
            .is_some_and(|s| s.running || !s.ready.is_empty())
    }

    /// Starts consolidating `disks` of the published point `point` in the background, unless
    /// one of its VM is running, finished but unused, or backing off after a failure.
    pub fn start(self: &Arc<Self>, store: &Store, point: &PointMeta, disks: Vec<String>) {
        if disks.is_empty() {
            return;
        }
        {
            let mut g = self.slots();
            let s = g.entry(point.vm.clone()).or_default();
            if s.running || !s.ready.is_empty() || s.retry_at.is_some_and(|t| Instant::now() < t) {
                return;
            }
            s.running = true;
        }
        let (me, store, point) = (Arc::clone(self), store.clone(), point.clone());
        tokio::spawn(async move {
            let mut done = Vec::new();
            let mut failed = None;
            for d in &disks {
                match store.consolidate(&point, d).await {
                    Ok(c) => done.push(c),
                    Err(e) => {
                        failed = Some(format!("disk {d}: {e}"));
                        break;
                    }
                }
            }
            let mut g = me.slots();
            let s = g.entry(point.vm.clone()).or_default();
            s.running = false;
            s.ready.extend(done);
            match failed {
                None => {
                    s.failures = 0;
                    s.retry_at = None;
                }
                Some(msg) => {
                    s.failures = s.failures.saturating_add(1);
                    let wait = RETRY_FIRST
                        .saturating_mul(1 << s.failures.min(16).saturating_sub(1))
                        .min(RETRY_MAX);
                    s.retry_at = Some(Instant::now() + wait);
                    warn!(vm = %point.vm, point = %point.id, error = %msg, retry_in = ?wait,
                        "background consolidation of patches failed; replication goes on, retried later");
                }
            }
            if !s.ready.is_empty() {
                info!(vm = %point.vm, point = %point.id, disks = s.ready.len(),
                    "consolidation ready for the next cut");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replica_store::backend::local::LocalBackend;
    use replica_store::{CreateOptions, Patch, PatchRef, PointBuilder};

    async fn wait_idle(c: &Consolidations, vm: &str) {
        for _ in 0..500 {
            if !c.slots().get(vm).is_some_and(|s| s.running) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("consolidation of {vm} still running after 5 s");
    }

    /// A consolidation that fails (a patch object is missing) leaves no result, is retried
    /// only after the back-off, and does not keep a later one from running; a good one yields
    /// one result, offered once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failures_back_off_and_results_are_offered_once() {
        let t = tempfile::tempdir().unwrap();
        let backend = Arc::new(LocalBackend::open(t.path().join("store")).unwrap());
        let store = Store::create(backend, CreateOptions::default(), None)
            .await
            .unwrap();
        let mut b = PointBuilder::new(&store, "vm").unwrap();
        b.add_disk("d", 1 << 20).unwrap();
        let base = b.publish().await.unwrap();
        let mut b = PointBuilder::from_parent(&store, &base).await.unwrap();
        let mut patch = Patch::new(1 << 20);
        patch.write(4096, &[7; 70_000]).unwrap();
        b.add_patch("d", patch).await.unwrap();
        let good = b.publish().await.unwrap();
        let mut broken = good.clone();
        broken.disks[0].patches.push(PatchRef {
            id: "ab".repeat(32),
            bytes: 100,
            data_bytes: 10,
            chunk_refs: 0,
        });

        let c = Arc::new(Consolidations::default());
        c.start(&store, &broken, vec!["d".into()]);
        wait_idle(&c, "vm").await;
        assert!(c.take_ready("vm").is_empty());
        assert!(!c.busy("vm"));
        // Backing off: a new request is ignored for now.
        c.start(&store, &good, vec!["d".into()]);
        assert!(!c.busy("vm"));
        c.slots().get_mut("vm").unwrap().retry_at = None;
        c.start(&store, &good, vec!["d".into()]);
        wait_idle(&c, "vm").await;
        let ready = c.take_ready("vm");
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].covered, good.disks[0].patches);
        assert!(c.take_ready("vm").is_empty());
        assert_eq!(c.slots()["vm"].failures, 0);
    }

    #[test]
    fn chain_limits() {
        let f = 256 << 20;
        assert_eq!(chain_action(0, 0, f), ChainAction::Keep);
        assert_eq!(chain_action(f, CONSOLIDATE_PATCHES, f), ChainAction::Keep);
        assert_eq!(chain_action(f + 1, 1, f), ChainAction::Consolidate);
        assert_eq!(
            chain_action(1, CONSOLIDATE_PATCHES + 1, f),
            ChainAction::Consolidate
        );
        assert_eq!(chain_action(4 * f, 1, f), ChainAction::Consolidate);
        assert_eq!(chain_action(4 * f + 1, 1, f), ChainAction::FoldInline);
        assert_eq!(
            chain_action(1, INLINE_PATCHES + 1, f),
            ChainAction::FoldInline
        );
        // "Never fold" (a huge limit) never overflows.
        assert_eq!(chain_action(u64::MAX, 1, u64::MAX), ChainAction::Keep);
    }
}
