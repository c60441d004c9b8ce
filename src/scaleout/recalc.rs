//! `recalc`, `reconcile` and `explain` on the scaled-out deployment (SPEC §3.4, §3.5): the
//! Parquet archive the archive role writes (a directory or S3), against the results in
//! PostgreSQL.
//!
//! ```text
//!  snapshot, one REPEATABLE READ transaction: each partition's committed offset, the range's
//!     │   counts and too-late counts, and whether the live path can still write the range
//!     ▼
//!  ask the archive role to flush, and wait until it has archived every partition up to those
//!     │   offsets
//!     ▼
//!  recalc::recompute: one engine per partition (as the aggregators count), clicks below the
//!     │   snapshot's offsets only, so both sides reflect the same records
//!     ├── reconcile: recalc::compare
//!     └── recalc: one transaction that locks every partition's row (a live commit waits for
//!         it), checks again that the range is sealed, replaces each partition's counts and
//!         top-N lists, moves the snapshot's too-late counts to `recounted` (they are counted
//!         now), and sums the hours already rolled again
//! ```
//!
//! Once a range is sealed a live commit can only add too-late counts to it, so the clicks
//! committed after the snapshot keep theirs, and a later reconcile still explains them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, IsolationLevel};

use super::pg::{Days, PgError, HOURS_PER_DAY, MINUTES_PER_DAY};
use crate::archive::Archive;
use crate::config::{ScaleOut, Settings};
use crate::engine::{PartitionId, Watermark};
use crate::event::{Minute, MINUTE_MS};
use crate::recalc::{compare, recompute, Context, Explained, Job, JobError, JobResult, Progress};
use crate::recalc::{Question, Recomputed};
use crate::store::{AdMinute, CountRows, RangeRows, ReplaceError, Replaced};

/// The advisory lock a running job holds: one recalc or reconcile at a time.
const JOB_LOCK: i64 = 7_367_283;

/// Rows per statement when a range is written back.
const WRITE_ROWS: usize = 50_000;

impl From<PgError> for JobError {
    fn from(e: PgError) -> JobError {
        JobError::Results(Box::new(e))
    }
}

impl From<postgres::Error> for JobError {
    fn from(e: postgres::Error) -> JobError {
        PgError::from(e).into()
    }
}

/// Recomputes `[from, to)` from the archive, compares it with the results in PostgreSQL and, for
/// a recalc, replaces them.
pub fn run_job(
    settings: &Settings,
    scale: &ScaleOut,
    job: Job,
    from: Minute,
    to: Minute,
    progress: &mut dyn FnMut(&Progress),
) -> Result<JobResult, JobError> {
    let started = Instant::now();
    if from >= to {
        return Err(JobError::EmptyRange);
    }
    let mut client = super::prepare_database(settings, scale)?;
    let locked: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&JOB_LOCK])?.get(0);
    if !locked {
        return Err(JobError::Busy);
    }
    let lateness = settings.engine.allowed_lateness_ms;
    let slots = settings.filters.len() + 1;
    let mut snap = snapshot(&mut client, (from, to), slots, settings.partitions, lateness)?;
    if let (Job::Recalc { dry_run: false }, Some(open)) = (job, snap.open.take()) {
        // Refused before the work (and checked again on write).
        return Err(open.into());
    }
    await_archived(&mut client, &snap.next, ARCHIVE_WAIT)?;
    let ctx = context(settings, &mut client)?;
    let scope = crate::recalc::Scope { per_partition: true, below: Some(snap.next.clone()) };
    let rec = recompute(&ctx, &scope, from, to, progress)?;
    let report = compare(&ctx, &rec, &snap.rows);
    let replaced = match job {
        Job::Recalc { dry_run: false } => {
            Some(replace(&mut client, &rec, &snap, settings.partitions, lateness)?)
        }
        _ => None,
    };
    Ok(JobResult::new(job, report, replaced, &rec, started))
}

