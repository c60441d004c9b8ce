//! The raw archive (SPEC §1, §5): every accepted click, too-late ones included, as Parquet
//! (zstd) partitioned by event hour, on a local directory or S3-compatible storage through
//! `object_store`. It is the second path to the truth: recalculation and reconciliation read it.
//!
//! ```text
//! <archive>/date=YYYY-MM-DD/hour=HH/part-<flush seq, 12 digits>.parquet
//!
//! column            type                          from the click line
//! ad_id             utf8                          ad_id (a number as its decimal string)
//! click_timestamp   timestamp[ms, tz=UTC]         click_timestamp, truncated to ms
//! user_id           utf8, nullable                user_id
//! ip                utf8, nullable                ip, canonical text (IPv4-mapped IPv6 as IPv4)
//! country           utf8, nullable                country, upper-case ISO 3166-1 alpha-2
//! click_id          utf8, nullable                click_id
//! partition         uint32                        the log partition that holds it
//! offset            uint64                        its offset in that partition
//! ```
//!
//! # Exactly once
//!
//! The [`Archiver`] is a consumer of the click log with its own offsets in the store. A *flush*
//! takes the records `[archived, end)` of each partition (at most `file_rows` in all), and:
//! 1. records its intent (sequence number and ranges) in the store, durably;
//! 2. writes one file per event hour its records fall in, named by the sequence number, each
//!    whole (`put` writes a temporary object and renames or completes it) and, locally, fsynced;
//! 3. commits the new offsets and clears the intent in one transaction.
//!
//! After a crash between 1 and 3 the start redoes the recorded flush: the same ranges give the
//! same records, hours and names, so the files are replaced, never doubled, and nothing is lost.
//! Log segments are deleted only below both the aggregator's and the archiver's offsets.
//!
//! Files roll by size (`archive_file_rows`) and by time (`archive_flush_interval`).

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow_array::builder::{
    StringBuilder, TimestampMillisecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{TimestampMillisecondType, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::engine::{Offset, PartitionId};
use crate::event::{wire, Click, Country, EventTime};
use crate::log::{LogHandle, Records};
use crate::store::Store;

/// Where the archive lives and how files roll.
#[derive(Clone, Debug)]
pub struct ArchiveSettings {
    /// A local directory, or `s3://bucket/prefix`.
    pub location: String,
    /// S3: endpoint URL of an S3-compatible service (default: AWS).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// S3: allow plain http endpoints (local emulators).
    pub allow_http: bool,
    pub flush_interval: Duration,
    /// Most records one flush archives (and so most rows per file).
    pub file_rows: usize,
}

/// The Parquet schema of archived clicks (see the module doc).
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("ad_id", DataType::Utf8, false),
        Field::new(
            "click_timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("user_id", DataType::Utf8, true),
        Field::new("ip", DataType::Utf8, true),
        Field::new("country", DataType::Utf8, true),
        Field::new("click_id", DataType::Utf8, true),
        Field::new("partition", DataType::UInt32, false),
        Field::new("offset", DataType::UInt64, false),
    ]))
}

/// An archive location, local or remote, with the runtime its async client needs.
pub struct Archive {
    rt: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    display: String,
    /// The directory of a local archive (for removing a crashed write's staging files).
    local: Option<std::path::PathBuf>,
}

/// One archived file: its hour, flush sequence number and location.
#[derive(Clone, Debug)]
pub struct ArchiveFile {
    pub hour: i64,
    pub seq: u64,
    pub location: ObjectPath,
    pub size: u64,
}

