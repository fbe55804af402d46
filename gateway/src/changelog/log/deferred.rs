//! The log's side of deferred small writes (see [`crate::changelog::extent`], "Deferred small
//! writes"): [`ChangeLog::log_image_bytes`] appends a write record holding the image's current
//! bytes of a range, chosen while the range is held.
//!
//! **Invariant.** The bytes are read while the log holds the range (`begin_range`), so no
//! request over it runs between the read and the append: the record's bytes are the image's
//! bytes at its LSN, and a later request over the range gets a later LSN. The image is not
//! changed, so no hot-extent rule applies (the range's deferred extent record, which changed
//! the image, already followed it).

use std::io;

use super::ChangeLog;
use crate::changelog::format::{Kind, RecordHeader, RECORD_HEADER_LEN};

impl ChangeLog {
    /// Holds `[start, end)` (waiting for the requests over it), asks `pick` which bytes to
    /// log — `(offset, bytes)` inside the range, typically the image's, or `None` — and
    /// appends them as one write record. Returns the record's LSN (`None` when nothing was
    /// picked or the log is not recording). Blocking.
    pub fn log_image_bytes(
        &self,
        start: u64,
        end: u64,
        pick: impl FnOnce() -> io::Result<Option<(u64, Vec<u8>)>>,
    ) -> io::Result<Option<u64>> {
        let id = self.begin_range(start, end)?;
        let (offset, data) = match pick() {
            Ok(Some(p)) => p,
            Ok(None) => {
                self.complete(id, None);
                return Ok(None);
            }
            Err(e) => {
                self.complete(id, None);
                return Err(e);
            }
        };
        debug_assert!(start <= offset && offset + data.len() as u64 <= end);
        let rec_len = (RECORD_HEADER_LEN + data.len()) as u64;
        self.count_appended(rec_len);
        let mut h = RecordHeader {
            lsn: 0,
            kind: Kind::Write,
            flags: 0,
            ahead: 0,
            offset,
            length: data.len() as u64,
            data_len: data.len() as u32,
        };
        let (lsn, rotated) = self.append(&mut h, &data, false);
        if lsn.is_some() {
            self.note_appended(rec_len);
        }
        self.complete(id, lsn);
        if rotated {
            self.seal_in_background();
        }
        self.persist_if_dirty();
        Ok(lsn)
    }
}
