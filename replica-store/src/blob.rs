//! Small named objects ("blobs") under a namespace: shipped change-log segments, replication
//! state, ... Sealed like every other object (encrypted when the store is encrypted).

use bytes::Bytes;

use crate::backend::validate_key;
use crate::chunk::MAGIC_BLOB;
use crate::error::{Error, Result};
use crate::point::validate_name;
use crate::store::Store;

fn blob_key(namespace: &str, name: &str) -> Result<String> {
    validate_name("blob namespace", namespace)?;
    let key = format!("blobs/{namespace}/{name}");
    validate_key(&key)?;
    Ok(key)
}

impl Store {
    /// Store (or replace) blob `name` (may contain `/`) in `namespace`.
    pub async fn put_blob(&self, namespace: &str, name: &str, data: &[u8]) -> Result<()> {
        let key = blob_key(namespace, name)?;
        self.put_object(MAGIC_BLOB, &key, data).await
    }

    /// Read a blob; `None` if it does not exist.
    pub async fn get_blob(&self, namespace: &str, name: &str) -> Result<Option<Bytes>> {
        let key = blob_key(namespace, name)?;
        match self
            .get_object(MAGIC_BLOB, &key, Self::MAX_BLOB_BYTES)
            .await
        {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Names of the blobs in `namespace` whose name starts with `prefix`, sorted.
    pub async fn list_blobs(&self, namespace: &str, prefix: &str) -> Result<Vec<String>> {
        validate_name("blob namespace", namespace)?;
        let base = format!("blobs/{namespace}/");
        let objs = self.backend().list(&format!("{base}{prefix}")).await?;
        Ok(objs
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(&base).map(String::from))
            .collect())
    }

    /// Delete a blob (missing is fine).
    pub async fn delete_blob(&self, namespace: &str, name: &str) -> Result<()> {
        let key = blob_key(namespace, name)?;
        self.backend().delete(&key).await
    }
}
