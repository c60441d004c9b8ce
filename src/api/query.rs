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
    let (from, to) = range(q, 1, max_minutes)?;
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

/// Longest range `windows` answers over, in minutes (31 days), and most windows in one answer:
/// a request costs at most a month of one ad's minutes and this many items.
const MAX_WINDOW_RANGE: i64 = 31 * 1440;
const MAX_WINDOWS: i64 = 10_000;

/// A duration parameter in whole minutes (`10m`, `1h`, `2d`, or a number of minutes).
fn minutes_param(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(raw) = q.get(name) else { return Ok(None) };
    let bad = |why: &str| ApiError::BadRequest(format!("{name}: {raw:?} {why}"));
    let minutes = match raw.parse::<i64>() {
        Ok(n) => n,
        Err(_) => {
            let d = humantime::parse_duration(raw)
                .map_err(|_| bad("is not a duration like 10m, 1h or 1d"))?;
            if d.as_secs() % 60 != 0 || d.subsec_nanos() != 0 {
                return Err(bad("is not a whole number of minutes"));
            }
            i64::try_from(d.as_secs() / 60).map_err(|_| bad("is too long"))?
        }
    };
    if !(1..=MAX_WINDOW_RANGE).contains(&minutes) {
        return Err(bad(&format!("must be 1 to {MAX_WINDOW_RANGE} minutes")));
    }
    Ok(Some(minutes))
}

/// `GET /v1/ads/{ad_id}/windows?type=&size=&hop=&gap=&origin=&from=&to=&filter=`: the ad's
/// clicks in tumbling, hopping, sliding or session windows over `[from, to)` (default: the hour
/// before `to`), from the committed per-minute counts (see `window`).
pub(super) async fn windows(
    State(s): State<AppState>,
    Path(ad): Path<String>,
    q: RawQuery,
) -> Result<Json<Value>, ApiError> {
    use crate::window::{Kind, Spec};
    let q = query_map(q)?;
    unknown_params(&q, &["type", "size", "hop", "gap", "origin", "from", "to", "filter"])?;
    ad_param(&ad)?;
    let (from, to) = range(&q, 60, Some(MAX_WINDOW_RANGE))?;
    let required = |name: &str| {
        minutes_param(&q, name)?.ok_or_else(|| ApiError::BadRequest(format!("{name}: required")))
    };
    let origin = minute_param(&q, "origin")?.unwrap_or(Minute(0)).0;
    let not_for = |names: &[&str], kind: &str| match names.iter().find(|n| q.contains_key(**n)) {
        Some(n) => Err(ApiError::BadRequest(format!("{n}: not a parameter of {kind} windows"))),
        None => Ok(()),
    };
    let kind_name = q.get("type").map(String::as_str).unwrap_or("");
    let kind = match kind_name {
        "tumbling" => {
            not_for(&["hop", "gap"], "tumbling")?;
            Kind::Tumbling { size: required("size")?, origin }
        }
        "hopping" => {
            not_for(&["gap"], "hopping")?;
            Kind::Hopping { size: required("size")?, hop: required("hop")?, origin }
        }
        "sliding" => {
            not_for(&["hop", "gap", "origin"], "sliding")?;
            Kind::Sliding { size: required("size")? }
        }
        "session" => {
            not_for(&["size", "hop", "origin"], "session")?;
            Kind::Session { gap: required("gap")? }
        }
        other => {
            return Err(ApiError::BadRequest(format!(
                "type: {other:?} is not tumbling, hopping, sliding or session"
            )))
        }
    };
    let spec = Spec { kind, from, to };
    // Sessions are bounded by the range alone: at most one per two minutes of it.
    if !matches!(kind, Kind::Session { .. }) && spec.windows() > MAX_WINDOWS {
        return Err(ApiError::BadRequest(format!(
            "the range holds {} windows, more than {MAX_WINDOWS}: narrow it or widen the hop",
            spec.windows()
        )));
    }
    let (slot, filter) = slot(&s, &q)?;
    let (lo, hi) = spec.read();
    let ad_id = ad.clone();
    let (series, watermark) = read(&s, move |r| r.series(&ad_id, slot, lo, hi)).await?;
    let windows = spec.compute(&series, watermark);
    let all_final = windows.iter().all(|w| w.final_);
    let items: Vec<Value> = windows
        .iter()
        .map(|w| {
            let mut v = json!({
                "start": format_rfc3339(w.start.start()),
                "end": format_rfc3339(w.end.start()),
                "start_ms": w.start.start().0,
                "end_ms": w.end.start().0,
                "count": w.count,
                "final": w.final_,
            });
            if let Kind::Session { .. } = kind {
                v["cut_start"] = w.cut_start.into();
                v["cut_end"] = w.cut_end.into();
            }
            v
        })
        .collect();
    let mut answer = json!({
        "ad_id": ad,
        "type": kind_name,
        "from": format_rfc3339(from.start()),
        "to": format_rfc3339(to.start()),
        "from_ms": from.start().0,
        "to_ms": to.start().0,
        "filter": filter,
        "final": all_final,
        "windows": items,
    });
    match kind {
        Kind::Tumbling { size, origin } | Kind::Hopping { size, origin, .. } => {
            answer["size_minutes"] = size.into();
            answer["origin"] = format_rfc3339(Minute(origin).start()).into();
            answer["origin_ms"] = Minute(origin).start().0.into();
            if let Kind::Hopping { hop, .. } = kind {
                answer["hop_minutes"] = hop.into();
            }
        }
        Kind::Sliding { size } => answer["size_minutes"] = size.into(),
        Kind::Session { gap } => answer["gap_minutes"] = gap.into(),
    }
    Ok(Json(answer))
}
