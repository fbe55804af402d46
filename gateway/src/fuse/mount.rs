//! Mounting, serving until a signal, and unmounting the FUSE view.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{MountOption, Session, SessionACL};
use thiserror::Error;
use tokio::runtime::Runtime;
use tracing::{error, info, warn};

use super::fs::StandbyFs;
use super::tree::{ReplicaFile, Tree, TreeError};
use crate::catalog::{CatalogError, DataDir};

/// Why the FUSE view cannot be mounted or served.
#[derive(Debug, Error)]
pub enum FuseError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("disk '{name}': {source}")]
    OpenDisk { name: String, source: CatalogError },
    #[error("FUSE view: {0}")]
    Tree(#[from] TreeError),
    #[error("mount point {0} does not exist: create it first (mkdir -p {0})")]
    NoMountPoint(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotADir(PathBuf),
    #[error("mount point {0}: {1}")]
    MountPoint(PathBuf, io::Error),
    #[error("a stale FUSE mount is left at {0} (an earlier `standby mount` ended without unmounting): run `fusermount3 -u {0}` and retry")]
    Stale(PathBuf),
    #[error("{0} is already a mount point ({1}): unmount it first (`fusermount3 -u {0}` for a FUSE mount), or choose another directory")]
    AlreadyMounted(PathBuf, String),
    #[error("cannot mount the FUSE view at {dir}: {source}{hint}")]
    Mount {
        dir: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(io::Error),
    #[error("cannot start the FUSE session thread: {0}")]
    Thread(io::Error),
    #[error("cannot unmount {dir}: {reason}; it was detached lazily, so files still open under it now fail: release them (`losetup -d`, stop programs using it)")]
    Busy { dir: PathBuf, reason: String },
    #[error("the FUSE session at {dir} failed: {source}")]
    Session { dir: PathBuf, source: io::Error },
    #[error("final flush failed for disk(s) {0}: see the log")]
    Flush(String),
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Let other users (and root, when not mounted by root) use the mount.
    pub allow_other: bool,
    /// Threads reading requests from the kernel (the I/O itself runs on the tokio runtime).
    pub threads: usize,
    /// Show only `replicas/` (the live disks stay with a running `standby serve`).
    pub replicas_only: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            allow_other: false,
            threads: 4,
            replicas_only: false,
        }
    }
}

/// The absolute path of `dir` without following a final component that may be a dead mount.
fn absolute(dir: &Path) -> Result<PathBuf, FuseError> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| FuseError::MountPoint(dir.to_path_buf(), e))?
            .join(dir)
    };
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Ok(abs);
    };
    match std::fs::canonicalize(parent) {
        Ok(p) => Ok(p.join(name)),
        Err(_) => Err(FuseError::NoMountPoint(abs.clone())),
    }
}

/// Undoes the `\NNN` octal escapes of `/proc/self/mounts`.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file system type mounted at `dir`, if `dir` is a mount point.
pub fn mounted_fs_type(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let want = dir.to_string_lossy();
    let mut found = None;
    for line in text.lines() {
        let mut f = line.split(' ');
        let (_src, Some(point), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if unescape_mount_field(point) == want {
            // The last entry wins (mounts stack).
            found = Some(fstype.to_string());
        }
    }
    found
}

/// Checks that `dir` can be mounted on: an existing directory, not already a mount point and
/// not a stale FUSE mount. Returns its absolute path.
pub fn check_mount_point(dir: &Path) -> Result<PathBuf, FuseError> {
    let abs = absolute(dir)?;
    match std::fs::metadata(&abs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(FuseError::NotADir(abs)),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Err(FuseError::Stale(abs)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(FuseError::NoMountPoint(abs)),
        Err(e) => return Err(FuseError::MountPoint(abs, e)),
    }
    if let Some(fstype) = mounted_fs_type(&abs) {
        return Err(FuseError::AlreadyMounted(abs, fstype));
    }
    Ok(abs)
}

fn mount_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) => {
            " (is the fuse kernel module loaded? `modprobe fuse`; /dev/fuse must exist)"
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (mount as root, or install fuse3 so the setuid `fusermount3` helper exists; --allow-other as a normal user needs `user_allow_other` in /etc/fuse.conf)"
        }
        _ => "",
    }
}

