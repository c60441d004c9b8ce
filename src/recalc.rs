//! Recalculation (SPEC §3.4) and reconciliation (SPEC §3.5) from the raw archive.
//!
//! ```text
//!  archive files of the hours around [from, to) ──▶ per flush, rows merged in (partition,
//!  offset) order, clicks within [chunk − horizon, chunk + horizon) ──▶ Engine::recompute
//!  (same dedup, filters and top-N; nothing too late) ──▶ counts + top-N of the chunk
//!        │
//!        ├── reconcile: compare with the stored rows, classify each difference
//!        └── recalc: Store::replace_range (one transaction) + the in-memory popular index
//! ```
//!
//! The range is recomputed a *chunk* of whole hours at a time (up to about 256 MB of archive
//! files, at least an hour) with a fresh engine, so memory follows the chunk, not the range. A chunk reads the dedup horizon on both sides of it: a
//! click is a duplicate of one counted earlier in log order within the horizon of its time,
//! and that one may lie outside the chunk, before or after it. Copies of one click spread over
//! more than a horizon of event time and chained through each other (A, then B within the
//! horizon of A, then C within the horizon of B) are the limit of this rule: the live path
//! forgets them just the same.
//!
//! Only minutes the live path can no longer write may be replaced (every minute of the range
//! too late for the watermark): otherwise a live correction and the replacement would race.
//! The check is made inside the replacing transaction.
//!
//! The caller first brings the archive up to the log's durable end (a running server's archiver
//! on request, or the command itself when no server runs): data not archived yet would
//! otherwise look missing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::archive::{Archive, ArchiveError, ArchiveFile};

use crate::engine::{Engine, EngineConfig, Offset, PartitionId, Payload, Record, TopUpdate};
use crate::event::{format_rfc3339, AdId, EventTime, Minute, MINUTE_MS};
use crate::filter::Filters;
use crate::popular::LiveIndex;
use crate::store::{CountRows, RangeRows, ReplaceError, Replaced, Store, StoreError};

const HOUR_MS: i64 = 3_600_000;

/// Archive bytes a chunk covers at most, unless one hour holds more (about 15 M clicks: the
/// engine then holds about 0.5 GB of dedup state).
const CHUNK_BYTES: u64 = 256 << 20;

/// Records per engine batch: bounded buffers, whatever a flush holds.
const ENGINE_BATCH: usize = 1 << 16;

/// Most decoded archive rows kept between chunks (about 100 bytes each).
const CACHE_ROWS: usize = 20_000_000;

/// Why a recalc or reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("another recalc or reconcile is running; retry later")]
    Busy,
    #[error("--from must be before --to")]
    EmptyRange,
    #[error("the aggregator did not catch up with the log within {0:?}")]
    NotCaughtUp(std::time::Duration),
    #[error("the archiver has stopped")]
    ArchiverStopped,
    /// Archiving what is durable failed (the archiver retries on its own).
    #[error("archiving: {0}")]
    Archiving(#[source] Arc<ArchiveError>),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("reading the stored counts: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Replace(#[from] ReplaceError),
    #[error("engine settings: {0}")]
    Engine(#[from] crate::engine::ConfigError),
}

/// What recalculation needs: the store, the archive and the engine settings of the data.
#[derive(Clone)]
pub struct Context {
    pub store: Arc<Store>,
    pub archive: Arc<Archive>,
    /// With the data directory's identity key.
    pub engine: EngineConfig,
    pub filters: Arc<Filters>,
}

/// Progress of a recomputation, for a progress bar.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Minutes of the range done.
    pub minutes_done: i64,
    pub minutes_total: i64,
    /// Archived clicks read (the range and its horizons).
    pub events: u64,
    pub files: u64,
    pub elapsed_s: f64,
}

/// The recomputed results of `[from, to)`.
#[derive(Debug, Default)]
pub struct Recomputed {
    pub from: Minute,
    pub to: Minute,
    /// Only rows with clicks.
    pub counts: CountRows,
    pub tops: Vec<TopUpdate>,
    pub progress: Progress,
}

