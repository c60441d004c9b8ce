//! The aggregate store, embedded: results, source offsets and the replay journal in one redb
//! database (`<data_dir>/store.redb`), engine checkpoints in files beside it.
//!
//! # Key layout
//!
//! ```text
//! counts   (minute, ad_id)  → u64 LE per slot (total, then each filter)   absolute values, of
//!                             final minutes (open ones are kept in memory until final: `Open`)
//! ad_days  (ad_id, day)     → ()   the UTC days in which an ad has counts: an ad's series reads
//!                                   only those days, whatever the calendar span asked for
//! hour_versions hour        → u64  commits that wrote into the hour: validates the in-memory
//!                                   cache of summed hours that `popular` keeps for history
//! tops     (minute, slot)   → [len u, (ad str, count u)*]                 top-N of final minutes
//! offsets  partition        → next offset: every record below is reflected in counts and tops
//! journal  seq              → wall i64, [(partition, from, to)], [assigned partition]
//!                             every batch since the previous checkpoint
//! meta     "watermark" i64 · "counters" · "commit_seq" u64 (the last batch committed)
//!          · "checkpoint_seq" u64, "previous_checkpoint_seq" u64 (the last batch each includes)
//!          · "checkpoint_files", "previous_checkpoint_files": each checkpoint's manifest, the
//!            files that restore it, oldest first (seq u, newest dedup time, newest minute)
//!          · "settings" (the settings that change results, as JSON; see `check_settings`)
//!
//! checkpoints/<seq>.snap   an incremental engine checkpoint taken after batch <seq>: the small
//!                          state whole, and the window rows and dedup entries changed since the
//!                          checkpoint before it; a checkpoint is its manifest's files together.
//!                          The newest two checkpoints are kept, so a start falls back to the
//!                          previous one (and a longer journal replay) when the newest is missing
//!                          or corrupt
//! ```
//!
//! Checkpoint files live beside the database, not in it: they are written once and never
//! updated, so a copy-on-write B-tree would gain nothing. A file is written to a temporary name,
//! fsynced, renamed and its directory fsynced (by the aggregator's checkpoint thread, off the
//! commit path) *before* the transaction that names it in a manifest commits; files neither
//! manifest names are removed only after. A crash in between leaves an orphan file, never a
//! dangling reference.
//!
//! # Commit protocol (exactly once)
//!
//! Each engine batch is committed in **one** write transaction with `Durability::Immediate`:
//! its absolute counts, its top-N lists, the offsets it advanced to, the watermark, and a journal
//! entry saying which records (and which wall-clock time) made it. Every few seconds the same
//! transaction records a freshly written checkpoint file and drops the journal entries that the
//! *previous* checkpoint covers (so either can be restored). So the cost of a commit follows the
//! batch, not the state.
//!
//! Recovery restores the snapshot and replays the journal's batches from the log with their
//! recorded wall times: the engine makes the same decisions again and ends exactly at the
//! committed offsets. Absolute counts make a replayed write harmless. A crash before a commit
//! loses nothing: the records are in the log and the offsets were not advanced.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::engine::snapshot::{Decoder, Encoder};
use crate::engine::{Counters, Extent, Offset, Output, PartitionId, Slot, Watermark};
use crate::event::{AdId, EventTime, Minute};
use crate::rank::Ranked;

/// Keyed minute first: a commit's rows land together at the right edge of the tree, and a restart
/// rebuilds the popular-ads index from a range scan of the recent minutes, not all history.
const COUNTS: TableDefinition<(i64, &str), &[u8]> = TableDefinition::new("counts");
const AD_DAYS: TableDefinition<(&str, i64), ()> = TableDefinition::new("ad_days");
/// hour → how many commits have written counts into it: a cached sum of the hour is valid for
/// exactly one version, read in the same transaction as the rest of a query.
const HOUR_VERSIONS: TableDefinition<i64, u64> = TableDefinition::new("hour_versions");

/// Minutes per `ad_days` bucket: a day. Coarser buckets mean fewer index writes (one per ad per
/// day), finer ones fewer lookups per bucket read (at most this many).
const DAY_MINUTES: i64 = 1440;
const TOPS: TableDefinition<(i64, u32), &[u8]> = TableDefinition::new("tops");
const OFFSETS: TableDefinition<u32, u64> = TableDefinition::new("offsets");
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// (minute, ad) → u64 LE per slot: clicks the live path found too late (added, not absolute),
/// so that reconciliation can explain the differences they make until a recalculation.
const TOO_LATE: TableDefinition<(i64, &str), &[u8]> = TableDefinition::new("too_late");
/// partition → the next offset the archiver has archived.
const ARCHIVE_OFFSETS: TableDefinition<u32, u64> = TableDefinition::new("archive_offsets");

/// A store failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("store: {what}: {source}")]
pub struct StoreError {
    what: &'static str,
    #[source]
    source: redb::Error,
}

impl StoreError {
    /// Another process holds the database open (a running server).
    pub fn is_locked(&self) -> bool {
        matches!(self.source, redb::Error::DatabaseAlreadyOpen)
    }
}

trait Context<T> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Context<T> for Result<T, E> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError { what, source: e.into() })
    }
}

/// Which records, at which wall-clock time, made one engine batch.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BatchRecord {
    pub wall: i64,
    /// (partition, from, to): the records `[from, to)` of each partition, in this order.
    pub ranges: Vec<(PartitionId, Offset, Offset)>,
    /// Partitions assigned to the engine at `wall`, before the records (the aggregator's start).
    pub assign: Vec<PartitionId>,
}

impl BatchRecord {
    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.i(self.wall);
        encode_ranges(&mut e, &self.ranges);
        e.u(self.assign.len() as u64);
        for p in &self.assign {
            e.u(p.0 as u64);
        }
        e.buf
    }
    fn decode(bytes: &[u8]) -> Option<BatchRecord> {
        let mut d = Decoder::raw(bytes);
        let wall = d.i().ok()?;
        let ranges = decode_ranges(&mut d)?;
        let mut assign = Vec::new();
        for _ in 0..d.count().ok()? {
            assign.push(PartitionId(u32::try_from(d.u().ok()?).ok()?));
        }
        d.finish().ok()?;
        Some(BatchRecord { wall, ranges, assign })
    }
}

/// (partition, from, to) ranges, as the journal and the archiver's recorded flush keep them.
fn encode_ranges(e: &mut Encoder, ranges: &[(PartitionId, Offset, Offset)]) {
    e.u(ranges.len() as u64);
    for (p, a, b) in ranges {
        e.u(p.0 as u64);
        e.u(a.0);
        e.u(b.0);
    }
}

fn decode_ranges(d: &mut Decoder) -> Option<Vec<(PartitionId, Offset, Offset)>> {
    let n = d.count().ok()?;
    let mut ranges = Vec::with_capacity(n);
    for _ in 0..n {
        ranges.push((
            PartitionId(u32::try_from(d.u().ok()?).ok()?),
            Offset(d.u().ok()?),
            Offset(d.u().ok()?),
        ));
    }
    Some(ranges)
}

/// A top-N list as `tops` stores it.
fn encode_top(ads: &[Ranked]) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u(ads.len() as u64);
    for (ad, c) in ads {
        e.bytes(ad.as_str().as_bytes());
        e.u(*c);
    }
    e.buf
}

/// A checkpoint file as a manifest names it: the batch it was taken after, and how long it
/// matters (see [`crate::engine::Engine::retains`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointFile {
    pub seq: u64,
    pub extent: Extent,
}

/// A checkpoint whose files are durable, to be recorded by a commit: the last batch it includes
/// and the files that restore it, oldest first (the newest is `seq`'s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub seq: u64,
    pub files: Vec<CheckpointFile>,
}

fn encode_manifest(files: &[CheckpointFile]) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u(files.len() as u64);
    let opt = |e: &mut Encoder, v: Option<i64>| match v {
        Some(v) => {
            e.bool(true);
            e.i(v)
        }
        None => e.bool(false),
    };
    for f in files {
        e.u(f.seq);
        opt(&mut e, f.extent.max_time);
        opt(&mut e, f.extent.max_minute.map(|m| m.0));
    }
    e.buf
}

fn decode_manifest(bytes: &[u8]) -> Option<Vec<CheckpointFile>> {
    let mut d = Decoder::raw(bytes);
    let opt = |d: &mut Decoder| -> Option<Option<i64>> {
        match d.u().ok()? {
            0 => Some(None),
            1 => d.i().ok().map(Some),
            _ => None,
        }
    };
    let n = d.count().ok()?;
    let mut files = Vec::with_capacity(n);
    for _ in 0..n {
        let seq = d.u().ok()?;
        let max_time = opt(&mut d)?;
        let max_minute = opt(&mut d)?.map(Minute);
        files.push(CheckpointFile { seq, extent: Extent { max_time, max_minute } });
    }
    Some(files)
}

/// A checkpoint's files, oldest first, or why one cannot be read.
pub type CheckpointBytes = Result<Vec<Arc<memmap2::Mmap>>, String>;

/// What a restart needs.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Committed checkpoints, newest first: its manifest, and its files' bytes (oldest first)
    /// or why they cannot be read.
    pub checkpoints: Vec<(CheckpointRecord, CheckpointBytes)>,
    /// Batches after the oldest kept checkpoint, in order.
    pub journal: Vec<(u64, BatchRecord)>,
    pub next_seq: u64,
    pub offsets: Vec<(PartitionId, Offset)>,
    pub watermark: Watermark,
}

