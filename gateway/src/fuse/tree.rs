//! The inode table of the FUSE view: a small tree of named nodes, built when the file system
//! is mounted.
//!
//! ```text
//! /                 ino 1
//! /disks/           ino 2   one file per live disk of the data directory
//! /replicas/        ino 3   one directory per VM of the replica store
//! /replicas/VM/DISK@POINT   one read-only file per disk of every recovery point
//! /replicas/VM/DISK@latest  the newest point's disk
//! ```
//!
//! Inode numbers are indexes into one vector (`ino = index + 1`), so a lookup is a bounds
//! check, never a lock. New kinds of files (replica disks, copy-on-write overlays) become new
//! [`NodeKind`] variants; new directories are [`Tree::add_dir`] calls.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use crate::disk::Disk;

/// Inode number of the root directory (fixed by the FUSE protocol).
pub const ROOT_INO: u64 = 1;
/// `MOUNT/disks`
pub const DISKS_INO: u64 = 2;
/// `MOUNT/replicas`
pub const REPLICAS_INO: u64 = 3;

/// A live disk shown as a regular file.
#[derive(Debug)]
pub struct LiveDisk {
    pub disk: Disk,
    /// Written through this mount since the last flush: closing a file flushes the disk then.
    pub dirty: AtomicBool,
}

/// A disk of a recovery point shown as a read-only file; opened (index and patches loaded)
/// on first read, then read lazily through the store's verified chunk cache.
pub struct ReplicaFile {
    pub store: replica_store::Store,
    pub point: replica_store::PointMeta,
    pub disk: String,
    pub size: u64,
    pub opened: tokio::sync::OnceCell<crate::failover::ReplicaDisk>,
}

impl std::fmt::Debug for ReplicaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplicaFile({}:{})", self.point.full_id(), self.disk)
    }
}

impl ReplicaFile {
    /// The replica disk, opened on first use.
    pub async fn disk(&self) -> std::io::Result<&crate::failover::ReplicaDisk> {
        self.opened
            .get_or_try_init(|| async {
                let reader = self
                    .store
                    .open_disk(
                        &self.point,
                        &self.disk,
                        replica_store::ReaderOptions::default(),
                    )
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                Ok(crate::failover::ReplicaDisk::new(
                    &format!("{}:{}", self.point.full_id(), self.disk),
                    reader,
                    None,
                ))
            })
            .await
    }
}

/// What a node is.
#[derive(Debug)]
pub enum NodeKind {
    /// A directory: its entries by name.
    Dir { children: BTreeMap<String, u64> },
    /// `disks/NAME`: reads and writes go through the gateway's [`Disk`].
    LiveDisk(LiveDisk),
    /// `replicas/VM/DISK@POINT`: a disk of a recovery point, read-only.
    Replica(Box<ReplicaFile>),
}

/// One file or directory.
#[derive(Debug)]
pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    pub kind: NodeKind,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }
}

/// Why a node cannot be added.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("'{0}' is not a valid file name in the FUSE view")]
    BadName(String),
    #[error("two entries named '{0}' in one directory")]
    Duplicate(String),
    #[error("inode {0} is not a directory")]
    NotADir(u64),
}

