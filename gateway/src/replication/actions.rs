//! Admin actions on protected VMs and the policy: protect, unprotect, resync, resume, policy set.
//!
//! The one implementation behind both the CLI (`standby protect` …) and the HTTP API
//! (`POST /api/v1/vms` …): each action takes a typed request, validates all of it against the
//! state database and the data directory, and only then writes (one transaction). An invalid
//! request changes nothing and returns an [`ActionError`] whose message says what to do. While
//! a gateway runs, its engine runs them ([`super::requests`]) and acts on the result at once;
//! the CLI runs them itself only when no gateway runs (the gateway reads the state at start).
//!
//! Protect is in two steps because it also checks that the replica store opens (an async,
//! networked check that the caller runs between them): [`check_protect`] validates without
//! writing, [`protect`] validates again and records the VM.
//!
//! Synchronous (SQLite): call them from a blocking thread, not from a tokio worker.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::db::{Db, DbError, Phase, VmRow};
use super::policy::Policy;
use crate::catalog::{CatalogError, DataDir};
use crate::units::{parse_duration, parse_size};

/// Why an action was refused or failed. `Invalid`, `NotFound` and `Conflict` changed nothing.
#[derive(Debug, Error)]
pub enum ActionError {
    /// The request itself is wrong (a bad name, value or combination).
    #[error("{0}")]
    Invalid(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the current state does not allow it.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Catalog(CatalogError),
}

fn db_err(e: DbError) -> ActionError {
    match e {
        DbError::NoSuchVm(vm) => ActionError::NotFound(format!("VM {vm} is not protected")),
        DbError::AlreadyProtected(..) => ActionError::Conflict(e.to_string()),
        e => ActionError::Db(e),
    }
}

/// `standby protect VM --disks a,b` / `POST /api/v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectRequest {
    pub vm: String,
    pub disks: Vec<String>,
}

