//! Encryption at rest: key files, key derivation, keyed chunk ids and AEAD sealing.
//!
//! A store key is 32 random bytes kept in a key file outside the store. Sub-keys are derived
//! with HMAC-SHA256(master, label): one for chunk ids (so the store cannot confirm content),
//! one for AEAD encryption, one for the fingerprint recorded in `store.toml`.

use std::path::Path;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes256Gcm;
use chacha20poly1305::ChaCha20Poly1305;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{Error, Result};

type HmacSha256 = Hmac<Sha256>;

/// First line marker of a key file.
const KEY_FILE_TAG: &str = "standby-store-key-v1";
/// Nonce length of both ciphers.
pub const NONCE_LEN: usize = 12;
/// Authentication tag length of both ciphers.
pub const TAG_LEN: usize = 16;

/// AEAD cipher of an encrypted store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Cipher {
    /// AES-256-GCM (fast with AES-NI + CLMUL).
    #[default]
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305 (fast without AES hardware).
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl Cipher {
    /// Id stored in object headers.
    pub fn id(self) -> u8 {
        match self {
            Cipher::Aes256Gcm => 1,
            Cipher::ChaCha20Poly1305 => 2,
        }
    }

    /// Parse a cipher name as written in `store.toml`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "aes-256-gcm" | "aes" => Ok(Cipher::Aes256Gcm),
            "chacha20-poly1305" | "chacha" => Ok(Cipher::ChaCha20Poly1305),
            _ => Err(Error::InvalidArgument(format!(
                "unknown cipher {s:?} (expected aes-256-gcm or chacha20-poly1305)"
            ))),
        }
    }
}

/// The 32-byte master key of an encrypted store.
#[derive(Clone)]
pub struct StoreKey([u8; 32]);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreKey({})", self.fingerprint())
    }
}

impl StoreKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        StoreKey(k)
    }

    /// Key from raw bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        StoreKey(b)
    }

    fn derive(&self, label: &str) -> [u8; 32] {
        // HMAC accepts keys of any length: new_from_slice cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        m.update(label.as_bytes());
        m.finalize().into_bytes().into()
    }

    /// Public fingerprint recorded in `store.toml` (reveals nothing about the key).
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.derive("standby key fingerprint v1")[..16])
    }

    /// Text form written to key files.
    pub fn to_file_text(&self) -> String {
        format!(
            "# Standby replica store key. Keep it safe: without it the store cannot be read.\n{KEY_FILE_TAG} {}\n",
            hex::encode(self.0)
        )
    }

    /// Parse the text of a key file.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |d: &str| Error::BadKeyFile {
            path: path.to_path_buf(),
            detail: d.to_string(),
        };
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| bad("no key line"))?;
        let hexpart = line
            .strip_prefix(KEY_FILE_TAG)
            .map(str::trim)
            .unwrap_or(line);
        let raw = hex::decode(hexpart).map_err(|_| bad("key is not hex"))?;
        let arr: [u8; 32] = raw
            .try_into()
            .map_err(|_| bad("key must be 32 bytes (64 hex chars)"))?;
        Ok(StoreKey(arr))
    }

    /// Read a key file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::BadKeyFile {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// Write a new key file with mode 0600; refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(format!("creating key file {}", path.display()), e))?;
        f.write_all(self.to_file_text().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(format!("writing key file {}", path.display()), e))
    }
}

/// Keys in use by an open encrypted store.
#[derive(Clone)]
pub struct Crypto {
    cipher: Cipher,
    id_mac: HmacSha256,
    aes: Option<Aes256Gcm>,
    chacha: Option<ChaCha20Poly1305>,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Crypto({:?})", self.cipher)
    }
}

impl Crypto {
    /// Derive the working keys of `key` for `cipher`.
    pub fn new(key: &StoreKey, cipher: Cipher) -> Self {
        let idk = key.derive("standby chunk id v1");
        let enc = key.derive("standby encryption v1");
        let id_mac = <HmacSha256 as Mac>::new_from_slice(&idk).unwrap_or_else(|_| unreachable!());
        let (aes, chacha) = match cipher {
            Cipher::Aes256Gcm => (Some(Aes256Gcm::new((&enc).into())), None),
            Cipher::ChaCha20Poly1305 => (None, Some(ChaCha20Poly1305::new((&enc).into()))),
        };
        Crypto {
            cipher,
            id_mac,
            aes,
            chacha,
        }
    }

    /// Cipher in use.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Keyed chunk id: HMAC-SHA256(id key, plaintext).
    pub fn keyed_digest(&self, data: &[u8]) -> [u8; 32] {
        let mut m = self.id_mac.clone();
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// Encrypt in place: `out[start..start + NONCE_LEN]` receives a fresh random nonce, the
    /// bytes after it are encrypted, and the tag is appended.
    pub fn seal_into(&self, aad: &[u8], out: &mut Vec<u8>, start: usize) -> Result<()> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        if out.len() < start + NONCE_LEN {
            return Err(Error::Config("seal_into: buffer too short".into()));
        }
        out[start..start + NONCE_LEN].copy_from_slice(&nonce);
        let body = &mut out[start + NONCE_LEN..];
        let tag = match (&self.aes, &self.chacha) {
            (Some(c), _) => c.encrypt_in_place_detached((&nonce).into(), aad, body),
            (_, Some(c)) => c.encrypt_in_place_detached((&nonce).into(), aad, body),
            _ => return Err(Error::Config("no cipher".into())),
        }
        .map_err(|_| Error::Config("encryption failed".into()))?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// Encrypt `buf` with a fresh random nonce; returns nonce || ciphertext || tag.
    pub fn seal(&self, aad: &[u8], buf: Vec<u8>) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len() + TAG_LEN);
        out.extend_from_slice(&[0u8; NONCE_LEN]);
        out.extend_from_slice(&buf);
        self.seal_into(aad, &mut out, 0)?;
        Ok(out)
    }

    /// Decrypt nonce || ciphertext || tag; `None` if authentication fails.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let mut buf = ct.to_vec();
        let r = match (&self.aes, &self.chacha) {
            (Some(c), _) => c.decrypt_in_place(nonce.into(), aad, &mut buf),
            (_, Some(c)) => c.decrypt_in_place(nonce.into(), aad, &mut buf),
            _ => return None,
        };
        r.ok().map(|_| buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_roundtrip_and_seal() {
        let k = StoreKey::generate();
        let k2 = StoreKey::parse(&k.to_file_text(), Path::new("k")).unwrap();
        assert_eq!(k.fingerprint(), k2.fingerprint());
        for c in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let cr = Crypto::new(&k, c);
            let s = cr.seal(b"aad", b"hello".to_vec()).unwrap();
            assert_eq!(cr.open(b"aad", &s).unwrap(), b"hello");
            assert!(cr.open(b"other", &s).is_none());
            let other = Crypto::new(&StoreKey::generate(), c);
            assert!(other.open(b"aad", &s).is_none());
        }
        assert_ne!(
            Crypto::new(&k, Cipher::Aes256Gcm).keyed_digest(b"x"),
            Crypto::new(&StoreKey::generate(), Cipher::Aes256Gcm).keyed_digest(b"x")
        );
    }
}
