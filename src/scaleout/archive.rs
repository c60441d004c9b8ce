//! The raw archive in the scale-out deployment: the embedded service's `archive::Archiver` (the
//! same flush protocol and files) reading the topic and keeping its offsets in PostgreSQL.
//!
//! ```text
//!  Kafka topic ──KafkaSource (no consumer group: reads every partition ahead from the archived
//!     │           offsets into a bounded buffer; a redo seeks to the range its flush names;
//!     │           collector records decoded, raw lines validated at their Kafka timestamp, so
//!     │           a redo reads the same clicks)
//!     ▼
//!  Archiver: intent (seq, ranges) → PgLedger · Parquet files per event hour · commit offsets
//!     ▼
//!  PgLedger: adclick_archive (next seq, the flush in progress), adclick_archive_offsets
//! ```
//!
//! One archiver writes at a time: it holds a PostgreSQL session advisory lock for as long as it
//! runs; other processes with the role wait for it and take over when its session ends (a
//! crash, a stop). A paused archiver keeps its session, and with it the lock, so two never
//! write the same sequence numbers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, TopicPartitionList};

use super::kafka::KafkaError;
use crate::archive::{Archive, ArchiveError, Archiver, FlushRequest, Ledger, Source};
use crate::config::{ScaleOut, Settings};
use crate::engine::{Offset, OffsetRange, PartitionId};
use crate::event::{parse_line, wire, Click, EventTime, Validation};
use crate::scaleout::{pg, RoleError, WIRE_MAGIC};
use crate::store::ArchiveState;

/// A Kafka failure as the archiver reports it.
fn kafka(what: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> ArchiveError {
    move |source| ArchiveError::Backend(Box::new(KafkaError::Client { what: what.into(), source }))
}

/// The advisory lock key the running archiver holds.
const LOCK: i64 = 7_367_282;
/// Longest wait for the next record of a range that the broker says exists.
const READ_STALL: Duration = Duration::from_secs(30);

/// A record read ahead: offset, value, Kafka timestamp (ms).
type Read = (u64, Vec<u8>, i64);

/// The topic as the archiver's source. A tail consumer reads every partition ahead from the
/// archiver's positions into a bounded buffer; the end of what it has read is the source's end
/// (a broker's end offsets are not trusted: Tansu's counted record batches, not records).
/// Ranges are served from that buffer, or, when it does not hold them (the redo of a flush
/// after a crash), read again by seeking a second consumer.
pub struct KafkaSource {
    tail: BaseConsumer,
    seek: BaseConsumer,
    topic: String,
    partitions: u32,
    max_skew_ms: i64,
    buf: Vec<std::collections::VecDeque<Read>>,
    buffered: usize,
    /// Most records read ahead.
    cap: usize,
    /// Per partition: one past the newest offset read ahead.
    seen: Vec<u64>,
}

impl KafkaSource {
    pub fn new(
        brokers: &str,
        topic: &str,
        partitions: u32,
        max_skew_ms: i64,
        cap: usize,
    ) -> Result<Self, ArchiveError> {
        let consumer = || -> Result<BaseConsumer, ArchiveError> {
            super::kafka::base_config(brokers)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("group.id", "adclick-archiver")
                // No producer of the topic uses transactions.
                .set("isolation.level", "read_uncommitted")
                .create()
                .map_err(kafka("creating the archiver's consumer"))
        };
        Ok(KafkaSource {
            tail: consumer()?,
            seek: consumer()?,
            topic: topic.into(),
            partitions,
            max_skew_ms,
            buf: (0..partitions).map(|_| Default::default()).collect(),
            buffered: 0,
            cap: cap.max(1000),
            seen: vec![0; partitions as usize],
        })
    }

    /// Calls `f` with the click in a record, if it holds one: the collector's (decoded), or a
    /// raw line valid at the record's own timestamp (so that a redo decides the same).
    fn click(
        &self,
        p: PartitionId,
        (offset, bytes, ts): &Read,
        f: &mut dyn FnMut(Offset, &Click<'_>) -> Result<(), ArchiveError>,
    ) -> Result<(), ArchiveError> {
        if let Some(rest) = bytes.strip_prefix(&[WIRE_MAGIC]) {
            let click = wire::decode(rest).ok_or_else(|| {
                ArchiveError::Source(format!(
                    "partition {} offset {offset}: a corrupt collector record",
                    p.0
                ))
            })?;
            return f(Offset(*offset), &click);
        }
        let v = Validation { now: EventTime(*ts), max_skew_ms: self.max_skew_ms };
        match parse_line(bytes, v) {
            Ok(Some(click)) => f(Offset(*offset), &click),
            _ => Ok(()),
        }
    }

    /// Reads `[from, to)` of `p` with the seeking consumer.
    fn read_again(
        &mut self,
        p: PartitionId,
        from: Offset,
        to: Offset,
        f: &mut dyn FnMut(Offset, &Click<'_>) -> Result<(), ArchiveError>,
    ) -> Result<(), ArchiveError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p.0 as i32, rdkafka::Offset::Offset(from.0 as i64))
            .map_err(kafka("positioning a partition to archive"))?;
        self.seek.assign(&tpl).map_err(kafka("assigning a partition to archive"))?;
        let mut next = from.0;
        let mut progress = Instant::now();
        while next < to.0 {
            if progress.elapsed() >= READ_STALL {
                return Err(ArchiveError::Source(format!(
                    "kafka: partition {} gave nothing past offset {next} for {READ_STALL:?} \
                     although the range ends at {}",
                    p.0, to.0
                )));
            }
            let m = match self.seek.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(partition = p.0, "kafka: reading to archive: {e}");
                    continue;
                }
                None => continue,
            };
            let offset = m.offset() as u64;
            if m.partition() != p.0 as i32 || offset < next {
                continue;
            }
            if offset >= to.0 {
                break;
            }
            next = offset + 1;
            progress = Instant::now();
            let read = (
                offset,
                m.payload().unwrap_or(&[]).to_vec(),
                m.timestamp().to_millis().unwrap_or(0),
            );
            self.click(p, &read, f)?;
        }
        Ok(())
    }
}

