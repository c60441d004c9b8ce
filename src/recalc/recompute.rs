//! Recomputation of a range from the archive: a chunk of whole hours at a time, each flush's
//! rows merged into log order and fed to fresh engines (see the module doc of `recalc`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use rayon::prelude::*;

use super::{Context, JobError, Progress};
use crate::archive::{ArchiveError, ArchiveFile};
use crate::engine::{Engine, Offset, Output, PartitionId, Payload, Record, TopUpdate};
use crate::event::{AdId, EventTime, Minute, MINUTE_MS};
use crate::store::CountRows;

const HOUR_MS: i64 = 3_600_000;

/// Archive bytes a chunk covers at most, unless one hour holds more (about 15 M clicks: the
/// engine then holds about 0.5 GB of dedup state).
const CHUNK_BYTES: u64 = 256 << 20;

/// Records per engine batch: bounded buffers, whatever a flush holds.
const ENGINE_BATCH: usize = 1 << 16;

/// Most decoded archive rows kept between chunks (about 100 bytes each).
const CACHE_ROWS: usize = 20_000_000;

/// Which archived clicks a recomputation reads, and how it groups them.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// One engine per source partition, as the scaled-out aggregators count (dedup, windows and
    /// top-N within a partition); otherwise one engine for all, as the embedded aggregator.
    pub per_partition: bool,
    /// Per partition, the offset below which clicks are read (the committed offsets of one
    /// snapshot of the results); `None`: every archived click. A partition not named: none.
    pub below: Option<BTreeMap<PartitionId, u64>>,
}

impl Scope {
    /// Whether the click at `offset` of partition `p` is read.
    pub fn reads(&self, p: PartitionId, offset: Offset) -> bool {
        self.below.as_ref().is_none_or(|b| b.get(&p).is_some_and(|end| offset.0 < *end))
    }
}

/// The recomputed results of `[from, to)`.
#[derive(Debug, Default)]
pub struct Recomputed {
    pub from: Minute,
    pub to: Minute,
    /// Only rows with clicks, summed over partitions.
    pub counts: CountRows,
    /// The one engine's top-N lists (without `Scope::per_partition`).
    pub tops: Vec<TopUpdate>,
    /// With `Scope::per_partition`: each partition's rows and top-N lists.
    pub partitions: BTreeMap<PartitionId, (CountRows, Vec<TopUpdate>)>,
    pub progress: Progress,
}

/// The engine a record goes to: its partition's, or (`None`) the one engine.
type Key = Option<PartitionId>;

