//! The FUSE request handlers.
//!
//! Metadata requests (lookup, getattr, readdir) are answered on the session thread from the
//! immutable [`Tree`]. Data requests (read, write, fsync, fallocate, lseek) are spawned as tasks
//! on the tokio runtime and answered when the [`Disk`] call completes, so any number of them
//! can be in flight at once (qemu and loop devices issue parallel I/O); no lock is held across
//! I/O.
//!
//! Files are opened with `FOPEN_DIRECT_IO` and without `FOPEN_KEEP_CACHE`: the kernel keeps no
//! page cache for them, so a read through the mount always sees what an NBD client (or another
//! process) wrote through the same disk, and a write is in the gateway as soon as it returns.
//!
//! Longer than most files (~790 lines): one `fuser::Filesystem` implementation, whose methods
//! must sit in one `impl` block; the helpers they share are the first ~240 lines.

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use nbd_server::ZeroFlags;
use tokio::runtime::Handle;
use tracing::{debug, warn};

use super::tree::{LiveDisk, Node, NodeKind, ReplicaFile, Tree};
use crate::disk::Disk;

/// How long the kernel may cache names and attributes (disks never change size while mounted).
const TTL: Duration = Duration::from_secs(1);
/// Largest read or write request the kernel sends.
pub const MAX_IO: u32 = 1 << 20;
/// Block size reported by `stat` (`st_blksize`).
pub const BLOCK_SIZE: u32 = 4096;

/// The file system served by a session.
pub struct StandbyFs {
    tree: Arc<Tree>,
    rt: Handle,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
}

impl StandbyFs {
    pub fn new(tree: Arc<Tree>, rt: Handle) -> Self {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self {
            tree,
            rt,
            uid,
            gid,
            mounted_at: SystemTime::now(),
        }
    }

    fn attr(&self, node: &Node) -> FileAttr {
        let mut a = FileAttr {
            ino: INodeNo(node.ino),
            size: 0,
            blocks: 0,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::Directory,
            // Owner only, as the data directory itself (the CLI runs with umask 077): with
            // `--allow-other` the kernel's permission check (default_permissions) still
            // keeps other users out; root and the gateway's own user get in.
            perm: 0o700,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        };
        match &node.kind {
            NodeKind::Dir { children } => {
                a.nlink = 2 + children.len() as u32;
            }
            NodeKind::LiveDisk(l) => {
                let size = l.disk.size();
                a.kind = FileType::RegularFile;
                a.perm = if l.disk.read_only() { 0o400 } else { 0o600 };
                a.nlink = 1;
                a.size = size;
                // Allocated blocks and times of the image when it is a regular file; a block
                // device (or an unreadable image) counts as fully allocated.
                a.blocks = size.div_ceil(512);
                if let Ok(m) = std::fs::metadata(l.disk.path()) {
                    if m.is_file() {
                        a.blocks = m.blocks();
                        a.mtime = time(m.mtime(), m.mtime_nsec());
                        a.ctime = time(m.ctime(), m.ctime_nsec());
                        a.atime = time(m.atime(), m.atime_nsec());
                    }
                }
            }
            NodeKind::Replica(r) => {
                a.kind = FileType::RegularFile;
                a.perm = 0o400;
                a.nlink = 1;
                a.size = r.size;
                a.blocks = r.size.div_ceil(512);
                let t = UNIX_EPOCH + Duration::from_millis(r.point.created_unix_ms);
                (a.mtime, a.ctime, a.atime) = (t, t, t);
            }
        }
        a
    }

    fn node(&self, ino: INodeNo) -> Result<&Node, Errno> {
        self.tree.get(ino.0).ok_or(Errno::ENOENT)
    }

    /// The live disk behind `ino`, or the errno for a directory / unknown inode.
    fn live(&self, ino: INodeNo) -> Result<&LiveDisk, Errno> {
        match &self.node(ino)?.kind {
            NodeKind::LiveDisk(l) => Ok(l),
            NodeKind::Dir { .. } => Err(Errno::EISDIR),
            NodeKind::Replica(_) => Err(Errno::EROFS),
        }
    }

