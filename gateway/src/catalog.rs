//! The data directory and the disks it knows.
//!
//! ```text
//! DATA_DIR/
//!   standby.toml          optional configuration (serve settings, declared disks)
//!   disks/NAME.toml       one record per disk: its image path, id, read-only flag
//!   disks/NAME.img        images made by `standby disk create`
//!   disks/NAME.hrl/       the change log of a tracked disk (segments, state file)
//! ```
//!
//! Disks come from two places: records in `disks/` (made by `disk create` / `disk import`) and
//! `[[disk]]` tables in the configuration file. A name may appear in only one of them.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::info;

use crate::changelog::LogError;
use crate::config::Config;
use crate::disk::{Disk, DiskError};

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("invalid disk name '{0}': use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with '.' or '-')")]
    BadName(String),
    #[error("a disk named '{0}' already exists")]
    Exists(String),
    #[error("no disk named '{0}' (see `standby disk list`)")]
    NotFound(String),
    #[error("disk size must be at least 512 bytes and a multiple of 512, got {0}")]
    BadSize(u64),
    #[error("image {0} does not exist or is not readable")]
    NoImage(PathBuf),
    #[error("disk record {path} is damaged: {reason}")]
    BadRecord { path: PathBuf, reason: String },
    #[error("another `standby serve` (pid {pid}) is running on data directory {dir}: stop it first (one server per data directory)")]
    Locked { dir: PathBuf, pid: String },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("disk '{0}' is declared in the configuration file: set `tracked = true` or `tracked = false` in its [[disk]] table instead")]
    Declared(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CatalogError + 'a {
    move |source| CatalogError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where a disk was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `standby disk create`: the image lives in the data directory.
    Created,
    /// `standby disk import`: an existing image adopted where it is.
    Imported,
    /// A `[[disk]]` table in the configuration file.
    Config,
}

/// What the data directory records about one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub name: String,
    /// Absolute path of the raw image.
    pub image: PathBuf,
    /// Stable identity (survives renames of the image; used by the change log).
    pub id: String,
    #[serde(default)]
    pub read_only: bool,
    pub origin: Origin,
    /// A change log is kept for this disk (survives restarts).
    #[serde(default)]
    pub tracked: bool,
}

/// Validates a disk (or VM) name: it becomes an export name and a file name. The rule is
/// the store's ([`replica_store::point::validate_name`], the one rule for names from users
/// and from the store), with names of this gateway's disks kept to 64 characters.
pub fn validate_name(name: &str) -> Result<(), CatalogError> {
    let ok = name.len() <= 64 && replica_store::point::validate_name("disk", name).is_ok();
    if ok {
        Ok(())
    } else {
        Err(CatalogError::BadName(name.to_string()))
    }
}

/// A fresh random identifier (128 bits, hex).
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    let filled = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if filled.is_err() {
        // Fall back on time and pid: unique enough for an identity that is also checked.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ (u128::from(std::process::id()) << 64)).to_be_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    config: Config,
}

