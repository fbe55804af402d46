//! Chunk ids, the object envelope (header + CRC + optional zstd + optional AEAD) and chunk
//! encoding/verification.
//!
//! Envelope layout (all integers little-endian), 20-byte header then payload:
//!
//! | offset | size | field                                                      |
//! |--------|------|------------------------------------------------------------|
//! | 0      | 4    | magic (`SBCK` chunk, `SBIX` index, `SBPT` point, `SBBL` blob) |
//! | 4      | 1    | envelope version (1)                                       |
//! | 5      | 1    | flags: bit 0 zstd, bit 1 encrypted                         |
//! | 6      | 1    | cipher id (0 none, 1 AES-256-GCM, 2 ChaCha20-Poly1305)     |
//! | 7      | 1    | reserved (0)                                               |
//! | 8      | 8    | plaintext length                                           |
//! | 16     | 4    | CRC32C of bytes 0..16 and of the payload                   |
//! | 20     | ...  | payload: (nonce ‖ ciphertext ‖ tag) or stored bytes        |

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto::{Crypto, NONCE_LEN, TAG_LEN};
use crate::error::{Error, Result};

/// Header length of every envelope.
pub const HEADER_LEN: usize = 20;
/// Magic of chunk objects.
pub const MAGIC_CHUNK: [u8; 4] = *b"SBCK";
/// Magic of index (manifest) objects.
pub const MAGIC_INDEX: [u8; 4] = *b"SBIX";
/// Magic of point objects.
pub const MAGIC_POINT: [u8; 4] = *b"SBPT";
/// Magic of blob objects.
pub const MAGIC_BLOB: [u8; 4] = *b"SBBL";

const FLAG_ZSTD: u8 = 1;
const FLAG_ENCRYPTED: u8 = 2;
const ENVELOPE_VERSION: u8 = 1;

/// Id of a chunk: SHA-256 of its plaintext, or HMAC-SHA256 with the store's id key when the
/// store is encrypted. All-zero chunks have the reserved id [`ChunkId::ZERO`] and are never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Sentinel of an all-zero chunk (a hole).
    pub const ZERO: ChunkId = ChunkId([0u8; 32]);

    /// True for the zero sentinel.
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse lower-case hex.
    pub fn from_hex(s: &str) -> Option<ChunkId> {
        let v = hex::decode(s).ok()?;
        Some(ChunkId(v.try_into().ok()?))
    }

    /// Object key: `chunks/<first d hex>/<hex>`, `d` = the store's fan-out digits (2 since
    /// format 4: 256 directories; 3 in formats 2 and 3). Use [`crate::Store::chunk_key`].
    pub fn key(&self, fan_out_digits: usize) -> String {
        let h = self.to_hex();
        format!("chunks/{}/{}", &h[..fan_out_digits], h)
    }

    /// Object key of this chunk while it is a GC fossil. Use [`crate::Store::fossil_key`].
    pub fn fossil_key(&self, fan_out_digits: usize) -> String {
        let h = self.to_hex();
        format!("fossils/{}/{}", &h[..fan_out_digits], h)
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Compression of chunk payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is.
    None,
    /// zstd; a chunk is stored raw when compression saves less than 1/32 of it.
    #[default]
    Zstd,
}

/// True if every byte of `buf` is zero.
pub fn is_all_zero(buf: &[u8]) -> bool {
    // OR-reduction per 4 KiB block vectorizes well and still exits early on data.
    buf.chunks(4096)
        .all(|b| b.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Probe for incompressible data: for chunks over 32 KiB, compress an 8 KiB sample first and
/// skip the full attempt when the sample does not shrink by 1/32 (random data, ciphertext,
/// already-compressed files) — that saves most of zstd's cost on such chunks.
fn worth_compressing(plain: &[u8], level: i32) -> bool {
    const SAMPLE: usize = 8 * 1024;
    if plain.len() <= 4 * SAMPLE {
        return true;
    }
    let mid = plain.len() / 2;
    let sample = &plain[mid..mid + SAMPLE];
    match zstd_compress(sample, level) {
        Ok(c) => c.len() + SAMPLE / 32 < SAMPLE,
        Err(_) => true,
    }
}

thread_local! {
    /// One zstd context per thread and level, reused: creating a context costs more than
    /// compressing an 8 KiB probe.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-compress `data` at `level` with this thread's reusable context.
fn zstd_compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match slot.as_mut() {
            Some((_, c)) => c.compress(data),
            None => zstd::bulk::compress(data, level),
        }
    })
}

/// Encodes and decodes objects for one store (compression and keys).
#[derive(Debug, Clone)]
pub struct Codec {
    compression: Compression,
    level: i32,
    crypto: Option<Crypto>,
    /// Store chunks that are neither compressed nor encrypted as their bare plaintext (no
    /// envelope), as stores of format 3 do.
    raw_chunks: bool,
}

