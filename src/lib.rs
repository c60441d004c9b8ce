//! adclick: exact, crash-safe ad click event aggregation.
pub mod event;
