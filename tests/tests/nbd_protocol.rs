//! Protocol and bad-input tests against the real `standby serve`, over a raw socket.

use standby_e2e::nbd_client::*;
use standby_e2e::{run, standby, test_dir, wait_server_closed, wait_server_read_all, Gateway};

const MIB: u64 = 1 << 20;

fn setup(name: &str) -> (tempfile::TempDir, Gateway) {
    let t = test_dir(name);
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "d1", "--size", "16M"]));
    let ro = t.path().join("ro.raw");
    std::fs::write(&ro, vec![0x5au8; MIB as usize]).unwrap();
    run(standby(&dd)
        .args(["disk", "import", "ro", "--read-only"])
        .arg(&ro));
    let g = Gateway::start(&dd, &[]);
    (t, g)
}

fn client(g: &Gateway, export: &str) -> RawClient {
    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go(export).unwrap(), REP_ACK);
    c
}

#[test]
fn unknown_and_oversized_options_are_refused_without_dropping_the_connection() {
    let (_t, g) = setup("opts");
    let mut c = RawClient::connect(g.addr).unwrap();
    // An unknown option with a payload: drained and refused.
    c.send_option(0x4242, b"some payload the server must skip")
        .unwrap();
    let r = c.read_opt_reply().unwrap();
    assert_eq!((r.option, r.kind), (0x4242, REP_ERR_UNSUP));
    // An oversized option: drained and refused.
    c.send_option(0x4343, &vec![0u8; 1 << 20]).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().kind, REP_ERR_TOO_BIG);
    // STRUCTURED_REPLY with data is invalid.
    c.send_option(OPT_STRUCTURED_REPLY, b"x").unwrap();
    assert_eq!(c.read_opt_reply().unwrap().kind, REP_ERR_INVALID);
    // SET_META_CONTEXT before structured replies is invalid.
    let r = c.set_meta_context("d1", "base:allocation").unwrap();
    assert_eq!(r.last().unwrap().kind, REP_ERR_INVALID);
    // A truncated GO payload is invalid, an unknown export is unknown.
    c.send_option(OPT_GO, &[0, 0, 0, 9, b'd']).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().kind, REP_ERR_INVALID);
    assert_eq!(c.go("nope").unwrap(), REP_ERR_UNKNOWN);
    // The session still works.
    assert_eq!(c.go("d1").unwrap(), REP_ACK);
    assert_eq!(c.size, 16 * MIB);
    assert_eq!(c.write(0, &[1u8; 512]).unwrap(), 0);
    assert_eq!(c.read(0, 512).unwrap().data, vec![1u8; 512]);
}

#[test]
fn bad_option_magic_disconnects() {
    let (_t, g) = setup("optmagic");
    let mut c = RawClient::connect(g.addr).unwrap();
    use std::io::Write;
    c.sock.write_all(&[0xde; 16]).unwrap();
    assert!(c.is_closed());
    // The server is still there for others.
    let mut c2 = client(&g, "d1");
    assert_eq!(c2.flush().unwrap(), 0);
}

#[test]
fn out_of_range_overflow_unknown_and_read_only_requests_get_errors() {
    let (_t, g) = setup("range");
    let mut c = client(&g, "d1");
    let size = c.size;
    assert_eq!(c.read(size - 512, 1024).unwrap().error, EINVAL);
    assert_eq!(c.read(u64::MAX - 10, 512).unwrap().error, EINVAL);
    assert_eq!(c.write(size, &[1u8; 512]).unwrap(), ENOSPC);
    assert_eq!(c.write(u64::MAX - 100, &[1u8; 512]).unwrap(), ENOSPC);
    assert_eq!(c.call(0, CMD_TRIM, size, 4096, &[]).unwrap().error, EINVAL);
    assert_eq!(
        c.call(0, CMD_WRITE_ZEROES, size - 1, 2, &[]).unwrap().error,
        ENOSPC
    );
    // Unknown command and unknown flags.
    assert_eq!(c.call(0, 99, 0, 0, &[]).unwrap().error, EINVAL);
    assert_eq!(c.call(1 << 9, CMD_READ, 0, 512, &[]).unwrap().error, EINVAL);
    // Block status without a negotiated context.
    assert_eq!(
        c.call(0, CMD_BLOCK_STATUS, 0, 4096, &[]).unwrap().error,
        EINVAL
    );
    // A write larger than the maximum payload is drained and refused; the stream stays in sync.
    let big = vec![7u8; 33 * MIB as usize];
    assert_eq!(c.write(0, &big).unwrap(), EINVAL);
    assert_eq!(c.read(0, 4096).unwrap().data, vec![0u8; 4096]);

    let mut r = client(&g, "ro");
    assert_ne!(r.tflags & 2, 0, "read-only flag advertised");
    assert_eq!(r.write(0, &[1u8; 512]).unwrap(), EPERM);
    assert_eq!(r.call(0, CMD_TRIM, 0, 512, &[]).unwrap().error, EPERM);
    assert_eq!(r.read(0, 512).unwrap().data, vec![0x5au8; 512]);
}

