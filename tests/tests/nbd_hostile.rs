//! Hostile clients over raw sockets against the real `standby serve`: replies never read,
//! thousands of idle connections, a byte-a-second handshake, huge CACHE and BLOCK_STATUS
//! ranges. Each checks the gateway's resident memory (`VmRSS` in /proc/PID/status) against a
//! stated bound and that another client keeps being served.
//!
//! `STANDBY_HOSTILE_CONNECTIONS` sets how many idle connections the flood test opens (2000 by
//! default; 10000 for the full-size run).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use standby_e2e::nbd_client::*;
use standby_e2e::{run, standby, test_dir, wait_server_closed, Gateway};

const MIB: u64 = 1 << 20;
const CMD_CACHE: u16 = 5;

/// The gateway's resident set size in bytes.
fn rss(g: &Gateway) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", g.pid())).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// A TCP connection to `dst` from the loopback address `src` (127.0.0.0/8 is all local, so
/// one machine can play many client addresses).
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(dst) = dst else {
        panic!("IPv4 only")
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket; on success its descriptor is owned by the TcpStream below, on
    // failure it is closed here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let a = sin(src, 0);
        let b = sin(*dst.ip(), dst.port());
        if libc::bind(fd, (&a as *const libc::sockaddr_in).cast(), len) != 0
            || libc::connect(fd, (&b as *const libc::sockaddr_in).cast(), len) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// Reads the server's 18-byte greeting: `true` if the connection was admitted, `false` if the
/// server closed it without one.
fn greeted(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = [0u8; 18];
    match s.read_exact(&mut hello) {
        Ok(()) => {
            assert_eq!(&hello[..8], b"NBDMAGIC");
            true
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            false
        }
        Err(e) => panic!("waiting for the greeting: {e}"),
    }
}

/// Raises this process's open-file limit to its hard limit (the gateway inherits it).
fn raise_fd_limit(need: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
    assert!(
        r.rlim_cur >= need,
        "the open-file limit ({}) is below the {need} this test needs: raise `ulimit -Hn`",
        r.rlim_cur
    );
}

/// A well-behaved client: handshake, write 64 KiB, read it back.
fn good_client(g: &Gateway, export: &str, seed: u8) {
    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go(export).unwrap(), REP_ACK);
    let data: Vec<u8> = (0..65536u32).map(|i| (i as u8) ^ seed).collect();
    assert_eq!(c.write(MIB, &data).unwrap(), 0);
    let r = c.read(MIB, 65536).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.data == data, "good client read back other data");
}

fn setup(name: &str, size: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let t = test_dir(name);
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "d1", "--size", size]));
    (t, dd)
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / MIB as f64)
}

/// A client pipelines cheap requests (each answered at once with an error) and never reads a
/// reply. Before every reply held a slot, the server read on and queued replies without
/// limit; now it stops reading after 64 unanswered requests, TCP pushes back, and the client
/// is disconnected once it has left its replies unread for the reply timeout.
#[test]
fn never_read_replies_with_cheap_commands() {
    let (_t, dd) = setup("hostile-noread", "64M");
    let g = Gateway::start(&dd, &["--reply-timeout", "15"]);
    good_client(&g, "d1", 1);
    let before = rss(&g);

    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go("d1").unwrap(), REP_ACK);
    c.sock
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // One batch: 1000 READs with an invalid flag (answered EINVAL without touching the disk).
    let mut batch = Vec::new();
    for i in 0..1000u64 {
        batch.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        batch.extend_from_slice(&0x8000u16.to_be_bytes());
        batch.extend_from_slice(&CMD_READ.to_be_bytes());
        batch.extend_from_slice(&i.to_be_bytes());
        batch.extend_from_slice(&0u64.to_be_bytes());
        batch.extend_from_slice(&4096u32.to_be_bytes());
    }
    const LIMIT: usize = 2_000_000;
    let mut sent = 0usize;
    let start = Instant::now();
    while sent < LIMIT {
        match c.sock.write_all(&batch) {
            Ok(()) => sent += 1000,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("sending requests after {:?}: {e}", start.elapsed()),
        }
    }
    let grown = rss(&g).saturating_sub(before);
    eprintln!(
        "never-read client: {sent} requests accepted before push-back; gateway RSS grew {}",
        mib(grown)
    );
    // What the kernel's socket buffers hold is far below this; the server stopped reading.
    assert!(
        sent < LIMIT,
        "the server read {sent} requests without a reply being read"
    );
    assert!(grown < 32 * MIB, "gateway RSS grew {}", mib(grown));
    good_client(&g, "d1", 2);
    // Its replies unread for 15 s: disconnected.
    let port = c.sock.local_addr().unwrap().port();
    wait_server_closed(g.port(), port, Duration::from_secs(60));
    assert!(g.log().contains("took no reply byte"), "{}", g.log());
    good_client(&g, "d1", 3);
}

