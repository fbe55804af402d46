//! Enable protection: the VM's disks are served here and writable, the store is reachable and
//! writable with the right key (the `protection/<vm>` blob records the relationship), the data
//! directory has room for the change logs (half the disks' size), and change tracking is
//! attached to the live disks. Only then the VM moves to InitialReplication.

use std::path::Path;

use tracing::info;

use super::super::db::{JobKind, Phase, VmRow};
use super::super::engine::{blocking, Engine, ReplError, PROTECTION_NS, R};
use super::super::now_ms;
use super::super::policy::Policy;
use crate::changelog::ChangeLog;
use crate::disk::Disk;

impl Engine {
    pub(crate) async fn enable(&self, row: &VmRow, _policy: &Policy) -> R<()> {
        self.job(&row.name, JobKind::EnableProtection, |job| async move {
            self.step(job, "check disks", &row.disks.join(","))?;
            let disks = self.disks_of(row)?;
            for d in &disks {
                if d.read_only() {
                    return Err(ReplError::DiskReadOnly(d.name().to_string()));
                }
            }
            self.step(
                job,
                "check replica store",
                "reachable, writable, key matches",
            )?;
            let store = self.store().await?;
            let rel = serde_json::json!({
                "vm": row.name,
                "disks": row.disks,
                "gateway_data_dir": self.dd.root().display().to_string(),
                "since_unix_ms": now_ms(),
            });
            store
                .put_blob(PROTECTION_NS, &row.name, rel.to_string().as_bytes())
                .await?;
            self.step(job, "check local space", "room for the change logs")?;
            let total: u64 = disks.iter().map(|d| d.size()).sum();
            check_space(self.dd.root(), total / 2)?;
            self.step(job, "start change tracking", "")?;
            for d in &disks {
                self.attach(d).await?;
            }
            Ok(())
        })
        .await?;
        self.succeeded(&row.name, |v| {
            if v.phase == Phase::EnablingProtection {
                v.phase = Phase::InitialReplication;
                v.progress = 0.0;
            }
        })?;
        info!(vm = %row.name, "protection enabled; initial replication starts");
        Ok(())
    }

    pub(crate) async fn attach(&self, d: &Disk) -> R<ChangeLog> {
        let rec = self
            .dd
            .disk(d.name())
            .map_err(|_| ReplError::DiskNotServed(d.name().to_string()))?;
        let opts = self
            .dd
            .config()
            .log
            .options()
            .map_err(|e| ReplError::NeedsResync {
                disk: d.name().to_string(),
                reason: e,
                full: true,
            })?;
        if rec.origin != crate::catalog::Origin::Config {
            let _ = self.dd.set_tracked(d.name(), true);
        }
        let (dc, dir, id) = (d.clone(), self.dd.log_dir(d.name()), rec.id.clone());
        blocking(move || dc.attach_log(&dir, &id, opts))
            .await
            .map_err(|e| ReplError::disk(d.name(), e))?;
        d.change_log()
            .ok_or_else(|| ReplError::DiskNotServed(d.name().to_string()))
    }

    pub(crate) fn log_of(&self, d: &Disk) -> R<ChangeLog> {
        d.change_log().ok_or_else(|| ReplError::NeedsResync {
            disk: d.name().to_string(),
            reason: "change tracking is off".into(),
            full: true,
        })
    }
}

pub(crate) fn check_space(dir: &Path, needed: u64) -> R<()> {
    let free = crate::fastio::free_bytes(dir).map_err(|e| ReplError::Io {
        disk: dir.display().to_string(),
        source: e,
    })?;
    if free < needed {
        return Err(ReplError::LowSpace {
            path: dir.to_path_buf(),
            free,
            needed,
        });
    }
    Ok(())
}
