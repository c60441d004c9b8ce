//! `POST /v1/admin/{recalc|reconcile}?from=&to=[&dry_run=true]`: runs a job on this server's
//! store and archive (after archiving everything durable), answering NDJSON as it goes:
//! `{"progress":…}` lines, then `{"result":…}` or `{"error":…}`.
//!
//! `POST /v1/admin/explain?ad_id=&minute=[&filter=]`: the audit of one stored count, as JSON.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::params::{minute_param, query_map, unknown_params, RawQuery};
use super::{ApiError, AppState};
use crate::recalc::Job;

pub(super) async fn admin_job(
    State(s): State<AppState>,
    Path(job): Path<String>,
    headers: HeaderMap,
    q: RawQuery,
) -> Result<Response, ApiError> {
    let expected = format!("Bearer {}", s.admin_token);
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if given.map(str::as_bytes) != Some(expected.as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    let q = query_map(q)?;
    if job == "explain" {
        return explain(s, &q).await;
    }
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
            Job::Recalc { dry_run }
        }
        "reconcile" => {
            unknown_params(&q, &["from", "to"])?;
            Job::Reconcile
        }
        _ => {
            return Err(ApiError::NotFound(format!(
                "no admin job {job:?} (recalc, reconcile, explain)"
            )))
        }
    };
    let required = |name| {
        minute_param(&q, name)?.ok_or_else(|| ApiError::BadRequest(format!("{name}: required")))
    };
    let (from, to) = (required("from")?, required("to")?);
    if from >= to {
        return Err(ApiError::BadRequest("from: must be before to".into()));
    }
    let Some(jobs) = s.jobs.clone() else {
        return Err(ApiError::NotFound(
            "recalc and reconcile run on an embedded server only (not in scale-out)".into(),
        ));
    };
    if jobs.busy() {
        return Err(ApiError::Conflict(
            "another recalc or reconcile is running; retry later".into(),
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::Builder::new()
        .name("adclick-admin-job".into())
        .spawn(move || {
            let mut last = std::time::Instant::now();
            let result = jobs.run(job, from, to, &mut |p| {
                if last.elapsed() >= std::time::Duration::from_millis(250) {
                    last = std::time::Instant::now();
                    let _ = tx.blocking_send(json!({ "progress": p }).to_string());
                }
            });
            let line = match result {
                Ok(r) => json!({ "result": r }),
                Err(e) => json!({ "error": crate::fault::chain(&e) }),
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

async fn explain(
    s: AppState,
    q: &std::collections::HashMap<String, String>,
) -> Result<Response, ApiError> {
    unknown_params(q, &["ad_id", "minute", "filter"])?;
    let ad = q
        .get("ad_id")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::BadRequest("ad_id: required".into()))?
        .clone();
    let minute = minute_param(q, "minute")?
        .ok_or_else(|| ApiError::BadRequest("minute: required".into()))?;
    let question = crate::recalc::Question { ad, minute, filter: q.get("filter").cloned() };
    let Some(jobs) = s.jobs.clone() else {
        return Err(ApiError::NotFound("explain runs on an embedded server only".into()));
    };
    let answer = tokio::task::spawn_blocking(move || jobs.explain(&question))
        .await
        .map_err(|e| ApiError::Internal(format!("explain: {e}")))?;
    match answer {
        Ok(e) => Ok(axum::Json(e).into_response()),
        Err(crate::recalc::JobError::Invalid(why)) => Err(ApiError::BadRequest(why)),
        Err(e) => Err(ApiError::Internal(crate::fault::chain(&e))),
    }
}
