//! The HTTP interface (SPEC §4): the collector (`POST /v1/clicks`), queries over committed
//! state, `/metrics`, `/healthz` and the dashboard.
//!
//! Handlers validate every parameter themselves so that each 4xx names it: errors are
//! [`ApiError`] values rendered as `{"error": "…"}`. Queries read the store's committed
//! transactions and the in-memory popular index; they never wait on ingestion, and nothing a
//! query holds makes the aggregator wait.
//!
//! Every request's cost is bounded by its size: an ingest body is read chunk by chunk against
//! `max_body_bytes` (after decompression) and against `max_inflight_bytes` across all requests
//! (503 past it); its answer lists at most [`MAX_REJECTED_LISTED`] rejected lines plus totals;
//! an ad's series reads only the days in which the ad has counts.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::engine::{PartitionId, Slot, Watermark};
use crate::event::{
    format_rfc3339, parse_line, parse_rfc3339, partition_of, route_hash, wire, EventTime,
    InvalidKind, Minute, Validation, MAX_AD_ID_BYTES, MINUTE_MS,
};
use crate::filter::Filters;
use crate::pipeline::{now_ms, Ingest, Metrics, QueryState};

/// Shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    pub collector: Collector,
    pub results: Results,
    pub metrics: Arc<Metrics>,
    pub filters: Arc<Filters>,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Arc<Vec<String>>,
    /// The filters as configured, for `GET /v1/filters`.
    pub filter_configs: Arc<Vec<crate::filter::FilterConfig>>,
    pub max_body_bytes: usize,
    pub max_skew_ms: i64,
    pub max_lag_records: u64,
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
            collector: Collector::Off,
            results: Results::Off,
            metrics: Arc::default(),
            filters: Arc::new(settings.filters.clone()),
            filter_configs: Arc::new(settings.filter_configs.clone()),
            cors_origins: Arc::new(settings.cors_origins.clone()),
            max_body_bytes: settings.max_body_bytes,
            max_skew_ms: settings.engine.max_clock_skew_ms,
            max_lag_records: settings.max_lag_records,
            inflight: Arc::new(Semaphore::new(settings.max_inflight_bytes)),
            max_inflight_bytes: settings.max_inflight_bytes,
            validating: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            admin_token: Default::default(),
        }
    }
}

fn no_query_role() -> ApiError {
    ApiError::NotFound("this process does not run the query role".into())
}

/// Where accepted clicks go: the embedded log, or Kafka (scale-out); `Off` when this process
/// does not run the collect role.
#[derive(Clone)]
pub enum Collector {
    Log(Ingest),
    Kafka(Arc<crate::scaleout::kafka::Sink>),
    Off,
}

impl Collector {
    fn partitions(&self) -> u32 {
        match self {
            Collector::Log(i) => i.partitions(),
            Collector::Kafka(k) => k.partitions(),
            Collector::Off => 1,
        }
    }

    /// Returns once every record is durable (the log fsynced, or every broker acknowledged).
    async fn append(&self, parts: Vec<(PartitionId, Vec<Vec<u8>>)>) -> Result<(), ApiError> {
        match self {
            Collector::Log(i) => {
                i.append(parts).await.map_err(|e| ApiError::Internal(e.to_string()))
            }
            Collector::Kafka(k) => k.append(parts).await.map_err(ApiError::Unavailable),
            Collector::Off => {
                Err(ApiError::NotFound("this process does not run the collect role".into()))
            }
        }
    }
}

/// What queries read: the embedded store and its in-memory index, or PostgreSQL (scale-out);
/// `Off` when this process does not run the query role.
#[derive(Clone)]
pub enum Results {
    Embedded(Arc<QueryState>),
    Postgres(Arc<crate::scaleout::PgResults>),
    Off,
}

impl Results {
    fn embedded(&self) -> Option<&Arc<QueryState>> {
        match self {
            Results::Embedded(q) => Some(q),
            _ => None,
        }
    }
}