impl Archive {
    /// Opens the archive at `settings.location` (relative local paths are under `data_dir`).
    pub fn open(settings: &ArchiveSettings, data_dir: &Path) -> anyhow::Result<Archive> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("adclick-archive-io")
            .enable_all()
            .build()
            .context("starting the archive's I/O runtime")?;
        let loc = settings.location.as_str();
        let mut local_dir = None;
        let (store, prefix, display): (Arc<dyn ObjectStore>, String, String) =
            if let Some(rest) = loc.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                anyhow::ensure!(!bucket.is_empty(), "archive: {loc:?} names no bucket");
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_allow_http(settings.allow_http);
                if let Some(e) = &settings.endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(r) = &settings.region {
                    b = b.with_region(r);
                }
                let s3 = b.build().with_context(|| format!("archive: {loc}"))?;
                (Arc::new(s3), prefix.trim_matches('/').to_string(), loc.to_string())
            } else {
                anyhow::ensure!(
                    !loc.contains("://"),
                    "archive: {loc:?}: only local paths and s3:// URLs are supported"
                );
                let dir = data_dir.join(loc);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("archive: creating {}", dir.display()))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .with_context(|| format!("archive: {}", dir.display()))?
                    .with_fsync(true);
                let display = dir.display().to_string();
                local_dir = Some(dir);
                (Arc::new(local), String::new(), display)
            };
        Ok(Archive { rt, store, prefix, display, local: local_dir })
    }

    fn path(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Where it is, for messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Writes one whole file.
    fn put(&self, rel: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let path = self.path(rel);
        self.rt
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .with_context(|| format!("archive {}: writing {rel}", self.display))?;
        Ok(())
    }

    /// Removes what a write of `rel` interrupted by a crash left: a local archive stages a file
    /// as `<name>#<n>` before renaming it, which other Parquet readers would take for data.
    /// (An S3 `put` is one request: nothing is left.)
    fn remove_staged(&self, rel: &str) -> anyhow::Result<()> {
        let Some(root) = &self.local else { return Ok(()) };
        let path = root.join(rel);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Ok(()) };
        let prefix = format!("{}#", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        Ok(())
    }

    /// The files of one event hour (hours since the epoch), in flush order.
    pub fn files_of_hour(&self, hour: i64) -> anyhow::Result<Vec<ArchiveFile>> {
        let dir = self.path(&hour_dir(hour));
        let metas: Vec<_> = self.rt.block_on(async {
            let mut out = Vec::new();
            let mut list = self.store.list(Some(&dir));
            while let Some(m) = list.next().await {
                out.push(m);
            }
            out
        });
        let mut files = Vec::new();
        for m in metas {
            let m = m.with_context(|| format!("archive {}: listing {dir}", self.display))?;
            let Some(seq) = m.location.filename().and_then(parse_part_name) else { continue };
            files.push(ArchiveFile { hour, seq, location: m.location, size: m.size });
        }
        files.sort_by_key(|f| f.seq);
        Ok(files)
    }

    /// Reads one file's record batches.
    pub fn read(&self, file: &ArchiveFile) -> anyhow::Result<Vec<RecordBatch>> {
        let bytes = self
            .rt
            .block_on(async { self.store.get(&file.location).await?.bytes().await })
            .with_context(|| format!("archive {}: reading {}", self.display, file.location))?;
        decode_parquet(bytes).with_context(|| format!("archive: {}", file.location))
    }
}

/// `date=YYYY-MM-DD/hour=HH` of an hour since the epoch.
pub fn hour_dir(hour: i64) -> String {
    let t = crate::event::format_rfc3339(EventTime(hour * 3_600_000));
    // "YYYY-MM-DDTHH:..." (years beyond 9999 cannot be parsed, so never archived)
    let (date, rest) = t.split_once('T').unwrap_or((&t, "00"));
    format!("date={date}/hour={}", &rest[..2])
}

fn part_name(seq: u64) -> String {
    format!("part-{seq:012}.parquet")
}

fn parse_part_name(name: &str) -> Option<u64> {
    name.strip_prefix("part-")?.strip_suffix(".parquet")?.parse().ok()
}

/// One click with its place in the log, ready to archive.
pub struct Row<'a> {
    pub partition: PartitionId,
    pub offset: Offset,
    pub click: Click<'a>,
}

/// Rows appended to a file's columns before they become a record batch (and, every
/// [`ROW_GROUP`] rows, a compressed row group): memory stays bounded whatever a file holds.
const BATCH_ROWS: usize = 1 << 16;
const ROW_GROUP: usize = 1 << 18;

