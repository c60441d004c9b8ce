//! The aggregator thread: every `commit_interval` it reads what the log made durable, runs the
//! engine's shards on a fixed pool, and commits results, offsets and the batch's journal entry
//! in one store transaction (with a checkpoint every `checkpoint_interval`, written off the
//! commit path), then publishes the commit to queries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::writer::ToWriter;
use super::QueryState;
use crate::engine::{Engine, Offset, OffsetRange, PartitionId, Payload, Record, Watermark};
use crate::event::{wire, EventTime, Minute, MINUTE_MS};
use crate::fault::fatal;
use crate::log::{read_ranges, LogHandle, Reader, Records};
use crate::popular::{Published, MAX_WINDOW_MINUTES};
use crate::store::{
    BatchRecord, CheckpointError, CheckpointFile, CheckpointRecord, Store, StoreError,
};
use crate::telemetry::AggregatorReport;

/// Most records one aggregator batch reads per partition.
const MAX_BATCH_PER_PARTITION: usize = 100_000;

pub(super) struct Aggregator {
    pub(super) engine: Engine,
    /// The fixed pool of OS threads the engine's shards run on (one per shard).
    pub(super) pool: rayon::ThreadPool,
    pub(super) store: Arc<Store>,
    pub(super) log: LogHandle,
    pub(super) query: Arc<QueryState>,
    pub(super) writer: SyncSender<ToWriter>,
    /// Per partition: the next offset to read.
    pub(super) next: Vec<u64>,
    pub(super) seq: u64,
    pub(super) commit_interval: Duration,
    pub(super) checkpoint_interval: Duration,
    pub(super) lateness_ms: i64,
    pub(super) readers: Vec<Reader>,
    pub(super) buf: Vec<Records>,
    /// The offsets of the previous checkpoint: the log is kept from there, so that a start can
    /// fall back to it.
    pub(super) previous_checkpoint: Option<Vec<(PartitionId, Offset)>>,
    /// The files of the newest checkpoint taken: the next one keeps those still retained.
    pub(super) manifest: Vec<CheckpointFile>,
    /// A checkpoint whose file is being written (one at a time), recorded by the first commit
    /// after its file is durable.
    pub(super) pending: Option<PendingCheckpoint>,
    /// The next checkpoint holds the whole state (one before it was never written).
    pub(super) full_next: bool,
    /// Set when the service stops (a commit that cannot be made then is given up).
    pub(super) shutdown: Arc<AtomicBool>,
}

/// A checkpoint taken, its file written on its own thread (encoding is on the aggregator
/// thread and follows what changed; writing and fsync are not on the commit path).
pub(super) struct PendingCheckpoint {
    taken: TakenCheckpoint,
    /// The manifest before this checkpoint, restored if its file cannot be written.
    previous_manifest: Vec<CheckpointFile>,
    writing: JoinHandle<Result<(), CheckpointError>>,
}

pub(super) struct TakenCheckpoint {
    record: CheckpointRecord,
    /// The engine's offsets when it was taken.
    offsets: Vec<(PartitionId, Offset)>,
    bytes: u64,
}

impl PendingCheckpoint {
    /// Waits for its file to be durable. A file that could not be written (a full disk) is
    /// given up: nothing names it, the journal keeps what it would have covered, and the next
    /// checkpoint is a full one (the engine counted this one's changes as written).
    fn written(self, agg: &mut Aggregator) -> Option<TakenCheckpoint> {
        match self.writing.join().expect("the checkpoint thread does not panic") {
            Ok(()) => Some(self.taken),
            Err(e) => {
                tracing::warn!("writing a checkpoint: {e}; the next one is taken in full");
                agg.store.discard_checkpoint(self.taken.record.seq);
                agg.manifest = self.previous_manifest;
                agg.full_next = true;
                None
            }
        }
    }
}

