//! The storage side of an export: what the protocol needs from a block device.

use std::future::Future;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

pub use crate::direct::FlushReply;

/// What a device can do; turned into NBD transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFlags {
    /// Every completed write (acknowledged on any connection) is made durable by a flush on any
    /// connection. Only then may the server advertise `NBD_FLAG_CAN_MULTI_CONN`.
    pub flush_covers_all_connections: bool,
    /// The device supports trim (punching holes).
    pub trim: bool,
    /// `write_zeroes` with `fast_only` can succeed (e.g. hole punching or fallocate zero-range).
    pub fast_zero: bool,
    /// `block_status` reports real allocation; otherwise everything is reported as data.
    pub block_status: bool,
    /// Spinning media (a hint to clients' elevators).
    pub rotational: bool,
}

impl Default for DeviceFlags {
    fn default() -> Self {
        Self {
            flush_covers_all_connections: true,
            trim: true,
            fast_zero: true,
            block_status: true,
            rotational: false,
        }
    }
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// Flags for `write_zeroes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The client allows the range to be deallocated (NBD_CMD_FLAG_NO_HOLE was *not* set).
    pub may_trim: bool,
    /// Fail with `Unsupported` instead of writing zeroes slowly (NBD_CMD_FLAG_FAST_ZERO).
    pub fast_only: bool,
    /// Force unit access: durable before the reply.
    pub fua: bool,
}

/// One run of the device with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated (reads as zero unless `zero` is false — for us holes always read as zero).
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// A block device behind an export. Offsets and lengths are validated by the server before a
/// method is called: `offset + len <= size()` always holds, and writes never reach a read-only
/// export.
///
/// Errors are plain `io::Error`s; the server maps them to NBD error numbers
/// (`ENOSPC`/`EDQUOT`/`EFBIG` → `NBD_ENOSPC`, `EPERM`/`EROFS` → `NBD_EPERM`,
/// `Unsupported` → `NBD_ENOTSUP`, `InvalidInput` → `NBD_EINVAL`, others → `NBD_EIO`).
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Capabilities.
    fn flags(&self) -> DeviceFlags {
        DeviceFlags::default()
    }

    /// Block size constraints.
    fn block_size(&self) -> BlockSize {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: crate::proto::MAX_PAYLOAD,
        }
    }

    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = io::Result<Vec<u8>>> + Send;

    /// A read that completes at once without blocking (e.g. served from the page cache with
    /// `RWF_NOWAIT`), or `None` to take the asynchronous [`BlockDevice::read`] path. The server
    /// calls it inline on the connection's task, so it must never block.
    fn read_now(&self, _offset: u64, _len: usize) -> Option<io::Result<Vec<u8>>> {
        None
    }

    /// The bytes of a read as a range of memory the device keeps mapped (e.g. its image file,
    /// `mmap`ed), or `None` to take [`BlockDevice::read_now`] / [`BlockDevice::read`]. The
    /// server hands the range to the kernel in the socket write, so the data goes from the
    /// page cache into the socket in one copy. It never reads the bytes itself, so it only
    /// asks on connections whose socket the kernel writes directly (not TLS). The bytes are
    /// those of the device when the reply is written, so only offer ranges that are in memory
    /// (the write must not wait for the disk) and whose structure the reply does not depend on.
    fn read_mapped(&self, _offset: u64, _len: usize) -> Option<MappedRead> {
        None
    }

    /// A write that completes at once on the caller's thread (e.g. a buffered `pwrite` into
    /// the page cache), or `None` to take the asynchronous [`BlockDevice::write`] path. The
    /// server calls it inline on the connection's task, so it must not wait for the disk
    /// (no FUA, no sync) and should be short.
    fn write_now(&self, _offset: u64, _data: &[u8], _fua: bool) -> Option<io::Result<()>> {
        None
    }

    /// Writes `data` at `offset`; with `fua` it is durable before this returns.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes every write that completed before this call durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Runs a flush on a thread of the device's own and answers it from there: the device
    /// makes every write that completed before this call durable, then calls
    /// [`FlushReply::send`] with the result, from that thread. On a plain socket the reply
    /// is written straight to the socket, so answering costs no wake-up of the runtime.
    /// Returns the reply back (`Some`) to decline: the server then awaits
    /// [`BlockDevice::flush`]. Called on the connection's task, so it must not block (e.g.
    /// it only queues the reply for the device's thread).
    fn flush_detached(&self, reply: FlushReply) -> Option<FlushReply> {
        Some(reply)
    }

    /// Discards a range (it may read back as zeroes afterwards, or keep old data).
    fn trim(&self, offset: u64, len: u64, fua: bool)
        -> impl Future<Output = io::Result<()>> + Send;

    /// Makes a range read as zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Allocation state of `[offset, offset+len)`; may cover less than `len`, never more, and
    /// must return at least one non-empty extent.
    fn block_status(
        &self,
        _offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<Extent>>> + Send {
        async move {
            Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }])
        }
    }

    /// Hints that a range will be read soon.
    fn cache(&self, _offset: u64, _len: u64) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }
}

