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

mod archiver;
mod format;

pub use archiver::{Archiver, FlushRequest, Ledger, LogSource, Source};

use crate::log::LogError;
use crate::store::StoreError;
pub use format::{clicks, clicks_where, decode_parquet, encode_parquet, schema, FileWriter, Row};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::RecordBatch;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::event::EventTime;

/// What went wrong archiving or reading the archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The location is not one adclick can use.
    #[error("archive: {0}")]
    Location(String),
    /// Object storage (a local directory or S3) failed.
    #[error("archive {at}: {what}: {source}")]
    Storage {
        at: String,
        what: String,
        #[source]
        source: object_store::Error,
    },
    #[error("archive {at}: {what}: {source}")]
    Io {
        at: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A file or row that is not an archived click of this schema.
    #[error("archive: {0}")]
    Format(String),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// The source lost records, or gave them out of order.
    #[error("{0}")]
    Source(String),
    #[error("reading the log to archive it: {0}")]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A source or ledger of another deployment failed (Kafka, PostgreSQL).
    #[error("{0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

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
    pub fn open(settings: &ArchiveSettings, data_dir: &Path) -> Result<Archive, ArchiveError> {
        let loc = settings.location.as_str();
        let io = |what: String| {
            let at = loc.to_string();
            move |source| ArchiveError::Io { at, what, source }
        };
        let storage = |what: String| {
            let at = loc.to_string();
            move |source| ArchiveError::Storage { at, what, source }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("adclick-archive-io")
            .enable_all()
            .build()
            .map_err(io("starting the I/O runtime".into()))?;
        let mut local_dir = None;
        let (store, prefix, display): (Arc<dyn ObjectStore>, String, String) =
            if let Some(rest) = loc.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(ArchiveError::Location(format!("{loc:?} names no bucket")));
                }
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_allow_http(settings.allow_http);
                if let Some(e) = &settings.endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(r) = &settings.region {
                    b = b.with_region(r);
                }
                let s3 = b.build().map_err(storage("configuring S3".into()))?;
                (Arc::new(s3), prefix.trim_matches('/').to_string(), loc.to_string())
            } else {
                if loc.contains("://") {
                    return Err(ArchiveError::Location(format!(
                        "{loc:?}: only local paths and s3:// URLs are supported"
                    )));
                }
                let dir = data_dir.join(loc);
                std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(storage(dir.display().to_string()))?
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

    /// Where it is, the same from any process that opens it: the S3 URL, or the directory's
    /// canonical path (a relative one resolves against each process's data directory).
    pub fn location(&self) -> String {
        match &self.local {
            Some(dir) => {
                std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()).display().to_string()
            }
            None => self.display.clone(),
        }
    }

    /// Where it is, for messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Writes one whole file.
    fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        let path = self.path(rel);
        self.rt.block_on(self.store.put(&path, PutPayload::from(bytes))).map_err(|source| {
            ArchiveError::Storage {
                at: self.display.clone(),
                what: format!("writing {rel}"),
                source,
            }
        })?;
        Ok(())
    }

    /// Removes what a write of `rel` interrupted by a crash left: a local archive stages a file
    /// as `<name>#<n>` before renaming it, which other Parquet readers would take for data.
    /// (An S3 `put` is one request: nothing is left.)
    fn remove_staged(&self, rel: &str) -> Result<(), ArchiveError> {
        let Some(root) = &self.local else { return Ok(()) };
        let path = root.join(rel);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Ok(()) };
        let prefix = format!("{}#", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_file(e.path()).map_err(|source| ArchiveError::Io {
                    at: self.display.clone(),
                    what: format!("removing {}", e.path().display()),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// The event hours within `[from, to]` (hours since the epoch) that hold files: one listing
    /// of the dates, then one per date in range, so that a long range costs what it holds, not
    /// its length.
    pub fn hours_with_files(
        &self,
        from: i64,
        to: i64,
    ) -> Result<std::collections::BTreeSet<i64>, ArchiveError> {
        let list = |dir: Option<ObjectPath>| -> Result<Vec<String>, ArchiveError> {
            let listed = self.rt.block_on(self.store.list_with_delimiter(dir.as_ref()));
            let listed = listed.map_err(|source| ArchiveError::Storage {
                at: self.display.clone(),
                what: format!("listing {}", dir.as_ref().map_or("the archive", |d| d.as_ref())),
                source,
            })?;
            Ok(listed
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(String::from))
                .collect())
        };
        let root = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let mut out = std::collections::BTreeSet::new();
        for date in list(root)? {
            let day = date
                .strip_prefix("date=")
                .and_then(|d| crate::event::parse_rfc3339(&format!("{d}T00:00:00Z")).ok())
                .map(|t| t.0.div_euclid(24 * 3_600_000));
            let Some(day) = day else { continue };
            if day * 24 + 23 < from || day * 24 > to {
                continue;
            }
            for h in list(Some(self.path(&date)))? {
                let Some(h) = h.strip_prefix("hour=").and_then(|h| h.parse::<i64>().ok()) else {
                    continue;
                };
                if (from..=to).contains(&(day * 24 + h)) {
                    out.insert(day * 24 + h);
                }
            }
        }
        Ok(out)
    }

    /// The files of one event hour (hours since the epoch), in flush order.
    pub fn files_of_hour(&self, hour: i64) -> Result<Vec<ArchiveFile>, ArchiveError> {
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
            let m = m.map_err(|source| ArchiveError::Storage {
                at: self.display.clone(),
                what: format!("listing {dir}"),
                source,
            })?;
            let Some(seq) = m.location.filename().and_then(parse_part_name) else { continue };
            files.push(ArchiveFile { hour, seq, location: m.location, size: m.size });
        }
        files.sort_by_key(|f| f.seq);
        Ok(files)
    }

    /// Reads one file's record batches.
    pub fn read(&self, file: &ArchiveFile) -> Result<Vec<RecordBatch>, ArchiveError> {
        let bytes = self
            .rt
            .block_on(async { self.store.get(&file.location).await?.bytes().await })
            .map_err(|source| ArchiveError::Storage {
                at: self.display.clone(),
                what: format!("reading {}", file.location),
                source,
            })?;
        decode_parquet(bytes).map_err(|e| match e {
            ArchiveError::Format(m) => ArchiveError::Format(format!("{}: {m}", file.location)),
            e => ArchiveError::Format(format!("{}: {e}", file.location)),
        })
    }
}

