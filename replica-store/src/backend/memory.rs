//! In-memory backend (tests only).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, Backend, ObjectMeta, RequestCounters, RequestCounts};
use crate::error::{Error, Result};

/// A backend holding objects in a `BTreeMap`. Clones share the same objects.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    objects: Arc<Mutex<BTreeMap<String, (Bytes, SystemTime)>>>,
    counters: Arc<RequestCounters>,
}

impl MemoryBackend {
    /// Empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Bytes, SystemTime)>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Overwrite an object's modification time (tests of time-based policies).
    pub fn set_modified(&self, key: &str, t: SystemTime) {
        if let Some(v) = self.map().get_mut(key) {
            v.1 = t;
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn describe(&self) -> String {
        "memory store".into()
    }

    fn requests(&self) -> Option<RequestCounts> {
        Some(self.counters.snapshot())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        validate_key(key)?;
        self.counters.put(data.len() as u64);
        self.map()
            .insert(key.to_string(), (data, SystemTime::now()));
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        validate_key(key)?;
        self.counters.put(data.len() as u64);
        let mut m = self.map();
        if m.contains_key(key) {
            return Ok(false);
        }
        m.insert(key.to_string(), (data, SystemTime::now()));
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let r = self.get_uncounted(key);
        if let Ok(b) = &r {
            self.counters.get(b.len() as u64);
        }
        r
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        let b = self.get_uncounted(key)?;
        let start = (offset as usize).min(b.len());
        let end = start.saturating_add(len as usize).min(b.len());
        self.counters.get((end - start) as u64);
        Ok(b.slice(start..end))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.counters.head();
        Ok(self.map().get(key).map(|(b, t)| ObjectMeta {
            key: key.to_string(),
            size: b.len() as u64,
            modified: *t,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.counters.list();
        Ok(self
            .map()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (b, t))| ObjectMeta {
                key: k.clone(),
                size: b.len() as u64,
                modified: *t,
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.counters.delete();
        self.map().remove(key);
        Ok(())
    }
}

impl MemoryBackend {
    fn get_uncounted(&self, key: &str) -> Result<Bytes> {
        self.map()
            .get(key)
            .map(|v| v.0.clone())
            .ok_or_else(|| Error::NotFound {
                backend: self.describe(),
                key: key.into(),
            })
    }
}
