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
//! `points list` warns. In an encrypted store a point object cannot be swapped for another
//! one either: its authentication covers its key (name), so an old point copied over a
//! newer key fails to open and is reported as junk.

use anyhow::{bail, Result};
use gateway::replication::db::Db;
use gateway::DataDir;
use replica_store::{PointMeta, Store};

fn key(vm: &str) -> String {
    format!("store_seen:{vm}")
}

/// The newest point id of `vm` this gateway has seen (or published).
pub fn seen(db: &Db, vm: &str) -> Result<Option<String>> {
    let mut best = db.get_value(&key(vm))?;
    if let Some(v) = db.vm(vm)? {
        if !v.last_point.is_empty() && best.as_deref().is_none_or(|b| v.last_point.as_str() > b) {
            best = Some(v.last_point);
        }
    }
    Ok(best)
}

/// A rollback found: (the newest point this gateway saw, the store's newest or none).
pub fn rollback(db: &Db, vm: &str, points: &[PointMeta]) -> Result<Option<(String, String)>> {
    let newest = points
        .iter()
        .filter(|p| p.vm == vm)
        .map(|p| p.id.as_str())
        .max();
    let Some(mark) = seen(db, vm)? else {
        return Ok(None);
    };
    match newest {
        Some(n) if n >= mark.as_str() => Ok(None),
        n => Ok(Some((mark, n.unwrap_or("none").to_string()))),
    }
}

/// Raises the marks of the VMs in `points` to their newest point.
pub fn record(db: &Db, points: &[PointMeta]) -> Result<()> {
    let mut newest: std::collections::BTreeMap<&str, &str> = Default::default();
    for p in points {
        let e = newest.entry(&p.vm).or_insert(&p.id);
        if p.id.as_str() > *e {
            *e = &p.id;
        }
    }
    for (vm, id) in newest {
        if db.get_value(&key(vm))?.is_none_or(|m| id > m.as_str()) {
            db.set_value(&key(vm), id)?;
        }
    }
    Ok(())
}

/// Valid points of `vm` (junk reported on stderr); refuses a store that went back in time
/// unless `accept_rollback`. Records the newest point seen.
pub async fn checked_points(
    dd: &DataDir,
    store: &Store,
    vm: &str,
    accept_rollback: bool,
) -> Result<Vec<PointMeta>> {
    let listing = store.list_points_checked(Some(vm)).await?;
    report_junk(&listing.junk);
    let db = Db::open(dd.root())?;
    if let Some((mark, newest)) = rollback(&db, vm, &listing.points)? {
        if !accept_rollback {
            bail!(
                "the store went back in time for VM {vm}: this gateway has seen point {mark}, the store's newest is {newest} (points deleted elsewhere or an old copy of the store restored). Check the store; to use it anyway pass --accept-store-rollback"
            );
        }
        eprintln!("warning: the store went back in time for VM {vm} (seen {mark}, newest {newest}): accepted");
    } else {
        record(&db, &listing.points)?;
    }
    Ok(listing.points)
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