impl Source for KafkaSource {
    fn name(&self) -> &'static str {
        "topic"
    }

    fn partitions(&self) -> usize {
        self.partitions as usize
    }

    /// The tail consumer starts at the archiver's positions. (No end check: the brokers' end
    /// offsets are not trusted; a lost range shows as a redo that cannot read it.)
    fn start(&mut self, positions: &[u64]) -> Result<(), ArchiveError> {
        let mut tpl = TopicPartitionList::new();
        for (p, &at) in positions.iter().enumerate() {
            tpl.add_partition_offset(&self.topic, p as i32, rdkafka::Offset::Offset(at as i64))
                .map_err(kafka("positioning the archiver"))?;
        }
        self.tail.assign(&tpl).map_err(kafka("assigning the topic to the archiver"))?;
        self.seen = positions.to_vec();
        Ok(())
    }

    /// Reads ahead what has arrived (up to the buffer's bound) and returns how far it got.
    fn ends(&mut self) -> Result<Vec<u64>, ArchiveError> {
        while self.buffered < self.cap {
            match self.tail.poll(Duration::from_millis(20)) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!("kafka: reading ahead to archive: {e}");
                    break;
                }
                Some(Ok(m)) => {
                    let (p, offset) = (m.partition() as usize, m.offset() as u64);
                    if p >= self.buf.len() || offset < self.seen[p] {
                        continue;
                    }
                    self.seen[p] = offset + 1;
                    let ts = m.timestamp().to_millis().unwrap_or(0);
                    self.buf[p].push_back((offset, m.payload().unwrap_or(&[]).to_vec(), ts));
                    self.buffered += 1;
                }
            }
        }
        Ok(self.seen.clone())
    }

    fn read(
        &mut self,
        p: PartitionId,
        from: Offset,
        to: Offset,
        f: &mut dyn FnMut(Offset, &Click<'_>) -> Result<(), ArchiveError>,
    ) -> Result<(), ArchiveError> {
        let i = p.0 as usize;
        // What was archived already (by a redo) is dropped.
        while self.buf[i].front().is_some_and(|r| r.0 < from.0) {
            self.buf[i].pop_front();
            self.buffered -= 1;
        }
        let held = self.buf[i].front().is_some_and(|r| r.0 == from.0) && self.seen[i] >= to.0;
        if !held {
            return self.read_again(p, from, to, f);
        }
        while self.buf[i].front().is_some_and(|r| r.0 < to.0) {
            let read = self.buf[i].pop_front().expect("checked");
            self.buffered -= 1;
            self.click(p, &read, f)?;
        }
        Ok(())
    }
}

