//! The store handle: `store.toml`, opening/creating, chunk and object I/O.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Staged};
use crate::chunk::{ChunkId, Codec, Compression};
use crate::crypto::{Cipher, Crypto, StoreKey};
use crate::error::{Error, Result};
use crate::pack::{Layout, PackCache, Packer, DEFAULT_PACK_SIZE, DEFAULT_PACK_UPLOADS, PACK_SIZES};

/// Key of the store description at the root of the backend.
pub const STORE_TOML: &str = "store.toml";
/// Value of `format` in `store.toml`.
pub const FORMAT_NAME: &str = "standby-replica-store";
/// Newest format version this build writes: 5, for stores whose chunks live in packs
/// (`layout = "packs"`, see [`crate::pack`]); a store of the `chunks` layout is still written as
/// version 4, so older builds keep reading local stores. Version 4 names the number of hex digits of a chunk id
/// that form its fan-out directory in `store.toml` (`fan_out_digits`, 2 by default); versions
/// 2 and 3 always used 3. Version 3 stores chunks that neither compress nor are encrypted bare
/// (no envelope); version 2 stores, whose readers expect an envelope on every chunk, are still
/// read and written the version 2 way.
pub const FORMAT_VERSION: u32 = 5;
/// Format version of stores with one object per chunk.
pub const CHUNKS_FORMAT_VERSION: u32 = 4;
/// Oldest format version this build opens.
pub const OLDEST_FORMAT_VERSION: u32 = 2;
/// Default chunk size (see docs/replica-store.md for the measurements behind it).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Default fan-out of chunk keys: 2 hex digits, 256 directories (`chunks/ab/<id>`).
pub const DEFAULT_FAN_OUT_DIGITS: u32 = 2;
/// Fan-out digits a store may have: 16 to 65,536 directories.
const FAN_OUT_DIGITS: std::ops::RangeInclusive<u32> = 1..=4;
/// Fan-out digits of format 2 and 3 stores, whose `store.toml` does not name them.
const LEGACY_FAN_OUT_DIGITS: u32 = 3;
/// Default maximum duration of an upload session (and GC fossil delay).
pub const DEFAULT_MAX_SESSION_SECS: u64 = 6 * 3600;

fn legacy_fan_out_digits() -> u32 {
    LEGACY_FAN_OUT_DIGITS
}

/// Encryption section of `store.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EncryptionSettings {
    /// AEAD cipher.
    pub cipher: Cipher,
    /// Fingerprint of the store key (see [`StoreKey::fingerprint`]).
    pub key_fingerprint: String,
}

/// Contents of `store.toml`: everything a gateway needs to read the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreSettings {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Random id of this store.
    pub store_id: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Chunk size in bytes (power of two, 4 KiB..=64 MiB).
    pub chunk_size: u32,
    /// Chunk compression.
    pub compression: Compression,
    /// zstd level.
    pub compression_level: i32,
    /// Upload sessions older than this refuse to publish; GC deletes fossils only after it.
    pub max_session_secs: u64,
    /// Hex digits of a chunk id that name its fan-out directory (1..=4; absent, and 3, in
    /// format 2 and 3 stores).
    #[serde(default = "legacy_fan_out_digits")]
    pub fan_out_digits: u32,
    /// Present when the store is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSettings>,
    /// How chunks are stored: one object each, or in packs (format 5).
    #[serde(default, skip_serializing_if = "is_chunks")]
    pub layout: Layout,
    /// Target size of a pack object in bytes (format 5 only; 0 otherwise).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pack_size: u32,
}