/// The audit of one stored count (`adclick explain`): the results as one snapshot holds them,
/// against the archived clicks below its offsets.
pub fn explain(settings: &Settings, scale: &ScaleOut, q: &Question) -> Result<Explained, JobError> {
    let mut client = super::prepare_database(settings, scale)?;
    let horizon = settings.engine.dedup_horizon_ms.div_euclid(MINUTE_MS) + 1;
    let (from, to) = (q.minute.0 - horizon, q.minute.0 + 1 + horizon);
    let (mut tx, parts) = begin_snapshot(&mut client)?;
    let next = next_offsets(&parts);
    let mut stored = AdMinute { counts: vec![0; settings.filters.len() + 1], ..Default::default() };
    for r in tx.query(
        "SELECT slot, sum(count)::bigint FROM adclick_counts WHERE minute = $1 AND ad_id = $2 \
         GROUP BY slot",
        &[&q.minute.0, &q.ad],
    )? {
        if let Some(c) = stored.counts.get_mut(r.get::<_, i16>(0) as usize) {
            *c = r.get::<_, i64>(1) as u64;
        }
    }
    for r in tx.query(
        "SELECT minute, sum(count)::bigint, sum(recounted)::bigint FROM adclick_too_late \
         WHERE ad_id = $1 AND slot = 0 AND minute >= $2 AND minute < $3 GROUP BY minute",
        &[&q.ad, &from, &to],
    )? {
        let (pending, recounted): (i64, i64) = (r.get(1), r.get(2));
        stored.too_late.insert(r.get(0), (pending as u64, recounted as u64));
    }
    tx.commit()?;
    await_archived(&mut client, &next, ARCHIVE_WAIT)?;
    let scope = crate::recalc::Scope { per_partition: true, below: Some(next) };
    crate::recalc::explain(&context(settings, &mut client)?, &scope, q, &stored)
}

/// What recomputation reads: the archive the archive role writes (refused if the `archive`
/// setting names another one), the settings of the results.
fn context(settings: &Settings, client: &mut Client) -> Result<Context, JobError> {
    let archive = Archive::open(&settings.archive, &settings.data_dir)?;
    let written: Option<String> =
        client.query_one("SELECT location FROM adclick_archive", &[])?.get(0);
    if let Some(written) = written.filter(|w| *w != archive.location()) {
        return Err(JobError::NotArchived(format!(
            "the archive role writes to {written}, but this command reads {}: give it the same \
             `archive` setting (and data directory, for a relative path)",
            archive.location()
        )));
    }
    Ok(Context {
        archive: Arc::new(archive),
        engine: settings.engine.clone(),
        filters: Arc::new(settings.filters.clone()),
    })
}

/// How long a job waits for the archive role to make progress: it flushes when asked, within
/// a second or so, unless it is down (or its storage is).
const ARCHIVE_WAIT: Duration = Duration::from_secs(60);

/// The results of a range as one transaction saw them.
struct Snapshot {
    /// Counts and too-late counts summed over partitions.
    rows: RangeRows,
    /// Per partition, the too-late counts of the range: (minute, slot, ad, partition, count).
    too_late: Vec<(i64, i16, String, i32, i64)>,
    /// Per partition, the offset below which every record is reflected in the results.
    next: BTreeMap<PartitionId, u64>,
    /// Why the live path could still write the range, if it could.
    open: Option<ReplaceError>,
}

/// A partition's row as a job reads it.
struct PartRow {
    watermark: Watermark,
    engine_watermark: Watermark,
    next_offset: i64,
    rolled_through: i64,
}

const PARTITIONS: &str = "SELECT partition, watermark, engine_watermark, next_offset, \
                          rolled_through FROM adclick_partitions ORDER BY partition";

