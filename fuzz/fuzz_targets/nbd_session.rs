//! Fuzzes a whole NBD server session: the input is everything a client sends (greeting,
//! options, requests, payloads). The server must never panic and must always end the session.
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd_server::{BlockDevice, Export, Exports, Server, ServerConfig, ZeroFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct MemDisk(Mutex<Vec<u8>>);

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let d = self.0.lock().unwrap();
        Ok(d[offset as usize..offset as usize + len].to_vec())
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _f: ZeroFlags) -> io::Result<()> {
        self.trim(offset, len, false).await
    }
}

fuzz_target!(|input: &[u8]| {
    // Also exercise the pure decoders directly.
    let _ = nbd_server::proto::decode_request(input);
    let _ = nbd_server::proto::decode_info(input);
    let _ = nbd_server::proto::decode_meta(input);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let input = input.to_vec();
    rt.block_on(async move {
        let exports = Arc::new(Exports::new());
        exports.insert(Export {
            name: "d".into(),
            description: "fuzz".into(),
            read_only: false,
            device: Arc::new(MemDisk(Mutex::new(vec![0u8; 1 << 16]))),
        });
        let server = Server::new(exports, ServerConfig::default());
        let (client, srv) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(Arc::clone(&server).session(Box::new(srv), "fuzz".into()));
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let mut out = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out)).await;
        assert!(ended.is_ok(), "session hung");
        task.await.unwrap();
        let _ = writer.await;
    });
});
