//! Catalog: VMs, disks and recovery points, derived from the objects of the store so any
//! gateway opening the same store sees the same catalog.
//!
//! Whoever can write the store can write anything under `points/`. Every point is checked
//! before use ([`PointMeta::check`]: names, index keys, creation time), and one object that
//! fails the check — or is not a point key at all — is *junk*: it is reported
//! ([`PointListing::junk`], a warning in the log) and left out, so listing, failover,
//! retention and GC of every other point go on. Errors that may be transient (network,
//! backend) and points of a newer format still stop the listing: GC must never run on a
//! partial view of the points that exist.

use std::collections::BTreeSet;

use futures::stream::{self, StreamExt};

use crate::chunk::MAGIC_POINT;
use crate::error::{Error, Result};
use crate::point::{point_key, validate_name, PointMeta};
use crate::store::Store;

/// Parse `points/<vm>/<id>.point` into (vm, id); both must be valid names.
pub(crate) fn parse_point_key(key: &str) -> Option<(String, String)> {
    let rest = key.strip_prefix("points/")?;
    let (vm, file) = rest.split_once('/')?;
    let id = file.strip_suffix(".point")?;
    if validate_name("VM", vm).is_err() || validate_name("point", id).is_err() {
        return None;
    }
    Some((vm.to_string(), id.to_string()))
}

/// An object under `points/` that is not a usable point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JunkPoint {
    /// Its key.
    pub key: String,
    /// Why it is not used.
    pub reason: String,
}

/// The points of a listing, and the junk met on the way.
#[derive(Debug, Clone, Default)]
pub struct PointListing {
    /// Valid points, sorted by VM, creation time, id.
    pub points: Vec<PointMeta>,
    /// Objects under `points/` that are not valid points (reported, not used).
    pub junk: Vec<JunkPoint>,
}

/// True for an error that makes a point object junk (its content is wrong for good), false
/// for one that may pass (network, backend) or needs a newer program (format version).
fn is_junk(e: &Error) -> bool {
    matches!(e, Error::CorruptObject { .. } | Error::InvalidArgument(_))
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

    /// Metadata of every valid published point (of one VM, or all), oldest first per VM.
    /// Junk under `points/` is logged and left out (see the module documentation).
    pub async fn list_points(&self, vm: Option<&str>) -> Result<Vec<PointMeta>> {
        let listing = self.list_points_checked(vm).await?;
        for j in &listing.junk {
            tracing::warn!(key = %j.key, "ignoring junk in the store: {}", j.reason);
        }
        Ok(listing.points)
    }

    /// [`Self::list_points`], with the junk returned for the caller to report.
    pub async fn list_points_checked(&self, vm: Option<&str>) -> Result<PointListing> {
        let prefix = match vm {
            Some(v) => {
                validate_name("VM", v)?;
                format!("points/{v}/")
            }
            None => "points/".to_string(),
        };
        let mut junk = Vec::new();
        let mut ids = Vec::new();
        for o in self.backend().list(&prefix).await? {
            match parse_point_key(&o.key) {
                Some(id) => ids.push(id),
                None => junk.push(JunkPoint {
                    key: o.key.clone(),
                    reason: "not a point key (points/VM/ID.point with valid names)".into(),
                }),
            }
        }
        ids.sort();
        let loaded: Vec<(String, Result<PointMeta>)> = stream::iter(ids)
            .map(|(vm, id)| async move {
                let key = point_key(&vm, &id);
                (key, self.load_point(&vm, &id).await)
            })
            .buffered(16)
            .collect()
            .await;
        let mut points = Vec::new();
        for (key, r) in loaded {
            match r {
                Ok(p) => points.push(p),
                // Deleted between listing and reading (prune running elsewhere).
                Err(Error::PointNotFound { .. }) => {}
                Err(e) if is_junk(&e) => junk.push(JunkPoint {
                    key,
                    reason: e.to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        points.sort_by(|a, b| {
            (&a.vm, a.created_unix_ms, &a.id).cmp(&(&b.vm, b.created_unix_ms, &b.id))
        });
        Ok(PointListing { points, junk })
    }

    /// Load one point's metadata.
    pub async fn load_point(&self, vm: &str, id: &str) -> Result<PointMeta> {
        validate_name("VM", vm)?;
        validate_name("point", id)?;
        let key = point_key(vm, id);
        let raw = match self
            .get_object(MAGIC_POINT, &key, Self::MAX_POINT_BYTES)
            .await
        {
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
        if !(crate::point::POINT_FORMAT_PLAIN..=crate::point::POINT_FORMAT_VERSION)
            .contains(&meta.format_version)
        {
            return Err(Error::UnsupportedFormat {
                location: key,
                found: format!("point version {}", meta.format_version),
                supported: crate::point::POINT_FORMAT_VERSION,
            });
        }
        meta.check(&key)?;
        Ok(meta)
    }

    /// Newest valid point of a VM, if any (junk is skipped, as by [`Self::list_points`]).
    pub async fn latest_point(&self, vm: &str) -> Result<Option<PointMeta>> {
        Ok(self.list_points(Some(vm)).await?.pop())
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
