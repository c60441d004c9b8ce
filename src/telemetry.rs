//! Metrics (docs/operations.md, "Metrics"): one Prometheus recorder per process, from the `metrics` crate and
//! its exporter, rendered at `GET /metrics`.
//!
//! ```text
//!  hot paths ── histogram!(…).record(s) ───────────────┐
//!  service state (atomics, engine views, files on disk) ─ set just before a render ─→ render
//!  process (RSS, CPU, fds: metrics-process) ───────────┘
//! ```
//!
//! Durations are histograms recorded where they happen. Counters and gauges the embedded service
//! already keeps for itself (offsets, counters of the engine, bytes) are copied into the recorder
//! right before each render, so the hot paths pay nothing for them; a scale-out aggregator sets
//! its partitions' gauges after each round of commits instead (it runs in its own thread). Every
//! name is in [`DESCRIBED`], with one prefix and Prometheus' base units.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::engine::{Counters, Engine, PartitionId, Watermark};
use crate::event::{InvalidKind, MINUTE_MS};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

pub const REQUESTS: &str = "adclick_http_requests_total";
pub const INGEST_ACK: &str = "adclick_ingest_ack_duration_seconds";
pub const INGEST_INFLIGHT: &str = "adclick_ingest_inflight_bytes";
pub const ACCEPTED: &str = "adclick_clicks_accepted_total";
pub const INVALID: &str = "adclick_lines_invalid_total";
pub const LATENESS: &str = "adclick_event_lateness_seconds";
pub const COUNTED: &str = "adclick_clicks_counted_total";
pub const DUPLICATE: &str = "adclick_clicks_duplicate_total";
pub const LATE_CORRECTED: &str = "adclick_clicks_late_corrected_total";
pub const TOO_LATE: &str = "adclick_clicks_too_late_total";
pub const ROWS_WRITTEN: &str = "adclick_rows_written_total";
pub const FSYNC: &str = "adclick_log_fsync_duration_seconds";
pub const COMMIT: &str = "adclick_commit_duration_seconds";
pub const CHECKPOINT: &str = "adclick_checkpoint_duration_seconds";
pub const CHECKPOINT_BYTES: &str = "adclick_checkpoint_bytes";
pub const CHECKPOINT_WRITTEN: &str = "adclick_checkpoint_written_bytes_total";
pub const FINAL_DELAY: &str = "adclick_minute_final_delay_seconds";
pub const QUERY: &str = "adclick_query_duration_seconds";
pub const WATERMARK: &str = "adclick_watermark_timestamp_seconds";
pub const WATERMARK_DELAY: &str = "adclick_watermark_delay_seconds";
pub const LAG: &str = "adclick_lag_records";
pub const ARCHIVE_LAG: &str = "adclick_archive_lag_records";
pub const PARTITION_END: &str = "adclick_partition_log_end_offset";
pub const PARTITION_COMMITTED: &str = "adclick_partition_committed_offset";
pub const PARTITION_LAG: &str = "adclick_partition_lag_records";
pub const PARTITION_WATERMARK: &str = "adclick_partition_watermark_timestamp_seconds";
pub const PARTITION_IDLE: &str = "adclick_partition_idle";
pub const DEDUP_ENTRIES: &str = "adclick_dedup_entries";
pub const DEDUP_BYTES: &str = "adclick_dedup_bytes";
pub const OPEN_WINDOWS: &str = "adclick_open_windows";
pub const LOG_WRITTEN: &str = "adclick_log_written_bytes_total";
pub const LOG_DISK: &str = "adclick_log_disk_bytes";
pub const STORE_DISK: &str = "adclick_store_disk_bytes";
pub const STALLED: &str = "adclick_commits_stalled";
pub const BUILD_INFO: &str = "adclick_build_info";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric adclick exports besides the `process_*` ones: name, kind, help (the table of
/// docs/operations.md is checked against this list).
pub const DESCRIBED: &[(&str, Kind, &str)] = &[
    (REQUESTS, Kind::Counter, "HTTP requests answered, by endpoint and status code."),
    (INGEST_ACK, Kind::Histogram, "POST /v1/clicks: request received to clicks durable and answered."),
    (INGEST_INFLIGHT, Kind::Gauge, "Ingest body bytes held in memory now."),
    (ACCEPTED, Kind::Counter, "Clicks accepted and durable."),
    (INVALID, Kind::Counter, "Lines rejected at ingestion, by reason."),
    (LATENESS, Kind::Histogram, "Arrival time minus event time of accepted clicks (0 for times ahead of the clock)."),
    (COUNTED, Kind::Counter, "Distinct clicks counted."),
    (DUPLICATE, Kind::Counter, "Duplicate clicks not counted again."),
    (LATE_CORRECTED, Kind::Counter, "Clicks counted into a minute that was already final."),
    (TOO_LATE, Kind::Counter, "Clicks older than allowed_lateness behind the watermark, kept in the log, not counted live."),
    (ROWS_WRITTEN, Kind::Counter, "Count rows (minute, ad) written to the store."),
    (FSYNC, Kind::Histogram, "fsync of the click log (every dirty partition)."),
    (COMMIT, Kind::Histogram, "One store commit: results, offsets and journal."),
    (CHECKPOINT, Kind::Histogram, "Taking and writing one engine checkpoint durably."),
    (CHECKPOINT_BYTES, Kind::Gauge, "Size of the last checkpoint written."),
    (CHECKPOINT_WRITTEN, Kind::Counter, "Bytes of checkpoints written."),
    (FINAL_DELAY, Kind::Histogram, "Minute end to the minute turning final (includes watermark_delay)."),
    (QUERY, Kind::Histogram, "Query latency, by endpoint."),
    (WATERMARK, Kind::Gauge, "The committed event-time watermark (Unix seconds)."),
    (WATERMARK_DELAY, Kind::Gauge, "Wall clock minus the committed watermark."),
    (LAG, Kind::Gauge, "Durable records not yet aggregated."),
    (ARCHIVE_LAG, Kind::Gauge, "Durable records not yet archived."),
    (PARTITION_END, Kind::Gauge, "Next offset to be written, by partition."),
    (PARTITION_COMMITTED, Kind::Gauge, "Next offset the aggregator has committed, by partition."),
    (PARTITION_LAG, Kind::Gauge, "Records durable but not aggregated, by partition."),
    (PARTITION_WATERMARK, Kind::Gauge, "A partition's own watermark: its newest event time minus watermark_delay (Unix seconds)."),
    (PARTITION_IDLE, Kind::Gauge, "1 when the partition is idle and does not hold the watermark back."),
    (DEDUP_ENTRIES, Kind::Gauge, "Click identities held for deduplication."),
    (DEDUP_BYTES, Kind::Gauge, "Memory the deduplication state holds."),
    (OPEN_WINDOWS, Kind::Gauge, "Minute windows held by the engine (not yet sealed)."),
    (LOG_WRITTEN, Kind::Counter, "Bytes appended to the click log since start."),
    (LOG_DISK, Kind::Gauge, "Bytes of click log segments on disk."),
    (STORE_DISK, Kind::Gauge, "Bytes of the store and its checkpoints on disk."),
    (STALLED, Kind::Gauge, "1 while results cannot be committed (a full or failing disk; scaled out, PostgreSQL unreachable) and the aggregator retries."),
    (BUILD_INFO, Kind::Gauge, "Always 1; the labels name the version."),
];

/// Bucket bounds (seconds) of latencies: 100 µs to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// Event lateness: from on time to a day.
const LATENESS_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0,
    86400.0,
];
/// Minute end to final: around watermark_delay (15 s by default) and up to an hour.
const FINAL_BUCKETS: &[f64] =
    &[1.0, 5.0, 10.0, 15.0, 16.0, 17.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0];