/// Most rejected lines an ingest answer lists one by one; the rest are in its totals.
pub const MAX_REJECTED_LISTED: usize = 1000;

/// A failed request: a status and a message naming what is wrong.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound(String),
    TooLarge(usize),
    UnsupportedEncoding(String),
    Overloaded(String),
    MethodNotAllowed,
    Unauthorized,
    Conflict(String),
    /// A service this one depends on failed (Kafka, PostgreSQL): 503, retry later.
    Unavailable(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body is larger than the limit of {limit} bytes (max_body_bytes)"),
            ),
            ApiError::UnsupportedEncoding(enc) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Encoding: {enc:?} is not supported (use gzip, zstd or none)"),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "admin endpoints need the bearer token of <data_dir>/server.json".into(),
            ),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Unavailable(m) => {
                tracing::warn!("unavailable: {m}");
                let body = json!({"error": format!("unavailable: {m}; retry later")});
                return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body))
                    .into_response();
            }
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint".into())
            }
            ApiError::Overloaded(why) => {
                let body = json!({"error": format!("overloaded: {why}; retry later")});
                return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body))
                    .into_response();
            }
            ApiError::Internal(m) => {
                tracing::error!("internal error: {m}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the server log".to_string(),
                )
            }
        };
        (status, Json(json!({ "error": msg }))).into_response()
    }
}

