//! Recovery points served as exports for the attachment rows of the state database
//! (`standby attach`, test failover, failover): the engine calls [`Engine::sync_attachments`]
//! at start, right after each request that adds or removes rows, and once a second while a
//! commit waits for hydration.
//!
//! Invariants: a row is served once per request (a detach and a new attach under the same
//! name is a new request, told apart by `created_ms`); removing a row removes its export and,
//! for scratch overlays (attach, test failover), its overlay directory; a failover's overlay is
//! the VM's data and stays until its commit adopts it as a local disk — only once every grain
//! is local, with I/O on the replica handed over to the live disk.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use nbd_server::Export;
use replica_store::ReaderOptions;
use tracing::{info, warn};

use super::replica::OverlayKind;
use super::{Device, Overlay, ReplicaDisk};
use crate::replication::db::{Attachment, AttachmentState};
use crate::replication::engine::{blocking, Engine, ReplError, R};

pub(crate) struct Attached {
    pub(crate) disk: ReplicaDisk,
    pub(crate) hydration: Option<tokio::task::JoinHandle<()>>,
    /// Overlay directory removed with the export (attach and test failover overlays are
    /// scratch space; a failover's is the VM's data until committed).
    pub(crate) scratch: Option<PathBuf>,
    /// The request this serves (a detach and a new attach under the same name between two
    /// passes is a new request).
    pub(crate) created_ms: u64,
}

impl Engine {
    /// Serves the attachments the database asks for and stops serving the removed ones.
    pub(crate) async fn sync_attachments(self: &Arc<Self>) {
        let rows = match self.db(|d| d.attachments()) {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot read attachments: {e}");
                return;
            }
        };
        let mut attached = self.attached.lock().await;
        // Removed by the CLI (detach, test-failover cleanup), or replaced by a new request.
        let gone: Vec<String> = attached
            .iter()
            .filter(|(k, a)| {
                !rows
                    .iter()
                    .any(|r| &r.export == *k && r.created_ms == a.created_ms)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for name in gone {
            if let Some(a) = attached.remove(&name) {
                if let Some(h) = a.hydration {
                    h.abort();
                }
                let _ = a.disk.flush().await;
                let still_replica = self
                    .exports
                    .get(&name)
                    .is_some_and(|e| matches!(*e.device, Device::Replica(_)));
                if still_replica {
                    self.exports.remove(&name);
                }
                if let Some(dir) = a.scratch {
                    drop(a.disk);
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        warn!(dir = %dir.display(), "cannot remove an overlay: {e}");
                    }
                }
                info!(export = %name, "replica export removed");
            }
        }
        for row in rows {
            if row.state == AttachmentState::Error {
                continue;
            }
            // A commit is carried out once its disk is served here; a commit row found at
            // start (requested before a restart) is served first, like any other.
            if row.state == AttachmentState::Commit && attached.contains_key(&row.export) {
                if let Err(e) = self.commit_failover(&mut attached, &row).await {
                    warn!(export = %row.export, "failover commit failed: {e}");
                    let _ = self.db(|d| {
                        d.set_attachment(
                            &row.export,
                            AttachmentState::Hydrated,
                            &e.to_string(),
                            100.0,
                        )
                    });
                }
                continue;
            }
            if attached.contains_key(&row.export) {
                continue;
            }
            match self.open_attachment(&row).await {
                Ok(disk) => {
                    self.exports.insert(Export {
                        name: row.export.clone(),
                        description: format!(
                            "{}/{}@{} ({})",
                            row.vm, row.disk, row.point, row.kind
                        ),
                        read_only: !row.rw,
                        device: Arc::new(Device::Replica(disk.clone())),
                    });
                    let state = match row.state {
                        AttachmentState::Hydrated | AttachmentState::Commit => row.state,
                        _ => AttachmentState::Served,
                    };
                    let _ = self.db(|d| d.set_attachment(&row.export, state, "", row.progress));
                    info!(export = %row.export, point = %row.point, rw = row.rw, "replica export served");
                    let hydration = (row.kind == OverlayKind::Failover
                        && row.state != AttachmentState::Hydrated)
                        .then(|| self.spawn_hydration(&row.export, disk.clone()));
                    let scratch = (row.rw && row.kind != OverlayKind::Failover)
                        .then(|| PathBuf::from(&row.dir));
                    attached.insert(
                        row.export.clone(),
                        Attached {
                            disk,
                            hydration,
                            scratch,
                            created_ms: row.created_ms,
                        },
                    );
                }
                Err(e) => {
                    warn!(export = %row.export, "cannot serve replica: {e}");
                    let _ = self.db(|d| {
                        d.set_attachment(&row.export, AttachmentState::Error, &e.to_string(), 0.0)
                    });
                }
            }
        }
    }

