//! When to try again after a failed replication step.
//!
//! Recoverable errors (network, timeouts, S3 5xx or throttling, low local disk or memory) are
//! retried with back-off measured from the first failed attempt: 1, 2, 4, 8 and 10 minutes, then
//! every 30 minutes. Non-recoverable errors (authentication, VM or disk not found, a broken chain
//! that resync cannot fix, invalid replica state, wrong key) are not retried: the VM turns
//! Critical until an admin acts.
//!
//! [`RetryState`] is the only implementation of these rules: the engine records every failed
//! step with [`RetryState::fail`] and runs a step only when [`RetryState::due`]; success is
//! [`RetryState::succeed`] and `standby resume` is [`RetryState::resume`]. The state database
//! keeps it in the VM's row ([`super::db::VmRow::retry`] / [`super::db::VmRow::set_retry`]).

use std::time::{Duration, SystemTime};

/// Is an error worth retrying?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Recoverable,
    NonRecoverable,
}

/// The back-off schedule (configurable; the default is the one above).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    /// Delays after the 1st, 2nd, ... consecutive failure.
    pub steps: Vec<Duration>,
    /// Delay once the steps are used up.
    pub steady: Duration,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        Self {
            steps: vec![min(1), min(2), min(4), min(8), min(10)],
            steady: min(30),
        }
    }
}

impl RetrySchedule {
    /// Delay before the next attempt after `failures` consecutive failures (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        match failures {
            0 => Duration::ZERO,
            n => self
                .steps
                .get(n as usize - 1)
                .copied()
                .unwrap_or(self.steady),
        }
    }

    /// The same schedule with every delay divided by `factor` (tests run on a fast time scale).
    pub fn scaled(&self, factor: u32) -> Self {
        let f = factor.max(1);
        Self {
            steps: self.steps.iter().map(|d| *d / f).collect(),
            steady: self.steady / f,
        }
    }
}

/// Retry bookkeeping for one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryState {
    pub failures: u32,
    pub last_error: Option<String>,
    pub next_attempt: Option<SystemTime>,
    /// Set by a non-recoverable error: nothing is retried until `resume`.
    pub halted: bool,
}

impl RetryState {
    /// Records a failure at `now`; returns when to try again (`None`: do not, wait for an admin).
    pub fn fail(
        &mut self,
        schedule: &RetrySchedule,
        class: ErrorClass,
        error: String,
        now: SystemTime,
    ) -> Option<SystemTime> {
        self.last_error = Some(error);
        match class {
            ErrorClass::NonRecoverable => {
                self.halted = true;
                self.next_attempt = None;
            }
            ErrorClass::Recoverable => {
                self.failures = self.failures.saturating_add(1);
                self.next_attempt = Some(now + schedule.delay(self.failures));
            }
        }
        self.next_attempt
    }

    /// Records a success: the back-off starts over.
    pub fn succeed(&mut self) {
        *self = Self::default();
    }

    /// An admin resumes a halted or waiting VM: the back-off starts over and the next
    /// attempt is due at once (the last error stays on show until an attempt succeeds).
    pub fn resume(&mut self) {
        self.halted = false;
        self.failures = 0;
        self.next_attempt = None;
    }

    /// Is there anything for `resume` to do?
    pub fn resumable(&self) -> bool {
        self.halted || self.next_attempt.is_some()
    }

    /// May an attempt run at `now`?
    pub fn due(&self, now: SystemTime) -> bool {
        !self.halted && self.next_attempt.is_none_or(|t| now >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_is_1_2_4_8_10_then_30_minutes() {
        let s = RetrySchedule::default();
        let mins: Vec<u64> = (1..=8).map(|n| s.delay(n).as_secs() / 60).collect();
        assert_eq!(mins, vec![1, 2, 4, 8, 10, 30, 30, 30]);
        assert_eq!(s.scaled(60).delay(1), Duration::from_secs(1));
    }

    #[test]
    fn recoverable_backs_off_and_success_resets() {
        let s = RetrySchedule::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut r = RetryState::default();
        let a = r
            .fail(&s, ErrorClass::Recoverable, "timeout".into(), t0)
            .unwrap();
        assert_eq!(a, t0 + Duration::from_secs(60));
        assert!(!r.due(t0 + Duration::from_secs(59)));
        assert!(r.due(a));
        let b = r
            .fail(&s, ErrorClass::Recoverable, "503".into(), a)
            .unwrap();
        assert_eq!(b, a + Duration::from_secs(120));
        r.succeed();
        assert_eq!(r, RetryState::default());
        assert!(r.due(t0));
    }

    #[test]
    fn non_recoverable_halts_until_resume() {
        let s = RetrySchedule::default();
        let t0 = SystemTime::UNIX_EPOCH;
        let mut r = RetryState::default();
        assert_eq!(
            r.fail(&s, ErrorClass::NonRecoverable, "403".into(), t0),
            None
        );
        assert!(!r.due(t0 + Duration::from_secs(86_400)));
        assert!(r.resumable());
        r.resume();
        assert!(r.due(t0 + Duration::from_secs(5)));
        assert!(!r.resumable());
    }
}