impl Codec {
    /// A codec (writing bare chunk objects where possible).
    pub fn new(compression: Compression, level: i32, crypto: Option<Crypto>) -> Self {
        Codec {
            compression,
            level,
            crypto,
            raw_chunks: true,
        }
    }

    /// Always wrap chunks in an envelope (stores of format 2, whose readers expect one).
    pub fn with_enveloped_chunks(mut self) -> Self {
        self.raw_chunks = false;
        self
    }

    /// True if objects are encrypted.
    pub fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// Id of a chunk's plaintext; [`ChunkId::ZERO`] for an all-zero chunk.
    pub fn digest(&self, data: &[u8]) -> ChunkId {
        if is_all_zero(data) {
            return ChunkId::ZERO;
        }
        self.digest_nonzero(data)
    }

    /// Id of a chunk known not to be all zeros.
    pub fn digest_nonzero(&self, data: &[u8]) -> ChunkId {
        match &self.crypto {
            Some(c) => ChunkId(c.keyed_digest(data)),
            None => ChunkId(Sha256::digest(data).into()),
        }
    }

    /// Wrap `plain` in an envelope. `name` is bound to the ciphertext (AEAD associated data) so
    /// an object cannot be moved to another key undetected.
    pub fn seal(
        &self,
        magic: [u8; 4],
        name: &[u8],
        plain: &[u8],
        compress: bool,
    ) -> Result<Vec<u8>> {
        let mut flags = 0u8;
        let mut compressed: Option<Vec<u8>> = None;
        if compress
            && self.compression == Compression::Zstd
            && plain.len() >= 64
            && worth_compressing(plain, self.level)
        {
            let c = zstd_compress(plain, self.level)
                .map_err(|e| Error::Config(format!("zstd compression failed: {e}")))?;
            if c.len() + plain.len() / 32 < plain.len() {
                compressed = Some(c);
                flags |= FLAG_ZSTD;
            }
        }
        let src: &[u8] = compressed.as_deref().unwrap_or(plain);
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&magic);
        header[4] = ENVELOPE_VERSION;
        header[8..16].copy_from_slice(&(plain.len() as u64).to_le_bytes());
        if let Some(c) = &self.crypto {
            flags |= FLAG_ENCRYPTED;
            header[6] = c.cipher().id();
        }
        header[5] = flags;
        // Build the object in one buffer: one copy of the data, encrypted in place.
        let extra = if self.crypto.is_some() {
            NONCE_LEN + TAG_LEN
        } else {
            0
        };
        let mut out = Vec::with_capacity(HEADER_LEN + src.len() + extra);
        out.extend_from_slice(&header);
        if let Some(c) = &self.crypto {
            out.extend_from_slice(&[0u8; NONCE_LEN]);
            out.extend_from_slice(src);
            c.seal_into(&aad(&header, name), &mut out, HEADER_LEN)?;
        } else {
            out.extend_from_slice(src);
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..16]), &out[HEADER_LEN..]);
        out[16..20].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Check and unwrap an envelope whose plaintext may be at most `max_len` bytes (a chunk:
    /// its length in the index; other objects: a bound per kind). Errors are plain reasons;
    /// callers wrap them with the object's identity.
    ///
    /// The header's length is checked against `max_len` before anything is decompressed,
    /// and decompression streams into a buffer that grows with the output actually produced
    /// and stops one byte past the header's length: neither a lying header nor a
    /// decompression bomb written by whoever can write the store makes the gateway allocate
    /// more than `max_len` (+1) bytes.
    pub fn open(
        &self,
        magic: [u8; 4],
        name: &[u8],
        obj: &[u8],
        max_len: u64,
    ) -> std::result::Result<Vec<u8>, String> {
        if obj.len() < HEADER_LEN {
            return Err(format!("object too short ({} bytes)", obj.len()));
        }
        let (header, payload) = obj.split_at(HEADER_LEN);
        if header[..4] != magic {
            return Err(format!(
                "bad magic {:?}",
                String::from_utf8_lossy(&header[..4])
            ));
        }
        if header[4] != ENVELOPE_VERSION {
            return Err(format!("unknown envelope version {}", header[4]));
        }
        let stored_crc = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..16]), payload);
        if crc != stored_crc {
            return Err(format!(
                "CRC mismatch (stored {stored_crc:08x}, computed {crc:08x})"
            ));
        }
        let flags = header[5];
        let mut plain_len_bytes = [0u8; 8];
        plain_len_bytes.copy_from_slice(&header[8..16]);
        let plain_len = u64::from_le_bytes(plain_len_bytes);
        let body: Vec<u8> = match (&self.crypto, flags & FLAG_ENCRYPTED != 0) {
            (Some(c), true) => {
                if header[6] != c.cipher().id() {
                    return Err(format!(
                        "written with cipher id {}, store uses {}",
                        header[6],
                        c.cipher().id()
                    ));
                }
                c.open(&aad(header, name), payload).ok_or_else(|| {
                    "authentication failed (tampered, or written with another key)".to_string()
                })?
            }
            (None, true) => return Err("object is encrypted but the store has no key".into()),
            (Some(_), false) => return Err("object is not encrypted in an encrypted store".into()),
            (None, false) => payload.to_vec(),
        };
        if plain_len > max_len {
            return Err(format!(
                "header claims {plain_len} bytes, more than the {max_len} this object may hold"
            ));
        }
        let plain = if flags & FLAG_ZSTD != 0 {
            bounded_decompress(&body, plain_len)?
        } else {
            body
        };
        if plain.len() as u64 != plain_len {
            return Err(format!(
                "length {} differs from header {}",
                plain.len(),
                plain_len
            ));
        }
        Ok(plain)
    }

    /// Encode a chunk object. In an unencrypted store a chunk that does not compress is
    /// stored bare: its object is exactly its plaintext (a 64 KiB chunk fills 16 file-system
    /// blocks instead of 17). Its SHA-256 id still verifies it on every read. Copies a bare
    /// chunk; [`Self::encode_chunk_bytes`] does not.
    pub fn encode_chunk(&self, id: &ChunkId, plain: &[u8]) -> Result<Bytes> {
        Ok(self
            .encode_unless_bare(id, plain)?
            .unwrap_or_else(|| Bytes::copy_from_slice(plain)))
    }

    /// [`Self::encode_chunk`] of a shared buffer: a bare chunk's object is `plain` itself
    /// (nothing copied, nothing allocated).
    pub fn encode_chunk_bytes(&self, id: &ChunkId, plain: &Bytes) -> Result<Bytes> {
        Ok(self
            .encode_unless_bare(id, plain)?
            .unwrap_or_else(|| plain.clone()))
    }

    /// The chunk's envelope, or `None` when it is stored bare (the object is the plaintext).
    fn encode_unless_bare(&self, id: &ChunkId, plain: &[u8]) -> Result<Option<Bytes>> {
        let may_be_bare = self.raw_chunks && self.crypto.is_none() && !looks_enveloped(plain);
        let try_zstd = self.compression == Compression::Zstd
            && plain.len() >= 64
            && worth_compressing(plain, self.level);
        if may_be_bare && !try_zstd {
            return Ok(None);
        }
        let obj = self.seal(MAGIC_CHUNK, &id.0, plain, true)?;
        if may_be_bare && obj[5] & FLAG_ZSTD == 0 {
            // The full attempt did not pay off after all: bare is smaller.
            return Ok(None);
        }
        Ok(Some(Bytes::from(obj)))
    }

    /// Decode and fully verify a chunk object (CRC, tag, length, digest).
    pub fn decode_chunk(
        &self,
        id: &ChunkId,
        obj: &[u8],
        expected_len: Option<usize>,
    ) -> Result<Bytes> {
        let corrupt = |reason: String| Error::CorruptChunk {
            digest: id.to_hex(),
            reason,
        };
        // A bare chunk (see [`Codec::encode_chunk`]) is its own plaintext; everything else is
        // an envelope. Either way the digest below is the final check.
        let plain = if self.crypto.is_none() && !looks_enveloped(obj) {
            obj.to_vec()
        } else {
            let max = expected_len.map_or(MAX_CHUNK_PLAIN, |l| l as u64);
            self.open(MAGIC_CHUNK, &id.0, obj, max).map_err(corrupt)?
        };
        if let Some(l) = expected_len {
            if plain.len() != l {
                return Err(corrupt(format!(
                    "length {} but the index expects {l}",
                    plain.len()
                )));
            }
        }
        let actual = self.digest_nonzero(&plain);
        if actual != *id {
            return Err(corrupt(format!("content hashes to {actual}")));
        }
        Ok(Bytes::from(plain))
    }
}