/// The archiver's offsets and flush intent in PostgreSQL, on the connection that holds the lock.
pub struct PgLedger {
    client: Mutex<postgres::Client>,
    /// Set once that connection has ended (and with it the lock).
    lost: Arc<AtomicBool>,
}

impl PgLedger {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error>,
    ) -> Result<T, ArchiveError> {
        let mut client = self.client.lock().expect("not poisoned");
        if client.is_closed() {
            // The session, and with it the lock, is gone: another archiver may hold it now.
            // This one stops writing and takes the lock again (see `run`).
            self.lost.store(true, Ordering::Release);
            return Err(ArchiveError::Backend(Box::new(pg::PgError::Unreachable(
                "the PostgreSQL session holding the archiver's lock ended".into(),
            ))));
        }
        f(&mut client).map_err(|e| ArchiveError::Backend(Box::new(pg::PgError::from(e))))
    }
}

impl Ledger for PgLedger {
    fn state(&self) -> Result<ArchiveState, ArchiveError> {
        self.with(|c| {
            let mut state = ArchiveState::default();
            for r in c.query("SELECT partition, next_offset FROM adclick_archive_offsets", &[])? {
                state.offsets.push((
                    PartitionId(r.get::<_, i32>(0) as u32),
                    Offset(r.get::<_, i64>(1) as u64),
                ));
            }
            let r = c.query_one(
                "SELECT next_seq, pending_seq, pending_parts, pending_from, pending_to \
                 FROM adclick_archive WHERE id = 1",
                &[],
            )?;
            state.next_seq = r.get::<_, i64>(0) as u64;
            if let Some(seq) = r.get::<_, Option<i64>>(1) {
                let (parts, from, to): (Vec<i32>, Vec<i64>, Vec<i64>) =
                    (r.get(2), r.get(3), r.get(4));
                let ranges = (0..parts.len())
                    .map(|i| {
                        let (p, a, b) = (parts[i] as u32, from[i] as u64, to[i] as u64);
                        OffsetRange::new(PartitionId(p), Offset(a), Offset(b))
                    })
                    .collect();
                state.pending = Some((seq as u64, ranges));
            }
            Ok(state)
        })
    }

    fn begin(&self, seq: u64, ranges: &[OffsetRange]) -> Result<(), ArchiveError> {
        let parts: Vec<i32> = ranges.iter().map(|r| r.partition.0 as i32).collect();
        let from: Vec<i64> = ranges.iter().map(|r| r.from.0 as i64).collect();
        let to: Vec<i64> = ranges.iter().map(|r| r.to.0 as i64).collect();
        self.with(|c| {
            c.execute(
                "UPDATE adclick_archive SET pending_seq = $1, pending_parts = $2, \
                 pending_from = $3, pending_to = $4 WHERE id = 1",
                &[&(seq as i64), &parts, &from, &to],
            )
            .map(|_| ())
        })
    }

    fn commit(&self, seq: u64, ranges: &[OffsetRange]) -> Result<(), ArchiveError> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            for r in ranges {
                tx.execute(
                    "INSERT INTO adclick_archive_offsets VALUES ($1, $2) \
                     ON CONFLICT (partition) DO UPDATE SET next_offset = EXCLUDED.next_offset",
                    &[&(r.partition.0 as i32), &(r.to.0 as i64)],
                )?;
            }
            tx.execute(
                "UPDATE adclick_archive SET next_seq = $1, pending_seq = NULL, \
                 pending_parts = NULL, pending_from = NULL, pending_to = NULL WHERE id = 1",
                &[&(seq as i64 + 1)],
            )?;
            tx.commit()
        })
    }
}

