//! Change-log segment format (version 3; versions 1 and 2 still decode): pure encode/decode
//! functions.
//!
//! A segment file (`NNNNNNNNNNNNNNNNNNNN.log`, the segment sequence number in 20 decimal digits)
//! is a header, zero or more records, and — once sealed — a footer. All integers are
//! little-endian. CRC32C is the Castagnoli CRC (iSCSI polynomial).
//!
//! **Header** (72 bytes, at offset 0):
//!
//! | offset | size | field                                                       |
//! |-------:|-----:|-------------------------------------------------------------|
//! | 0      | 8    | magic `STBYHRL1`                                            |
//! | 8      | 2    | format version (3; 1 and 2 are read too)                    |
//! | 10     | 2    | header length (72)                                          |
//! | 12     | 4    | flags (0)                                                   |
//! | 16     | 16   | disk id: first 16 bytes of SHA-256 of the disk's id string  |
//! | 32     | 8    | chain id (random, new for every fresh log chain)            |
//! | 40     | 8    | segment sequence number                                     |
//! | 48     | 8    | first LSN of this segment                                   |
//! | 56     | 8    | disk size in bytes                                          |
//! | 64     | 4    | reserved (0)                                                |
//! | 68     | 4    | CRC32C of bytes 0..68                                       |
//!
//! **Record** (40-byte header, then `data length` bytes of data):
//!
//! | offset | size | field                                                          |
//! |-------:|-----:|----------------------------------------------------------------|
//! | 0      | 4    | magic `REC1`                                                   |
//! | 4      | 4    | CRC32C of record-header bytes 8..40 followed by the data        |
//! | 8      | 8    | LSN (log sequence number; +1 per record, no gaps in a chain)   |
//! | 16     | 1    | kind: 1 write, 2 trim, 3 write-zeroes, 4 flush barrier, 5 extent |
//! | 17     | 1    | flags: bit 0 FUA, bit 1 may-trim (write-zeroes)                |
//! | 18     | 2    | ahead: extents after its last one the record may heat (`hot`); 0 |
//! | 20     | 4    | data length (= length for writes, 0 otherwise)                 |
//! | 24     | 8    | offset in the disk                                             |
//! | 32     | 8    | length in bytes                                                |
//! | 40     | n    | data (writes only)                                             |
//!
//! **Footer** (64 bytes, written when the segment is sealed; nothing follows it):
//!
//! | offset | size | field                                                          |
//! |-------:|-----:|----------------------------------------------------------------|
//! | 0      | 4    | magic `END1`                                                   |
//! | 4      | 4    | CRC32C of footer bytes 8..64                                   |
//! | 8      | 8    | record count                                                   |
//! | 16     | 8    | last LSN (first LSN − 1 when the segment has no record)        |
//! | 24     | 8    | footer offset (= length of header + records)                   |
//! | 32     | 32   | seal digest (below)                                            |
//!
//! **Seal digest.** Version 3: SHA-256 of the segment header (bytes 0..72) followed by every
//! record's 40-byte header, in order ([`SealDigest`]). Each record header carries the CRC32C of
//! its own header fields and data, so the digest chains the CRCs: it detects a record removed,
//! added, reordered or changed in its header, and any change of the data that changes its
//! CRC32C (every burst of up to 32 bits, and other damage with probability 1 − 2⁻³² per
//! record; the decoder checks each record's CRC anyway). It costs about 100 ns per record, kept
//! up to date while records are appended, so sealing no longer reads the segment back.
//! Versions 1 and 2: SHA-256 of segment bytes 0..footer offset (cryptographic strength over
//! the data too, at the cost of hashing every byte once more at the seal).
//!
//! An *extent* record (kind 5, version 2) is a write whose bytes stay in the image: length > 0,
//! data length 0, so its CRC32C covers the header alone (see [`super::extent`]). Version 1
//! segments never hold one; a version 1 reader refuses version 2 segments at the header
//! ("unsupported segment format version 2") instead of cutting them at the first extent.
//!
//! A segment without a footer is the *active* one (or was active when the process stopped).
//! Decoding it stops at the first byte range that is not a whole, valid record: that is the
//! cut. Everything before the cut is trusted, everything after is discarded.
//!
//! Longer than most files (~860 lines, ~340 of them tests): every byte layout of the log and
//! its decoder stay in one file, so a format change is one review.