pub struct Telemetry {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static GLOBAL: OnceLock<Option<Telemetry>> = OnceLock::new();

/// Installs the process's recorder once (later calls return it). `None` when another recorder
/// was installed first (only in tests that embed the library).
pub fn install() -> Option<&'static Telemetry> {
    GLOBAL
        .get_or_init(|| {
            // A gauge not set for a minute disappears: a partition another aggregator took
            // over is no longer reported by this one.
            let handle = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(60)))
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(LATENESS.into()), LATENESS_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(FINAL_DELAY.into()), FINAL_BUCKETS)
                })
                .expect("bucket lists are not empty")
                .install_recorder()
                .ok()?;
            for &(name, kind, help) in DESCRIBED {
                match kind {
                    Kind::Counter => metrics::describe_counter!(name, help),
                    Kind::Gauge => metrics::describe_gauge!(name, help),
                    Kind::Histogram => metrics::describe_histogram!(name, help),
                }
            }
            let process = metrics_process::Collector::default();
            process.describe();
            // Histogram samples are folded in and descriptions published once a second, so
            // that memory between scrapes stays bounded.
            let upkeep = handle.clone();
            let _ =
                std::thread::Builder::new().name("adclick-metrics".into()).spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(1));
                    upkeep.run_upkeep();
                });
            Some(Telemetry { handle, process })
        })
        .as_ref()
}

impl Telemetry {
    /// The exposition text, after process metrics are read.
    pub fn render(&self) -> String {
        self.process.collect();
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        self.handle.render()
    }
}

/// Observes, for each minute that turned final between watermarks `before` and `after`, how
/// long after its end that happened (at most the newest hour of them: a backfill or a restart
/// that moves the watermark far says nothing about freshness beyond that).
pub fn observe_final(before: Watermark, after: Watermark, wall: i64) {
    let (Some(before), Some(after)) = (before.ms(), after.ms()) else { return };
    // Minute ends in (before, after]: multiples of a minute.
    let first = before.div_euclid(MINUTE_MS) + 1;
    let last = after.div_euclid(MINUTE_MS);
    let histogram = metrics::histogram!(FINAL_DELAY);
    for end in first.max(last - 59)..=last {
        histogram.record((wall - end * MINUTE_MS).max(0) as f64 / 1000.0);
    }
}

/// Records a duration in seconds.
pub fn observe(name: &'static str, d: Duration) {
    metrics::histogram!(name).record(d.as_secs_f64());
}

