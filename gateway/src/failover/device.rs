//! [`Device`]: what an export serves — a live disk or a replica disk.

use std::io;

use nbd_server::{BlockDevice, BlockSize, DeviceFlags, Extent, ZeroFlags};

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
            Device::Replica(r) => r.flush().await,
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
            Device::Replica(r) => BlockDevice::read(r, offset, len).await,
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
            Device::Replica(r) => BlockDevice::write(r, offset, data, fua).await,
        }
    }

    async fn flush(&self) -> io::Result<()> {
        match self {
            Device::Live(d) => BlockDevice::flush(d).await,
            Device::Replica(r) => BlockDevice::flush(r).await,
        }
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match self {
            Device::Live(d) => BlockDevice::trim(d, offset, len, fua).await,
            Device::Replica(r) => BlockDevice::trim(r, offset, len, fua).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        match self {
            Device::Live(d) => BlockDevice::write_zeroes(d, offset, len, flags).await,
            Device::Replica(r) => BlockDevice::write_zeroes(r, offset, len, flags).await,
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        match self {
            Device::Live(d) => BlockDevice::block_status(d, offset, len).await,
            Device::Replica(r) => BlockDevice::block_status(r, offset, len).await,
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Device::Live(d) => BlockDevice::cache(d, offset, len).await,
            Device::Replica(r) => BlockDevice::cache(r, offset, len).await,
        }
    }
}
