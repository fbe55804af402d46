//! TLS (STARTTLS) configuration from PEM files, and who a client proved to be.
//!
//! The crypto provider is aws-lc-rs: unlike ring, it loads RSA keys of any size from 2048 to
//! 8192 bits (ring takes only 2048, 3072 and 4096, so keys admins already have, such as a
//! 2432-bit one, failed with "failed to parse private key as RSA, ECDSA, or EdDSA"), ECDSA
//! P-256/P-384/P-521 and Ed25519 keys.
//!
//! With a client CA, the handshake demands a client certificate that chains to it (rustls's
//! WebPKI verifier: validity dates, signature, `clientAuth` usage when the certificate names
//! usages); a client without one, or with one from another CA, fails the TLS handshake. The
//! verified certificate's names become the session's [`ClientIdentity`], which per-export
//! allow-lists ([`crate::Access`]) are checked against.

use std::fs::File;
use std::io::BufReader;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

/// Server-side TLS: the acceptor and whether plaintext exports are refused.
#[derive(Clone)]
pub struct TlsConfig {
    pub acceptor: TlsAcceptor,
    /// When set, every option but STARTTLS and ABORT is refused with `NBD_REP_ERR_TLS_REQD`
    /// until TLS is up.
    pub required: bool,
    /// Clients must present a certificate signed by the configured CA.
    pub client_auth: bool,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    #[error(
        "the private key in {path} cannot be used: {source} (keys that load: RSA of 2048 to 8192 \
         bits, ECDSA on P-256, P-384 or P-521, Ed25519; PEM as PKCS#8, PKCS#1 or SEC1)"
    )]
    Key {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("client CA {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("certificate and key do not form a valid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn open(p: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(p)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            path: p.to_path_buf(),
            source,
        })
}

fn read_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(p)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: p.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(p.to_path_buf()));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Loads a certificate chain and private key (PEM) for the server and, with `client_ca`,
    /// the CA certificates (PEM) that client certificates must chain to.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        required: bool,
    ) -> Result<Self, TlsError> {
        let certs = read_certs(cert)?;
        let key_der = rustls_pemfile::private_key(&mut open(key)?)
            .map_err(|source| TlsError::Read {
                path: key.to_path_buf(),
                source,
            })?
            .ok_or_else(|| TlsError::NoKey(key.to_path_buf()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Parse the key on its own first, so that an unusable key is reported as such.
        provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|source| TlsError::Key {
                path: key.to_path_buf(),
                source,
            })?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca)? {
                    roots.add(c).map_err(|e| TlsError::ClientCa {
                        path: ca.to_path_buf(),
                        reason: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: ca.to_path_buf(),
                    reason: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(certs, key_der)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            required,
            client_auth: client_ca.is_some(),
        })
    }
}

/// The names a verified client certificate carries: its subject's common name and its
/// subject-alternative DNS names, IP addresses and URIs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    /// The certificate itself, to check IP-address names against.
    der: Vec<u8>,
}

impl ClientIdentity {
    /// The names of a client's end-entity certificate (already verified by the handshake).
    pub fn from_certificate(der: &CertificateDer<'_>) -> Option<Self> {
        let cert = webpki::EndEntityCert::try_from(der).ok()?;
        Some(Self {
            common_name: common_name(cert.subject()),
            dns_names: cert.valid_dns_names().map(str::to_string).collect(),
            uris: cert.valid_uri_names().map(str::to_string).collect(),
            der: der.to_vec(),
        })
    }

    /// Does the certificate carry `name`, as its common name or as a subject-alternative name
    /// (DNS name, IP address or URI)? Names are compared exactly (DNS names ignore case).
    pub fn has_name(&self, name: &str) -> bool {
        if self.common_name.as_deref() == Some(name)
            || self.uris.iter().any(|u| u == name)
            || self.dns_names.iter().any(|d| d.eq_ignore_ascii_case(name))
        {
            return true;
        }
        let Ok(ip) = name.parse::<IpAddr>() else {
            return false;
        };
        let der = CertificateDer::from(self.der.as_slice());
        webpki::EndEntityCert::try_from(&der).is_ok_and(|c| {
            c.verify_is_valid_for_subject_name(&ServerName::IpAddress(ip.into()))
                .is_ok()
        })
    }

    #[cfg(test)]
    pub(crate) fn with_common_name(cn: &str) -> Self {
        Self {
            common_name: Some(cn.into()),
            ..Self::default()
        }
    }

    /// A short name for logs: the common name, else the first DNS name.
    pub fn display_name(&self) -> String {
        self.common_name
            .clone()
            .or_else(|| self.dns_names.first().cloned())
            .or_else(|| self.uris.first().cloned())
            .unwrap_or_else(|| "(certificate without names)".to_string())
    }
}

/// One DER element: (tag, contents, rest).
fn der_next(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &x in &b[..n] {
            len = (len << 8) | usize::from(x);
        }
        b = &b[n..];
        len
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

/// The first common name (OID 2.5.4.3) in a DER `Name`'s contents, if it is a string type.
fn common_name(mut name: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (tag, mut rdn, rest) = der_next(name)?;
        name = rest;
        if tag != SET {
            return None;
        }
        while !rdn.is_empty() {
            let (tag, atv, rest) = der_next(rdn)?;
            rdn = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_next(atv)?;
            if tag != OID || oid != CN {
                continue;
            }
            let (vtag, v, _) = der_next(value)?;
            // UTF8String, PrintableString, TeletexString (as Latin-1 is rare: UTF-8 only), IA5String.
            return match vtag {
                0x0c | 0x13 | 0x14 | 0x16 => std::str::from_utf8(v).ok().map(str::to_string),
                _ => None,
            };
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2432-bit RSA key (the size of the NBD reference project's test key) loads; ring, the
    /// provider used before, refuses it. Needs openssl to make the key and certificate.
    #[test]
    fn rsa_key_of_2432_bits_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("openssl")
            .current_dir(dir.path())
            .args([
                "req", "-x509", "-newkey", "rsa:2432", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=localhost",
                "-keyout",
                "k.pem",
                "-out",
                "c.pem",
            ])
            .output()
            .expect("openssl is needed to make the test key");
        assert!(ok.status.success(), "{ok:?}");
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        TlsConfig::from_pem_files(&c, &k, None, false).unwrap();
        let key = rustls_pemfile::private_key(&mut open(&k).unwrap())
            .unwrap()
            .unwrap();
        let ring = rustls::crypto::ring::default_provider();
        assert!(ring.key_provider.load_private_key(key).is_err());
        // A client CA that is not a certificate is reported with its path.
        let e = TlsConfig::from_pem_files(&c, &k, Some(&k), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn common_name_from_a_der_name() {
        // SET { SEQUENCE { OID 2.5.4.6 (C), PrintableString "DE" } },
        // SET { SEQUENCE { OID 2.5.4.3 (CN), UTF8String "hv1" } }
        let name = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'D', b'E', 0x31,
            0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x03, b'h', b'v', b'1',
        ];
        assert_eq!(common_name(&name).as_deref(), Some("hv1"));
        assert_eq!(common_name(&name[..13]), None);
        // Truncated or garbage input is not a name, and never panics.
        for cut in 0..name.len() {
            let _ = common_name(&name[..cut]);
        }
        assert_eq!(common_name(&[0x31, 0x85, 0xff]), None);
    }
}