/// Sets a counter from a total the service keeps itself.
pub fn set_counter(name: &'static str, v: u64) {
    metrics::counter!(name).absolute(v);
}

pub fn set_gauge(name: &'static str, v: f64) {
    metrics::gauge!(name).set(v);
}

/// Why this process cannot commit results now (its database unreachable), by the connection
/// that cannot (see [`set_stalled`]).
static STALLED_BECAUSE: std::sync::Mutex<std::collections::BTreeMap<u64, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Records why connection `key` of this process cannot commit results (`None`: it can again),
/// for `/healthz` and [`STALLED`] (1 while any cannot).
pub fn set_stalled(key: u64, why: Option<String>) {
    let mut stalled = STALLED_BECAUSE.lock().expect("not poisoned");
    match why {
        Some(why) => stalled.insert(key, why),
        None => stalled.remove(&key),
    };
    set_gauge(STALLED, f64::from(u8::from(!stalled.is_empty())));
}

/// Why this process cannot commit results now, if it cannot (see [`set_stalled`]).
pub fn stalled() -> Option<String> {
    let stalled = STALLED_BECAUSE.lock().expect("not poisoned");
    (!stalled.is_empty()).then(|| stalled.values().cloned().collect::<Vec<_>>().join("; "))
}

/// A per-partition gauge.
pub fn set_partition_gauge(name: &'static str, p: u32, v: f64) {
    metrics::gauge!(name, "partition" => p.to_string()).set(v);
}

/// The collector's totals: clicks accepted and lines rejected by reason.
#[derive(Default)]
pub struct IngestCounters {
    accepted: AtomicU64,
    rejected: [AtomicU64; InvalidKind::ALL.len()],
}

impl IngestCounters {
    /// Adds one request's accepted clicks and rejected lines (per [`InvalidKind::index`]).
    pub fn add(&self, accepted: u64, rejected: &[u64; InvalidKind::ALL.len()]) {
        self.accepted.fetch_add(accepted, Ordering::Relaxed);
        for (total, &n) in self.rejected.iter().zip(rejected) {
            if n > 0 {
                total.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Copies the totals into the recorder.
    pub fn export(&self) {
        set_counter(ACCEPTED, self.accepted());
        for kind in InvalidKind::ALL {
            metrics::counter!(INVALID, "reason" => kind.label())
                .absolute(self.rejected[kind.index()].load(Ordering::Relaxed));
        }
    }
}

/// What an aggregator reports, embedded or scaled out: its engines' counters and state, and per
/// partition its position and watermark. One export for both deployments.
#[derive(Clone, Debug, Default)]
pub struct AggregatorReport {
    pub counters: Counters,
    pub dedup_entries: u64,
    pub dedup_bytes: u64,
    pub open_windows: u64,
    pub partitions: Vec<PartitionReport>,
}

/// One source partition as an aggregator sees it.
#[derive(Clone, Debug, Default)]
pub struct PartitionReport {
    pub id: PartitionId,
    /// The next offset the aggregator has committed.
    pub committed: u64,
    /// The source's end (the log's durable end), when known here.
    pub end: Option<u64>,
    /// The partition's own watermark (none until it delivers).
    pub watermark: Watermark,
    pub idle: bool,
}

impl AggregatorReport {
    /// Adds an engine's counters, state and partitions (their `committed` left at 0).
    pub fn add_engine(&mut self, engine: &Engine) {
        self.counters.add(&engine.counters());
        let (dedup, windows) = engine.shard_stats();
        self.dedup_entries += dedup as u64;
        self.open_windows += windows as u64;
        self.dedup_bytes += engine.dedup_bytes() as u64;
        for v in engine.partitions() {
            self.partitions.push(PartitionReport {
                id: v.id,
                committed: 0,
                end: None,
                watermark: v.watermark,
                idle: v.idle,
            });
        }
    }

    /// Copies the report into the recorder.
    pub fn export(&self) {
        set_counter(COUNTED, self.counters.counted);
        set_counter(DUPLICATE, self.counters.duplicate);
        set_counter(LATE_CORRECTED, self.counters.late_corrected);
        set_counter(TOO_LATE, self.counters.too_late);
        set_gauge(DEDUP_ENTRIES, self.dedup_entries as f64);
        set_gauge(DEDUP_BYTES, self.dedup_bytes as f64);
        set_gauge(OPEN_WINDOWS, self.open_windows as f64);
        for p in &self.partitions {
            let id = p.id.0;
            set_partition_gauge(PARTITION_COMMITTED, id, p.committed as f64);
            if let Some(end) = p.end {
                set_partition_gauge(PARTITION_END, id, end as f64);
                set_partition_gauge(PARTITION_LAG, id, end.saturating_sub(p.committed) as f64);
            }
            // A partition that has delivered nothing has no watermark of its own yet.
            if let Some(w) = p.watermark.ms() {
                set_partition_gauge(PARTITION_WATERMARK, id, w as f64 / 1000.0);
            }
            set_partition_gauge(PARTITION_IDLE, id, f64::from(u8::from(p.idle)));
        }
    }
}
