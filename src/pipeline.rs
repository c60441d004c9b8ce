//! The embedded service's moving parts: threads, channels and the atomic commit that tie the
//! log, the engine and the store together.
//!
//! ```text
//!  HTTP collector ──Append──▶ log writer thread ── fdatasync ──▶ durable end per partition
//!   (validates,     (bounded    group commit: drain every           │
//!    encodes)        channel)   pending append, write, one sync,    │ reads durable records only
//!                               answer all waiting clients          ▼
//!                                                  aggregator thread: every commit_interval
//!                                                  Engine::process_with: shards on a fixed pool
//!                                                  → one store transaction: counts, tops,
//!                                                    offsets, watermark, journal | checkpoint
//!                                                  → QueryState (popular index, watermark)
//! ```
//!
//! Exactly once: the collector acknowledges only durable records; the aggregator commits results
//! with the offsets that produced them and the batch journal (see `store`), and on start restores
//! the last checkpoint and replays the journal with its recorded wall-clock times, ending exactly
//! at the committed offsets. A resent batch is deduplicated by identity. Bad input never reaches
//! the log. A failed fsync or store commit stops the process (`exit 70`): restart recovers.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Settings;
use crate::engine::{
    CountUpdates, Counters, Engine, EngineConfig, Offset, PartitionId, Payload, Record, Watermark,
};
use crate::event::{wire, EventTime, IdentityKey, Minute, MINUTE_MS};
use crate::filter::Filters;
use crate::log::{LogHandle, Records, Writer};
use crate::popular::{Popular, MAX_WINDOW_MINUTES};
use crate::store::{BatchRecord, CheckpointFile, CheckpointRecord, Store};

/// Most records one aggregator batch reads per partition.
const MAX_BATCH_PER_PARTITION: usize = 100_000;

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Stops the process after an unrecoverable storage failure: the state on disk is consistent,
/// a restart recovers from it; going on could acknowledge what is not durable.
fn fatal(what: &str, err: impl std::fmt::Display) -> ! {
    tracing::error!("{what}: {err}; stopping so that a restart recovers from disk");
    eprintln!("adclick: fatal: {what}: {err}");
    std::process::exit(70)
}

enum ToWriter {
    Append {
        parts: Vec<(PartitionId, Vec<Vec<u8>>)>,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    DeleteBelow(Vec<(PartitionId, Offset)>),
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub rejected: [AtomicU64; crate::event::InvalidKind::ALL.len()],
    /// Count rows (minute, ad) committed.
    pub rows_written: AtomicU64,
    pub checkpoint_bytes: AtomicU64,
    /// Bytes of checkpoint files written, cumulative.
    pub checkpoint_written_bytes: AtomicU64,
    /// The dedup state at the last commit: identities, and bytes in memory.
    pub dedup_entries: AtomicU64,
    pub dedup_bytes: AtomicU64,
    pub open_windows: AtomicU64,
}

impl Metrics {
    /// Copies the collector's totals into the recorder.
    pub fn export(&self) {
        use crate::telemetry::{self as t, set_counter};
        set_counter(t::ACCEPTED, self.accepted.load(Ordering::Relaxed));
        for kind in crate::event::InvalidKind::ALL {
            metrics::counter!(t::INVALID, "reason" => kind.label())
                .absolute(self.rejected[kind.index()].load(Ordering::Relaxed));
        }
    }
}

/// What one committed batch changed, for the in-memory popular-ads index.
struct Published {
    counts: CountUpdates,
    watermark: Watermark,
    /// Minutes below this can no longer be corrected by the live path.
    sealed_below: Minute,
    /// Minutes below this leave the index (older windows are read from the store).
    keep_from: Minute,
}

/// A change to the index: a commit's rows, or a recalculation's. Both carry absolute counts, so
/// applying a change again, in order, after a newer read of the store leaves the same index.
enum Change {
    Commit(Published),
    Replace(Vec<(Minute, crate::event::AdId, Vec<u64>)>),
}

/// The popular-ads index of recent minutes, one [`Popular`] per slot, with the watermark of the
/// same commits so that a query's `final` matches its counts.
///
/// Publishing never waits for a query: the aggregator appends to `pending` (a short lock) and
/// applies it only if the index is free; a query applies whatever is pending before it reads.
///
/// At start the index is empty and `rebuilding`: queries read the store, changes wait in
/// `pending`, and [`rebuild_popular`] fills the index from the store off the aggregator's path,
/// then applies every change published since it began.
pub struct LiveIndex {
    state: Mutex<LiveState>,
    pending: Mutex<Vec<Change>>,
    rebuilding: AtomicBool,
}

pub struct LiveState {
    /// Total, then each filter.
    pub slots: Vec<Popular>,
    pub watermark: Watermark,
    /// The oldest minute the index holds; older windows are answered from the store.
    pub keep_from: Minute,
}

impl LiveState {
    fn apply(&mut self, change: Change) {
        let p = match change {
            Change::Commit(p) => p,
            Change::Replace(changed) => return self.replace(&changed),
        };
        for (slot, index) in self.slots.iter_mut().enumerate() {
            for (minute, ad, counts) in p.counts.iter() {
                if minute < p.keep_from {
                    continue;
                }
                if let Some(&c) = counts.get(slot) {
                    index.set(minute, ad, c);
                }
            }
            index.seal_below(p.sealed_below);
            index.evict_before(p.keep_from);
        }
        self.watermark = self.watermark.max(p.watermark);
        self.keep_from = self.keep_from.max(p.keep_from);
    }