pub fn router(state: AppState) -> Router {
    crate::telemetry::install();
    let cors = cors(&state.cors_origins);
    let router = Router::new()
        .route("/v1/clicks", post(clicks))
        .route("/v1/ads/popular_ads", get(popular_ads))
        .route("/v1/ads/{ad_id}/aggregated_count", get(aggregated_count))
        .route("/v1/ads/{ad_id}/timeseries", get(timeseries))
        .route("/v1/admin/{job}", post(admin_job))
        .route("/v1/filters", get(filters))
        .route("/v1/totals", get(totals))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/", get(dashboard))
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
    use axum::http::{header, HeaderValue, Method};
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

/// How an ingest body is encoded (`Content-Encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

impl Encoding {
    fn of(headers: &HeaderMap) -> Result<Encoding, ApiError> {
        let Some(v) = headers.get(header::CONTENT_ENCODING) else { return Ok(Encoding::Identity) };
        let text = String::from_utf8_lossy(v.as_bytes()).trim().to_ascii_lowercase();
        match text.as_str() {
            "" | "identity" => Ok(Encoding::Identity),
            "gzip" | "x-gzip" => Ok(Encoding::Gzip),
            "zstd" => Ok(Encoding::Zstd),
            _ => Err(ApiError::UnsupportedEncoding(text.chars().take(64).collect())),
        }
    }
}

/// Decompresses at most `max` bytes; more is a 413 (a zip bomb stops at the limit).
fn decompress(encoding: Encoding, raw: &[u8], max: usize) -> Result<Vec<u8>, ApiError> {
    use std::io::Read;
    let mut out = Vec::new();
    let (name, read) = match encoding {
        Encoding::Identity => return Ok(raw.to_vec()),
        Encoding::Gzip => (
            "gzip",
            flate2::read::MultiGzDecoder::new(raw).take(max as u64 + 1).read_to_end(&mut out),
        ),
        Encoding::Zstd => (
            "zstd",
            zstd::stream::read::Decoder::new(raw)
                .and_then(|d| d.take(max as u64 + 1).read_to_end(&mut out)),
        ),
    };
    if let Err(e) = read {
        return Err(ApiError::BadRequest(format!(
            "body is not valid {name} (Content-Encoding: {name}): {e}"
        )));
    }
    if out.len() > max {
        return Err(ApiError::TooLarge(max));
    }
    Ok(out)
}

/// Holds `n` more bytes of the in-flight budget, or answers 503.
fn reserve(
    s: &AppState,
    held: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    n: usize,
) -> Result<(), ApiError> {
    if n == 0 {
        return Ok(());
    }
    let permit = u32::try_from(n)
        .ok()
        .and_then(|n| s.inflight.clone().try_acquire_many_owned(n).ok())
        .ok_or_else(|| {
            ApiError::Overloaded("too many ingest bytes in flight (max_inflight_bytes)".into())
        })?;
    match held {
        Some(h) => h.merge(permit),
        None => *held = Some(permit),
    }
    Ok(())
}

async fn clicks(
    State(s): State<AppState>,
    headers: HeaderMap,
    mut body: Body,
) -> Result<Json<Value>, ApiError> {
    let started = std::time::Instant::now();
    let encoding = Encoding::of(&headers)?;
    let lag = s.results.embedded().map_or(0, |q| q.lag());
    if lag > s.max_lag_records {
        return Err(ApiError::Overloaded(format!("{lag} records wait for aggregation")));
    }
    // Read chunk by chunk, within the body limit and the in-flight budget.
    let mut held = None;
    let mut raw = Vec::new();
    let mut refused = None;
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            read += data.len();
            if read > s.max_body_bytes {
                return Err(ApiError::TooLarge(s.max_body_bytes));
            }
            if refused.is_some() {
                continue; // Read on without keeping it, so the client gets its answer.
            }
            match reserve(&s, &mut held, data.len()) {
                Ok(()) => raw.extend_from_slice(&data),
                Err(e) => {
                    refused = Some(e);
                    raw = Vec::new();
                    held = None;
                }
            }
        }
    }
    if let Some(e) = refused {
        return Err(e);
    }
    let bytes = if encoding == Encoding::Identity {
        raw
    } else {
        let out = cpu_bound(&s, || decompress(encoding, &raw, s.max_body_bytes)).await??;
        reserve(&s, &mut held, out.len())?;
        out
    };
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(ApiError::BadRequest(format!(
            "body is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )));
    }
    let v = Validation { now: EventTime(now_ms()), max_skew_ms: s.max_skew_ms };
    if matches!(s.collector, Collector::Off) {
        return Err(ApiError::NotFound("this process does not run the collect role".into()));
    }
    let partitions = s.collector.partitions();
    let Checked { parts, rejected, by_reason, accepted } =
        cpu_bound(&s, || check_body(&bytes, v, partitions)).await?;
    let parts: Vec<_> = parts
        .into_iter()
        .enumerate()
        .filter(|(_, r)| !r.is_empty())
        .map(|(p, r)| (PartitionId(p as u32), r))
        .collect();
    if !parts.is_empty() {
        s.collector.append(parts).await?;
    }
    drop(held);
    s.metrics.accepted.fetch_add(accepted, Ordering::Relaxed);
    let mut totals = serde_json::Map::new();
    for kind in InvalidKind::ALL {
        let n = by_reason[kind.index()];
        s.metrics.rejected[kind.index()].fetch_add(n, Ordering::Relaxed);
        if n > 0 {
            totals.insert(kind.label().to_string(), json!(n));
        }
    }
    crate::telemetry::observe(crate::telemetry::INGEST_ACK, started.elapsed());
    Ok(Json(json!({
        "accepted": accepted,
        "rejected": rejected,
        "rejected_total": by_reason.iter().sum::<u64>(),
        "rejected_by_reason": totals,
    })))
}

/// Runs CPU work of an ingest body (about a second for 16 MiB of lines): one body per core at a
/// time, and the worker hands its other tasks to another thread meanwhile, so health checks and
/// queries are not held up behind it.
async fn cpu_bound<T>(s: &AppState, f: impl FnOnce() -> T) -> Result<T, ApiError> {
    let _slot = s.validating.acquire().await.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(tokio::task::block_in_place(f))
}

/// A body's lines, validated: encoded clicks per partition, the first rejected lines, totals.
struct Checked {
    parts: Vec<Vec<Vec<u8>>>,
    rejected: Vec<Value>,
    by_reason: [u64; InvalidKind::ALL.len()],
    accepted: u64,
}

fn check_body(bytes: &[u8], v: Validation, partitions: u32) -> Checked {
    let mut c = Checked {
        parts: vec![Vec::new(); partitions as usize],
        rejected: Vec::new(),
        by_reason: [0; InvalidKind::ALL.len()],
        accepted: 0,
    };
    let lateness = metrics::histogram!(crate::telemetry::LATENESS);
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        match parse_line(line, v) {
            Ok(None) => {}
            Ok(Some(click)) => {
                lateness.record(v.now.0.saturating_sub(click.time.0).max(0) as f64 / 1000.0);
                let mut rec = Vec::with_capacity(64);
                wire::encode(&click, &mut rec);
                c.parts[partition_of(route_hash(&click.ad_id), partitions) as usize].push(rec);
                c.accepted += 1;
            }
            Err(e) => {
                c.by_reason[e.kind().index()] += 1;
                if c.rejected.len() < MAX_REJECTED_LISTED {
                    c.rejected.push(json!({"line": i + 1, "error": e.to_string()}));
                }
            }
        }
    }
    c
}