/// One Parquet file being written in memory: column builders, then zstd row groups.
pub struct FileWriter {
    ad: StringBuilder,
    time: TimestampMillisecondBuilder,
    user: StringBuilder,
    ip: StringBuilder,
    country: StringBuilder,
    click_id: StringBuilder,
    partition: UInt32Builder,
    offset: UInt64Builder,
    rows: usize,
    ip_text: String,
    writer: parquet::arrow::ArrowWriter<Vec<u8>>,
}

impl FileWriter {
    pub fn new() -> anyhow::Result<FileWriter> {
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
            .set_max_row_group_row_count(Some(ROW_GROUP))
            .build();
        Ok(FileWriter {
            ad: StringBuilder::new(),
            time: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            user: StringBuilder::new(),
            ip: StringBuilder::new(),
            country: StringBuilder::new(),
            click_id: StringBuilder::new(),
            partition: UInt32Builder::new(),
            offset: UInt64Builder::new(),
            rows: 0,
            ip_text: String::new(),
            writer: parquet::arrow::ArrowWriter::try_new(Vec::new(), schema(), Some(props))?,
        })
    }

    pub fn append(
        &mut self,
        partition: PartitionId,
        offset: Offset,
        c: &Click<'_>,
    ) -> anyhow::Result<()> {
        self.ad.append_value(&c.ad_id);
        self.time.append_value(c.time.0);
        self.user.append_option(c.user_id.as_deref());
        match c.ip {
            Some(a) => {
                use std::fmt::Write;
                self.ip_text.clear();
                let _ = write!(self.ip_text, "{a}");
                self.ip.append_value(&self.ip_text);
            }
            None => self.ip.append_null(),
        }
        self.country.append_option(c.country.as_ref().map(|c| c.as_str()));
        self.click_id.append_option(c.click_id.as_deref());
        self.partition.append_value(partition.0);
        self.offset.append_value(offset.0);
        self.rows += 1;
        if self.rows == BATCH_ROWS {
            self.write_batch()?;
        }
        Ok(())
    }

    fn write_batch(&mut self) -> anyhow::Result<()> {
        if self.rows == 0 {
            return Ok(());
        }
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(self.ad.finish()),
                Arc::new(self.time.finish()),
                Arc::new(self.user.finish()),
                Arc::new(self.ip.finish()),
                Arc::new(self.country.finish()),
                Arc::new(self.click_id.finish()),
                Arc::new(self.partition.finish()),
                Arc::new(self.offset.finish()),
            ],
        )?;
        self.writer.write(&batch)?;
        self.rows = 0;
        Ok(())
    }

    /// The whole file.
    pub fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.write_batch()?;
        Ok(self.writer.into_inner()?)
    }
}