/// Recomputes `[from, to)` from the archive (see the module doc).
pub fn recompute(
    ctx: &Context,
    from: Minute,
    to: Minute,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Recomputed, JobError> {
    if from >= to {
        return Err(JobError::EmptyRange);
    }
    let started = Instant::now();
    let horizon = ctx.engine.dedup_horizon_ms;
    let mut out = Recomputed { from, to, ..Recomputed::default() };
    out.progress.minutes_total = to.0 - from.0;
    let mut tops: BTreeMap<(Minute, usize), TopUpdate> = BTreeMap::new();
    // Decoded files of the hours the next chunk's horizon reaches back into, read once.
    let mut cache: std::collections::HashMap<String, Arc<Vec<RecordBatch>>> = Default::default();
    let mut a = from.start().0;
    // `ADCLICK_RECALC_CHUNK_BYTES` overrides the chunk size (tests: one hour per chunk).
    let chunk_bytes = std::env::var("ADCLICK_RECALC_CHUNK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CHUNK_BYTES);
    // Every hour's files, listed once.
    let mut listed: HashMap<i64, Vec<ArchiveFile>> = HashMap::new();
    let mut files_of = |hour: i64| -> Result<Vec<ArchiveFile>, ArchiveError> {
        if let Some(f) = listed.get(&hour) {
            return Ok(f.clone());
        }
        let f = ctx.archive.files_of_hour(hour)?;
        listed.insert(hour, f.clone());
        Ok(f)
    };
    while a < to.start().0 {
        // A chunk is whole hours up to about CHUNK_BYTES of archive files: each chunk reads the
        // horizons around it again, so longer chunks read less twice, shorter ones hold less.
        let mut b = ((a.div_euclid(HOUR_MS) + 1) * HOUR_MS).min(to.start().0);
        let mut bytes: u64 = files_of(a.div_euclid(HOUR_MS))?.iter().map(|f| f.size).sum();
        while b < to.start().0 {
            let next: u64 = files_of(b.div_euclid(HOUR_MS))?.iter().map(|f| f.size).sum();
            if bytes + next > chunk_bytes {
                break;
            }
            bytes += next;
            b = (b + HOUR_MS).min(to.start().0);
        }
        let (lo, hi) = (a - horizon, b + horizon);
        // Every file of the hours the chunk and its horizons touch, grouped by flush.
        let mut flushes: BTreeMap<u64, Vec<ArchiveFile>> = BTreeMap::new();
        for hour in lo.div_euclid(HOUR_MS)..=(hi - 1).div_euclid(HOUR_MS) {
            for f in files_of(hour)? {
                flushes.entry(f.seq).or_default().push(f);
            }
        }
        let mut engine = Engine::recompute(ctx.engine.clone(), ctx.filters.clone())?;
        // The chunk's counts by (minute, ad): updated in place, no allocation per update.
        let mut counts: HashMap<(Minute, AdId), Vec<u64>> = HashMap::new();
        let mut keep = |output: crate::engine::Output| {
            for (minute, ad, c) in output.counts.iter() {
                if minute.start().0 >= a && minute.start().0 < b {
                    match counts.get_mut(&(minute, ad.clone())) {
                        Some(row) => row.copy_from_slice(c),
                        None => {
                            counts.insert((minute, ad.clone()), c.to_vec());
                        }
                    }
                }
            }
            for t in output.top {
                if t.minute.start().0 >= a && t.minute.start().0 < b {
                    tops.insert((t.minute, t.slot.index()), t);
                }
            }
        };
        // Files are read and decoded in parallel (by file and by row group), one flush ahead
        // of the engine, which merges each flush's rows into log order.
        let decode = |files: &[ArchiveFile]| -> Result<Vec<Arc<Vec<RecordBatch>>>, ArchiveError> {
            files
                .par_iter()
                .map(|f| match cache.get(f.location.as_ref()) {
                    Some(b) => Ok(b.clone()),
                    None => ctx.archive.read(f).map(Arc::new),
                })
                .collect()
        };
        let order: Vec<&Vec<ArchiveFile>> = flushes.values().collect();
        let mut ahead = order.first().map(|f| decode(f)).transpose()?;
        let mut decoded_all = Vec::new();
        for (i, files) in order.iter().enumerate() {
            let decoded = ahead.take().expect("decoded one flush ahead");
            let (next, events) = rayon::join(
                || order.get(i + 1).map(|f| decode(f)).transpose(),
                || feed(&mut engine, files, &decoded, lo, hi, &mut keep),
            );
            ahead = next?;
            out.progress.events += events?;
            out.progress.files += files.len() as u64;
            out.progress.elapsed_s = started.elapsed().as_secs_f64();
            progress(&out.progress);
            decoded_all.push(decoded);
        }
        for (files, decoded) in order.iter().zip(decoded_all) {
            for (f, batches) in files.iter().zip(decoded) {
                cache.insert(f.location.to_string(), batches);
            }
        }
        keep(engine.finish(EventTime(hi)));
        // Chunks come in time order: each chunk's sorted rows extend the sorted whole.
        let mut rows: CountRows = counts
            .into_iter()
            .filter(|(_, c)| c.iter().any(|&v| v > 0))
            .map(|((minute, ad), c)| ((minute.0, ad.as_str().to_string()), c))
            .collect();
        rows.par_sort_unstable_by(|x, y| x.0.cmp(&y.0));
        out.counts.extend(rows);
        // Keep only what the next chunk reads again (its horizon reaches back into this hour),
        // and not more than a bounded number of rows.
        let next_lo_hour = (b - horizon).div_euclid(HOUR_MS);
        let again: std::collections::HashSet<String> = flushes
            .values()
            .flatten()
            .filter(|f| f.hour >= next_lo_hour)
            .map(|f| f.location.to_string())
            .collect();
        cache.retain(|loc, _| again.contains(loc));
        let cached: usize = cache.values().flat_map(|b| b.iter()).map(|b| b.num_rows()).sum();
        if cached > CACHE_ROWS {
            cache.clear();
        }
        out.progress.minutes_done = (b - from.start().0) / MINUTE_MS;
        out.progress.elapsed_s = started.elapsed().as_secs_f64();
        progress(&out.progress);
        a = b;
    }
    out.tops = tops.into_values().collect();
    Ok(out)
}

/// Feeds one flush's clicks within `[lo, hi)` to the engine in log order; returns how many.
fn feed(
    engine: &mut Engine,
    files: &[ArchiveFile],
    decoded: &[Arc<Vec<RecordBatch>>],
    lo: i64,
    hi: i64,
    keep: &mut (dyn FnMut(crate::engine::Output) + Send),
) -> Result<u64, ArchiveError> {
    // Each record batch's clicks in the chunk and its horizons; each is in log order.
    let runs = files
        .par_iter()
        .zip(decoded)
        .flat_map_iter(|(f, batches)| batches.iter().map(move |batch| (f, batch)))
        .map(|(f, batch)| {
            let mut rows = crate::archive::clicks(batch)
                .map_err(|e| ArchiveError::Format(format!("archive file {}: {e}", f.location)))?;
            rows.retain(|(_, _, c)| c.time.0 >= lo && c.time.0 < hi);
            Ok(rows)
        })
        .collect::<Result<Vec<_>, ArchiveError>>()?;
    // One flush's files hold disjoint offset ranges per partition: merging the runs by
    // (partition, offset) gives each partition's records in offset order, as the live path
    // read them. The engine gets them in bounded batches (the result does not depend on where
    // batches are cut).
    let mut heads: Vec<_> = runs.into_iter().map(|r| r.into_iter().peekable()).collect();
    let mut heap: BinaryHeap<Reverse<((PartitionId, Offset), usize)>> = heads
        .iter_mut()
        .enumerate()
        .filter_map(|(i, h)| h.peek().map(|(p, o, _)| Reverse(((*p, *o), i))))
        .collect();
    let mut batch: Vec<Record<'_>> = Vec::with_capacity(ENGINE_BATCH);
    let mut events = 0;
    while let Some(Reverse((_, i))) = heap.pop() {
        let (partition, offset, click) = heads[i].next().expect("peeked");
        batch.push(Record { partition, offset, payload: Payload::Click(click) });
        if let Some((p, o, _)) = heads[i].peek() {
            heap.push(Reverse(((*p, *o), i)));
        }
        if batch.len() == ENGINE_BATCH || heap.is_empty() {
            events += batch.len() as u64;
            keep(engine.process_with(EventTime(hi), &batch, |work| {
                work.into_par_iter().map(|(shard, b)| shard.apply(b)).collect()
            }));
            batch.clear();
        }
    }
    Ok(events)
}

/// How a difference between stored and recomputed counts is explained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The archive holds clicks the live path found too late (SPEC §2); recalc counts them.
    TooLate,
    /// The store counted more than the archive holds: raw data is missing from the archive.
    MissingFromArchive,
    Unexplained,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Difference {
    pub minute: String,
    pub minute_ms: i64,
    pub ad_id: String,
    /// `null` for the unfiltered total.
    pub filter: Option<String>,
    pub stored: u64,
    pub recomputed: u64,
    pub difference: i64,
    pub kind: Kind,
}

/// What reconciliation found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub from: String,
    pub to: String,
    pub rows_stored: u64,
    pub rows_recomputed: u64,
    pub events_read: u64,
    pub matches: bool,
    pub too_late: u64,
    pub missing_from_archive: u64,
    pub unexplained: u64,
    /// The command that corrects the too-late differences, when there are any.
    pub fix: Option<String>,
    pub differences: Vec<Difference>,
}

/// Compares stored rows (read in one transaction) with a recomputation of the same range.
pub fn compare(ctx: &Context, rec: &Recomputed, stored: &RangeRows) -> Report {
    let slots = ctx.filters.len() + 1;
    let mut differences = Vec::new();
    // Both sides are sorted by (minute, ad): one merge pass.
    let mut stored_rows = stored.counts.iter().peekable();
    let mut recomputed_rows = rec.counts.iter().peekable();
    loop {
        let (key, s, r) = match (stored_rows.peek(), recomputed_rows.peek()) {
            (None, None) => break,
            (Some((ks, _)), Some((kr, _))) => match ks.cmp(kr) {
                std::cmp::Ordering::Less => {
                    let (k, s) = stored_rows.next().expect("peeked");
                    (k, Some(s), None)
                }
                std::cmp::Ordering::Greater => {
                    let (k, r) = recomputed_rows.next().expect("peeked");
                    (k, None, Some(r))
                }
                std::cmp::Ordering::Equal => {
                    let (k, s) = stored_rows.next().expect("peeked");
                    let (_, r) = recomputed_rows.next().expect("peeked");
                    (k, Some(s), Some(r))
                }
            },
            (Some(_), None) => {
                let (k, s) = stored_rows.next().expect("peeked");
                (k, Some(s), None)
            }
            (None, Some(_)) => {
                let (k, r) = recomputed_rows.next().expect("peeked");
                (k, None, Some(r))
            }
        };
        if s == r {
            continue;
        }
        for slot in 0..slots {
            let sv = s.and_then(|c| c.get(slot)).copied().unwrap_or(0);
            let rv = r.and_then(|c| c.get(slot)).copied().unwrap_or(0);
            if sv == rv {
                continue;
            }
            let late = stored.too_late.get(key).and_then(|c| c.get(slot)).copied().unwrap_or(0);
            let kind = if rv > sv && rv - sv <= late {
                Kind::TooLate
            } else if sv > rv {
                Kind::MissingFromArchive
            } else {
                Kind::Unexplained
            };
            differences.push(Difference {
                minute: format_rfc3339(Minute(key.0).start()),
                minute_ms: Minute(key.0).start().0,
                ad_id: key.1.clone(),
                filter: (slot > 0).then(|| ctx.filters.ids()[slot - 1].clone()),
                stored: sv,
                recomputed: rv,
                difference: rv as i64 - sv as i64,
                kind,
            });
        }
    }
    let count = |k: Kind| differences.iter().filter(|d| d.kind == k).count() as u64;
    let late_minutes: Vec<i64> =
        differences.iter().filter(|d| d.kind == Kind::TooLate).map(|d| d.minute_ms).collect();
    let fix = match (late_minutes.iter().min(), late_minutes.iter().max()) {
        (Some(&lo), Some(&hi)) => Some(format!(
            "adclick recalc --from {} --to {}",
            format_rfc3339(EventTime(lo)),
            format_rfc3339(EventTime(hi + MINUTE_MS))
        )),
        _ => None,
    };
    Report {
        from: format_rfc3339(rec.from.start()),
        to: format_rfc3339(rec.to.start()),
        rows_stored: stored.counts.len() as u64,
        rows_recomputed: rec.counts.len() as u64,
        events_read: rec.progress.events,
        matches: differences.is_empty(),
        too_late: count(Kind::TooLate),
        missing_from_archive: count(Kind::MissingFromArchive),
        unexplained: count(Kind::Unexplained),
        fix,
        differences,
    }
}

/// Replaces the stored results of the range with the recomputation, atomically, and updates the
/// running service's in-memory popular index (when there is one) with what changed.
pub fn apply(
    ctx: &Context,
    rec: &Recomputed,
    live: Option<&LiveIndex>,
) -> Result<Replaced, ReplaceError> {
    let replaced = ctx.store.replace_range(
        rec.from,
        rec.to,
        &rec.counts,
        &rec.tops,
        ctx.engine.allowed_lateness_ms,
    )?;
    if let Some(live) = live {
        live.replace(&replaced.changed);
    }
    Ok(replaced)
}

/// A recalc or reconcile job, as the command line and the admin endpoint run it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    Recalc { dry_run: bool },
    Reconcile,
}