/// The query string as a map; a malformed one is a 400 in the usual shape.
fn query_map(
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::BadRequest(format!("query string: {}", e.body_text())))
}

/// Parses a minute-aligned time (RFC 3339 or epoch milliseconds); errors name `name`.
pub fn parse_minute(name: &str, raw: &str) -> Result<Minute, String> {
    let t = match raw.parse::<i64>() {
        Ok(ms) => EventTime(ms),
        Err(_) => parse_rfc3339(raw).map_err(|e| {
            format!("{name}: {raw:?} is not an RFC 3339 time or epoch milliseconds ({e})")
        })?,
    };
    if !(EventTime::MIN.0..=EventTime::MAX.0 - MINUTE_MS).contains(&t.0) {
        return Err(format!("{name}: {raw:?} is outside years 0000-9999"));
    }
    if t.0.rem_euclid(MINUTE_MS) != 0 {
        return Err(format!("{name}: {raw:?} is not aligned to a minute"));
    }
    Ok(t.minute())
}

/// A minute-aligned time parameter of the query string.
fn minute_param(q: &HashMap<String, String>, name: &str) -> Result<Option<Minute>, ApiError> {
    q.get(name).map(|raw| parse_minute(name, raw).map_err(ApiError::BadRequest)).transpose()
}

fn current_minute() -> Minute {
    EventTime(now_ms()).minute()
}

/// `from`/`to` with SPEC defaults: `to` = the current minute's start, `from` = `to` − 1 min.
fn range(q: &HashMap<String, String>) -> Result<(Minute, Minute), ApiError> {
    let to = minute_param(q, "to")?.unwrap_or_else(current_minute);
    let from = minute_param(q, "from")?.unwrap_or(Minute(to.0 - 1));
    if from >= to {
        return Err(ApiError::BadRequest(format!(
            "from: {} must be before to ({})",
            format_rfc3339(from.start()),
            format_rfc3339(to.start())
        )));
    }
    Ok((from, to))
}

fn slot(s: &AppState, q: &HashMap<String, String>) -> Result<(Slot, Value), ApiError> {
    match q.get("filter") {
        None => Ok((Slot::Total, Value::Null)),
        Some(id) => match s.filters.index_of(id) {
            Some(i) => Ok((Slot::Filter(i), Value::String(id.clone()))),
            None => Err(ApiError::NotFound(format!(
                "filter: unknown filter {id:?} (configured: {:?})",
                s.filters.ids()
            ))),
        },
    }
}

fn ad_param(ad: &str) -> Result<(), ApiError> {
    if ad.is_empty() || ad.len() > MAX_AD_ID_BYTES {
        return Err(ApiError::BadRequest(format!("ad_id: must be 1 to {MAX_AD_ID_BYTES} bytes")));
    }
    Ok(())
}

