//! The durable partitioned click log, embedded: one append-only segmented log per partition, in
//! the manner of Kafka's, carrying every accepted click at full rate.
//!
//! # Format
//!
//! ```text
//! <dir>/p000/00000000000000000000.seg    segment files, named by the offset of their first record
//! segment  := frame*
//! frame    := len u32 LE | crc u32 LE | payload (len bytes)
//! crc      := CRC-32C of the 4 length bytes followed by the payload
//! ```
//!
//! A record's offset is its segment's base offset plus its index in the segment. A segment is
//! rolled (closed, a new one started) once it passes `segment_bytes`.
//!
//! # Durability
//!
//! [`Writer::append`] writes frames with plain `write`; [`Writer::sync`] `fdatasync`s every
//! partition written since the last sync and only then publishes the new *durable end* of each
//! partition. Readers never read past the durable end, so nothing downstream (offsets, results)
//! can reflect a record that a crash could take back. Callers group commit: many appends, then
//! one sync, then every waiting client is answered. Directory entries of new segments are synced
//! before their first record is called durable.
//!
//! If `fdatasync` fails the page cache can no longer be trusted: the writer is *poisoned* and
//! refuses every later write; recovery is a restart, which re-reads the files. A `write` that
//! fails (a full disk) is different: what it wrote of its frames is cut off again, the error is
//! returned, and the log takes appends again once there is space.
//!
//! # Recovery
//!
//! On open, only the last segment of each partition can hold a torn tail (earlier ones were
//! synced before the roll). It is scanned frame by frame; at the first frame that is short, too
//! long or fails its CRC, the file is truncated there and synced. Everything before it was
//! written in order, so the recovered log is a prefix of what was appended, and contains every
//! record whose sync returned.
//!
//! # Retention
//!
//! [`Writer::delete_below`] removes whole segments whose records all lie below an offset that
//! every consumer has committed past; the active segment is never removed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::engine::{Offset, OffsetRange, PartitionId};

/// Largest payload accepted: a validated click is far smaller (under 400 bytes).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
const FRAME_HEADER: usize = 8;

/// Errors of the log. I/O errors name the file involved.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the log is poisoned after a failed fsync and refuses writes; restart to recover")]
    Poisoned,
    #[error("record of {0} bytes is larger than the limit of {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    #[error("partition {0} does not exist (the log has {1})")]
    NoPartition(u32, usize),
    #[error("{path}: {what}")]
    Corrupt { path: PathBuf, what: String },
}

impl LogError {
    /// The disk is full: nothing is wrong but space.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, LogError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_owned(), source }
}

/// State shared between the writer and readers.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    /// Per partition: records below this offset are durable.
    durable: Vec<AtomicU64>,
    /// Per partition: the first offset still on disk.
    start: Vec<AtomicU64>,
    poisoned: AtomicBool,
    /// Bytes appended to segment files, cumulative.
    appended: AtomicU64,
}

/// A handle for readers and metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct LogHandle(Arc<Shared>);

impl LogHandle {
    pub fn partitions(&self) -> usize {
        self.0.durable.len()
    }
    /// The durable end (next offset) of a partition.
    pub fn durable_end(&self, p: PartitionId) -> Offset {
        Offset(self.0.durable[p.0 as usize].load(Ordering::Acquire))
    }
    pub fn start(&self, p: PartitionId) -> Offset {
        Offset(self.0.start[p.0 as usize].load(Ordering::Acquire))
    }
    /// Every partition's durable end, in partition order.
    pub fn durable_ends(&self) -> Vec<u64> {
        self.0.durable.iter().map(|d| d.load(Ordering::Acquire)).collect()
    }
    /// Durable records a consumer at `positions` (next offset per partition) has not reached.
    pub fn behind(&self, positions: &[AtomicU64]) -> u64 {
        self.0
            .durable
            .iter()
            .zip(positions)
            .map(|(d, at)| d.load(Ordering::Acquire).saturating_sub(at.load(Ordering::Acquire)))
            .sum()
    }
    /// Bytes appended to the log since it was opened.
    pub fn appended_bytes(&self) -> u64 {
        self.0.appended.load(Ordering::Relaxed)
    }
    pub fn reader(&self, p: PartitionId) -> Reader {
        Reader { shared: self.0.clone(), partition: p, cursor: None }
    }
}

struct Partition {
    dir: PathBuf,
    /// Base offsets of the segments on disk, ascending.
    segments: Vec<u64>,
    file: File,
    file_bytes: u64,
    next: u64,
    dirty: bool,
    /// A new segment file whose directory entry is not synced yet.
    dir_dirty: bool,
}

