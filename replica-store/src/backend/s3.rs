//! S3 backend on `aws-sdk-s3`: any S3-compatible store (AWS, Garage, MinIO, Ceph RGW).
//!
//! Credentials come from the standard AWS chain (`AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, config files, ...) unless static keys are given.
//! Request/response checksums are only computed when an operation requires them: several
//! S3-compatible servers reject the SDK's default aws-chunked trailing checksums.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{validate_key, Backend, ObjectMeta, RequestCounters, RequestCounts};
use crate::error::{Error, Result};

/// Objects larger than this are uploaded with multipart upload.
const MULTIPART_THRESHOLD: usize = 32 * 1024 * 1024;
/// Part size of multipart uploads.
const PART_SIZE: usize = 16 * 1024 * 1024;

/// Where and how to reach an S3 bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct S3Config {
    /// Endpoint URL (`http://127.0.0.1:3900`); `None` for AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region (`garage` for Garage, `us-east-1`, ...). Default `us-east-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (several stores can share a bucket).
    #[serde(default)]
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most self-hosted servers.
    #[serde(default)]
    pub path_style: bool,
    /// AWS profile name; `None` uses the default chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Static access key id (tests); normally left empty and taken from the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// Static secret key (tests); normally left empty and taken from the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<String>,
    /// Maximum requests in flight (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<usize>,
}

/// S3 backend.
#[derive(Debug, Clone)]
pub struct S3Backend {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    sem: Arc<Semaphore>,
    counters: Arc<RequestCounters>,
}

impl S3Backend {
    /// Build a client from `cfg`. Does not contact the server.
    pub async fn connect(cfg: &S3Config) -> Result<Self> {
        if cfg.bucket.is_empty() {
            return Err(Error::Config("S3 bucket name is empty".into()));
        }
        let region = cfg.region.clone().unwrap_or_else(|| "us-east-1".into());
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).region(Region::new(region));
        if let Some(p) = &cfg.profile {
            loader = loader.profile_name(p);
        }
        match (&cfg.access_key_id, &cfg.secret_access_key) {
            (Some(a), Some(s)) => {
                loader = loader.credentials_provider(Credentials::new(
                    a,
                    s,
                    None,
                    None,
                    "standby-config",
                ));
            }
            (None, None) => {}
            _ => {
                return Err(Error::Config(
                    "S3 access_key_id and secret_access_key must be given together".into(),
                ))
            }
        }
        let sdk = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard().with_max_attempts(5))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            );
        if let Some(ep) = &cfg.endpoint {
            b = b.endpoint_url(ep);
        }
        let client = Client::from_conf(b.build());
        let prefix = cfg.prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            validate_key(&prefix)?;
        }
        Ok(S3Backend {
            client,
            bucket: cfg.bucket.clone(),
            prefix,
            endpoint: cfg.endpoint.clone().unwrap_or_else(|| "AWS S3".into()),
            sem: Arc::new(Semaphore::new(cfg.max_concurrency.unwrap_or(32).max(1))),
            counters: Arc::default(),
        })
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.prefix, key)
        }
    }

    fn strip<'a>(&self, full: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(&self.prefix)
                .and_then(|s| s.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.sem
            .acquire()
            .await
            .map_err(|_| Error::Config("S3 backend closed".into()))
    }

    fn map_err<E>(
        &self,
        op: &str,
        key: &str,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let backend = self.describe();
        match &err {
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let code = se.err().code().unwrap_or("").to_string();
                let msg = se.err().message().unwrap_or("").to_string();
                let detail = format!("{code} {msg}").trim().to_string();
                classify(
                    backend,
                    &self.bucket,
                    &self.endpoint,
                    op,
                    key,
                    status,
                    &code,
                    detail,
                )
            }
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Error::Network {
                backend,
                op: op.into(),
                detail: DisplayErrorContext(&err).to_string(),
            },
            SdkError::DispatchFailure(df) => {
                let detail = DisplayErrorContext(&err).to_string();
                let lower = detail.to_ascii_lowercase();
                if !df.is_io()
                    && !df.is_timeout()
                    && (lower.contains("credential") || lower.contains("auth scheme"))
                {
                    Error::Auth {
                        backend,
                        op: op.into(),
                        detail,
                    }
                } else {
                    Error::Network {
                        backend,
                        op: op.into(),
                        detail,
                    }
                }
            }
            _ => {
                let detail = DisplayErrorContext(&err).to_string();
                if detail.to_ascii_lowercase().contains("credential") {
                    Error::Auth {
                        backend,
                        op: op.into(),
                        detail,
                    }
                } else {
                    Error::Config(format!("{op} {key}: {detail}"))
                }
            }
        }
    }

    async fn put_multipart(&self, full: &str, key: &str, data: Bytes) -> Result<()> {
        let up = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.map_err("create multipart upload", key, e))?;
        let upload_id = up
            .upload_id()
            .ok_or_else(|| Error::corrupt_object(key, "server returned no multipart upload id"))?
            .to_string();
        let res = async {
            let mut parts = Vec::new();
            for (i, off) in (0..data.len()).step_by(PART_SIZE).enumerate() {
                let end = (off + PART_SIZE).min(data.len());
                let n = (i + 1) as i32;
                self.counters.put((end - off) as u64);
                let r = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .body(ByteStream::from(data.slice(off..end)))
                    .send()
                    .await
                    .map_err(|e| self.map_err("upload part", key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .set_e_tag(r.e_tag().map(String::from))
                        .part_number(n)
                        .build(),
                );
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| self.map_err("complete multipart upload", key, e))?;
            Ok(())
        }
        .await;
        if res.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        res
    }

    async fn get_inner(&self, key: &str, range: Option<(u64, u64)>) -> Result<Bytes> {
        validate_key(key)?;
        let _p = self.permit().await?;
        let mut req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key));
        if let Some((off, len)) = range {
            if len == 0 {
                return Ok(Bytes::new());
            }
            req = req.range(format!("bytes={}-{}", off, off + len - 1));
        }
        let resp = match req.send().await {
            Ok(r) => r,
            // A range starting past the end of the object.
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 416 => {
                return Ok(Bytes::new())
            }
            Err(e) => return Err(self.map_err("get", key, e)),
        };
        let body = resp.body.collect().await.map_err(|e| Error::Network {
            backend: self.describe(),
            op: format!("reading body of {key}"),
            detail: e.to_string(),
        })?;
        let body = body.into_bytes();
        self.counters.get(body.len() as u64);
        Ok(body)
    }
}

