//! The scale-out deployment (SPEC §4, §5): Kafka for the click stream, PostgreSQL for results,
//! and four roles that run alone or together (`--roles collect,aggregate,query,archive`).
//!
//! ```text
//!  collect:   HTTP POST /v1/clicks → validate → Kafka (idempotent, acks=all, key ad_id) → answer
//!  aggregate: consumer group member → one engine per owned partition → one PostgreSQL
//!             transaction per partition commit (results + offset + checkpoint, epoch-fenced)
//!  query:     HTTP GET … → PostgreSQL: counts summed over partitions, per-partition top-N merged
//!  archive:   the topic → Parquet files per event hour, offsets in PostgreSQL (one at a time)
//! ```
//!
//! The engine, its checkpoints and the HTTP API are the embedded service's; only the source
//! (Kafka instead of the log) and the store (PostgreSQL instead of the embedded one) differ.

pub mod aggregate;
pub mod archive;
pub mod conn;
pub mod kafka;
pub mod pg;
pub mod recalc;
mod results;

pub use results::PgResults;

/// The first byte of a record the collector produced: a validated click in `event::wire` form
/// follows. NDJSON lines never start with it.
pub const WIRE_MAGIC: u8 = 0;

/// The first byte of an aggregator's end marker (see `aggregate::Owned::marker`): a nonce and
/// the wall time it was sent follow. Neither collector records nor NDJSON lines start with it;
/// the aggregators and the archiver skip it.
pub const MARKER_MAGIC: u8 = 1;

/// An end marker's bytes.
pub fn marker(nonce: u64, wall: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(17);
    v.push(MARKER_MAGIC);
    v.extend_from_slice(&nonce.to_le_bytes());
    v.extend_from_slice(&wall.to_le_bytes());
    v
}

/// An end marker's nonce and wall time, if `bytes` is one.
pub fn read_marker(bytes: &[u8]) -> Option<(u64, i64)> {
    let rest = bytes.strip_prefix(&[MARKER_MAGIC])?;
    let (nonce, wall) = rest.split_at_checked(8)?;
    Some((u64::from_le_bytes(nonce.try_into().ok()?), i64::from_le_bytes(wall.try_into().ok()?)))
}

/// Why a scale-out role cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(transparent)]
    Postgres(#[from] pg::PgError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaError),
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
    /// A partition's committed state cannot be resumed; the message says why.
    #[error("{0}")]
    State(String),
}

/// Connects to the results database, applies the schema and checks that `settings` are those
/// the results were made with (recorded by the first start).
pub fn prepare_database(
    settings: &crate::config::Settings,
    scale: &crate::config::ScaleOut,
) -> Result<postgres::Client, pg::PgError> {
    let mut recorded = settings.recorded();
    recorded.push(("topic".into(), scale.topic.clone()));
    let mut client = pg::connect(&scale.postgres)?;
    pg::migrate(&mut client)?;
    pg::check_settings(&mut client, &recorded)?;
    Ok(client)
}
