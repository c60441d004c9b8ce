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
//! Scaled out (`scaleout::recalc`), a recomputation runs one engine per source partition, as the
//! aggregators do, reads only the clicks below the committed offsets of one snapshot of the
//! results (`Scope`), and the range is replaced in PostgreSQL.
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

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::archive::{Archive, ArchiveError};
use crate::engine::EngineConfig;
use crate::event::Minute;
use crate::filter::Filters;
use crate::popular::LiveIndex;
use crate::store::{ReplaceError, Replaced, Store, StoreError};

mod compare;
mod explain;
mod recompute;

pub use compare::{compare, Difference, Kind, Report};
pub use explain::{explain, Explained, ExplainedClick, Fate, Question};
pub use recompute::{recompute, Recomputed, Scope};

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
    /// The archive does not hold every click the results reflect yet; the message says why.
    #[error("{0}")]
    NotArchived(String),
    /// The question is wrong (an unknown filter, say).
    #[error("{0}")]
    Invalid(String),
    /// The scaled-out results store failed.
    #[error("{0}")]
    Results(Box<dyn std::error::Error + Send + Sync>),
}

/// What a recomputation reads: the archive, and the engine settings and filters of the data.
#[derive(Clone)]
pub struct Context {
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

/// Replaces the stored results of the range with the recomputation, atomically, and updates the
/// running service's in-memory popular index (when there is one) with what changed.
pub fn apply(
    ctx: &Context,
    store: &Store,
    rec: &Recomputed,
    live: Option<&LiveIndex>,
) -> Result<Replaced, ReplaceError> {
    let replaced = store.replace_range(
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
    store: &Store,
    live: Option<&LiveIndex>,
    job: Job,
    from: Minute,
    to: Minute,
    progress: &mut dyn FnMut(&Progress),
) -> Result<JobResult, JobError> {
    let started = Instant::now();
    if let Job::Recalc { dry_run: false } = job {
        // Refuse early, before the work, when the range is not sealed (checked again on write).
        store.check_sealed(to, ctx.engine.allowed_lateness_ms)?;
    }
    // The stored rows are read (one transaction) while the range is recomputed.
    let (rec, stored) = std::thread::scope(|scope| {
        let stored = scope.spawn(|| store.range_rows(from, to));
        let rec = recompute(ctx, &Scope::default(), from, to, progress);
        (rec, stored.join().expect("reading the store does not panic"))
    });
    let rec = rec?;
    let stored = stored?;
    let report = compare(ctx, &rec, &stored);
    let replaced = match job {
        Job::Recalc { dry_run: false } => Some(apply(ctx, store, &rec, live)?),
        _ => None,
    };
    Ok(JobResult::new(job, report, replaced, &rec, started))
}

impl JobResult {
    /// The result of `job`, started at `started`, with what it found and replaced.
    pub fn new(
        job: Job,
        report: Report,
        replaced: Option<Replaced>,
        rec: &Recomputed,
        started: Instant,
    ) -> JobResult {
        let elapsed = started.elapsed().as_secs_f64();
        JobResult {
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
        }
    }
}
