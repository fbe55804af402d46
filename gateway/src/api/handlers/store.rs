//! `GET /api/v1/store`: where the replica store is, its settings and usage (chunk count and
//! bytes, objects by size, points per VM) — what `standby store info` shows.
//!
//! `POST /api/v1/store/verify`: re-read and re-hash a point's chunks or the whole store
//! (`standby store verify`) as a **job** of no VM (`store-verify`). Design and invariants:
//! - The request is checked before any job exists: a bad body is 400, a point that does not
//!   exist 404, a store that cannot be opened 503; only then is the job started and the answer
//!   is `202 Accepted` with its id.
//! - One verification at a time: the check for a running `store-verify` job and the insert of
//!   the new one are one database transaction; a second request gets 409 naming the running
//!   job.
//! - The job runs on a task of its own (`run`); the store's reads are async and its hashing
//!   runs on the blocking pool (replica-store), database writes go through
//!   [`ApiState::blocking`], so no runtime worker blocks. Every [`PROGRESS_EVERY`] the
//!   counters of [`replica_store::VerifyProgress`] become the job's percent, its detail line
//!   and its `counts` ([`VerifyCountsView`]); at the end the [`VerifyView`] is the job's
//!   `result`.
//! - A verification that finds missing or corrupt chunks or unreadable objects ends **failed**
//!   (with the report as its result and the problems in `error`): alerting on failed jobs
//!   (`standby_jobs_finished_total{state="failed"}`) catches a damaged store. A verification
//!   that cannot run to the end (the store stops answering) also fails, without a result.
//! - A gateway stopped mid-way leaves the job interrupted; nothing resumes it (ask again).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use replica_store::{PointMeta, Store, VerifyCounts, VerifyProgress};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::api::error::ApiError;
use crate::api::ApiState;
use crate::replication::db::{JobKind, JobState};
use crate::units::format_size;

/// How often a running verification writes its progress to the job.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Serialize)]
pub struct StoreInfo {
    /// The backend's description (local path, or S3 endpoint and bucket; never credentials).
    pub location: String,
    pub store_id: String,
    pub format_version: u32,
    pub chunk_size_bytes: u32,
    pub compression: String,
    pub encrypted: bool,
    /// `chunks` (one object per chunk) or `packs`.
    pub layout: replica_store::Layout,
    /// Bytes per pack object (0 for the `chunks` layout).
    pub pack_size_bytes: u32,
    /// Objects, chunk and pack counts, objects by size: what `standby store info` prints.
    pub usage: replica_store::Usage,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub points: u64,
    /// Points per VM.
    pub vms: BTreeMap<String, u64>,
}

pub async fn info(State(s): State<Arc<ApiState>>) -> Result<Json<StoreInfo>, ApiError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::unavailable(format!("the replica store cannot be read: {e}"))
    };
    let store = crate::site::open_store(s.dd.root())
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(Json(store_info(&store).await.map_err(|e| unavailable(&e))?))
}

/// The store's settings and usage: the body of `GET /api/v1/store` and of
/// `standby store info --json`. Lists the whole store (see [`replica_store::usage`]).
pub async fn store_info(store: &replica_store::Store) -> replica_store::Result<StoreInfo> {
    let usage = store.usage().await?;
    let points = store.list_points(None).await?;
    let mut vms = BTreeMap::new();
    for p in &points {
        *vms.entry(p.vm.clone()).or_insert(0) += 1;
    }
    let st = store.settings();
    Ok(StoreInfo {
        location: store.backend().describe(),
        store_id: st.store_id.clone(),
        format_version: st.format_version,
        chunk_size_bytes: st.chunk_size,
        compression: format!("{:?}", st.compression).to_lowercase(),
        encrypted: st.encryption.is_some(),
        layout: st.layout,
        pack_size_bytes: st.pack_size,
        chunks: usage.chunks,
        chunk_bytes: usage.chunk_bytes,
        usage,
        points: points.len() as u64,
        vms,
    })
}

