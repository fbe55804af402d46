//! Points read from the store with the checks an admin relies on before using one: junk
//! reported, and a store that went back in time (rollback) detected.
//!
//! **Rollback.** Point objects are written once and never rewritten, and a point's id
//! starts with its creation time (checked on load: [`replica_store::PointMeta::check`]), so
//! the newest point of a VM only moves forward — retention never removes it. This gateway
//! keeps, per VM, the newest point id it has ever seen in the store (`store_seen:VM` in the
//! state database; on the protected site also the VM's last published point). When the
//! store's newest point of that VM is older than that mark, points were deleted by someone
//! else or an old copy of the store (or of a bucket) was put back: `failover`/`attach`
//! refuse to pick a point (`--accept-store-rollback` overrides, after an admin has looked),
//! `point list` warns. The checks are [`gateway::failover::actions`]'s (the API's too). In an encrypted store a point object cannot be swapped for another
//! one either: its authentication covers its key (name), so an old point copied over a
//! newer key fails to open and is reported as junk.

use anyhow::Result;
use gateway::failover::actions;
use gateway::replication::db::Db;
use replica_store::PointMeta;

/// A rollback found: (the newest point this gateway saw, the store's newest or none).
pub fn rollback(db: &Db, vm: &str, points: &[PointMeta]) -> Result<Option<(String, String)>> {
    Ok(actions::rollback(db, vm, points)?)
}

/// Raises the marks of the VMs in `points` to their newest point.
pub fn record(db: &Db, points: &[PointMeta]) -> Result<()> {
    Ok(actions::record_seen(db, points)?)
}

/// Prints junk met under `points/` (it is left out of every listing).
pub fn report_junk(junk: &[replica_store::catalog::JunkPoint]) {
    for j in junk {
        eprintln!(
            "warning: ignoring {} in the store (not a valid point): {}",
            j.key, j.reason
        );
    }
}
