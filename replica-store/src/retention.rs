//! Retention: prune recovery points by policy (keep the last N, keep those younger than a
//! duration). The newest point of every VM is always kept. Chunks are freed by GC afterwards.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::point::PointMeta;
use crate::store::{now_unix_ms, Store};

/// Which points to keep. A point is kept if any rule keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep the newest N points of each VM.
    pub keep_last: Option<usize>,
    /// Keep points created within this duration.
    pub keep_within: Option<Duration>,
}

/// Result of a prune.
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    /// Points kept (`vm/id`).
    pub kept: Vec<String>,
    /// Points removed (or that would be, in a dry run).
    pub removed: Vec<String>,
}

impl RetentionPolicy {
    /// Split the points of one VM into (keep, remove).
    pub fn select<'a>(
        &self,
        points: &'a [PointMeta],
        now_ms: u64,
    ) -> (Vec<&'a PointMeta>, Vec<&'a PointMeta>) {
        let mut sorted: Vec<&PointMeta> = points.iter().collect();
        sorted.sort_by(|a, b| (b.created_unix_ms, &b.id).cmp(&(a.created_unix_ms, &a.id)));
        let (mut keep, mut remove) = (Vec::new(), Vec::new());
        for (i, p) in sorted.into_iter().enumerate() {
            let by_last = self.keep_last.is_some_and(|n| i < n);
            let by_age = self
                .keep_within
                .is_some_and(|d| now_ms.saturating_sub(p.created_unix_ms) <= d.as_millis() as u64);
            if i == 0 || by_last || by_age {
                keep.push(p);
            } else {
                remove.push(p);
            }
        }
        (keep, remove)
    }
}

impl Store {
    /// Apply `policy` to one VM (or all). Removes point objects, then their indexes.
    pub async fn prune(
        &self,
        vm: Option<&str>,
        policy: RetentionPolicy,
        dry_run: bool,
    ) -> Result<PruneReport> {
        if policy.keep_last.is_none() && policy.keep_within.is_none() {
            return Err(Error::InvalidArgument(
                "refusing to prune without a policy (give keep-last and/or keep-within)".into(),
            ));
        }
        let mut by_vm: BTreeMap<String, Vec<PointMeta>> = BTreeMap::new();
        for p in self.list_points(vm).await? {
            by_vm.entry(p.vm.clone()).or_default().push(p);
        }
        let now = now_unix_ms();
        let mut report = PruneReport::default();
        for points in by_vm.values() {
            let (keep, remove) = policy.select(points, now);
            report.kept.extend(keep.iter().map(|p| p.full_id()));
            for p in remove {
                if !dry_run {
                    self.delete_point(p).await?;
                }
                report.removed.push(p.full_id());
            }
        }
        report.removed.sort();
        report.kept.sort();
        Ok(report)
    }
}
