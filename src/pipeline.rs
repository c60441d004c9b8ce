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
use crate::engine::{Counters, Engine, Offset, PartitionId, Payload, Record};
use crate::event::{wire, EventTime, Minute, MINUTE_MS};
use crate::filter::Filters;
use crate::log::{LogHandle, Records, Writer};
use crate::popular::{Popular, MAX_WINDOW_MINUTES};
use crate::store::{BatchRecord, Store};

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
    pub requests: AtomicU64,
    pub overloaded: AtomicU64,
    pub commits: AtomicU64,
    pub commit_micros: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_bytes: AtomicU64,
}

/// What queries read: committed state only.
pub struct QueryState {
    pub store: Arc<Store>,
    pub filters: Arc<Filters>,
    /// One popular-ads index per slot (total, then each filter).
    pub popular: Vec<Mutex<Popular>>,
    pub watermark: AtomicI64,
    pub counters: Mutex<Counters>,
    pub metrics: Metrics,
    pub log: LogHandle,
    /// Per partition: the next offset the aggregator has committed.
    pub committed: Vec<AtomicU64>,
    pub ready: AtomicBool,
}

impl QueryState {
    /// Log records durable but not yet aggregated.
    pub fn lag(&self) -> u64 {
        (0..self.log.partitions())
            .map(|p| {
                self.log
                    .durable_end(PartitionId(p as u32))
                    .0
                    .saturating_sub(self.committed[p].load(Ordering::Acquire))
            })
            .sum()
    }
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
        let writer = Writer::open(
            &settings.data_dir.join("log"),
            settings.partitions as usize,
            settings.segment_bytes,
        )
        .context("opening the log")?;
        let log = writer.handle();
        let store = Arc::new(
            Store::open(&settings.data_dir.join("store.redb")).context("opening the store")?,
        );
        let filters = Arc::new(settings.filters.clone());
        let slots = filters.len() + 1;
        let query = Arc::new(QueryState {
            store: store.clone(),
            filters: filters.clone(),
            popular: (0..slots).map(|_| Mutex::new(Popular::new())).collect(),
            watermark: AtomicI64::new(i64::MIN),
            counters: Mutex::new(Counters::default()),
            metrics: Metrics::default(),
            log: log.clone(),
            committed: (0..settings.partitions).map(|_| AtomicU64::new(0)).collect(),
            ready: AtomicBool::new(false),
        });
        let shutdown = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel(1024);

