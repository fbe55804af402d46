//! Hydration of a failed-over disk: a background task copies every chunk not yet in its
//! overlay from the store, reporting progress to the attachment row at most every 0.5 s.
//!
//! Its updates never take a row out of `Commit` ([`crate::replication::Db::set_hydration`]): a
//! commit requested while the disk hydrates waits for it, then proceeds.
//!
//! Invariant: a failed hydration leaves the disk served (reads still reach the store) and is
//! retried at the next start; only a complete overlay is marked hydrated (and may be committed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::ReplicaDisk;
use crate::replication::engine::Engine;

impl Engine {
    /// Copies a failed-over disk's remaining chunks into its overlay in the background.
    pub(crate) fn spawn_hydration(
        self: &Arc<Self>,
        export: &str,
        disk: ReplicaDisk,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        let export = export.to_string();
        tokio::spawn(async move {
            let mut last = Instant::now();
            let r = disk
                .hydrate(|done, total| {
                    if last.elapsed() >= Duration::from_millis(500) {
                        let pct = 100.0 * done as f64 / total.max(1) as f64;
                        let _ = me.db(|d| d.set_hydration(&export, false, "", pct));
                        last = Instant::now();
                    }
                })
                .await;
            match r {
                Ok(()) => {
                    let _ = me.db(|d| d.set_hydration(&export, true, "", 100.0));
                    info!(export = %export, "failed-over disk hydrated: a complete local image");
                }
                Err(e) => {
                    warn!(export = %export, "hydration failed (retried at the next start): {e}");
                    let _ =
                        me.db(|d| d.set_hydration(&export, false, &format!("hydration: {e}"), 0.0));
                }
            }
        })
    }
}
