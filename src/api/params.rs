//! Query-string parameters, validated one by one so that each 400 names the parameter.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;

use super::{ApiError, AppState};
use crate::engine::Slot;
use crate::event::{format_rfc3339, parse_minute, EventTime, Minute, MAX_AD_ID_BYTES};

/// A request's query string, as axum hands it over.
pub(super) type RawQuery = Result<Query<HashMap<String, String>>, QueryRejection>;

/// The query string as a map; a malformed one is a 400 in the usual shape.
pub(super) fn query_map(q: RawQuery) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::BadRequest(format!("query string: {}", e.body_text())))
}

/// A minute-aligned time parameter of the query string.
pub(super) fn minute_param(
    q: &HashMap<String, String>,
    name: &str,
) -> Result<Option<Minute>, ApiError> {
    q.get(name)
        .map(|raw| parse_minute(name, raw).map_err(|e| ApiError::BadRequest(e.to_string())))
        .transpose()
}

pub(super) fn current_minute() -> Minute {
    EventTime::now().minute()
}

/// `from`/`to`: `to` defaults to the current minute's start, `from` to `default_span` minutes
/// before it (SPEC: 1); a range over `max_span` minutes is refused.
pub(super) fn range(
    q: &HashMap<String, String>,
    default_span: i64,
    max_span: Option<i64>,
) -> Result<(Minute, Minute), ApiError> {
    let to = minute_param(q, "to")?.unwrap_or_else(current_minute);
    let from = minute_param(q, "from")?.unwrap_or(Minute(to.0 - default_span));
    if from >= to {
        return Err(ApiError::BadRequest(format!(
            "from: {} must be before to ({})",
            format_rfc3339(from.start()),
            format_rfc3339(to.start())
        )));
    }
    if let Some(max) = max_span.filter(|&max| to.0 - from.0 > max) {
        return Err(ApiError::BadRequest(format!(
            "from: the range may span at most {max} minutes"
        )));
    }
    Ok((from, to))
}

/// The `filter` parameter: the slot it reads and the filter as the answer names it.
pub(super) fn slot(
    s: &AppState,
    q: &HashMap<String, String>,
) -> Result<(Slot, serde_json::Value), ApiError> {
    match q.get("filter") {
        None => Ok((Slot::Total, serde_json::Value::Null)),
        Some(id) => match s.filters.index_of(id) {
            Some(i) => Ok((Slot::Filter(i), serde_json::Value::String(id.clone()))),
            None => Err(ApiError::NotFound(format!(
                "filter: unknown filter {id:?} (configured: {:?})",
                s.filters.ids()
            ))),
        },
    }
}

pub(super) fn ad_param(ad: &str) -> Result<(), ApiError> {
    if ad.is_empty() || ad.len() > MAX_AD_ID_BYTES {
        return Err(ApiError::BadRequest(format!("ad_id: must be 1 to {MAX_AD_ID_BYTES} bytes")));
    }
    Ok(())
}

pub(super) fn unknown_params(q: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::BadRequest(format!(
            "{k}: unknown parameter (known: {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

pub(super) fn int_param(
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
