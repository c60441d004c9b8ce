//! adclick: exact, crash-safe ad click event aggregation.
//!
//! Clicks (NDJSON, SPEC §1) are counted per ad per one-minute event-time window, per pre-defined
//! filter, deduplicated, with the most-clicked ads per minute, exactly once.
//!
//! Modules in layers, lowest first: each uses only modules above it in this list (a test,
//! `tests/it/layers.rs`, fails on any import against this order).
//!
//! ```text
//! fault      the one fatal stop, error chains, crash points for tests
//! event      the click of SPEC §1: AdId, EventTime, Minute, Identity; parse + validate (pure)
//! filter     pre-defined filters compiled to bitsets and CIDR ranges; a mask per click (pure)
//! rank       the one top-N order: count descending, then ad_id bytes ascending (pure)
//! engine     map → aggregate → reduce: watermarks, dedup, windows, corrections, top-N (pure)
//! popular    exact popular ads over 1–1440 minutes; the index commits and queries share (pure)
//! window     tumbling, hopping, sliding and session windows over per-minute counts (pure)
//! generate   deterministic synthetic clicks for demos, tests and benchmarks
//! telemetry  metric names, the Prometheus recorder, and the reports both deployments export
//! log        the embedded click log: segmented, CRC-framed, group-committed partitions
//! store      the embedded results store: counts, top-N, offsets, journal, checkpoints (redb)
//! archive    every accepted click as Parquet by event hour; the archiver over a Source and Ledger
//! recalc     recalculation and reconciliation of a range from the archive
//! config     settings: each declared once; file, variables and flags into validated Settings
//! api        the HTTP API over three small traits: Collector, Results, Jobs
//! pipeline   the embedded service: log writer, aggregator and archiver threads, recovery
//! scaleout   Kafka and PostgreSQL behind the same traits: collector, aggregator, query, archive
//! serve      assembles one process (embedded or scale-out roles) and runs it until a signal
//! cmd        the other commands: recalc and reconcile, ship, status, generate, bench
//! cli        clap types and dispatch
//! ```
//!
//! The pure modules do no I/O and read no clock: the caller passes wall-clock time in, so every
//! decision replays identically. Adapters (log, store, archive, Kafka, PostgreSQL, HTTP) are
//! built on top of them.
pub mod fault;

pub mod event;
pub mod filter;
pub mod rank;

pub mod engine;
pub mod generate;
pub mod popular;
pub mod telemetry;
pub mod window;

pub mod archive;
pub mod log;
pub mod recalc;
pub mod store;

pub mod api;
pub mod config;

pub mod pipeline;
pub mod scaleout;

pub mod cli;
pub mod cmd;
pub mod serve;
