//! The archiver: one loop over a [`Source`] of accepted clicks and a [`Ledger`] of its offsets,
//! the embedded log and store here, Kafka and PostgreSQL scaled out (see the module doc of
//! `archive` for the flush protocol).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::format::BATCH_ROWS;
use super::{Archive, ArchiveError, ArchiveSettings, FileWriter};
use crate::engine::{Offset, OffsetRange, PartitionId};
use crate::event::{wire, Click};
use crate::log::{read_ranges, LogHandle, Reader, Records};
use crate::store::{ArchiveState, Store};

/// Where the archiver reads accepted clicks: the embedded click log ([`LogSource`]) or Kafka
/// (`scaleout::archive`). Offsets are dense per partition; a range is read the same every time.
pub trait Source: Send {
    /// What it is, for messages: "log", "topic".
    fn name(&self) -> &'static str;
    fn partitions(&self) -> usize;
    /// Called once before reading, with the archiver's position per partition. Refuses a
    /// source that ends below them: it lost records.
    fn start(&mut self, positions: &[u64]) -> Result<(), ArchiveError> {
        let ends = self.ends()?;
        for (p, (&end, &at)) in ends.iter().zip(positions).enumerate() {
            if end < at {
                return Err(ArchiveError::Source(format!(
                    "partition {p}: the {name} ends at offset {end} but the archive holds records \
                     up to {at}; the {name} lost records (damaged, deleted or restored files, or \
                     a topic recreated)",
                    name = self.name()
                )));
            }
        }
        Ok(())
    }
    /// Per partition, the offset below which records can be read now.
    fn ends(&mut self) -> Result<Vec<u64>, ArchiveError>;
    /// Calls `f` with every accepted click of `[from, to)` of `p`, in offset order (a source of
    /// raw lines skips those that are not valid clicks).
    fn read(
        &mut self,
        p: PartitionId,
        from: Offset,
        to: Offset,
        f: &mut dyn FnMut(Offset, &Click<'_>) -> Result<(), ArchiveError>,
    ) -> Result<(), ArchiveError>;
}

/// Where the archiver keeps its offsets and the flush it is writing: the embedded store, or
/// PostgreSQL (`scaleout::archive`).
pub trait Ledger: Send {
    fn state(&self) -> Result<ArchiveState, ArchiveError>;
    /// Records, durably, that flush `seq` writes `ranges`.
    fn begin(&self, seq: u64, ranges: &[OffsetRange]) -> Result<(), ArchiveError>;
    /// Advances the offsets past `ranges` and clears flush `seq`, in one transaction.
    fn commit(&self, seq: u64, ranges: &[OffsetRange]) -> Result<(), ArchiveError>;
}

/// The embedded click log as the archiver's source.
pub struct LogSource {
    log: LogHandle,
    readers: Vec<Reader>,
    buf: Vec<Records>,
}

impl LogSource {
    pub fn new(log: LogHandle) -> LogSource {
        let partitions = log.partitions();
        LogSource {
            readers: (0..partitions).map(|p| log.reader(PartitionId(p as u32))).collect(),
            buf: (0..partitions).map(|_| Records::default()).collect(),
            log,
        }
    }
}

impl Source for LogSource {
    fn name(&self) -> &'static str {
        "log"
    }

    fn partitions(&self) -> usize {
        self.log.partitions()
    }

    fn ends(&mut self) -> Result<Vec<u64>, ArchiveError> {
        Ok(self.log.durable_ends())
    }

    fn read(
        &mut self,
        p: PartitionId,
        from: Offset,
        to: Offset,
        f: &mut dyn FnMut(Offset, &Click<'_>) -> Result<(), ArchiveError>,
    ) -> Result<(), ArchiveError> {
        let mut at = from.0;
        while at < to.0 {
            let end = (at + BATCH_ROWS as u64).min(to.0);
            let slice = [OffsetRange::new(p, Offset(at), Offset(end))];
            read_ranges(&mut self.readers, &mut self.buf, &slice)?;
            for (offset, bytes) in self.buf[p.0 as usize].iter() {
                let click = wire::decode(bytes).ok_or_else(|| {
                    ArchiveError::Source(format!(
                        "partition {} offset {}: the log record does not decode as a click",
                        p.0, offset.0
                    ))
                })?;
                f(offset, &click)?;
            }
            at = end;
        }
        Ok(())
    }
}

/// The embedded store as the archiver's ledger.
impl Ledger for Arc<Store> {
    fn state(&self) -> Result<ArchiveState, ArchiveError> {
        Ok(self.archive_state()?)
    }