        let mut aggregator = Aggregator::recover(settings, store, log, query.clone(), tx.clone())?;
        let writer_thread = {
            let shutdown = shutdown.clone();
            let retention = settings.log_retention;
            std::thread::Builder::new()
                .name("adclick-log".into())
                .spawn(move || write_loop(writer, rx, shutdown, retention))
                .context("starting the log writer")?
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
            threads: vec![aggregator_thread, writer_thread],
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
}

impl Aggregator {
    fn recover(
        settings: &Settings,
        store: Arc<Store>,
        log: LogHandle,
        query: Arc<QueryState>,
        writer: SyncSender<ToWriter>,
    ) -> anyhow::Result<Aggregator> {
        use anyhow::Context;
        let started = Instant::now();
        let filters = query.filters.clone();
        let rec = store.recovery().context("reading the store for recovery")?;
        if let Some(ids) = &rec.filters {
            if ids != filters.ids() {
                anyhow::bail!(
                    "filters: the data directory was aggregated with filters {ids:?}, the config has {:?}; \
                     use the same filters, or a new data_dir",
                    filters.ids()
                );
            }
        }
        let engine = match &rec.checkpoint {
            Some(bytes) => Engine::restore(settings.engine.clone(), filters.clone(), bytes)
                .context("restoring the checkpoint")?,
            None => {
                Engine::new(settings.engine.clone(), filters.clone()).context("engine settings")?
            }
        };
        let partitions = settings.partitions as usize;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.engine.shards)
            .thread_name(|i| format!("adclick-shard-{i}"))
            .build()
            .context("starting the shard threads")?;
        let mut agg = Aggregator {
            engine,
            pool,
            store,
            readers: (0..partitions).map(|p| log.reader(PartitionId(p as u32))).collect(),
            buf: (0..partitions).map(|_| Records::default()).collect(),
            log,
            query,
            writer,
            next: vec![0; partitions],
            seq: rec.next_seq,
            commit_interval: settings.commit_interval,
            checkpoint_interval: settings.checkpoint_interval,
            lateness_ms: settings.engine.allowed_lateness_ms,
        };
        for (p, o) in agg.engine.offsets() {
            agg.next[p.0 as usize] = o.0;
        }
        let replayed = rec.journal.len();
        for (_, batch) in &rec.journal {
            for &(p, from, to) in &batch.ranges {
                anyhow::ensure!(
                    from.0 == agg.next[p.0 as usize],
                    "journal does not continue the checkpoint at partition {}",
                    p.0
                );
                agg.next[p.0 as usize] = to.0;
            }
            let ranges = batch.ranges.clone();
            agg.read_ranges(&ranges).context("reading the log to replay the journal")?;
            let records = decode_records(&agg.buf, &ranges);
            let pool = &agg.pool;
            agg.engine.process_with(EventTime(batch.wall), &records, |work| run_shards(pool, work));
        }
        for (p, o) in &rec.offsets {
            anyhow::ensure!(
                agg.next[p.0 as usize] == o.0,
                "after replay partition {} is at offset {} but the store committed {}",
                p.0,
                agg.next[p.0 as usize],
                o.0
            );
        }
        for (p, o) in agg.next.iter().enumerate() {
            agg.query.committed[p].store(*o, Ordering::Release);
        }
        agg.query.watermark.store(agg.engine.watermark(), Ordering::Release);
        *agg.query.counters.lock().expect("not poisoned") =
            agg.store.counters().unwrap_or_default();
        agg.rebuild_popular().context("rebuilding the popular-ads index")?;
        agg.query.ready.store(true, Ordering::Release);
        tracing::info!(
            replayed_batches = replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        Ok(agg)
    }

    fn rebuild_popular(&self) -> Result<(), crate::store::StoreError> {
        let since = recent_window_start();
        let mut popular: Vec<_> =
            self.query.popular.iter().map(|p| p.lock().expect("not poisoned")).collect();
        self.store.scan_counts(since, |minute, ad, counts| {
            let ad = crate::event::AdId::new(ad);
            for (slot, &c) in counts.iter().enumerate() {
                if c > 0 {
                    if let Some(p) = popular.get_mut(slot) {
                        p.set(minute, &ad, c);
                    }
                }
            }
        })?;
        let sealed = self.sealed_below();
        for p in &mut popular {
            p.seal_below(sealed);
        }
        Ok(())
    }

    /// Minutes below this can no longer be corrected by the live path.
    fn sealed_below(&self) -> Minute {
        let w = self.engine.watermark();
        if w == i64::MIN {
            return Minute(i64::MIN);
        }
        Minute((w - self.lateness_ms).div_euclid(MINUTE_MS) - 1)
    }

