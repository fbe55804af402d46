//! TLS (STARTTLS) configuration from PEM files.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tokio_rustls::TlsAcceptor;

/// Server-side TLS: the acceptor and whether plaintext exports are refused.
#[derive(Clone)]
pub struct TlsConfig {
    pub acceptor: TlsAcceptor,
    /// When set, every option but STARTTLS and ABORT is refused with `NBD_REP_ERR_TLS_REQD`
    /// until TLS is up.
    pub required: bool,
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
    #[error("certificate and key do not form a valid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsConfig {
    /// Loads a certificate chain and private key (PEM) for the server.
    pub fn from_pem_files(cert: &Path, key: &Path, required: bool) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            File::open(p)
                .map(BufReader::new)
                .map_err(|source| TlsError::Read {
                    path: p.to_path_buf(),
                    source,
                })
        };
        let certs = rustls_pemfile::certs(&mut read(cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Read {
                path: cert.to_path_buf(),
                source,
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(cert.to_path_buf()));
        }
        let key_der = rustls_pemfile::private_key(&mut read(key)?)
            .map_err(|source| TlsError::Read {
                path: key.to_path_buf(),
                source,
            })?
            .ok_or_else(|| TlsError::NoKey(key.to_path_buf()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key_der)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            required,
        })
    }
}