    /// A shared handle on the live disk behind `ino`, for a spawned task.
    fn live_arc(&self, ino: INodeNo) -> Result<(Arc<Tree>, u64), Errno> {
        self.live(ino)?;
        Ok((Arc::clone(&self.tree), ino.0))
    }

    /// The tree, when `ino` is a replica file.
    fn replica_arc(&self, ino: INodeNo) -> Option<Arc<Tree>> {
        replica_of(&self.tree, ino.0).map(|_| Arc::clone(&self.tree))
    }
}

fn time(secs: i64, nsec: i64) -> SystemTime {
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(
            secs as u64,
            nsec.clamp(0, 999_999_999) as u32,
        ))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    t.unwrap_or(UNIX_EPOCH)
}

/// The errno for a failed disk operation.
fn errno(e: &io::Error) -> Errno {
    if let Some(code) = e.raw_os_error() {
        return Errno::from_i32(code);
    }
    match e.kind() {
        io::ErrorKind::InvalidInput => Errno::EINVAL,
        io::ErrorKind::PermissionDenied => Errno::EROFS,
        io::ErrorKind::Unsupported => Errno::EOPNOTSUPP,
        io::ErrorKind::UnexpectedEof => Errno::EIO,
        _ => Errno::EIO,
    }
}

/// Runs `f` on the live disk `ino` in a task; the task owns the tree, so no borrow outlives
/// the request.
/// Flushes a disk whose dirty flag the caller has just cleared; on failure the flag is set
/// again (so a later close or fsync retries) and the error is logged and returned.
async fn flush_live(l: &LiveDisk, what: &str) -> Result<(), Errno> {
    l.disk.flush().await.map_err(|e| {
        l.dirty.store(true, Ordering::Release);
        warn!(disk = l.disk.name(), "{what} failed: {e}");
        errno(&e)
    })
}

fn replica_of(tree: &Tree, ino: u64) -> Option<&ReplicaFile> {
    match &tree.get(ino)?.kind {
        NodeKind::Replica(r) => Some(r),
        _ => None,
    }
}

fn live_of(tree: &Tree, ino: u64) -> Option<&LiveDisk> {
    match &tree.get(ino)?.kind {
        NodeKind::LiveDisk(l) => Some(l),
        _ => None,
    }
}

/// `[offset, offset+len)` checked against a disk of `size` bytes: writes never grow a disk.
fn check_write_range(disk: &Disk, offset: u64, len: u64) -> Result<(), Errno> {
    if disk.read_only() {
        return Err(Errno::EROFS);
    }
    match offset.checked_add(len) {
        Some(end) if end <= disk.size() => Ok(()),
        _ => {
            warn!(
                disk = disk.name(),
                offset,
                len,
                size = disk.size(),
                "write past the end of the disk refused (disks do not grow)"
            );
            Err(Errno::EFBIG)
        }
    }
}

async fn seek(disk: &Disk, offset: u64, want_data: bool) -> io::Result<Option<u64>> {
    let size = disk.size();
    if offset >= size {
        return Ok(None);
    }
    let mut pos = offset;
    while pos < size {
        let extents = disk.extents(pos, size - pos).await?;
        if extents.is_empty() {
            break;
        }
        for e in extents {
            if e.hole != want_data {
                return Ok(Some(pos));
            }
            pos += e.length;
        }
    }
    // No data after `offset`; the end of the file is a hole.
    Ok(if want_data { None } else { Some(size) })
}

