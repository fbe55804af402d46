//! Fault-injecting wrapper (tests only): errors, latency, lost acknowledgements and corrupted
//! reads, driven by a seed so failures are reproducible.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Backend, ObjectMeta};
use crate::error::{Error, Result};

/// What to inject. Rates are probabilities in `0.0..=1.0` per operation.
#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    /// Seed of the random generator.
    pub seed: u64,
    /// Operation fails before reaching the inner backend.
    pub error_rate: f64,
    /// Put reaches the inner backend but the caller gets an error (lost acknowledgement).
    pub lost_ack_rate: f64,
    /// A successful read has one byte flipped before it is returned.
    pub corrupt_read_rate: f64,
    /// Each operation sleeps a random duration up to this.
    pub max_latency: Duration,
    /// Only keys starting with this prefix are affected (empty: all keys).
    pub key_prefix: String,
}

/// Wraps a backend and injects faults according to a [`FaultConfig`].
#[derive(Debug, Clone)]
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    cfg: Arc<Mutex<FaultConfig>>,
    rng: Arc<Mutex<StdRng>>,
}

impl FaultyBackend {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Backend>, cfg: FaultConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        FaultyBackend {
            inner,
            cfg: Arc::new(Mutex::new(cfg)),
            rng: Arc::new(Mutex::new(rng)),
        }
    }

    /// Change the fault configuration (keeps the random sequence).
    pub fn set_config(&self, cfg: FaultConfig) {
        *self.cfg.lock().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    fn cfg(&self) -> FaultConfig {
        self.cfg.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn roll(&self, p: f64) -> bool {
        p > 0.0
            && self
                .rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .gen_bool(p.min(1.0))
    }

    async fn before(&self, op: &str, key: &str) -> Result<FaultConfig> {
        let cfg = self.cfg();
        if !key.starts_with(&cfg.key_prefix) {
            return Ok(FaultConfig::default());
        }
        if !cfg.max_latency.is_zero() {
            let ns = self
                .rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .gen_range(0..=cfg.max_latency.as_nanos() as u64);
            tokio::time::sleep(Duration::from_nanos(ns)).await;
        }
        if self.roll(cfg.error_rate) {
            return Err(Error::Injected {
                op: op.into(),
                key: key.into(),
            });
        }
        Ok(cfg)
    }

    fn maybe_corrupt(&self, cfg: &FaultConfig, b: Bytes) -> Bytes {
        if b.is_empty() || !self.roll(cfg.corrupt_read_rate) {
            return b;
        }
        let mut v = b.to_vec();
        let i = self
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gen_range(0..v.len());
        v[i] ^= 0x5a;
        Bytes::from(v)
    }
}

#[async_trait]
impl Backend for FaultyBackend {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let cfg = self.before("put", key).await?;
        self.inner.put(key, data).await?;
        if self.roll(cfg.lost_ack_rate) {
            return Err(Error::Injected {
                op: "put (ack lost)".into(),
                key: key.into(),
            });
        }
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        let cfg = self.before("put_if_absent", key).await?;
        let r = self.inner.put_if_absent(key, data).await?;
        if self.roll(cfg.lost_ack_rate) {
            return Err(Error::Injected {
                op: "put_if_absent (ack lost)".into(),
                key: key.into(),
            });
        }
        Ok(r)
    }

    async fn put_staged(&self, key: &str, data: Bytes) -> Result<Option<super::Staged>> {
        let cfg = self.before("put_staged", key).await?;
        let r = self.inner.put_staged(key, data).await?;
        if self.roll(cfg.lost_ack_rate) {
            return Err(Error::Injected {
                op: "put_staged (ack lost)".into(),
                key: key.into(),
            });
        }
        Ok(r)
    }

    async fn commit_staged(&self, staged: Vec<super::Staged>) -> Result<()> {
        let key = staged.first().map(|s| s.key.clone()).unwrap_or_default();
        self.before("commit_staged", &key).await?;
        self.inner.commit_staged(staged).await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let cfg = self.before("get", key).await?;
        let b = self.inner.get(key).await?;
        Ok(self.maybe_corrupt(&cfg, b))
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        let cfg = self.before("get_range", key).await?;
        let b = self.inner.get_range(key, offset, len).await?;
        Ok(self.maybe_corrupt(&cfg, b))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.before("head", key).await?;
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.before("list", prefix).await?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.before("delete", key).await?;
        self.inner.delete(key).await
    }
}