/// Every node of the mounted file system.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    /// The fixed skeleton: `/`, `/disks`, `/replicas`.
    pub fn new() -> Self {
        let mut t = Tree {
            nodes: vec![Node {
                ino: ROOT_INO,
                parent: ROOT_INO,
                name: String::new(),
                kind: NodeKind::Dir {
                    children: BTreeMap::new(),
                },
            }],
        };
        // Infallible: fixed, distinct names under the root.
        let disks = t.add_dir(ROOT_INO, "disks");
        let replicas = t.add_dir(ROOT_INO, "replicas");
        debug_assert_eq!(disks.ok(), Some(DISKS_INO));
        debug_assert_eq!(replicas.ok(), Some(REPLICAS_INO));
        t
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.nodes.get(i)
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        match &self.get(parent)?.kind {
            NodeKind::Dir { children } => self.get(*children.get(name)?),
            _ => None,
        }
    }

    /// All nodes (for statistics).
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    fn add(&mut self, parent: u64, name: &str, kind: NodeKind) -> Result<u64, TreeError> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(TreeError::BadName(name.to_string()));
        }
        let ino = self.nodes.len() as u64 + 1;
        let index = parent.checked_sub(1).and_then(|i| usize::try_from(i).ok());
        let Some(p) = index.and_then(|i| self.nodes.get_mut(i)) else {
            return Err(TreeError::NotADir(parent));
        };
        let NodeKind::Dir { children } = &mut p.kind else {
            return Err(TreeError::NotADir(parent));
        };
        if children.contains_key(name) {
            return Err(TreeError::Duplicate(name.to_string()));
        }
        children.insert(name.to_string(), ino);
        self.nodes.push(Node {
            ino,
            parent,
            name: name.to_string(),
            kind,
        });
        Ok(ino)
    }

    /// Adds an empty directory.
    pub fn add_dir(&mut self, parent: u64, name: &str) -> Result<u64, TreeError> {
        self.add(
            parent,
            name,
            NodeKind::Dir {
                children: BTreeMap::new(),
            },
        )
    }

    /// Adds `disks/NAME` for a live disk.
    pub fn add_live_disk(&mut self, disk: Disk) -> Result<u64, TreeError> {
        let name = disk.name().to_string();
        self.add(
            DISKS_INO,
            &name,
            NodeKind::LiveDisk(LiveDisk {
                disk,
                dirty: AtomicBool::new(false),
            }),
        )
    }

    /// Adds `replicas/VM/NAME` for a disk of a recovery point (creating the VM directory).
    pub fn add_replica(
        &mut self,
        vm: &str,
        name: &str,
        file: ReplicaFile,
    ) -> Result<u64, TreeError> {
        let dir = match self.lookup(REPLICAS_INO, vm) {
            Some(n) => n.ino,
            None => self.add_dir(REPLICAS_INO, vm)?,
        };
        self.add(dir, name, NodeKind::Replica(Box::new(file)))
    }

    /// Every live disk (for the final flush).
    pub fn live_disks(&self) -> impl Iterator<Item = &Disk> {
        self.nodes.iter().filter_map(|n| match &n.kind {
            NodeKind::LiveDisk(l) => Some(&l.disk),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_and_lookup() {
        let t = Tree::new();
        assert_eq!(t.lookup(ROOT_INO, "disks").unwrap().ino, DISKS_INO);
        assert_eq!(t.lookup(ROOT_INO, "replicas").unwrap().ino, REPLICAS_INO);
        assert!(t.lookup(ROOT_INO, "nope").is_none());
        assert!(t.get(0).is_none());
        assert!(t.get(99).is_none());
        assert_eq!(t.get(REPLICAS_INO).unwrap().parent, ROOT_INO);
    }

    #[test]
    fn disks_appear_under_disks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        std::fs::File::create(&p).unwrap().set_len(8192).unwrap();
        let mut t = Tree::new();
        let ino = t
            .add_live_disk(Disk::open("a", &p, false).unwrap())
            .unwrap();
        let n = t.lookup(DISKS_INO, "a").unwrap();
        assert_eq!(n.ino, ino);
        assert!(!n.is_dir());
        assert!(matches!(
            t.add_live_disk(Disk::open("a", &p, true).unwrap()),
            Err(TreeError::Duplicate(_))
        ));
        assert!(matches!(t.add_dir(ino, "x"), Err(TreeError::NotADir(_))));
        assert!(matches!(
            t.add_dir(ROOT_INO, ".."),
            Err(TreeError::BadName(_))
        ));
        assert_eq!(t.live_disks().count(), 1);
    }
}
