//! Where a store lives (local directory or S3 bucket) and how to open it.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::local::LocalBackend;
use crate::backend::s3::{S3Backend, S3Config};
use crate::backend::Backend;
use crate::crypto::StoreKey;
use crate::error::Result;
use crate::store::{CreateOptions, Store};

/// Location of a store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoreLocation {
    /// A local directory.
    Local {
        /// Root directory.
        path: PathBuf,
    },
    /// An S3 bucket (and prefix).
    S3(S3Config),
}

impl StoreLocation {
    /// Build the backend (does not contact the server).
    pub async fn backend(&self) -> Result<Arc<dyn Backend>> {
        Ok(match self {
            StoreLocation::Local { path } => Arc::new(LocalBackend::open(path.clone())?),
            StoreLocation::S3(c) => Arc::new(S3Backend::connect(c).await?),
        })
    }

    /// Open the store at this location.
    pub async fn open(&self, key: Option<&StoreKey>) -> Result<Store> {
        Store::open(self.backend().await?, key).await
    }

    /// Create a store at this location.
    pub async fn create(&self, opts: CreateOptions, key: Option<&StoreKey>) -> Result<Store> {
        Store::create(self.backend().await?, opts, key).await
    }
}