fn part_rows(rows: &[postgres::Row]) -> BTreeMap<PartitionId, PartRow> {
    rows.iter()
        .map(|r| {
            let p = PartitionId(r.get::<_, i32>(0) as u32);
            let row = PartRow {
                watermark: Watermark::from_raw(r.get(1)),
                engine_watermark: Watermark::from_raw(r.get(2)),
                next_offset: r.get(3),
                rolled_through: r.get(4),
            };
            (p, row)
        })
        .collect()
}

/// A read-only REPEATABLE READ transaction, and every partition's row as it sees them: what it
/// reads next is consistent with those offsets.
fn begin_snapshot(
    client: &mut Client,
) -> Result<(postgres::Transaction<'_>, BTreeMap<PartitionId, PartRow>), JobError> {
    let mut tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    let parts = part_rows(&tx.query(PARTITIONS, &[])?);
    Ok((tx, parts))
}

/// Per partition, the offset below which every record is reflected in the results.
fn next_offsets(parts: &BTreeMap<PartitionId, PartRow>) -> BTreeMap<PartitionId, u64> {
    parts.iter().map(|(p, r)| (*p, r.next_offset.max(0) as u64)).collect()
}

/// Why the live path can still write minutes before `to`, if it can: the topic's watermark
/// (the lowest of every partition's) must have sealed them, and so must each engine that has
/// counted a click. A partition that never delivered one holds no rows a job would replace.
fn open(
    parts: &BTreeMap<PartitionId, PartRow>,
    partitions: u32,
    to: Minute,
    lateness_ms: i64,
) -> Option<ReplaceError> {
    let all = (0..partitions).all(|p| parts.contains_key(&PartitionId(p)));
    let topic = match parts.values().map(|r| r.watermark.to_raw()).min() {
        Some(w) if all => Watermark::from_raw(w),
        _ => Watermark::NONE,
    };
    crate::store::sealed(topic, to, lateness_ms).err().or_else(|| {
        parts
            .values()
            .filter(|r| r.engine_watermark != Watermark::NONE)
            .find_map(|r| crate::store::sealed(r.engine_watermark, to, lateness_ms).err())
    })
}

/// The results of `[from, to)` with `slots` values a row (the total and each filter).
fn snapshot(
    client: &mut Client,
    (from, to): (Minute, Minute),
    slots: usize,
    partitions: u32,
    lateness_ms: i64,
) -> Result<Snapshot, JobError> {
    let (mut tx, parts) = begin_snapshot(client)?;
    let mut rows = RangeRows::default();
    for r in tx.query(
        "SELECT minute, ad_id, slot, sum(count)::bigint FROM adclick_counts \
         WHERE minute >= $1 AND minute < $2 GROUP BY minute, ad_id, slot ORDER BY minute, ad_id, slot",
        &[&from.0, &to.0],
    )? {
        let key = (r.get::<_, i64>(0), r.get::<_, String>(1));
        let (slot, n): (i16, i64) = (r.get(2), r.get(3));
        if rows.counts.last().is_none_or(|(k, _)| *k != key) {
            rows.counts.push((key, vec![0; slots]));
        }
        if let Some(v) = rows.counts.last_mut().expect("pushed").1.get_mut(slot as usize) {
            *v = n as u64;
        }
    }
    let mut too_late = Vec::new();
    for r in tx.query(
        "SELECT minute, slot, ad_id, partition, count FROM adclick_too_late \
         WHERE minute >= $1 AND minute < $2",
        &[&from.0, &to.0],
    )? {
        let row: (i64, i16, String, i32, i64) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let sum = rows.too_late.entry((row.0, row.2.clone())).or_insert_with(|| vec![0; slots]);
        if let Some(v) = sum.get_mut(row.1 as usize) {
            *v += row.4 as u64;
        }
        too_late.push(row);
    }
    tx.commit()?;
    Ok(Snapshot {
        rows,
        too_late,
        next: next_offsets(&parts),
        open: open(&parts, partitions, to, lateness_ms),
    })
}

