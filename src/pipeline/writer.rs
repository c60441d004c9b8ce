//! The log writer thread and the collector's way into it.
//!
//! ```text
//!  Ingest::append ──Append { parts, reply }──▶ (bounded channel) ──▶ write_loop:
//!                                             drain every pending append, write, one fsync,
//!                                             answer every waiting client with the same result
//!  aggregator ──DeleteBelow(offsets)──────────▶ retention, between group commits
//! ```
//!
//! A failed write or fsync is answered as the [`LogError`] it is (shared by every request of that
//! group commit), then raised as [`Fatal`]: the process stops (after delivering the answers in
//! flight, when it serves HTTP), since the log refuses writes once an fsync failed, and a restart
//! recovers from what is durable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{Fatal, QueryState};
use crate::api::{Collector, IngestError};
use crate::engine::{Offset, PartitionId};
use crate::log::{LogError, Writer};

pub(super) enum ToWriter {
    Append {
        parts: Vec<(PartitionId, Vec<Vec<u8>>)>,
        reply: tokio::sync::oneshot::Sender<Result<(), Arc<LogError>>>,
    },
    DeleteBelow(Vec<(PartitionId, Offset)>),
}

/// The collector's way into the log.
#[derive(Clone)]
pub struct Ingest {
    pub(super) tx: SyncSender<ToWriter>,
    pub(super) partitions: u32,
    /// For backpressure: records durable but not aggregated yet.
    pub(super) query: Arc<QueryState>,
    pub(super) max_lag_records: u64,
}

impl Ingest {
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

impl Collector for Ingest {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn overloaded(&self) -> Option<String> {
        let lag = self.query.lag();
        (lag > self.max_lag_records).then(|| format!("{lag} records wait for aggregation"))
    }

    fn append(
        &self,
        parts: Vec<(PartitionId, Vec<Vec<u8>>)>,
    ) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(Ingest::append(self, parts))
    }
}

pub(super) fn write_loop(
    mut writer: Writer,
    rx: Receiver<ToWriter>,
    shutdown: Arc<AtomicBool>,
    retention: Duration,
    fatal: &Fatal,
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
        let mut result: Result<(), Arc<LogError>> = Ok(());
        let mut replies = Vec::new();
        for m in pending {
            match m {
                ToWriter::Append { parts, reply } => {
                    if result.is_ok() {
                        for (p, records) in &parts {
                            if let Err(e) = writer.append(*p, records.iter().map(Vec::as_slice)) {
                                result = Err(Arc::new(e));
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
            result = writer.sync().map_err(Arc::new);
        }
        for r in replies {
            let _ = r.send(result.clone());
        }
        if let Err(e) = result {
            if writer.poisoned() {
                // Later appends find the channel closed and are answered 503 meanwhile.
                return fatal.raise("appending to the log", e);
            }
            // A write refused (a full disk) was cut off: nothing of it is acknowledged, and the
            // next group commit tries again.
            tracing::warn!("appending to the log: {e}; answered, nothing acknowledged");
        }
    }
}
