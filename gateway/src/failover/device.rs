//! [`Device`]: what an export serves — a live disk or a replica disk.
//!
//! A replica disk whose failover was committed forwards every I/O to the live disk that
//! took its place ([`ReplicaDisk::begin_handover`]): connections opened before the commit
//! keep working, and their writes land in the live disk and its change log, never in the
//! adopted image behind the log's back.

use std::io;

use nbd_server::{BlockDevice, BlockSize, DeviceFlags, Extent, FlushReply, ZeroFlags};

use super::ReplicaDisk;
use crate::disk::Disk;

/// An exported device.
#[derive(Debug, Clone)]
pub enum Device {
    /// A VM disk of this gateway (tracked writes, change log).
    Live(Disk),
    /// A recovery point (read-only, or writable through an overlay).
    Replica(ReplicaDisk),
}

impl Device {
    /// The live disk, if this is one.
    pub fn live(&self) -> Option<&Disk> {
        match self {
            Device::Live(d) => Some(d),
            Device::Replica(_) => None,
        }
    }

    /// Clean shutdown: a live disk seals its log; a replica's overlay is flushed.
    pub async fn close(&self) -> io::Result<()> {
        match self {
            Device::Live(d) => d.close().await,
            Device::Replica(r) => match r.successor().await.as_ref() {
                Some(_) => Ok(()), // the live disk is closed by its own export
                None => r.flush().await,
            },
        }
    }
}

impl BlockDevice for Device {
    fn size(&self) -> u64 {
        match self {
            Device::Live(d) => BlockDevice::size(d),
            Device::Replica(r) => BlockDevice::size(r),
        }
    }

    fn flags(&self) -> DeviceFlags {
        match self {
            Device::Live(d) => d.flags(),
            Device::Replica(r) => r.flags(),
        }
    }

    fn block_size(&self) -> BlockSize {
        match self {
            Device::Live(d) => d.block_size(),
            Device::Replica(r) => r.block_size(),
        }
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        match self {
            Device::Live(d) => BlockDevice::read(d, offset, len).await,
            Device::Replica(r) => match r.successor().await.as_ref() {
                Some(d) => BlockDevice::read(d, offset, len).await,
                None => BlockDevice::read(r, offset, len).await,
            },
        }
    }

    fn read_now(&self, offset: u64, len: usize) -> Option<io::Result<Vec<u8>>> {
        match self {
            Device::Live(d) => BlockDevice::read_now(d, offset, len),
            Device::Replica(_) => None,
        }
    }

    fn read_mapped(&self, offset: u64, len: usize) -> Option<nbd_server::MappedRead> {
        match self {
            Device::Live(d) => BlockDevice::read_mapped(d, offset, len),
            Device::Replica(_) => None,
        }
    }

    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Option<io::Result<()>> {
        match self {
            Device::Live(d) => BlockDevice::write_now(d, offset, data, fua),
            Device::Replica(_) => None,
        }
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        match self {
            Device::Live(d) => BlockDevice::write(d, offset, data, fua).await,
            Device::Replica(r) => match r.successor().await.as_ref() {
                Some(d) => BlockDevice::write(d, offset, data, fua).await,
                None => BlockDevice::write(r, offset, data, fua).await,
            },
        }
    }

    async fn flush(&self) -> io::Result<()> {
        match self {
            Device::Live(d) => BlockDevice::flush(d).await,
            Device::Replica(r) => match r.successor().await.as_ref() {
                Some(d) => BlockDevice::flush(d).await,
                None => BlockDevice::flush(r).await,
            },
        }
    }