/// Validates a protect request without writing anything.
pub fn check_protect(dd: &DataDir, db: &Db, r: &ProtectRequest) -> Result<(), ActionError> {
    crate::catalog::validate_name(&r.vm)
        .map_err(|e| ActionError::Invalid(format!("invalid VM name: {e}")))?;
    if r.disks.is_empty() {
        return Err(ActionError::Invalid(
            "a VM needs at least one disk (give its disks)".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for d in &r.disks {
        let rec = dd.disk(d).map_err(|e| match e {
            CatalogError::NotFound(_) | CatalogError::BadName(_) => {
                ActionError::Invalid(format!("VM {} cannot be protected: {e}", r.vm))
            }
            e => ActionError::Catalog(e),
        })?;
        if rec.read_only {
            return Err(ActionError::Invalid(format!(
                "disk {d} is read-only: only writable disks can be protected"
            )));
        }
        if !seen.insert(d.as_str()) {
            return Err(ActionError::Invalid(format!("disk {d} is listed twice")));
        }
    }
    for v in db.vms()? {
        if v.name == r.vm {
            return Err(ActionError::Conflict(format!(
                "VM {} is already protected (state {}); unprotect it first",
                v.name, v.phase
            )));
        }
        if let Some(d) = v.disks.iter().find(|d| r.disks.contains(d)) {
            return Err(ActionError::Conflict(format!(
                "disk {d} already belongs to protected VM {}",
                v.name
            )));
        }
    }
    Ok(())
}

/// What protect did, and what it could not do (tracking of disks declared in the configuration
/// file is switched there).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProtectOutcome {
    pub notes: Vec<String>,
}

/// Validates again and records the VM for protection; switches change tracking on for its
/// disks. Run [`check_protect`] and the store check first.
pub fn protect(dd: &DataDir, db: &Db, r: &ProtectRequest) -> Result<ProtectOutcome, ActionError> {
    check_protect(dd, db, r)?;
    db.insert_vm(&r.vm, &r.disks).map_err(db_err)?;
    let mut out = ProtectOutcome::default();
    for d in &r.disks {
        if let Err(e) = dd.set_tracked(d, true) {
            out.notes.push(format!(
                "{e} (switch tracking on in the configuration file)"
            ));
        }
    }
    Ok(out)
}

/// Stops protecting a VM (its points stay in the store); returns its disks.
pub fn unprotect(dd: &DataDir, db: &Db, vm: &str) -> Result<Vec<String>, ActionError> {
    let Some(v) = db.vm(vm)? else {
        return Err(ActionError::NotFound(format!("VM {vm} is not protected")));
    };
    db.delete_vm(vm)?;
    for d in &v.disks {
        // A disk declared in the configuration keeps its declared tracking.
        let _ = dd.set_tracked(d, false);
    }
    Ok(v.disks)
}

/// Asks for a resynchronization now (`full`: hash every chunk). Only a VM past initial
/// replication can be resynchronized; anything else is refused before any write.
pub fn resync(db: &Db, vm: &str, full: bool) -> Result<Phase, ActionError> {
    let Some(before) = db.vm(vm)? else {
        return Err(ActionError::NotFound(format!("VM {vm} is not protected")));
    };
    if !matches!(
        before.phase,
        Phase::Protected | Phase::ResyncRequired | Phase::Resyncing
    ) {
        return Err(ActionError::Conflict(format!(
            "VM {vm} is {}: a resync applies to a protected VM (after initial replication)",
            before.phase
        )));
    }
    let v = db
        .modify_vm(vm, |v| {
            if matches!(v.phase, Phase::Protected | Phase::ResyncRequired) {
                v.phase = Phase::ResyncRequired;
                if v.reason.is_empty() {
                    v.reason = "requested by an admin".into();
                }
            }
            v.resync_now = true;
            v.resync_full |= full;
            v.next_retry_ms = None;
        })
        .map_err(db_err)?;
    Ok(v.phase)
}

/// What resume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "state", rename_all = "snake_case")]
pub enum ResumeOutcome {
    /// Neither Critical nor waiting for a retry: nothing changed.
    NothingToResume(Phase),
    /// Retries from this state now.
    Resumed(Phase),
}

/// Resumes a Critical VM (after the admin fixed the cause) or retries a waiting one now.
pub fn resume(db: &Db, vm: &str) -> Result<ResumeOutcome, ActionError> {
    let Some(before) = db.vm(vm)? else {
        return Err(ActionError::NotFound(format!("VM {vm} is not protected")));
    };
    if !before.retry().resumable() {
        return Ok(ResumeOutcome::NothingToResume(before.phase));
    }
    let v = db
        .modify_vm(vm, |v| {
            let mut r = v.retry();
            if r.halted {
                v.phase = v.resume_phase.unwrap_or(Phase::EnablingProtection);
                v.resume_phase = None;
                v.reason.clear();
            }
            r.resume();
            v.set_retry(&r);
        })
        .map_err(db_err)?;
    Ok(ResumeOutcome::Resumed(v.phase))
}

/// Changes to the policy, in the CLI's syntax (`standby policy set --interval 5m` or the JSON
/// body of `POST /api/v1/policy`). Unset fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    /// A duration (30s, 5m …) or "continuous".
    pub interval: Option<String>,
    /// A duration, e.g. 24h, 7d.
    pub retention: Option<String>,
    /// A duration or "off".
    pub app_consistent: Option<String>,
    /// A command, or "none" to clear it.
    pub freeze_cmd: Option<String>,
    pub thaw_cmd: Option<String>,
    /// "now" or Unix seconds.
    pub initial_start: Option<String>,
    /// "HH:MM-HH:MM" or "always".
    pub resync_window: Option<String>,
    /// A size per second, e.g. 100M; 0 = none.
    pub bandwidth: Option<String>,
    /// A size, e.g. 256M.
    pub fold_patch_bytes: Option<String>,
    /// A command line, or "none".
    pub failover_command: Option<String>,
    /// Divides retry delays (tests and drills).
    pub retry_time_scale: Option<u32>,
}

impl PolicyChange {
    /// The policy `p` with these changes, validated as a whole.
    pub fn apply(&self, mut p: Policy) -> Result<Policy, ActionError> {
        let dur = |what: &str, s: &str| {
            parse_duration(s).map_err(|e| ActionError::Invalid(format!("{what}: {e}")))
        };
        let size = |what: &str, s: &str| {
            parse_size(s).map_err(|e| ActionError::Invalid(format!("{what}: {e}")))
        };
        let cmd = |c: &String| (c != "none").then(|| c.clone());
        if let Some(i) = &self.interval {
            p.interval_secs = if i == "continuous" {
                0
            } else {
                dur("interval", i)?.as_secs().max(1)
            };
        }
        if let Some(r) = &self.retention {
            p.retention_hours = dur("retention", r)?.as_secs_f64() / 3600.0;
        }
        if let Some(x) = &self.app_consistent {
            p.app_consistent_hours = if x == "off" {
                0.0
            } else {
                dur("app-consistent", x)?.as_secs_f64() / 3600.0
            };
        }
        if let Some(c) = &self.freeze_cmd {
            p.freeze_cmd = cmd(c);
        }
        if let Some(c) = &self.thaw_cmd {
            p.thaw_cmd = cmd(c);
        }
        if let Some(s) = &self.initial_start {
            p.initial_start_unix = if s == "now" {
                None
            } else {
                Some(s.parse().map_err(|_| {
                    ActionError::Invalid(format!(
                        "initial start must be \"now\" or Unix seconds, not {s:?}"
                    ))
                })?)
            };
        }
        if let Some(w) = &self.resync_window {
            p.resync_window = w.clone();
        }
        if let Some(b) = &self.bandwidth {
            p.bandwidth_bytes_per_sec = size("bandwidth", b)?;
        }
        if let Some(c) = &self.failover_command {
            p.failover_command = cmd(c);
        }
        if let Some(b) = &self.fold_patch_bytes {
            p.fold_patch_bytes = size("fold patch bytes", b)?;
        }
        if let Some(s) = self.retry_time_scale {
            p.retry_time_scale = s;
        }
        p.validate()
            .map_err(|e| ActionError::Invalid(format!("invalid policy: {e}")))?;
        Ok(p)
    }
}

/// Applies policy changes; nothing is written unless the whole result is valid.
pub fn set_policy(db: &Db, change: &PolicyChange) -> Result<Policy, ActionError> {
    let p = change.apply(db.policy()?)?;
    db.set_policy(&p)?;
    Ok(p)
}

/// The VM row or NotFound.
pub fn vm(db: &Db, vm: &str) -> Result<VmRow, ActionError> {
    db.vm(vm)?
        .ok_or_else(|| ActionError::NotFound(format!("VM {vm} is not protected")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_change_is_all_or_nothing() {
        let p = Policy::default();
        let ok = PolicyChange {
            interval: Some("30s".into()),
            retention: Some("7d".into()),
            ..Default::default()
        }
        .apply(p.clone())
        .unwrap();
        assert_eq!(ok.interval_secs, 30);
        assert_eq!(ok.retention_hours, 168.0);
        let e = PolicyChange {
            interval: Some("5x".into()),
            ..Default::default()
        }
        .apply(p.clone())
        .unwrap_err();
        assert!(e.to_string().contains("interval"), "{e}");
        // Valid alone, invalid as a whole: app-consistent points need a freeze command.
        let e = PolicyChange {
            app_consistent: Some("4h".into()),
            ..Default::default()
        }
        .apply(p)
        .unwrap_err();
        assert!(matches!(e, ActionError::Invalid(_)), "{e}");
    }

    #[test]
    fn resync_validates_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.insert_vm("vm1", &["a".into()]).unwrap();
        let before = db.vm("vm1").unwrap().unwrap();
        let e = resync(&db, "vm1", true).unwrap_err();
        assert!(matches!(e, ActionError::Conflict(_)), "{e}");
        assert_eq!(db.vm("vm1").unwrap().unwrap(), before, "nothing changed");
        assert!(matches!(
            resync(&db, "nope", false),
            Err(ActionError::NotFound(_))
        ));
    }
}
