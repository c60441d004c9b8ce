//! The collector (`POST /v1/clicks`): reads a body within its limits, decompresses and validates
//! it off the runtime's hot threads, routes each click to its partition, and answers once the
//! collector behind [`super::Collector`] has made every accepted click durable.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::Json;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::engine::PartitionId;
use crate::event::{
    parse_line, partition_of, route_hash, wire, EventTime, InvalidKind, Validation,
};

/// Most rejected lines an ingest answer lists one by one; the rest are in its totals.
pub const MAX_REJECTED_LISTED: usize = 1000;

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

pub(super) async fn clicks(
    State(s): State<AppState>,
    headers: HeaderMap,
    mut body: Body,
) -> Result<Json<Value>, ApiError> {
    let started = std::time::Instant::now();
    let encoding = Encoding::of(&headers)?;
    if let Some(why) = s.collector.as_ref().and_then(|c| c.overloaded()) {
        drain(&mut body).await;
        return Err(ApiError::Overloaded(why));
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
                drain(&mut body).await;
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
    let v = Validation { now: EventTime::now(), max_skew_ms: s.max_skew_ms };
    let Some(collector) = s.collector.clone() else {
        return Err(ApiError::NotFound("this process does not run the collect role".into()));
    };
    let partitions = collector.partitions();
    let Checked { parts, rejected, by_reason, accepted } =
        cpu_bound(&s, || check_body(&bytes, v, partitions)).await?;
    let parts: Vec<_> = parts
        .into_iter()
        .enumerate()
        .filter(|(_, r)| !r.is_empty())
        .map(|(p, r)| (PartitionId(p as u32), r))
        .collect();
    if !parts.is_empty() {
        collector.append(parts).await?;
    }
    drop(held);
    s.counters.add(accepted, &by_reason);
    let mut totals = serde_json::Map::new();
    for kind in InvalidKind::ALL {
        let n = by_reason[kind.index()];
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

/// Most of a refused body read and thrown away before answering, and for how long: a client
/// that sends its whole body before it reads (Python's `http.client`, for one) then gets the
/// answer instead of a reset connection, as nginx's lingering close does. Past either bound the
/// answer goes out and the connection closes.
const DRAIN_BYTES: usize = 64 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and discards what is left of `body`, within [`DRAIN_BYTES`] and [`DRAIN_TIME`].
async fn drain(body: &mut Body) {
    let mut read = 0usize;
    let discard = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                read += data.len();
                if read > DRAIN_BYTES {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
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