/// Thousands of connections that connect and send nothing. All are admitted (the caps are
/// raised for the test) and held through a long handshake timeout, to measure what an idle
/// connection costs; another client is served meanwhile.
#[test]
fn many_idle_connections() {
    let n: usize = std::env::var("STANDBY_HOSTILE_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    raise_fd_limit(n as u64 + 200);
    let (_t, dd) = setup("hostile-idle", "64M");
    let max = (n + 100).to_string();
    let g = Gateway::start(
        &dd,
        &[
            "--max-sessions",
            &max,
            "--max-sessions-per-client",
            &max,
            "--handshake-timeout",
            "600",
        ],
    );
    good_client(&g, "d1", 1);
    let before = rss(&g);
    let src = Ipv4Addr::new(127, 0, 0, 2);
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = connect_from(src, g.addr).unwrap();
        assert!(
            greeted(&mut s),
            "idle connection {} not admitted",
            idle.len()
        );
        idle.push(s);
    }
    let grown = rss(&g).saturating_sub(before);
    eprintln!(
        "{n} idle connections: gateway RSS grew {} ({} bytes each)",
        mib(grown),
        grown / n as u64
    );
    // Stated bound: 64 KiB of gateway memory per idle connection.
    assert!(
        grown < n as u64 * 64 * 1024,
        "{n} idle connections cost {}",
        mib(grown)
    );
    good_client(&g, "d1", 2);
    drop(idle);
}

/// Session caps: per client address and in total. Connections past a cap are closed before
/// the greeting; once sessions end, new ones are admitted again.
#[test]
fn session_caps_in_total_and_per_client() {
    let (_t, dd) = setup("hostile-caps", "64M");
    let g = Gateway::start(
        &dd,
        &["--max-sessions", "40", "--max-sessions-per-client", "10"],
    );
    let attacker = |last: u8| Ipv4Addr::new(127, 0, 0, last);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..15 {
        let mut s = connect_from(attacker(2), g.addr).unwrap();
        if greeted(&mut s) {
            held.push(s);
        } else {
            refused += 1;
        }
    }
    assert_eq!((held.len(), refused), (10, 5), "per-client cap of 10");
    for last in 3..=5 {
        for _ in 0..10 {
            let mut s = connect_from(attacker(last), g.addr).unwrap();
            assert!(greeted(&mut s), "127.0.0.{last} under its cap was refused");
            held.push(s);
        }
    }
    // 40 open: the total cap refuses everyone, the good client included.
    let mut s = connect_from(attacker(1), g.addr).unwrap();
    assert!(!greeted(&mut s), "admitted past the total cap");
    assert!(g.log().contains("maximum of sessions"), "{}", g.log());
    // Sessions end: the good client gets in again.
    held.truncate(20);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = connect_from(attacker(1), g.addr).unwrap();
        if greeted(&mut s) {
            break;
        }
        assert!(Instant::now() < deadline, "good client still refused");
        std::thread::sleep(Duration::from_millis(50));
    }
    good_client(&g, "d1", 1);
}

/// A client that sends its handshake one byte a second is closed at the handshake timeout,
/// while another client is served.
#[test]
fn byte_a_second_handshake_is_closed() {
    let (_t, dd) = setup("hostile-slowloris", "64M");
    let g = Gateway::start(&dd, &["--handshake-timeout", "3"]);
    let mut s = TcpStream::connect(g.addr).unwrap();
    assert!(greeted(&mut s));
    let start = Instant::now();
    // Client flags, then an option header, one byte at a time: the attack's own pace.
    let mut bytes = 3u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&OPT_GO.to_be_bytes());
    let mut closed_after = None;
    for b in bytes {
        if s.write_all(&[b]).is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        good_client(&g, "d1", b);
        std::thread::sleep(Duration::from_secs(1));
        s.set_nonblocking(true).unwrap();
        let mut x = [0u8; 1];
        let r = s.read(&mut x);
        s.set_nonblocking(false).unwrap();
        match r {
            Ok(0) => {
                closed_after = Some(start.elapsed());
                break;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => {
                closed_after = Some(start.elapsed());
                break;
            }
            Ok(_) => panic!("the server answered half an option"),
        }
    }
    let after = closed_after.expect("a byte-a-second handshake was never closed");
    eprintln!("byte-a-second handshake closed after {after:?}");
    assert!(after >= Duration::from_secs(2) && after < Duration::from_secs(10));
}

/// With --idle-timeout, a negotiated connection that sends nothing is closed.
#[test]
fn idle_timeout_closes_quiet_connections() {
    let (_t, dd) = setup("hostile-idle-timeout", "64M");
    let g = Gateway::start(&dd, &["--idle-timeout", "2"]);
    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go("d1").unwrap(), REP_ACK);
    let port = c.sock.local_addr().unwrap().port();
    // Active in the meantime: a request every half second keeps a connection open.
    let mut busy = RawClient::connect(g.addr).unwrap();
    assert_eq!(busy.go("d1").unwrap(), REP_ACK);
    for _ in 0..8 {
        assert_eq!(busy.flush().unwrap(), 0);
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_server_closed(g.port(), port, Duration::from_secs(10));
    assert_eq!(busy.flush().unwrap(), 0);
    assert!(g.log().contains("idle timeout"), "{}", g.log());
}