pub struct Store {
    db: Database,
    /// Where checkpoint files live: `checkpoints/` beside the database file.
    checkpoints: PathBuf,
    /// (day, ad) pairs already in `ad_days`, so a commit writes each once. Only the committing
    /// thread uses it; bounded by dropping everything past a size.
    ad_days_written: Mutex<hashbrown::HashSet<(i64, AdId)>>,
    /// Summed counts of whole hours, for `popular` over history; see [`HourCache`].
    hours: Mutex<HourCache>,
    /// The counts of minutes not final yet, while an aggregator owns the store; see [`Open`].
    open: RwLock<Open>,
}

/// The committed counts and top-N lists of the minutes that can still change, kept in memory
/// instead of in `counts` and `tops`: ten commits a second would otherwise rewrite the B-tree
/// pages of every open minute's rows (thousands of ads spread over the minute's key range), and
/// late clicks would rewrite a page of a final minute each. A minute is written once, by the
/// commit whose watermark seals it (more than `allowed_lateness` past its end: nothing can change
/// it any more).
///
/// Nothing is lost in a crash: these rows follow from the engine's state, which recovery restores
/// and replays to the last commit, and then hands over with [`Store::load_open`]. Reads take the
/// minutes the committed watermark leaves unsealed from here, and those before from the tables,
/// both at the same commit (`seq`, also in `meta`). A process that opens the store without an
/// aggregator (recalc, reconcile) reads the tables alone, which a clean stop brings up to date
/// ([`Store::flush_open`]).
#[derive(Default)]
struct Open {
    /// Whether an aggregator keeps these rows (otherwise the tables hold everything there is).
    live: bool,
    lateness_ms: i64,
    /// The commit these rows are at.
    seq: Option<u64>,
    minutes: BTreeMap<i64, HashMap<AdId, Box<[u64]>>>,
    /// (minute, slot) → the top-N of final minutes not sealed yet.
    tops: BTreeMap<(i64, u32), Vec<Ranked>>,
}

impl Open {
    /// The first minute kept here at `watermark`: every minute before it is sealed, in the
    /// tables. `i64::MAX` when nothing is kept here.
    fn from(&self, watermark: Watermark) -> i64 {
        if !self.live {
            return i64::MAX;
        }
        watermark
            .oldest_countable(self.lateness_ms)
            .map_or(i64::MIN, |start| start.div_euclid(crate::event::MINUTE_MS))
    }
}

/// A read transaction, its watermark, the first minute read from memory, and those minutes.
type View<'a> = (redb::ReadTransaction, Watermark, i64, Option<RwLockReadGuard<'a, Open>>);

/// One hour's summed counts of one slot: every ad with a count, unordered.
type Block = Arc<Vec<(AdId, u64)>>;

/// Most (ad, count) entries the hour cache holds across its blocks (about 32 bytes each).
const HOUR_CACHE_ENTRIES: usize = 4 << 20;

/// Per (slot, hour): every ad's count summed over the hour, with the hour's version (see
/// `HOUR_VERSIONS`) it was summed at. A query uses a block only when the version it reads in its
/// own transaction matches, so a cached block always equals the committed counts it stands for.
/// Oldest blocks are dropped first.
#[derive(Default)]
struct HourCache {
    blocks: std::collections::HashMap<(usize, i64), (u64, Block)>,
    order: std::collections::VecDeque<(usize, i64)>,
    entries: usize,
}

impl HourCache {
    fn get(&self, key: (usize, i64), version: u64) -> Option<Block> {
        self.blocks.get(&key).filter(|(v, _)| *v == version).map(|(_, b)| b.clone())
    }

    fn insert(&mut self, key: (usize, i64), version: u64, block: Block) {
        if block.len() > HOUR_CACHE_ENTRIES / 4 {
            return;
        }
        while self.entries + block.len() > HOUR_CACHE_ENTRIES {
            let Some(old) = self.order.pop_front() else { break };
            if let Some((_, b)) = self.blocks.remove(&old) {
                self.entries -= b.len();
            }
        }
        self.entries += block.len();
        match self.blocks.insert(key, (version, block)) {
            Some((_, b)) => self.entries -= b.len(),
            None => self.order.push_back(key),
        }
    }
}

/// Most (day, ad) pairs remembered as written; past it the memory starts again (re-writing a
/// pair is harmless).
const AD_DAYS_REMEMBERED: usize = 1 << 21;

