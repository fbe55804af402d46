//! Named exports and the table the server looks them up in.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::device::BlockDevice;

/// One export: a device under a name.
pub struct Export<D> {
    pub name: String,
    pub description: String,
    pub device: Arc<D>,
    pub read_only: bool,
}

/// The set of exports a server offers. Exports can be added and removed while the server runs
/// (connections already attached to a removed export keep their device until they close).
pub struct Exports<D> {
    map: RwLock<BTreeMap<String, Arc<Export<D>>>>,
}

impl<D> Default for Exports<D> {
    fn default() -> Self {
        Self {
            map: RwLock::new(BTreeMap::new()),
        }
    }
}

impl<D: BlockDevice> Exports<D> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an export.
    pub fn insert(&self, export: Export<D>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.insert(export.name.clone(), Arc::new(export));
    }

    /// Removes an export; returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.remove(name).is_some()
    }

    /// Looks an export up. The empty name selects the only export when there is exactly one.
    pub fn get(&self, name: &str) -> Option<Arc<Export<D>>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() && map.len() == 1 {
            return map.values().next().cloned();
        }
        map.get(name).cloned()
    }

    /// All exports, ordered by name.
    pub fn list(&self) -> Vec<Arc<Export<D>>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }
}
