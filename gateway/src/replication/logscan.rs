//! Reading change logs for replication: a cut's records as one patch, the chunks a log
//! touches, releasing shipped segments and restarting a chain.
//!
//! Invariant: every segment read is proven whole first ([`crate::changelog::ship`]); anything
//! less breaks the chain and returns [`LogError::NotHealthy`] (→ full resync), never a partial
//! patch or chunk list.

use std::collections::BTreeSet;

use replica_store::Patch;

use crate::changelog::format::Kind;
use crate::changelog::ship::{read_records, Extents, Reach};
use crate::changelog::{ChangeLog, LogError};

/// A new, empty log chain and a clean dirty bitmap (call with writes paused).
pub(crate) fn restart(
    log: &ChangeLog,
    dirty: Option<&crate::changelog::DirtyMap>,
) -> Result<(), LogError> {
    log.reset()?;
    if let Some(m) = dirty {
        m.clear()
            .map_err(LogError::io("cannot save the dirty bitmap of", log.dir()))?;
    }
    Ok(())
}

/// Seals what was cut and releases every segment whose records all have LSN ≤ `lsn` (they
/// are in the store, or — at the start of a pass — in the image the pass reads): deleted once
/// checkpointed, without waiting for the image's sync ([`ChangeLog::release_shipped`]).
pub(crate) fn release_through(log: &ChangeLog, lsn: u64) -> Result<(), LogError> {
    log.wait_sealed()?;
    log.release_shipped(lsn)
}

/// Records of the log's segments with `after < lsn <= upto`, as one patch. Every segment is
/// proven whole first (see [`crate::changelog::ship`]): anything less breaks the chain and
/// returns [`LogError::NotHealthy`] (→ full resync), never a partial patch. An extent's bytes
/// enter the patch as the buffer they were read into (no copy); a record's own bytes are
/// copied out of the segment (which is dropped once read).
pub fn patch_from_log(
    log: &ChangeLog,
    after: u64,
    upto: u64,
    disk_size: u64,
) -> Result<Patch, LogError> {
    let mut patch = Patch::new(disk_size);
    read_records(
        log,
        after,
        Reach::Through(upto),
        Extents::Bytes,
        |h, data| {
            let res = match h.kind {
                // The patch keeps an extent's buffer as it is (see `ship::Payload`).
                Kind::Write | Kind::Extent => patch.write_bytes(h.offset, data.into_bytes()),
                Kind::Trim | Kind::WriteZeroes => patch.zero(h.offset, h.length),
                Kind::Flush => Ok(()),
            };
            res.map_err(|e| LogError::Io {
                what: "cannot use a record of",
                path: log.dir().to_path_buf(),
                source: std::io::Error::other(format!("LSN {}: {e}", h.lsn)),
            })
        },
    )?;
    Ok(patch)
}

/// Chunks touched by the log's records with LSN > `after`, and the last LSN read (extents
/// by their ranges, without reading their bytes). With
/// [`Reach::Live`] writes may continue (the scan stops at a record being written); with
/// [`Reach::Quiesced`] (writes paused) it must reach the log's last LSN. A segment that cannot
/// be proven whole breaks the chain (→ full resync).
pub(crate) fn chunks_in_log(
    log: &ChangeLog,
    after: u64,
    cs: u64,
    reach: Reach,
) -> Result<(BTreeSet<u64>, u64), LogError> {
    let mut out = BTreeSet::new();
    // The ranges are all it needs: extents' bytes are not read from the image.
    let last = read_records(log, after, reach, Extents::RangesOnly, |h, _| {
        if h.kind != Kind::Flush && h.length > 0 {
            out.extend(h.offset / cs..=(h.offset + h.length - 1) / cs);
        }
        Ok(())
    })?;
    Ok((out, last))
}