/// Waits until the archive role has archived every partition up to `next`, asking it to flush
/// (every second) and giving up after `wait` without progress.
fn await_archived(
    client: &mut Client,
    next: &BTreeMap<PartitionId, u64>,
    wait: Duration,
) -> Result<(), JobError> {
    let mut progress = Instant::now();
    let mut told = false;
    let mut asked: Option<Instant> = None;
    let mut last: Option<BTreeMap<PartitionId, u64>> = None;
    loop {
        let archived: BTreeMap<PartitionId, u64> = client
            .query("SELECT partition, next_offset FROM adclick_archive_offsets", &[])?
            .iter()
            .map(|r| (PartitionId(r.get::<_, i32>(0) as u32), r.get::<_, i64>(1).max(0) as u64))
            .collect();
        if last.as_ref() != Some(&archived) {
            progress = Instant::now();
            last = Some(archived.clone());
        }
        let behind: Vec<(PartitionId, u64, u64)> = next
            .iter()
            .map(|(p, n)| (*p, archived.get(p).copied().unwrap_or(0), *n))
            .filter(|(_, a, n)| a < n)
            .collect();
        let Some(&(p, a, n)) = behind.first() else { return Ok(()) };
        if progress.elapsed() >= wait {
            return Err(JobError::NotArchived(format!(
                "the archive holds partition {} up to offset {a}, but the results reflect it up \
                 to {n} ({} partitions behind, no progress for {wait:?}): is a process with the \
                 archive role running?",
                p.0,
                behind.len()
            )));
        }
        // The archive role flushes when asked (and on its own every `archive_flush_interval`).
        if asked.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            client
                .execute("UPDATE adclick_archive SET flush_requested = flush_requested + 1", &[])?;
            asked = Some(Instant::now());
        }
        if !told {
            tracing::info!(
                partitions = behind.len(),
                "waiting for the archive role to archive what the results reflect"
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Replaces the range with the recomputation in one transaction (see the module doc).
fn replace(
    client: &mut Client,
    rec: &Recomputed,
    snap: &Snapshot,
    partitions: u32,
    lateness_ms: i64,
) -> Result<Replaced, JobError> {
    let (from, to) = (rec.from.0, rec.to.0);
    // The daily tables the new rows go to, created before the transaction, as a commit does.
    let mut days = Days::new();
    let minutes = || rec.partitions.values().flat_map(|(c, _)| c.iter().map(|((m, _), _)| *m));
    days.ensure(client, "adclick_counts", MINUTES_PER_DAY, minutes())?;
    days.ensure(client, "adclick_hours", HOURS_PER_DAY, minutes().map(|m| m.div_euclid(60)))?;
    let tops = || rec.partitions.values().flat_map(|(_, t)| t.iter());
    days.ensure(client, "adclick_tops", MINUTES_PER_DAY, tops().map(|t| t.minute.0))?;

    let mut tx = client.transaction()?;
    // Every partition's row locked: a live commit, which locks its own first, waits.
    let parts = part_rows(&tx.query(&format!("{PARTITIONS} FOR UPDATE"), &[])?);
    if let Some(open) = open(&parts, partitions, rec.to, lateness_ms) {
        return Err(open.into());
    }
    let mut replaced = Replaced {
        rows_before: tx
            .query_one(
                "SELECT count(*) FROM (SELECT DISTINCT minute, ad_id FROM adclick_counts \
                 WHERE minute >= $1 AND minute < $2) t",
                &[&from, &to],
            )?
            .get::<_, i64>(0) as u64,
        rows_after: rec.counts.len() as u64,
        ..Replaced::default()
    };
    tx.execute("DELETE FROM adclick_counts WHERE minute >= $1 AND minute < $2", &[&from, &to])?;
    tx.execute("DELETE FROM adclick_tops WHERE minute >= $1 AND minute < $2", &[&from, &to])?;
    for (p, (counts, tops)) in &rec.partitions {
        let part = p.0 as i32;
        insert_counts(&mut tx, part, counts)?;
        for t in tops {
            let ids: Vec<&str> = t.ads.iter().map(|r| r.0.as_str()).collect();
            let counts: Vec<i64> = t.ads.iter().map(|r| r.1 as i64).collect();
            tx.execute(
                "INSERT INTO adclick_tops (minute, slot, partition, ad_ids, counts) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[&t.minute.0, &(t.slot.index() as i16), &part, &ids, &counts],
            )?;
            replaced.tops += 1;
        }
    }
    // The snapshot's too-late clicks are counted now (remembered as such, for `explain`); any
    // found too late since keep theirs.
    for chunk in snap.too_late.chunks(WRITE_ROWS) {
        let col = |f: fn(&(i64, i16, String, i32, i64)) -> i64| -> Vec<i64> {
            chunk.iter().map(f).collect()
        };
        let slots: Vec<i16> = chunk.iter().map(|r| r.1).collect();
        let ads: Vec<&str> = chunk.iter().map(|r| r.2.as_str()).collect();
        let parts: Vec<i32> = chunk.iter().map(|r| r.3).collect();
        tx.execute(
            "UPDATE adclick_too_late l SET count = l.count - s.c, recounted = l.recounted + s.c \
             FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::int[], $5::bigint[]) AS s(m, sl, a, p, c) \
             WHERE l.minute = s.m AND l.slot = s.sl AND l.ad_id = s.a AND l.partition = s.p",
            &[&col(|r| r.0), &slots, &ads, &parts, &col(|r| r.4)],
        )?;
    }
    // Hours already rolled hold the old counts of their minutes: summed again from the new.
    for (p, row) in &parts {
        if row.rolled_through <= from {
            continue;
        }
        let (h_lo, h_hi) = (from.div_euclid(60), (to.min(row.rolled_through) - 1).div_euclid(60));
        let part = p.0 as i32;
        tx.execute(
            "DELETE FROM adclick_hours WHERE partition = $1 AND hour >= $2 AND hour <= $3",
            &[&part, &h_lo, &h_hi],
        )?;
        tx.execute(
            "INSERT INTO adclick_hours (hour, slot, ad_id, partition, count) \
             SELECT floor(minute::numeric / 60)::bigint, slot, ad_id, partition, sum(count) \
             FROM adclick_counts WHERE partition = $1 AND minute >= $2 AND minute < $3 \
             GROUP BY 1, 2, 3, 4",
            &[&part, &(h_lo * 60), &((h_hi + 1) * 60).min(row.rolled_through)],
        )?;
    }
    crate::fault::point("pg.mid_replace");
    tx.commit()?;
    Ok(replaced)
}

/// Writes one partition's rows (a row per slot with clicks).
fn insert_counts(
    tx: &mut postgres::Transaction<'_>,
    part: i32,
    counts: &CountRows,
) -> Result<(), JobError> {
    let cells = counts.iter().flat_map(|((minute, ad), c)| {
        c.iter().enumerate().filter(|(_, &n)| n > 0).map(move |(slot, &n)| (*minute, slot, ad, n))
    });
    let cells: Vec<(i64, usize, &String, u64)> = cells.collect();
    for chunk in cells.chunks(WRITE_ROWS) {
        let minutes: Vec<i64> = chunk.iter().map(|c| c.0).collect();
        let slots: Vec<i16> = chunk.iter().map(|c| c.1 as i16).collect();
        let ads: Vec<&str> = chunk.iter().map(|c| c.2.as_str()).collect();
        let counts: Vec<i64> = chunk.iter().map(|c| c.3 as i64).collect();
        tx.execute(
            "INSERT INTO adclick_counts (minute, slot, ad_id, partition, count) \
             SELECT m, s, a, $5, c FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::bigint[]) AS t(m, s, a, c)",
            &[&minutes, &slots, &ads, &counts, &part],
        )?;
    }
    Ok(())
}
