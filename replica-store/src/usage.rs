//! What a store holds, as its objects say: chunk and pack counts and bytes, and every object
//! by power-of-two size — the figures `standby store info` prints and the gateway's
//! `GET /api/v1/store` serves (one implementation for both).
//!
//! Cost: one listing of the whole store (plus, for a packs store, of its pack indexes). Meant
//! for an admin's request, never for a hot path.

use serde::Serialize;

use crate::error::Result;
use crate::pack::Layout;
use crate::store::Store;

/// Objects whose size lies in `[min_bytes, below_bytes)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SizeClass {
    pub min_bytes: u64,
    pub below_bytes: u64,
    pub objects: u64,
    pub bytes: u64,
}

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Distinct stored chunks (chunk objects, or chunk entries of live packs).
    pub chunks: u64,
    /// Bytes of the objects that hold chunk data (chunk objects, or pack objects).
    pub chunk_bytes: u64,
    /// Live packs (0 for a store of one object per chunk).
    pub packs: u64,
    /// Every object of the store.
    pub objects: u64,
    pub object_bytes: u64,
    /// Every object of the store by size, smallest class first; empty classes left out.
    pub sizes: Vec<SizeClass>,
}

impl Store {
    /// Lists the store and sums it up (see the module documentation).
    pub async fn usage(&self) -> Result<Usage> {
        let objects = self.backend().list("").await?;
        let sum = |prefix: &str| {
            objects
                .iter()
                .filter(|o| o.key.starts_with(prefix))
                .fold((0u64, 0u64), |(n, b), o| (n + 1, b + o.size))
        };
        let (chunk_objects, chunk_object_bytes) = sum("chunks/");
        let (_, pack_bytes) = sum("packs/");
        let (chunks, chunk_bytes, packs) = match self.settings().layout {
            Layout::Chunks => (chunk_objects, chunk_object_bytes, 0),
            Layout::Packs => {
                let t = self.pack_totals().await?;
                (t.chunks, pack_bytes, t.packs)
            }
        };
        let mut classes: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
        for o in &objects {
            let class = 64 - o.size.max(1).leading_zeros();
            let e = classes.entry(class).or_default();
            e.0 += 1;
            e.1 += o.size;
        }
        let sizes = classes
            .into_iter()
            .map(|(c, (objects, bytes))| SizeClass {
                min_bytes: if c <= 1 { 0 } else { 1u64 << (c - 1) },
                below_bytes: 1u64 << c,
                objects,
                bytes,
            })
            .collect();
        Ok(Usage {
            chunks,
            chunk_bytes,
            packs,
            objects: objects.len() as u64,
            object_bytes: objects.iter().map(|o| o.size).sum(),
            sizes,
        })
    }
}