#[allow(clippy::too_many_arguments)]
fn classify(
    backend: String,
    bucket: &str,
    endpoint: &str,
    op: &str,
    key: &str,
    status: u16,
    code: &str,
    detail: String,
) -> Error {
    match (status, code) {
        (_, "NoSuchBucket") => Error::BucketMissing {
            bucket: bucket.into(),
            endpoint: endpoint.into(),
        },
        (401 | 403, _) | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
            Error::Auth {
                backend,
                op: op.into(),
                detail,
            }
        }
        (_, "NoSuchKey" | "NotFound") | (404, _) => Error::NotFound {
            backend,
            key: key.into(),
        },
        (429 | 500..=599, _)
        | (_, "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable") => {
            Error::ServerBusy {
                backend,
                op: op.into(),
                status,
                detail,
            }
        }
        _ => Error::Rejected {
            backend,
            op: op.into(),
            key: key.into(),
            status,
            detail,
        },
    }
}

#[async_trait]
impl Backend for S3Backend {
    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3 {} bucket {}", self.endpoint, self.bucket)
        } else {
            format!(
                "s3 {} bucket {} prefix {}",
                self.endpoint, self.bucket, self.prefix
            )
        }
    }

    fn prefers_packs(&self) -> bool {
        true
    }

    fn requests(&self) -> Option<RequestCounts> {
        Some(self.counters.snapshot())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        validate_key(key)?;
        let full = self.full_key(key);
        let _p = self.permit().await?;
        if data.len() > MULTIPART_THRESHOLD {
            return self.put_multipart(&full, key, data).await;
        }
        self.counters.put(data.len() as u64);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.map_err("put", key, e))?;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        // A conditional put (If-None-Match: *). Servers that ignore it (Garage) overwrite,
        // which is harmless: callers only use this for content-addressed keys, and they HEAD
        // first when they want to avoid the upload.
        validate_key(key)?;
        let full = self.full_key(key);
        let _p = self.permit().await?;
        if data.len() > MULTIPART_THRESHOLD {
            self.put_multipart(&full, key, data).await?;
            return Ok(true);
        }
        self.counters.put(data.len() as u64);
        match self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .if_none_match("*")
            .body(ByteStream::from(data))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 412 => Ok(false),
            Err(e) => Err(self.map_err("put", key, e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.get_inner(key, None).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        self.get_inner(key, Some((offset, len))).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        validate_key(key)?;
        let _p = self.permit().await?;
        self.counters.head();
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(r) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: r.content_length().unwrap_or(0).max(0) as u64,
                modified: r
                    .last_modified()
                    .and_then(|d| SystemTime::try_from(*d).ok())
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            })),
            Err(SdkError::ServiceError(se)) if se.err().is_not_found() => Ok(None),
            Err(e) => Err(self.map_err("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let full_prefix = self.full_key(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let _p = self.permit().await?;
            self.counters.list();
            let resp = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.map_err("list", prefix, e))?;
            for o in resp.contents() {
                let Some(k) = o.key() else { continue };
                out.push(ObjectMeta {
                    key: self.strip(k).to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified: o
                        .last_modified()
                        .and_then(|d| SystemTime::try_from(*d).ok())
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
            match resp.next_continuation_token() {
                Some(t) if resp.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        let _p = self.permit().await?;
        self.counters.delete();
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.map_err("delete", key, e) {
                Error::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}