impl fuser::Filesystem for StandbyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let caps = config.capabilities();
        // Parallel pieces of one large O_DIRECT request, and mmap of direct-I/O files.
        for want in [
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            if caps.contains(want) {
                let _ = config.add_capabilities(want);
            }
        }
        debug!(?caps, "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = name.to_str().and_then(|n| self.tree.lookup(parent.0, n));
        match found {
            Some(node) => reply.entry(&TTL, &self.attr(node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(node) => reply.attr(&TTL, &self.attr(node)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        if let Some(size) = size {
            match &node.kind {
                NodeKind::LiveDisk(l) if size == l.disk.size() => {}
                NodeKind::LiveDisk(l) => {
                    warn!(
                        disk = l.disk.name(),
                        size,
                        disk_size = l.disk.size(),
                        "truncate refused: disks keep their size"
                    );
                    return reply.error(Errno::EPERM);
                }
                NodeKind::Dir { .. } => return reply.error(Errno::EISDIR),
                NodeKind::Replica(_) => return reply.error(Errno::EROFS),
            }
        }
        // Time changes are accepted and ignored (the times shown are the image's).
        reply.attr(&TTL, &self.attr(node));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writing = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        if let Ok(Node {
            kind: NodeKind::Replica(_),
            ..
        }) = self.node(ino)
        {
            if writing {
                return reply.error(Errno::EROFS);
            }
            // Recovery points never change: the kernel may cache their pages.
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
        let l = match self.live(ino) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let writing = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        if writing && l.disk.read_only() {
            return reply.error(Errno::EROFS);
        }
        // Direct I/O: no page cache in the kernel, so every read and write reaches the disk
        // and NBD writers and this mount always agree.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Some(tree) = self.replica_arc(ino) {
            let ino = ino.0;
            self.rt.spawn(async move {
                let Some(r) = replica_of(&tree, ino) else {
                    return reply.error(Errno::ENOENT);
                };
                if offset >= r.size || size == 0 {
                    return reply.data(&[]);
                }
                let len = u64::from(size).min(r.size - offset) as usize;
                let res = match r.disk().await {
                    Ok(d) => d.read(offset, len).await,
                    Err(e) => Err(e),
                };
                match res {
                    Ok(buf) => reply.data(&buf),
                    Err(e) => {
                        warn!(replica = ?r, offset, len, "read failed: {e}");
                        reply.error(Errno::EIO)
                    }
                }
            });
            return;
        }
        let (tree, ino) = match self.live_arc(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        self.rt.spawn(async move {
            let Some(l) = live_of(&tree, ino) else {
                return reply.error(Errno::ENOENT);
            };
            let disk_size = l.disk.size();
            if offset >= disk_size || size == 0 {
                return reply.data(&[]);
            }
            let len = u64::from(size).min(disk_size - offset) as usize;
            match l.disk.read(offset, len).await {
                Ok(buf) => reply.data(&buf),
                Err(e) => {
                    warn!(disk = l.disk.name(), offset, len, "read failed: {e}");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (tree, ino) = match self.live_arc(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let l = match live_of(&tree, ino) {
            Some(l) => l,
            None => return reply.error(Errno::ENOENT),
        };
        if let Err(e) = check_write_range(&l.disk, offset, data.len() as u64) {
            return reply.error(e);
        }
        let Ok(written) = u32::try_from(data.len()) else {
            return reply.error(Errno::EINVAL);
        };
        // O_SYNC / O_DSYNC files: every write is durable when it returns.
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let data = data.to_vec();
        self.rt.spawn(async move {
            let Some(l) = live_of(&tree, ino) else {
                return reply.error(Errno::ENOENT);
            };
            l.dirty.store(true, Ordering::Release);
            let len = data.len();
            match l.disk.write(offset, data, fua).await {
                Ok(()) => reply.written(written),
                Err(e) => {
                    warn!(disk = l.disk.name(), offset, len, "write failed: {e}");
                    reply.error(errno(&e))
                }
            }
        });
    }

    /// `close()`: a file written through this mount is flushed, so data written by a program
    /// that closes its file without `fsync` is still durable once `close` returns.
    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let (tree, ino) = match self.live_arc(ino) {
            Ok(x) => x,
            Err(_) => return reply.ok(),
        };
        self.rt.spawn(async move {
            let Some(l) = live_of(&tree, ino) else {
                return reply.ok();
            };
            if !l.dirty.swap(false, Ordering::AcqRel) {
                return reply.ok();
            }
            match flush_live(l, "flush on close").await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (tree, ino) = match self.live_arc(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        self.rt.spawn(async move {
            let Some(l) = live_of(&tree, ino) else {
                return reply.error(Errno::ENOENT);
            };
            l.dirty.store(false, Ordering::Release);
            match flush_live(l, "fsync").await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (tree, ino) = match self.live_arc(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let Some(l) = live_of(&tree, ino) else {
            return reply.error(Errno::ENOENT);
        };
        if l.disk.read_only() {
            return reply.error(Errno::EROFS);
        }
        let size = l.disk.size();
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EINVAL);
        };
        if end > size && !keep_size {
            // Would grow the file.
            return reply.error(Errno::EFBIG);
        }
        // Ranges past the end are clipped (with KEEP_SIZE they change nothing there).
        let len = end.min(size).saturating_sub(offset);
        enum Op {
            Trim,
            Zero,
        }
        let op = match op {
            // Preallocation: a disk is as large as it will ever be.
            0 => return reply.ok(),
            libc::FALLOC_FL_PUNCH_HOLE => Op::Trim,
            libc::FALLOC_FL_ZERO_RANGE => Op::Zero,
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        if len == 0 {
            return reply.ok();
        }
        self.rt.spawn(async move {
            let Some(l) = live_of(&tree, ino) else {
                return reply.error(Errno::ENOENT);
            };
            l.dirty.store(true, Ordering::Release);
            let r = match op {
                Op::Trim => l.disk.trim(offset, len, false).await,
                Op::Zero => {
                    let flags = ZeroFlags {
                        may_trim: false,
                        fast_only: false,
                        fua: false,
                    };
                    l.disk.write_zeroes(offset, len, flags).await
                }
            };
            match r {
                Ok(()) => reply.ok(),
                Err(e) => {
                    warn!(
                        disk = l.disk.name(),
                        offset, len, mode, "fallocate failed: {e}"
                    );
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if let Some(tree) = self.replica_arc(ino) {
            let ino = ino.0;
            let Ok(offset) = u64::try_from(offset) else {
                return reply.error(Errno::ENXIO);
            };
            if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
                return reply.error(Errno::EINVAL);
            }
            self.rt.spawn(async move {
                let Some(r) = replica_of(&tree, ino) else {
                    return reply.error(Errno::ENOENT);
                };
                if offset >= r.size {
                    return reply.error(Errno::ENXIO);
                }
                let d = match r.disk().await {
                    Ok(d) => d,
                    Err(_) => return reply.error(Errno::EIO),
                };
                let Ok(ext) = d.extents(offset, r.size - offset).await else {
                    return reply.error(Errno::EIO);
                };
                let mut pos = offset;
                for e in ext {
                    if e.hole != (whence == libc::SEEK_DATA) {
                        return reply.offset(pos as i64);
                    }
                    pos += e.length;
                }
                if whence == libc::SEEK_HOLE {
                    reply.offset(r.size as i64)
                } else {
                    reply.error(Errno::ENXIO)
                }
            });
            return;
        }
        let (tree, ino) = match self.live_arc(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            // The kernel handles SEEK_SET/CUR/END itself.
            _ => return reply.error(Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        self.rt.spawn(async move {
            let Some(l) = live_of(&tree, ino) else {
                return reply.error(Errno::ENOENT);
            };
            match seek(&l.disk, offset, want_data).await {
                Ok(Some(pos)) => reply.offset(pos as i64),
                Ok(None) => reply.error(Errno::ENXIO),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let NodeKind::Dir { children } = &node.kind else {
            return reply.error(Errno::ENOTDIR);
        };
        let mut entries: Vec<(u64, FileType, &str)> = vec![
            (node.ino, FileType::Directory, "."),
            (node.parent, FileType::Directory, ".."),
        ];
        for (name, &child) in children {
            let kind = match self.tree.get(child) {
                Some(c) if c.is_dir() => FileType::Directory,
                _ => FileType::RegularFile,
            };
            entries.push((child, kind, name));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            // The offset given is the one of the *next* entry.
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self.tree.live_disks().map(Disk::size).sum();
        let files = self.tree.nodes().count() as u64;
        reply.statfs(
            total.div_ceil(u64::from(BLOCK_SIZE)),
            0,
            0,
            files,
            0,
            BLOCK_SIZE,
            255,
            BLOCK_SIZE,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match &self.node(ino) {
            Ok(node) => match &node.kind {
                NodeKind::LiveDisk(l) if mask.contains(AccessFlags::W_OK) && l.disk.read_only() => {
                    reply.error(Errno::EROFS)
                }
                NodeKind::Replica(_) if mask.contains(AccessFlags::W_OK) => {
                    reply.error(Errno::EROFS)
                }
                _ => reply.ok(),
            },
            Err(e) => reply.error(*e),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    // The set of disks is managed with `standby disk ...`, not through the mount.

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }
}
