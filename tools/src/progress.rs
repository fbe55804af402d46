//! Progress of long-running commands (`store import/export/verify/gc`, `failover commit`).
//! A figure may carry a message (e.g. `1200 of 5000 chunks`), shown after the bar and in the
//! plain lines.
//!
//! On a terminal (stderr is a TTY) an indicatif bar — or a spinner when the total is not
//! known — redrawn in place. Otherwise (logs, pipes, CI) plain lines on stderr, one when the
//! work starts, then at most one every [`LINE_EVERY`] while the figure moves, and one at the
//! end: a script's captured output stays short and greppable, and stdout stays the command's
//! result alone.
//!
//! Cheap to update: callers may report every chunk; the plain mode only formats a line when
//! one is due.
//!
//! Work done by a library that reports no progress (the store's import, export, gc) is
//! measured from outside: [`sample`] reads this process's I/O counters ([`proc_io`]: bytes read
//! or written through system calls, from `/proc/self/io`) every 200 ms on a thread of its own.
//! That counts the image read by an import and the image written by an export closely (plus a
//! little metadata); for gc it is shown as bytes read so far, without a total. `store verify`
//! reports its own counters (points, chunks, bytes of their totals), shown as a percent with a
//! message ([`Progress::set_percent_with`]).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Plain mode: a line at most this often.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// What the figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Percent,
    Bytes,
}

/// One command's progress; see the module documentation.
pub struct Progress {
    label: String,
    unit: Unit,
    bar: Option<ProgressBar>,
    /// Plain mode: when the last line was printed, and the figure it showed.
    plain: Mutex<(Instant, u64)>,
    total: Mutex<Option<u64>>,
    pos: Mutex<u64>,
    msg: Mutex<String>,
}

