//! Tests of the background checkpointer's schedule ([`super::Schedule`], the code its thread
//! runs): when the timer checkpoints under continuous writes, on a quiet log, after a burst,
//! on kicks and stops, and the age a change reaches before its checkpoint under wake-ups at
//! random moments.

use super::{Schedule, Wake};
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(30);

/// Ticks once a second from 1 to `secs`, `new(t, ran)` saying whether the image holds
/// changes no checkpoint covers at second `t`, given the seconds at which checkpoints started
/// so far (`ran`); returns those seconds.
fn run(secs: u64, mut new: impl FnMut(u64, &[u64]) -> bool) -> Vec<u64> {
    let t0 = Instant::now();
    let mut s = Schedule::new(EVERY, t0);
    assert_eq!(s.tick(), Duration::from_secs(1));
    let mut ran = Vec::new();
    for t in 1..=secs {
        let now = t0 + Duration::from_secs(t);
        if s.due(now, Wake::Tick, new(t, &ran)) {
            s.ran(now);
            ran.push(t);
        }
    }
    ran
}

#[test]
fn continuous_writes_checkpoint_every_interval() {
    assert_eq!(run(100, |_, _| true), vec![30, 60, 90]);
}

#[test]
fn a_quiet_log_moves_its_relog_point_every_interval() {
    assert_eq!(run(100, |_, _| false), vec![30, 60, 90]);
}

#[test]
fn a_burst_is_checkpointed_after_it_not_in_its_middle() {
    // Quiet until 50 s, writes from 50 s to 62 s, quiet again: the changes stay
    // uncovered until a checkpoint that starts after they began.
    let ran = run(100, |t, ran| t > 50 && !ran.iter().any(|&c| c > 50));
    // The quiet log's relog-only checkpoint at 30 s, then the burst's at 80 s: 30 s after
    // the last tick that found the image clean, after the burst (a fixed grid of 30 s
    // would have synced the image at 60 s, in its middle).
    assert_eq!(ran, vec![30, 80]);
}

#[test]
fn kicks_checkpoint_at_once_and_a_stop_never() {
    let t0 = Instant::now();
    let mut s = Schedule::new(EVERY, t0);
    let soon = t0 + Duration::from_millis(10);
    assert!(s.due(soon, Wake::Kick, true));
    assert!(s.due(soon, Wake::Kick, false));
    assert!(!s.due(t0 + EVERY * 10, Wake::Stop, true));
    assert!(!s.due(soon, Wake::Tick, true));
}

#[test]
fn a_change_waits_about_one_interval_whatever_the_wake_ups() {
    // Wake-ups at irregular moments (early timeouts of the condition variable, kicks
    // from other triggers): a change made after the last tick that found the image clean
    // is checkpointed by a tick between `every` and `every` plus a tick after that clean
    // tick (so less than `every` plus a tick after the change), never later.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let t0 = Instant::now();
    let mut s = Schedule::new(EVERY, t0);
    let mut now = t0;
    let mut dirty_since: Option<Instant> = None;
    let mut clean_tick = t0;
    for _ in 0..200_000 {
        now += Duration::from_millis(1 + rnd(1000));
        if dirty_since.is_none() && rnd(10) == 0 {
            dirty_since = Some(now);
        }
        let wake = if rnd(50) == 0 { Wake::Kick } else { Wake::Tick };
        let new = dirty_since.is_some();
        if s.due(now, wake, new) {
            if let (Some(_), Wake::Tick) = (dirty_since, wake) {
                let age = now - clean_tick;
                assert!(
                    age >= EVERY && age < EVERY + Duration::from_secs(1),
                    "{age:?}"
                );
            }
            s.ran(now);
            dirty_since = None;
            clean_tick = now;
        } else if let Some(d) = dirty_since {
            assert!(
                now - d < EVERY + Duration::from_secs(1),
                "a change waited too long"
            );
        } else {
            clean_tick = now;
        }
    }
}