/// Body of `POST /api/v1/store/verify` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// `VM/ID`, `ID` or `VM/latest`; none: the whole store.
    pub point: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ChunkProblemView {
    pub chunk: String,
    pub reason: String,
    pub points: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BadObject {
    pub key: String,
    pub reason: String,
}

/// The verification's outcome: the `result` of a finished `store-verify` job, and what
/// `standby store verify --json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct VerifyView {
    pub ok: bool,
    pub points_checked: usize,
    pub chunks_checked: usize,
    pub bytes_checked: u64,
    pub missing: Vec<ChunkProblemView>,
    pub corrupt: Vec<ChunkProblemView>,
    pub bad_objects: Vec<BadObject>,
    pub broken_points: Vec<String>,
}

impl From<replica_store::VerifyReport> for VerifyView {
    fn from(r: replica_store::VerifyReport) -> Self {
        VerifyView {
            ok: r.is_ok(),
            points_checked: r.points_checked,
            chunks_checked: r.chunks_checked,
            bytes_checked: r.bytes_checked,
            missing: problems(r.missing),
            corrupt: problems(r.corrupt),
            bad_objects: r
                .bad_objects
                .into_iter()
                .map(|(key, reason)| BadObject { key, reason })
                .collect(),
            broken_points: r.broken_points,
        }
    }
}

impl VerifyView {
    /// One line for the job's detail.
    pub fn summary(&self) -> String {
        format!(
            "checked {} points, {} chunks ({})",
            self.points_checked,
            self.chunks_checked,
            format_size(self.bytes_checked)
        )
    }

    /// What is wrong, for the job's error (empty when nothing is).
    pub fn problems(&self) -> String {
        if self.ok {
            return String::new();
        }
        let mut s = format!(
            "the store is damaged: {} missing, {} corrupt chunks, {} unreadable objects",
            self.missing.len(),
            self.corrupt.len(),
            self.bad_objects.len()
        );
        if !self.broken_points.is_empty() {
            s.push_str(&format!(
                "; points that cannot be fully restored: {}",
                self.broken_points.join(", ")
            ));
        }
        s
    }
}

fn problems(v: Vec<replica_store::verify::ChunkProblem>) -> Vec<ChunkProblemView> {
    v.into_iter()
        .map(|p| ChunkProblemView {
            chunk: p.id.to_string(),
            reason: p.reason,
            points: p.points,
        })
        .collect()
}

/// A running verification's figures: the `counts` of a `store-verify` job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerifyCountsView {
    pub points_total: u64,
    /// Points whose indexes were read.
    pub points_read: u64,
    /// Chunks to check (known once the indexes are read).
    pub chunks_total: u64,
    /// Chunks fetched so far (missing and corrupt ones included).
    pub chunks_checked: u64,
    /// Plaintext bytes expected (an unreferenced chunk counts as one chunk size).
    pub bytes_total: u64,
    pub bytes_checked: u64,
}

impl From<VerifyCounts> for VerifyCountsView {
    fn from(c: VerifyCounts) -> Self {
        VerifyCountsView {
            points_total: c.points_total,
            points_read: c.points_read,
            chunks_total: c.chunks_total,
            chunks_checked: c.chunks_done,
            bytes_total: c.bytes_total,
            bytes_checked: c.bytes_checked,
        }
    }
}

/// The job's detail line while it runs.
fn progress_line(c: &VerifyCounts) -> String {
    if c.points_total == 0 && c.chunks_total == 0 {
        "listing the store".to_string()
    } else if c.chunks_total == 0 {
        format!(
            "reading indexes: {} of {} points",
            c.points_read, c.points_total
        )
    } else {
        format!(
            "{} of {} chunks, {} of {}",
            c.chunks_done,
            c.chunks_total,
            format_size(c.bytes_checked),
            format_size(c.bytes_total)
        )
    }
}

