//! Positioned reads into fresh or reused buffers without zero-filling them first, and a non-blocking
//! variant (`RWF_NOWAIT`) that is served straight from the page cache or not at all.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// How a read into a buffer's spare capacity ended.
enum Step {
    Read(usize),
    WouldBlock,
}

fn pread_step(
    file: &File,
    buf: &mut Vec<u8>,
    offset: u64,
    len: usize,
    flags: i32,
) -> io::Result<Step> {
    let done = buf.len();
    let want = len - done;
    let pos = offset
        .checked_add(done as u64)
        .and_then(|p| i64::try_from(p).ok())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    debug_assert!(buf.capacity() >= len);
    let iov = libc::iovec {
        // SAFETY: `done <= len <= capacity`, so the pointer stays inside the allocation.
        iov_base: unsafe { buf.as_mut_ptr().add(done) }.cast(),
        iov_len: want,
    };
    loop {
        // SAFETY: the iovec points at `want` bytes of the buffer's spare capacity, which the
        // kernel writes; the descriptor is open for the duration of the call.
        let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, pos, flags) };
        if r >= 0 {
            let n = r as usize;
            // SAFETY: the kernel initialised `n <= want` bytes after the current length.
            unsafe { buf.set_len(done + n) };
            return Ok(Step::Read(n));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) if flags != 0 => {
                return Ok(Step::WouldBlock)
            }
            _ => return Err(e),
        }
    }
}

fn short_read(offset: u64, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("image ended inside the read of {len} bytes at {offset}"),
    )
}

/// Reads exactly `len` bytes at `offset` (blocking).
pub fn pread_exact(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    pread_into(file, &mut buf, offset, len)?;
    Ok(buf)
}

/// Reads exactly `len` bytes at `offset` (blocking) into `buf`, replacing its contents and
/// reusing its allocation when it has room (its old bytes are never visible: the length is
/// reset first and grows only by what the kernel wrote).
pub fn pread_into(file: &File, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<()> {
    buf.clear();
    buf.reserve_exact(len);
    while buf.len() < len {
        match pread_step(file, buf, offset, len, 0)? {
            Step::Read(0) => return Err(short_read(offset, len)),
            Step::Read(_) => {}
            Step::WouldBlock => unreachable!("blocking read reported EAGAIN"),
        }
    }
    Ok(())
}

/// Reads exactly `len` bytes at `offset` if they are all in the page cache; `None` if the read
/// would block (or the kernel does not support `RWF_NOWAIT` here).
pub fn pread_nowait(file: &File, offset: u64, len: usize) -> Option<io::Result<Vec<u8>>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        match pread_step(file, &mut buf, offset, len, libc::RWF_NOWAIT) {
            Ok(Step::Read(0)) => return Some(Err(short_read(offset, len))),
            Ok(Step::Read(_)) => {}
            Ok(Step::WouldBlock) => return None,
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(buf))
}

/// Bytes available to unprivileged users on the file system holding `path` (`statvfs`).
pub fn free_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `libc::statvfs` is plain integers, for which all-zero bytes are valid.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs with a valid NUL-terminated path and a zeroed out-struct.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_match_file_contents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(pread_exact(&f, 10, 5000).unwrap(), data[10..5010]);
        // Just written, so cached: the non-blocking read succeeds.
        if let Some(r) = pread_nowait(&f, 4096, 8192) {
            assert_eq!(r.unwrap(), data[4096..4096 + 8192]);
        }
        assert_eq!(
            pread_exact(&f, 99_990, 20).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(pread_exact(&f, 0, 0).unwrap(), Vec::<u8>::new());
    }
}