/// An image with 4 KiB of data every MiB over 8 GiB: block status over a range finds one
/// extent pair per MiB.
fn fragmented_image(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(8 << 30).unwrap();
    for i in 0..8192u64 {
        f.write_all_at(&[0xaa; 4096], i * MIB).unwrap();
    }
}

/// BLOCK_STATUS over 4 GiB is answered for at most 256 MiB; thousands of huge BLOCK_STATUS
/// and CACHE requests whose replies are never read leave the gateway's memory bounded, and
/// another client is served.
#[test]
fn huge_block_status_and_cache_ranges() {
    let t = test_dir("hostile-scan");
    let dd = t.path().join("data");
    let img = t.path().join("frag.raw");
    fragmented_image(&img);
    run(standby(&dd).args(["disk", "import", "frag"]).arg(&img));
    run(standby(&dd).args(["disk", "create", "d1", "--size", "64M"]));
    let g = Gateway::start(&dd, &[]);

    let mut c = RawClient::connect(g.addr).unwrap();
    c.structured_reply().unwrap();
    let r = c.set_meta_context("frag", "base:allocation").unwrap();
    assert!(r.iter().any(|r| r.kind == REP_META_CONTEXT));
    assert_eq!(c.go("frag").unwrap(), REP_ACK);
    let huge = u32::MAX - 4095;
    c.send_request(0, CMD_BLOCK_STATUS, 1, 0, huge, &[])
        .unwrap();
    let reply = c.read_reply(|_| 0).unwrap();
    assert_eq!(reply.error, 0);
    let covered: u64 = reply.data[4..]
        .chunks(8)
        .map(|d| u64::from(u32::from_be_bytes(d[0..4].try_into().unwrap())))
        .sum();
    let extents = (reply.data.len() - 4) / 8;
    eprintln!(
        "block status for 4 GiB covered {} in {extents} extents",
        mib(covered)
    );
    assert!(covered > 0 && covered <= 256 * MIB, "covered {covered}");
    c.send_request(0, CMD_CACHE, 2, 0, huge, &[]).unwrap();
    assert_eq!(c.read_reply(|_| 0).unwrap().error, 0);

    let before = rss(&g);
    // Never read: 20,000 huge requests, alternating, from one connection.
    c.sock
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut sent = 0u64;
    'send: for i in 0..20_000u64 {
        let cmd = if i % 2 == 0 {
            CMD_BLOCK_STATUS
        } else {
            CMD_CACHE
        };
        match c.send_request(0, cmd, 10 + i, (i % 16) * MIB, huge - 16 * MIB as u32, &[]) {
            Ok(()) => sent += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break 'send
            }
            Err(e) => panic!("{e}"),
        }
    }
    good_client(&g, "d1", 7);
    let grown = rss(&g).saturating_sub(before);
    eprintln!(
        "{sent} huge BLOCK_STATUS/CACHE requests unread: gateway RSS grew {}",
        mib(grown)
    );
    assert!(grown < 64 * MIB, "gateway RSS grew {}", mib(grown));
}

/// Four connections pipeline 32 MiB reads of a sparse disk (read into buffers) and never read
/// the replies. Each connection alone could hold 128 MiB; the server's memory budget
/// (`--memory-budget 64M`) bounds them together. Once the reply timeout disconnects them,
/// another client is served.
#[test]
fn memory_budget_bounds_all_connections_together() {
    let (_t, dd) = setup("hostile-budget", "256M");
    let g = Gateway::start(&dd, &["--memory-budget", "64M", "--reply-timeout", "5"]);
    good_client(&g, "d1", 1);
    let before = rss(&g);
    let mut attackers = Vec::new();
    for a in 0..4u64 {
        let mut c = RawClient::connect(g.addr).unwrap();
        assert_eq!(c.go("d1").unwrap(), REP_ACK);
        for i in 0..8u64 {
            let offset = ((a + i) % 8) * 32 * MIB;
            c.send_request(0, CMD_READ, i, offset, 32 << 20, &[])
                .unwrap();
        }
        attackers.push(c);
    }
    // The highest resident size while the replies sit unread (before the reply timeout).
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        peak = peak.max(rss(&g));
        std::thread::sleep(Duration::from_millis(20));
    }
    let grown = peak.saturating_sub(before);
    eprintln!(
        "4 connections x 8 unread 32 MiB reads: gateway RSS peak +{}",
        mib(grown)
    );
    // 64 MiB of budget, plus slack for the reply writers' bookkeeping.
    assert!(grown < 96 * MIB, "gateway RSS grew {}", mib(grown));
    good_client(&g, "d1", 2);
    drop(attackers);
}