impl Aggregator {
    pub(super) fn run(&mut self, shutdown: &AtomicBool) {
        let mut last_checkpoint = Instant::now();
        let mut last_commit = Instant::now();
        loop {
            crate::fault::stall("aggregator.stall");
            let stopping = shutdown.load(Ordering::Acquire);
            let started = Instant::now();
            let ranges: Vec<OffsetRange> = (0..self.next.len())
                .map(|p| {
                    let id = PartitionId(p as u32);
                    let from = self.next[p];
                    let to = self.log.durable_end(id).0.min(from + MAX_BATCH_PER_PARTITION as u64);
                    OffsetRange::new(id, Offset(from), Offset(to))
                })
                .filter(|r| !r.is_empty())
                .collect();
            let wall = EventTime::now().0;
            // A checkpoint whose file is durable is recorded by this commit; when stopping, the
            // one being written is waited for.
            let written = match &self.pending {
                Some(p) => stopping || p.writing.is_finished(),
                None => false,
            };
            let checkpoint_due = self.pending.is_none()
                && (last_checkpoint.elapsed() >= self.checkpoint_interval || stopping);
            if ranges.is_empty() && !checkpoint_due && !written {
                // A tick without records changes only the watermark, and how depends on the
                // ticks before it: so every tick that runs is committed (journaled), and ticks
                // not worth a commit are not run. One runs at once when a minute turns final,
                // otherwise at most once a second.
                let current = self.engine.watermark();
                let next = self.engine.peek_watermark(EventTime(wall));
                let minute = |w: Watermark| w.ms().map(|w| w.div_euclid(MINUTE_MS));
                let due = next != current
                    && (minute(next) > minute(current)
                        || last_commit.elapsed() >= Duration::from_secs(1));
                if !due {
                    std::thread::sleep(self.commit_interval.saturating_sub(started.elapsed()));
                    continue;
                }
            }
            if let Err(e) = read_ranges(&mut self.readers, &mut self.buf, &ranges) {
                fatal("reading the log", e);
            }
            let output = {
                let records = match decode_records(&self.buf, &ranges) {
                    Ok(records) => records,
                    Err(e) => fatal("reading the log", e),
                };
                let pool = &self.pool;
                self.engine.process_with(EventTime(wall), &records, |work| run_shards(pool, work))
            };
            let mut record = None;
            if written {
                record = self.pending.take().and_then(|p| p.written(self));
            }
            if checkpoint_due {
                let taken = self.take_checkpoint();
                if stopping {
                    // The last one is written here and recorded by this very commit.
                    record = taken.written(self);
                } else {
                    self.pending = Some(taken);
                }
                last_checkpoint = Instant::now();
            }
            let batch = BatchRecord { wall, ranges, assign: Vec::new() };
            if let Err(e) = self.commit(&batch, output, record) {
                if e.is_io() && shutdown.load(Ordering::Acquire) {
                    // The log holds the batch; a restart replays it.
                    tracing::warn!("stopping with the last batch uncommitted: {e}");
                    return;
                }
                fatal("committing results", e);
            }
            last_commit = Instant::now();
            if stopping {
                // So that a process opening the store alone reads the open minutes too.
                if let Err(e) = self.store.flush_open() {
                    if e.is_io() {
                        // A restart rebuilds them from the checkpoint and the journal.
                        tracing::warn!("writing the open minutes' counts at the stop: {e}");
                        return;
                    }
                    fatal("writing the open minutes' counts", e);
                }
                return;
            }
            // A full batch means more is waiting: go again at once.
            let full = batch.ranges.iter().any(|r| r.len() == MAX_BATCH_PER_PARTITION as u64);
            if !full {
                std::thread::sleep(self.commit_interval.saturating_sub(started.elapsed()));
            }
        }
    }

    /// Takes an incremental checkpoint after the batch about to be committed (`self.seq`) and
    /// starts writing its file. Its manifest keeps the previous files the engine still retains.
    fn take_checkpoint(&mut self) -> PendingCheckpoint {
        let started = Instant::now();
        let full = std::mem::take(&mut self.full_next);
        let (bytes, extent) =
            if full { self.engine.full_checkpoint() } else { self.engine.checkpoint() };
        let taking = started.elapsed();
        let seq = self.seq;
        let mut files: Vec<CheckpointFile> = if full {
            Vec::new()
        } else {
            self.manifest.iter().copied().filter(|f| self.engine.retains(f.extent)).collect()
        };
        files.push(CheckpointFile { seq, extent });
        let previous_manifest = std::mem::replace(&mut self.manifest, files.clone());
        let store = self.store.clone();
        let len = bytes.len() as u64;
        let writing = std::thread::Builder::new()
            .name("adclick-checkpoint".into())
            .spawn(move || {
                let started = Instant::now();
                let written = store.write_checkpoint(seq, &bytes);
                crate::telemetry::observe(crate::telemetry::CHECKPOINT, taking + started.elapsed());
                written
            })
            .unwrap_or_else(|e| fatal("starting the checkpoint thread", e));
        PendingCheckpoint {
            taken: TakenCheckpoint {
                record: CheckpointRecord { seq, files },
                offsets: self.engine.offsets(),
                bytes: len,
            },
            writing,
            previous_manifest,
        }
    }