/// A range of memory a device keeps mapped, sent to a socket by the kernel without the server
/// reading it (see [`BlockDevice::read_mapped`]).
///
/// The memory is shared: other writers of the mapped file change it at any time, and a
/// truncation of the file can take its pages away. So it is never a Rust reference (`&[u8]`
/// asserts that nothing changes the bytes while it lives, and reading a truncated page raises
/// `SIGBUS`): the range stays a raw pointer and a length, handed to the kernel as an `iovec`
/// ([`MappedRead::io_slice`], [`MappedRead::raw_parts`]). If the file shrank, the kernel's
/// copy fails with `EFAULT` and the connection is closed.
pub struct MappedRead {
    ptr: NonNull<u8>,
    len: usize,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: `MappedRead` holds a pointer into a mapping that `_owner` (itself `Send + Sync`)
// keeps alive, and gives no access to the bytes from Rust (no method returns a reference to
// them), so moving it to another thread moves only an address and a length.
unsafe impl Send for MappedRead {}
// SAFETY: as above: `&MappedRead` exposes the address and length only.
unsafe impl Sync for MappedRead {}

/// The layout of a Unix `struct iovec` (base pointer, then length), which [`io::IoSlice`]
/// is documented to be ABI-compatible with on Unix platforms.
#[repr(C)]
struct RawIoVec {
    base: *const u8,
    len: usize,
}

impl MappedRead {
    /// A range of `len` bytes at `ptr`, kept mapped while `owner` lives.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be one readable mapping that stays mapped (not unmapped or
    /// remapped) as long as `owner` or any clone of it is alive.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize, owner: Arc<dyn Send + Sync>) -> Self {
        Self {
            ptr,
            len,
            _owner: owner,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address and length of the bytes from `from` on, for a system call that copies them.
    pub fn raw_parts(&self, from: usize) -> (*const u8, usize) {
        assert!(from <= self.len, "offset past the end of a mapped read");
        (self.ptr.as_ptr().wrapping_add(from), self.len - from)
    }

    /// The bytes from `from` on as an `iovec` for `writev` on a socket the kernel writes.
    ///
    /// The `IoSlice` is built from the raw address and length, without a `&[u8]` over the
    /// shared memory. Hand it only to a vectored write that passes it to the kernel
    /// (`writev` on a plain socket or pipe): dereferencing it (`IoSlice` derefs to `[u8]`, as
    /// a user-space TLS writer would) would read shared memory in user space.
    pub fn io_slice(&self, from: usize) -> io::IoSlice<'_> {
        let (base, len) = self.raw_parts(from);
        let iov = RawIoVec { base, len };
        // SAFETY: `io::IoSlice` is documented as ABI-compatible with `struct iovec` on Unix,
        // which `RawIoVec` lays out (`#[repr(C)]`: base pointer, then length; `transmute`
        // checks the sizes agree). The range is one mapping kept alive by `_owner` for as
        // long as `self`, which the returned lifetime borrows (the contract of `new`).
        unsafe { std::mem::transmute::<RawIoVec, io::IoSlice<'_>>(iov) }
    }
}

impl std::fmt::Debug for MappedRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRead")
            .field("len", &self.len)
            .finish()
    }
}

/// Maps an I/O error from a device to an NBD error number.
pub fn nbd_errno(e: &io::Error) -> u32 {
    use crate::proto::*;
    if let Some(code) = e.raw_os_error() {
        return match code {
            libc_codes::EPERM | libc_codes::EROFS | libc_codes::EACCES => EPERM,
            libc_codes::ENOSPC | libc_codes::EDQUOT | libc_codes::EFBIG => ENOSPC,
            libc_codes::EINVAL => EINVAL,
            libc_codes::ENOMEM => ENOMEM,
            libc_codes::EOPNOTSUPP => ENOTSUP,
            libc_codes::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        };
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => EPERM,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            ENOSPC
        }
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::OutOfMemory => ENOMEM,
        io::ErrorKind::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

/// Linux errno values (the server is Linux-only; avoids a libc dependency).
mod libc_codes {
    pub const EPERM: i32 = 1;
    pub const EACCES: i32 = 13;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

#[cfg(test)]
mod mapped_read_tests {
    use std::io::{Read, Write};
    use std::ptr::NonNull;
    use std::sync::Arc;

    use super::MappedRead;

    /// The `IoSlice` built from the raw address and length is the `iovec` the kernel
    /// expects: `writev` on a socket sends exactly the range from `from` on.
    #[test]
    fn io_slice_is_the_range_for_writev() {
        let owner: Arc<Vec<u8>> = Arc::new((0..=255u8).cycle().take(10_000).collect());
        let ptr = NonNull::new(owner.as_ptr().cast_mut()).unwrap();
        // SAFETY: `ptr..ptr + len` is the Vec's buffer, kept alive (never reallocated) by
        // the `Arc` handed over as the owner.
        let m = unsafe { MappedRead::new(ptr, owner.len(), owner.clone()) };
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let n = a.write_vectored(&[m.io_slice(1234)]).unwrap();
        assert_eq!(n, 10_000 - 1234);
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, owner[1234..]);
        assert_eq!(m.raw_parts(10_000).1, 0);
    }
}
