//! One `standby serve` per data directory.
//!
//! Two servers on one data directory would both recover and append to the same change logs,
//! both run the replication engine on the same state database and both write the same
//! overlays: each would corrupt what the other wrote. [`DataDirLock::acquire`] takes an
//! exclusive `flock(2)` on `<data-dir>/serve.lock` (created 0600) and writes the holder's pid
//! into it; a second server finds the lock taken and stops with an error naming that pid.
//!
//! The lock belongs to the open file: the kernel releases it when the process exits, however
//! it exits (crash, SIGKILL, power loss), so a stale lock file never blocks a restart — only
//! a live holder does. The lock is held for as long as the [`DataDirLock`] lives.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::catalog::CatalogError;

/// File name of the lock inside the data directory.
pub const LOCK_FILE: &str = "serve.lock";

/// The held lock (released on drop or process exit).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock of `data_dir`, or says which process holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, CatalogError> {
        let path = data_dir.join(LOCK_FILE);
        let io = |source: std::io::Error| CatalogError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock(2) on a descriptor `file` owns and keeps open for the call.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(CatalogError::Locked {
                    dir: data_dir.to_path_buf(),
                    pid: holder.trim().to_string(),
                });
            }
            return Err(io(e));
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(DataDirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_pid_and_a_released_lock_is_free() {
        let t = tempfile::tempdir().unwrap();
        let a = DataDirLock::acquire(t.path()).unwrap();
        match DataDirLock::acquire(t.path()) {
            Err(e @ CatalogError::Locked { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&std::process::id().to_string()), "{msg}");
            }
            other => panic!("second lock not refused: {other:?}"),
        }
        drop(a);
        let b = DataDirLock::acquire(t.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(b.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