    /// Commits a processed batch (results, offsets, journal entry, and a checkpoint whose file
    /// is durable, if any), then makes it visible to queries.
    pub(super) fn commit(
        &mut self,
        batch: &BatchRecord,
        output: crate::engine::Output,
        checkpoint: Option<TakenCheckpoint>,
    ) -> Result<(), crate::store::StoreError> {
        let started = Instant::now();
        self.store_commit(batch, &output, checkpoint.as_ref().map(|c| &c.record))?;
        crate::fault::point("store.after_commit");
        self.seq += 1;
        crate::telemetry::observe(crate::telemetry::COMMIT, started.elapsed());
        let q = &self.query;
        q.rows_written.fetch_add(output.counts.len() as u64, Ordering::Relaxed);
        for r in &batch.ranges {
            self.next[r.partition.0 as usize] = r.to.0;
        }
        self.publish(output);
        if let Some(checkpoint) = checkpoint {
            crate::fault::point("aggregator.after_checkpoint");
            let q = &self.query;
            q.checkpoint_bytes.store(checkpoint.bytes, Ordering::Relaxed);
            q.checkpoint_written_bytes.fetch_add(checkpoint.bytes, Ordering::Relaxed);
            // The log is kept from the previous checkpoint on, for a fallback to it, and from
            // what the archiver has not archived yet.
            if let Some(previous) = self.previous_checkpoint.replace(checkpoint.offsets) {
                let below = previous
                    .into_iter()
                    .map(|(p, o)| {
                        let archived = self.query.archived[p.0 as usize].load(Ordering::Acquire);
                        (p, Offset(o.0.min(archived)))
                    })
                    .collect();
                let _ = self.writer.try_send(ToWriter::DeleteBelow(below));
            }
        }
        Ok(())
    }

    /// Commits a batch, retrying while the disk refuses (a full disk): the same batch is
    /// committed again, with backoff, while health and metrics say why. Gives up
    /// on other failures, and on a disk failure once the service is stopping.
    fn store_commit(
        &mut self,
        batch: &BatchRecord,
        output: &crate::engine::Output,
        checkpoint: Option<&CheckpointRecord>,
    ) -> Result<(), StoreError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.store.commit(self.seq, batch, output, checkpoint) {
                Ok(()) => {
                    if self.query.set_stalled(None) {
                        tracing::info!("results are committed again");
                    }
                    return Ok(());
                }
                Err(e) if e.is_io() => {
                    if !self.query.set_stalled(Some(format!("committing results: {e}"))) {
                        tracing::warn!("committing results: {e}; retrying until the disk takes it");
                    }
                    if self.shutdown.load(Ordering::Acquire) {
                        return Err(e);
                    }
                    // The next attempt reopens the store (see `Store::begin_write`).
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes a committed batch visible to queries.
    fn publish(&self, output: crate::engine::Output) {
        for (p, o) in &output.offsets {
            self.query.committed[p.0 as usize].store(o.0, Ordering::Release);
        }
        let before = self.query.watermark.swap(output.watermark);
        crate::telemetry::observe_final(before, output.watermark, EventTime::now().0);
        let mut report = AggregatorReport::default();
        report.add_engine(&self.engine);
        *self.query.report.lock().expect("not poisoned") = report;
        self.query.live.publish(Published {
            counts: output.counts,
            watermark: output.watermark,
            sealed_below: self.sealed_below(),
            keep_from: recent_window_start(),
        });
    }
}

/// The oldest minute popular-ads queries can reach (their longest window, plus an hour of slack
/// for `to` in the past); older minutes leave the in-memory index.
pub(super) fn recent_window_start() -> Minute {
    Minute(EventTime::now().minute().0 - i64::from(MAX_WINDOW_MINUTES) - 60)
}

/// Runs each shard's batch on the pool; outputs in shard order.
pub(super) fn run_shards(
    pool: &rayon::ThreadPool,
    work: Vec<(&mut crate::engine::Shard, crate::engine::ShardBatch)>,
) -> Vec<crate::engine::ShardOutput> {
    use rayon::prelude::*;
    pool.install(|| work.into_par_iter().map(|(shard, batch)| shard.apply(batch)).collect())
}

/// Decodes what `read_ranges` read into engine records, in journal order. Only the collector
/// writes the log, with `wire::encode`, behind a CRC: a record that does not decode is damage or
/// a bug, and skipping it would lose an acknowledged click, so it is an error.
pub(super) fn decode_records<'a>(
    buf: &'a [Records],
    ranges: &[OffsetRange],
) -> Result<Vec<Record<'a>>, String> {
    let mut out = Vec::new();
    for r in ranges {
        let p = r.partition;
        for (offset, bytes) in buf[p.0 as usize].iter() {
            match wire::decode(bytes) {
                Some(click) => {
                    out.push(Record { partition: p, offset, payload: Payload::Click(click) })
                }
                None => {
                    return Err(format!(
                    "partition {} offset {}: the log record ({} bytes) does not decode as a click",
                    p.0,
                    offset.0,
                    bytes.len()
                ))
                }
            }
        }
    }
    Ok(out)
}
