//! Replication health: Normal, Warning or Critical, with the reasons.
//!
//! Warning when more than 20% of the replication cycles in the observation window were missed,
//! when no recovery point was cut for more than an hour, or when the current RPO (now minus the
//! time of the newest point) exceeds twice the copy interval. Critical when the VM is halted by a
//! non-recoverable error.

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
    pub newest_point: Option<SystemTime>,
    /// Cycles due in the observation window, and how many of them were missed.
    pub cycles_due: u32,
    pub cycles_missed: u32,
    /// A non-recoverable error halted the VM.
    pub halted: bool,
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
    }
}