/// Encodes rows (in the order given) as one Parquet file, zstd-compressed.
pub fn encode_parquet(rows: &[Row<'_>]) -> anyhow::Result<Vec<u8>> {
    let mut w = FileWriter::new()?;
    for r in rows {
        w.append(r.partition, r.offset, &r.click)?;
    }
    w.finish()
}

/// Decodes a Parquet file of archived clicks, checking its schema.
pub fn decode_parquet(bytes: bytes::Bytes) -> anyhow::Result<Vec<RecordBatch>> {
    use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
    use rayon::prelude::*;
    let meta = ArrowReaderMetadata::load(&bytes, Default::default())?;
    anyhow::ensure!(
        meta.schema().fields() == schema().fields(),
        "not an adclick archive file: its schema is {:?}",
        meta.schema()
    );
    // Row groups decode independently: in parallel, then in file order.
    let groups = (0..meta.metadata().num_row_groups())
        .into_par_iter()
        .map(|rg| {
            let reader =
                ParquetRecordBatchReaderBuilder::new_with_metadata(bytes.clone(), meta.clone())
                    .with_row_groups(vec![rg])
                    .with_batch_size(64 * 1024)
                    .build()?;
            reader.collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(groups.into_iter().flatten().collect())
}

/// The clicks of a decoded batch, borrowing its strings: (partition, offset, click). A row
/// that does not hold a valid click (a file edited by hand) is an error naming the row.
pub fn clicks(b: &RecordBatch) -> anyhow::Result<Vec<(PartitionId, Offset, Click<'_>)>> {
    let ad = b.column(0).as_string::<i32>();
    let time = b.column(1).as_primitive::<TimestampMillisecondType>();
    let user = b.column(2).as_string::<i32>();
    let ip = b.column(3).as_string::<i32>();
    let country = b.column(4).as_string::<i32>();
    let click_id = b.column(5).as_string::<i32>();
    let partition = b.column(6).as_primitive::<UInt32Type>();
    let offset = b.column(7).as_primitive::<UInt64Type>();
    fn opt(a: &arrow_array::StringArray, i: usize) -> Option<&str> {
        (!a.is_null(i)).then(|| a.value(i))
    }
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let bad = |what: &str| {
            anyhow::anyhow!(
                "row of partition {} offset {}: {what}",
                partition.value(i),
                offset.value(i)
            )
        };
        let ip = match opt(ip, i) {
            Some(s) => Some(s.parse::<IpAddr>().map_err(|_| bad("ip is not an address"))?),
            None => None,
        };
        let country = match opt(country, i) {
            Some(s) => Some(Country::parse(s).ok_or_else(|| bad("country is not assigned"))?),
            None => None,
        };
        out.push((
            PartitionId(partition.value(i)),
            Offset(offset.value(i)),
            Click {
                ad_id: ad.value(i).into(),
                time: EventTime(time.value(i)),
                user_id: opt(user, i).map(Into::into),
                ip,
                country,
                click_id: opt(click_id, i).map(Into::into),
            },
        ));
    }
    Ok(out)
}

/// Per partition `[from, to)`.
pub type Ranges = Vec<(PartitionId, Offset, Offset)>;

/// Where the archiver reads accepted clicks: the embedded click log ([`LogSource`]) or Kafka
/// (`scaleout::archive`). Offsets are dense per partition; a range is read the same every time.
pub trait Source: Send {
    /// What it is, for messages: "log", "topic".
    fn name(&self) -> &'static str;
    fn partitions(&self) -> usize;
    /// Called once before reading, with the archiver's position per partition. Refuses a
    /// source that ends below them: it lost records.
    fn start(&mut self, positions: &[u64]) -> anyhow::Result<()> {
        let ends = self.ends()?;
        for (p, (&end, &at)) in ends.iter().zip(positions).enumerate() {
            anyhow::ensure!(
                end >= at,
                "partition {p}: the {name} ends at offset {end} but the archive holds records up \
                 to {at}; the {name} lost records (damaged, deleted or restored files, or a topic \
                 recreated)",
                name = self.name()
            );
        }
        Ok(())
    }
    /// Per partition, the offset below which records can be read now.
    fn ends(&mut self) -> anyhow::Result<Vec<u64>>;
    /// Calls `f` with every accepted click of `[from, to)` of `p`, in offset order (a source of
    /// raw lines skips those that are not valid clicks).
    fn read(
        &mut self,
        p: PartitionId,
        from: Offset,
        to: Offset,
        f: &mut dyn FnMut(Offset, &Click<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;
}

/// Where the archiver keeps its offsets and the flush it is writing: the embedded store, or
/// PostgreSQL (`scaleout::archive`).
pub trait Ledger: Send {
    fn state(&self) -> anyhow::Result<crate::store::ArchiveState>;
    /// Records, durably, that flush `seq` writes `ranges`.
    fn begin(&self, seq: u64, ranges: &Ranges) -> anyhow::Result<()>;
    /// Advances the offsets past `ranges` and clears flush `seq`, in one transaction.
    fn commit(&self, seq: u64, ranges: &Ranges) -> anyhow::Result<()>;
}

/// The embedded click log as the archiver's source.
pub struct LogSource {
    log: LogHandle,
    readers: Vec<crate::log::Reader>,
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

    fn ends(&mut self) -> anyhow::Result<Vec<u64>> {
        Ok(self.log.durable_ends())
    }

    fn read(
        &mut self,
        p: PartitionId,
        from: Offset,
        to: Offset,
        f: &mut dyn FnMut(Offset, &Click<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut at = from.0;
        while at < to.0 {
            let end = (at + BATCH_ROWS as u64).min(to.0);
            let slice = [(p, Offset(at), Offset(end))];
            crate::pipeline::read_ranges(&mut self.readers, &mut self.buf, &slice)
                .context("reading the log to archive it")?;
            for (offset, bytes) in self.buf[p.0 as usize].iter() {
                let click = wire::decode(bytes).ok_or_else(|| {
                    anyhow::anyhow!(
                        "partition {} offset {}: the log record does not decode as a click",
                        p.0,
                        offset.0
                    )
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
    fn state(&self) -> anyhow::Result<crate::store::ArchiveState> {
        Ok(self.archive_state()?)
    }

    fn begin(&self, seq: u64, ranges: &Ranges) -> anyhow::Result<()> {
        Ok(self.archive_begin(seq, ranges)?)
    }

    fn commit(&self, seq: u64, ranges: &Ranges) -> anyhow::Result<()> {
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
    pending: Option<Ranges>,
    /// The pending flush is redone after a crash: remove what its first attempt left.
    redoing: bool,
    file_rows: usize,
    flush_interval: Duration,
}

/// Asks a running archiver to archive everything durable now; answered when done.
pub type FlushRequest = std::sync::mpsc::Sender<Result<(), String>>;

impl Archiver {
    /// Reads the archiver's offsets and redoes a flush a crash interrupted.
    pub fn recover(
        archive: Arc<Archive>,
        store: Arc<Store>,
        log: LogHandle,
        settings: &ArchiveSettings,
    ) -> anyhow::Result<Archiver> {
        Archiver::recover_from(archive, Box::new(LogSource::new(log)), Box::new(store), settings)
    }

    /// As [`Archiver::recover`], from any source and ledger.
    pub fn recover_from(
        archive: Arc<Archive>,
        mut source: Box<dyn Source>,
        ledger: Box<dyn Ledger>,
        settings: &ArchiveSettings,
    ) -> anyhow::Result<Archiver> {
        let state = ledger.state().context("reading the archiver's offsets")?;
        let partitions = source.partitions();
        let mut positions = vec![0u64; partitions];
        for &(p, o) in &state.offsets {
            anyhow::ensure!((p.0 as usize) < partitions, "archive offsets name partition {}", p.0);
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
            a.redo_pending().context("redoing the interrupted archive flush")?;
        }
        Ok(a)
    }

    /// Per partition, the next offset to archive.
    pub fn archived(&self) -> Arc<Vec<AtomicU64>> {
        self.archived.clone()
    }

    /// Archives every record durable now, in flushes of at most `file_rows`.
    pub fn catch_up(&mut self) -> anyhow::Result<u64> {
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
    fn redo_pending(&mut self) -> anyhow::Result<()> {
        if let Some(ranges) = self.pending.clone() {
            self.write_flush(&ranges)?;
            self.pending = None;
        }
        Ok(())
    }

    /// One flush of the records below `target` not yet archived; returns how many.
    fn flush_once(&mut self, target: &[u64]) -> anyhow::Result<u64> {
        self.redo_pending()?;
        let parts = target.len();
        let per_part = self.file_rows.div_ceil(parts.max(1)) as u64;
        let ranges: Ranges = (0..parts)
            .map(|p| {
                let from = self.archived[p].load(Ordering::Acquire);
                (PartitionId(p as u32), Offset(from), Offset(target[p].min(from + per_part)))
            })
            .filter(|(_, a, b)| a < b)
            .collect();
        if ranges.is_empty() {
            return Ok(0);
        }
        let n = ranges.iter().map(|(_, a, b)| b.0 - a.0).sum();
        self.ledger.begin(self.seq, &ranges).context("recording an archive flush")?;
        crate::fault::point("archive.after_begin");
        self.pending = Some(ranges);
        self.redo_pending()?;
        Ok(n)
    }

    /// Writes the files of a recorded flush and commits it. The log is read in slices and each
    /// hour's file is encoded as it goes, so memory follows the compressed files, not the rows.
    fn write_flush(&mut self, ranges: &Ranges) -> anyhow::Result<()> {
        let mut files: std::collections::BTreeMap<i64, FileWriter> = Default::default();
        for &(p, from, to) in ranges {
            let mut next = from.0;
            self.source.read(p, from, to, &mut |offset, click| {
                anyhow::ensure!(
                    offset.0 >= next && offset.0 < to.0,
                    "partition {}: the source gave offset {} where {} or later was due",
                    p.0,
                    offset.0,
                    next
                );
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
            let rel = format!("{}/{}", hour_dir(hour), part_name(self.seq));
            self.archive.put(&rel, file.finish()?)?;
            if self.redoing {
                self.archive.remove_staged(&rel)?;
            }
            crate::fault::point("archive.mid_flush");
        }
        self.redoing = false;
        self.ledger.commit(self.seq, ranges).context("committing an archive flush")?;
        for &(p, _, to) in ranges {
            self.archived[p.0 as usize].store(to.0, Ordering::Release);
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
                    tracing::warn!("archive: reading the source's end: {e:#}");
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
                last = Instant::now();
                if let Some(reply) = request {
                    let _ = reply.send(result.as_ref().map_err(|e| format!("{e:#}")).copied());
                }
                match result {
                    Ok(()) => backoff = Duration::ZERO,
                    Err(e) => {
                        backoff =
                            (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                        tracing::error!("archiving failed, retrying in {backoff:?}: {e:#}");
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parquet_round_trip_keeps_every_field() {
        let lines = [
            r#"{"ad_id":"ad-1","click_timestamp":"2026-11-30T08:15:02.123Z","user_id":"u-77","ip":"203.0.113.7","country":"us","click_id":"c-1"}"#,
            r#"{"ad_id":42,"click_timestamp":1,"ip":"::ffff:10.0.0.1"}"#,
            r#"{"ad_id":"ad-ü","click_timestamp":-5000,"ip":"2001:db8::1","user_id":""}"#,
        ];
        let v = crate::event::Validation { now: EventTime(i64::MAX / 2), max_skew_ms: 0 };
        let originals: Vec<Click> = lines
            .iter()
            .map(|l| crate::event::parse_line(l.as_bytes(), v).unwrap().unwrap())
            .collect();
        let rows: Vec<Row> = originals
            .iter()
            .enumerate()
            .map(|(i, c)| Row {
                partition: PartitionId(i as u32),
                offset: Offset(100 + i as u64),
                click: c.clone(),
            })
            .collect();
        let bytes = encode_parquet(&rows).unwrap();
        let batches = decode_parquet(bytes::Bytes::from(bytes)).unwrap();
        let back: Vec<_> = batches.iter().flat_map(|b| clicks(b).unwrap()).collect();
        assert_eq!(back.len(), 3);
        for (i, (p, o, c)) in back.into_iter().enumerate() {
            assert_eq!((p, o), (PartitionId(i as u32), Offset(100 + i as u64)));
            assert_eq!(c, originals[i]);
        }
    }

    #[test]
    fn a_file_of_another_schema_is_refused() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::UInt32, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(arrow_array::UInt32Array::from(vec![1]))],
        )
        .unwrap();
        let mut out = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let err = decode_parquet(bytes::Bytes::from(out)).unwrap_err().to_string();
        assert!(err.contains("not an adclick archive file"), "{err}");
    }

    #[test]
    fn paths_are_partitioned_by_event_hour() {
        assert_eq!(hour_dir(0), "date=1970-01-01/hour=00");
        assert_eq!(hour_dir(-1), "date=1969-12-31/hour=23");
        let hour = crate::event::parse_rfc3339("2026-11-30T08:15:02Z").unwrap().0 / 3_600_000;
        assert_eq!(hour_dir(hour), "date=2026-11-30/hour=08");
        assert_eq!(parse_part_name(&part_name(42)), Some(42));
        assert_eq!(parse_part_name("part-000000000042.parquet#1"), None);
    }
}