/// redb's page cache. Its default (1 GiB) fills with every page written, so a server's memory
/// grew by what each sealed minute wrote (about 9 MiB a minute at 50,000 clicks/s) for hours;
/// this bounds it well before. Queries read sealed minutes by range, once, and keep hour sums in
/// their own cache.
const STORE_CACHE_BYTES: usize = 128 << 20;

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let checkpoints = path.parent().unwrap_or(Path::new(".")).join("checkpoints");
        std::fs::create_dir_all(&checkpoints).map_err(|e| StoreError {
            what: "creating the checkpoints directory",
            source: redb::Error::Io(e),
        })?;
        let db = redb::Builder::new().set_cache_size(STORE_CACHE_BYTES).create(path).ctx("open")?;
        let txn = db.begin_write().ctx("begin")?;
        {
            txn.open_table(COUNTS).ctx("create counts")?;
            txn.open_table(TOPS).ctx("create tops")?;
            txn.open_table(OFFSETS).ctx("create offsets")?;
            txn.open_table(JOURNAL).ctx("create journal")?;
            txn.open_table(META).ctx("create meta")?;
            txn.open_table(AD_DAYS).ctx("create ad_days")?;
            txn.open_table(HOUR_VERSIONS).ctx("create hour_versions")?;
            txn.open_table(TOO_LATE).ctx("create too_late")?;
            txn.open_table(ARCHIVE_OFFSETS).ctx("create archive_offsets")?;
        }
        txn.commit().ctx("commit")?;
        let store = Store {
            db,
            checkpoints,
            ad_days_written: Mutex::default(),
            hours: Mutex::default(),
            open: RwLock::default(),
        };
        store.build_ad_days()?;
        Ok(store)
    }

    /// Fills `ad_days` from `counts` once, for a store written before the index existed.
    fn build_ad_days(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().ctx("begin")?;
        {
            let mut meta = txn.open_table(META).ctx("open meta")?;
            if meta.get("ad_days_built").ctx("read meta")?.is_some() {
                return Ok(());
            }
            let counts = txn.open_table(COUNTS).ctx("open counts")?;
            let mut days = txn.open_table(AD_DAYS).ctx("open ad_days")?;
            for item in counts.iter().ctx("scan counts")? {
                let (k, _) = item.ctx("read count")?;
                let (minute, ad) = k.value();
                days.insert((ad, day_of(minute)), ()).ctx("write ad day")?;
            }
            meta.insert("ad_days_built", [1u8].as_slice()).ctx("write meta")?;
        }
        txn.commit().ctx("commit")
    }

    /// Compares the settings that change results with those recorded with the data, and
    /// records them when there are none yet. Each entry is (key, value as written).
    pub fn check_settings(&self, settings: &[(String, String)]) -> Result<(), SettingsError> {
        let txn = self.db.begin_write().ctx("begin")?;
        {
            let mut meta = txn.open_table(META).ctx("open meta")?;
            let stored: Option<Vec<(String, String)>> = meta
                .get("settings")
                .ctx("read settings")?
                .map(|v| serde_json::from_slice(v.value()))
                .transpose()
                .map_err(|e| SettingsError::Corrupt(e.to_string()))?;
            match stored {
                Some(stored) => {
                    let changed = diff_settings(&stored, settings);
                    if !changed.is_empty() {
                        return Err(SettingsError::Changed(changed));
                    }
                    return Ok(());
                }
                None => {
                    let json = serde_json::to_vec(settings).expect("strings serialize");
                    meta.insert("settings", json.as_slice()).ctx("write settings")?;
                }
            }
        }
        txn.commit().ctx("commit")?;
        Ok(())
    }

    /// Commits one batch's results atomically (see the module doc). With `checkpoint`, also
    /// records a checkpoint whose files are durable (taken after this batch or an earlier one)
    /// and drops the journal the previous checkpoint covers.
    pub fn commit(
        &self,
        seq: u64,
        batch: &BatchRecord,
        output: &Output,
        checkpoint: Option<&CheckpointRecord>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().ctx("begin commit")?;
        let new_days;
        // Rows and top-N lists of minutes this commit leaves unsealed stay in memory (see
        // `Open`); those of minutes it seals are written, the batch's newer ones first.
        let open = self.open.read().expect("not poisoned");
        let open_from = open.from(output.watermark);
        let (kept, rows): (Vec<_>, Vec<_>) =
            output.counts.iter().partition(|(minute, _, _)| minute.0 >= open_from);
        let (kept_tops, tops): (Vec<_>, Vec<_>) =
            output.top.iter().partition(|t| t.minute.0 >= open_from);
        let mut tops: Vec<(i64, u32, &[Ranked])> =
            tops.iter().map(|t| (t.minute.0, t.slot.index() as u32, t.ads.as_slice())).collect();
        let sealing: Vec<i64> = open.minutes.range(..open_from).map(|(m, _)| *m).collect();
        let mut rows: Vec<(Minute, &AdId, &[u64])> = rows;
        if !sealing.is_empty() {
            let newer: hashbrown::HashSet<(i64, &str)> =
                rows.iter().map(|(m, ad, _)| (m.0, ad.as_str())).collect();
            for &m in &sealing {
                for (ad, c) in &open.minutes[&m] {
                    if !newer.contains(&(m, ad.as_str())) {
                        rows.push((Minute(m), ad, c));
                    }
                }
            }
        }
        let newer: Vec<(i64, u32)> = tops.iter().map(|t| (t.0, t.1)).collect();
        for (&(m, slot), ads) in open.tops.range(..(open_from, 0)) {
            if !newer.contains(&(m, slot)) {
                tops.push((m, slot, ads));
            }
        }
        {
            new_days = self.write_rows(&txn, rows)?;
            write_tops(&txn, tops)?;
            if !output.too_late.is_empty() {
                let mut late = txn.open_table(TOO_LATE).ctx("open too_late")?;
                for (minute, ad, c) in output.too_late.iter() {
                    let mut sum: Vec<u64> =
                        match late.get((minute.0, ad.as_str())).ctx("read too late")? {
                            Some(v) => v.value().chunks_exact(8).map(le_u64).collect(),
                            None => vec![0; c.len()],
                        };
                    sum.resize(c.len().max(sum.len()), 0);
                    for (a, b) in sum.iter_mut().zip(c) {
                        *a += b;
                    }
                    let bytes: Vec<u8> = sum.iter().flat_map(|v| v.to_le_bytes()).collect();
                    late.insert((minute.0, ad.as_str()), bytes.as_slice()).ctx("write too late")?;
                }
            }
            let mut offsets = txn.open_table(OFFSETS).ctx("open offsets")?;
            for (p, o) in &output.offsets {
                offsets.insert(p.0, o.0).ctx("write offset")?;
            }
            crate::fault::point("store.mid_commit");
            let mut journal = txn.open_table(JOURNAL).ctx("open journal")?;
            let mut meta = txn.open_table(META).ctx("open meta")?;
            meta.insert("watermark", output.watermark.to_raw().to_le_bytes().as_slice())
                .ctx("write watermark")?;
            meta.insert("commit_seq", seq.to_le_bytes().as_slice()).ctx("write commit seq")?;
            let mut e = Encoder::default();
            output.counters.encode(&mut e);
            meta.insert("counters", e.buf.as_slice()).ctx("write counters")?;
            journal.insert(seq, BatchRecord::encode(batch).as_slice()).ctx("write journal")?;
            if let Some(checkpoint) = checkpoint {
                let previous = meta
                    .get("checkpoint_seq")
                    .ctx("read checkpoint seq")?
                    .map(|v| le_u64(v.value()));
                let previous_files =
                    meta.get("checkpoint_files").ctx("read manifest")?.map(|v| v.value().to_vec());
                meta.insert("checkpoint_seq", checkpoint.seq.to_le_bytes().as_slice())
                    .ctx("write checkpoint seq")?;
                meta.insert("checkpoint_files", encode_manifest(&checkpoint.files).as_slice())
                    .ctx("write manifest")?;
                match previous {
                    Some(previous) => {
                        meta.insert("previous_checkpoint_seq", previous.to_le_bytes().as_slice())
                            .ctx("write checkpoint seq")?;
                        match previous_files {
                            Some(files) => {
                                meta.insert("previous_checkpoint_files", files.as_slice())
                            }
                            None => meta.remove("previous_checkpoint_files"),
                        }
                        .ctx("write manifest")?;
                        // Keep what a fallback to the previous checkpoint replays.
                        journal.retain(|k, _| k > previous).ctx("trim journal")?;
                    }
                    None => {
                        meta.remove("previous_checkpoint_seq").ctx("write checkpoint seq")?;
                        meta.remove("previous_checkpoint_files").ctx("write manifest")?;
                    }
                }
            }
        }
        txn.commit().ctx("commit")?;
        drop(open);
        {
            let mut open = self.open.write().expect("not poisoned");
            for m in &sealing {
                open.minutes.remove(m);
            }
            open.tops.retain(|&(m, _), _| m >= open_from);
            for (minute, ad, c) in kept {
                open.minutes.entry(minute.0).or_default().insert(ad.clone(), c.into());
            }
            for t in kept_tops {
                open.tops.insert((t.minute.0, t.slot.index() as u32), t.ads.clone());
            }
            open.seq = Some(seq);
        }
        self.remember_days(new_days);
        if checkpoint.is_some() {
            self.remove_old_checkpoints()?;
        }
        Ok(())
    }

    /// Writes absolute counts (any order) into `counts` in key order, with the `ad_days` pairs
    /// not written before and the versions of the hours touched. Returns the new (day, ad)
    /// pairs, for [`Store::remember_days`] once the transaction has committed.
    fn write_rows(
        &self,
        txn: &redb::WriteTransaction,
        rows: Vec<(Minute, &AdId, &[u64])>,
    ) -> Result<Vec<(i64, AdId)>, StoreError> {
        let mut new_days = Vec::new();
        let mut hours_touched: Vec<i64> = Vec::new();
        let mut counts = txn.open_table(COUNTS).ctx("open counts")?;
        let mut row = Vec::new();
        let written = self.ad_days_written.lock().expect("not poisoned");
        // In key order: consecutive inserts land in the same B-tree pages.
        // Integer keys first (minute, the ad's first 8 bytes): few string comparisons.
        let prefix = |ad: &AdId| {
            let b = ad.as_str().as_bytes();
            let mut p = [0u8; 8];
            p[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
            u64::from_be_bytes(p)
        };
        let mut rows: Vec<_> = rows.into_iter().map(|r| ((r.0, prefix(r.1)), r)).collect();
        rows.sort_unstable_by(|(ka, a), (kb, b)| {
            ka.cmp(kb).then_with(|| a.1.as_str().cmp(b.1.as_str()))
        });
        for (_, (minute, ad, c)) in rows {
            let hour = minute.0.div_euclid(60);
            if hours_touched.last() != Some(&hour) {
                hours_touched.push(hour); // rows are in minute order
            }
            encode_counts(&mut row, c);
            counts.insert((minute.0, ad.as_str()), row.as_slice()).ctx("write count")?;
            let key = (day_of(minute.0), ad.clone());
            if !written.contains(&key) {
                new_days.push(key);
            }
        }
        drop(written);
        new_days.sort_unstable_by(|a, b| (a.1.as_str(), a.0).cmp(&(b.1.as_str(), b.0)));
        let mut days = txn.open_table(AD_DAYS).ctx("open ad_days")?;
        for (day, ad) in &new_days {
            days.insert((ad.as_str(), *day), ()).ctx("write ad day")?;
        }
        let mut versions = txn.open_table(HOUR_VERSIONS).ctx("open hour_versions")?;
        for &hour in &hours_touched {
            let v = versions.get(hour).ctx("read hour version")?.map_or(0, |v| v.value());
            versions.insert(hour, v + 1).ctx("write hour version")?;
        }
        Ok(new_days)
    }

    /// Remembers (day, ad) pairs a committed transaction wrote, so later commits skip them.
    fn remember_days(&self, new_days: Vec<(i64, AdId)>) {
        if new_days.is_empty() {
            return;
        }
        let mut written = self.ad_days_written.lock().expect("not poisoned");
        if written.len() + new_days.len() > AD_DAYS_REMEMBERED {
            written.clear();
        }
        written.extend(new_days);
    }

    fn checkpoint_path(&self, seq: u64) -> PathBuf {
        self.checkpoints.join(format!("{seq:020}.snap"))
    }

    /// Writes a checkpoint file durably (temporary name, fsync, rename, directory fsync), before
    /// a commit records it. Safe beside commits (the aggregator's checkpoint thread calls it).
    pub fn write_checkpoint(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let io = |what| move |e: std::io::Error| StoreError { what, source: redb::Error::Io(e) };
        let path = self.checkpoint_path(seq);
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io("create checkpoint file"))?;
        f.write_all(bytes).map_err(io("write checkpoint file"))?;
        crate::fault::point("checkpoint.before_sync");
        f.sync_all().map_err(io("sync checkpoint file"))?;
        std::fs::rename(&tmp, &path).map_err(io("rename checkpoint file"))?;
        File::open(&self.checkpoints)
            .and_then(|d| d.sync_all())
            .map_err(io("sync checkpoint directory"))
    }

    /// The committed checkpoints, newest first.
    fn committed_checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let meta = txn.open_table(META).ctx("open meta")?;
        let mut out = Vec::new();
        for (seq_key, files_key) in [
            ("checkpoint_seq", "checkpoint_files"),
            ("previous_checkpoint_seq", "previous_checkpoint_files"),
        ] {
            let Some(seq) =
                meta.get(seq_key).ctx("read checkpoint seq")?.map(|v| le_u64(v.value()))
            else {
                continue;
            };
            let files = match meta.get(files_key).ctx("read manifest")? {
                Some(v) => decode_manifest(v.value()).ok_or(StoreError {
                    what: "checkpoint manifest is corrupt",
                    source: redb::Error::Corrupted(format!("manifest of checkpoint {seq}")),
                })?,
                // Written before manifests: one self-contained file.
                None => vec![CheckpointFile { seq, extent: Extent::default() }],
            };
            out.push(CheckpointRecord { seq, files });
        }
        Ok(out)
    }

    /// Removes every checkpoint file neither committed manifest names (expired ones, and orphans
    /// of a crash before their commit). Call only while no checkpoint file is being written.
    fn remove_old_checkpoints(&self) -> Result<(), StoreError> {
        let keep: Vec<PathBuf> = self
            .committed_checkpoints()?
            .iter()
            .flat_map(|c| c.files.iter().map(|f| self.checkpoint_path(f.seq)))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.checkpoints) else { return Ok(()) };
        for e in entries.flatten() {
            if !keep.contains(&e.path()) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!(path = %e.path().display(), "removing an old checkpoint: {err}");
                }
            }
        }
        Ok(())
    }

    pub fn recovery(&self) -> Result<Recovery, StoreError> {
        let committed = self.committed_checkpoints()?;
        let seqs: Vec<u64> = committed.iter().map(|c| c.seq).collect();
        // Files are mapped, not copied: at the chapter's peak they hold about a GB, and fresh
        // memory to copy it into costs more than reading it. The two checkpoints mostly share
        // their files, mapped once. Checkpoint files are never changed, only removed once no
        // committed manifest names them.
        let mut wanted: Vec<u64> =
            committed.iter().flat_map(|c| c.files.iter().map(|f| f.seq)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let read: std::collections::HashMap<u64, Result<Arc<memmap2::Mmap>, String>> = wanted
            .into_iter()
            .map(|seq| {
                let path = self.checkpoint_path(seq);
                let map = std::fs::File::open(&path)
                    // SAFETY: checkpoint files are written once (to a temp name, then renamed)
                    // and not modified after; nothing removes them while a recovery reads them.
                    .and_then(|f| unsafe { memmap2::Mmap::map(&f) })
                    .map_err(|e| format!("{}: {e}", path.display()));
                (seq, map.map(Arc::new))
            })
            .collect();
        let checkpoints = committed
            .into_iter()
            .map(|c| {
                let files = c.files.iter().map(|f| read[&f.seq].clone()).collect();
                (c, files)
            })
            .collect();
        let txn = self.db.begin_read().ctx("begin read")?;
        let watermark = read_watermark(&txn)?;
        let journal_table = txn.open_table(JOURNAL).ctx("open journal")?;
        let mut journal = Vec::new();
        for item in journal_table.iter().ctx("read journal")? {
            let (k, v) = item.ctx("read journal entry")?;
            let record = BatchRecord::decode(v.value()).ok_or(StoreError {
                what: "journal entry is corrupt",
                source: redb::Error::Corrupted(format!("journal entry {}", k.value())),
            })?;
            journal.push((k.value(), record));
        }
        let next_seq =
            journal.last().map(|(s, _)| s + 1).or(seqs.first().map(|s| s + 1)).unwrap_or(0);
        let offsets = self.offsets()?;
        Ok(Recovery { checkpoints, journal, next_seq, offsets, watermark })
    }

    /// Hands the store the rows and top-N lists of the minutes that can still change, as of the
    /// last commit (the aggregator after recovery, from [`crate::engine::Engine::unsealed`]):
    /// from now on it keeps them in memory (see [`Open`]).
    pub fn load_open(
        &self,
        rows: &crate::engine::CountUpdates,
        tops: &[crate::engine::TopUpdate],
        lateness_ms: i64,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let seq = read_commit_seq(&txn)?;
        let watermark = read_watermark(&txn)?;
        let mut open = self.open.write().expect("not poisoned");
        *open = Open { live: true, lateness_ms, seq, ..Open::default() };
        let open_from = open.from(watermark);
        for (minute, ad, c) in rows.iter().filter(|(m, _, _)| m.0 >= open_from) {
            open.minutes.entry(minute.0).or_default().insert(ad.clone(), c.into());
        }
        for t in tops.iter().filter(|t| t.minute.0 >= open_from) {
            open.tops.insert((t.minute.0, t.slot.index() as u32), t.ads.clone());
        }
        Ok(())
    }

    /// Writes the rows and lists kept in memory to the tables (a clean stop: so that a process that opens
    /// the store alone reads every committed count), and stops keeping them.
    pub fn flush_open(&self) -> Result<(), StoreError> {
        let mut open = self.open.write().expect("not poisoned");
        let txn = self.db.begin_write().ctx("begin")?;
        let rows = open
            .minutes
            .iter()
            .flat_map(|(&m, rows)| rows.iter().map(move |(ad, c)| (Minute(m), ad, &c[..])))
            .collect();
        let new_days = self.write_rows(&txn, rows)?;
        write_tops(&txn, open.tops.iter().map(|(&(m, slot), ads)| (m, slot, ads.as_slice())))?;
        txn.commit().ctx("commit open minutes")?;
        self.remember_days(new_days);
        *open = Open::default();
        Ok(())
    }

    /// A read transaction, with the minutes kept in memory at the same commit when an aggregator
    /// keeps them, and the first minute to take from there (`i64::MAX`: none).
    fn read_view(&self) -> Result<View<'_>, StoreError> {
        loop {
            let txn = self.db.begin_read().ctx("begin read")?;
            let seq = read_commit_seq(&txn)?;
            let watermark = read_watermark(&txn)?;
            // Tests widen the window in which a commit lands between the two reads.
            #[cfg(test)]
            std::thread::sleep(std::time::Duration::from_micros(50));
            let open = self.open.read().expect("not poisoned");
            if !open.live {
                return Ok((txn, watermark, i64::MAX, None));
            }
            if open.seq == seq {
                return Ok((txn, watermark, open.from(watermark), Some(open)));
            }
            // A commit between the two reads: its rows reach memory right after.
            drop(open);
            std::thread::yield_now();
        }
    }

    pub fn offsets(&self) -> Result<Vec<(PartitionId, Offset)>, StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let t = txn.open_table(OFFSETS).ctx("open offsets")?;
        let mut out = Vec::new();
        for item in t.iter().ctx("read offsets")? {
            let (k, v) = item.ctx("read offset")?;
            out.push((PartitionId(k.value()), Offset(v.value())));
        }
        Ok(out)
    }

    /// The committed watermark.
    pub fn watermark(&self) -> Result<Watermark, StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        read_watermark(&txn)
    }

    pub fn counters(&self) -> Result<Counters, StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let meta = txn.open_table(META).ctx("open meta")?;
        Ok(meta
            .get("counters")
            .ctx("read counters")?
            .and_then(|v| Counters::decode(&mut Decoder::raw(v.value())).ok())
            .unwrap_or_default())
    }

    /// Per-minute counts of one ad and slot over `[from, to)`, only minutes with clicks, and
    /// the watermark, from one read transaction (so `final` matches the counts). Reads only the
    /// days in which the ad has counts: at most 1,440 point lookups per such day, whatever the
    /// calendar span.
    pub fn series(
        &self,
        ad: &str,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), StoreError> {
        let (txn, watermark, open_from, open) = self.read_view()?;
        let mut kept = Vec::new();
        if let Some(open) = open {
            for (&minute, rows) in open.minutes.range(from.0.max(open_from)..to.0.max(open_from)) {
                if let Some(c) = rows.get(ad).map(|c| c.get(slot.index()).copied().unwrap_or(0)) {
                    if c > 0 {
                        kept.push((Minute(minute), c));
                    }
                }
            }
        }
        let to = Minute(to.0.min(open_from));
        let t = txn.open_table(COUNTS).ctx("open counts")?;
        let days = txn.open_table(AD_DAYS).ctx("open ad_days")?;
        let mut out = Vec::new();
        if from >= to {
            return Ok((kept, watermark));
        }
        let last_day = day_of(to.0 - 1);
        for item in days.range((ad, day_of(from.0))..=(ad, last_day)).ctx("scan ad days")? {
            let (k, _) = item.ctx("read ad day")?;
            let day = k.value().1;
            for minute in (day * DAY_MINUTES).max(from.0)..((day + 1) * DAY_MINUTES).min(to.0) {
                if let Some(v) = t.get((minute, ad)).ctx("read count")? {
                    let c = slot_value(v.value(), slot);
                    if c > 0 {
                        out.push((Minute(minute), c));
                    }
                }
            }
        }
        out.extend(kept);
        Ok((out, watermark))
    }

    /// The `k` ads with the most clicks of `slot` over `[from, to)`, summed from the stored
    /// counts, with the watermark of the same read: for windows older than the in-memory index
    /// holds. Whole hours come from the hour cache (or are summed once and cached), the partial
    /// hours at the edges from one pass over their rows.
    pub fn popular(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
        k: usize,
    ) -> Result<(Vec<Ranked>, Watermark), StoreError> {
        let (txn, watermark, open_from, open) = self.read_view()?;
        let mut sums: std::collections::HashMap<AdId, u64> = std::collections::HashMap::new();
        if let Some(open) = open {
            for rows in open.minutes.range(from.0.max(open_from)..to.0.max(open_from)) {
                for (ad, c) in rows.1 {
                    let c = c.get(slot.index()).copied().unwrap_or(0);
                    if c > 0 {
                        *sums.entry(ad.clone()).or_default() += c;
                    }
                }
            }
        }
        let to = Minute(to.0.min(open_from));
        let t = txn.open_table(COUNTS).ctx("open counts")?;
        let versions = txn.open_table(HOUR_VERSIONS).ctx("open hour_versions")?;
        let mut add = |ad: &str, c: u64| match sums.get_mut(ad) {
            Some(sum) => *sum += c,
            None => drop(sums.insert(AdId::new(ad), c)),
        };
        let mut at = from.0;
        while at < to.0 {
            let hour = at.div_euclid(60);
            let hour_end = (hour + 1) * 60;
            if at == hour * 60 && hour_end <= to.0 {
                let version = versions.get(hour).ctx("read hour version")?.map_or(0, |v| v.value());
                let cached =
                    self.hours.lock().expect("not poisoned").get((slot.index(), hour), version);
                let block = match cached {
                    Some(b) => b,
                    None => {
                        let mut hour_sums: std::collections::HashMap<AdId, u64> =
                            std::collections::HashMap::new();
                        sum_rows(&t, slot, at, hour_end, |ad, c| {
                            *hour_sums.entry(AdId::new(ad)).or_default() += c
                        })?;
                        let block: Arc<Vec<(AdId, u64)>> =
                            Arc::new(hour_sums.into_iter().collect());
                        self.hours.lock().expect("not poisoned").insert(
                            (slot.index(), hour),
                            version,
                            block.clone(),
                        );
                        block
                    }
                };
                for (ad, c) in block.iter() {
                    add(ad.as_str(), *c);
                }
                at = hour_end;
            } else {
                let end = hour_end.min(to.0);
                sum_rows(&t, slot, at, end, &mut add)?;
                at = end;
            }
        }
        Ok((crate::rank::top(sums.into_iter().collect(), k), watermark))
    }

    /// Every stored count at or after `since`, for rebuilding in-memory indexes at start: a
    /// range scan of those minutes only, bounded by the window, not by history. All at one
    /// commit, whose watermark it returns. The minutes kept in memory are copied out first, so
    /// commits wait for the copy only, not for `f`.
    pub fn scan_counts(
        &self,
        since: Minute,
        mut f: impl FnMut(Minute, &str, &[u64]),
    ) -> Result<Watermark, StoreError> {
        let (txn, watermark, open_from, open) = self.read_view()?;
        let recent: Vec<(i64, AdId, Box<[u64]>)> = open
            .iter()
            .flat_map(|open| open.minutes.range(since.0.max(open_from)..))
            .flat_map(|(&m, rows)| rows.iter().map(move |(ad, c)| (m, ad.clone(), c.clone())))
            .collect();
        drop(open);
        let t = txn.open_table(COUNTS).ctx("open counts")?;
        let mut row = Vec::new();
        if since.0 < open_from {
            for item in t.range((since.0, "")..(open_from, "")).ctx("scan counts")? {
                let (k, v) = item.ctx("read count")?;
                let (minute, ad) = k.value();
                row.clear();
                row.extend(v.value().chunks_exact(8).map(le_u64));
                f(Minute(minute), ad, &row);
            }
        }
        for (minute, ad, counts) in &recent {
            f(Minute(*minute), ad.as_str(), counts);
        }
        Ok(watermark)
    }

    /// The stored top-N of a minute and slot.
    pub fn top(&self, minute: Minute, slot: Slot) -> Result<Option<Vec<Ranked>>, StoreError> {
        let (txn, _, open_from, open) = self.read_view()?;
        if let Some(open) = open.filter(|_| minute.0 >= open_from) {
            return Ok(open.tops.get(&(minute.0, slot.index() as u32)).cloned());
        }
        let t = txn.open_table(TOPS).ctx("open tops")?;
        Ok(t.get((minute.0, slot.index() as u32)).ctx("read top")?.and_then(|v| {
            let mut d = Decoder::raw(v.value());
            (0..d.count().ok()?).map(|_| Some((AdId::new(d.str().ok()?), d.u().ok()?))).collect()
        }))
    }
}

