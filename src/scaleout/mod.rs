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
pub mod kafka;
pub mod pg;
mod results;

pub use results::PgResults;

/// The first byte of a record the collector produced: a validated click in `event::wire` form
/// follows. NDJSON lines never start with it.
pub const WIRE_MAGIC: u8 = 0;

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