use sha2::{Digest, Sha256};

pub const SEGMENT_MAGIC: [u8; 8] = *b"STBYHRL1";
/// The version written; [`MIN_FORMAT_VERSION`]..=this one are read.
pub const FORMAT_VERSION: u16 = 3;
/// Oldest version read (version 1: no extent records).
pub const MIN_FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 72;
pub const RECORD_MAGIC: [u8; 4] = *b"REC1";
pub const RECORD_HEADER_LEN: usize = 40;
pub const FOOTER_MAGIC: [u8; 4] = *b"END1";
pub const FOOTER_LEN: usize = 64;
/// Largest data payload of one record (larger requests are never produced by the NBD server,
/// whose limit is 32 MiB; anything bigger in a file is treated as corruption).
pub const MAX_RECORD_DATA: u32 = 64 << 20;

pub const FLAG_FUA: u8 = 1;
pub const FLAG_MAY_TRIM: u8 = 2;
/// On an extent: a small write whose bytes are logged later, at the next FLUSH or cut (a
/// write record over the same range then follows it; see `changelog::extent::deferred`).
/// Readers that do not know it treat the record as any extent, which is what it is.
pub const FLAG_DEFERRED: u8 = 4;
/// On a flush barrier: the image was synced, after every record up to LSN `offset` had
/// reached it, before this record was appended (written by a sync round that syncs the
/// image; see "Host crash" in `changelog::replay`).
pub const FLAG_IMAGE_SYNCED: u8 = 8;

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Write = 1,
    Trim = 2,
    WriteZeroes = 3,
    Flush = 4,
    /// A write whose bytes stay in the image (no data in the log).
    Extent = 5,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Write,
            2 => Kind::Trim,
            3 => Kind::WriteZeroes,
            4 => Kind::Flush,
            5 => Kind::Extent,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Write => "write",
            Kind::Trim => "trim",
            Kind::WriteZeroes => "zero",
            Kind::Flush => "flush",
            Kind::Extent => "extent",
        }
    }
}

/// A segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub disk_id: [u8; 16],
    pub chain_id: u64,
    pub seq: u64,
    pub first_lsn: u64,
    pub disk_size: u64,
}

/// The fixed part of a record (everything but the data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub lsn: u64,
    pub kind: Kind,
    pub flags: u8,
    /// Extents after the one holding the record's last byte that it may have made hot
    /// (`changelog::hot`, "Heating ahead"); 0 for most records.
    pub ahead: u16,
    pub offset: u64,
    pub length: u64,
    pub data_len: u32,
}

impl RecordHeader {
    /// Bytes of the image the record stands for beyond its own bytes in the log: an extent
    /// record's length (a deferred small write's too), else 0. The backlog of a segment
    /// (`SegmentInfo::extent_bytes`) is the sum of these over its records, counted the same
    /// way by every path that appends a record and when a log is reopened.
    ///
    /// A deferred extent counts its length from the start, so that writes waiting for a
    /// FLUSH or a cut show in the backlog; when the pass logs their bytes, that write record
    /// counts them again (an overestimate of at most the deferred bytes logged, until the cut
    /// that holds both is shipped: the backlog errs towards a resync, never away from one).
    pub fn backlog_extra(&self) -> u64 {
        match self.kind {
            Kind::Extent => self.length,
            _ => 0,
        }
    }
}

/// A segment footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub record_count: u64,
    pub last_lsn: u64,
    pub footer_offset: u64,
    pub sha256: [u8; 32],
}