/// The archiver's committed position (see `archive`).
#[derive(Debug, Default)]
pub struct ArchiveState {
    pub offsets: Vec<(PartitionId, Offset)>,
    pub next_seq: u64,
    /// A flush recorded but not committed: (seq, ranges), to redo.
    pub pending: Option<(u64, crate::archive::Ranges)>,
}

/// Everything stored for the minutes of a range, read in one transaction.
#[derive(Debug, Default)]
pub struct RangeRows {
    pub counts: CountRows,
    /// (minute, ad) → too-late clicks per slot.
    pub too_late: std::collections::BTreeMap<(i64, String), Vec<u64>>,
    pub watermark: Watermark,
    /// Per partition, the aggregator's committed offsets.
    pub offsets: Vec<(PartitionId, Offset)>,
}

/// (minute, ad) → counts per slot, sorted by (minute, ad), each key once: built and merged in
/// one pass, where a map would compare strings at every insert.
pub type CountRows = Vec<((i64, String), Vec<u64>)>;

/// What a recalculation replaced.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Replaced {
    pub rows_before: u64,
    pub rows_after: u64,
    pub tops: u64,
    /// Every (minute, ad) whose counts changed, with its new counts (zeros: removed), for the
    /// in-memory index.
    #[serde(skip)]
    pub changed: Vec<(Minute, AdId, Vec<u64>)>,
}

