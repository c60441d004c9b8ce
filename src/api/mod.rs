//! The HTTP interface (SPEC §4): the collector (`POST /v1/clicks`), queries over committed
//! state, admin jobs, `/metrics`, `/healthz` and the dashboard.
//!
//! ```text
//!  POST /v1/clicks ───────────▶ ingest: body limits, decompression, validation ─▶ dyn Collector
//!  GET /v1/ads/…, /v1/totals ─▶ query: parameters, windows ─────────────────────▶ dyn Results
//!  POST /v1/admin/{job} ──────▶ admin: bearer token, NDJSON progress ───────────▶ dyn Jobs
//!  /healthz /metrics / /openapi.json /v1/filters ─▶ ops
//! ```
//!
//! The deployment behind the three traits is chosen by `serve`: the embedded pipeline implements
//! all of them, Kafka the collector and PostgreSQL the results. This module names no adapter.
//!
//! Handlers validate every parameter themselves so that each 4xx names it: errors are
//! [`ApiError`] values rendered as `{"error": "…"}`. Queries read committed transactions and the
//! in-memory popular index; they never wait on ingestion, and nothing a query holds makes the
//! aggregator wait.
//!
//! Every request's cost is bounded by its size: an ingest body is read chunk by chunk against
//! `max_body_bytes` (after decompression) and against `max_inflight_bytes` across all requests
//! (503 past it); its answer lists at most [`MAX_REJECTED_LISTED`] rejected lines plus totals;
//! an ad's series reads only the days in which the ad has counts.

mod admin;
mod ingest;
mod ops;
mod params;
mod query;

pub use ingest::MAX_REJECTED_LISTED;

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::future::BoxFuture;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::engine::{PartitionId, Slot, Watermark};
use crate::event::{format_rfc3339, EventTime, Minute};
use crate::filter::{FilterConfig, Filters};
use crate::log::LogError;
use crate::rank::Ranked;
use crate::recalc::{Job, JobError, JobResult, Progress};
use crate::store::StoreError;
use crate::telemetry::IngestCounters;

/// Where accepted clicks go: the embedded log, or Kafka.
pub trait Collector: Send + Sync + 'static {
    /// Partitions clicks are routed to (by `ad_id`).
    fn partitions(&self) -> u32;
    /// Why new clicks are refused now (too much waits for aggregation), if they are.
    fn overloaded(&self) -> Option<String> {
        None
    }
    /// Resolves once every record is durable: the log fsynced, or every broker acknowledged.
    fn append(
        &self,
        parts: Vec<(PartitionId, Vec<Vec<u8>>)>,
    ) -> BoxFuture<'_, Result<(), IngestError>>;
}

/// What queries read: committed results with the watermark of the same read, so that `final`
/// never claims more than the counts show. Methods block; handlers call them off the runtime.
pub trait Results: Send + Sync + 'static {
    /// Per-minute counts of one ad over `[from, to)`, minutes with clicks only.
    fn series(
        &self,
        ad: &str,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), ReadError>;
    /// The `n` ads with the most clicks over `[from, to)`.
    fn popular(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
        n: usize,
    ) -> Result<(Vec<Ranked>, Watermark), ReadError>;
    /// Clicks per minute summed over every ad, minutes with clicks only.
    fn totals(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), ReadError>;
    fn health(&self) -> Health;
    /// Copies state into the metrics recorder, just before a render of `/metrics`.
    fn export_metrics(&self) {}
}

/// Recalculation and reconciliation on a running server (embedded only).
pub trait Jobs: Send + Sync + 'static {
    /// Whether a job runs now (one at a time).
    fn busy(&self) -> bool;
    /// Runs `job` over `[from, to)` once everything durable is aggregated and archived.
    fn run(
        &self,
        job: Job,
        from: Minute,
        to: Minute,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<JobResult, JobError>;
    /// The audit of one stored count (`adclick explain`), once everything durable is
    /// aggregated and archived.
    fn explain(&self, q: &crate::recalc::Question) -> Result<crate::recalc::Explained, JobError>;
}

/// Why clicks could not be made durable; nothing of the request was acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The click log failed (shared: one failed group commit answers every waiting request).
    #[error("the click log failed: {0}")]
    Log(Arc<LogError>),
    /// The broker did not take or acknowledge every record.
    #[error("{0}")]
    Broker(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the service is shutting down")]
    Closed,
}

/// Why committed results could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The results database cannot be reached or timed out: retry later.
    #[error("{0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What `/healthz` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    pub status: HealthStatus,
    /// The committed watermark (`null` for none yet); absent when this process has no results.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "rfc3339")]
    pub watermark: Option<Watermark>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_records: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_lag_records: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
    Starting,
    Unavailable,
}

impl Health {
    pub fn new(status: HealthStatus) -> Health {
        Health {
            status,
            watermark: None,
            lag_records: None,
            archive_lag_records: None,
            error: None,
        }
    }
}

fn rfc3339<S: serde::Serializer>(w: &Option<Watermark>, s: S) -> Result<S::Ok, S::Error> {
    match w.and_then(|w| w.ms()) {
        Some(ms) => s.serialize_str(&format_rfc3339(EventTime(ms))),
        None => s.serialize_none(),
    }
}

/// Shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    /// `None` when this process does not run the collect role.
    pub collector: Option<Arc<dyn Collector>>,
    /// `None` when this process does not run the query role.
    pub results: Option<Arc<dyn Results>>,
    /// `None` but on an embedded server.
    pub jobs: Option<Arc<dyn Jobs>>,
    pub counters: Arc<IngestCounters>,
    pub filters: Arc<Filters>,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Arc<Vec<String>>,
    /// The filters as configured, for `GET /v1/filters`.
    pub filter_configs: Arc<Vec<FilterConfig>>,
    pub max_body_bytes: usize,
    pub max_skew_ms: i64,
    /// Permits are bytes of ingest bodies held in memory across all requests.
    pub inflight: Arc<Semaphore>,
    pub max_inflight_bytes: usize,
    /// Bodies decompressed or validated at once (one per core): more would only take CPU from
    /// the aggregator.
    pub validating: Arc<Semaphore>,
    /// Bearer token of the admin endpoints (recalc, reconcile), from `<data_dir>/server.json`.
    pub admin_token: Arc<String>,
}

impl AppState {
    /// A state with neither collector nor results, and the limits of `settings`.
    pub fn new(settings: &crate::config::Settings) -> AppState {
        AppState {
            collector: None,
            results: None,
            jobs: None,
            counters: Arc::default(),
            filters: Arc::new(settings.filters.clone()),
            filter_configs: Arc::new(settings.filter_configs.clone()),
            cors_origins: Arc::new(settings.cors_origins.clone()),
            max_body_bytes: settings.max_body_bytes,
            max_skew_ms: settings.engine.max_clock_skew_ms,
            inflight: Arc::new(Semaphore::new(settings.max_inflight_bytes)),
            max_inflight_bytes: settings.max_inflight_bytes,
            validating: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            admin_token: Default::default(),
        }
    }

    fn results(&self) -> Result<Arc<dyn Results>, ApiError> {
        self.results
            .clone()
            .ok_or_else(|| ApiError::NotFound("this process does not run the query role".into()))
    }
}

/// A failed request: a status and a message naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("body is larger than the limit of {0} bytes (max_body_bytes)")]
    TooLarge(usize),
    #[error("Content-Encoding: {0:?} is not supported (use gzip, zstd or none)")]
    UnsupportedEncoding(String),
    #[error("overloaded: {0}; retry later")]
    Overloaded(String),
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("admin endpoints need the bearer token of <data_dir>/server.json")]
    Unauthorized,
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Overloaded(_) => return retry_later(self.to_string()),
            ApiError::Ingest(IngestError::Log(e)) if e.is_disk_full() => {
                tracing::warn!("insufficient storage: {self}");
                let msg = format!("insufficient storage: {self}; nothing of this request was acknowledged, retry later");
                let body = Json(json!({ "error": msg }));
                return (StatusCode::INSUFFICIENT_STORAGE, [(header::RETRY_AFTER, "5")], body)
                    .into_response();
            }
            ApiError::Ingest(IngestError::Log(e))
                if !matches!(**e, LogError::Io { .. } | LogError::Poisoned) =>
            {
                return internal(&self)
            }
            // A log that cannot sync, a broker that does not acknowledge, a database that cannot
            // be reached, a server stopping: nothing is lost by trying again later.
            ApiError::Ingest(_) | ApiError::Read(ReadError::Unavailable(_)) => {
                tracing::warn!("unavailable: {self}");
                return retry_later(format!("unavailable: {self}; retry later"));
            }
            ApiError::Read(ReadError::Store(_)) | ApiError::Internal(_) => return internal(&self),
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// 503 with `Retry-After`.
fn retry_later(msg: String) -> Response {
    let body = Json(json!({ "error": msg }));
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response()
}

/// 500; the cause goes to the server log, not to the client.
fn internal(e: &ApiError) -> Response {
    tracing::error!("internal error: {e}");
    let body = Json(json!({ "error": "internal error; see the server log" }));
    (StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
}

pub fn router(state: AppState) -> Router {
    crate::telemetry::install();
    let cors = cors(&state.cors_origins);
    let router = Router::new()
        .route("/v1/clicks", post(ingest::clicks))
        .route("/v1/ads/popular_ads", get(query::popular_ads))
        .route("/v1/ads/{ad_id}/aggregated_count", get(query::aggregated_count))
        .route("/v1/ads/{ad_id}/timeseries", get(query::timeseries))
        .route("/v1/ads/{ad_id}/windows", get(query::windows))
        .route("/v1/admin/{job}", post(admin::admin_job))
        .route("/v1/filters", get(ops::filters))
        .route("/v1/totals", get(query::totals))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/healthz", get(ops::healthz))
        .route("/", get(ops::dashboard))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn(observe_request))
        .with_state(state);
    match cors {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// CORS for browsers on other origins (dashboards, notebooks): GET and POST with the headers
/// an ingest or a query sends. Origins are validated with the settings.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::CONTENT_TYPE, header::CONTENT_ENCODING]),
    )
}

/// Counts every answer by endpoint and code, and times queries (`GET /v1/…`) by endpoint.
async fn observe_request(
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let endpoint = matched.map_or("other".to_string(), |m| m.as_str().to_string());
    let query = req.method() == axum::http::Method::GET && endpoint.starts_with("/v1/");
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    if query {
        metrics::histogram!(crate::telemetry::QUERY, "endpoint" => endpoint.clone())
            .record(started.elapsed().as_secs_f64());
    }
    metrics::counter!(
        crate::telemetry::REQUESTS,
        "endpoint" => endpoint,
        "code" => response.status().as_str().to_string()
    )
    .increment(1);
    response
}

#[cfg(test)]
mod tests;