fn unknown_params(q: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::BadRequest(format!(
            "{k}: unknown parameter (known: {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Validates an ad query's parameters and reads its per-minute counts from the store.
async fn ad_series(
    s: &AppState,
    ad: &str,
    q: &HashMap<String, String>,
    max_minutes: Option<i64>,
) -> Result<(Minute, Minute, Value, Vec<(Minute, u64)>, Watermark), ApiError> {
    unknown_params(q, &["from", "to", "filter"])?;
    ad_param(ad)?;
    let (from, to) = range(q)?;
    if let Some(max) = max_minutes.filter(|&max| to.0 - from.0 > max) {
        return Err(ApiError::BadRequest(format!(
            "from: the range may span at most {max} minutes"
        )));
    }
    let (slot, filter) = slot(s, q)?;
    let (results, ad) = (s.results.clone(), ad.to_owned());
    let (series, watermark) = tokio::task::spawn_blocking(move || match results {
        Results::Embedded(q) => {
            q.store.series(&ad, slot, from, to).map_err(|e| ApiError::Internal(e.to_string()))
        }
        Results::Postgres(pg) => {
            pg.series(&ad, slot, from, to).map_err(|e| ApiError::Unavailable(e.to_string()))
        }
        Results::Off => Err(no_query_role()),
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((from, to, filter, series, watermark))
}

async fn aggregated_count(
    State(s): State<AppState>,
    Path(ad): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query_map(q)?;
    let (from, to, filter, series, watermark) = ad_series(&s, &ad, &q, None).await?;
    let count: u64 = series.iter().map(|(_, c)| c).sum();
    Ok(Json(json!({
        "ad_id": ad,
        "from": format_rfc3339(from.start()),
        "to": format_rfc3339(to.start()),
        "from_ms": from.start().0,
        "to_ms": to.start().0,
        "filter": filter,
        "count": count,
        "final": watermark.all_final_before(to),
    })))
}

async fn timeseries(
    State(s): State<AppState>,
    Path(ad): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query_map(q)?;
    let (from, to, filter, series, w) = ad_series(&s, &ad, &q, Some(1440)).await?;
    let counts: HashMap<i64, u64> = series.into_iter().map(|(m, c)| (m.0, c)).collect();
    let points: Vec<Value> = (from.0..to.0)
        .map(|m| {
            let minute = Minute(m);
            json!({
                "minute": format_rfc3339(minute.start()),
                "minute_ms": minute.start().0,
                "count": counts.get(&m).copied().unwrap_or(0),
                "final": w.is_final(minute),
            })
        })
        .collect();
    Ok(Json(json!({
        "ad_id": ad,
        "from": format_rfc3339(from.start()),
        "to": format_rfc3339(to.start()),
        "from_ms": from.start().0,
        "to_ms": to.start().0,
        "filter": filter,
        "final": w.all_final_before(to),
        "points": points,
    })))
}

fn int_param(
    q: &HashMap<String, String>,
    name: &str,
    default: u32,
    max: u32,
) -> Result<u32, ApiError> {
    match q.get(name) {
        None => Ok(default),
        Some(raw) => match raw.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "{name}: {raw:?} must be a whole number from 1 to {max}"
            ))),
        },
    }
}

async fn popular_ads(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query_map(q)?;
    unknown_params(&q, &["count", "window", "filter", "to"])?;
    let count = int_param(&q, "count", 10, 1000)?;
    let window = int_param(&q, "window", 1, crate::popular::MAX_WINDOW_MINUTES)?;
    let to = minute_param(&q, "to")?.unwrap_or_else(current_minute);
    let (slot, filter) = slot(&s, &q)?;
    let results = s.results.clone();
    // Recent windows from the in-memory index, older ones from the store; each answer's counts
    // and watermark come from one consistent read.
    let (ads, watermark) = tokio::task::spawn_blocking(move || {
        let from = Minute(to.0 - i64::from(window));
        let query = match results {
            Results::Embedded(q) => q,
            Results::Postgres(pg) => {
                return pg
                    .popular(slot, from, to, count as usize)
                    .map_err(|e| ApiError::Unavailable(e.to_string()))
            }
            Results::Off => return Err(no_query_role()),
        };
        let mut live = query.live.read();
        if from >= live.keep_from {
            let ads = live.slots[slot.index()].top(to, window, count as usize);
            return Ok((ads, live.watermark));
        }
        drop(live);
        query
            .store
            .popular(slot, from, to, count as usize)
            .map_err(|e| ApiError::Internal(e.to_string()))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let ads: Vec<Value> =
        ads.into_iter().map(|(ad, c)| json!({"ad_id": ad.as_str(), "count": c})).collect();
    Ok(window_answer(window, to, filter, watermark, "ads", ads))
}

/// The answer over the `window` minutes before `to`: the window, `to` (both forms), the filter,
/// whether every minute is final, and the items under `key`.
fn window_answer(
    window: u32,
    to: Minute,
    filter: Value,
    watermark: Watermark,
    key: &str,
    items: Vec<Value>,
) -> Json<Value> {
    let mut v = json!({
        "window": window,
        "to": format_rfc3339(to.start()),
        "to_ms": to.start().0,
        "filter": filter,
        "final": watermark.all_final_before(to),
    });
    v[key] = Value::Array(items);
    Json(v)
}

/// `GET /v1/totals?window=&to=&filter=`: clicks per minute summed over every ad, for charts:
/// every minute of `[to − window, to)` listed, zeros included. From the in-memory index for the
/// last day (a step per minute); older windows are one pass over the stored rows of their minutes,
/// in memory that follows the minutes.
async fn totals(
    State(s): State<AppState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query_map(q)?;
    unknown_params(&q, &["window", "filter", "to"])?;
    let window = int_param(&q, "window", 60, crate::popular::MAX_WINDOW_MINUTES)?;
    let to = minute_param(&q, "to")?.unwrap_or_else(current_minute);
    let (slot, filter) = slot(&s, &q)?;
    let from = Minute(to.0 - i64::from(window));
    let results = s.results.clone();
    let (rows, watermark) = tokio::task::spawn_blocking(move || match results {
        Results::Postgres(pg) => {
            pg.totals(slot, from, to).map_err(|e| ApiError::Unavailable(e.to_string()))
        }
        Results::Off => Err(no_query_role()),
        Results::Embedded(query) => {
            let live = query.live.read();
            if from >= live.keep_from {
                return Ok((live.slots[slot.index()].totals(from, to), live.watermark));
            }
            drop(live);
            query.store.minute_totals(slot, from, to).map_err(|e| ApiError::Internal(e.to_string()))
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let mut counts = rows.into_iter().peekable();
    let minutes: Vec<Value> = (from.0..to.0)
        .map(|m| {
            let n = counts.next_if(|(r, _)| r.0 == m).map_or(0, |(_, n)| n);
            let minute = Minute(m);
            json!({
                "minute": format_rfc3339(minute.start()),
                "minute_ms": minute.start().0,
                "count": n,
                "final": watermark.is_final(minute),
            })
        })
        .collect();
    Ok(window_answer(window, to, filter, watermark, "minutes", minutes))
}

/// `POST /v1/admin/{recalc|reconcile}?from=&to=[&dry_run=true]`: runs the job on this server's
/// store and archive (after archiving everything durable), answering NDJSON as it goes:
/// `{"progress":…}` lines, then `{"result":…}` or `{"error":…}`.
async fn admin_job(
    State(s): State<AppState>,
    Path(job): Path<String>,
    headers: HeaderMap,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let expected = format!("Bearer {}", s.admin_token);
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if given.map(str::as_bytes) != Some(expected.as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    let q = query_map(q)?;
    let job = match job.as_str() {
        "recalc" => {
            unknown_params(&q, &["from", "to", "dry_run"])?;
            let dry_run = match q.get("dry_run").map(String::as_str) {
                None | Some("false") => false,
                Some("true") => true,
                Some(v) => {
                    return Err(ApiError::BadRequest(format!(
                        "dry_run: {v:?} is not true or false"
                    )))
                }
            };
            crate::recalc::Job::Recalc { dry_run }
        }
        "reconcile" => {
            unknown_params(&q, &["from", "to"])?;
            crate::recalc::Job::Reconcile
        }
        _ => return Err(ApiError::NotFound(format!("no admin job {job:?} (recalc, reconcile)"))),
    };
    let required = |name| {
        minute_param(&q, name)?.ok_or_else(|| ApiError::BadRequest(format!("{name}: required")))
    };
    let (from, to) = (required("from")?, required("to")?);
    if from >= to {
        return Err(ApiError::BadRequest("from: must be before to".into()));
    }
    let Some(query) = s.results.embedded().cloned() else {
        return Err(ApiError::NotFound(
            "recalc and reconcile run on an embedded server only (not in scale-out)".into(),
        ));
    };
    let busy = query.jobs.try_lock().is_err();
    if busy {
        return Err(ApiError::Conflict(
            "another recalc or reconcile is running; retry later".into(),
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::Builder::new()
        .name("adclick-admin-job".into())
        .spawn(move || {
            let Ok(_running) = query.jobs.try_lock() else {
                let _ = tx.blocking_send(json!({"error": "another job is running"}).to_string());
                return;
            };
            let result = query
                .await_aggregated(std::time::Duration::from_secs(600))
                .and_then(|()| query.flush_archive())
                .and_then(|()| {
                    let mut last = std::time::Instant::now();
                    crate::recalc::run_job(
                        &query.recalc,
                        Some(&query.live),
                        job,
                        from,
                        to,
                        &mut |p| {
                            if last.elapsed() >= std::time::Duration::from_millis(250) {
                                last = std::time::Instant::now();
                                let _ = tx.blocking_send(json!({ "progress": p }).to_string());
                            }
                        },
                    )
                });
            let line = match result {
                Ok(r) => json!({ "result": r }),
                Err(e) => json!({ "error": format!("{e:#}") }),
            };
            let _ = tx.blocking_send(line.to_string());
        })
        .map_err(|e| ApiError::Internal(format!("starting the job: {e}")))?;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, std::convert::Infallible>(line + "\n"), rx))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream))
        .into_response())
}

/// The dashboard: one page, no external assets (src/dashboard.html). It reads the API and
/// `/metrics` like any other client, polling every 2 s.
async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// The OpenAPI 3.1 description of this API (src/openapi.json; tests check answers against it).
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json")).into_response()
}

/// The pre-defined filters (SPEC §2), as configured: what a `filter=` parameter may name.
async fn filters(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "filters": *s.filter_configs }))
}

async fn healthz(State(s): State<AppState>) -> Response {
    let (ready, body) = match &s.results {
        Results::Embedded(q) => {
            let ready = q.ready.load(Ordering::Acquire);
            let w = Watermark::from_raw(q.watermark.load(Ordering::Acquire));
            let body = json!({
                "status": if ready { "ok" } else { "starting" },
                "watermark": w.ms().map(|w| format_rfc3339(EventTime(w))),
                "lag_records": q.lag(),
                "archive_lag_records": q.archive_lag(),
            });
            (ready, body)
        }
        Results::Postgres(pg) => {
            let pg = pg.clone();
            match tokio::task::spawn_blocking(move || pg.watermark()).await {
                Ok(Ok(w)) => (
                    true,
                    json!({"status": "ok", "watermark": w.ms().map(|w| format_rfc3339(EventTime(w)))}),
                ),
                Ok(Err(e)) => (false, json!({"status": "unavailable", "error": e.to_string()})),
                Err(e) => (false, json!({"status": "unavailable", "error": e.to_string()})),
            }
        }
        Results::Off => (true, json!({"status": "ok"})),
    };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let Some(telemetry) = crate::telemetry::install() else {
        return ApiError::Internal("no metrics recorder in this process".into()).into_response();
    };
    s.metrics.export();
    crate::telemetry::set_gauge(
        crate::telemetry::INGEST_INFLIGHT,
        s.max_inflight_bytes.saturating_sub(s.inflight.available_permits()) as f64,
    );
    if let Some(q) = s.results.embedded() {
        q.export_metrics();
    }
    let text = telemetry.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
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
