//! Reused buffers for the bytes a cut reads back from the image (extent records, see
//! [`super::extent::ExtentMap::data_of`]).
//!
//! **Why.** A cut holds its interval's data until the store has it, then drops it all at
//! once. Allocated afresh every cut, those buffers come from memory the allocator returned to
//! the system after the previous cut, so every byte shipped first costs a page fault and the
//! kernel zeroing the page — only for the read to overwrite it. Buffers dropped here go back to
//! a pool (up to [`IDLE_CAP`] bytes of them) and the next cut's reads reuse them.
//!
//! **Design.** [`BufPool::read`] hands out a buffer as [`Bytes`] whose owner puts the buffer
//! back when the last reference (the patch, a chunk slice, a staged object) is dropped, so
//! the patch and the chunk writer take the bytes without copying them and nothing has to
//! remember to give them back. Sizes are pooled by power-of-two class from [`MIN_CLASS`] to
//! [`MAX_CLASS`]; larger reads are plain allocations.
//!
//! Invariants: a buffer is either in the pool or owned by exactly one [`Bytes`] owner; the
//! pool holds at most [`IDLE_CAP`] bytes of capacity; a reused buffer's old contents are
//! never visible (a read fills it from its start, or the buffer is dropped on error).

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

/// Smallest pooled size class (the default extent threshold: smaller writes are in the log).
pub const MIN_CLASS: usize = 64 << 10;
/// Largest pooled size class.
pub const MAX_CLASS: usize = 4 << 20;
/// Most bytes of idle buffers the shared pool keeps (what it may hold beyond a cut's data).
pub const IDLE_CAP: usize = 32 << 20;

const CLASSES: usize = (MAX_CLASS / MIN_CLASS).trailing_zeros() as usize + 1;

/// A bounded pool of read buffers (see the module documentation).
#[derive(Debug)]
pub struct BufPool {
    cap: usize,
    inner: Mutex<Idle>,
}

#[derive(Debug, Default)]
struct Idle {
    free: [Vec<Vec<u8>>; CLASSES],
    bytes: usize,
}

/// Size class of a read of `len` bytes, if pooled.
fn class_of(len: usize) -> Option<usize> {
    if len > MAX_CLASS {
        return None;
    }
    let c = len.max(MIN_CLASS).next_power_of_two();
    Some((c / MIN_CLASS).trailing_zeros() as usize)
}

/// The buffer behind pooled [`Bytes`]; goes back to its pool when dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

impl BufPool {
    /// An empty pool keeping at most `cap` bytes of idle buffers.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(BufPool {
            cap,
            inner: Mutex::default(),
        })
    }

    /// The pool the change logs' shippers share.
    pub fn shared() -> &'static Arc<BufPool> {
        static POOL: OnceLock<Arc<BufPool>> = OnceLock::new();
        POOL.get_or_init(|| BufPool::new(IDLE_CAP))
    }

    /// Bytes of idle buffers held now.
    pub fn idle_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty buffer with room for `len` bytes: an idle one of its class, or a new one.
    fn take(&self, len: usize) -> Vec<u8> {
        let Some(c) = class_of(len) else {
            return Vec::with_capacity(len);
        };
        let reused = {
            let mut idle = self.lock();
            let b = idle.free[c].pop();
            if let Some(b) = &b {
                idle.bytes -= b.capacity();
            }
            b
        };
        match reused {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(MIN_CLASS << c),
        }
    }

    fn put(&self, buf: Vec<u8>) {
        let Some(c) = class_of(buf.capacity()) else {
            return;
        };
        // Only exact class sizes come back (those `take` made).
        if buf.capacity() != MIN_CLASS << c {
            return;
        }
        let mut idle = self.lock();
        if idle.bytes + buf.capacity() <= self.cap {
            idle.bytes += buf.capacity();
            idle.free[c].push(buf);
        }
    }

    /// `len` bytes filled by `fill` (given an empty buffer with room for them, it must leave
    /// exactly `len` bytes in it) as [`Bytes`] that return the buffer here when dropped.
    pub fn read(
        self: &Arc<Self>,
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
    ) -> io::Result<Bytes> {
        let mut buf = self.take(len);
        fill(&mut buf)?;
        if buf.len() != len {
            return Err(io::Error::other(format!(
                "a read of {len} bytes returned {}",
                buf.len()
            )));
        }
        Ok(Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(n: usize, v: u8) -> impl FnOnce(&mut Vec<u8>) -> io::Result<()> {
        move |b: &mut Vec<u8>| {
            assert!(b.is_empty() && b.capacity() >= n);
            b.resize(n, v);
            Ok(())
        }
    }

    #[test]
    fn dropped_buffers_are_reused_within_the_cap() {
        let pool = BufPool::new(3 * MIN_CLASS);
        let a = pool.read(MIN_CLASS, fill(MIN_CLASS, 1)).unwrap();
        let pa = a.as_ptr();
        // A slice keeps the buffer out of the pool until it is dropped too.
        let s = a.slice(10..20);
        drop(a);
        assert_eq!(pool.idle_bytes(), 0);
        drop(s);
        assert_eq!(pool.idle_bytes(), MIN_CLASS);
        let b = pool.read(1000, fill(1000, 2)).unwrap();
        assert_eq!(b.as_ptr(), pa, "the idle buffer of the class was reused");
        assert_eq!(&b[..], &[2u8; 1000][..], "no old byte shows");
        assert_eq!(pool.idle_bytes(), 0);
        // The cap: of four buffers dropped, three fit.
        let four: Vec<Bytes> = (0..4)
            .map(|i| pool.read(MIN_CLASS, fill(MIN_CLASS, i)).unwrap())
            .collect();
        drop(four);
        assert_eq!(pool.idle_bytes(), 3 * MIN_CLASS);
        // Classes are separate; reads past the largest class are not pooled.
        let big = pool.read(MIN_CLASS + 1, fill(MIN_CLASS + 1, 3)).unwrap();
        assert_eq!(pool.idle_bytes(), 3 * MIN_CLASS);
        drop(big);
        let huge = pool.read(MAX_CLASS + 1, fill(MAX_CLASS + 1, 4)).unwrap();
        drop(huge);
        assert!(pool.idle_bytes() <= 3 * MIN_CLASS);
    }

    #[test]
    fn a_failed_or_short_fill_is_an_error() {
        let pool = BufPool::new(IDLE_CAP);
        assert!(pool
            .read(100, |_| Err(io::Error::other("disk gone")))
            .is_err());
        assert!(pool.read(100, fill(99, 0)).is_err());
    }
}