impl Progress {
    fn new(label: &str, unit: Unit, total: Option<u64>, tty: bool) -> Self {
        let bar = tty.then(|| {
            let template = match (unit, total) {
                (Unit::Percent, _) => "{prefix} [{bar:40}] {pos:>3}% {elapsed} {msg}",
                (Unit::Bytes, Some(_)) => {
                    "{prefix} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}"
                }
                (Unit::Bytes, None) => "{prefix} {spinner} {bytes} {bytes_per_sec} {msg}",
            };
            let b = match (unit, total) {
                (Unit::Percent, _) => ProgressBar::new(100),
                (_, Some(t)) => ProgressBar::new(t),
                (_, None) => ProgressBar::new_spinner(),
            };
            // A template is a constant above: it parses, or the bar keeps indicatif's default.
            if let Ok(style) = ProgressStyle::with_template(template) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_draw_target(ProgressDrawTarget::stderr());
            b.set_prefix(label.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        let p = Self {
            label: label.to_string(),
            unit,
            bar,
            plain: Mutex::new((Instant::now(), 0)),
            total: Mutex::new(total),
            pos: Mutex::new(0),
            msg: Mutex::new(String::new()),
        };
        if p.bar.is_none() {
            eprintln!("{}: started", p.label);
        }
        p
    }

    fn tty() -> bool {
        std::io::stderr().is_terminal()
    }

    /// A figure from 0 to 100.
    pub fn percent(label: &str) -> Self {
        Self::new(label, Unit::Percent, None, Self::tty())
    }

    /// Bytes, out of `total` when known.
    pub fn bytes(label: &str, total: Option<u64>) -> Self {
        Self::new(label, Unit::Bytes, total, Self::tty())
    }

    pub fn set_percent(&self, pct: f64) {
        self.set(pct.clamp(0.0, 100.0) as u64);
    }

    /// A percent with a message that says what it counts; a plain line is due when either
    /// moved.
    pub fn set_percent_with(&self, pct: f64, msg: &str) {
        let moved = {
            let mut m = lock(&self.msg);
            let moved = *m != msg;
            if moved {
                *m = msg.to_string();
            }
            moved
        };
        if let Some(b) = &self.bar {
            if moved {
                b.set_message(msg.to_string());
            }
        } else if moved {
            // Let the figure's test below see a change even when the percent did not move.
            lock(&self.plain).1 = u64::MAX;
        }
        self.set_percent(pct);
    }

    /// Sets the figure (at most the total, when known: sampled counters overshoot a little).
    pub fn set(&self, pos: u64) {
        let pos = lock(&self.total).map_or(pos, |t| pos.min(t));
        *lock(&self.pos) = pos;
        if let Some(b) = &self.bar {
            b.set_position(pos);
            return;
        }
        let mut last = lock(&self.plain);
        if last.0.elapsed() >= LINE_EVERY && last.1 != pos {
            *last = (Instant::now(), pos);
            eprintln!("{}: {}", self.label, self.figure_msg(pos));
        }
    }

    fn figure_msg(&self, pos: u64) -> String {
        let msg = lock(&self.msg);
        if msg.is_empty() {
            self.figure(pos)
        } else {
            format!("{} {msg}", self.figure(pos))
        }
    }

    fn figure(&self, pos: u64) -> String {
        let total = *lock(&self.total);
        match (self.unit, total) {
            (Unit::Percent, _) => format!("{pos}%"),
            (Unit::Bytes, Some(t)) => format!(
                "{} of {} ({:.0}%)",
                crate::cmd_store::human(pos),
                crate::cmd_store::human(t),
                pos as f64 * 100.0 / t.max(1) as f64
            ),
            (Unit::Bytes, None) => crate::cmd_store::human(pos),
        }
    }

    /// The work is done: clears the bar (the command prints its result), or prints the last
    /// plain line.
    pub fn finish(&self) {
        match &self.bar {
            Some(b) => b.finish_and_clear(),
            None => {
                let pos = *lock(&self.pos);
                eprintln!("{}: finished ({})", self.label, self.figure_msg(pos));
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // On an error path the bar must not stay drawn over the error message.
        if let Some(b) = &self.bar {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}

/// A counter of `/proc/self/io` (`rchar`: bytes read, `wchar`: bytes written, by any system
/// call of this process); `None` where it cannot be read.
pub fn proc_io(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// Samples `field` of [`proc_io`] into `p` (as the growth since now) every 200 ms until the
/// returned guard is dropped.
pub fn sample(p: Arc<Progress>, field: &'static str) -> Sampler {
    let stop = Arc::new(AtomicBool::new(false));
    let base = proc_io(field);
    let flag = Arc::clone(&stop);
    let last = base.map(|base| (Arc::clone(&p), base, field));
    let thread = base.map(|base| {
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if let Some(v) = proc_io(field) {
                    p.set(v.saturating_sub(base));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    });
    Sampler { stop, thread, last }
}

/// Runs `work` with a byte progress display (out of `total` when known) sampled from the
/// [`proc_io`] counter `field`.
pub async fn around<T>(
    label: &str,
    total: Option<u64>,
    field: &'static str,
    work: impl std::future::Future<Output = T>,
) -> T {
    let p = Arc::new(Progress::bytes(label, total));
    let s = sample(Arc::clone(&p), field);
    let r = work.await;
    drop(s);
    p.finish();
    r
}

/// Stops its sampling thread when dropped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// For the last sample, taken when the work is over.
    last: Option<(Arc<Progress>, u64, &'static str)>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some((p, base, field)) = &self.last {
            if let Some(v) = proc_io(field) {
                p.set(v.saturating_sub(*base));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_figures() {
        let p = Progress::new("x", Unit::Bytes, Some(4096), false);
        p.set(1024);
        assert_eq!(
            p.figure(1024),
            format!(
                "{} of {} (25%)",
                crate::cmd_store::human(1024),
                crate::cmd_store::human(4096)
            )
        );
        let p = Progress::new("x", Unit::Percent, None, false);
        p.set_percent(140.0);
        assert_eq!(*lock(&p.pos), 100);
        assert_eq!(p.figure(42), "42%");
        p.set_percent_with(50.0, "10 of 20 chunks");
        assert_eq!(p.figure_msg(50), "50% 10 of 20 chunks");
    }

    #[test]
    fn io_counters_grow_with_reads() {
        let before = proc_io("rchar").expect("/proc/self/io");
        let data = std::fs::read("/proc/self/stat").expect("read");
        assert!(!data.is_empty());
        assert!(proc_io("rchar").expect("rchar") > before);
        let p = Arc::new(Progress::new("t", Unit::Bytes, None, false));
        let s = sample(Arc::clone(&p), "rchar");
        let _ = std::fs::read("/proc/self/stat");
        std::thread::sleep(Duration::from_millis(450));
        drop(s);
        assert!(*lock(&p.pos) > 0, "sampled");
    }
}
