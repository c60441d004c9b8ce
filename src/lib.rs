//! adclick: exact, crash-safe ad click event aggregation.
pub mod engine;
pub mod event;
pub mod filter;
pub mod generate;
pub mod rank;