#[test]
fn wrong_request_magic_disconnects_cleanly() {
    let (_t, g) = setup("reqmagic");
    let mut c = client(&g, "d1");
    use std::io::Write;
    c.sock.write_all(&[0u8; 28]).unwrap();
    assert!(c.is_closed());
    let mut c2 = client(&g, "d1");
    assert_eq!(c2.read(0, 512).unwrap().error, 0);
}

#[test]
fn client_vanishing_mid_write_writes_nothing() {
    let (_t, g) = setup("vanish");
    let client_port;
    {
        let mut c = client(&g, "d1");
        client_port = c.sock.local_addr().unwrap().port();
        // Header announces 1 MiB, only half arrives, then the client is gone.
        c.send_request(
            0,
            CMD_WRITE,
            1,
            MIB,
            MIB as u32,
            &vec![0xeeu8; (MIB / 2) as usize],
        )
        .unwrap();
        c.sock.shutdown(std::net::Shutdown::Both).unwrap();
    }
    // Every request the gateway accepted on that connection has completed once it closed it.
    wait_server_closed(g.port(), client_port, std::time::Duration::from_secs(20));
    let mut c = client(&g, "d1");
    let r = c.read(MIB, MIB as u32).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0), "no partial write");
}

#[test]
fn pipelined_requests_all_answered() {
    let (_t, g) = setup("pipeline");
    let mut c = client(&g, "d1");
    // 200 writes sent back to back without waiting (more than the in-flight limit).
    for i in 0..200u64 {
        let data = vec![(i % 251) as u8; 4096];
        c.send_request(0, CMD_WRITE, i, i * 4096, 4096, &data)
            .unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let r = c.read_reply(|_| 0).unwrap();
        assert_eq!(r.error, 0);
        assert!(seen.insert(r.cookie), "duplicate reply {}", r.cookie);
    }
    // Pipelined reads, answered possibly out of order, each with its own data.
    for i in 0..200u64 {
        c.send_request(0, CMD_READ, 1000 + i, i * 4096, 4096, &[])
            .unwrap();
    }
    for _ in 0..200 {
        let r = c.read_reply(|_| 4096).unwrap();
        let i = r.cookie - 1000;
        assert_eq!(r.data, vec![(i % 251) as u8; 4096], "cookie {}", r.cookie);
    }
    c.send_request(0, CMD_DISC, 0, 0, 0, &[]).unwrap();
    assert!(c.is_closed());
}