/// The single writer of a log directory.
pub struct Writer {
    parts: Vec<Partition>,
    shared: Arc<Shared>,
    segment_bytes: u64,
    frame: Vec<u8>,
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

fn partition_dir(dir: &Path, p: usize) -> PathBuf {
    dir.join(format!("p{p:03}"))
}

impl Writer {
    /// Opens (creating if needed) a log of `partitions` partitions, recovering torn tails.
    pub fn open(dir: &Path, partitions: usize, segment_bytes: u64) -> Result<Writer, LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let existing = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('p'))
            .count();
        if existing > partitions {
            return Err(LogError::Corrupt {
                path: dir.to_owned(),
                what: format!("holds {existing} partitions but `partitions` is {partitions}; the partition count is fixed once data exists"),
            });
        }
        // Each partition's last segment is scanned (up to `segment_bytes`): in parallel.
        let parts = {
            use rayon::prelude::*;
            (0..partitions)
                .into_par_iter()
                .map(|p| Partition::open(&partition_dir(dir, p)))
                .collect::<Result<Vec<_>, _>>()?
        };
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            durable: parts.iter().map(|p| AtomicU64::new(p.next)).collect(),
            start: parts.iter().map(|p| AtomicU64::new(p.segments[0])).collect(),
            poisoned: AtomicBool::new(false),
            appended: AtomicU64::new(0),
        });
        sync_dir(dir)?;
        Ok(Writer { parts, shared, segment_bytes: segment_bytes.max(1), frame: Vec::new() })
    }

    pub fn handle(&self) -> LogHandle {
        LogHandle(self.shared.clone())
    }

    /// Appends records to a partition (not yet durable: see [`Writer::sync`]). Returns the
    /// offset of the first.
    pub fn append<'a>(
        &mut self,
        p: PartitionId,
        records: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Offset, LogError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(LogError::Poisoned);
        }
        let n = self.parts.len();
        let part = self.parts.get_mut(p.0 as usize).ok_or(LogError::NoPartition(p.0, n))?;
        let first = part.next;
        self.frame.clear();
        let mut count = 0;
        for r in records {
            if r.len() > MAX_RECORD_BYTES {
                return Err(LogError::TooLarge(r.len()));
            }
            let len = (r.len() as u32).to_le_bytes();
            let crc = crc32c::crc32c_append(crc32c::crc32c(&len), r);
            self.frame.extend_from_slice(&len);
            self.frame.extend_from_slice(&crc.to_le_bytes());
            self.frame.extend_from_slice(r);
            count += 1;
        }
        if count == 0 {
            return Ok(Offset(first));
        }
        if part.file_bytes >= self.segment_bytes {
            let old = segment_path(&part.dir, *part.segments.last().expect("non-empty"));
            if let Err(e) = part.file.sync_data() {
                self.shared.poisoned.store(true, Ordering::Release);
                return Err(LogError::Io { path: old, source: e });
            }
            // A new segment that cannot be created changes nothing: the next append retries.
            part.roll(first)?;
        }
        let path =
            segment_path(&part.dir, *part.segments.last().expect("a partition has a segment"));
        if let Err(e) = part.file.write_all(&self.frame) {
            // A write that fails (a full disk) may have written part of the frames: cut them
            // off, so that the segment still ends with whole frames and the log can go on once
            // there is space. If even that fails, the file is in a state recovery must repair.
            let rolled_back = part
                .file
                .set_len(part.file_bytes)
                .and_then(|()| part.file.seek(SeekFrom::Start(part.file_bytes)).map(drop));
            if rolled_back.is_err() {
                self.shared.poisoned.store(true, Ordering::Release);
            }
            return Err(LogError::Io { path, source: e });
        }
        self.shared.appended.fetch_add(self.frame.len() as u64, Ordering::Relaxed);
        part.next += count;
        part.file_bytes += self.frame.len() as u64;
        part.dirty = true;
        Ok(Offset(first))
    }

    /// Whether the log refuses writes for good (an fsync failed): only a restart recovers.
    pub fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Makes every append so far durable, then publishes the durable ends.
    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(LogError::Poisoned);
        }
        let started = std::time::Instant::now();
        let dirty = self.parts.iter().any(|p| p.dirty);
        let synced = self.sync_dirty();
        if dirty {
            crate::telemetry::observe(crate::telemetry::FSYNC, started.elapsed());
        }
        synced
    }

    fn sync_dirty(&mut self) -> Result<(), LogError> {
        for (i, part) in self.parts.iter_mut().enumerate() {
            if !part.dirty {
                continue;
            }
            let synced = if crate::fault::fails("log.sync_fails") {
                Err(io::Error::other("fsync failed (injected by ADCLICK_FAULT)"))
            } else {
                part.file.sync_data()
            };
            let synced = synced.map_err(io_err(&part.dir)).and_then(|()| {
                if part.dir_dirty {
                    sync_dir(&part.dir)?;
                }
                Ok(())
            });
            if let Err(e) = synced {
                self.shared.poisoned.store(true, Ordering::Release);
                return Err(e);
            }
            part.dirty = false;
            part.dir_dirty = false;
            self.shared.durable[i].store(part.next, Ordering::Release);
        }
        Ok(())
    }

    /// Removes the segments of `p` whose records all lie below `below` and that were last
    /// written at least `min_age` ago.
    pub fn delete_below(
        &mut self,
        p: PartitionId,
        below: Offset,
        min_age: std::time::Duration,
    ) -> Result<usize, LogError> {
        let part = &mut self.parts[p.0 as usize];
        let mut removed = 0;
        while part.segments.len() > 1 && part.segments[1] <= below.0 {
            let path = segment_path(&part.dir, part.segments[0]);
            let age = fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io_err(&path))?
                .elapsed()
                .unwrap_or_default();
            if age < min_age {
                break;
            }
            part.segments.remove(0);
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
        self.shared.start[p.0 as usize].store(part.segments[0], Ordering::Release);
        Ok(removed)
    }
}