/// Recomputes `[from, to)` from the archive (see the module doc).
pub fn recompute(
    ctx: &Context,
    scope: &Scope,
    from: Minute,
    to: Minute,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Recomputed, JobError> {
    if from >= to {
        return Err(JobError::EmptyRange);
    }
    // Settings checked once: every engine below is made from them.
    Engine::recompute(ctx.engine.clone(), ctx.filters.clone())?;
    let new_engine =
        || Engine::recompute(ctx.engine.clone(), ctx.filters.clone()).expect("settings checked");
    let started = Instant::now();
    let horizon = ctx.engine.dedup_horizon_ms;
    let mut out = Recomputed { from, to, ..Recomputed::default() };
    out.progress.minutes_total = to.0 - from.0;
    let mut tops: BTreeMap<(Key, Minute, usize), TopUpdate> = BTreeMap::new();
    // Decoded files of the hours the next chunk's horizon reaches back into, read once.
    let mut cache: HashMap<String, Arc<Vec<RecordBatch>>> = Default::default();
    let mut a = from.start().0;
    // `ADCLICK_RECALC_CHUNK_BYTES` overrides the chunk size (tests: one hour per chunk).
    let chunk_bytes = std::env::var("ADCLICK_RECALC_CHUNK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CHUNK_BYTES);
    // The hours that hold files, listed once: the range's empty hours cost nothing (a range of
    // centuries lists the dates the archive holds, not every hour of it).
    let present = ctx.archive.hours_with_files(
        (from.start().0 - horizon).div_euclid(HOUR_MS),
        (to.start().0 + horizon).div_euclid(HOUR_MS),
    )?;
    // Every hour's files, listed once.
    let mut listed: HashMap<i64, Vec<ArchiveFile>> = HashMap::new();
    let mut files_of = |hour: i64| -> Result<Vec<ArchiveFile>, ArchiveError> {
        if !present.contains(&hour) {
            return Ok(Vec::new());
        }
        if let Some(f) = listed.get(&hour) {
            return Ok(f.clone());
        }
        let f = ctx.archive.files_of_hour(hour)?;
        listed.insert(hour, f.clone());
        Ok(f)
    };
    // The start of the next hour after `hour` that holds files (or the range's end).
    let next_with_files = |hour: i64| {
        present.range(hour + 1..).next().map_or(i64::MAX, |h| h * HOUR_MS).min(to.start().0)
    };
    while a < to.start().0 {
        // A chunk is whole hours up to about CHUNK_BYTES of archive files: each chunk reads the
        // horizons around it again, so longer chunks read less twice, shorter ones hold less.
        // Hours without files join the chunk at no cost.
        let hour_end = |t: i64| ((t.div_euclid(HOUR_MS) + 1) * HOUR_MS).min(to.start().0);
        let mut b = hour_end(a).max(next_with_files(a.div_euclid(HOUR_MS)));
        let mut bytes: u64 = files_of(a.div_euclid(HOUR_MS))?.iter().map(|f| f.size).sum();
        while b < to.start().0 {
            let next: u64 = files_of(b.div_euclid(HOUR_MS))?.iter().map(|f| f.size).sum();
            if bytes + next > chunk_bytes {
                break;
            }
            bytes += next;
            b = hour_end(b).max(next_with_files(b.div_euclid(HOUR_MS)));
        }
        let (lo, hi) = (a - horizon, b + horizon);
        // Every file of the hours the chunk and its horizons touch, grouped by flush.
        let mut flushes: BTreeMap<u64, Vec<ArchiveFile>> = BTreeMap::new();
        let hours: Vec<i64> =
            present.range(lo.div_euclid(HOUR_MS)..=(hi - 1).div_euclid(HOUR_MS)).copied().collect();
        for hour in hours {
            for f in files_of(hour)? {
                flushes.entry(f.seq).or_default().push(f);
            }
        }
        let mut engines: BTreeMap<Key, Engine> = BTreeMap::new();
        // The chunk's counts by (minute, engine) and ad: updated in place, found by the ad's
        // text, no allocation per update.
        let mut counts: ChunkCounts = ChunkCounts::default();
        let mut keep = |key: Key, output: Output| {
            for (minute, ad, c) in output.counts.iter() {
                if minute.start().0 < a || minute.start().0 >= b {
                    continue;
                }
                let per = counts.entry((minute, key)).or_default();
                match per.get_mut(ad.as_str()) {
                    Some(row) => row.copy_from_slice(c),
                    None => {
                        per.insert(ad.clone(), c.to_vec());
                    }
                }
            }
            for t in output.top {
                if t.minute.start().0 >= a && t.minute.start().0 < b {
                    tops.insert((key, t.minute, t.slot.index()), t);
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
            let flush = Flush { files, decoded: &decoded, lo, hi, scope };
            let (next, events) = rayon::join(
                || order.get(i + 1).map(|f| decode(f)).transpose(),
                || flush.feed(&mut engines, &new_engine, &mut keep),
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
        for (key, mut engine) in std::mem::take(&mut engines) {
            keep(key, engine.finish(EventTime(hi)));
        }
        rows_of_chunk(counts, &mut out);
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
    for ((key, _, _), t) in tops {
        match key {
            Some(p) => out.partitions.entry(p).or_default().1.push(t),
            None => out.tops.push(t),
        }
    }
    Ok(out)
}

/// A chunk's counts: (minute, engine) → ad → counts per slot.
type ChunkCounts = hashbrown::HashMap<(Minute, Key), hashbrown::HashMap<AdId, Vec<u64>>>;

/// Adds one chunk's rows with clicks to `out`, sorted: summed over engines, and per partition.
/// Chunks come in time order, so each chunk's sorted rows extend the sorted whole.
fn rows_of_chunk(counts: ChunkCounts, out: &mut Recomputed) {
    let mut summed: hashbrown::HashMap<(i64, String), Vec<u64>> = hashbrown::HashMap::new();
    let mut parts: BTreeMap<PartitionId, CountRows> = BTreeMap::new();
    let rows = counts.into_iter().flat_map(|((minute, key), ads)| {
        ads.into_iter().map(move |(ad, c)| ((minute, ad, key), c))
    });
    for ((minute, ad, key), c) in rows {
        if c.iter().all(|&v| v == 0) {
            continue;
        }
        let k = (minute.0, ad.as_str().to_string());
        if let Some(p) = key {
            parts.entry(p).or_default().push((k.clone(), c.clone()));
        }
        match summed.get_mut(&k) {
            Some(row) => row.iter_mut().zip(&c).for_each(|(s, v)| *s += v),
            None => {
                summed.insert(k, c);
            }
        }
    }
    let mut rows: CountRows = summed.into_iter().collect();
    rows.par_sort_unstable_by(|x, y| x.0.cmp(&y.0));
    out.counts.extend(rows);
    for (p, mut rows) in parts {
        rows.par_sort_unstable_by(|x, y| x.0.cmp(&y.0));
        out.partitions.entry(p).or_default().0.extend(rows);
    }
}

/// One flush's decoded files, and which of their clicks to read.
struct Flush<'a> {
    files: &'a [ArchiveFile],
    decoded: &'a [Arc<Vec<RecordBatch>>],
    /// Event times `[lo, hi)`: the chunk and its horizons.
    lo: i64,
    hi: i64,
    scope: &'a Scope,
}

impl Flush<'_> {
    /// Feeds the flush's clicks to the engines in log order; returns how many.
    fn feed(
        &self,
        engines: &mut BTreeMap<Key, Engine>,
        new_engine: &(dyn Fn() -> Engine + Sync),
        keep: &mut (dyn FnMut(Key, Output) + Send),
    ) -> Result<u64, ArchiveError> {
        let (lo, hi, scope) = (self.lo, self.hi, self.scope);
        // Each record batch's clicks in the chunk and its horizons; each is in log order.
        let runs = self
            .files
            .par_iter()
            .zip(self.decoded)
            .flat_map_iter(|(f, batches)| batches.iter().map(move |batch| (f, batch)))
            .map(|(f, batch)| {
                let mut rows = crate::archive::clicks(batch).map_err(|e| {
                    ArchiveError::Format(format!("archive file {}: {e}", f.location))
                })?;
                rows.retain(|(p, o, c)| c.time.0 >= lo && c.time.0 < hi && scope.reads(*p, *o));
                Ok(rows)
            })
            .collect::<Result<Vec<_>, ArchiveError>>()?;
        // One flush's files hold disjoint offset ranges per partition: merging the runs by
        // (partition, offset) gives each partition's records in offset order, as the live path
        // read them, one partition after another. The engines get them in bounded batches (the
        // result does not depend on where batches are cut).
        let mut heads: Vec<_> = runs.into_iter().map(|r| r.into_iter().peekable()).collect();
        let mut heap: BinaryHeap<Reverse<((PartitionId, Offset), usize)>> = heads
            .iter_mut()
            .enumerate()
            .filter_map(|(i, h)| h.peek().map(|(p, o, _)| Reverse(((*p, *o), i))))
            .collect();
        let mut batch: Vec<Record<'_>> = Vec::with_capacity(ENGINE_BATCH);
        let mut batch_key: Key = None;
        let mut events = 0;
        let mut run = |key: Key, batch: &mut Vec<Record<'_>>| {
            events += batch.len() as u64;
            let engine = engines.entry(key).or_insert_with(new_engine);
            keep(
                key,
                engine.process_with(EventTime(hi), batch, |work| {
                    work.into_par_iter().map(|(shard, b)| shard.apply(b)).collect()
                }),
            );
            batch.clear();
        };
        while let Some(Reverse((_, i))) = heap.pop() {
            let (partition, offset, click) = heads[i].next().expect("peeked");
            let key = self.scope.per_partition.then_some(partition);
            if key != batch_key && !batch.is_empty() {
                run(batch_key, &mut batch);
            }
            batch_key = key;
            batch.push(Record { partition, offset, payload: Payload::Click(click) });
            if let Some((p, o, _)) = heads[i].peek() {
                heap.push(Reverse(((*p, *o), i)));
            }
            if batch.len() == ENGINE_BATCH || heap.is_empty() {
                run(batch_key, &mut batch);
            }
        }
        Ok(events)
    }
}