#[test]
fn structured_reads_holes_and_block_status() {
    let (_t, g) = setup("structured");
    let mut c = RawClient::connect(g.addr).unwrap();
    c.structured_reply().unwrap();
    let r = c.set_meta_context("d1", "base:allocation").unwrap();
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    assert_eq!(c.go("d1").unwrap(), REP_ACK);
    // Data in the middle of a 1 MiB read; the rest is holes.
    assert_eq!(c.write(512 * 1024, &[9u8; 8192]).unwrap(), 0);
    let r = c.read(0, MIB as u32).unwrap();
    assert_eq!(r.error, 0);
    let mut want = vec![0u8; MIB as usize];
    want[512 * 1024..512 * 1024 + 8192].fill(9);
    assert_eq!(r.data, want);
    // Block status: hole, data, hole.
    let r = c.call(0, CMD_BLOCK_STATUS, 0, MIB as u32, &[]).unwrap();
    assert_eq!(r.error, 0);
    let d = &r.data[4..];
    let ext: Vec<(u32, u32)> = d
        .chunks(8)
        .map(|x| {
            (
                u32::from_be_bytes(x[0..4].try_into().unwrap()),
                u32::from_be_bytes(x[4..8].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(ext.iter().map(|e| u64::from(e.0)).sum::<u64>(), MIB);
    assert!(ext.iter().any(|e| e.1 == 0), "a data extent: {ext:?}");
    assert!(ext.iter().any(|e| e.1 == 3), "a hole extent: {ext:?}");
    // A read past the end gets a structured error, not a simple reply.
    let r = c.read(c.size, 512).unwrap();
    assert_eq!(r.error, EINVAL);
}

/// Fills `d1` (16 MiB) with a known pattern in 1 MiB writes and returns it.
fn fill_d1(c: &mut RawClient) -> Vec<u8> {
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i * 7 % 253) as u8).collect();
    for chunk in 0..16u64 {
        let at = (chunk * MIB) as usize;
        assert_eq!(
            c.write(chunk * MIB, &data[at..at + MIB as usize]).unwrap(),
            0
        );
    }
    data
}

/// Large reads (which the gateway sends straight from the page cache) are exact on simple and
/// structured connections, at odd offsets and pipelined beside writes; a range with a hole
/// still goes out with an `OFFSET_HOLE` chunk.
#[test]
fn large_reads_are_exact_and_holes_still_go_out_as_holes() {
    let (_t, g) = setup("large-reads");
    let mut c = client(&g, "d1");
    let mut data = fill_d1(&mut c);
    for (off, len) in [
        (0, MIB),
        (4096, 2 * MIB),
        (12_345, 300_000),
        (15 * MIB, MIB),
        (0, 16 * MIB),
    ] {
        let r = c.read(off, len as u32).unwrap();
        assert_eq!(r.error, 0);
        assert!(
            r.data == data[off as usize..(off + len) as usize],
            "read {off}+{len}"
        );
    }

    // Pipelined: 1 MiB reads of the first half beside 1 MiB writes of the second half.
    let fresh: Vec<u8> = (0..8 * MIB).map(|i| (i * 11 % 241) as u8).collect();
    for i in 0..8u64 {
        c.send_request(0, CMD_READ, 100 + i, i * MIB, MIB as u32, &[])
            .unwrap();
        let at = (i * MIB) as usize;
        let payload = &fresh[at..at + MIB as usize];
        c.send_request(0, CMD_WRITE, 200 + i, (8 + i) * MIB, MIB as u32, payload)
            .unwrap();
    }
    for _ in 0..16 {
        let r = c
            .read_reply(|cookie| if cookie < 200 { MIB as usize } else { 0 })
            .unwrap();
        assert_eq!(r.error, 0, "cookie {}", r.cookie);
        if r.cookie < 200 {
            let at = ((r.cookie - 100) * MIB) as usize;
            assert!(r.data == data[at..at + MIB as usize], "cookie {}", r.cookie);
        }
    }
    data[8 * MIB as usize..].copy_from_slice(&fresh);
    let r = c.read(0, 16 * MIB as u32).unwrap();
    assert!(r.data == data, "whole disk after the pipelined writes");

    // Structured: one data chunk for a range of data; holes after a trim.
    let mut s = RawClient::connect(g.addr).unwrap();
    s.structured_reply().unwrap();
    assert_eq!(s.go("d1").unwrap(), REP_ACK);
    let r = s.read(MIB, 2 * MIB as u32).unwrap();
    assert_eq!((r.error, r.chunks.as_slice()), (0, &[1u16][..]));
    assert!(r.data == data[MIB as usize..3 * MIB as usize]);
    let t = s.call(0, CMD_TRIM, MIB + 65_536, 131_072, &[]).unwrap();
    assert_eq!(t.error, 0);
    data[(MIB + 65_536) as usize..(MIB + 196_608) as usize].fill(0);
    let r = s.read(MIB, 2 * MIB as u32).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.chunks.contains(&2), "a hole chunk: {:?}", r.chunks);
    assert!(r.data == data[MIB as usize..3 * MIB as usize]);
}

/// An image shrunk under the gateway (an admin's mistake) costs the connections reading it,
/// never the gateway: replies that were queued as page-cache ranges fail in the kernel's copy
/// (the connection closes) instead of killing the process, and other disks keep serving.
#[test]
fn an_image_shrunk_under_the_gateway_does_not_bring_it_down() {
    let (t, g) = setup("shrunk");
    let mut c = client(&g, "d1");
    let data = fill_d1(&mut c);
    // 48 reads of 1 MiB without reading a reply: the first fill the socket buffers, the rest
    // wait in the gateway as page-cache ranges.
    const READS: u64 = 48;
    for i in 0..READS {
        let at = (i % 16) * MIB;
        c.send_request(0, CMD_READ, 1000 + i, at, MIB as u32, &[])
            .unwrap();
    }
    // The gateway has taken every request off the socket (each read was answered with a
    // page-cache range as it was taken) before the image shrinks.
    let client_port = c.sock.local_addr().unwrap().port();
    wait_server_read_all(g.port(), client_port, std::time::Duration::from_secs(20));
    let img = t.path().join("data").join("disks").join("d1.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut whole = 0;
    for _ in 0..READS {
        match c.read_reply(|_| MIB as usize) {
            Ok(r) if r.error == 0 => {
                let at = (((r.cookie - 1000) % 16) * MIB) as usize;
                assert!(r.data == data[at..at + MIB as usize], "cookie {}", r.cookie);
                whole += 1;
            }
            Ok(_) => {}
            Err(e) => {
                // Closed by the gateway, not a read timeout.
                let timeout = matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
                assert!(!timeout, "the connection hung instead of closing: {e}");
                break;
            }
        }
    }
    assert!(whole < READS, "the shrink cut no reply short");

    // The gateway is still up: the other disk serves, and d1 answers reads past its new end
    // with an error.
    let mut ro = client(&g, "ro");
    let r = ro.read(0, MIB as u32).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0x5a));
    let mut again = client(&g, "d1");
    let r = again.read(MIB, MIB as u32).unwrap();
    assert_ne!(r.error, 0, "a read past the image's end must fail");
    let r = again.read(0, 4096).unwrap();
    assert_eq!((r.error, &r.data[..]), (0, &data[..4096]));
    let log = g.log();
    assert!(
        log.contains("did a disk image shrink while it was served?"),
        "the gateway's log names the cause:\n{log}"
    );
    let status = g.stop();
    assert!(status.success(), "the gateway exited with {status}");
}