    fn read_ranges(
        &mut self,
        ranges: &[(PartitionId, Offset, Offset)],
    ) -> Result<(), crate::log::LogError> {
        for &(p, from, to) in ranges {
            let i = p.0 as usize;
            self.buf[i].clear();
            let mut at = from;
            while at < to {
                let before = at;
                at = self.readers[i].read(at, to, usize::MAX, &mut self.buf[i])?;
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

/// Decodes what `read_ranges` read into engine records, in journal order.
fn decode_records<'a>(
    buf: &'a [Records],
    ranges: &[(PartitionId, Offset, Offset)],
) -> Vec<Record<'a>> {
    let mut out = Vec::new();
    for &(p, _, _) in ranges {
        for (offset, bytes) in buf[p.0 as usize].iter() {
            match wire::decode(bytes) {
                Some(click) => {
                    out.push(Record { partition: p, offset, payload: Payload::Click(click) })
                }
                // Only the collector writes the log, with wire::encode; a record that does not
                // decode is damage. It is skipped visibly rather than stopping the pipeline.
                None => tracing::error!(
                    partition = p.0,
                    offset = offset.0,
                    "log record does not decode; skipped"
                ),
            }
        }
    }
    out
}

impl Aggregator {
    fn run(&mut self, shutdown: &AtomicBool) {
        let mut last_checkpoint = Instant::now();
        let mut last_watermark = self.engine.watermark();
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
            if let Err(e) = self.read_ranges(&ranges) {
                fatal("reading the log", e);
            }
            let wall = now_ms();
            let (output, snapshot) = {
                let records = decode_records(&self.buf, &ranges);
                let pool = &self.pool;
                let output = self
                    .engine
                    .process_with(EventTime(wall), &records, |work| run_shards(pool, work));
                let checkpoint_due =
                    last_checkpoint.elapsed() >= self.checkpoint_interval || stopping;
                (output, checkpoint_due.then(|| self.engine.snapshot()))
            };
            // A tick without records changes only the watermark; skipping its commit is safe for
            // replay (the next tick recomputes the same watermark from its wall clock), so such
            // progress is committed at most once a second, or at once when a minute turns final.
            let changed = !ranges.is_empty()
                || !output.top.is_empty()
                || (output.watermark != last_watermark
                    && last_commit.elapsed() >= Duration::from_secs(1));
            if changed || snapshot.is_some() {
                let batch = BatchRecord { wall, ranges: ranges.clone() };
                let commit_started = Instant::now();
                if let Err(e) = self.store.commit(
                    self.seq,
                    &batch,
                    &output,
                    self.query.filters.ids(),
                    snapshot.as_deref(),
                ) {
                    fatal("committing results", e);
                }
                crate::fault::point("store.after_commit");
                self.seq += 1;
                last_commit = Instant::now();
                let m = &self.query.metrics;
                m.commits.fetch_add(1, Ordering::Relaxed);
                m.commit_micros
                    .fetch_add(commit_started.elapsed().as_micros() as u64, Ordering::Relaxed);
                for &(p, _, to) in &ranges {
                    self.next[p.0 as usize] = to.0;
                }
                self.publish(&output);
                last_watermark = output.watermark;
                if let Some(bytes) = snapshot {
                    crate::fault::point("aggregator.after_checkpoint");
                    last_checkpoint = Instant::now();
                    m.checkpoints.fetch_add(1, Ordering::Relaxed);
                    m.checkpoint_bytes.store(bytes.len() as u64, Ordering::Relaxed);
                    let offsets = self.engine.offsets();
                    let _ = self.writer.try_send(ToWriter::DeleteBelow(offsets));
                }
            }
            if stopping {
                return;
            }
            // A full batch means more is waiting: go again at once.
            let full = ranges.iter().any(|(_, a, b)| b.0 - a.0 == MAX_BATCH_PER_PARTITION as u64);
            if !full {
                std::thread::sleep(self.commit_interval.saturating_sub(started.elapsed()));
            }
        }
    }

    /// Makes a committed batch visible to queries.
    fn publish(&self, output: &crate::engine::Output) {
        let sealed = self.sealed_below();
        for (slot, p) in self.query.popular.iter().enumerate() {
            let mut p = p.lock().expect("not poisoned");
            for (minute, ad, counts) in output.counts.iter() {
                if let Some(&c) = counts.get(slot) {
                    if c > 0 {
                        p.set(minute, ad, c);
                    }
                }
            }
            p.seal_below(sealed);
            p.evict_before(recent_window_start());
        }
        for (p, o) in &output.offsets {
            self.query.committed[p.0 as usize].store(o.0, Ordering::Release);
        }
        self.query.watermark.store(output.watermark, Ordering::Release);
        *self.query.counters.lock().expect("not poisoned") = output.counters.clone();
    }
}