    fn replace(&mut self, changed: &[(Minute, crate::event::AdId, Vec<u64>)]) {
        for (minute, ad, counts) in changed {
            if *minute < self.keep_from {
                continue;
            }
            for (slot, index) in self.slots.iter_mut().enumerate() {
                index.set(*minute, ad, counts.get(slot).copied().unwrap_or(0));
            }
        }
    }
}

impl LiveIndex {
    fn new(slots: usize) -> LiveIndex {
        LiveIndex {
            state: Mutex::new(LiveState {
                slots: (0..slots).map(|_| Popular::new()).collect(),
                watermark: Watermark::NONE,
                // Nothing held yet: every window is read from the store.
                keep_from: Minute(i64::MAX),
            }),
            pending: Mutex::new(Vec::new()),
            rebuilding: AtomicBool::new(true),
        }
    }

    fn publish(&self, p: Published) {
        self.pending.lock().expect("not poisoned").push(Change::Commit(p));
        if self.rebuilding.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut state) = self.state.try_lock() {
            self.drain(&mut state);
        }
    }

    fn drain(&self, state: &mut LiveState) {
        if self.rebuilding.load(Ordering::Acquire) {
            return;
        }
        let pending = std::mem::take(&mut *self.pending.lock().expect("not poisoned"));
        for change in pending {
            state.apply(change);
        }
    }

    /// Applies a recalculation's changes (absolute counts per slot; zeros remove) at once.
    pub fn replace(&self, changed: &[(Minute, crate::event::AdId, Vec<u64>)]) {
        let mut state = self.read();
        if self.rebuilding.load(Ordering::Acquire) {
            // Held with the state lock, which the end of the rebuild takes to apply these.
            let change = Change::Replace(changed.to_vec());
            self.pending.lock().expect("not poisoned").push(change);
            return;
        }
        state.replace(changed);
    }

    /// Ends the rebuild: the index read from the store, then every change since, in order.
    fn install(&self, slots: Vec<Popular>, keep_from: Minute, watermark: Watermark) {
        let mut state = self.state.lock().expect("not poisoned");
        state.slots = slots;
        state.keep_from = keep_from;
        state.watermark = state.watermark.max(watermark);
        self.rebuilding.store(false, Ordering::Release);
        self.drain(&mut state);
    }

    /// The index with every published commit applied. Holding it blocks other queries only.
    pub fn read(&self) -> std::sync::MutexGuard<'_, LiveState> {
        let mut state = self.state.lock().expect("not poisoned");
        self.drain(&mut state);
        state
    }
}

/// What queries read: committed state only.
pub struct QueryState {
    pub store: Arc<Store>,
    pub filters: Arc<Filters>,
    pub live: LiveIndex,
    /// The committed watermark, for health and metrics (`i64::MIN` for none).
    pub watermark: AtomicI64,
    pub counters: Mutex<Counters>,
    pub metrics: Arc<Metrics>,
    pub log: LogHandle,
    /// Per partition: the next offset the aggregator has committed.
    pub committed: Vec<AtomicU64>,
    pub ready: AtomicBool,
    /// Per partition: the next offset the archiver has archived.
    pub archived: Arc<Vec<AtomicU64>>,
    /// What recalculation and reconciliation need from the running service.
    pub recalc: crate::recalc::Context,
    /// Asks the archiver to archive everything durable now.
    pub archive_requests: Mutex<std::sync::mpsc::Sender<crate::archive::FlushRequest>>,
    /// Held while a recalc or reconcile runs: one at a time.
    pub jobs: Mutex<()>,
    /// Each partition's own watermark and idle flag, at the last commit.
    pub partitions: Mutex<Vec<crate::engine::PartitionView>>,
    pub data_dir: std::path::PathBuf,
}

