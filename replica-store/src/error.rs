//! Typed errors. Every error says whether retrying the same operation later may succeed
//! ([`Error::is_recoverable`]) so the replication engine can decide between "retry with
//! backoff" and "stop and tell the administrator".

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recoverability {
    /// Transient: network, timeouts, 5xx, throttling, local disk full. Retry with backoff.
    Recoverable,
    /// Needs an administrator: credentials, missing bucket, wrong key, unknown format, corruption.
    NonRecoverable,
}

/// Errors of the replica store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An object does not exist in the backend.
    #[error("object {key} not found in {backend}")]
    NotFound { backend: String, key: String },

    /// Local I/O failure (local backend, image files).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },

    /// Network-level failure talking to an object store (connection, timeout, reset).
    #[error("network error talking to {backend} during {op}: {detail} (will be retried)")]
    Network {
        backend: String,
        op: String,
        detail: String,
    },

    /// The object store answered with a server-side or throttling error (5xx, 429, SlowDown).
    #[error("{backend} returned a temporary error during {op} (HTTP {status}): {detail}")]
    ServerBusy {
        backend: String,
        op: String,
        status: u16,
        detail: String,
    },

    /// Credentials rejected or missing.
    #[error(
        "access denied by {backend} during {op}: {detail}. Check AWS_ACCESS_KEY_ID / \
         AWS_SECRET_ACCESS_KEY (or the AWS profile) and the key's permissions on the bucket"
    )]
    Auth {
        backend: String,
        op: String,
        detail: String,
    },

    /// The bucket does not exist.
    #[error("bucket {bucket} does not exist on {endpoint}; create it or fix --s3-bucket")]
    BucketMissing { bucket: String, endpoint: String },

    /// The object store rejected the request for another non-retryable reason (HTTP 4xx).
    #[error("{backend} rejected {op} on {key} (HTTP {status}): {detail}")]
    Rejected {
        backend: String,
        op: String,
        key: String,
        status: u16,
        detail: String,
    },

    /// Configuration of the store or the backend is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// No store.toml at the root of the backend.
    #[error(
        "no replica store at {location} (store.toml missing); create one with `standby store init`"
    )]
    NotAStore { location: String },

    /// A store already exists where one was to be created.
    #[error("a replica store already exists at {location}")]
    AlreadyExists { location: String },

    /// The store was written by a newer (or foreign) version of the software.
    #[error(
        "store at {location} has format {found}; this build understands format version {supported}. \
         Upgrade standby before opening it"
    )]
    UnsupportedFormat {
        location: String,
        found: String,
        supported: u32,
    },

    /// The store is encrypted and no key was supplied.
    #[error(
        "store at {location} is encrypted (key fingerprint {fingerprint}); supply its key file"
    )]
    KeyRequired {
        location: String,
        fingerprint: String,
    },

    /// A key was supplied but it is not the store's key.
    #[error(
        "the key file does not match the store at {location}: store expects key fingerprint \
         {expected}, the supplied key has fingerprint {found}"
    )]
    WrongKey {
        location: String,
        expected: String,
        found: String,
    },

    /// The key file is unreadable or malformed.
    #[error("invalid key file {path}: {detail}")]
    BadKeyFile { path: PathBuf, detail: String },

    /// A chunk failed verification (CRC, authentication tag, decompression or digest mismatch).
    #[error("chunk {digest} is corrupt: {reason}")]
    CorruptChunk { digest: String, reason: String },

    /// A chunk referenced by a manifest is missing from the store.
    #[error("chunk {digest} is missing from the store (referenced by a recovery point)")]
    MissingChunk { digest: String },

    /// A non-chunk object (store.toml, point, index, blob) is corrupt or malformed.
    #[error("object {key} is corrupt: {reason}")]
    CorruptObject { key: String, reason: String },

    /// A recovery point does not exist.
    #[error("recovery point {vm}/{point} not found")]
    PointNotFound { vm: String, point: String },

    /// A disk is not part of a recovery point.
    #[error("disk {disk} is not part of recovery point {point}")]
    DiskNotFound { point: String, disk: String },

    /// An argument is out of range or a name is not acceptable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The upload session lasted longer than the store's max session time; GC may have
    /// collected chunks it relied on, so it must not publish. Start a new session.
    #[error(
        "upload session for {vm} ran {elapsed_secs}s, longer than the store's max_session_secs \
         ({max_secs}s); not publishing. Retry the replication"
    )]
    SessionExpired {
        vm: String,
        elapsed_secs: u64,
        max_secs: u64,
    },

    /// Chunks of an index adopted from an earlier upload session
    /// ([`crate::PointBuilder::set_index`]) are gone: GC deleted them while the pass that
    /// stored them ran longer than the store's `max_session_secs`. Nothing was published; the
    /// caller stores these chunks (positions per disk) again and publishes anew.
    #[error(
        "{} chunks stored for {vm} by an earlier upload session were removed by GC (the pass \
         ran longer than the store's max_session_secs); they must be copied again",
        gone.iter().map(|(_, c)| c.len()).sum::<usize>()
    )]
    ChunksGone {
        vm: String,
        /// (disk, chunk positions) of every adopted disk that lost chunks.
        gone: Vec<(String, Vec<u64>)>,
    },

    /// Injected by the fault-injecting backend (tests).
    #[error("injected fault during {op} on {key}")]
    Injected { op: String, key: String },
}

impl Error {
    /// Classify the error.
    pub fn recoverability(&self) -> Recoverability {
        use Recoverability::*;
        match self {
            Error::Network { .. }
            | Error::ServerBusy { .. }
            | Error::Injected { .. }
            | Error::SessionExpired { .. }
            | Error::ChunksGone { .. } => Recoverable,
            Error::Io { source, .. } => io_recoverability(source),
            Error::NotFound { .. }
            | Error::Auth { .. }
            | Error::BucketMissing { .. }
            | Error::Rejected { .. }
            | Error::Config(_)
            | Error::NotAStore { .. }
            | Error::AlreadyExists { .. }
            | Error::UnsupportedFormat { .. }
            | Error::KeyRequired { .. }
            | Error::WrongKey { .. }
            | Error::BadKeyFile { .. }
            | Error::CorruptChunk { .. }
            | Error::MissingChunk { .. }
            | Error::CorruptObject { .. }
            | Error::PointNotFound { .. }
            | Error::DiskNotFound { .. }
            | Error::InvalidArgument(_) => NonRecoverable,
        }
    }

    /// True if retrying later may succeed.
    pub fn is_recoverable(&self) -> bool {
        self.recoverability() == Recoverability::Recoverable
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: std::sync::Arc::new(source),
        }
    }

    pub(crate) fn corrupt_object(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::CorruptObject {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

fn io_recoverability(e: &std::io::Error) -> Recoverability {
    use std::io::ErrorKind::*;
    match e.kind() {
        PermissionDenied | NotFound | InvalidInput | InvalidData | Unsupported | AlreadyExists => {
            Recoverability::NonRecoverable
        }
        // Disk full, interrupted, timed out, EIO etc.: may succeed after the admin frees space or
        // the device recovers.
        _ => Recoverability::Recoverable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let full = Error::io(
            "writing chunk",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(full.is_recoverable());
        let perm = Error::io(
            "x",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(!perm.is_recoverable());
        let auth = Error::Auth {
            backend: "s3".into(),
            op: "put".into(),
            detail: "403".into(),
        };
        assert!(!auth.is_recoverable());
        assert!(auth.to_string().contains("AWS_ACCESS_KEY_ID"));
    }
}
