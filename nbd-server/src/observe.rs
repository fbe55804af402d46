//! A hook for statistics: the server tells an [`Observer`] about every request it answered.
//!
//! The server knows nothing about what is done with the figures (the gateway turns them into
//! Prometheus metrics). At the start of each session the server asks the observer for a
//! per-export [`ExportObserver`] (so per-request work needs no lookup by name); each request
//! then reports once, when its reply is on the socket (or the connection is gone): its
//! command, its payload bytes (READ and WRITE; 0 for the others), the time from its header
//! being read to its reply written, and whether it succeeded. A refused request (bad flags,
//! out of bounds, read-only) counts as a failure. NBD_CMD_DISC is not a request that is
//! answered and is not reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::*;

/// An NBD command, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    Cache,
    /// A command this server does not know (answered with EINVAL).
    Unknown,
}

impl Command {
    pub const ALL: [Command; 8] = [
        Command::Read,
        Command::Write,
        Command::Flush,
        Command::Trim,
        Command::WriteZeroes,
        Command::BlockStatus,
        Command::Cache,
        Command::Unknown,
    ];

    pub fn of(cmd: u16) -> Self {
        match cmd {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            CMD_CACHE => Command::Cache,
            _ => Command::Unknown,
        }
    }

    /// Lower-case name, e.g. `write_zeroes`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Cache => "cache",
            Command::Unknown => "unknown",
        }
    }
}

/// Receives per-request figures of one export.
pub trait ExportObserver: Send + Sync {
    fn request_done(&self, command: Command, payload_bytes: u64, elapsed: Duration, ok: bool);
}

/// Hands out an [`ExportObserver`] per session.
pub trait Observer: Send + Sync {
    fn export(&self, name: &str) -> Arc<dyn ExportObserver>;
}

/// One request being observed; reports when dropped (with its reply).
pub(crate) struct Observed {
    observer: Arc<dyn ExportObserver>,
    command: Command,
    bytes: u64,
    start: Instant,
    pub(crate) ok: bool,
}

impl Observed {
    pub(crate) fn new(
        observer: Arc<dyn ExportObserver>,
        cmd: u16,
        length: u32,
        start: Instant,
    ) -> Self {
        let command = Command::of(cmd);
        let bytes = match command {
            Command::Read | Command::Write => u64::from(length),
            _ => 0,
        };
        Self {
            observer,
            command,
            bytes,
            start,
            ok: true,
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.observer
            .request_done(self.command, self.bytes, self.start.elapsed(), self.ok);
    }
}
