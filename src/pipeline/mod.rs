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
//!  archiver thread: the log ──▶ Parquet files (see `archive`), its offsets in the store
//! ```
//!
//! Files: `writer` (the log writer and [`Ingest`]), `aggregate` (the aggregator loop and its
//! commit), `recovery` (restore, journal replay, the popular-ads rebuild), `results` (what the
//! HTTP API reads: [`QueryState`] as its results reader and job runner).
//!
//! Exactly once: the collector acknowledges only durable records; the aggregator commits results
//! with the offsets that produced them and the batch journal (see `store`), and on start restores
//! the last checkpoint and replays the journal with its recorded wall-clock times, ending exactly
//! at the committed offsets. A resent batch is deduplicated by identity. Bad input never reaches
//! the log. A failed fsync or store commit stops the process (`exit 70`): restart recovers.

mod aggregate;
mod recovery;
mod results;
mod writer;

pub use recovery::identity_key;
pub use writer::Ingest;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::archive::{Archive, ArchiveError, Archiver, FlushRequest};
use crate::config::Settings;
use crate::engine::AtomicWatermark;
use crate::filter::Filters;
use crate::log::{LogError, LogHandle, Writer};
use crate::popular::LiveIndex;
use crate::recalc::{Job, JobError, JobResult, Progress};
use crate::store::{SettingsError, Store, StoreError};
use crate::telemetry::{AggregatorReport, IngestCounters};