    fn begin(&self, seq: u64, ranges: &[OffsetRange]) -> Result<(), ArchiveError> {
        Ok(self.archive_begin(seq, ranges)?)
    }

    fn commit(&self, seq: u64, ranges: &[OffsetRange]) -> Result<(), ArchiveError> {
        Ok(self.archive_commit(seq, ranges)?)
    }
}

/// The consumer that fills the archive (see the module doc).
pub struct Archiver {
    archive: Arc<Archive>,
    source: Box<dyn Source>,
    ledger: Box<dyn Ledger>,
    /// Per partition: the next offset to archive; published for log retention and status.
    archived: Arc<Vec<AtomicU64>>,
    seq: u64,
    /// A flush recorded in the store whose files are not all written (an error): redone first.
    pending: Option<Vec<OffsetRange>>,
    /// The pending flush is redone after a crash: remove what its first attempt left.
    redoing: bool,
    file_rows: usize,
    flush_interval: Duration,
}

/// Asks a running archiver to archive everything durable now; answered when done (the error
/// shared: the archiver keeps it to log and retry).
pub type FlushRequest = std::sync::mpsc::Sender<Result<(), Arc<ArchiveError>>>;

impl Archiver {
    /// Reads the archiver's offsets and redoes a flush a crash interrupted.
    pub fn recover(
        archive: Arc<Archive>,
        store: Arc<Store>,
        log: LogHandle,
        settings: &ArchiveSettings,
    ) -> Result<Archiver, ArchiveError> {
        Archiver::recover_from(archive, Box::new(LogSource::new(log)), Box::new(store), settings)
    }

    /// As [`Archiver::recover`], from any source and ledger.
    pub fn recover_from(
        archive: Arc<Archive>,
        mut source: Box<dyn Source>,
        ledger: Box<dyn Ledger>,
        settings: &ArchiveSettings,
    ) -> Result<Archiver, ArchiveError> {
        let state = ledger.state()?;
        let partitions = source.partitions();
        let mut positions = vec![0u64; partitions];
        for &(p, o) in &state.offsets {
            if p.0 as usize >= partitions {
                return Err(ArchiveError::Source(format!(
                    "the archive's offsets name partition {}, the source has {partitions}",
                    p.0
                )));
            }
            positions[p.0 as usize] = o.0;
        }
        source.start(&positions)?;
        let archived: Vec<AtomicU64> = positions.iter().map(|&o| AtomicU64::new(o)).collect();
        let mut a = Archiver {
            archive,
            source,
            ledger,
            archived: Arc::new(archived),
            seq: state.next_seq,
            pending: None,
            redoing: false,
            file_rows: settings.file_rows.max(1),
            flush_interval: settings.flush_interval,
        };
        if let Some((seq, ranges)) = state.pending {
            tracing::info!(seq, "redoing an archive flush a crash interrupted");
            a.seq = seq;
            a.pending = Some(ranges);
            a.redoing = true;
            a.redo_pending()?;
        }
        Ok(a)
    }

    /// Per partition, the next offset to archive.
    pub fn archived(&self) -> Arc<Vec<AtomicU64>> {
        self.archived.clone()
    }