/// Answer of `POST /api/v1/store/verify`.
#[derive(Debug, Serialize)]
pub struct VerifyStarted {
    /// The `store-verify` job (`GET /api/v1/jobs/{job}`).
    pub job: i64,
    /// The point verified (`VM/ID`); none: the whole store.
    pub point: Option<String>,
}

/// The request's errors, before any job exists.
fn verify_error(e: crate::site::SiteError) -> ApiError {
    use crate::site::SiteError::Store;
    use replica_store::Error as E;
    match &e {
        Store(E::PointNotFound { .. }) => ApiError::not_found(e.to_string()),
        Store(E::InvalidArgument(_)) => ApiError::bad_request(e.to_string()),
        _ => ApiError::unavailable(format!("cannot verify the store: {e}")),
    }
}

pub async fn verify(
    State(s): State<Arc<ApiState>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<VerifyStarted>), ApiError> {
    // The body is optional: none means the whole store.
    let req = if body.iter().all(u8::is_ascii_whitespace) {
        VerifyRequest::default()
    } else {
        serde_json::from_slice::<VerifyRequest>(&body)
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?
    };
    let store = crate::site::open_store(s.dd.root())
        .await
        .map_err(verify_error)?;
    let target = crate::site::verify_target(&store, req.point.as_deref())
        .await
        .map_err(verify_error)?;
    let point = target.as_ref().map(PointMeta::full_id);
    let step = match &point {
        Some(p) => format!("verify point {p}"),
        None => "verify the whole store".to_string(),
    };
    let job = s
        .blocking(
            move |_, db| match db.start_job_alone("", JobKind::StoreVerify)? {
                Ok(id) => {
                    db.step(id, &step, "")?;
                    Ok(id)
                }
                Err(running) => Err(ApiError::conflict(format!(
                    "a store verification is already running (job {running}): wait for it to end \
                 (`standby job show {running}`, GET /api/v1/jobs/{running}) and ask again"
                ))),
            },
        )
        .await?;
    info!(
        job,
        point = point.as_deref().unwrap_or("(all)"),
        "store verification started"
    );
    tokio::spawn(run(Arc::clone(&s), job, store, target));
    Ok((StatusCode::ACCEPTED, Json(VerifyStarted { job, point })))
}

/// Runs verification job `job` to its end (see the module documentation).
async fn run(s: Arc<ApiState>, job: i64, store: Store, target: Option<PointMeta>) {
    let progress = VerifyProgress::default();
    let work = crate::site::verify_with(&store, target.as_ref(), &progress);
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => {
                let c = progress.counts();
                let counts = json_of(&VerifyCountsView::from(c));
                let r = s.blocking(move |_, db| {
                    db.job_progress(job, c.percent(), &progress_line(&c))?;
                    db.set_job_data(job, Some(&counts), None)?;
                    Ok(())
                }).await;
                if let Err(e) = r {
                    warn!(job, "store verification: recording progress failed: {}", e.message);
                }
            }
        }
    };
    let counts = json_of(&VerifyCountsView::from(progress.counts()));
    let (state, detail, error, result) = match outcome {
        Ok(report) => {
            let v = VerifyView::from(report);
            let state = if v.ok {
                JobState::Succeeded
            } else {
                JobState::Failed
            };
            (state, v.summary(), v.problems(), Some(json_of(&v)))
        }
        Err(e) => (
            JobState::Failed,
            String::new(),
            format!(
                "the verification could not run to its end: {e} (ask again once the store answers)"
            ),
            None,
        ),
    };
    info!(job, %state, "store verification ended {error}");
    let r = s
        .blocking(move |_, db| {
            db.set_job_data(job, Some(&counts), result.as_deref())?;
            db.finish_job(job, state, &detail, &error)?;
            Ok(())
        })
        .await;
    if let Err(e) = r {
        warn!(
            job,
            "store verification: recording its end failed: {}", e.message
        );
    }
}

/// JSON of a view made of numbers, strings and lists (cannot fail; an empty object if it did).
fn json_of<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".to_string())
}
