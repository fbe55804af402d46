//! NBD wire constants and pure encoders/decoders (no I/O), per the NBD protocol
//! specification (`doc/proto.md` of the NBD project).
//!
//! Everything here is a plain function over byte slices so it can be unit-, property- and
//! fuzz-tested without sockets.

use thiserror::Error;

// ---- Handshake ---------------------------------------------------------------------------

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Transmission flags -------------------------------------------------------------------

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Requests and replies -----------------------------------------------------------------

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Size of a (compact) request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id handed out for `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

// ---- Errors (NBD error numbers, not host errno) ------------------------------------------

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---- Limits ------------------------------------------------------------------------------

/// Largest option payload accepted during the handshake; larger ones are drained and refused.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest string (export name, description, query) accepted, as the spec recommends (4096).
pub const MAX_STRING_LEN: usize = 4096;
/// Largest read/write payload per request. The spec says payloads up to 2^25 must not be treated
/// as denial of service, so this is what we accept and advertise as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Requests in flight per connection before the server stops reading new ones. Every request
/// holds its slot until its reply is on the socket, so this also bounds the replies queued for
/// a client that does not read them.
pub const MAX_IN_FLIGHT: usize = 64;
/// Bytes of write payloads and read replies held per connection (a read holds its share until
/// its reply is on the socket); bounds memory with big requests in flight.
pub const MAX_IN_FLIGHT_BYTES: usize = 128 * 1024 * 1024;
/// Most options one client may send before it is disconnected (a negotiation loop guard).
pub const MAX_OPTIONS: usize = 1024;
/// Most block status descriptors in one reply (the spec says a server SHOULD NOT exceed 2^20).
pub const MAX_EXTENTS: usize = 1 << 16;
/// Longest range one BLOCK_STATUS request is answered for (the reply may cover less than asked,
/// as the spec allows): at 4 KiB granularity at most [`MAX_EXTENTS`] extents are computed.
pub const MAX_BLOCK_STATUS_LEN: u64 = 256 * 1024 * 1024;
/// Longest range one CACHE request prefetches (the rest is ignored: CACHE is a hint): as much
/// disk reading as one READ can cause.
pub const MAX_CACHE_LEN: u64 = MAX_PAYLOAD as u64;
/// BLOCK_STATUS and CACHE requests running at once per connection.
pub const MAX_SCANS_IN_FLIGHT: usize = 4;
/// Most metadata queries in one LIST/SET_META_CONTEXT option.
pub const MAX_META_QUERIES: u32 = 128;

/// A request header as read off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header cannot be decoded. Both are fatal for the connection: after a bad
/// magic the stream is out of sync.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("request header is {0} bytes, need {REQUEST_HEADER_LEN}")]
    Short(usize),
    #[error("bad request magic {0:#010x} (stream out of sync)")]
    BadMagic(u32),
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Decodes a 28-byte request header.
pub fn decode_request(buf: &[u8]) -> Result<Request, DecodeError> {
    if buf.len() < REQUEST_HEADER_LEN {
        return Err(DecodeError::Short(buf.len()));
    }
    let magic = be_u32(&buf[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    Ok(Request {
        flags: be_u16(&buf[4..6]),
        command: be_u16(&buf[6..8]),
        cookie: be_u64(&buf[8..16]),
        offset: be_u64(&buf[16..24]),
        length: be_u32(&buf[24..28]),
    })
}

/// Encodes a request header (used by tests and fuzzers to build traffic).
pub fn encode_request(r: &Request) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header; `length` is the payload length that follows.
pub fn structured_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// An option reply header (the data of `length` bytes follows).
pub fn option_reply_header(option: u32, reply: u32, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Why an option payload is malformed (answered with `NBD_REP_ERR_INVALID`).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("option payload truncated")]
    Truncated,
    #[error("option payload has {0} trailing bytes")]
    Trailing(usize),
    #[error("string of {0} bytes exceeds the {MAX_STRING_LEN}-byte limit")]
    StringTooLong(usize),
    #[error("string is not UTF-8")]
    NotUtf8,
    #[error("too many queries ({0})")]
    TooManyQueries(u32),
}

/// A cursor over an option payload that never reads out of bounds.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        let end = self.pos.checked_add(n).ok_or(OptionError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(OptionError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, OptionError> {
        self.take(2).map(be_u16)
    }
    fn u32(&mut self) -> Result<u32, OptionError> {
        self.take(4).map(be_u32)
    }
    fn string(&mut self, len: usize) -> Result<String, OptionError> {
        if len > MAX_STRING_LEN {
            return Err(OptionError::StringTooLong(len));
        }
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| OptionError::NotUtf8)
    }
    fn finish(&self) -> Result<(), OptionError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(OptionError::Trailing(n)),
        }
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub fn decode_info(buf: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut c = Cursor::new(buf);
    let len = c.u32()? as usize;
    let name = c.string(len)?;
    let n = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        requests.push(c.u16()?);
    }
    c.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn decode_meta(buf: &[u8]) -> Result<MetaRequest, OptionError> {
    let mut c = Cursor::new(buf);
    let len = c.u32()? as usize;
    let export = c.string(len)?;
    let n = c.u32()?;
    if n > MAX_META_QUERIES {
        return Err(OptionError::TooManyQueries(n));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = c.u32()? as usize;
        queries.push(c.string(len)?);
    }
    c.finish()?;
    Ok(MetaRequest { export, queries })
}

/// Payload of `NBD_OPT_EXPORT_NAME`: the whole payload is the name.
pub fn decode_export_name(buf: &[u8]) -> Result<String, OptionError> {
    Cursor::new(buf).string(buf.len())
}

/// Encodes an `NBD_REP_ERR_*` message payload or any other string payload.
pub fn string_payload(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Does a metadata query select `base:allocation`? (`base:` alone is the namespace wildcard,
/// valid for LIST only.)
pub fn query_matches_base_allocation(query: &str, listing: bool) -> bool {
    query == BASE_ALLOCATION || (listing && query == "base:")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command, cookie, offset, length };
            prop_assert_eq!(decode_request(&encode_request(&r)), Ok(r));
        }

        #[test]
        fn request_decoder_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_request(&buf);
        }

        #[test]
        fn option_decoders_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_info(&buf);
            let _ = decode_meta(&buf);
            let _ = decode_export_name(&buf);
        }

        #[test]
        fn info_round_trip(name in "[a-z0-9]{0,40}", reqs in proptest::collection::vec(any::<u16>(), 0..8)) {
            let mut b = Vec::new();
            b.extend_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
            for r in &reqs { b.extend_from_slice(&r.to_be_bytes()); }
            prop_assert_eq!(decode_info(&b), Ok(InfoRequest { name: name.clone(), requests: reqs.clone() }));
            // Every truncation is reported, never a panic or a wrong decode.
            for cut in 0..b.len() {
                prop_assert!(decode_info(&b[..cut]).is_err());
            }
        }
    }

    #[test]
    fn bad_magic_is_reported() {
        let mut b = encode_request(&Request {
            flags: 0,
            command: 0,
            cookie: 1,
            offset: 0,
            length: 512,
        });
        b[0] ^= 0xff;
        assert!(matches!(decode_request(&b), Err(DecodeError::BadMagic(_))));
    }

    #[test]
    fn meta_query_limits() {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&(MAX_META_QUERIES + 1).to_be_bytes());
        assert_eq!(
            decode_meta(&b),
            Err(OptionError::TooManyQueries(MAX_META_QUERIES + 1))
        );
        // A huge string length must not allocate or panic.
        let mut b = Vec::new();
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_meta(&b).is_err());
    }
}