/// A disk id string reduced to the 16 bytes stored in headers.
pub fn disk_id_bytes(id: &str) -> [u8; 16] {
    let h = Sha256::digest(id.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h[..16]);
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub fn encode_header(h: &SegmentHeader) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&SEGMENT_MAGIC);
    b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    b[16..32].copy_from_slice(&h.disk_id);
    b[32..40].copy_from_slice(&h.chain_id.to_le_bytes());
    b[40..48].copy_from_slice(&h.seq.to_le_bytes());
    b[48..56].copy_from_slice(&h.first_lsn.to_le_bytes());
    b[56..64].copy_from_slice(&h.disk_size.to_le_bytes());
    let crc = crc32c::crc32c(&b[..68]);
    b[68..72].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Why a header does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    Short(usize),
    Magic,
    Version(u16),
    Crc,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Short(n) => write!(f, "segment is {n} bytes, shorter than its header"),
            HeaderError::Magic => write!(f, "not a change-log segment (bad magic)"),
            HeaderError::Version(v) => write!(f, "unsupported segment format version {v}"),
            HeaderError::Crc => write!(f, "segment header checksum mismatch"),
        }
    }
}

pub fn decode_header(b: &[u8]) -> Result<SegmentHeader, HeaderError> {
    if b.len() < HEADER_LEN {
        return Err(HeaderError::Short(b.len()));
    }
    if b[0..8] != SEGMENT_MAGIC {
        return Err(HeaderError::Magic);
    }
    let version = u16_at(b, 8);
    if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version)
        || usize::from(u16_at(b, 10)) != HEADER_LEN
    {
        return Err(HeaderError::Version(version));
    }
    if crc32c::crc32c(&b[..68]) != u32_at(b, 68) {
        return Err(HeaderError::Crc);
    }
    let mut disk_id = [0u8; 16];
    disk_id.copy_from_slice(&b[16..32]);
    Ok(SegmentHeader {
        disk_id,
        chain_id: u64_at(b, 32),
        seq: u64_at(b, 40),
        first_lsn: u64_at(b, 48),
        disk_size: u64_at(b, 56),
    })
}

/// Encodes a record header; `data` is the payload (empty for non-writes). The CRC covers the
/// header fields and the data.
pub fn encode_record_header(r: &RecordHeader, data: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let mut b = [0u8; RECORD_HEADER_LEN];
    b[0..4].copy_from_slice(&RECORD_MAGIC);
    b[8..16].copy_from_slice(&r.lsn.to_le_bytes());
    b[16] = r.kind as u8;
    b[17] = r.flags;
    b[18..20].copy_from_slice(&r.ahead.to_le_bytes());
    b[20..24].copy_from_slice(&r.data_len.to_le_bytes());
    b[24..32].copy_from_slice(&r.offset.to_le_bytes());
    b[32..40].copy_from_slice(&r.length.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[8..]), data);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Encodes a whole record (header and data) into one buffer.
pub fn encode_record(r: &RecordHeader, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_HEADER_LEN + data.len());
    v.extend_from_slice(&encode_record_header(r, data));
    v.extend_from_slice(data);
    v
}

pub fn encode_footer(f: &Footer) -> [u8; FOOTER_LEN] {
    let mut b = [0u8; FOOTER_LEN];
    b[0..4].copy_from_slice(&FOOTER_MAGIC);
    b[8..16].copy_from_slice(&f.record_count.to_le_bytes());
    b[16..24].copy_from_slice(&f.last_lsn.to_le_bytes());
    b[24..32].copy_from_slice(&f.footer_offset.to_le_bytes());
    b[32..64].copy_from_slice(&f.sha256);
    let crc = crc32c::crc32c(&b[8..]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// One decoded record; `data` is a range into the decoded buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub header: RecordHeader,
    /// Where this record starts in the segment.
    pub at: u64,
    /// Byte range of the data in the segment.
    pub data: std::ops::Range<usize>,
}

impl Record {
    /// Total encoded length.
    pub fn encoded_len(&self) -> u64 {
        (RECORD_HEADER_LEN + self.header.data_len as usize) as u64
    }
}

/// How a decoded segment ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A valid footer whose hash matches: the segment is sealed and intact.
    Sealed(Footer),
    /// The bytes end exactly after the last whole record, or only zeroes follow it to the
    /// end (the zeroes an active segment is written ahead with): an active segment, no torn
    /// tail.
    Open,
    /// Bytes after the last whole record that are not a valid record or footer: the cut
    /// point is `valid_len` and `reason` says what was found there.
    Torn { reason: String },
}