fn is_chunks(l: &Layout) -> bool {
    *l == Layout::Chunks
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Options of [`Store::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Compression.
    pub compression: Compression,
    /// zstd level (1 is fast).
    pub compression_level: i32,
    /// Max upload session duration.
    pub max_session_secs: u64,
    /// Hex digits of a chunk id that name its fan-out directory (1..=4): 16^d directories.
    pub fan_out_digits: u32,
    /// Cipher, used when a key is given.
    pub cipher: Cipher,
    /// Chunk layout; `None` takes the backend's preference ([`Backend::prefers_packs`]:
    /// packs on S3, a file per chunk on a local directory).
    pub layout: Option<Layout>,
    /// Target pack size (packs layout).
    pub pack_size: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: Compression::Zstd,
            compression_level: 1,
            max_session_secs: DEFAULT_MAX_SESSION_SECS,
            fan_out_digits: DEFAULT_FAN_OUT_DIGITS,
            cipher: Cipher::Aes256Gcm,
            layout: None,
            pack_size: DEFAULT_PACK_SIZE,
        }
    }
}

/// Outcome of storing one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// Id of the chunk ([`ChunkId::ZERO`] for a hole).
    pub id: ChunkId,
    /// Bytes written to the backend (0 for holes and chunks already present).
    pub uploaded_bytes: u64,
    /// What happened.
    pub kind: PutKind,
}

/// What [`Store::put_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutKind {
    /// All zeros: nothing stored.
    Zero,
    /// Already in the store: nothing uploaded.
    Deduplicated,
    /// Uploaded.
    Uploaded,
}

/// An open replica store. Cheap to clone; all clones share the same backend and keys.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) settings: StoreSettings,
    pub(crate) codec: Codec,
    /// Pack indexes known to this handle (packs layout).
    pub(crate) packs: std::sync::Mutex<PackCache>,
    /// Pack uploads one session keeps in flight.
    pack_uploads: std::sync::atomic::AtomicUsize,
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// Create a new store on an empty backend. With `key`, the store is encrypted.
    pub async fn create(
        backend: Arc<dyn Backend>,
        opts: CreateOptions,
        key: Option<&StoreKey>,
    ) -> Result<Store> {
        if !opts.chunk_size.is_power_of_two() || !(4096..=64 << 20).contains(&opts.chunk_size) {
            return Err(Error::InvalidArgument(format!(
                "chunk size {} must be a power of two between 4 KiB and 64 MiB",
                opts.chunk_size
            )));
        }
        if !FAN_OUT_DIGITS.contains(&opts.fan_out_digits) {
            return Err(Error::InvalidArgument(format!(
                "fan-out of {} hex digits: it must be 1 to 4 (16 to 65,536 directories)",
                opts.fan_out_digits
            )));
        }
        let layout = opts.layout.unwrap_or(if backend.prefers_packs() {
            Layout::Packs
        } else {
            Layout::Chunks
        });
        if layout == Layout::Packs && !PACK_SIZES.contains(&opts.pack_size) {
            return Err(Error::InvalidArgument(format!(
                "pack size {} must be between 1 MiB and 256 MiB",
                opts.pack_size
            )));
        }
        if backend.head(STORE_TOML).await?.is_some() {
            return Err(Error::AlreadyExists {
                location: backend.describe(),
            });
        }
        let settings = StoreSettings {
            format: FORMAT_NAME.into(),
            format_version: match layout {
                Layout::Chunks => CHUNKS_FORMAT_VERSION,
                Layout::Packs => FORMAT_VERSION,
            },
            store_id: hex::encode(rand::random::<[u8; 16]>()),
            created_unix: now_unix_ms() / 1000,
            chunk_size: opts.chunk_size,
            compression: opts.compression,
            compression_level: opts.compression_level,
            max_session_secs: opts.max_session_secs,
            fan_out_digits: opts.fan_out_digits,
            encryption: key.map(|k| EncryptionSettings {
                cipher: opts.cipher,
                key_fingerprint: k.fingerprint(),
            }),
            layout,
            pack_size: match layout {
                Layout::Chunks => 0,
                Layout::Packs => opts.pack_size,
            },
        };
        let text = toml::to_string(&settings)
            .map_err(|e| Error::Config(format!("serializing store.toml: {e}")))?;
        let text = format!(
            "# Standby replica store. Do not edit: the format is described in docs/replica-store.md.\n{text}"
        );
        backend.put(STORE_TOML, Bytes::from(text)).await?;
        tracing::info!(location = %backend.describe(), encrypted = key.is_some(), "created replica store");
        Self::from_settings(backend, settings, key)
    }

    /// Open an existing store. `key` is required if and only if the store is encrypted.
    pub async fn open(backend: Arc<dyn Backend>, key: Option<&StoreKey>) -> Result<Store> {
        let location = backend.describe();
        let raw = match backend.get(STORE_TOML).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(Error::NotAStore { location }),
            Err(e) => return Err(e),
        };
        let text = std::str::from_utf8(&raw)
            .map_err(|_| Error::corrupt_object(STORE_TOML, "not UTF-8"))?;
        let value: toml::Value =
            toml::from_str(text).map_err(|e| Error::corrupt_object(STORE_TOML, e.to_string()))?;
        let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
        let version = value
            .get("format_version")
            .and_then(|v| v.as_integer())
            .unwrap_or(-1);
        if format != FORMAT_NAME
            || !(i64::from(OLDEST_FORMAT_VERSION)..=i64::from(FORMAT_VERSION)).contains(&version)
        {
            return Err(Error::UnsupportedFormat {
                location,
                found: format!("{format:?} version {version}"),
                supported: FORMAT_VERSION,
            });
        }
        let settings: StoreSettings =
            toml::from_str(text).map_err(|e| Error::corrupt_object(STORE_TOML, e.to_string()))?;
        let layout_ok = match settings.layout {
            Layout::Chunks => settings.format_version < 5 && settings.pack_size == 0,
            Layout::Packs => {
                settings.format_version >= 5 && PACK_SIZES.contains(&settings.pack_size)
            }
        };
        if !layout_ok {
            return Err(Error::corrupt_object(
                STORE_TOML,
                format!(
                    "layout {:?} with pack_size {} is not valid for format version {}",
                    settings.layout, settings.pack_size, settings.format_version
                ),
            ));
        }
        if !FAN_OUT_DIGITS.contains(&settings.fan_out_digits)
            || (settings.format_version < 4 && settings.fan_out_digits != LEGACY_FAN_OUT_DIGITS)
        {
            return Err(Error::corrupt_object(
                STORE_TOML,
                format!(
                    "fan_out_digits = {} is not valid for format version {}",
                    settings.fan_out_digits, settings.format_version
                ),
            ));
        }
        Self::from_settings(backend, settings, key)
    }

    fn from_settings(
        backend: Arc<dyn Backend>,
        settings: StoreSettings,
        key: Option<&StoreKey>,
    ) -> Result<Store> {
        let location = backend.describe();
        let crypto = match (&settings.encryption, key) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::Config(format!(
                    "a key was supplied but the store at {location} is not encrypted"
                )))
            }
            (Some(enc), None) => {
                return Err(Error::KeyRequired {
                    location,
                    fingerprint: enc.key_fingerprint.clone(),
                })
            }
            (Some(enc), Some(k)) => {
                let found = k.fingerprint();
                if found != enc.key_fingerprint {
                    return Err(Error::WrongKey {
                        location,
                        expected: enc.key_fingerprint.clone(),
                        found,
                    });
                }
                Some(Crypto::new(k, enc.cipher))
            }
        };
        let mut codec = Codec::new(settings.compression, settings.compression_level, crypto);
        if settings.format_version < 3 {
            codec = codec.with_enveloped_chunks();
        }
        Ok(Store {
            inner: Arc::new(Inner {
                backend,
                settings,
                codec,
                packs: std::sync::Mutex::default(),
                pack_uploads: DEFAULT_PACK_UPLOADS.into(),
            }),
        })
    }

    /// The store's settings (`store.toml`).
    pub fn settings(&self) -> &StoreSettings {
        &self.inner.settings
    }

    /// How this store keeps chunks.
    pub fn layout(&self) -> Layout {
        self.inner.settings.layout
    }

    /// Pack uploads one upload session keeps in flight (packs layout).
    pub fn pack_uploads(&self) -> usize {
        self.inner
            .pack_uploads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Set the pack uploads one session keeps in flight (at least 1; sessions started
    /// afterwards use it). Memory per session is about `(n + 1) × pack_size`.
    pub fn set_pack_uploads(&self, n: usize) {
        self.inner
            .pack_uploads
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Requests this handle's backend issued so far, if the backend counts them (S3).
    pub fn requests(&self) -> Option<crate::backend::RequestCounts> {
        self.inner.backend.requests()
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.inner.settings.chunk_size
    }

    /// Object key of a chunk (`chunks/<first fan-out digits of the id>/<id>`).
    pub fn chunk_key(&self, id: &ChunkId) -> String {
        id.key(self.inner.settings.fan_out_digits as usize)
    }

    /// Object key of a chunk while it is a GC fossil.
    pub fn fossil_key(&self, id: &ChunkId) -> String {
        id.fossil_key(self.inner.settings.fan_out_digits as usize)
    }

    /// True if the store is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.inner.codec.encrypted()
    }

    /// Chunk id of `data` exactly as the store computes it ([`ChunkId::ZERO`] if all zeros;
    /// keyed when the store is encrypted). Lets a resync compare local data with an index
    /// without reading the store.
    pub fn digest(&self, data: &[u8]) -> ChunkId {
        self.inner.codec.digest(data)
    }

    pub(crate) fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    /// True if the chunk object exists (holes always "exist").
    pub async fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        if id.is_zero() {
            return Ok(true);
        }
        if self.layout() == Layout::Packs {
            return Ok(self.locate_chunk(id, false).await?.is_some());
        }
        Ok(self
            .inner
            .backend
            .head(&self.chunk_key(id))
            .await?
            .is_some())
    }

    /// Store one chunk (hash, skip holes, skip if present, else encode and upload).
    pub async fn put_chunk(&self, data: Bytes) -> Result<PutOutcome> {
        let codec = self.inner.codec.clone();
        let d = data.clone();
        let id = tokio::task::spawn_blocking(move || codec.digest(&d))
            .await
            .map_err(|e| Error::Config(format!("hash task failed: {e}")))?;
        self.put_chunk_with_id(id, data, true).await
    }

    /// Compresses / encrypts a chunk into its stored form on the blocking pool (CPU work kept
    /// off the runtime's workers).
    pub(crate) async fn encode_chunk(&self, id: ChunkId, data: Bytes) -> Result<Bytes> {
        let codec = self.inner.codec.clone();
        tokio::task::spawn_blocking(move || codec.encode_chunk_bytes(&id, &data))
            .await
            .map_err(|e| Error::Config(format!("encode task failed: {e}")))?
    }

    /// Store a chunk whose id is already computed. With `check_exists`, a HEAD avoids
    /// re-uploading a chunk that is already present.
    pub async fn put_chunk_with_id(
        &self,
        id: ChunkId,
        data: Bytes,
        check_exists: bool,
    ) -> Result<PutOutcome> {
        if id.is_zero() {
            return Ok(PutOutcome {
                id,
                uploaded_bytes: 0,
                kind: PutKind::Zero,
            });
        }
        if self.layout() == Layout::Packs {
            // Outside a session: a pack of its own, uploaded at once.
            let packer = Packer::new(self);
            packer.start().await?;
            if check_exists && self.pack_has(&id) {
                return Ok(PutOutcome {
                    id,
                    uploaded_bytes: 0,
                    kind: PutKind::Deduplicated,
                });
            }
            let obj = self.encode_chunk(id, data).await?;
            packer.append(id, &obj).await?;
            packer.flush().await?;
            return Ok(PutOutcome {
                id,
                uploaded_bytes: obj.len() as u64,
                kind: PutKind::Uploaded,
            });
        }
        let key = self.chunk_key(&id);
        if check_exists && self.inner.backend.head(&key).await?.is_some() {
            return Ok(PutOutcome {
                id,
                uploaded_bytes: 0,
                kind: PutKind::Deduplicated,
            });
        }
        let obj = self.encode_chunk(id, data).await?;
        let n = obj.len() as u64;
        if self.inner.backend.put_if_absent(&key, obj).await? {
            Ok(PutOutcome {
                id,
                uploaded_bytes: n,
                kind: PutKind::Uploaded,
            })
        } else {
            Ok(PutOutcome {
                id,
                uploaded_bytes: 0,
                kind: PutKind::Deduplicated,
            })
        }
    }

    /// Like [`Self::put_chunk_with_id`] (with the existence check), but a new chunk is only
    /// staged ([`crate::backend::Backend::put_staged`]): it may be referenced only after
    /// [`crate::backend::Backend::commit_staged`] returned for the returned [`Staged`].
    pub async fn stage_chunk_with_id(
        &self,
        id: ChunkId,
        data: Bytes,
    ) -> Result<(PutOutcome, Option<Staged>)> {
        let dedup = PutOutcome {
            id,
            uploaded_bytes: 0,
            kind: if id.is_zero() {
                PutKind::Zero
            } else {
                PutKind::Deduplicated
            },
        };
        if id.is_zero() {
            return Ok((dedup, None));
        }
        let key = self.chunk_key(&id);
        if self.inner.backend.head(&key).await?.is_some() {
            return Ok((dedup, None));
        }
        let obj = self.encode_chunk(id, data).await?;
        let n = obj.len() as u64;
        match self.inner.backend.put_staged(&key, obj).await? {
            Some(staged) => Ok((
                PutOutcome {
                    id,
                    uploaded_bytes: n,
                    kind: PutKind::Uploaded,
                },
                Some(staged),
            )),
            None => Ok((dedup, None)),
        }
    }

    /// Read and verify a chunk. `expected_len` is checked when given. A chunk that GC has
    /// turned into a fossil (see gc) is still readable.
    pub async fn get_chunk(&self, id: &ChunkId, expected_len: Option<usize>) -> Result<Bytes> {
        if id.is_zero() {
            return Ok(Bytes::from(vec![
                0u8;
                expected_len
                    .unwrap_or(self.chunk_size() as usize)
            ]));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let obj = if self.layout() == Layout::Packs {
                match self.get_packed(id, attempt > 1).await? {
                    Some(o) => o,
                    None => {
                        return Err(Error::MissingChunk {
                            digest: id.to_hex(),
                        })
                    }
                }
            } else {
                self.get_chunk_object(id).await?
            };
            let codec = self.inner.codec.clone();
            let id2 = *id;
            let res =
                tokio::task::spawn_blocking(move || codec.decode_chunk(&id2, &obj, expected_len))
                    .await
                    .map_err(|e| Error::Config(format!("verify task failed: {e}")))?;
            match res {
                // One retry: a corruption in transit looks the same as one at rest.
                Err(Error::CorruptChunk { .. }) if attempt == 1 => {
                    tracing::warn!(chunk = %id, "chunk failed verification, reading it again");
                    continue;
                }
                other => return other,
            }
        }
    }

    /// The stored object of chunk `id` (not decoded), from wherever it is: its chunk object,
    /// its fossil, a live or a set-aside pack; `None` if the store does not have it.
    pub(crate) async fn chunk_object(&self, id: &ChunkId) -> Result<Option<Bytes>> {
        if self.layout() == Layout::Packs {
            return self.get_packed(id, true).await;
        }
        match self.get_chunk_object(id).await {
            Ok(o) => Ok(Some(o)),
            Err(Error::MissingChunk { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The object of a chunk of the `chunks` layout (or its fossil).
    async fn get_chunk_object(&self, id: &ChunkId) -> Result<Bytes> {
        {
            let obj = match self.inner.backend.get(&self.chunk_key(id)).await {
                Ok(o) => o,
                Err(e) if e.is_not_found() => {
                    match self.inner.backend.get(&self.fossil_key(id)).await {
                        Ok(o) => o,
                        Err(e) if e.is_not_found() => {
                            return Err(Error::MissingChunk {
                                digest: id.to_hex(),
                            })
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            Ok(obj)
        }
    }

    /// Seal and store a non-chunk object.
    pub(crate) async fn put_object(&self, magic: [u8; 4], key: &str, plain: &[u8]) -> Result<()> {
        self.put_object_len(magic, key, plain).await.map(|_| ())
    }

    /// [`Self::put_object`], returning the stored object's length.
    pub(crate) async fn put_object_len(
        &self,
        magic: [u8; 4],
        key: &str,
        plain: &[u8],
    ) -> Result<u64> {
        let codec = self.inner.codec.clone();
        let k = key.to_string();
        let p = plain.to_vec();
        let obj = tokio::task::spawn_blocking(move || codec.seal(magic, k.as_bytes(), &p, true))
            .await
            .map_err(|e| Error::Config(format!("encode task failed: {e}")))??;
        let n = obj.len() as u64;
        self.inner.backend.put(key, Bytes::from(obj)).await?;
        Ok(n)
    }

    /// Largest plaintext of a point object (metadata of one point: disks and labels).
    pub(crate) const MAX_POINT_BYTES: u64 = 16 << 20;
    /// Largest plaintext of a blob (catalog records, GC collections).
    pub(crate) const MAX_BLOB_BYTES: u64 = 256 << 20;

    /// Read and open a non-chunk object whose plaintext may be at most `max_len` bytes.
    pub(crate) async fn get_object(
        &self,
        magic: [u8; 4],
        key: &str,
        max_len: u64,
    ) -> Result<Vec<u8>> {
        let obj = self.inner.backend.get(key).await?;
        let codec = self.inner.codec.clone();
        let k = key.to_string();
        tokio::task::spawn_blocking(move || {
            codec
                .open(magic, k.as_bytes(), &obj, max_len)
                .map_err(|r| Error::corrupt_object(k, r))
        })
        .await
        .map_err(|e| Error::Config(format!("decode task failed: {e}")))?
    }
}