/// Why a recalculation cannot replace a range.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error(
        "minutes from {first_open} on can still be corrected by the live path (the watermark is \
         {watermark}, allowed_lateness {lateness_s}s); recalculate up to {first_open} at most, or \
         wait"
    )]
    NotSealed { first_open: String, watermark: String, lateness_s: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Refuses a range that reaches minutes the live path can still write (before `to`).
fn sealed(watermark: Watermark, to: Minute, lateness_ms: i64) -> Result<(), ReplaceError> {
    if watermark.is_too_late(Minute(to.0 - 1), lateness_ms) {
        return Ok(());
    }
    let first_open = watermark
        .oldest_countable(lateness_ms)
        .map_or(i64::MIN, |t| t.div_euclid(crate::event::MINUTE_MS));
    Err(ReplaceError::NotSealed {
        first_open: if first_open == i64::MIN {
            "the start (no watermark yet)".into()
        } else {
            crate::event::format_rfc3339(Minute(first_open).start())
        },
        watermark: watermark
            .ms()
            .map_or("none yet".into(), |w| crate::event::format_rfc3339(EventTime(w))),
        lateness_s: lateness_ms / 1000,
    })
}

impl Store {
    /// Refuses a recalculation of minutes before `to` that the live path can still write.
    pub fn check_sealed(&self, to: Minute, lateness_ms: i64) -> Result<(), ReplaceError> {
        sealed(self.watermark()?, to, lateness_ms)
    }

    pub fn archive_state(&self) -> Result<ArchiveState, StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let t = txn.open_table(ARCHIVE_OFFSETS).ctx("open archive_offsets")?;
        let mut state = ArchiveState::default();
        for item in t.iter().ctx("read archive offsets")? {
            let (k, v) = item.ctx("read archive offset")?;
            state.offsets.push((PartitionId(k.value()), Offset(v.value())));
        }
        let meta = txn.open_table(META).ctx("open meta")?;
        if let Some(v) = meta.get("archive_next_seq").ctx("read archive seq")? {
            state.next_seq = le_u64(v.value());
        }
        if let Some(v) = meta.get("archive_pending").ctx("read archive flush")? {
            let mut d = Decoder::raw(v.value());
            let decode = |d: &mut Decoder| Some((d.u().ok()?, decode_ranges(d)?));
            state.pending = Some(decode(&mut d).ok_or(StoreError {
                what: "the recorded archive flush is corrupt",
                source: redb::Error::Corrupted("archive_pending".into()),
            })?);
        }
        Ok(state)
    }

    /// Records, durably, that flush `seq` is about to write the files of `ranges`.
    pub fn archive_begin(
        &self,
        seq: u64,
        ranges: &[(PartitionId, Offset, Offset)],
    ) -> Result<(), StoreError> {
        let mut e = Encoder::default();
        e.u(seq);
        encode_ranges(&mut e, ranges);
        let txn = self.db.begin_write().ctx("begin")?;
        {
            let mut meta = txn.open_table(META).ctx("open meta")?;
            meta.insert("archive_pending", e.buf.as_slice()).ctx("write archive flush")?;
        }
        txn.commit().ctx("commit archive flush intent")
    }

    /// Commits flush `seq`: its files are written; the archive offsets advance past `ranges`.
    pub fn archive_commit(
        &self,
        seq: u64,
        ranges: &[(PartitionId, Offset, Offset)],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().ctx("begin")?;
        {
            let mut t = txn.open_table(ARCHIVE_OFFSETS).ctx("open archive_offsets")?;
            for (p, _, to) in ranges {
                t.insert(p.0, to.0).ctx("write archive offset")?;
            }
            let mut meta = txn.open_table(META).ctx("open meta")?;
            meta.remove("archive_pending").ctx("clear archive flush")?;
            meta.insert("archive_next_seq", (seq + 1).to_le_bytes().as_slice())
                .ctx("write archive seq")?;
        }
        txn.commit().ctx("commit archive flush")
    }

    /// Per minute of `[from, to)` with counts: the sum over every ad of `slot`, with the
    /// watermark, from one read. One pass over the minutes' rows; memory follows the minutes, not
    /// the rows.
    pub fn minute_totals(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), StoreError> {
        let (txn, watermark, open_from, open) = self.read_view()?;
        let mut sums: BTreeMap<i64, u64> = BTreeMap::new();
        let at = slot.index() * 8;
        let end = to.0.min(open_from);
        if from.0 < end {
            let t = txn.open_table(COUNTS).ctx("open counts")?;
            for item in t.range((from.0, "")..(end, "")).ctx("scan counts")? {
                let (k, v) = item.ctx("read count")?;
                if let Some(c) = v.value().get(at..at + 8) {
                    *sums.entry(k.value().0).or_default() += le_u64(c);
                }
            }
        }
        if let Some(open) = open {
            for (&minute, rows) in open.minutes.range(from.0.max(open_from)..to.0.max(open_from)) {
                let n: u64 = rows.values().filter_map(|c| c.get(slot.index())).sum();
                *sums.entry(minute).or_default() += n;
            }
        }
        let totals = sums.into_iter().filter(|(_, n)| *n > 0).map(|(m, n)| (Minute(m), n));
        Ok((totals.collect(), watermark))
    }

    /// Every stored count and too-late count of the minutes `[from, to)`, with the watermark
    /// and offsets, from one read transaction (reconciliation and dry runs).
    pub fn range_rows(&self, from: Minute, to: Minute) -> Result<RangeRows, StoreError> {
        let (txn, watermark, open_from, open) = self.read_view()?;
        let mut out = RangeRows { watermark, ..RangeRows::default() };
        let mut kept = CountRows::new();
        if let Some(open) = open {
            for (&minute, rows) in open.minutes.range(from.0.max(open_from)..to.0.max(open_from)) {
                kept.extend(rows.iter().map(|(ad, c)| ((minute, ad.to_string()), c.to_vec())));
            }
        }
        let scan = |table: TableDefinition<(i64, &str), &[u8]>,
                    end: i64|
         -> Result<CountRows, StoreError> {
            let t = txn.open_table(table).ctx("open counts")?;
            let mut rows = CountRows::new();
            if from.0 >= end {
                return Ok(rows);
            }
            for item in t.range((from.0, "")..(end, "")).ctx("scan counts")? {
                let (k, v) = item.ctx("read count")?;
                let (minute, ad) = k.value();
                rows.push((
                    (minute, ad.to_string()),
                    v.value().chunks_exact(8).map(le_u64).collect(),
                ));
            }
            // Already in key order as scanned: a stable sort only checks that (linear).
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(rows)
        };
        out.counts = scan(COUNTS, to.0.min(open_from))?;
        kept.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out.counts.extend(kept);
        out.too_late = scan(TOO_LATE, to.0)?.into_iter().collect();
        let t = txn.open_table(OFFSETS).ctx("open offsets")?;
        for item in t.iter().ctx("read offsets")? {
            let (k, v) = item.ctx("read offset")?;
            out.offsets.push((PartitionId(k.value()), Offset(v.value())));
        }
        Ok(out)
    }

    /// Replaces the counts and top-N lists of the minutes `[from, to)` with `counts` and `tops`
    /// in one transaction (SPEC §3.4), and clears their too-late counts (now counted). Refused
    /// unless the live path can no longer write any of those minutes (checked in the same
    /// transaction, against the committed watermark, which only grows).
    pub fn replace_range(
        &self,
        from: Minute,
        to: Minute,
        counts: &CountRows,
        tops: &[crate::engine::TopUpdate],
        lateness_ms: i64,
    ) -> Result<Replaced, ReplaceError> {
        let txn = self.db.begin_write().ctx("begin recalculation")?;
        let mut replaced = Replaced::default();
        {
            let meta = txn.open_table(META).ctx("open meta")?;
            let watermark = meta
                .get("watermark")
                .ctx("read watermark")?
                .map_or(Watermark::NONE, |v| Watermark::from_raw(le_u64(v.value()) as i64));
            sealed(watermark, to, lateness_ms)?;
            let mut t = txn.open_table(COUNTS).ctx("open counts")?;
            let mut old: std::collections::BTreeMap<(i64, String), Vec<u64>> = Default::default();
            for item in t.range((from.0, "")..(to.0, "")).ctx("scan counts")? {
                let (k, v) = item.ctx("read count")?;
                let (minute, ad) = k.value();
                old.insert(
                    (minute, ad.to_string()),
                    v.value().chunks_exact(8).map(le_u64).collect(),
                );
            }
            replaced.rows_before = old.len() as u64;
            for (minute, ad) in old.keys() {
                t.remove((*minute, ad.as_str())).ctx("remove count")?;
            }
            let mut days = txn.open_table(AD_DAYS).ctx("open ad_days")?;
            let mut row = Vec::new();
            for ((minute, ad), c) in counts {
                if *minute < from.0 || *minute >= to.0 || c.iter().all(|&v| v == 0) {
                    continue;
                }
                encode_counts(&mut row, c);
                t.insert((*minute, ad.as_str()), row.as_slice()).ctx("write count")?;
                days.insert((ad.as_str(), day_of(*minute)), ()).ctx("write ad day")?;
                replaced.rows_after += 1;
                if old.get(&(*minute, ad.clone())) != Some(c) {
                    replaced.changed.push((Minute(*minute), AdId::new(ad), c.clone()));
                }
            }
            for ((minute, ad), c) in &old {
                if counts
                    .binary_search_by(|(k, _)| (k.0, k.1.as_str()).cmp(&(*minute, ad)))
                    .is_err()
                {
                    replaced.changed.push((Minute(*minute), AdId::new(ad), vec![0; c.len()]));
                }
            }
            let mut versions = txn.open_table(HOUR_VERSIONS).ctx("open hour_versions")?;
            for hour in from.0.div_euclid(60)..=(to.0 - 1).div_euclid(60) {
                let v = versions.get(hour).ctx("read hour version")?.map_or(0, |v| v.value());
                versions.insert(hour, v + 1).ctx("write hour version")?;
            }
            let mut top_table = txn.open_table(TOPS).ctx("open tops")?;
            top_table.retain_in((from.0, 0)..(to.0, 0), |_, _| false).ctx("remove tops")?;
            for t in tops.iter().filter(|t| t.minute >= from && t.minute < to) {
                top_table
                    .insert((t.minute.0, t.slot.index() as u32), encode_top(&t.ads).as_slice())
                    .ctx("write top")?;
                replaced.tops += 1;
            }
            let mut late = txn.open_table(TOO_LATE).ctx("open too_late")?;
            late.retain_in((from.0, "")..(to.0, ""), |_, _| false).ctx("clear too late")?;
            crate::fault::point("store.mid_replace");
        }
        txn.commit().ctx("commit recalculation")?;
        Ok(replaced)
    }
}