    pub(crate) async fn open_attachment(&self, row: &Attachment) -> R<ReplicaDisk> {
        let store = self.store().await?;
        let point = store.load_point(&row.vm, &row.point).await?;
        // A booting VM or a copy reads sequentially: a deeper read-ahead hides the store's
        // latency (S3 most of all); 64 MiB of cache per disk.
        let opts = ReaderOptions {
            cache_bytes: 64 << 20,
            readahead_bytes: 2 << 20,
        };
        let reader = store.open_disk(&point, &row.disk, opts).await?;
        let overlay = if row.rw {
            let dir = PathBuf::from(&row.dir);
            let size = reader.size();
            let grain = u64::from(reader.index().chunk_size());
            Some(
                blocking(move || Overlay::open(&dir, size, grain))
                    .await
                    .map_err(|e| ReplError::Io {
                        disk: row.export.clone(),
                        source: e,
                    })?,
            )
        } else {
            None
        };
        Ok(ReplicaDisk::new(&row.export, reader, overlay))
    }

    /// Turns a hydrated failover disk into a regular disk of this gateway: its overlay image
    /// is adopted in place and the export switches to the live disk.
    pub(crate) async fn commit_failover(
        &self,
        attached: &mut HashMap<String, Attached>,
        row: &Attachment,
    ) -> R<()> {
        let Some(a) = attached.get(&row.export) else {
            return Ok(()); // served first, then committed on a later pass
        };
        if let Some(h) = &a.hydration {
            if !h.is_finished() {
                return Ok(());
            }
        }
        let ov =
            a.disk.overlay().cloned().ok_or_else(|| {
                ReplError::InvalidReplica(format!("{} has no overlay", row.export))
            })?;
        if ov.grains_present() != ov.grains() {
            return Ok(()); // still hydrating
        }
        // No I/O on the replica from here: connections opened before the commit wait, then
        // go to the live disk (its change log records their writes) once it is open.
        let replica = a.disk.clone();
        let handover = replica.begin_handover().await;
        replica.flush().await.map_err(|e| ReplError::Io {
            disk: row.export.clone(),
            source: e,
        })?;
        let image = ov.dir().join(crate::failover::replica::OVERLAY_IMAGE);
        let rec = self
            .dd
            .import_disk(&row.export, &image, false)
            .map_err(|e| {
                ReplError::InvalidReplica(format!("cannot adopt {}: {e}", image.display()))
            })?;
        let disk = self.dd.open_disk(&rec).map_err(|e| {
            ReplError::InvalidReplica(format!("cannot open {}: {e}", image.display()))
        })?;
        handover.complete(disk.clone());
        self.exports.insert(Export {
            name: row.export.clone(),
            description: format!("standby disk {}", row.export),
            read_only: false,
            device: Arc::new(Device::Live(disk.clone())),
        });
        self.disks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(row.export.clone(), disk);
        attached.remove(&row.export);
        let _ = std::fs::remove_file(ov.dir().join(crate::failover::replica::OVERLAY_MAP));
        self.db(|d| d.delete_attachment(&row.export))?;
        info!(export = %row.export, "failover committed: the disk is now a local disk of this gateway");
        Ok(())
    }
}