impl Partition {
    fn open(dir: &Path) -> Result<Partition, LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut segments = segment_bases(dir)?;
        if segments.is_empty() {
            segments.push(0);
            File::create(segment_path(dir, 0)).map_err(io_err(dir))?;
            sync_dir(dir)?;
        }
        let base = *segments.last().expect("non-empty");
        let path = segment_path(dir, base);
        let (records, valid_bytes) = scan(&path)?;
        let mut file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len > valid_bytes {
            tracing::warn!(path = %path.display(), dropped_bytes = len - valid_bytes, "truncating a torn tail");
            file.set_len(valid_bytes).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        file.seek(SeekFrom::Start(valid_bytes)).map_err(io_err(&path))?;
        Ok(Partition {
            dir: dir.to_owned(),
            segments,
            file,
            file_bytes: valid_bytes,
            next: base + records,
            dirty: false,
            dir_dirty: false,
        })
    }

    /// Starts the segment `base` (the current one is synced by the caller).
    fn roll(&mut self, base: u64) -> Result<(), LogError> {
        let path = segment_path(&self.dir, base);
        self.file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.segments.push(base);
        self.file_bytes = 0;
        self.dir_dirty = true;
        Ok(())
    }
}

/// The base offsets of a partition's segment files, ascending.
fn segment_bases(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut bases: Vec<u64> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
        .collect();
    bases.sort_unstable();
    Ok(bases)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Counts the valid frames at the start of a segment file: (records, bytes they span).
fn scan(path: &Path) -> Result<(u64, u64), LogError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut payload = Vec::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    loop {
        match read_frame(&mut r, &mut payload) {
            Ok(true) => {
                records += 1;
                bytes += (FRAME_HEADER + payload.len()) as u64;
            }
            Ok(false) => return Ok((records, bytes)),
            Err(e) => return Err(LogError::Io { path: path.to_owned(), source: e }),
        }
    }
}

/// Reads one frame into `payload`: false at the end of the valid data (end of file, a short or
/// oversized frame, a CRC mismatch).
fn read_frame(r: &mut impl Read, payload: &mut Vec<u8>) -> io::Result<bool> {
    let mut header = [0u8; FRAME_HEADER];
    if !read_full(r, &mut header)? {
        return Ok(false);
    }
    let len = frame_len(&header);
    if len > MAX_RECORD_BYTES {
        return Ok(false);
    }
    payload.resize(len, 0);
    if !read_full(r, payload)? {
        return Ok(false);
    }
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    Ok(crc32c::crc32c_append(crc32c::crc32c(&header[..4]), payload) == crc)
}

/// The payload length a frame header declares.
fn frame_len(header: &[u8; FRAME_HEADER]) -> usize {
    u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize
}

/// Fills `buf`; false when the input ends first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => return Ok(false),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads one partition forward from an offset, never past the durable end.
pub struct Reader {
    shared: Arc<Shared>,
    partition: PartitionId,
    /// The open segment: its base, a reader positioned at `next`, and the next offset.
    cursor: Option<(u64, BufReader<File>, u64)>,
}