/// Largest plaintext of a chunk object read without a known length (a chunk of the largest
/// chunk size, or a patch object: [`crate::patch::MAX_PATCH_DATA`] plus its extent table).
pub const MAX_CHUNK_PLAIN: u64 = 64 << 20;

/// zstd-decompress `body`, producing at most `plain_len + 1` bytes (one more than the header
/// claims, so a longer stream is detected by the caller's length check) and allocating only
/// as the output grows.
fn bounded_decompress(body: &[u8], plain_len: u64) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let dec = zstd::stream::read::Decoder::with_buffer(body)
        .map_err(|e| format!("zstd decompression failed: {e}"))?;
    let mut out = Vec::with_capacity(plain_len.min(1 << 20) as usize);
    dec.take(plain_len + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("zstd decompression failed: {e}"))?;
    Ok(out)
}

/// True if `obj` starts with a chunk envelope header whose CRC matches. Bare chunks never
/// do: a plaintext that would is stored in an envelope instead.
fn looks_enveloped(obj: &[u8]) -> bool {
    if obj.len() < HEADER_LEN || obj[..4] != MAGIC_CHUNK || obj[4] != ENVELOPE_VERSION {
        return false;
    }
    let stored = u32::from_le_bytes([obj[16], obj[17], obj[18], obj[19]]);
    crc32c::crc32c_append(crc32c::crc32c(&obj[..16]), &obj[HEADER_LEN..]) == stored
}

