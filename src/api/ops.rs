//! What operators and tools read: `/healthz`, `/metrics`, the dashboard, `/openapi.json` and the
//! configured filters.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{ApiError, AppState, Health, HealthStatus};

/// The dashboard: one page, no external assets (src/dashboard.html). It reads the API and
/// `/metrics` like any other client, polling every 2 s.
pub(super) async fn dashboard() -> Html<&'static str> {
    Html(include_str!("../dashboard.html"))
}

/// The OpenAPI 3.1 description of this API (src/openapi.json; tests check answers against it).
pub(super) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("../openapi.json")).into_response()
}

/// The pre-defined filters (SPEC §2), as configured: what a `filter=` parameter may name.
pub(super) async fn filters(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "filters": *s.filter_configs }))
}

/// 200 once this process serves (recovered, its database reachable), 503 before or while not.
pub(super) async fn healthz(State(s): State<AppState>) -> Response {
    let health = match s.results.clone() {
        // A process without results of its own: whether it can commit (an aggregator).
        None => match crate::telemetry::stalled() {
            None => Health::new(HealthStatus::Ok),
            Some(why) => Health { error: Some(why), ..Health::new(HealthStatus::Unavailable) },
        },
        Some(results) => match tokio::task::spawn_blocking(move || results.health()).await {
            Ok(h) => h,
            Err(e) => {
                Health { error: Some(e.to_string()), ..Health::new(HealthStatus::Unavailable) }
            }
        },
    };
    let status = if health.status == HealthStatus::Ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health)).into_response()
}

pub(super) async fn metrics(State(s): State<AppState>) -> Response {
    let Some(telemetry) = crate::telemetry::install() else {
        return ApiError::Internal("no metrics recorder in this process".into()).into_response();
    };
    s.counters.export();
    crate::telemetry::set_gauge(
        crate::telemetry::INGEST_INFLIGHT,
        s.max_inflight_bytes.saturating_sub(s.inflight.available_permits()) as f64,
    );
    if let Some(results) = &s.results {
        results.export_metrics();
    }
    let text = telemetry.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}