/// `date=YYYY-MM-DD/hour=HH` of an hour since the epoch.
pub fn hour_dir(hour: i64) -> String {
    let t = crate::event::format_rfc3339(EventTime(hour * 3_600_000));
    // "YYYY-MM-DDTHH:..." (years beyond 9999 cannot be parsed, so never archived)
    let (date, rest) = t.split_once('T').unwrap_or((&t, "00"));
    format!("date={date}/hour={}", &rest[..2])
}

/// Where flush `seq` writes its file of `hour`, relative to the archive's root.
pub fn file_name(hour: i64, seq: u64) -> String {
    format!("{}/{}", hour_dir(hour), part_name(seq))
}

fn part_name(seq: u64) -> String {
    format!("part-{seq:012}.parquet")
}

fn parse_part_name(name: &str) -> Option<u64> {
    name.strip_prefix("part-")?.strip_suffix(".parquet")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use arrow_schema::{DataType, Field, Schema};

    use super::*;
    use crate::engine::{Offset, PartitionId};
    use crate::event::Click;

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

    #[test]
    fn the_hours_with_files_are_listed_by_date_within_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let settings = ArchiveSettings {
            location: "archive".into(),
            endpoint: None,
            region: None,
            allow_http: false,
            flush_interval: Duration::from_secs(60),
            file_rows: 1000,
        };
        let archive = Archive::open(&settings, dir.path()).unwrap();
        let day = 20_000 * 24;
        let hours = [-1, 0, 5, day + 3, day + 23, day + 24, 2 * day];
        for (seq, h) in hours.iter().enumerate() {
            archive.put(&file_name(*h, seq as u64), vec![1, 2, 3]).unwrap();
        }
        let all = archive.hours_with_files(i64::MIN / 2, i64::MAX / 2).unwrap();
        assert_eq!(all.into_iter().collect::<Vec<_>>(), hours.to_vec());
        let some = archive.hours_with_files(0, day + 23).unwrap();
        assert_eq!(some.into_iter().collect::<Vec<_>>(), vec![0, 5, day + 3, day + 23]);
        assert!(archive.hours_with_files(6, day + 2).unwrap().is_empty());
    }
}