fn aad(header: &[u8], name: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(16 + name.len());
    a.extend_from_slice(&header[..16]);
    a.extend_from_slice(name);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Cipher, StoreKey};

    #[test]
    fn roundtrip_and_corruption() {
        let key = StoreKey::generate();
        for codec in [
            Codec::new(Compression::None, 1, None),
            Codec::new(Compression::Zstd, 1, None),
            Codec::new(
                Compression::Zstd,
                1,
                Some(Crypto::new(&key, Cipher::Aes256Gcm)),
            ),
            Codec::new(
                Compression::None,
                1,
                Some(Crypto::new(&key, Cipher::ChaCha20Poly1305)),
            ),
        ] {
            let data: Vec<u8> = (0..10000u32).map(|i| (i % 7) as u8).collect();
            let id = codec.digest(&data);
            let obj = codec.encode_chunk(&id, &data).unwrap();
            assert_eq!(
                &codec.decode_chunk(&id, &obj, Some(data.len())).unwrap()[..],
                &data[..]
            );
            for i in [0, 5, 9, 17, 25, obj.len() - 1] {
                let mut bad = obj.to_vec();
                bad[i] ^= 1;
                let e = codec.decode_chunk(&id, &bad, None).unwrap_err();
                assert!(matches!(e, Error::CorruptChunk { .. }), "{e}");
            }
            let other = codec.digest(b"other data");
            assert!(codec.decode_chunk(&other, &obj, None).is_err());
        }
        assert!(is_all_zero(&[0u8; 10000]));
    }

    #[test]
    fn bare_chunks_only_when_unencrypted_and_incompressible() {
        let mut random = vec![0u8; 65536];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
        let text: Vec<u8> = (0..65536u32).map(|i| b"standby "[i as usize % 8]).collect();
        let key = StoreKey::generate();
        let plain = Codec::new(Compression::Zstd, 1, None);
        let enc = Codec::new(
            Compression::None,
            1,
            Some(Crypto::new(&key, Cipher::Aes256Gcm)),
        );
        let v2 = Codec::new(Compression::Zstd, 1, None).with_enveloped_chunks();
        for (codec, data, bare) in [
            (&plain, &random, true),
            (&plain, &text, false),
            (&enc, &random, false),
            (&v2, &random, false),
        ] {
            let id = codec.digest(data);
            let obj = codec.encode_chunk(&id, data).unwrap();
            assert_eq!(obj[..] == data[..], bare);
            assert_eq!(
                &codec.decode_chunk(&id, &obj, Some(data.len())).unwrap()[..],
                &data[..]
            );
            // A flipped bit is caught either way, bare or enveloped.
            let mut bad = obj.to_vec();
            bad[obj.len() / 2] ^= 4;
            assert!(matches!(
                codec.decode_chunk(&id, &bad, None),
                Err(Error::CorruptChunk { .. })
            ));
        }
        // A format-3 reader reads format-2 envelopes.
        let id = v2.digest(&random);
        let obj = v2.encode_chunk(&id, &random).unwrap();
        assert_eq!(
            &plain.decode_chunk(&id, &obj, None).unwrap()[..],
            &random[..]
        );
        // A plaintext that happens to be a valid envelope is itself enveloped, so it can never
        // be mistaken for one when read back.
        let tricky = obj.to_vec();
        let tid = plain.digest(&tricky);
        let tobj = plain.encode_chunk(&tid, &tricky).unwrap();
        assert_ne!(&tobj[..], &tricky[..]);
        assert_eq!(
            &plain.decode_chunk(&tid, &tobj, None).unwrap()[..],
            &tricky[..]
        );
        let mut z = vec![0u8; 10000];
        z[9999] = 1;
        assert!(!is_all_zero(&z));
        assert_eq!(
            Codec::new(Compression::None, 1, None).digest(&[0u8; 64]),
            ChunkId::ZERO
        );
    }
}