/// Why a data directory refuses the configured settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{}", describe_changes(.0))]
    Changed(Vec<(String, String, String)>),
    #[error("the recorded settings are unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe_changes(changes: &[(String, String, String)]) -> String {
    let list: Vec<String> = changes
        .iter()
        .map(|(k, old, new)| {
            format!("{k}: the data was aggregated with {old}, the config has {new}")
        })
        .collect();
    format!(
        "settings that change results differ from those this data directory was aggregated with:\n  {}\n\
         Counts already stored would mix two definitions. Use the recorded values, or start a new \
         data_dir with the new ones (and send the raw clicks again, or recalculate once that exists).",
        list.join("\n  ")
    )
}

/// (key, old, new) for every key whose value differs, is missing or is new.
fn diff_settings(
    old: &[(String, String)],
    new: &[(String, String)],
) -> Vec<(String, String, String)> {
    let get = |list: &[(String, String)], k: &str| {
        list.iter().find(|(key, _)| key == k).map_or("(none)".to_string(), |(_, v)| v.clone())
    };
    let mut keys: Vec<&String> = old.iter().chain(new).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (get(old, k), get(new, k));
            (a != b).then(|| (k.clone(), a, b))
        })
        .collect()
}

/// Calls `f(ad, count)` for every stored row of `slot` with a count in minutes `[from, to)`.
fn sum_rows(
    t: &redb::ReadOnlyTable<(i64, &'static str), &'static [u8]>,
    slot: Slot,
    from: i64,
    to: i64,
    mut f: impl FnMut(&str, u64),
) -> Result<(), StoreError> {
    for item in t.range((from, "")..(to, "")).ctx("scan counts")? {
        let (key, v) = item.ctx("read count")?;
        let c = slot_value(v.value(), slot);
        if c > 0 {
            f(key.value().1, c);
        }
    }
    Ok(())
}

/// A `counts` value: u64 LE per slot.
fn encode_counts(row: &mut Vec<u8>, counts: &[u64]) {
    row.clear();
    counts.iter().for_each(|v| row.extend_from_slice(&v.to_le_bytes()));
}

fn write_tops<'a>(
    txn: &redb::WriteTransaction,
    tops: impl IntoIterator<Item = (i64, u32, &'a [Ranked])>,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(TOPS).ctx("open tops")?;
    for (minute, slot, ads) in tops {
        table.insert((minute, slot), encode_top(ads).as_slice()).ctx("write top")?;
    }
    Ok(())
}

fn day_of(minute: i64) -> i64 {
    minute.div_euclid(DAY_MINUTES)
}

fn read_commit_seq(txn: &redb::ReadTransaction) -> Result<Option<u64>, StoreError> {
    let meta = txn.open_table(META).ctx("open meta")?;
    Ok(meta.get("commit_seq").ctx("read commit seq")?.map(|v| le_u64(v.value())))
}

fn read_watermark(txn: &redb::ReadTransaction) -> Result<Watermark, StoreError> {
    let meta = txn.open_table(META).ctx("open meta")?;
    Ok(meta
        .get("watermark")
        .ctx("read watermark")?
        .map_or(Watermark::NONE, |v| Watermark::from_raw(le_u64(v.value()) as i64)))
}

fn slot_value(row: &[u8], slot: Slot) -> u64 {
    row.get(slot.index() * 8..slot.index() * 8 + 8).map_or(0, le_u64)
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Rows of `counts` as stored, without the minutes kept in memory.
    fn stored_rows(store: &Store) -> Vec<(i64, String, Vec<u64>)> {
        let txn = store.db.begin_read().unwrap();
        let t = txn.open_table(COUNTS).unwrap();
        t.iter()
            .unwrap()
            .map(|item| {
                let (k, v) = item.unwrap();
                let (m, ad) = k.value();
                (m, ad.to_string(), v.value().chunks_exact(8).map(le_u64).collect())
            })
            .collect()
    }

    #[test]
    fn unsealed_minutes_stay_in_memory_until_sealed_and_read_the_same() {
        use crate::engine::{CountUpdates, Output, TopUpdate};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let minute = crate::event::MINUTE_MS;
        // Minutes are sealed a minute after their end.
        store.load_open(&CountUpdates::new(2), &[], minute).unwrap();
        let output = |watermark: i64, rows: &[(i64, &str, [u64; 2])], tops: &[(i64, &str, u64)]| {
            let mut counts = CountUpdates::new(2);
            for (m, ad, c) in rows {
                counts.push(Minute(*m), &AdId::new(ad), c);
            }
            let top = tops
                .iter()
                .map(|(m, ad, c)| TopUpdate {
                    minute: Minute(*m),
                    slot: Slot::Total,
                    ads: vec![(AdId::new(ad), *c)],
                })
                .collect();
            Output { counts, top, watermark: Watermark::at(watermark), ..Output::default() }
        };
        type Reads = (
            Vec<(Minute, u64)>,
            Vec<(Minute, u64)>,
            Vec<Ranked>,
            Vec<(i64, String, Vec<u64>)>,
            Vec<(i64, String, Vec<u64>)>,
        );
        fn reads(store: &Store, to: i64) -> Reads {
            let filter = Slot::from_index(1);
            let mut scanned = Vec::new();
            store
                .scan_counts(Minute(0), |m, ad, c| scanned.push((m.0, ad.to_string(), c.to_vec())))
                .unwrap();
            scanned.sort();
            let rows = store.range_rows(Minute(0), Minute(to)).unwrap().counts;
            (
                store.series("a", Slot::Total, Minute(0), Minute(to)).unwrap().0,
                store.series("b", filter, Minute(0), Minute(to)).unwrap().0,
                store.popular(Slot::Total, Minute(0), Minute(to), 5).unwrap().0,
                rows.into_iter().map(|((m, ad), c)| (m, ad, c)).collect::<Vec<_>>(),
                scanned,
            )
        }
        let row = |m: i64, ad: &str, c: [u64; 2]| (m, ad.to_string(), c.to_vec());
        // Minutes 1 and 2 open: nothing of them written.
        let first =
            output(minute + 5, &[(1, "a", [3, 1]), (1, "b", [2, 2]), (2, "a", [1, 0])], &[]);
        store.commit(0, &BatchRecord::default(), &first, None).unwrap();
        assert_eq!(stored_rows(&store), vec![]);
        let (a, b, top, rows, scanned) = reads(&store, 10);
        assert_eq!(a, vec![(Minute(1), 3), (Minute(2), 1)]);
        assert_eq!(b, vec![(Minute(1), 2)]);
        assert_eq!(top, vec![(AdId::new("a"), 4), (AdId::new("b"), 2)]);
        assert_eq!(rows, vec![row(1, "a", [3, 1]), row(1, "b", [2, 2]), row(2, "a", [1, 0])]);
        assert_eq!(scanned, rows);
        assert_eq!(
            reads(&store, 2).0,
            vec![(Minute(1), 3)],
            "the range's end bounds the kept minutes"
        );
        // Minute 1 final but not sealed, its top-N too: still only in memory.
        let second = output(2 * minute, &[(1, "a", [4, 1]), (2, "b", [5, 0])], &[(1, "a", 4)]);
        store.commit(1, &BatchRecord::default(), &second, None).unwrap();
        assert_eq!(stored_rows(&store), vec![]);
        assert_eq!(store.top(Minute(1), Slot::Total).unwrap(), Some(vec![(AdId::new("a"), 4)]));
        let (a, b, top, rows, _) = reads(&store, 10);
        assert_eq!(a, vec![(Minute(1), 4), (Minute(2), 1)]);
        assert_eq!(b, vec![(Minute(1), 2)]);
        assert_eq!(top, vec![(AdId::new("b"), 7), (AdId::new("a"), 5)]);
        assert_eq!(
            rows,
            vec![
                row(1, "a", [4, 1]),
                row(1, "b", [2, 2]),
                row(2, "a", [1, 0]),
                row(2, "b", [5, 0])
            ]
        );
        // Minute 1 sealed: written once, the kept rows and list with it; minute 2 corrected late.
        let third = output(3 * minute + 1, &[(2, "a", [2, 0])], &[(2, "b", 5)]);
        store.commit(2, &BatchRecord::default(), &third, None).unwrap();
        assert_eq!(stored_rows(&store), vec![row(1, "a", [4, 1]), row(1, "b", [2, 2])]);
        assert_eq!(store.top(Minute(1), Slot::Total).unwrap(), Some(vec![(AdId::new("a"), 4)]));
        assert_eq!(store.top(Minute(2), Slot::Total).unwrap(), Some(vec![(AdId::new("b"), 5)]));
        assert_eq!(reads(&store, 10).0, vec![(Minute(1), 4), (Minute(2), 2)]);
        // A clean stop writes the rest, and a store without an aggregator reads it all.
        store.flush_open().unwrap();
        assert_eq!(stored_rows(&store).len(), 4);
        drop(store);
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (a, b, top, rows, _) = reads(&store, 10);
        assert_eq!(a, vec![(Minute(1), 4), (Minute(2), 2)]);
        assert_eq!(b, vec![(Minute(1), 2)]);
        assert_eq!(top, vec![(AdId::new("b"), 7), (AdId::new("a"), 6)]);
        assert_eq!(rows.len(), 4);
        assert_eq!(store.top(Minute(2), Slot::Total).unwrap(), Some(vec![(AdId::new("b"), 5)]));
    }

    #[test]
    fn a_clean_stop_writes_open_minutes_as_a_commit_would() {
        use crate::engine::{CountUpdates, Output};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
        store.load_open(&CountUpdates::new(1), &[], 0).unwrap();
        // Months away from anything stored, in minutes no commit has sealed.
        let day = 200 * DAY_MINUTES;
        let mut counts = CountUpdates::new(1);
        counts.push(Minute(day + 5), &AdId::new("z"), &[2]);
        counts.push(Minute(day + 6), &AdId::new("z"), &[3]);
        let output = Output { counts, watermark: Watermark::at(0), ..Output::default() };
        store.commit(0, &BatchRecord::default(), &output, None).unwrap();
        assert_eq!(stored_rows(&store), vec![]);
        store.flush_open().unwrap();
        drop(store);
        // Read alone: the day index finds the ad's day, the hour sums see the rows.
        let store = Store::open(&path).unwrap();
        let (series, _) = store.series("z", Slot::Total, Minute(0), Minute(day + 60)).unwrap();
        assert_eq!(series, vec![(Minute(day + 5), 2), (Minute(day + 6), 3)]);
        let (top, _) = store.popular(Slot::Total, Minute(day), Minute(day + 120), 3).unwrap();
        assert_eq!(top, vec![(AdId::new("z"), 5)]);
    }

    #[test]
    fn reads_racing_commits_see_each_minute_once() {
        use crate::engine::{CountUpdates, Output};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        store.load_open(&CountUpdates::new(1), &[], 0).unwrap();
        let minute = crate::event::MINUTE_MS;
        let commits = 1000;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !done.load(std::sync::atomic::Ordering::Acquire) || reads == 0 {
                    // Minute k holds one click from commit k on; commit k+1 seals it (moves it
                    // from memory to the table). Each read must see minutes 1..=n exactly once.
                    let (series, w) =
                        store.series("a", Slot::Total, Minute(0), Minute(2000)).unwrap();
                    let minutes: Vec<i64> = series.iter().map(|(m, _)| m.0).collect();
                    assert_eq!(minutes, (1..=minutes.len() as i64).collect::<Vec<_>>(), "at {w:?}");
                    assert!(series.iter().all(|(_, c)| *c == 1));
                    reads += 1;
                }
                reads
            })
        };
        for k in 1..=commits {
            let mut counts = CountUpdates::new(1);
            counts.push(Minute(k), &AdId::new("a"), &[1]);
            // Minute k - 1 more than 0 ms past its end: sealed by this commit.
            let output =
                Output { counts, watermark: Watermark::at(k * minute + 1), ..Output::default() };
            store.commit(k as u64, &BatchRecord::default(), &output, None).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(stored_rows(&store).len() as i64, commits - 1, "all but the last minute sealed");
    }

    #[test]
    fn commits_read_back_and_checkpoints_trim_the_journal() {
        use crate::engine::{Engine, EngineConfig, Payload, Record};
        use crate::event::EventTime;
        use crate::filter::Filters;

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let mut engine =
            Engine::new(EngineConfig::default(), std::sync::Arc::new(Filters::default())).unwrap();
        let lines: Vec<String> = (0..5)
            .map(|i| {
                format!(
                    r#"{{"ad_id":"ad-{}","click_timestamp":{},"click_id":"{i}"}}"#,
                    i % 2,
                    60_000 + i
                )
            })
            .chain([r#"{"ad_id":"x","click_timestamp":200000}"#.to_string()])
            .collect();
        let records: Vec<Record> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| Record {
                partition: PartitionId(0),
                offset: Offset(i as u64),
                payload: Payload::Line(l.as_bytes()),
            })
            .collect();
        let out = engine.process(EventTime(0), &records);
        assert!(!out.top.is_empty(), "minute 1 is final in this batch");
        let batch = BatchRecord {
            wall: 0,
            ranges: vec![(PartitionId(0), Offset(0), Offset(6))],
            assign: vec![PartitionId(0)],
        };
        store.commit(0, &batch, &out, None).unwrap();

        let w = Watermark::at(185_000);
        assert_eq!(
            store.series("ad-0", Slot::Total, Minute(0), Minute(10)).unwrap(),
            (vec![(Minute(1), 3)], w)
        );
        assert_eq!(store.series("ad-1", Slot::Total, Minute(2), Minute(10)).unwrap(), (vec![], w));
        // A 10,000-year range reads only the days that hold the ad.
        assert_eq!(
            store.series("x", Slot::Total, Minute(-5_000_000_000), Minute(5_000_000_000)).unwrap(),
            (vec![(Minute(3), 1)], w)
        );
        assert_eq!(
            store.popular(Slot::Total, Minute(0), Minute(10), 2).unwrap(),
            (vec![(AdId::new("ad-0"), 3), (AdId::new("ad-1"), 2)], w)
        );
        assert_eq!(
            store.top(Minute(1), Slot::Total).unwrap(),
            Some(vec![(AdId::new("ad-0"), 3), (AdId::new("ad-1"), 2)])
        );
        assert_eq!(store.offsets().unwrap(), vec![(PartitionId(0), Offset(6))]);
        assert_eq!(store.watermark().unwrap(), w);
        assert_eq!(store.counters().unwrap().counted, 6);
        let mut seen = Vec::new();
        store
            .scan_counts(Minute(2), |m, ad, c| seen.push((m, ad.to_string(), c.to_vec())))
            .unwrap();
        assert_eq!(seen, vec![(Minute(3), "x".to_string(), vec![1])]);
        let rec = store.recovery().unwrap();
        assert_eq!((rec.journal.len(), rec.next_seq, rec.checkpoints.len()), (1, 1, 0));
        assert_eq!(rec.journal[0].1, batch);

        let snapshot = engine.snapshot();
        let empty = |e: &mut Engine| e.process(EventTime(0), &[]);
        let nothing = BatchRecord::default();
        // A checkpoint: its file written first, then a commit records its manifest.
        let checkpoint = |seq: u64, bytes: &[u8], files: &[u64]| {
            store.write_checkpoint(seq, bytes).unwrap();
            let files = files
                .iter()
                .map(|&seq| CheckpointFile { seq, extent: Extent::default() })
                .collect();
            CheckpointRecord { seq, files }
        };
        let first = checkpoint(1, &snapshot, &[1]);
        store.commit(1, &nothing, &empty(&mut engine), Some(&first)).unwrap();
        let rec = store.recovery().unwrap();
        assert_eq!(rec.next_seq, 2);
        assert_eq!(rec.journal.len(), 2, "no previous checkpoint: the journal stays whole");
        assert_eq!(loaded(&rec), vec![(first.clone(), Ok(vec![snapshot.clone()]))]);
        // The second checkpoint is taken after batch 2, its file written while batch 3 commits
        // without it, and recorded by batch 3's commit. It keeps file 1 (incremental) and the
        // first checkpoint (and the journal after it) for a fallback.
        std::fs::write(dir.path().join("checkpoints").join(format!("{:020}.snap", 9)), b"orphan")
            .unwrap();
        store.commit(2, &nothing, &empty(&mut engine), None).unwrap();
        let second = checkpoint(2, b"second", &[1, 2]);
        store.commit(3, &nothing, &empty(&mut engine), Some(&second)).unwrap();
        let rec = store.recovery().unwrap();
        assert_eq!(
            loaded(&rec),
            vec![
                (second.clone(), Ok(vec![snapshot.clone(), b"second".to_vec()])),
                (first.clone(), Ok(vec![snapshot.clone()]))
            ]
        );
        assert_eq!(rec.journal.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 3]);
        // Files neither manifest names go after each recording commit: the orphan at once, file
        // 1 once no kept checkpoint needs it.
        let files = || {
            let mut files: Vec<_> = std::fs::read_dir(dir.path().join("checkpoints"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().into_string().unwrap())
                .collect();
            files.sort();
            files
        };
        let named = |seqs: &[u64]| -> Vec<String> {
            seqs.iter().map(|s| format!("{s:020}.snap")).collect()
        };
        assert_eq!(files(), named(&[1, 2]));
        let fourth = checkpoint(4, b"fourth", &[2, 4]);
        store.commit(4, &nothing, &empty(&mut engine), Some(&fourth)).unwrap();
        assert_eq!(files(), named(&[1, 2, 4]), "the previous checkpoint still needs file 1");
        let fifth = checkpoint(5, b"fifth", &[4, 5]);
        store.commit(5, &nothing, &empty(&mut engine), Some(&fifth)).unwrap();
        assert_eq!(files(), named(&[2, 4, 5]));
        std::fs::remove_file(dir.path().join("checkpoints").join(format!("{:020}.snap", 5)))
            .unwrap();
        let rec = store.recovery().unwrap();
        assert!(rec.checkpoints[0].1.is_err(), "a missing file of the newest is reported");
        assert_eq!(loaded(&rec)[1], (fourth, Ok(vec![b"second".to_vec(), b"fourth".to_vec()])));
        assert_eq!(rec.journal.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![5]);
    }

    /// The checkpoints a recovery found, with their files' bytes.
    type Loaded = (CheckpointRecord, Result<Vec<Vec<u8>>, String>);

    fn loaded(rec: &Recovery) -> Vec<Loaded> {
        rec.checkpoints
            .iter()
            .map(|(c, files)| {
                (c.clone(), files.clone().map(|f| f.iter().map(|m| m.to_vec()).collect()))
            })
            .collect()
    }

    /// History popular ads: whole hours from the hour cache, edges from rows; a commit into a
    /// cached hour is seen at once.
    #[test]
    fn popular_over_history_uses_hour_blocks_and_sees_later_commits() {
        use crate::engine::CountUpdates;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let commit = |seq: u64, rows: &[(i64, &str, u64)]| {
            let mut counts = CountUpdates::new(1);
            for &(m, ad, c) in rows {
                counts.push(Minute(m), &AdId::new(ad), &[c]);
            }
            let out = Output { counts, ..Output::default() };
            store.commit(seq, &BatchRecord::default(), &out, None).unwrap();
        };
        // Hours 0..3 (minutes 0..180): ad a once a minute, b twice every third minute.
        let mut rows = Vec::new();
        for m in 0..180 {
            rows.push((m, "a", 1));
            if m % 3 == 0 {
                rows.push((m, "b", 2));
            }
        }
        commit(0, &rows);
        let top =
            |from: i64, to: i64| store.popular(Slot::Total, Minute(from), Minute(to), 5).unwrap().0;
        let naive = |from: i64, to: i64, rows: &[(i64, &str, u64)]| {
            // Counts are absolute: the last write of a (minute, ad) wins.
            let cells: BTreeMap<(i64, &str), u64> =
                rows.iter().map(|&(m, a, c)| ((m, a), c)).collect();
            let mut sums: BTreeMap<String, u64> = BTreeMap::new();
            for (&(m, ad), &c) in &cells {
                if (from..to).contains(&m) {
                    *sums.entry(ad.to_string()).or_default() += c;
                }
            }
            let mut v: Vec<(AdId, u64)> =
                sums.into_iter().map(|(a, c)| (AdId::new(&a), c)).collect();
            v.sort_by(crate::rank::order);
            v
        };
        for (from, to) in [(0, 180), (0, 60), (30, 150), (59, 121), (60, 61)] {
            assert_eq!(top(from, to), naive(from, to, &rows), "[{from}, {to})");
            assert_eq!(top(from, to), naive(from, to, &rows), "[{from}, {to}) cached");
        }
        assert!(store.hours.lock().unwrap().blocks.len() >= 3, "whole hours are cached");
        // A later commit into hour 1 (a correction, or a recalculation) is seen.
        let late = [(70, "c", 500), (71, "a", 7)];
        commit(1, &late);
        rows.extend(late);
        for (from, to) in [(0, 180), (60, 120)] {
            assert_eq!(top(from, to), naive(from, to, &rows), "[{from}, {to}) after a commit");
        }
        assert_eq!(top(60, 120)[0], (AdId::new("c"), 500));
    }

    #[test]
    fn changed_settings_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let kv = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let first = kv(&[("partitions", "4"), ("watermark_delay", "15s"), ("filters.us", "a")]);
        store.check_settings(&first).unwrap();
        store.check_settings(&first).unwrap();
        let changed = kv(&[("partitions", "8"), ("watermark_delay", "15s"), ("filters.eu", "b")]);
        let err = store.check_settings(&changed).unwrap_err().to_string();
        assert!(
            err.contains("partitions: the data was aggregated with 4, the config has 8"),
            "{err}"
        );
        assert!(err.contains("filters.us: the data was aggregated with a, the config has (none)"));
        assert!(err.contains("filters.eu: the data was aggregated with (none), the config has b"));
        assert!(!err.contains("watermark_delay"), "{err}");
        drop(store);
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        assert!(store.check_settings(&changed).is_err(), "recorded durably");
    }

    #[test]
    fn batch_records_round_trip() {
        let b = BatchRecord {
            wall: -5,
            ranges: vec![
                (PartitionId(3), Offset(10), Offset(20)),
                (PartitionId(0), Offset(0), Offset(1)),
            ],
            assign: vec![PartitionId(0), PartitionId(7)],
        };
        assert_eq!(BatchRecord::decode(&b.encode()), Some(b));
        assert_eq!(BatchRecord::decode(&[1, 2, 3]), None);
    }
}
