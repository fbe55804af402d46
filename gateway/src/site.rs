//! Where this gateway's replica store is: `<data-dir>/replica-store.toml` (written by
//! `standby store init`), or the embedded default, a local store in `<data-dir>/store`; and
//! the verification both the CLI and the gateway's `store-verify` job run (the point to check
//! resolved first, so a bad point is refused before any work starts).

use std::path::{Path, PathBuf};

use replica_store::{Store, StoreKey, StoreLocation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File name of the location file.
pub const LOCATION_FILE: &str = "replica-store.toml";

#[derive(Debug, Error)]
pub enum SiteError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid store location: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] replica_store::Error),
}

/// Contents of the location file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocationFile {
    pub location: StoreLocation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// The store location of a data directory.
pub fn load_location(data_dir: &Path) -> Result<LocationFile, SiteError> {
    let p = data_dir.join(LOCATION_FILE);
    match std::fs::read_to_string(&p) {
        Ok(text) => toml::from_str(&text).map_err(|e| SiteError::Parse {
            path: p.clone(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LocationFile {
            location: StoreLocation::Local {
                path: data_dir.join("store"),
            },
            key_file: None,
        }),
        Err(source) => Err(SiteError::Read { path: p, source }),
    }
}

/// Opens the data directory's store (with its key, when it has one).
pub async fn open_store(data_dir: &Path) -> Result<Store, SiteError> {
    let loc = load_location(data_dir)?;
    let key = match &loc.key_file {
        Some(k) => Some(StoreKey::load(k)?),
        None => None,
    };
    Ok(loc.location.open(key.as_ref()).await?)
}

/// Verifies one point (`VM/ID`, `ID` or `VM/latest`) or, without one, the whole store,
/// counting into `progress`: what the offline `standby store verify` runs (the gateway's
/// verification job runs [`verify_target`] and [`verify_with`] itself, to refuse a bad point
/// before it starts a job).
pub async fn verify_store(
    data_dir: &Path,
    point: Option<&str>,
    progress: &replica_store::VerifyProgress,
) -> Result<replica_store::VerifyReport, SiteError> {
    let store = open_store(data_dir).await?;
    let target = verify_target(&store, point).await?;
    verify_with(&store, target.as_ref(), progress).await
}

/// The point a verification checks (`VM/ID`, `ID` or `VM/latest`); none: the whole store.
pub async fn verify_target(
    store: &Store,
    point: Option<&str>,
) -> Result<Option<replica_store::PointMeta>, SiteError> {
    Ok(match point {
        Some(p) => Some(store.find_point(p).await?),
        None => None,
    })
}

/// Verifies `point`, or the whole store, counting into `progress`.
pub async fn verify_with(
    store: &Store,
    point: Option<&replica_store::PointMeta>,
    progress: &replica_store::VerifyProgress,
) -> Result<replica_store::VerifyReport, SiteError> {
    Ok(match point {
        Some(p) => store.verify_point_with(p, progress).await?,
        None => store.verify_all_with(progress).await?,
    })
}