impl DataDir {
    /// Opens (creating if needed) a data directory with a configuration.
    pub fn open(root: &Path, config: Config) -> Result<Self, CatalogError> {
        let disks = root.join("disks");
        fs::create_dir_all(&disks).map_err(io_err("cannot create data directory", &disks))?;
        let root = fs::canonicalize(root).map_err(io_err("cannot resolve", root))?;
        Ok(Self { root, config })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn disks_dir(&self) -> PathBuf {
        self.root.join("disks")
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.disks_dir().join(format!("{name}.toml"))
    }

    /// Every disk, by name: records in the data directory and disks declared in the config.
    pub fn disks(&self) -> Result<BTreeMap<String, DiskRecord>, CatalogError> {
        let mut out = BTreeMap::new();
        let dir = self.disks_dir();
        let entries = fs::read_dir(&dir).map_err(io_err("cannot list", &dir))?;
        for entry in entries {
            let path = entry.map_err(io_err("cannot list", &dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let text = fs::read_to_string(&path).map_err(io_err("cannot read", &path))?;
            let rec: DiskRecord = toml::from_str(&text).map_err(|e| CatalogError::BadRecord {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            out.insert(rec.name.clone(), rec);
        }
        for d in &self.config.disks {
            validate_name(&d.name)?;
            if out.contains_key(&d.name) {
                return Err(CatalogError::Exists(d.name.clone()));
            }
            let image = if d.image.is_absolute() {
                d.image.clone()
            } else {
                self.root.join(&d.image)
            };
            out.insert(
                d.name.clone(),
                DiskRecord {
                    name: d.name.clone(),
                    image,
                    id: d.id.clone().unwrap_or_else(|| format!("config-{}", d.name)),
                    read_only: d.read_only,
                    origin: Origin::Config,
                    tracked: d.tracked,
                },
            );
        }
        Ok(out)
    }

    /// One disk's record.
    pub fn disk(&self, name: &str) -> Result<DiskRecord, CatalogError> {
        self.disks()?
            .remove(name)
            .ok_or_else(|| CatalogError::NotFound(name.to_string()))
    }

    fn ensure_new(&self, name: &str) -> Result<(), CatalogError> {
        validate_name(name)?;
        if self.disks()?.contains_key(name) {
            return Err(CatalogError::Exists(name.to_string()));
        }
        Ok(())
    }

    fn write_record(&self, rec: &DiskRecord) -> Result<(), CatalogError> {
        let path = self.record_path(&rec.name);
        let text = toml::to_string(rec).map_err(|e| CatalogError::BadRecord {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, text.as_bytes()).map_err(io_err("cannot write", &path))
    }

    /// Creates a sparse raw disk of `size` bytes in the data directory.
    pub fn create_disk(&self, name: &str, size: u64) -> Result<DiskRecord, CatalogError> {
        self.ensure_new(name)?;
        if size < 512 || size & 511 != 0 {
            return Err(CatalogError::BadSize(size));
        }
        let image = self.disks_dir().join(format!("{name}.img"));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&image)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => CatalogError::Exists(name.to_string()),
                _ => CatalogError::Io {
                    what: "cannot create image",
                    path: image.clone(),
                    source: e,
                },
            })?;
        f.set_len(size)
            .and_then(|()| f.sync_all())
            .map_err(io_err("cannot size image", &image))?;
        let rec = DiskRecord {
            name: name.to_string(),
            image,
            id: new_id(),
            read_only: false,
            origin: Origin::Created,
            tracked: false,
        };
        if let Err(e) = self.write_record(&rec) {
            let _ = fs::remove_file(&rec.image);
            return Err(e);
        }
        info!(disk = name, size, "disk created");
        Ok(rec)
    }

    /// Adopts an existing raw image where it is (nothing is copied).
    pub fn import_disk(
        &self,
        name: &str,
        image: &Path,
        read_only: bool,
    ) -> Result<DiskRecord, CatalogError> {
        self.ensure_new(name)?;
        let image =
            fs::canonicalize(image).map_err(|_| CatalogError::NoImage(image.to_path_buf()))?;
        // Opening validates it (exists, non-empty, file or block device).
        Disk::open(name, &image, read_only)?;
        let rec = DiskRecord {
            name: name.to_string(),
            image,
            id: new_id(),
            read_only,
            origin: Origin::Imported,
            tracked: false,
        };
        self.write_record(&rec)?;
        info!(disk = name, image = %rec.image.display(), "disk imported");
        Ok(rec)
    }

    /// The change-log directory of a disk: `disks/NAME.hrl` (inside the data directory even
    /// for images that live elsewhere).
    pub fn log_dir(&self, name: &str) -> PathBuf {
        self.disks_dir().join(format!("{name}.hrl"))
    }

    /// Switches change tracking of a disk on or off (takes effect when the disk is next
    /// opened). Config-declared disks are switched in the configuration file.
    pub fn set_tracked(&self, name: &str, tracked: bool) -> Result<DiskRecord, CatalogError> {
        let mut rec = self.disk(name)?;
        if rec.origin == Origin::Config {
            return Err(CatalogError::Declared(name.to_string()));
        }
        if rec.tracked != tracked {
            rec.tracked = tracked;
            self.write_record(&rec)?;
            info!(disk = name, tracked, "change tracking switched");
        }
        Ok(rec)
    }

    /// Opens a disk for I/O; a tracked, writable disk gets its change log (recovered first).
    pub fn open_disk(&self, rec: &DiskRecord) -> Result<Disk, CatalogError> {
        if rec.tracked && !rec.read_only {
            let opts = self.config.log.options().map_err(CatalogError::Config)?;
            let (disk, _report) = Disk::open_tracked(
                &rec.name,
                &rec.image,
                &self.log_dir(&rec.name),
                &rec.id,
                opts,
            )?;
            return Ok(disk);
        }
        Ok(Disk::open(&rec.name, &rec.image, rec.read_only)?)
    }
}

/// Writes a small file atomically: temp file, fsync, rename, directory fsync. The temp file's
/// name is unique per call (pid, a process-wide counter, the time in ns) and it is created
/// exclusively with mode 0600, so concurrent writers of one path — threads of one process
/// or several processes — never write into or rename each other's temp file: the last
/// rename wins with a whole file.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}-{}-{:08x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    let r = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_import_list() {
        let t = tempfile::tempdir().unwrap();
        let dd = DataDir::open(t.path(), Config::default()).unwrap();
        let a = dd.create_disk("vm1-os", 1 << 20).unwrap();
        assert_eq!(fs::metadata(&a.image).unwrap().len(), 1 << 20);
        assert!(matches!(
            dd.create_disk("vm1-os", 1 << 20),
            Err(CatalogError::Exists(_))
        ));
        assert!(matches!(
            dd.create_disk("../x", 1 << 20),
            Err(CatalogError::BadName(_))
        ));
        assert!(matches!(
            dd.create_disk("odd", 1000),
            Err(CatalogError::BadSize(1000))
        ));
        let ext = t.path().join("ext.raw");
        File::create(&ext).unwrap().set_len(4096).unwrap();
        dd.import_disk("ext", &ext, true).unwrap();
        assert!(matches!(
            dd.import_disk("nope", &t.path().join("missing"), false),
            Err(CatalogError::NoImage(_))
        ));
        let all = dd.disks().unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), vec!["ext", "vm1-os"]);
        assert!(all["ext"].read_only);
        assert!(matches!(dd.disk("zzz"), Err(CatalogError::NotFound(_))));
    }

    /// Threads of one process writing one file: each write succeeds and the file is always
    /// one whole version (a fixed temp name per process made them rename each other's
    /// half-written temp file, or fail with ENOENT).
    #[test]
    fn write_atomic_from_many_threads() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("state");
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..200 {
                        let data = vec![i; 1000 + usize::from(i) * 4096];
                        write_atomic(path, &data).unwrap();
                    }
                });
            }
        });
        let got = fs::read(&path).unwrap();
        assert_eq!(got.len(), 1000 + usize::from(got[0]) * 4096);
        assert!(got.iter().all(|&b| b == got[0]));
        let left: Vec<_> = fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "temp files left behind");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn tracked_flag_survives_and_old_records_load() {
        let t = tempfile::tempdir().unwrap();
        let dd = DataDir::open(t.path(), Config::default()).unwrap();
        dd.create_disk("a", 1 << 20).unwrap();
        assert!(!dd.disk("a").unwrap().tracked);
        dd.set_tracked("a", true).unwrap();
        let dd2 = DataDir::open(t.path(), Config::default()).unwrap();
        assert!(dd2.disk("a").unwrap().tracked);
        let disk = dd2.open_disk(&dd2.disk("a").unwrap()).unwrap();
        assert!(disk.change_log().is_some());
        assert!(dd2.log_dir("a").join("state.toml").exists());
        // A record written before the field existed loads as untracked.
        let old = "name = \"b\"\nimage = \"/x\"\nid = \"1\"\norigin = \"created\"\n";
        fs::write(dd.disks_dir().join("b.toml"), old).unwrap();
        assert!(!dd.disk("b").unwrap().tracked);
        let cfg =
            Config::parse("[[disk]]\nname = \"c\"\nimage = \"c.raw\"\ntracked = true\n").unwrap();
        let dd3 = DataDir::open(t.path(), cfg).unwrap();
        assert!(dd3.disk("c").unwrap().tracked);
        assert!(matches!(
            dd3.set_tracked("c", false),
            Err(CatalogError::Declared(_))
        ));
    }
}
