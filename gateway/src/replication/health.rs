//! Replication health: Normal, Warning or Critical, with the reasons.
//!
//! Critical when the VM is halted by a non-recoverable error. Before the first recovery point
//! (enabling protection, initial replication, finalizing) no point is expected yet: Warning
//! only while a failed step is retried. Afterwards Warning when more than 20% of the
//! replication cycles in the observation window were missed, when no recovery point was cut
//! for more than an hour, when the current RPO (now minus the time the replica was last known
//! current) exceeds twice the copy interval, when a resynchronization is needed or running, or
//! when the last step failed.
//!
//! [`evaluate`] is the only implementation of these rules; the read models
//! ([`super::status::vm_health`]) only map a VM's row to a [`HealthInput`].

use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Normal,
    Warning,
    Critical,
}

/// What health is computed from.
#[derive(Debug, Clone)]
pub struct HealthInput {
    pub now: SystemTime,
    pub interval: Duration,
    /// When the replica was last known current (None before the first point).
    pub newest_point: Option<SystemTime>,
    /// Cycles due in the observation window, and how many of them were missed.
    pub cycles_due: u32,
    pub cycles_missed: u32,
    /// A non-recoverable error halted the VM.
    pub halted: bool,
    /// The first recovery point is still being made (no point is expected yet).
    pub first_point_pending: bool,
    /// Why a resynchronization is needed or running.
    pub resync: Option<String>,
    /// The last step failed (it is retried, or the VM changed phase because of it).
    pub last_step_failed: bool,
}

/// Health and the reasons behind it (empty when Normal).
pub fn evaluate(i: &HealthInput) -> (Health, Vec<String>) {
    if i.halted {
        return (
            Health::Critical,
            vec!["halted by a non-recoverable error".into()],
        );
    }
    let mut reasons = Vec::new();
    if i.first_point_pending {
        if i.last_step_failed {
            reasons.push("initial replication is retrying".into());
        }
    } else {
        if i.cycles_due > 0 && u64::from(i.cycles_missed) * 5 > u64::from(i.cycles_due) {
            reasons.push(format!(
                "{} of {} replication cycles missed (> 20%)",
                i.cycles_missed, i.cycles_due
            ));
        }
        match i.newest_point {
            None => reasons.push("no recovery point yet".into()),
            Some(p) => {
                let rpo = i.now.duration_since(p).unwrap_or(Duration::ZERO);
                if rpo > Duration::from_secs(3600) {
                    reasons.push(format!("no recovery point for {} min", rpo.as_secs() / 60));
                } else if rpo > i.interval * 2 {
                    reasons.push(format!(
                        "RPO {} s is more than twice the {} s interval",
                        rpo.as_secs(),
                        i.interval.as_secs()
                    ));
                }
            }
        }
        if let Some(why) = &i.resync {
            reasons.push(format!("resynchronization needed: {why}"));
        }
        if i.last_step_failed {
            reasons.push("the last step failed (see the last error)".into());
        }
    }
    if reasons.is_empty() {
        (Health::Normal, reasons)
    } else {
        (Health::Warning, reasons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> HealthInput {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
        HealthInput {
            now,
            interval: Duration::from_secs(300),
            newest_point: Some(now - Duration::from_secs(120)),
            cycles_due: 10,
            cycles_missed: 2,
            halted: false,
            first_point_pending: false,
            resync: None,
            last_step_failed: false,
        }
    }

    #[test]
    fn thresholds() {
        assert_eq!(evaluate(&input()).0, Health::Normal);
        let mut i = input();
        i.cycles_missed = 3;
        assert_eq!(evaluate(&i).0, Health::Warning);
        let mut i = input();
        i.newest_point = Some(i.now - Duration::from_secs(601));
        let (h, r) = evaluate(&i);
        assert_eq!(h, Health::Warning);
        assert!(r[0].contains("twice"), "{r:?}");
        let mut i = input();
        i.interval = Duration::from_secs(3600);
        i.newest_point = Some(i.now - Duration::from_secs(3601));
        assert!(evaluate(&i).1[0].contains("no recovery point for 60 min"));
        let mut i = input();
        i.halted = true;
        assert_eq!(evaluate(&i).0, Health::Critical);
        let mut i = input();
        i.newest_point = None;
        assert_eq!(evaluate(&i).0, Health::Warning);
        let mut i = input();
        i.resync = Some("log at 50%".into());
        assert_eq!(
            evaluate(&i),
            (
                Health::Warning,
                vec!["resynchronization needed: log at 50%".to_string()]
            )
        );
        let mut i = input();
        i.last_step_failed = true;
        assert_eq!(evaluate(&i).0, Health::Warning);
    }

    #[test]
    fn before_the_first_point_only_retries_warn() {
        let mut i = input();
        i.first_point_pending = true;
        i.newest_point = None;
        i.cycles_missed = 10;
        assert_eq!(evaluate(&i), (Health::Normal, vec![]));
        i.last_step_failed = true;
        assert_eq!(
            evaluate(&i),
            (
                Health::Warning,
                vec!["initial replication is retrying".to_string()]
            )
        );
    }
}
