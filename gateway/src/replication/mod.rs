//! Replication: protection states, the retry schedule and replication health.
//!
//! This module holds the engine's pure decision logic (no I/O, clock injected) so it can be tested
//! exhaustively; the jobs that drive initial replication, delta replication and resync build on it.

pub mod actions;
pub mod db;
pub mod engine;
pub mod health;
pub mod policy;
pub mod retry;
pub mod status;

pub use db::{Db, DbError, Phase, VmRow};
pub use engine::{Engine, ReplError};
pub use policy::Policy;
pub use retry::ErrorClass;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

use std::fmt;

/// Where a VM is in its protection life cycle (as `standby status` shows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtectionState {
    Unprotected,
    EnablingProtection,
    /// Initial replication, with percent done.
    InitialReplication(u8),
    Protected,
    ResyncRequired {
        reason: String,
    },
    /// Resynchronization, with percent done.
    Resyncing(u8),
    /// A non-recoverable error: no retries until an admin acts (`standby resume VM`).
    Critical {
        reason: String,
    },
}

impl fmt::Display for ProtectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unprotected => write!(f, "Unprotected"),
            Self::EnablingProtection => write!(f, "EnablingProtection"),
            Self::InitialReplication(p) => write!(f, "InitialReplication {p}%"),
            Self::Protected => write!(f, "Protected"),
            Self::ResyncRequired { reason } => write!(f, "ResyncRequired ({reason})"),
            Self::Resyncing(p) => write!(f, "Resyncing {p}%"),
            Self::Critical { reason } => write!(f, "Critical ({reason})"),
        }
    }
}
