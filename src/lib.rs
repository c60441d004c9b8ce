//! adclick: exact, crash-safe ad click event aggregation.
//!
//! Clicks (NDJSON, SPEC §1) are counted per ad per one-minute event-time window, per pre-defined
//! filter, deduplicated, with the most-clicked ads per minute, exactly once.
//!
//! Layout, in dependency order (each module uses only those above it):
//!
//! ```text
//! event     ClickEvent model: AdId, EventTime, Minute, Country, Identity; parse + validate (pure)
//! filter    pre-defined filters compiled to bitsets and CIDR ranges; FilterMask per click (pure)
//! rank      the one top-N order: count descending, then ad_id bytes ascending (pure)
//! engine    map → aggregate → reduce: watermarks, dedup, windows, corrections, top-N, snapshots (pure)
//! popular   exact popular ads over 1–1440 minutes from per-minute counts (pure)
//! generate  deterministic synthetic clicks for demos, tests and benchmarks
//! ```
//!
//! The pure modules do no I/O and read no clock: the caller passes wall-clock time in, so every
//! decision replays identically. Adapters (log, store, HTTP) are built on top of them.
pub mod event;
pub mod filter;
pub mod rank;

pub mod engine;
pub mod generate;
pub mod popular;

pub mod log;
pub mod store;

pub mod archive;

pub mod admin;
pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod fault;
pub mod pipeline;
pub mod recalc;
pub mod scaleout;
pub mod ship;
pub mod telemetry;