/// Why the embedded service cannot start on its data directory.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("opening the log: {0}")]
    Log(#[from] LogError),
    #[error("opening the archive: {0}")]
    Archive(#[from] ArchiveError),
    /// The data directory cannot be resumed as it is; the message says why and what to do.
    #[error("{0}")]
    Recovery(String),
    #[error("starting the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
}

/// What queries, the status line and admin jobs read: committed state only.
pub struct QueryState {
    pub store: Arc<Store>,
    pub filters: Arc<Filters>,
    pub live: LiveIndex,
    /// The committed watermark.
    pub watermark: AtomicWatermark,
    /// The aggregator's engine state at the last commit, for `/metrics`.
    report: Mutex<AggregatorReport>,
    /// Collector totals (accepted, rejected), shared with the HTTP API.
    pub ingest: Arc<IngestCounters>,
    pub log: LogHandle,
    /// Per partition: the next offset the aggregator has committed.
    pub committed: Vec<AtomicU64>,
    pub ready: AtomicBool,
    /// Per partition: the next offset the archiver has archived.
    pub archived: Arc<Vec<AtomicU64>>,
    /// What recalculation and reconciliation need from the running service.
    pub recalc: crate::recalc::Context,
    /// Asks the archiver to archive everything durable now.
    archive_requests: Mutex<std::sync::mpsc::Sender<FlushRequest>>,
    /// Held while a recalc or reconcile runs: one at a time.
    jobs: Mutex<()>,
    pub data_dir: PathBuf,
    /// Rows (minute, ad) committed, checkpoint bytes: totals for `/metrics`.
    rows_written: AtomicU64,
    checkpoint_bytes: AtomicU64,
    checkpoint_written_bytes: AtomicU64,
    /// Why results cannot be committed now (a full disk), while the aggregator retries.
    stalled: Mutex<Option<String>>,
}

impl QueryState {
    /// Has the archiver archive everything durable now, and waits for it.
    pub fn flush_archive(&self) -> Result<(), JobError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.archive_requests
            .lock()
            .expect("not poisoned")
            .send(tx)
            .map_err(|_| JobError::ArchiverStopped)?;
        rx.recv().map_err(|_| JobError::ArchiverStopped)?.map_err(JobError::Archiving)
    }

    /// Waits until the aggregator has committed every record durable now (reconciliation
    /// compares stored results with the archive: both must reflect the same clicks).
    pub fn await_aggregated(&self, timeout: Duration) -> Result<(), JobError> {
        let ends = self.log.durable_ends();
        let started = Instant::now();
        while ends.iter().enumerate().any(|(p, e)| self.committed[p].load(Ordering::Acquire) < *e) {
            if started.elapsed() >= timeout {
                return Err(JobError::NotCaughtUp(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// A recalc or reconcile once the aggregator and the archiver have caught up with the log
    /// (within `timeout`); one at a time.
    pub fn run_job(
        &self,
        job: Job,
        from: crate::event::Minute,
        to: crate::event::Minute,
        timeout: Duration,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<JobResult, JobError> {
        let Ok(_running) = self.jobs.try_lock() else { return Err(JobError::Busy) };
        self.await_aggregated(timeout)?;
        self.flush_archive()?;
        crate::recalc::run_job(&self.recalc, &self.store, Some(&self.live), job, from, to, progress)
    }

    /// The audit of one stored count, once the aggregator and the archiver have caught up with
    /// the log (within `timeout`).
    pub fn explain(
        &self,
        q: &crate::recalc::Question,
        timeout: Duration,
    ) -> Result<crate::recalc::Explained, JobError> {
        self.await_aggregated(timeout)?;
        self.flush_archive()?;
        let horizon = self.recalc.engine.dedup_horizon_ms.div_euclid(crate::event::MINUTE_MS) + 1;
        let window = (q.minute.0 - horizon, q.minute.0 + 1 + horizon);
        let window = (crate::event::Minute(window.0), crate::event::Minute(window.1));
        let stored = self.store.ad_minute(&q.ad, q.minute, window, self.filters.len() + 1)?;
        crate::recalc::explain(&self.recalc, &Default::default(), q, &stored)
    }

    fn job_running(&self) -> bool {
        self.jobs.try_lock().is_err()
    }

    /// Records why commits are refused (`None`: they are not); returns whether they were.
    fn set_stalled(&self, why: Option<String>) -> bool {
        let mut stalled = self.stalled.lock().expect("not poisoned");
        let was = stalled.is_some();
        *stalled = why;
        was
    }

    /// Why results cannot be committed now, if they cannot.
    pub fn stalled(&self) -> Option<String> {
        self.stalled.lock().expect("not poisoned").clone()
    }

    /// Log records durable but not yet archived.
    pub fn archive_lag(&self) -> u64 {
        self.log.behind(&self.archived)
    }

    /// Log records durable but not yet aggregated.
    pub fn lag(&self) -> u64 {
        self.log.behind(&self.committed)
    }
}

/// A failure the embedded service must not go on from: the click log could not make clicks
/// durable. The thread that hit it answers the requests waiting on it, then raises it here. A
/// process serving HTTP has asked to [`Fatal::handle`] it: it stops serving in order (answers in
/// flight are delivered), stops the pipeline and exits 70. Without a handler the process exits
/// at once, as [`crate::fault::fatal`] does.
#[derive(Default)]
pub struct Fatal {
    handled: AtomicBool,
    /// What was being done, and the error.
    cause: Mutex<Option<(String, String)>>,
    notify: tokio::sync::Notify,
}

impl Fatal {
    pub fn raise(&self, what: &str, err: impl std::fmt::Display) {
        if !self.handled.load(Ordering::Acquire) {
            crate::fault::fatal(what, err);
        }
        tracing::error!("{what}: {err}; stopping once the answers in flight are delivered");
        *self.cause.lock().expect("not poisoned") = Some((what.to_string(), err.to_string()));
        self.notify.notify_one();
    }

    /// From now on a raise is answered by the caller, which awaits [`Fatal::raised`].
    pub fn handle(&self) {
        self.handled.store(true, Ordering::Release);
    }

    /// Resolves once a failure was raised.
    pub async fn raised(&self) {
        self.notify.notified().await;
    }

    /// What was raised, if anything: what was being done, and the error.
    pub fn cause(&self) -> Option<(String, String)> {
        self.cause.lock().expect("not poisoned").clone()
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

/// The running pipeline: writer, aggregator and archiver threads.
pub struct Pipeline {
    pub ingest: Ingest,
    pub query: Arc<QueryState>,
    /// Raised by the log writer when the log fails.
    pub fatal: Arc<Fatal>,
    shutdown: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn spawn(
    name: &'static str,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, StartError> {
    std::thread::Builder::new()
        .name(format!("adclick-{name}"))
        .spawn(f)
        .map_err(|e| StartError::Thread(name, e))
}

impl Pipeline {
    /// Opens the data directory, recovers, and starts the threads.
    pub fn start(settings: &Settings) -> Result<Pipeline, StartError> {
        let data_dir = &settings.data_dir;
        std::fs::create_dir_all(data_dir).map_err(|source| StartError::Io {
            what: "creating data_dir",
            path: data_dir.clone(),
            source,
        })?;
        // Settings first: a refused start must not have changed the data directory.
        let store = Arc::new(Store::open(&data_dir.join("store.redb"))?);
        store.check_settings(&settings.recorded())?;
        let writer = Writer::open(
            &data_dir.join("log"),
            settings.partitions as usize,
            settings.segment_bytes,
        )?;
        let log = writer.handle();
        let mut engine_config = settings.engine.clone();
        engine_config.identity_key = identity_key(data_dir)?;
        let filters = Arc::new(settings.filters.clone());
        let slots = filters.len() + 1;
        let archive = Arc::new(Archive::open(&settings.archive, data_dir)?);
        let archiver =
            Archiver::recover(archive.clone(), store.clone(), log.clone(), &settings.archive)?;
        let (archive_tx, archive_rx) = std::sync::mpsc::channel();
        let query = Arc::new(QueryState {
            archived: archiver.archived(),
            recalc: crate::recalc::Context {
                archive,
                engine: engine_config.clone(),
                filters: filters.clone(),
            },
            archive_requests: Mutex::new(archive_tx),
            jobs: Mutex::new(()),
            store: store.clone(),
            filters: filters.clone(),
            live: LiveIndex::new(slots),
            watermark: AtomicWatermark::default(),
            report: Mutex::default(),
            ingest: Arc::default(),
            log: log.clone(),
            committed: (0..settings.partitions).map(|_| AtomicU64::new(0)).collect(),
            ready: AtomicBool::new(false),
            data_dir: data_dir.clone(),
            rows_written: AtomicU64::new(0),
            checkpoint_bytes: AtomicU64::new(0),
            checkpoint_written_bytes: AtomicU64::new(0),
            stalled: Mutex::new(None),
        });
        let shutdown = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel(1024);

        let mut aggregator = aggregate::Aggregator::recover(
            settings,
            engine_config,
            store,
            log,
            query.clone(),
            tx.clone(),
            shutdown.clone(),
        )?;
        let popular_thread = {
            let query = query.clone();
            let sealed = aggregator.sealed_below();
            spawn("popular", move || recovery::rebuild_popular(&query, sealed))?
        };
        let fatal = Arc::new(Fatal::default());
        let writer_thread = {
            let (shutdown, fatal) = (shutdown.clone(), fatal.clone());
            let retention = settings.log_retention;
            spawn("log", move || writer::write_loop(writer, rx, shutdown, retention, &fatal))?
        };
        let archiver_thread = {
            let shutdown = shutdown.clone();
            spawn("archive", move || archiver.run(archive_rx, &shutdown))?
        };
        let aggregator_thread = {
            let shutdown = shutdown.clone();
            spawn("aggregate", move || aggregator.run(&shutdown))?
        };
        Ok(Pipeline {
            ingest: Ingest {
                tx,
                partitions: settings.partitions,
                query: query.clone(),
                max_lag_records: settings.max_lag_records,
            },
            query,
            fatal,
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