/// The result of decoding a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub header: SegmentHeader,
    pub records: Vec<Record>,
    /// Length of the trusted prefix: header plus whole records (the footer is not included).
    pub valid_len: u64,
    pub end: End,
}

impl Decoded {
    /// LSN of the last whole record, or `first_lsn - 1` when there is none.
    pub fn last_lsn(&self) -> u64 {
        self.records
            .last()
            .map(|r| r.header.lsn)
            .unwrap_or(self.header.first_lsn.wrapping_sub(1))
    }

    pub fn sealed(&self) -> bool {
        matches!(self.end, End::Sealed(_))
    }
}

/// Decodes one record at `at`. `Err(reason)` means no whole valid record starts there.
/// `expected_lsn` is the LSN the record must carry.
pub fn decode_record(b: &[u8], at: usize, expected_lsn: u64) -> Result<Record, String> {
    let rest = b.len().saturating_sub(at);
    if rest < RECORD_HEADER_LEN {
        return Err(format!(
            "partial record header ({rest} of {RECORD_HEADER_LEN} bytes)"
        ));
    }
    let h = &b[at..at + RECORD_HEADER_LEN];
    if h[0..4] != RECORD_MAGIC {
        return Err("no record magic".to_string());
    }
    let data_len = u32_at(h, 20);
    if data_len > MAX_RECORD_DATA {
        return Err(format!("implausible data length {data_len}"));
    }
    let total = RECORD_HEADER_LEN + data_len as usize;
    if rest < total {
        return Err(format!("partial record ({rest} of {total} bytes)"));
    }
    let data = at + RECORD_HEADER_LEN..at + total;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[8..]), &b[data.clone()]);
    if crc != u32_at(h, 4) {
        return Err("record checksum mismatch".to_string());
    }
    let kind = Kind::from_u8(h[16]).ok_or_else(|| format!("unknown record kind {}", h[16]))?;
    let header = RecordHeader {
        lsn: u64_at(h, 8),
        kind,
        flags: h[17],
        ahead: u16::from_le_bytes([h[18], h[19]]),
        offset: u64_at(h, 24),
        length: u64_at(h, 32),
        data_len,
    };
    let consistent = match kind {
        Kind::Write => u64::from(data_len) == header.length,
        Kind::Trim | Kind::WriteZeroes => data_len == 0,
        Kind::Flush => data_len == 0 && header.length == 0,
        Kind::Extent => data_len == 0 && header.length > 0,
    };
    if !consistent || header.offset.checked_add(header.length).is_none() {
        return Err("record fields are inconsistent".to_string());
    }
    if header.lsn != expected_lsn {
        return Err(format!(
            "LSN {} where {} was expected",
            header.lsn, expected_lsn
        ));
    }
    Ok(Record {
        header,
        at: at as u64,
        data,
    })
}