/// The result of a job, for people (the command's table) and machines (`--json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobResult {
    pub job: String,
    pub dry_run: bool,
    /// What differs between stored and recomputed results (recalc: what it changed, or would).
    pub report: Report,
    /// What the replacement wrote (recalc without `--dry-run`).
    pub replaced: Option<Replaced>,
    pub events_per_s: f64,
    pub elapsed_s: f64,
    /// Of `elapsed_s`, the recomputation from the archive.
    pub recompute_s: f64,
}

/// Recomputes, compares and, for a recalc, replaces.
pub fn run_job(
    ctx: &Context,
    live: Option<&LiveIndex>,
    job: Job,
    from: Minute,
    to: Minute,
    progress: &mut dyn FnMut(&Progress),
) -> Result<JobResult, JobError> {
    let started = Instant::now();
    if let Job::Recalc { dry_run: false } = job {
        // Refuse early, before the work, when the range is not sealed (checked again on write).
        ctx.store.check_sealed(to, ctx.engine.allowed_lateness_ms)?;
    }
    // The stored rows are read (one transaction) while the range is recomputed.
    let (rec, stored) = std::thread::scope(|scope| {
        let stored = scope.spawn(|| ctx.store.range_rows(from, to));
        let rec = recompute(ctx, from, to, progress);
        (rec, stored.join().expect("reading the store does not panic"))
    });
    let rec = rec?;
    let stored = stored?;
    let report = compare(ctx, &rec, &stored);
    let replaced = match job {
        Job::Recalc { dry_run: false } => Some(apply(ctx, &rec, live)?),
        _ => None,
    };
    let elapsed = started.elapsed().as_secs_f64();
    Ok(JobResult {
        job: match job {
            Job::Recalc { .. } => "recalc",
            Job::Reconcile => "reconcile",
        }
        .to_string(),
        dry_run: job == Job::Recalc { dry_run: true },
        report,
        replaced,
        events_per_s: rec.progress.events as f64 / elapsed.max(1e-9),
        elapsed_s: elapsed,
        recompute_s: rec.progress.elapsed_s,
    })
}