    /// Archives every record durable now, in flushes of at most `file_rows`.
    pub fn catch_up(&mut self) -> Result<u64, ArchiveError> {
        let target = self.source.ends()?;
        let mut total = 0;
        loop {
            let n = self.flush_once(&target)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Writes and commits the recorded flush an error interrupted, if any.
    fn redo_pending(&mut self) -> Result<(), ArchiveError> {
        if let Some(ranges) = self.pending.clone() {
            self.write_flush(&ranges)?;
            self.pending = None;
        }
        Ok(())
    }

    /// One flush of the records below `target` not yet archived; returns how many.
    fn flush_once(&mut self, target: &[u64]) -> Result<u64, ArchiveError> {
        self.redo_pending()?;
        let parts = target.len();
        let per_part = self.file_rows.div_ceil(parts.max(1)) as u64;
        let ranges: Vec<OffsetRange> = (0..parts)
            .map(|p| {
                let from = self.archived[p].load(Ordering::Acquire);
                let to = target[p].min(from + per_part);
                OffsetRange::new(PartitionId(p as u32), Offset(from), Offset(to))
            })
            .filter(|r| !r.is_empty())
            .collect();
        if ranges.is_empty() {
            return Ok(0);
        }
        let n = ranges.iter().map(OffsetRange::len).sum();
        self.ledger.begin(self.seq, &ranges)?;
        crate::fault::point("archive.after_begin");
        self.pending = Some(ranges);
        self.redo_pending()?;
        Ok(n)
    }

    /// Writes the files of a recorded flush and commits it. The log is read in slices and each
    /// hour's file is encoded as it goes, so memory follows the compressed files, not the rows.
    fn write_flush(&mut self, ranges: &[OffsetRange]) -> Result<(), ArchiveError> {
        let mut files: std::collections::BTreeMap<i64, FileWriter> = Default::default();
        for &OffsetRange { partition: p, from, to } in ranges {
            let mut next = from.0;
            self.source.read(p, from, to, &mut |offset, click| {
                if offset.0 < next || offset.0 >= to.0 {
                    return Err(ArchiveError::Source(format!(
                        "partition {}: the source gave offset {} where {} or later was due",
                        p.0, offset.0, next
                    )));
                }
                next = offset.0 + 1;
                let hour = click.time.0.div_euclid(3_600_000);
                let file = match files.entry(hour) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => e.insert(FileWriter::new()?),
                };
                file.append(p, offset, click)
            })?;
        }
        for (hour, file) in files {
            let rel = super::file_name(hour, self.seq);
            self.archive.put(&rel, file.finish()?)?;
            if self.redoing {
                self.archive.remove_staged(&rel)?;
            }
            crate::fault::point("archive.mid_flush");
        }
        self.redoing = false;
        self.ledger.commit(self.seq, ranges)?;
        for r in ranges {
            self.archived[r.partition.0 as usize].store(r.to.0, Ordering::Release);
        }
        self.seq += 1;
        Ok(())
    }

    /// The archiver thread: flushes when `flush_interval` has passed with records waiting, when
    /// `file_rows` records wait, when asked (recalc and reconcile), and at shutdown. A failed
    /// flush (storage unreachable) is retried with backoff; the log keeps its records meanwhile.
    pub fn run(mut self, requests: Receiver<FlushRequest>, shutdown: &AtomicBool) {
        let mut last = Instant::now();
        let mut backoff = Duration::ZERO;
        loop {
            let request = match requests.recv_timeout(Duration::from_millis(200)) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let stopping = shutdown.load(Ordering::Acquire);
            let ends = match self.source.ends() {
                Ok(ends) => ends,
                Err(e) => {
                    tracing::warn!("archive: reading the source's end: {e}");
                    if shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
            };
            let waiting: u64 = ends
                .iter()
                .zip(self.archived.iter())
                .map(|(e, a)| e.saturating_sub(a.load(Ordering::Acquire)))
                .sum();
            let due = request.is_some()
                || stopping
                || (last.elapsed() >= backoff
                    && (waiting >= self.file_rows as u64
                        || (waiting > 0 && last.elapsed() >= self.flush_interval)));
            if due {
                let result = if request.is_some() || stopping {
                    self.catch_up().map(|_| ())
                } else {
                    self.flush_once(&ends).map(|_| ())
                };
                let result = result.map_err(Arc::new);
                last = Instant::now();
                if let Some(reply) = request {
                    let _ = reply.send(result.clone());
                }
                match result {
                    Ok(()) => backoff = Duration::ZERO,
                    Err(e) => {
                        backoff =
                            (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                        tracing::error!("archiving failed, retrying in {backoff:?}: {e}");
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }
}