/// Unmounts `dir`: `umount2` when allowed (root), else `fusermount3 -u`.
fn unmount_once(dir: &Path) -> io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: umount2 with a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    let out = Command::new("fusermount3").arg("-u").arg(dir).output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let busy = msg.contains("busy");
    Err(io::Error::new(
        if busy {
            io::ErrorKind::ResourceBusy
        } else {
            io::ErrorKind::Other
        },
        msg,
    ))
}

fn lazy_unmount(dir: &Path) {
    if let Ok(c) = CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: umount2 with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(dir)
        .output();
}

fn is_busy(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBUSY) || e.kind() == io::ErrorKind::ResourceBusy
}

/// Unmounts, waiting up to `patience` for a busy mount to be released, then detaching it.
fn unmount(dir: &Path, patience: Duration) -> Result<(), FuseError> {
    let deadline = Instant::now() + patience;
    let mut warned = false;
    loop {
        match unmount_once(dir) {
            Ok(()) => {
                info!(dir = %dir.display(), "unmounted");
                return Ok(());
            }
            // Already gone (e.g. `fusermount3 -u` by the admin).
            Err(_) if mounted_fs_type(dir).is_none() => return Ok(()),
            Err(e) if is_busy(&e) && Instant::now() < deadline => {
                if !warned {
                    warn!(dir = %dir.display(), "mount is busy (a loop device or an open file uses it); waiting for it to be released");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                lazy_unmount(dir);
                return Err(FuseError::Busy {
                    dir: dir.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// Unmounts on drop unless disarmed: no error path leaves a mount behind.
struct MountGuard {
    dir: PathBuf,
    armed: bool,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = unmount(&self.dir, Duration::from_secs(2)) {
                error!("{e}");
            }
        }
    }
}

/// Adds `replicas/VM/DISK@POINT` (and `DISK@latest`) for every point of the data directory's
/// replica store. Without a usable store the directory stays empty (a warning says why).
fn add_replicas(dd: &DataDir, tree: &mut Tree, rt: &Runtime) {
    let store_dir_missing =
        !dd.root().join(crate::site::LOCATION_FILE).exists() && !dd.root().join("store").exists();
    if store_dir_missing {
        return;
    }
    let listed = rt.block_on(async {
        let store = crate::site::open_store(dd.root()).await?;
        let points = store.list_points(None).await?;
        Ok::<_, crate::site::SiteError>((store, points))
    });
    let (store, points) = match listed {
        Ok(x) => x,
        Err(e) => {
            warn!("replicas/ stays empty: the replica store cannot be read: {e}");
            return;
        }
    };
    let mut latest: std::collections::BTreeMap<String, &replica_store::PointMeta> =
        Default::default();
    for p in &points {
        latest.insert(p.vm.clone(), p);
    }
    let named = points
        .iter()
        .map(|p| (p, p.id.clone()))
        .chain(latest.values().map(|p| (*p, "latest".to_string())));
    for (p, label) in named {
        for d in &p.disks {
            let file = ReplicaFile {
                store: store.clone(),
                point: p.clone(),
                disk: d.name.clone(),
                size: d.size,
                opened: tokio::sync::OnceCell::new(),
            };
            if let Err(e) = tree.add_replica(&p.vm, &format!("{}@{label}", d.name), file) {
                warn!("replica {}:{} not shown: {e}", p.full_id(), d.name);
            }
        }
    }
}

/// Mounts the FUSE view of every disk of `dd` at `dir`, prints `standby: mounted at DIR` on
/// stdout, serves until SIGINT or SIGTERM (or until someone else unmounts it), then unmounts
/// and flushes every disk.
pub fn serve_mount(
    dd: &DataDir,
    dir: &Path,
    opts: &MountOptions,
    rt: &Runtime,
) -> Result<(), FuseError> {
    let dir = check_mount_point(dir)?;

    let mut tree = Tree::new();
    let live = if opts.replicas_only {
        Default::default()
    } else {
        dd.disks()?
    };
    for rec in live.values() {
        let disk = dd.open_disk(rec).map_err(|source| FuseError::OpenDisk {
            name: rec.name.clone(),
            source,
        })?;
        tree.add_live_disk(disk)?;
    }
    add_replicas(dd, &mut tree, rt);
    let tree = Arc::new(tree);

    // Signals first: once mounted, SIGINT/SIGTERM must reach the unmount below.
    let (mut term, mut int) = {
        let _g = rt.enter();
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).map_err(FuseError::Signal)?,
            signal(SignalKind::interrupt()).map_err(FuseError::Signal)?,
        )
    };

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("standby".into()),
        MountOption::Subtype("standby".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::NoAtime,
    ];
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;

    let fs = StandbyFs::new(Arc::clone(&tree), rt.handle().clone());
    let mut session = Session::new(fs, &dir, &config).map_err(|source| FuseError::Mount {
        hint: mount_hint(&source),
        dir: dir.clone(),
        source,
    })?;
    let mut unmounter = session.unmount_callable();
    let mut guard = MountGuard {
        dir: dir.clone(),
        armed: true,
    };

    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = session.run();
            let _ = done_tx.send(());
            r
        })
        .map_err(FuseError::Thread)?;

    let names: Vec<&str> = tree.live_disks().map(|d| d.name()).collect();
    info!(dir = %dir.display(), disks = names.len(), "FUSE view mounted");
    // One line on stdout that scripts (and tests) can wait for.
    println!("standby: mounted at {}", dir.display());
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }

    let ended_by_itself = rt.block_on(async {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); false }
            _ = int.recv() => { info!("SIGINT received"); false }
            _ = &mut done_rx => true,
        }
    });

    let mut result = Ok(());
    guard.armed = false;
    if ended_by_itself {
        warn!(dir = %dir.display(), "the FUSE view was unmounted from outside");
    } else {
        // The session's own unmount first (so it does not try again when it ends), then
        // retries while the mount is busy.
        let first = unmounter.unmount();
        if let Err(e) = first {
            warn!(dir = %dir.display(), "unmount failed ({e}); retrying");
            if let Err(e) = unmount(&dir, Duration::from_secs(10)) {
                error!("{e}");
                result = Err(e);
            }
        } else {
            info!(dir = %dir.display(), "unmounted");
        }
    }

    // The session thread ends once the kernel drops the connection.
    let joined = if result.is_ok() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if thread.is_finished() {
            match thread.join() {
                Ok(Ok(())) => true,
                Ok(Err(source)) => {
                    result = Err(FuseError::Session {
                        dir: dir.clone(),
                        source,
                    });
                    true
                }
                Err(_) => {
                    result = Err(FuseError::Session {
                        dir: dir.clone(),
                        source: io::Error::other("session thread panicked"),
                    });
                    true
                }
            }
        } else {
            warn!("the FUSE session did not end within 10 s of unmounting");
            false
        }
    } else {
        false
    };

    // Requests still running finish on the runtime; then every disk is flushed and closed.
    let failed: Vec<String> = rt.block_on(async {
        let mut failed = Vec::new();
        for disk in tree.live_disks() {
            if let Err(e) = disk.flush().await {
                error!(disk = disk.name(), "final flush failed: {e}");
                failed.push(disk.name().to_string());
            }
            if joined {
                if let Err(e) = disk.close().await {
                    error!(disk = disk.name(), "closing the change log failed: {e}");
                    failed.push(disk.name().to_string());
                }
            }
        }
        failed
    });
    if result.is_ok() && !failed.is_empty() {
        result = Err(FuseError::Flush(failed.join(", ")));
    }
    if result.is_ok() {
        info!("stopped cleanly; all disks flushed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(unescape_mount_field("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
        assert_eq!(unescape_mount_field("/x\\"), "/x\\");
    }

    #[test]
    fn mount_point_checks() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            check_mount_point(&t.path().join("missing")),
            Err(FuseError::NoMountPoint(_))
        ));
        let f = t.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(check_mount_point(&f), Err(FuseError::NotADir(_))));
        assert!(check_mount_point(t.path()).is_ok());
        assert!(matches!(
            check_mount_point(Path::new("/proc")),
            Err(FuseError::AlreadyMounted(..))
        ));
    }
}
