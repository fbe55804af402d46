//! A deliberately small NBD client over a raw socket, for protocol and negative tests: it
//! lets a test send exactly the bytes it wants, including malformed ones.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A reply in the transmission phase: (error, cookie, payload of all chunks).
#[derive(Debug)]
pub struct Reply {
    pub error: u32,
    pub cookie: u64,
    pub data: Vec<u8>,
    /// The structured chunk types, in order (empty for a simple reply).
    pub chunks: Vec<u16>,
}

pub struct RawClient {
    pub sock: TcpStream,
    pub structured: bool,
    pub size: u64,
    pub tflags: u16,
}

impl RawClient {
    /// Connects and completes the greeting (fixed newstyle, NO_ZEROES).
    pub fn connect(addr: SocketAddr) -> io::Result<RawClient> {
        let sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))?;
        sock.set_nodelay(true)?;
        let mut c = RawClient {
            sock,
            structured: false,
            size: 0,
            tflags: 0,
        };
        let mut hello = [0u8; 18];
        c.sock.read_exact(&mut hello)?;
        assert_eq!(&hello[0..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        c.sock.write_all(&3u32.to_be_bytes())?;
        Ok(c)
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.sock.write_all(&b)
    }

    pub fn read_opt_reply(&mut self) -> io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.sock.read_exact(&mut h)?;
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.sock.read_exact(&mut data)?;
        Ok(OptReply { option, kind, data })
    }

    /// Reads option replies until a final one (ACK or error).
    pub fn read_until_final(&mut self) -> io::Result<Vec<OptReply>> {
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply()?;
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            v.push(r);
            if last {
                return Ok(v);
            }
        }
    }

    pub fn structured_reply(&mut self) -> io::Result<()> {
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let r = self.read_until_final()?;
        assert_eq!(r.last().map(|r| r.kind), Some(REP_ACK));
        self.structured = true;
        Ok(())
    }

    pub fn set_meta_context(&mut self, export: &str, query: &str) -> io::Result<Vec<OptReply>> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(query.len() as u32).to_be_bytes());
        d.extend_from_slice(query.as_bytes());
        self.send_option(OPT_SET_META_CONTEXT, &d)?;
        self.read_until_final()
    }

    /// NBD_OPT_GO; returns the final reply kind (REP_ACK on success).
    pub fn go(&mut self, export: &str) -> io::Result<u32> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &d)?;
        let replies = self.read_until_final()?;
        for r in &replies {
            if r.kind == REP_INFO && r.data.len() >= 12 && r.data[0..2] == [0, 0] {
                self.size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                self.tflags = u16::from_be_bytes(r.data[10..12].try_into().unwrap());
            }
        }
        Ok(replies.last().map(|r| r.kind).unwrap_or(0))
    }

    /// Sends one request header (and payload).
    pub fn send_request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.sock.write_all(&b)
    }

    /// Reads one complete reply. `read_len` is the data length expected for a successful
    /// simple reply to a READ with this cookie (the caller knows what it asked).
    pub fn read_reply(&mut self, read_len: impl Fn(u64) -> usize) -> io::Result<Reply> {
        let mut magic = [0u8; 4];
        self.sock.read_exact(&mut magic)?;
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.sock.read_exact(&mut h)?;
                let error = u32::from_be_bytes(h[0..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let mut data = Vec::new();
                if error == 0 {
                    data = vec![0u8; read_len(cookie)];
                    self.sock.read_exact(&mut data)?;
                }
                Ok(Reply {
                    error,
                    cookie,
                    data,
                    chunks: Vec::new(),
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                // Collect chunks until DONE.
                let mut error = 0;
                let mut data = Vec::new();
                let mut chunks = Vec::new();
                let mut cookie;
                let mut first = true;
                loop {
                    if !first {
                        let mut m = [0u8; 4];
                        self.sock.read_exact(&mut m)?;
                        assert_eq!(u32::from_be_bytes(m), STRUCTURED_REPLY_MAGIC);
                    }
                    first = false;
                    let mut h = [0u8; 16];
                    self.sock.read_exact(&mut h)?;
                    let flags = u16::from_be_bytes(h[0..2].try_into().unwrap());
                    let kind = u16::from_be_bytes(h[2..4].try_into().unwrap());
                    cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                    let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                    chunks.push(kind);
                    let mut p = vec![0u8; len as usize];
                    self.sock.read_exact(&mut p)?;
                    match kind {
                        1 => data.extend_from_slice(&p[8..]),
                        2 => {
                            let l = u32::from_be_bytes(p[8..12].try_into().unwrap());
                            data.extend(std::iter::repeat_n(0u8, l as usize));
                        }
                        5 => data.extend_from_slice(&p),
                        k if k & 0x8000 != 0 => {
                            error = u32::from_be_bytes(p[0..4].try_into().unwrap());
                        }
                        _ => {}
                    }
                    if flags & 1 != 0 {
                        break;
                    }
                }
                Ok(Reply {
                    error,
                    cookie,
                    data,
                    chunks,
                })
            }
            m => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad reply magic {m:#x}"),
            )),
        }
    }

    /// One request, one reply.
    pub fn call(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Reply> {
        self.send_request(flags, cmd, 7, offset, len, payload)?;
        let want = if cmd == CMD_READ { len as usize } else { 0 };
        self.read_reply(|_| want)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<u32> {
        Ok(self
            .call(0, CMD_WRITE, offset, data.len() as u32, data)?
            .error)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Reply> {
        self.call(0, CMD_READ, offset, len, &[])
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        Ok(self.call(0, CMD_FLUSH, 0, 0, &[])?.error)
    }

    /// Is the connection closed by the server (EOF or reset within the read timeout)?
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.sock.read(&mut b), Ok(0) | Err(_))
    }
}