/// The archive role: waits for the lock, then archives the topic until `shutdown`, archiving
/// everything read so far before it returns. When the session holding the lock ends (PostgreSQL
/// restarted, the connection cut) it stops writing and starts over: the lock taken again on a
/// new session (another archiver may have it by then), the flush in progress redone from the
/// ledger, as after a restart of the process.
pub fn run(settings: &Settings, scale: &ScaleOut, shutdown: &AtomicBool) -> Result<(), RoleError> {
    loop {
        let Some(mut client) = take_lock(&scale.postgres, shutdown)? else { return Ok(()) };
        let archive = Archive::open(&settings.archive, &settings.data_dir)?;
        // Where it writes, for the jobs that read it (see `scaleout::recalc`).
        if let Err(e) =
            client.execute("UPDATE adclick_archive SET location = $1", &[&archive.location()])
        {
            tracing::warn!("archive: {}; taking the lock again", pg::describe(&e));
            continue;
        }
        tracing::info!(archive = archive.display(), "archive: archiving the topic");
        let source = KafkaSource::new(
            &scale.brokers,
            &scale.topic,
            settings.partitions,
            settings.engine.max_clock_skew_ms,
            settings.archive.file_rows,
        )?;
        let lost = Arc::new(AtomicBool::new(false));
        let ledger = PgLedger { client: Mutex::new(client), lost: lost.clone() };
        let recovered = Archiver::recover_from(
            Arc::new(archive),
            Box::new(source),
            Box::new(ledger),
            &settings.archive,
        );
        match recovered {
            Ok(archiver) => {
                // Jobs (recalc, reconcile, explain) ask for a flush through PostgreSQL.
                let (requests, rx) = std::sync::mpsc::channel();
                let stop = AtomicBool::new(false);
                std::thread::scope(|s| {
                    s.spawn(|| {
                        while !stop.load(Ordering::Acquire) {
                            if shutdown.load(Ordering::Acquire) || lost.load(Ordering::Acquire) {
                                stop.store(true, Ordering::Release);
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    });
                    s.spawn(|| forward_flush_requests(&scale.postgres, &requests, &stop));
                    archiver.run(rx, &stop);
                    stop.store(true, Ordering::Release);
                });
            }
            Err(e) if lost.load(Ordering::Acquire) => tracing::warn!("archive: {e}"),
            Err(e) => return Err(e.into()),
        }
        if shutdown.load(Ordering::Acquire) {
            return Ok(());
        }
        tracing::warn!("archive: the session holding the lock ended; taking the lock again");
    }
}

/// Polls `adclick_archive.flush_requested` (bumped by a job waiting for the archive) and asks
/// the archiver to flush when it moves, until `stop`. A database that is down is retried.
fn forward_flush_requests(
    url: &str,
    requests: &std::sync::mpsc::Sender<FlushRequest>,
    stop: &AtomicBool,
) {
    let mut client: Option<postgres::Client> = None;
    let mut seen: Option<i64> = None;
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(200));
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = pg::connect(url).ok();
        }
        let Some(c) = client.as_mut() else { continue };
        let Ok(row) = c.query_one("SELECT flush_requested FROM adclick_archive", &[]) else {
            continue;
        };
        let asked: i64 = row.get(0);
        if seen.is_some_and(|s| asked > s) {
            // The answer is not awaited: the job watches the archived offsets.
            let (reply, _) = std::sync::mpsc::channel();
            if requests.send(reply).is_err() {
                return;
            }
        }
        seen = Some(asked);
    }
}

/// A session holding the archiver's lock: waits while another process holds it, and while
/// PostgreSQL is unreachable. `None` if the process stops first.
fn take_lock(url: &str, shutdown: &AtomicBool) -> Result<Option<postgres::Client>, RoleError> {
    let mut standing_by = false;
    let mut unreachable = false;
    loop {
        if shutdown.load(Ordering::Acquire) {
            return Ok(None);
        }
        let attempt = pg::connect(url).and_then(|mut client| {
            let locked: bool =
                client.query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK])?.get(0);
            Ok(locked.then_some(client))
        });
        match attempt {
            Ok(Some(client)) => return Ok(Some(client)),
            Ok(None) if !standing_by => {
                tracing::info!("archive: another process archives this topic; standing by");
                standing_by = true;
            }
            Ok(None) => {}
            Err(e) if e.is_transient() => {
                if !unreachable {
                    tracing::warn!("archive: {e}; waiting for PostgreSQL");
                    unreachable = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