impl QueryState {
    /// Has the archiver archive everything durable now, and waits for it.
    pub fn flush_archive(&self) -> anyhow::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.archive_requests
            .lock()
            .expect("not poisoned")
            .send(tx)
            .map_err(|_| anyhow::anyhow!("the archiver has stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the archiver has stopped"))?
            .map_err(|e| anyhow::anyhow!("archiving: {e}"))
    }

    /// Waits until the aggregator has committed every record durable now (reconciliation
    /// compares stored results with the archive: both must reflect the same clicks).
    pub fn await_aggregated(&self, timeout: Duration) -> anyhow::Result<()> {
        let ends = self.log.durable_ends();
        let started = Instant::now();
        while ends.iter().enumerate().any(|(p, e)| self.committed[p].load(Ordering::Acquire) < *e) {
            anyhow::ensure!(
                started.elapsed() < timeout,
                "the aggregator did not catch up with the log within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Log records durable but not yet archived.
    pub fn archive_lag(&self) -> u64 {
        self.log.behind(&self.archived)
    }

    /// Log records durable but not yet aggregated.
    pub fn lag(&self) -> u64 {
        self.log.behind(&self.committed)
    }

    pub fn log_appended_bytes(&self) -> u64 {
        self.log.appended_bytes()
    }

    /// Copies the aggregator's state into the recorder, for a render of `/metrics`.
    pub fn export_metrics(&self) {
        use crate::telemetry::{self as t, set_counter, set_gauge, set_partition_gauge};
        let c = self.counters.lock().expect("not poisoned").clone();
        set_counter(t::COUNTED, c.counted);
        set_counter(t::DUPLICATE, c.duplicate);
        set_counter(t::LATE_CORRECTED, c.late_corrected);
        set_counter(t::TOO_LATE, c.too_late);
        let m = &self.metrics;
        set_counter(t::ROWS_WRITTEN, m.rows_written.load(Ordering::Relaxed));
        set_counter(t::CHECKPOINT_WRITTEN, m.checkpoint_written_bytes.load(Ordering::Relaxed));
        set_counter(t::LOG_WRITTEN, self.log_appended_bytes());
        set_gauge(t::CHECKPOINT_BYTES, m.checkpoint_bytes.load(Ordering::Relaxed) as f64);
        set_gauge(t::DEDUP_ENTRIES, m.dedup_entries.load(Ordering::Relaxed) as f64);
        set_gauge(t::DEDUP_BYTES, m.dedup_bytes.load(Ordering::Relaxed) as f64);
        set_gauge(t::OPEN_WINDOWS, m.open_windows.load(Ordering::Relaxed) as f64);
        set_gauge(t::LAG, self.lag() as f64);
        set_gauge(t::ARCHIVE_LAG, self.archive_lag() as f64);
        if let Some(w) = Watermark::from_raw(self.watermark.load(Ordering::Acquire)).ms() {
            set_gauge(t::WATERMARK, w as f64 / 1000.0);
            set_gauge(t::WATERMARK_DELAY, (now_ms() - w) as f64 / 1000.0);
        }
        let ends = self.log.durable_ends();
        let views = self.partitions.lock().expect("not poisoned").clone();
        for (p, &end) in ends.iter().enumerate() {
            let committed = self.committed[p].load(Ordering::Acquire);
            let p = p as u32;
            set_partition_gauge(t::PARTITION_END, p, end as f64);
            set_partition_gauge(t::PARTITION_COMMITTED, p, committed as f64);
            set_partition_gauge(t::PARTITION_LAG, p, end.saturating_sub(committed) as f64);
            let view = views.iter().find(|v| v.id.0 == p);
            // A partition that has delivered nothing has no watermark of its own yet.
            if let Some(w) = view.and_then(|v| v.watermark.ms()) {
                set_partition_gauge(t::PARTITION_WATERMARK, p, w as f64 / 1000.0);
            }
            set_partition_gauge(
                t::PARTITION_IDLE,
                p,
                f64::from(u8::from(view.is_some_and(|v| v.idle))),
            );
        }
        set_gauge(t::LOG_DISK, dir_bytes(&self.data_dir.join("log")) as f64);
        let store = std::fs::metadata(self.data_dir.join("store.redb")).map_or(0, |m| m.len());
        set_gauge(t::STORE_DISK, (store + dir_bytes(&self.data_dir.join("checkpoints"))) as f64);
    }
}

/// Bytes of the files under `dir`, recursively (0 when it does not exist).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The collector's way into the log.
#[derive(Clone)]
pub struct Ingest {
    tx: SyncSender<ToWriter>,
    partitions: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the log refused the write: {0}")]
    Log(String),
    #[error("the service is shutting down")]
    Closed,
}

impl Ingest {
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Appends encoded clicks and returns once they are durable.
    pub async fn append(&self, parts: Vec<(PartitionId, Vec<Vec<u8>>)>) -> Result<(), IngestError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let tx = self.tx.clone();
        // The channel is bounded: a full one waits here, on a blocking-pool thread.
        tokio::task::spawn_blocking(move || tx.send(ToWriter::Append { parts, reply }))
            .await
            .map_err(|_| IngestError::Closed)?
            .map_err(|_| IngestError::Closed)?;
        rx.await.map_err(|_| IngestError::Closed)?.map_err(IngestError::Log)
    }
}

/// The running pipeline: writer and aggregator threads.
pub struct Pipeline {
    pub ingest: Ingest,
    pub query: Arc<QueryState>,
    shutdown: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Opens the data directory, recovers, and starts the threads.
    pub fn start(settings: &Settings) -> anyhow::Result<Pipeline> {
        use anyhow::Context;
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data_dir {}", settings.data_dir.display()))?;
        // Settings first: a refused start must not have changed the data directory.
        let store = Arc::new(
            Store::open(&settings.data_dir.join("store.redb")).context("opening the store")?,
        );
        store.check_settings(&settings.recorded()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let writer = Writer::open(
            &settings.data_dir.join("log"),
            settings.partitions as usize,
            settings.segment_bytes,
        )
        .context("opening the log")?;
        let log = writer.handle();
        let mut engine_config = settings.engine.clone();
        engine_config.identity_key = identity_key(&settings.data_dir)?;
        let filters = Arc::new(settings.filters.clone());
        let slots = filters.len() + 1;
        let archive = Arc::new(
            crate::archive::Archive::open(&settings.archive, &settings.data_dir)
                .context("opening the archive")?,
        );
        let archiver = crate::archive::Archiver::recover(
            archive.clone(),
            store.clone(),
            log.clone(),
            &settings.archive,
        )?;
        let (archive_tx, archive_rx) = std::sync::mpsc::channel();
        let query = Arc::new(QueryState {
            archived: archiver.archived(),
            recalc: crate::recalc::Context {
                store: store.clone(),
                archive,
                engine: engine_config.clone(),
                filters: filters.clone(),
            },
            archive_requests: Mutex::new(archive_tx),
            jobs: Mutex::new(()),
            store: store.clone(),
            filters: filters.clone(),
            live: LiveIndex::new(slots),
            watermark: AtomicI64::new(i64::MIN),
            counters: Mutex::new(Counters::default()),
            metrics: Arc::default(),
            log: log.clone(),
            committed: (0..settings.partitions).map(|_| AtomicU64::new(0)).collect(),
            ready: AtomicBool::new(false),
            partitions: Mutex::new(Vec::new()),
            data_dir: settings.data_dir.clone(),
        });
        let shutdown = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel(1024);

        let mut aggregator =
            Aggregator::recover(settings, engine_config, store, log, query.clone(), tx.clone())?;
        let popular_thread = {
            let query = query.clone();
            let sealed = aggregator.sealed_below();
            std::thread::Builder::new()
                .name("adclick-popular".into())
                .spawn(move || rebuild_popular(&query, sealed))
                .context("starting the popular-ads rebuild")?
        };
        let writer_thread = {
            let shutdown = shutdown.clone();
            let retention = settings.log_retention;
            std::thread::Builder::new()
                .name("adclick-log".into())
                .spawn(move || write_loop(writer, rx, shutdown, retention))
                .context("starting the log writer")?
        };
        let archiver_thread = {
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("adclick-archive".into())
                .spawn(move || archiver.run(archive_rx, &shutdown))
                .context("starting the archiver")?
        };
        let aggregator_thread = {
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("adclick-aggregate".into())
                .spawn(move || aggregator.run(&shutdown))
                .context("starting the aggregator")?
        };
        Ok(Pipeline {
            ingest: Ingest { tx, partitions: settings.partitions },
            query,
            shutdown,
            threads: vec![aggregator_thread, archiver_thread, writer_thread, popular_thread],
        })
    }

    /// Commits what has been aggregated and stops the threads.
    pub fn stop(self) {
        self.shutdown.store(true, Ordering::Release);
        drop(self.ingest);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn write_loop(
    mut writer: Writer,
    rx: Receiver<ToWriter>,
    shutdown: Arc<AtomicBool>,
    retention: Duration,
) {
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) if shutdown.load(Ordering::Acquire) => return,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Group commit: everything already waiting goes into the same sync.
        let mut pending = vec![first];
        while pending.len() < 4096 {
            match rx.try_recv() {
                Ok(m) => pending.push(m),
                Err(_) => break,
            }
        }
        let mut result = Ok(());
        let mut replies = Vec::new();
        for m in pending {
            match m {
                ToWriter::Append { parts, reply } => {
                    if result.is_ok() {
                        for (p, records) in &parts {
                            if let Err(e) = writer.append(*p, records.iter().map(Vec::as_slice)) {
                                result = Err(e.to_string());
                                break;
                            }
                        }
                    }
                    replies.push(reply);
                }
                ToWriter::DeleteBelow(offsets) => {
                    for (p, o) in offsets {
                        if let Err(e) = writer.delete_below(p, o, retention) {
                            tracing::warn!("log retention: {e}");
                        }
                    }
                }
            }
        }
        if result.is_ok() && !replies.is_empty() {
            crate::fault::point("log.before_sync");
            result = writer.sync().map_err(|e| e.to_string());
        }
        for r in replies {
            let _ = r.send(result.clone());
        }
        if let Err(e) = result {
            fatal("appending to the log", e);
        }
    }
}

struct Aggregator {
    engine: Engine,
    /// The fixed pool of OS threads the engine's shards run on (one per shard).
    pool: rayon::ThreadPool,
    store: Arc<Store>,
    log: LogHandle,
    query: Arc<QueryState>,
    writer: SyncSender<ToWriter>,
    next: Vec<u64>,
    seq: u64,
    commit_interval: Duration,
    checkpoint_interval: Duration,
    lateness_ms: i64,
    readers: Vec<crate::log::Reader>,
    buf: Vec<Records>,
    /// The offsets of the previous checkpoint: the log is kept from there, so that a start can
    /// fall back to it.
    previous_checkpoint: Option<Vec<(PartitionId, Offset)>>,
    /// The files of the newest checkpoint taken: the next one keeps those still retained.
    manifest: Vec<CheckpointFile>,
    /// A checkpoint whose file is being written (one at a time), recorded by the first commit
    /// after its file is durable.
    pending: Option<PendingCheckpoint>,
}

/// A checkpoint taken, its file written on its own thread (encoding is on the aggregator
/// thread and follows what changed; writing and fsync are not on the commit path).
struct PendingCheckpoint {
    taken: TakenCheckpoint,
    writing: JoinHandle<Result<(), crate::store::StoreError>>,
}

struct TakenCheckpoint {
    record: CheckpointRecord,
    /// The engine's offsets when it was taken.
    offsets: Vec<(PartitionId, Offset)>,
    bytes: u64,
}

impl PendingCheckpoint {
    /// Waits for its file to be durable; a failed write stops the process (restart recovers).
    fn written(self) -> TakenCheckpoint {
        match self.writing.join().expect("the checkpoint thread does not panic") {
            Ok(()) => self.taken,
            Err(e) => fatal("writing a checkpoint", e),
        }
    }
}

impl Aggregator {
    fn recover(
        settings: &Settings,
        engine_config: EngineConfig,
        store: Arc<Store>,
        log: LogHandle,
        query: Arc<QueryState>,
        writer: SyncSender<ToWriter>,
    ) -> anyhow::Result<Aggregator> {
        use anyhow::Context;
        let started = Instant::now();
        let filters = query.filters.clone();
        let rec = store.recovery().context("reading the store for recovery")?;
        let read_ms = started.elapsed().as_millis() as u64;
        // A log that ends below what the store committed lost records (damaged, deleted or
        // restored files): new clicks would reuse those offsets and be skipped as replays.
        for &(p, committed) in &rec.offsets {
            let end =
                if (p.0 as usize) < log.partitions() { log.durable_end(p) } else { Offset(0) };
            anyhow::ensure!(
                end >= committed,
                "partition {}: the log ends at offset {} but the store has committed offset {}; \
                 the log lost records that were aggregated (damaged, deleted or restored files). \
                 Restore the log, or start a new data_dir",
                p.0,
                end.0,
                committed.0
            );
        }
        let (mut engine, restored) = restore_engine(&engine_config, &filters, &rec)?;
        let restored_ms = started.elapsed().as_millis() as u64;
        let base = restored.as_ref().map(|c| c.seq);
        let partitions = settings.partitions as usize;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.engine.shards)
            .thread_name(|i| format!("adclick-shard-{i}"))
            .build()
            .context("starting the shard threads")?;
        let mut next = vec![0; partitions];
        for (p, o) in engine.offsets() {
            anyhow::ensure!((p.0 as usize) < partitions, "checkpoint holds partition {}", p.0);
            next[p.0 as usize] = o.0;
        }
        let mut readers: Vec<_> =
            (0..partitions).map(|p| log.reader(PartitionId(p as u32))).collect();
        let mut buf: Vec<Records> = (0..partitions).map(|_| Records::default()).collect();
        let journal: Vec<_> =
            rec.journal.iter().filter(|(seq, _)| base.is_none_or(|b| *seq > b)).collect();
        for (seq, batch) in &journal {
            for &(p, from, to) in &batch.ranges {
                anyhow::ensure!(
                    from.0 == next[p.0 as usize],
                    "journal batch {seq} does not continue the checkpoint at partition {}",
                    p.0
                );
                next[p.0 as usize] = to.0;
            }
            read_ranges(&mut readers, &mut buf, &batch.ranges)
                .context("reading the log to replay the journal")?;
            let records = decode_records(&buf, &batch.ranges)
                .map_err(|e| anyhow::anyhow!("replaying the journal: {e}"))?;
            if !batch.assign.is_empty() {
                engine.assign(&batch.assign, EventTime(batch.wall));
            }
            engine.process_with(EventTime(batch.wall), &records, |work| run_shards(&pool, work));
        }
        for (p, o) in &rec.offsets {
            anyhow::ensure!(
                next[p.0 as usize] == o.0,
                "after replay partition {} is at offset {} but the store committed {}",
                p.0,
                next[p.0 as usize],
                o.0
            );
        }
        // The replay must have made every decision again as committed (it is given the same
        // records, wall times and assignments): the same watermark and the same counters.
        let committed = store.counters().context("reading the committed counters")?;
        anyhow::ensure!(
            engine.watermark() == rec.watermark && engine.counters() == committed,
            "the replay diverged from what was committed: watermark {:?} against {:?}, \
             counters {:?} against {:?}; refusing to go on with state that differs from the store",
            engine.watermark(),
            rec.watermark,
            engine.counters(),
            committed
        );
        *query.counters.lock().expect("not poisoned") = committed;
        let replayed_ms = started.elapsed().as_millis() as u64;
        let (rows, tops) = engine.unsealed();
        store
            .load_open(&rows, &tops, settings.engine.allowed_lateness_ms)
            .context("handing the unsealed minutes to the store")?;
        let mut agg = Aggregator {
            engine,
            pool,
            store,
            readers,
            buf,
            log,
            query,
            writer,
            next,
            seq: rec.next_seq,
            commit_interval: settings.commit_interval,
            checkpoint_interval: settings.checkpoint_interval,
            lateness_ms: settings.engine.allowed_lateness_ms,
            previous_checkpoint: None,
            manifest: restored.map(|c| c.files).unwrap_or_default(),
            pending: None,
        };
        for (p, o) in agg.next.iter().enumerate() {
            agg.query.committed[p].store(*o, Ordering::Release);
        }
        agg.assign_all().context("assigning the partitions")?;
        agg.query.ready.store(true, Ordering::Release);
        tracing::info!(
            replayed_batches = journal.len(),
            read_ms,
            restore_ms = restored_ms - read_ms,
            replay_ms = replayed_ms - restored_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        Ok(agg)
    }

    /// Takes every partition at the current wall time (SPEC §2: each holds the watermark back
    /// until it delivers or idles), committed as a journaled batch so that a replay after a
    /// crash assigns at the same instant.
    fn assign_all(&mut self) -> Result<(), crate::store::StoreError> {
        let wall = now_ms();
        let all: Vec<PartitionId> = (0..self.next.len()).map(|p| PartitionId(p as u32)).collect();
        self.engine.assign(&all, EventTime(wall));
        let output =
            self.engine.process_with(EventTime(wall), &[], |work| run_shards(&self.pool, work));
        self.commit(&BatchRecord { wall, ranges: Vec::new(), assign: all }, output, None)
    }

    /// Minutes below this can no longer be corrected by the live path.
    fn sealed_below(&self) -> Minute {
        match self.engine.watermark().oldest_countable(self.lateness_ms) {
            Some(start) => Minute(start.div_euclid(MINUTE_MS)),
            None => Minute(i64::MIN),
        }
    }
}

/// Fills the popular-ads index of a starting server from the store (see [`LiveIndex`]), while
/// queries already run against the store; `sealed`: the minutes the live path can no longer
/// change at recovery. A failed read stops the process, like a failed commit.
fn rebuild_popular(query: &QueryState, sealed: Minute) {
    let started = Instant::now();
    let keep_from = recent_window_start();
    let mut slots: Vec<Popular> = (0..query.filters.len() + 1).map(|_| Popular::new()).collect();
    let mut rows = 0u64;
    let scanned = query.store.scan_counts(keep_from, |minute, ad, counts| {
        rows += 1;
        let ad = crate::event::AdId::new(ad);
        for (p, &c) in slots.iter_mut().zip(counts) {
            if c > 0 {
                p.set(minute, &ad, c);
            }
        }
    });
    let watermark = scanned.unwrap_or_else(|e| fatal("rebuilding the popular-ads index", e));
    for p in &mut slots {
        p.seal_below(sealed);
    }
    query.live.install(slots, keep_from, watermark);
    tracing::info!(
        rows,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "popular-ads index rebuilt"
    );
}

/// Reads the records `[from, to)` of each range into `buf` (one buffer per partition).
pub(crate) fn read_ranges(
    readers: &mut [crate::log::Reader],
    buf: &mut [Records],
    ranges: &[(PartitionId, Offset, Offset)],
) -> Result<(), crate::log::LogError> {
    for &(p, from, to) in ranges {
        let i = p.0 as usize;
        buf[i].clear();
        let mut at = from;
        while at < to {
            let before = at;
            at = readers[i].read(at, to, usize::MAX, &mut buf[i])?;
            if at == before {
                return Err(crate::log::LogError::Corrupt {
                    path: Default::default(),
                    what: format!("partition {} ends at offset {} before {}", p.0, at.0, to.0),
                });
            }
        }
    }
    Ok(())
}

/// Restores the newest committed checkpoint that can be read, falling back to the previous one
/// (and a longer journal replay), and says so. Returns the engine and the checkpoint restored.
fn restore_engine(
    config: &EngineConfig,
    filters: &Arc<Filters>,
    rec: &crate::store::Recovery,
) -> anyhow::Result<(Engine, Option<CheckpointRecord>)> {
    use anyhow::Context;
    let mut failures = Vec::new();
    for (checkpoint, files) in &rec.checkpoints {
        let seq = checkpoint.seq;
        let restored = files.as_ref().map_err(Clone::clone).and_then(|files| {
            let files: Vec<&[u8]> = files.iter().map(|f| &f[..]).collect();
            Engine::restore_chain(config.clone(), filters.clone(), &files)
                .map_err(|e| e.to_string())
        });
        match restored {
            Ok(engine) => {
                if !failures.is_empty() {
                    tracing::warn!(
                        checkpoint = seq,
                        "falling back to the previous checkpoint: {}",
                        failures.join("; ")
                    );
                    eprintln!(
                        "adclick: warning: {}; falling back to checkpoint {seq} and replaying the journal from there",
                        failures.join("; ")
                    );
                }
                return Ok((engine, Some(checkpoint.clone())));
            }
            Err(e) => failures.push(format!("checkpoint {seq} cannot be restored ({e})")),
        }
    }
    // No checkpoint, or none readable: a fresh engine, if the journal reaches back to the start.
    let from_start = rec.journal.first().is_none_or(|(seq, _)| *seq == 0);
    anyhow::ensure!(
        failures.is_empty() || from_start,
        "{}; the journal does not reach back to the start, so the state cannot be rebuilt. \
         Restore the checkpoints directory, or start a new data_dir",
        failures.join("; ")
    );
    if !failures.is_empty() {
        eprintln!("adclick: warning: {}; replaying the whole journal", failures.join("; "));
    }
    Ok((Engine::new(config.clone(), filters.clone()).context("engine settings")?, None))
}

/// The identity key of a data directory: read, or created (random, durable) on first start.
pub fn identity_key(data_dir: &std::path::Path) -> anyhow::Result<IdentityKey> {
    use anyhow::Context;
    use std::io::{Read, Write};
    let path = data_dir.join("identity.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let key: [u8; IdentityKey::LEN] = bytes.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "{}: must hold {} bytes, holds {}; it keys deduplication and cannot be replaced",
                    path.display(),
                    IdentityKey::LEN,
                    bytes.len()
                )
            })?;
            Ok(IdentityKey(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::ensure!(
                !data_dir.join("checkpoints").exists()
                    || std::fs::read_dir(data_dir.join("checkpoints"))?.next().is_none(),
                "{} is missing but the data directory holds checkpoints keyed with it; restore it",
                path.display()
            );
            let mut key = [0u8; IdentityKey::LEN];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut key))
                .context("reading random bytes for the identity key")?;
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&key)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(data_dir)?.sync_all()?;
            Ok(IdentityKey(key))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The oldest minute popular-ads queries can reach (their longest window, plus an hour of slack
/// for `to` in the past); older minutes leave the in-memory index.
fn recent_window_start() -> Minute {
    Minute(now_ms().div_euclid(MINUTE_MS) - i64::from(MAX_WINDOW_MINUTES) - 60)
}

/// Runs each shard's batch on the pool; outputs in shard order.
fn run_shards(
    pool: &rayon::ThreadPool,
    work: Vec<(&mut crate::engine::Shard, crate::engine::ShardBatch)>,
) -> Vec<crate::engine::ShardOutput> {
    use rayon::prelude::*;
    pool.install(|| work.into_par_iter().map(|(shard, batch)| shard.apply(batch)).collect())
}

/// Decodes what `read_ranges` read into engine records, in journal order. Only the collector
/// writes the log, with `wire::encode`, behind a CRC: a record that does not decode is damage or
/// a bug, and skipping it would lose an acknowledged click, so it is an error.
fn decode_records<'a>(
    buf: &'a [Records],
    ranges: &[(PartitionId, Offset, Offset)],
) -> Result<Vec<Record<'a>>, String> {
    let mut out = Vec::new();
    for &(p, _, _) in ranges {
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

impl Aggregator {
    fn run(&mut self, shutdown: &AtomicBool) {
        let mut last_checkpoint = Instant::now();
        let mut last_commit = Instant::now();
        loop {
            crate::fault::stall("aggregator.stall");
            let stopping = shutdown.load(Ordering::Acquire);
            let started = Instant::now();
            let ranges: Vec<_> = (0..self.next.len())
                .map(|p| {
                    let id = PartitionId(p as u32);
                    let from = self.next[p];
                    let to = self.log.durable_end(id).0.min(from + MAX_BATCH_PER_PARTITION as u64);
                    (id, Offset(from), Offset(to))
                })
                .filter(|(_, a, b)| a < b)
                .collect();
            let wall = now_ms();
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
                record = self.pending.take().map(PendingCheckpoint::written);
            }
            if checkpoint_due {
                let taken = self.take_checkpoint();
                if stopping {
                    // The last one is written here and recorded by this very commit.
                    record = Some(taken.written());
                } else {
                    self.pending = Some(taken);
                }
                last_checkpoint = Instant::now();
            }
            let batch = BatchRecord { wall, ranges, assign: Vec::new() };
            if let Err(e) = self.commit(&batch, output, record) {
                fatal("committing results", e);
            }
            last_commit = Instant::now();
            if stopping {
                // So that a process opening the store alone reads the open minutes too.
                if let Err(e) = self.store.flush_open() {
                    fatal("writing the open minutes' counts", e);
                }
                return;
            }
            // A full batch means more is waiting: go again at once.
            let full =
                batch.ranges.iter().any(|(_, a, b)| b.0 - a.0 == MAX_BATCH_PER_PARTITION as u64);
            if !full {
                std::thread::sleep(self.commit_interval.saturating_sub(started.elapsed()));
            }
        }
    }

    /// Takes an incremental checkpoint after the batch about to be committed (`self.seq`) and
    /// starts writing its file. Its manifest keeps the previous files the engine still retains.
    fn take_checkpoint(&mut self) -> PendingCheckpoint {
        let started = Instant::now();
        let (bytes, extent) = self.engine.checkpoint();
        let taking = started.elapsed();
        let seq = self.seq;
        let mut files: Vec<CheckpointFile> =
            self.manifest.iter().copied().filter(|f| self.engine.retains(f.extent)).collect();
        files.push(CheckpointFile { seq, extent });
        self.manifest = files.clone();
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
        }
    }

    /// Commits a processed batch (results, offsets, journal entry, and a checkpoint whose file
    /// is durable, if any), then makes it visible to queries.
    fn commit(
        &mut self,
        batch: &BatchRecord,
        output: crate::engine::Output,
        checkpoint: Option<TakenCheckpoint>,
    ) -> Result<(), crate::store::StoreError> {
        let started = Instant::now();
        self.store.commit(self.seq, batch, &output, checkpoint.as_ref().map(|c| &c.record))?;
        crate::fault::point("store.after_commit");
        self.seq += 1;
        crate::telemetry::observe(crate::telemetry::COMMIT, started.elapsed());
        let m = &self.query.metrics;
        m.rows_written.fetch_add(output.counts.len() as u64, Ordering::Relaxed);
        for &(p, _, to) in &batch.ranges {
            self.next[p.0 as usize] = to.0;
        }
        self.publish(output);
        if let Some(checkpoint) = checkpoint {
            crate::fault::point("aggregator.after_checkpoint");
            let m = &self.query.metrics;
            m.checkpoint_bytes.store(checkpoint.bytes, Ordering::Relaxed);
            m.checkpoint_written_bytes.fetch_add(checkpoint.bytes, Ordering::Relaxed);
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

    /// Makes a committed batch visible to queries.
    fn publish(&self, output: crate::engine::Output) {
        for (p, o) in &output.offsets {
            self.query.committed[p.0 as usize].store(o.0, Ordering::Release);
        }
        let before = Watermark::from_raw(
            self.query.watermark.swap(output.watermark.to_raw(), Ordering::AcqRel),
        );
        crate::telemetry::observe_final(before, output.watermark, now_ms());
        *self.query.counters.lock().expect("not poisoned") = output.counters;
        *self.query.partitions.lock().expect("not poisoned") = self.engine.partitions();
        let (dedup, windows) = self.engine.shard_stats();
        let m = &self.query.metrics;
        m.dedup_entries.store(dedup as u64, Ordering::Relaxed);
        m.open_windows.store(windows as u64, Ordering::Relaxed);
        m.dedup_bytes.store(self.engine.dedup_bytes() as u64, Ordering::Relaxed);
        self.query.live.publish(Published {
            counts: output.counts,
            watermark: output.watermark,
            sealed_below: self.sealed_below(),
            keep_from: recent_window_start(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::AdId;

    fn commit(minute: i64, rows: &[(&str, u64)]) -> Published {
        let mut counts = CountUpdates::new(1);
        for (ad, c) in rows {
            counts.push(Minute(minute), &AdId::new(ad), &[*c]);
        }
        Published {
            counts,
            watermark: Watermark::NONE,
            sealed_below: Minute(0),
            keep_from: Minute(0),
        }
    }

    /// Changes published while the index is rebuilt from the store wait, and are applied in
    /// order over the store's rows: absolute counts, so those the scan already saw do no harm.
    #[test]
    fn changes_during_the_rebuild_are_applied_after_it_in_order() {
        let live = LiveIndex::new(1);
        live.publish(commit(5, &[("x", 3)]));
        assert_eq!(live.read().keep_from, Minute(i64::MAX), "queries read the store meanwhile");
        live.publish(commit(5, &[("x", 7), ("y", 2)]));
        live.replace(&[(Minute(5), AdId::new("z"), vec![4])]);
        live.publish(commit(6, &[("y", 6)]));
        // The store's rows as the rebuild read them, between the first two commits.
        let mut scanned = Popular::new();
        scanned.set(Minute(5), &AdId::new("x"), 3);
        scanned.set(Minute(4), &AdId::new("w"), 1);
        live.install(vec![scanned], Minute(0), Watermark::NONE);
        let mut state = live.read();
        assert_eq!(state.keep_from, Minute(0));
        let top = state.slots[0].top(Minute(7), 5, 10);
        let top: Vec<(&str, u64)> = top.iter().map(|(ad, c)| (ad.as_str(), *c)).collect();
        assert_eq!(top, vec![("y", 8), ("x", 7), ("z", 4), ("w", 1)]);
    }
}
