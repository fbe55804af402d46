//! The fsync latch seen by a real NBD client: a tracked disk served in-process by the NBD
//! server, its syncs going through the fault-injecting layer (gateway's `testing` feature).
//! After one failed `fdatasync` of the change log (what a FLUSH syncs: the image is synced by
//! checkpoints, whose failure latches the same way), qemu-io's FLUSH gets EIO — and so does every
//! later one, although the layer (like Linux after a write-back error) lets the next
//! `fdatasync` succeed. Reopening the disk (what restarting `standby serve` does) clears it.
//! The FLUSHes run on the disk's sync thread and are answered from it (the test checks the
//! thread exists), so the error replies take that path.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use gateway::changelog::durable::{FaultySync, FileSync, Target};
use gateway::changelog::LogOptions;
use gateway::disk::Disk;
use nbd_server::{Export, Exports, Server, ServerConfig};
use standby_e2e::{require_tool, test_dir};

/// Serves `disk` as export "d" on a loopback port; returns the URI and the server.
async fn serve(disk: Disk) -> (String, Arc<Server<Disk>>) {
    let exports = Arc::new(Exports::new());
    exports.insert(Export {
        name: "d".into(),
        description: "fsync latch test".into(),
        read_only: false,
        device: Arc::new(disk),
    });
    let server = Server::new(exports, ServerConfig::default());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("nbd://{}/d", tcp.local_addr().unwrap());
    let s = Arc::clone(&server);
    tokio::spawn(async move { s.serve_tcp(tcp).await });
    (uri, server)
}

/// qemu-io commands against the export; (success, stdout + stderr).
async fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let o = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success() && !text.contains("failed"), text)
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let comm = t.unwrap().path().join("comm");
        if let Ok(n) = std::fs::read_to_string(comm) {
            names.push(n.trim().to_string());
        }
    }
    names
}

fn open(dir: &Path, sync: Arc<dyn FileSync>) -> Disk {
    let opts = LogOptions {
        min_free_bytes: 0,
        min_free_percent: 0,
        ..LogOptions::default()
    };
    let img = dir.join("d.img");
    Disk::open_tracked_with_sync("d", &img, &dir.join("d.hrl"), "id", opts, sync)
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_after_a_failed_fdatasync_gets_eio_until_the_disk_is_reopened() {
    require_tool("qemu-io");
    let t = test_dir("fsync-latch");
    std::fs::write(t.path().join("d.img"), vec![0u8; 4 << 20]).unwrap();
    let faults = FaultySync::new();
    let disk = open(t.path(), Arc::clone(&faults) as _);
    let (uri, server) = serve(disk.clone()).await;

    let (ok, out) = qemu_io(&uri, &["write -P 1 0 64k", "flush"]).await;
    assert!(ok, "before the fault: {out}");
    // The FLUSH ran on the disk's sync thread (and was answered from it), not on the
    // blocking pool: the failures below go through that path.
    assert!(
        thread_names().iter().any(|n| n == "disk-sync-d"),
        "no sync thread: {:?}",
        thread_names()
    );

    faults.fail_nth(Target::Log, 1);
    let (ok, out) = qemu_io(&uri, &["write -P 2 64k 64k", "flush"]).await;
    assert!(!ok, "the flush whose fdatasync failed must fail: {out}");
    assert!(out.contains("Input/output error"), "{out}");
    assert_eq!(faults.failed(), 1);

    // The next fdatasync would succeed; FLUSH must still fail, from any new connection.
    // (qemu sends a FLUSH only when it wrote since the last one: write first.)
    let (ok, out) = qemu_io(&uri, &["write -P 3 192k 4k", "flush"]).await;
    assert!(!ok, "a later flush must fail too: {out}");
    assert!(out.contains("Input/output error"), "{out}");
    assert_eq!(faults.failed(), 1, "the layer failed only once");
    let (ok, out) = qemu_io(&uri, &["write -P 3 128k 4k -F"]).await;
    assert!(!ok, "a FUA write must fail: {out}");
    let log = disk.change_log().unwrap();
    assert_eq!(log.state().label(), "broken", "{}", log.state());

    // Restarting the gateway reopens the disk: FLUSH works again, the chain stays broken
    // until the full resync (reset).
    server.shutdown();
    drop(server);
    drop(log);
    drop(disk);
    let disk = open(t.path(), FaultySync::new() as _);
    assert_eq!(disk.change_log().unwrap().state().label(), "broken");
    let (uri, server) = serve(disk.clone()).await;
    let (ok, out) = qemu_io(&uri, &["write -P 4 0 4k", "flush", "read -P 4 0 4k"]).await;
    assert!(ok, "after reopening: {out}");
    server.shutdown();
}