fn decode_footer(b: &[u8], at: usize, records: &[Record], last_lsn: u64) -> Result<Footer, String> {
    let count = records.len() as u64;
    let rest = b.len() - at;
    if rest != FOOTER_LEN {
        return Err(format!(
            "footer region is {rest} bytes, expected {FOOTER_LEN}"
        ));
    }
    let f = &b[at..];
    if crc32c::crc32c(&f[8..]) != u32_at(f, 4) {
        return Err("footer checksum mismatch".to_string());
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(&f[32..64]);
    let footer = Footer {
        record_count: u64_at(f, 8),
        last_lsn: u64_at(f, 16),
        footer_offset: u64_at(f, 24),
        sha256,
    };
    if footer.record_count != count
        || footer.last_lsn != last_lsn
        || footer.footer_offset != at as u64
    {
        return Err(format!(
            "footer says {} records up to LSN {} at {}, found {} up to LSN {} at {}",
            footer.record_count, footer.last_lsn, footer.footer_offset, count, last_lsn, at
        ));
    }
    let digest = seal_digest(b, records, at);
    if digest != footer.sha256 {
        return Err("segment seal digest does not match its footer".to_string());
    }
    Ok(footer)
}

/// Decodes a whole segment. Never panics; an unusable header is an error, anything wrong
/// after the header is reported as a cut ([`End::Torn`]) at the end of the last whole record,
/// except zeroes that run from a record boundary to the end of the bytes: the unwritten,
/// zero-filled rest of an active segment ([`End::Open`]; a record never starts with a zero
/// byte, its magic does not).
pub fn decode_segment(b: &[u8]) -> Result<Decoded, HeaderError> {
    let header = decode_header(b)?;
    let mut records = Vec::new();
    let mut at = HEADER_LEN;
    let mut next_lsn = header.first_lsn;
    let end = loop {
        if at == b.len() {
            break End::Open;
        }
        if b[at..].iter().all(|&x| x == 0) {
            // The zeroes written ahead of the records of an active segment (see the log's
            // `fill_ahead`): nothing was written from here on.
            break End::Open;
        }
        if b.len() - at >= 4 && b[at..at + 4] == FOOTER_MAGIC {
            let last = next_lsn.wrapping_sub(1);
            match decode_footer(b, at, &records, last) {
                Ok(f) => break End::Sealed(f),
                Err(reason) => break End::Torn { reason },
            }
        }
        match decode_record(b, at, next_lsn) {
            Ok(r) => {
                at += r.encoded_len() as usize;
                next_lsn = next_lsn.wrapping_add(1);
                records.push(r);
            }
            Err(reason) => break End::Torn { reason },
        }
    };
    Ok(Decoded {
        header,
        records,
        valid_len: at as u64,
        end,
    })
}

/// SHA-256 of a byte slice (the sealed part of a version 1–2 segment).
pub fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// The seal digest of a version 3 segment, built as its records are appended (see the
/// module documentation).
#[derive(Clone)]
pub struct SealDigest(Sha256);

impl SealDigest {
    /// Starts with the segment's header bytes.
    pub fn new(header: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(header);
        Self(h)
    }

    /// Adds one record's header (its first [`RECORD_HEADER_LEN`] bytes).
    pub fn record(&mut self, record_header: &[u8]) {
        self.0.update(record_header);
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

impl std::fmt::Debug for SealDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealDigest")
    }
}

/// The seal digest of the segment `b` whose header and `records` (decoded from `b`) end at
/// `valid_len`, by the rule of its format version.
pub fn seal_digest(b: &[u8], records: &[Record], valid_len: usize) -> [u8; 32] {
    if b.len() >= 10 && u16_at(b, 8) >= 3 {
        let mut d = SealDigest::new(&b[..HEADER_LEN.min(b.len())]);
        for r in records {
            let at = r.at as usize;
            d.record(&b[at..at + RECORD_HEADER_LEN]);
        }
        d.finish()
    } else {
        sha256(&b[..valid_len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hdr() -> SegmentHeader {
        SegmentHeader {
            disk_id: disk_id_bytes("disk-1"),
            chain_id: 0xdead_beef,
            seq: 7,
            first_lsn: 100,
            disk_size: 1 << 20,
        }
    }

    fn rec(lsn: u64, kind: Kind, offset: u64, data: &[u8], len: u64) -> Vec<u8> {
        let h = RecordHeader {
            lsn,
            kind,
            flags: 0,
            ahead: 0,
            offset,
            length: if kind == Kind::Write {
                data.len() as u64
            } else {
                len
            },
            data_len: if kind == Kind::Write {
                data.len() as u32
            } else {
                0
            },
        };
        encode_record(&h, data)
    }

    /// A segment with a few records; returns its bytes and the end offsets of each record.
    fn sample(sealed: bool) -> (Vec<u8>, Vec<usize>) {
        let mut b = encode_header(&hdr()).to_vec();
        let mut ends = vec![b.len()];
        b.extend(rec(100, Kind::Write, 512, &[1, 2, 3, 4, 5], 0));
        ends.push(b.len());
        b.extend(rec(101, Kind::Trim, 0, &[], 4096));
        ends.push(b.len());
        b.extend(rec(102, Kind::WriteZeroes, 8192, &[], 512));
        ends.push(b.len());
        b.extend(rec(103, Kind::Flush, 0, &[], 0));
        ends.push(b.len());
        b.extend(rec(104, Kind::Write, 0, &[9u8; 300], 0));
        ends.push(b.len());
        if sealed {
            let f = Footer {
                record_count: 5,
                last_lsn: 104,
                footer_offset: b.len() as u64,
                sha256: {
                    let mut d = SealDigest::new(&b[..HEADER_LEN]);
                    for w in ends.windows(2) {
                        d.record(&b[w[0]..w[0] + RECORD_HEADER_LEN]);
                    }
                    d.finish()
                },
            };
            b.extend_from_slice(&encode_footer(&f));
        }
        (b, ends)
    }

    #[test]
    fn header_round_trip() {
        let h = hdr();
        assert_eq!(decode_header(&encode_header(&h)), Ok(h));
        let mut b = encode_header(&h);
        b[45] ^= 1;
        assert_eq!(decode_header(&b), Err(HeaderError::Crc));
        assert_eq!(decode_header(&b[..10]), Err(HeaderError::Short(10)));
    }

    #[test]
    fn sealed_and_open_segments_decode() {
        let (b, ends) = sample(true);
        let d = decode_segment(&b).unwrap();
        assert!(d.sealed());
        assert_eq!(d.records.len(), 5);
        assert_eq!(d.last_lsn(), 104);
        assert_eq!(d.valid_len as usize, *ends.last().unwrap());
        assert_eq!(&b[d.records[0].data.clone()], &[1, 2, 3, 4, 5]);
        let (b, _) = sample(false);
        let d = decode_segment(&b).unwrap();
        assert_eq!(d.end, End::Open);
        assert_eq!(d.records[2].header.kind, Kind::WriteZeroes);
        assert_eq!(d.records[2].header.length, 512);
    }

    /// Truncation at every byte position: never panics, and the cut is exactly the end of
    /// the last whole record before the truncation point.
    #[test]
    fn truncated_at_every_position() {
        for sealed in [false, true] {
            let (b, ends) = sample(sealed);
            for n in 0..=b.len() {
                let r = decode_segment(&b[..n]);
                if n < HEADER_LEN {
                    assert_eq!(r, Err(HeaderError::Short(n)));
                    continue;
                }
                let d = r.unwrap();
                let expect = *ends.iter().rev().find(|&&e| e <= n).unwrap();
                assert_eq!(d.valid_len as usize, expect, "truncated at {n}");
                assert_eq!(
                    d.records.len(),
                    ends.iter().filter(|&&e| e <= n).count() - 1
                );
                if n == b.len() && sealed {
                    assert!(d.sealed());
                } else if n == expect {
                    assert_eq!(d.end, End::Open, "at {n}");
                } else {
                    assert!(matches!(d.end, End::Torn { .. }), "at {n}: {:?}", d.end);
                }
            }
        }
    }

    /// Flipping any single byte: never panics; the cut is at or before the record holding
    /// the corrupted byte, and a sealed segment is never reported sealed.
    #[test]
    fn corrupted_at_every_position() {
        for sealed in [false, true] {
            let (b, ends) = sample(sealed);
            for i in 0..b.len() {
                let mut c = b.clone();
                c[i] ^= 0x5a;
                let Ok(d) = decode_segment(&c) else {
                    assert!(i < HEADER_LEN, "header error for a byte at {i}");
                    continue;
                };
                assert!(i >= HEADER_LEN, "corrupt header byte {i} accepted");
                // The record containing byte i starts at the last end <= i.
                let start = *ends.iter().rev().find(|&&e| e <= i).unwrap();
                assert!(
                    d.valid_len as usize <= start,
                    "byte {i}: cut {}",
                    d.valid_len
                );
                if i < *ends.last().unwrap() {
                    assert_eq!(d.valid_len as usize, start, "byte {i}: exact cut");
                }
                assert!(!d.sealed(), "byte {i}: corrupted segment reported sealed");
            }
        }
    }

    #[test]
    fn lsn_gap_is_a_cut() {
        let mut b = encode_header(&hdr()).to_vec();
        b.extend(rec(100, Kind::Flush, 0, &[], 0));
        let cut = b.len();
        b.extend(rec(102, Kind::Flush, 0, &[], 0));
        let d = decode_segment(&b).unwrap();
        assert_eq!(d.valid_len as usize, cut);
        assert!(matches!(d.end, End::Torn { ref reason } if reason.contains("LSN 102")));
    }

    /// Extent records (version 2) decode; version 1 segments (no extents) still decode; an
    /// extent carrying data, or of length 0, is a cut; unknown versions are refused.
    #[test]
    fn extent_records_and_versions() {
        let mut b = encode_header(&hdr()).to_vec();
        b.extend(rec(100, Kind::Write, 0, &[7u8; 10], 0));
        let ext = RecordHeader {
            lsn: 101,
            kind: Kind::Extent,
            flags: FLAG_FUA,
            // A window of heated extents (bytes 18..20, little-endian) round-trips.
            ahead: 0x0102,
            offset: 1 << 20,
            length: 1 << 20,
            data_len: 0,
        };
        b.extend(encode_record(&ext, &[]));
        let d = decode_segment(&b).unwrap();
        assert_eq!(d.end, End::Open);
        assert_eq!(d.records[1].header, ext);
        assert_eq!(b[b.len() - 22..b.len() - 20], [2, 1]);
        assert!(d.records[1].data.is_empty());
        assert_eq!(Kind::Extent.name(), "extent");
        // Version 1 header, same records: still read.
        let mut v1 = b.clone();
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        let crc = crc32c::crc32c(&v1[..68]);
        v1[68..72].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_segment(&v1).unwrap().records.len(), 2);
        let mut v4 = v1.clone();
        v4[8..10].copy_from_slice(&4u16.to_le_bytes());
        let crc = crc32c::crc32c(&v4[..68]);
        v4[68..72].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_segment(&v4), Err(HeaderError::Version(4)));
        // Inconsistent extents.
        for (length, data) in [(0u64, vec![]), (4, vec![1u8, 2, 3, 4])] {
            let mut c = encode_header(&hdr()).to_vec();
            let h = RecordHeader {
                lsn: 100,
                kind: Kind::Extent,
                flags: 0,
                ahead: 0,
                offset: 0,
                length,
                data_len: data.len() as u32,
            };
            c.extend(encode_record(&h, &data));
            let d = decode_segment(&c).unwrap();
            assert!(d.records.is_empty());
            assert!(matches!(d.end, End::Torn { ref reason } if reason.contains("inconsistent")));
        }
    }

    /// Version 3 seals with the digest of header and record headers, versions 1–2 with the
    /// SHA-256 of all bytes; each is checked by its own rule, and damage anywhere is found.
    #[test]
    fn seal_digest_by_version() {
        let (v3, ends) = sample(true);
        let at = *ends.last().unwrap();
        let d = decode_segment(&v3).unwrap();
        assert!(matches!(d.end, End::Sealed(_)), "{:?}", d.end);
        // The same segment as version 2, sealed with the SHA-256 of its bytes.
        let reseal = |version: u16, digest_of: &dyn Fn(&[u8]) -> [u8; 32]| {
            let mut b = v3[..at].to_vec();
            b[8..10].copy_from_slice(&version.to_le_bytes());
            let crc = crc32c::crc32c(&b[..68]);
            b[68..72].copy_from_slice(&crc.to_le_bytes());
            let f = Footer {
                record_count: 5,
                last_lsn: 104,
                footer_offset: at as u64,
                sha256: digest_of(&b),
            };
            b.extend_from_slice(&encode_footer(&f));
            b
        };
        let v2 = reseal(2, &|b| sha256(b));
        assert!(matches!(decode_segment(&v2).unwrap().end, End::Sealed(_)));
        // Each version's digest is refused under the other's rule.
        let v2_with_v3_digest = reseal(2, &|b| {
            let d = decode_segment(b).unwrap();
            let mut v = b.to_vec();
            v[8..10].copy_from_slice(&3u16.to_le_bytes());
            seal_digest(&v, &d.records, b.len())
        });
        assert!(matches!(
            decode_segment(&v2_with_v3_digest).unwrap().end,
            End::Torn { .. }
        ));
        let v3_with_v2_digest = reseal(3, &|b| sha256(b));
        let e = decode_segment(&v3_with_v2_digest).unwrap().end;
        assert!(
            matches!(e, End::Torn { ref reason } if reason.contains("seal digest")),
            "{e:?}"
        );
        // A flipped data byte: the record's CRC32C (under the digest) finds it.
        let mut bad = v3.clone();
        bad[ends[4] + RECORD_HEADER_LEN + 7] ^= 1;
        let d = decode_segment(&bad).unwrap();
        assert!(matches!(d.end, End::Torn { ref reason } if reason.contains("checksum")));
        assert_eq!(d.records.len(), 4);
        // A record removed (footer rewritten to match the rest): the digest finds it.
        let mut cut = v3[..ends[4]].to_vec();
        let f = Footer {
            record_count: 4,
            last_lsn: 103,
            footer_offset: ends[4] as u64,
            sha256: seal_digest(&v3, &decode_segment(&v3).unwrap().records, at),
        };
        cut.extend_from_slice(&encode_footer(&f));
        let e = decode_segment(&cut).unwrap().end;
        assert!(
            matches!(e, End::Torn { ref reason } if reason.contains("seal digest")),
            "{e:?}"
        );
    }

    fn arb_record() -> impl Strategy<Value = (u8, u64, Vec<u8>, u64, u8)> {
        (
            1u8..=5,
            0u64..(1 << 40),
            proptest::collection::vec(any::<u8>(), 0..600),
            0u64..(1 << 30),
            0u8..4,
        )
    }

    proptest! {
        #[test]
        fn record_round_trip(recs in proptest::collection::vec(arb_record(), 0..20), first in 1u64..1_000_000) {
            let mut h = hdr();
            h.first_lsn = first;
            let mut b = encode_header(&h).to_vec();
            let mut expected = Vec::new();
            for (i, (k, off, data, len, flags)) in recs.iter().enumerate() {
                let kind = Kind::from_u8(*k).unwrap();
                let (data, length) = match kind {
                    Kind::Write => (data.clone(), data.len() as u64),
                    Kind::Flush => (vec![], 0),
                    Kind::Extent => (vec![], len.max(&1).to_owned()),
                    _ => (vec![], *len),
                };
                let rh = RecordHeader { lsn: first + i as u64, kind, flags: *flags, ahead: 0, offset: *off, length, data_len: data.len() as u32 };
                b.extend(encode_record(&rh, &data));
                expected.push((rh, data));
            }
            let d = decode_segment(&b).unwrap();
            prop_assert_eq!(&d.end, &End::Open);
            prop_assert_eq!(d.records.len(), expected.len());
            for (r, (rh, data)) in d.records.iter().zip(&expected) {
                prop_assert_eq!(&r.header, rh);
                prop_assert_eq!(&b[r.data.clone()], &data[..]);
            }
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Random mutations (the same decoder the fuzz target drives) never panic, and
        /// every record reported lies inside the input.
        #[test]
        fn mutated_segments_never_panic(
            muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
            garbage in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let (mut b, _) = sample(true);
            for (i, v) in muts {
                let n = b.len();
                b[i % n] = v;
            }
            b.truncate(cut % (b.len() + 1));
            b.extend(garbage);
            if let Ok(d) = decode_segment(&b) {
                prop_assert!(d.valid_len as usize <= b.len());
                for r in &d.records {
                    prop_assert!(r.data.end <= b.len());
                }
            }
        }
    }
}
