//! Catalog: VMs, disks and recovery points, derived from the objects of the store so any
//! gateway opening the same store sees the same catalog.

use std::collections::BTreeSet;

use futures::stream::{self, StreamExt, TryStreamExt};

use crate::chunk::MAGIC_POINT;
use crate::error::{Error, Result};
use crate::point::{point_key, validate_name, PointMeta};
use crate::store::Store;

/// Parse `points/<vm>/<id>.point` into (vm, id).
pub(crate) fn parse_point_key(key: &str) -> Option<(String, String)> {
    let rest = key.strip_prefix("points/")?;
    let (vm, file) = rest.split_once('/')?;
    let id = file.strip_suffix(".point")?;
    Some((vm.to_string(), id.to_string()))
}

impl Store {
    /// VMs that have at least one point.
    pub async fn list_vms(&self) -> Result<Vec<String>> {
        let objs = self.backend().list("points/").await?;
        let vms: BTreeSet<String> = objs
            .iter()
            .filter_map(|o| parse_point_key(&o.key))
            .map(|(vm, _)| vm)
            .collect();
        Ok(vms.into_iter().collect())
    }

    /// (vm, id) of every published point (of one VM, or all), sorted by VM then id (= time).
    pub async fn list_point_ids(&self, vm: Option<&str>) -> Result<Vec<(String, String)>> {
        let prefix = match vm {
            Some(v) => {
                validate_name("VM", v)?;
                format!("points/{v}/")
            }
            None => "points/".to_string(),
        };
        let mut ids: Vec<_> = self
            .backend()
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|o| parse_point_key(&o.key))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Metadata of every published point (of one VM, or all), oldest first per VM.
    pub async fn list_points(&self, vm: Option<&str>) -> Result<Vec<PointMeta>> {
        let ids = self.list_point_ids(vm).await?;
        let mut points: Vec<PointMeta> = stream::iter(ids)
            .map(|(vm, id)| async move {
                match self.load_point(&vm, &id).await {
                    // Deleted between listing and reading (prune running elsewhere).
                    Err(Error::PointNotFound { .. }) => Ok(None),
                    other => other.map(Some),
                }
            })
            .buffered(16)
            .try_filter_map(|p| std::future::ready(Ok(p)))
            .try_collect()
            .await?;
        points.sort_by(|a, b| {
            (&a.vm, a.created_unix_ms, &a.id).cmp(&(&b.vm, b.created_unix_ms, &b.id))
        });
        Ok(points)
    }

    /// Load one point's metadata.
    pub async fn load_point(&self, vm: &str, id: &str) -> Result<PointMeta> {
        validate_name("VM", vm)?;
        let key = point_key(vm, id);
        let raw = match self.get_object(MAGIC_POINT, &key).await {
            Ok(r) => r,
            Err(e) if e.is_not_found() => {
                return Err(Error::PointNotFound {
                    vm: vm.into(),
                    point: id.into(),
                })
            }
            Err(e) => return Err(e),
        };
        let meta: PointMeta =
            serde_json::from_slice(&raw).map_err(|e| Error::corrupt_object(&key, e.to_string()))?;
        if meta.vm != vm || meta.id != id {
            return Err(Error::corrupt_object(
                &key,
                "point metadata names another point",
            ));
        }
        if meta.format_version != crate::point::POINT_FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                location: key,
                found: format!("point version {}", meta.format_version),
                supported: crate::point::POINT_FORMAT_VERSION,
            });
        }
        Ok(meta)
    }

    /// Newest point of a VM, if any.
    pub async fn latest_point(&self, vm: &str) -> Result<Option<PointMeta>> {
        let ids = self.list_point_ids(Some(vm)).await?;
        match ids.last() {
            Some((vm, id)) => Ok(Some(self.load_point(vm, id).await?)),
            None => Ok(None),
        }
    }

    /// Find a point by `vm/id`, by bare id (searching all VMs), or `vm/latest`.
    pub async fn find_point(&self, spec: &str) -> Result<PointMeta> {
        if let Some((vm, id)) = spec.split_once('/') {
            if id == "latest" {
                return self
                    .latest_point(vm)
                    .await?
                    .ok_or_else(|| Error::PointNotFound {
                        vm: vm.into(),
                        point: "latest".into(),
                    });
            }
            return self.load_point(vm, id).await;
        }
        let ids = self.list_point_ids(None).await?;
        let matches: Vec<_> = ids
            .iter()
            .filter(|(_, id)| id == spec || id.starts_with(spec))
            .collect();
        match matches.as_slice() {
            [(vm, id)] => self.load_point(vm, id).await,
            [] => Err(Error::PointNotFound {
                vm: "*".into(),
                point: spec.into(),
            }),
            _ => Err(Error::InvalidArgument(format!(
                "point {spec:?} is ambiguous; use VM/ID"
            ))),
        }
    }

    /// Delete a point: the point object first (un-publish), then its indexes — those no
    /// other point of the VM shares (a delta point refers to its parent's unchanged index).
    pub async fn delete_point(&self, point: &PointMeta) -> Result<()> {
        self.backend()
            .delete(&point_key(&point.vm, &point.id))
            .await?;
        let shared: std::collections::HashSet<String> = self
            .list_points(Some(&point.vm))
            .await?
            .iter()
            .filter(|p| p.id != point.id)
            .flat_map(|p| p.disks.iter().map(|d| d.index_key.clone()))
            .collect();
        for d in &point.disks {
            if !shared.contains(&d.index_key) {
                self.backend().delete(&d.index_key).await?;
            }
        }
        tracing::info!(point = %point.full_id(), "deleted recovery point");
        Ok(())
    }
}
