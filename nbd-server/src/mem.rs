//! An in-memory block device and a byte-stream session driver: the smallest `BlockDevice`,
//! used by the property tests and the fuzz target (and a model for implementing the trait).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{BlockDevice, Export, Exports, Server, ServerConfig, ZeroFlags};

/// A disk held in a `Vec<u8>`.
pub struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    pub fn new(size: usize) -> Self {
        Self(Mutex::new(vec![0u8; size]))
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + len) as usize
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.data().len() as u64
    }
    async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        Ok(self.data()[Self::range(offset, len as u64)].to_vec())
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
        self.data()[Self::range(offset, data.len() as u64)].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.data()[Self::range(offset, len)].fill(0);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _f: ZeroFlags) -> io::Result<()> {
        self.trim(offset, len, false).await
    }
}

/// Runs one whole session on a server with a single writable export `d` of `size` bytes,
/// where `input` is everything the client sends. Returns what the server sent, or `None` if
/// the session did not end within `limit` (a hang). A panic in the session is re-raised.
pub async fn session_over_bytes(input: Vec<u8>, size: usize, limit: Duration) -> Option<Vec<u8>> {
    let exports = Arc::new(Exports::new());
    exports.insert(Export {
        name: "d".into(),
        description: "in-memory".into(),
        read_only: false,
        device: Arc::new(MemDisk::new(size)),
    });
    let server = Server::new(exports, ServerConfig::default());
    let (client, srv) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(Arc::clone(&server).session(Box::new(srv), "bytes".into()));
    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    });
    let mut out = Vec::new();
    let ended = tokio::time::timeout(limit, rd.read_to_end(&mut out)).await;
    // A panic in the server's session is the test's failure: pass it on.
    if let Err(e) = task.await {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let _ = writer.await;
    ended.ok().map(|_| out)
}
