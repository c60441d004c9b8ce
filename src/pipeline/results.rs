//! The embedded service as the HTTP API sees it: committed results (recent windows from the
//! in-memory popular index, older ones from the store), health, metrics, and admin jobs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{dir_bytes, QueryState};
use crate::api::{Health, HealthStatus, Jobs, ReadError, Results};
use crate::engine::{PartitionId, Slot, Watermark};
use crate::event::{EventTime, Minute};
use crate::rank::Ranked;
use crate::recalc::{Job, JobError, JobResult, Progress};
use crate::telemetry::{self as t, set_counter, set_gauge, PartitionReport};

/// A store that cannot be read while its disk fails is unavailable for now (503), not broken.
fn read_error(e: crate::store::StoreError) -> ReadError {
    if e.is_io() {
        ReadError::Unavailable(Box::new(e))
    } else {
        ReadError::Store(e)
    }
}

/// How long an admin job waits for the aggregator to catch up with the log.
const JOB_CATCH_UP: Duration = Duration::from_secs(600);

impl Results for QueryState {
    fn series(
        &self,
        ad: &str,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), ReadError> {
        self.store.series(ad, slot, from, to).map_err(read_error)
    }

    fn popular(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
        n: usize,
    ) -> Result<(Vec<Ranked>, Watermark), ReadError> {
        let mut live = self.live.read();
        if from >= live.keep_from {
            let window = (to.0 - from.0) as u32;
            let ads = live.slots[slot.index()].top(to, window, n);
            return Ok((ads, live.watermark));
        }
        drop(live);
        self.store.popular(slot, from, to, n).map_err(read_error)
    }

    /// From the in-memory index for the last day (a step per minute); older windows are one
    /// pass over the stored rows of their minutes, in memory that follows the minutes.
    fn totals(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), ReadError> {
        let live = self.live.read();
        if from >= live.keep_from {
            return Ok((live.slots[slot.index()].totals(from, to), live.watermark));
        }
        drop(live);
        self.store.minute_totals(slot, from, to).map_err(read_error)
    }

    fn health(&self) -> Health {
        let ready = self.ready.load(Ordering::Acquire);
        let stalled = self.stalled();
        let status = match (ready, &stalled) {
            (_, Some(_)) => HealthStatus::Unavailable,
            (true, None) => HealthStatus::Ok,
            (false, None) => HealthStatus::Starting,
        };
        Health {
            watermark: Some(self.watermark.load()),
            lag_records: Some(self.lag()),
            archive_lag_records: Some(self.archive_lag()),
            error: stalled,
            ..Health::new(status)
        }
    }

    /// Copies the aggregator's state into the recorder, for a render of `/metrics`.
    fn export_metrics(&self) {
        let mut report = self.report.lock().expect("not poisoned").clone();
        // Every partition of the log, whether or not the engine has reported it yet.
        let ends = self.log.durable_ends();
        let engine = std::mem::take(&mut report.partitions);
        report.partitions = (0..ends.len())
            .map(|i| {
                let id = PartitionId(i as u32);
                PartitionReport {
                    committed: self.committed[i].load(Ordering::Acquire),
                    end: Some(ends[i]),
                    ..engine
                        .iter()
                        .find(|p| p.id == id)
                        .cloned()
                        .unwrap_or(PartitionReport { id, ..PartitionReport::default() })
                }
            })
            .collect();
        report.export();
        set_gauge(t::STALLED, f64::from(u8::from(self.stalled().is_some())));
        set_counter(t::ROWS_WRITTEN, self.rows_written.load(Ordering::Relaxed));
        set_counter(t::CHECKPOINT_WRITTEN, self.checkpoint_written_bytes.load(Ordering::Relaxed));
        set_counter(t::LOG_WRITTEN, self.log.appended_bytes());
        set_gauge(t::CHECKPOINT_BYTES, self.checkpoint_bytes.load(Ordering::Relaxed) as f64);
        set_gauge(t::LAG, self.lag() as f64);
        set_gauge(t::ARCHIVE_LAG, self.archive_lag() as f64);
        if let Some(w) = self.watermark.load().ms() {
            set_gauge(t::WATERMARK, w as f64 / 1000.0);
            set_gauge(t::WATERMARK_DELAY, (EventTime::now().0 - w) as f64 / 1000.0);
        }
        set_gauge(t::LOG_DISK, dir_bytes(&self.data_dir.join("log")) as f64);
        let store = std::fs::metadata(self.data_dir.join("store.redb")).map_or(0, |m| m.len());
        set_gauge(t::STORE_DISK, (store + dir_bytes(&self.data_dir.join("checkpoints"))) as f64);
    }
}

impl Jobs for QueryState {
    fn busy(&self) -> bool {
        self.job_running()
    }

    fn run(
        &self,
        job: Job,
        from: Minute,
        to: Minute,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<JobResult, JobError> {
        self.run_job(job, from, to, JOB_CATCH_UP, progress)
    }

    fn explain(&self, q: &crate::recalc::Question) -> Result<crate::recalc::Explained, JobError> {
        QueryState::explain(self, q, JOB_CATCH_UP)
    }
}