    fn flush_detached(&self, reply: FlushReply) -> Option<FlushReply> {
        match self {
            Device::Live(d) => BlockDevice::flush_detached(d, reply),
            // A replica may be handed over to a live disk at any time: its flush is awaited.
            Device::Replica(_) => Some(reply),
        }
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match self {
            Device::Live(d) => BlockDevice::trim(d, offset, len, fua).await,
            Device::Replica(r) => match r.successor().await.as_ref() {
                Some(d) => BlockDevice::trim(d, offset, len, fua).await,
                None => BlockDevice::trim(r, offset, len, fua).await,
            },
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        match self {
            Device::Live(d) => BlockDevice::write_zeroes(d, offset, len, flags).await,
            Device::Replica(r) => match r.successor().await.as_ref() {
                Some(d) => BlockDevice::write_zeroes(d, offset, len, flags).await,
                None => BlockDevice::write_zeroes(r, offset, len, flags).await,
            },
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        match self {
            Device::Live(d) => BlockDevice::block_status(d, offset, len).await,
            Device::Replica(r) => match r.successor().await.as_ref() {
                Some(d) => BlockDevice::block_status(d, offset, len).await,
                None => BlockDevice::block_status(r, offset, len).await,
            },
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Device::Live(d) => BlockDevice::cache(d, offset, len).await,
            Device::Replica(r) => match r.successor().await.as_ref() {
                Some(d) => BlockDevice::cache(d, offset, len).await,
                None => BlockDevice::cache(r, offset, len).await,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use replica_store::backend::local::LocalBackend;
    use replica_store::{CreateOptions, ReaderOptions, Store};

    use super::*;
    use crate::failover::Overlay;

    /// Every export serves a [`Device`]: a live disk's fast paths (the optional methods of
    /// `BlockDevice`, whose default declines) must reach the disk through it, or they are
    /// lost without a word. Each is asked of the device and of the disk alike (not
    /// `flush_detached`, whose reply only the NBD server can make).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_disk_keeps_its_fast_paths_behind_the_device() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("live.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let disk = Disk::open("d", &img, false).unwrap();
        let dev = Device::Live(disk.clone());
        assert!(matches!(
            BlockDevice::write_now(&dev, 0, &[7; 65536], false),
            Some(Ok(()))
        ));
        assert_eq!(
            BlockDevice::read_now(&dev, 0, 4096).map(|r| r.unwrap()),
            disk.read_now(0, 4096).map(|r| r.unwrap())
        );
        assert_eq!(
            BlockDevice::read_mapped(&dev, 0, 65536).is_some(),
            disk.read_mapped(0, 65536).is_some()
        );
        assert_eq!(BlockDevice::flags(&dev), BlockDevice::flags(&disk));
    }

    /// A connection opened before `failover commit` holds the replica's [`Device`]; after
    /// the handover its writes go to the live disk, not into the adopted overlay behind the
    /// live disk's back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn io_of_an_old_connection_goes_to_the_live_disk_after_commit() {
        let t = tempfile::tempdir().unwrap();
        let backend = Arc::new(LocalBackend::open(t.path().join("store")).unwrap());
        let store = Store::create(backend, CreateOptions::default(), None)
            .await
            .unwrap();
        let size = 1u64 << 20;
        let mut b = store.point_builder("vm").unwrap();
        b.add_disk("os", size).unwrap();
        let p = b.publish().await.unwrap();
        let reader = store
            .open_disk(&p, "os", ReaderOptions::default())
            .await
            .unwrap();
        let grain = u64::from(reader.index().chunk_size());
        let ov = Overlay::open(&t.path().join("ov"), size, grain).unwrap();
        let rd = ReplicaDisk::new("os", reader, Some(ov));
        let dev = Device::Replica(rd.clone());
        dev.write(0, vec![1; 4096], false).await.unwrap();

        let img = t.path().join("live.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        let live = Disk::open("os", &img, false).unwrap();
        rd.begin_handover().await.complete(live);

        dev.write(8192, vec![2; 4096], false).await.unwrap();
        dev.flush().await.unwrap();
        let live_bytes = std::fs::read(&img).unwrap();
        assert!(live_bytes[8192..12288].iter().all(|&b| b == 2));
        let ov_bytes = std::fs::read(t.path().join("ov/overlay.img")).unwrap();
        assert!(
            ov_bytes[8192..12288].iter().all(|&b| b == 0),
            "the old connection wrote into the replica after the commit"
        );
        assert_eq!(dev.read(8192, 4096).await.unwrap(), vec![2; 4096]);
    }
}
