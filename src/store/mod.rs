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
//!
//! Files: `codec` (encodings of journal batches, ranges, top-N lists and manifests),
//! `checkpoint` (checkpoint files and recovery), `read` (queries and the hour cache), `replace`
//! (recalculation's reads and atomic replacement), `ledger` (the archiver's offsets) and
//! `settings` (the settings recorded with the data).

mod checkpoint;
mod codec;
mod ledger;
mod read;
mod replace;
mod settings;
#[cfg(test)]
mod tests;

pub use checkpoint::{CheckpointBytes, CheckpointError, Recovery};
pub use codec::{BatchRecord, CheckpointFile, CheckpointRecord};
pub use ledger::ArchiveState;
pub use replace::{sealed, AdMinute, CountRows, RangeRows, ReplaceError, Replaced};
pub use settings::SettingsError;

use codec::{encode_manifest, encode_top};
use read::HourCache;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::engine::snapshot::Encoder;
use crate::engine::{Output, Slot, Watermark};
use crate::event::{AdId, Minute};
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
/// (minute, ad) → u64 LE per slot: too-late clicks a recalculation has counted since (moved
/// from `too_late`), so that `explain` can say so.
const RECOUNTED: TableDefinition<(i64, &str), &[u8]> = TableDefinition::new("recounted");
/// partition → the next offset the archiver has archived.
const ARCHIVE_OFFSETS: TableDefinition<u32, u64> = TableDefinition::new("archive_offsets");

/// A store failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("store: {what}: {source}")]
    Db {
        what: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error("store: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// Something the store wrote does not read back (damage, or a bug).
    #[error("store: {what} is corrupt ({detail})")]
    Corrupt { what: &'static str, detail: String },
    /// The database is closed after a failed write and could not be opened again yet.
    #[error("store: closed after a failed write; it is opened again once that succeeds")]
    Closed,
}

impl StoreError {
    /// Another process holds the database open (a running server).
    pub fn is_locked(&self) -> bool {
        matches!(self, StoreError::Db { source: redb::Error::DatabaseAlreadyOpen, .. })
    }

    /// A failure of the disk under the store (full, failing, or an earlier such failure the
    /// database remembers): the store is consistent, and [`Store::reopen`] and a retry may
    /// succeed once the disk does.
    pub fn is_io(&self) -> bool {
        matches!(
            self,
            StoreError::Db { source: redb::Error::Io(_) | redb::Error::PreviousIo, .. }
                | StoreError::Closed
        )
    }
}

trait Context<T> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Context<T> for Result<T, E> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Db { what, source: e.into() })
    }
}

pub struct Store {
    /// `None` while closed after a failed write (see [`Store::reopen`]).
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
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

fn open_db(path: &Path) -> Result<Database, StoreError> {
    redb::Builder::new().set_cache_size(STORE_CACHE_BYTES).create(path).ctx("open")
}

/// A read transaction, its watermark, the first minute read from memory, and those minutes.
type View<'a> = (redb::ReadTransaction, Watermark, i64, Option<RwLockReadGuard<'a, Open>>);

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
        std::fs::create_dir_all(&checkpoints).map_err(|source| CheckpointError {
            what: "creating the directory",
            path: checkpoints.clone(),
            source,
        })?;
        let db = open_db(path)?;
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
            txn.open_table(RECOUNTED).ctx("create recounted")?;
            txn.open_table(ARCHIVE_OFFSETS).ctx("create archive_offsets")?;
        }
        txn.commit().ctx("commit")?;
        let store = Store {
            db: RwLock::new(Some(Arc::new(db))),
            path: path.to_path_buf(),
            checkpoints,
            ad_days_written: Mutex::default(),
            hours: Mutex::default(),
            open: RwLock::default(),
        };
        store.build_ad_days()?;
        Ok(store)
    }

    /// The database, unless it is closed after a failed write.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db.read().expect("not poisoned").clone().ok_or(StoreError::Closed)
    }

    /// A write transaction. After a failed write redb refuses every transaction until the
    /// database is opened again, so this reopens it first (see [`Store::reopen`]).
    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let db = self.db.read().expect("not poisoned").clone();
        let failed = match db {
            Some(db) => match db.begin_write() {
                Ok(txn) => return Ok(txn),
                Err(e) => {
                    let e = StoreError::Db { what: "begin", source: e.into() };
                    if !e.is_io() {
                        return Err(e);
                    }
                    e
                }
            },
            None => StoreError::Closed,
        };
        tracing::debug!("{failed}; reopening the store");
        self.reopen()?;
        self.db()?.begin_write().ctx("begin")
    }

    /// Closes the database and opens it again, after a write failed (redb then refuses every
    /// transaction until it is reopened; opening repairs what the failed commit left). What is
    /// committed is unchanged, and the rows of open minutes kept in memory stay at the last
    /// commit. Fails, leaving the store closed (reads answer [`StoreError::Closed`]), while the
    /// disk still refuses.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().expect("not poisoned");
        if let Some(old) = db.take() {
            // Reads under way hold the database open; it cannot be opened twice.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            drop(old);
        }
        *db = Some(Arc::new(open_db(&self.path)?));
        Ok(())
    }

    /// Fills `ad_days` from `counts` once, for a store written before the index existed.
    fn build_ad_days(&self) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
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
        let txn = self.begin_write()?;
        // A commit retried after a failed one may find that one landed after all (the disk
        // failed after it was written): it is not applied twice (too-late counts add up).
        let landed = {
            let meta = txn.open_table(META).ctx("open meta")?;
            let committed = meta.get("commit_seq").ctx("read commit seq")?;
            committed.is_some_and(|v| le_u64(v.value()) >= seq)
        };
        let mut new_days = Vec::new();
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
        if landed {
            txn.abort().ctx("abort")?;
        } else {
            new_days = self.write_rows(&txn, rows)?;
            self.write_batch(&txn, seq, batch, output, checkpoint, tops)?;
            txn.commit().ctx("commit")?;
        }
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

    /// Writes a batch's top-N lists, too-late counts, offsets, watermark, counters, journal
    /// entry and checkpoint record into the commit's transaction.
    fn write_batch(
        &self,
        txn: &redb::WriteTransaction,
        seq: u64,
        batch: &BatchRecord,
        output: &Output,
        checkpoint: Option<&CheckpointRecord>,
        tops: Vec<(i64, u32, &[Ranked])>,
    ) -> Result<(), StoreError> {
        write_tops(txn, tops)?;
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
            let previous =
                meta.get("checkpoint_seq").ctx("read checkpoint seq")?.map(|v| le_u64(v.value()));
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
                        Some(files) => meta.insert("previous_checkpoint_files", files.as_slice()),
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

    /// Hands the store the rows and top-N lists of the minutes that can still change, as of the
    /// last commit (the aggregator after recovery, from [`crate::engine::Engine::unsealed`]):
    /// from now on it keeps them in memory (see [`Open`]).
    pub fn load_open(
        &self,
        rows: &crate::engine::CountUpdates,
        tops: &[crate::engine::TopUpdate],
        lateness_ms: i64,
    ) -> Result<(), StoreError> {
        let txn = self.db()?.begin_read().ctx("begin read")?;
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
        let txn = self.begin_write()?;
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
            let txn = self.db()?.begin_read().ctx("begin read")?;
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
