//! Replication: protection states, the retry schedule and replication health.
//!
//! The pure decision logic (no I/O, clock injected) is tested exhaustively and is the logic that
//! runs: [`retry::RetryState`] decides when the engine tries again, [`health::evaluate`] what
//! `standby status`, the API and `/metrics` call a VM's health, and [`ProtectionState`] how its
//! state reads. The engine ([`engine`]) drives initial replication, delta replication and resync
//! on top; [`db`] keeps the state with typed values.

pub mod actions;
pub mod consolidate;
pub mod db;
pub mod engine;
mod handler;
pub mod health;
pub mod hooks;
pub mod logscan;
pub mod passes;
pub mod policy;
pub mod requests;
pub mod retry;
pub mod states;
pub mod status;
pub mod supervisor;
pub mod vm;

pub use db::{Db, DbError, Phase, VmRow};
pub use engine::{Engine, ReplError};
pub use policy::Policy;
pub use requests::EngineHandle;
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
    /// The first point is being verified.
    FinalizeProtection,
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

impl ProtectionState {
    /// The state of a protected VM from its stored phase, percent done and reason.
    pub fn of(phase: Phase, progress: f64, reason: &str) -> Self {
        let pct = progress.clamp(0.0, 100.0).round() as u8;
        match phase {
            Phase::EnablingProtection => Self::EnablingProtection,
            Phase::InitialReplication => Self::InitialReplication(pct),
            Phase::FinalizeProtection => Self::FinalizeProtection,
            Phase::Protected => Self::Protected,
            Phase::ResyncRequired => Self::ResyncRequired {
                reason: reason.to_string(),
            },
            Phase::Resyncing => Self::Resyncing(pct),
            Phase::Critical => Self::Critical {
                reason: reason.to_string(),
            },
        }
    }
}

impl fmt::Display for ProtectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unprotected => write!(f, "Unprotected"),
            Self::EnablingProtection => write!(f, "EnablingProtection"),
            Self::InitialReplication(p) => write!(f, "InitialReplication {p}%"),
            Self::FinalizeProtection => write!(f, "FinalizeProtection"),
            Self::Protected => write!(f, "Protected"),
            Self::ResyncRequired { reason } => write!(f, "ResyncRequired ({reason})"),
            Self::Resyncing(p) => write!(f, "Resyncing {p}%"),
            Self::Critical { reason } => write!(f, "Critical ({reason})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_state_reads_from_the_stored_phase() {
        assert_eq!(
            ProtectionState::of(Phase::InitialReplication, 41.6, "").to_string(),
            "InitialReplication 42%"
        );
        assert_eq!(
            ProtectionState::of(Phase::ResyncRequired, 0.0, "log broke").to_string(),
            "ResyncRequired (log broke)"
        );
        assert_eq!(
            ProtectionState::of(Phase::FinalizeProtection, 100.0, "").to_string(),
            "FinalizeProtection"
        );
    }
}
