//! Queries over committed results (SPEC §4): an ad's count and series, popular ads and totals.
//! Each answer's counts and `final` come from one read.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::params::{
    ad_param, current_minute, int_param, minute_param, query_map, range, slot, unknown_params,
    RawQuery,
};
use super::{ApiError, AppState, ReadError, Results};
use crate::engine::Watermark;
use crate::event::{format_rfc3339, Minute};
use crate::popular::MAX_WINDOW_MINUTES;

/// Runs a blocking read of the results on the blocking pool.
async fn read<T: Send + 'static>(
    s: &AppState,
    f: impl FnOnce(&dyn Results) -> Result<T, ReadError> + Send + 'static,
) -> Result<T, ApiError> {
    let results: Arc<dyn Results> = s.results()?;
    let read = tokio::task::spawn_blocking(move || f(results.as_ref()));
    Ok(read.await.map_err(|e| ApiError::Internal(e.to_string()))??)
}

/// Validates an ad query's parameters and reads its per-minute counts.
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
    let ad_id = ad.to_owned();
    let (series, watermark) = read(s, move |r| r.series(&ad_id, slot, from, to)).await?;
    Ok((from, to, filter, series, watermark))
}

pub(super) async fn aggregated_count(
    State(s): State<AppState>,
    Path(ad): Path<String>,
    q: RawQuery,
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

pub(super) async fn timeseries(
    State(s): State<AppState>,
    Path(ad): Path<String>,
    q: RawQuery,
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

pub(super) async fn popular_ads(
    State(s): State<AppState>,
    q: RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = query_map(q)?;
    unknown_params(&q, &["count", "window", "filter", "to"])?;
    let count = int_param(&q, "count", 10, 1000)?;
    let window = int_param(&q, "window", 1, MAX_WINDOW_MINUTES)?;
    let to = minute_param(&q, "to")?.unwrap_or_else(current_minute);
    let (slot, filter) = slot(&s, &q)?;
    let from = Minute(to.0 - i64::from(window));
    let (ads, watermark) = read(&s, move |r| r.popular(slot, from, to, count as usize)).await?;
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
/// every minute of `[to − window, to)` listed, zeros included.
pub(super) async fn totals(
    State(s): State<AppState>,
    q: RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = query_map(q)?;
    unknown_params(&q, &["window", "filter", "to"])?;
    let window = int_param(&q, "window", 60, MAX_WINDOW_MINUTES)?;
    let to = minute_param(&q, "to")?.unwrap_or_else(current_minute);
    let (slot, filter) = slot(&s, &q)?;
    let from = Minute(to.0 - i64::from(window));
    let (rows, watermark) = read(&s, move |r| r.totals(slot, from, to)).await?;
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