/// Records read in one call: payloads back to back, with their offsets.
#[derive(Default, Debug)]
pub struct Records {
    pub data: Vec<u8>,
    pub spans: Vec<(Offset, usize, usize)>,
}

impl Records {
    pub fn clear(&mut self) {
        self.data.clear();
        self.spans.clear();
    }
    pub fn iter(&self) -> impl Iterator<Item = (Offset, &[u8])> {
        self.spans.iter().map(|&(o, a, b)| (o, &self.data[a..b]))
    }
}

impl Reader {
    pub fn partition(&self) -> PartitionId {
        self.partition
    }

    /// Appends to `out` the durable records in `[from, until)` (at most `max`), in order. Returns
    /// the offset after the last one read.
    pub fn read(
        &mut self,
        from: Offset,
        until: Offset,
        max: usize,
        out: &mut Records,
    ) -> Result<Offset, LogError> {
        let p = self.partition.0 as usize;
        let end = self.shared.durable[p].load(Ordering::Acquire).min(until.0);
        let mut next = from.0;
        if next >= end {
            return Ok(Offset(next));
        }
        let dir = partition_dir(&self.shared.dir, p);
        if !matches!(&self.cursor, Some((_, _, at)) if *at == next) {
            self.cursor = Some(self.seek(&dir, next)?);
        }
        let mut payload = Vec::new();
        let mut count = 0;
        while next < end && count < max {
            let (base, r, at) = self.cursor.as_mut().expect("positioned above");
            match read_frame(r, &mut payload).map_err(io_err(&segment_path(&dir, *base)))? {
                true => {
                    let a = out.data.len();
                    out.data.extend_from_slice(&payload);
                    out.spans.push((Offset(next), a, out.data.len()));
                    next += 1;
                    *at = next;
                    count += 1;
                }
                // The end of this segment: the next one starts here.
                false => {
                    let path = segment_path(&dir, next);
                    if !path.exists() {
                        return Err(LogError::Corrupt {
                            path: segment_path(&dir, *base),
                            what: format!("offset {next} is durable but neither this segment nor a next one holds it"),
                        });
                    }
                    let f = File::open(&path).map_err(io_err(&path))?;
                    self.cursor = Some((next, BufReader::with_capacity(256 << 10, f), next));
                }
            }
        }
        Ok(Offset(next))
    }

    /// Opens the segment holding `offset` and skips to it.
    fn seek(&self, dir: &Path, offset: u64) -> Result<(u64, BufReader<File>, u64), LogError> {
        let bases = segment_bases(dir)?;
        let base =
            *bases.iter().rev().find(|&&b| b <= offset).ok_or_else(|| LogError::Corrupt {
                path: dir.to_owned(),
                what: format!(
                    "offset {offset} was deleted by retention (first segment starts at {:?})",
                    bases.first()
                ),
            })?;
        let path = segment_path(dir, base);
        let f = File::open(&path).map_err(io_err(&path))?;
        let mut r = BufReader::with_capacity(256 << 10, f);
        // Frames before `offset` are not returned, so they are stepped over by their lengths,
        // unchecked: a seek into a full segment costs its headers, not its bytes' CRCs.
        let mut header = [0u8; FRAME_HEADER];
        for at in base..offset {
            let complete = read_full(&mut r, &mut header).map_err(io_err(&path))?;
            let len = frame_len(&header);
            if !complete || len > MAX_RECORD_BYTES {
                return Err(LogError::Corrupt {
                    path,
                    what: format!("ends at offset {at}, before {offset}"),
                });
            }
            r.seek_relative(len as i64).map_err(io_err(&path))?;
        }
        Ok((base, r, offset))
    }
}

/// Reads the records of each range into `buf` (one buffer per partition, one reader each).
pub fn read_ranges(
    readers: &mut [Reader],
    buf: &mut [Records],
    ranges: &[OffsetRange],
) -> Result<(), LogError> {
    for r in ranges {
        let i = r.partition.0 as usize;
        buf[i].clear();
        let mut at = r.from;
        while at < r.to {
            let before = at;
            at = readers[i].read(at, r.to, usize::MAX, &mut buf[i])?;
            if at == before {
                return Err(LogError::Corrupt {
                    path: Default::default(),
                    what: format!(
                        "partition {} ends at offset {} before {}",
                        r.partition.0, at.0, r.to.0
                    ),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
