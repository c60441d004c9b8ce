//! The aggregate store, embedded: results, source offsets and the replay journal in one redb
//! database (`<data_dir>/store.redb`), engine checkpoints in files beside it.
//!
//! # Key layout
//!
//! ```text
//! counts   (minute, ad_id)  → u64 LE per slot (total, then each filter)   absolute values
//! tops     (minute, slot)   → [len u, (ad str, count u)*]                 top-N of final minutes
//! offsets  partition        → next offset: every record below is reflected in counts and tops
//! journal  seq              → wall i64, [(partition, from, to)]            batches since the checkpoint
//! meta     "watermark" i64 · "counters" · "filters" (ids)
//!          · "checkpoint_seq" u64 (the last batch the checkpoint includes)
//!
//! checkpoints/<seq>.snap   the engine snapshot after batch <seq>, beside the database
//! ```
//!
//! Snapshots live in files, not in the database: they are large (tens of bytes per identity
//! held for deduplication) and rewritten whole, which would bloat a copy-on-write B-tree with
//! stale pages. A checkpoint file is written to a temporary name, fsynced, renamed and its
//! directory fsynced *before* the transaction that names it commits; older files are removed
//! only after. A crash in between leaves an orphan file, never a dangling reference.
//!
//! # Commit protocol (exactly once)
//!
//! Each engine batch is committed in **one** write transaction with `Durability::Immediate`:
//! its absolute counts, its top-N lists, the offsets it advanced to, the watermark, and a journal
//! entry saying which records (and which wall-clock time) made it. Every few seconds the same
//! transaction records a freshly written checkpoint file and drops the journal entries it covers. So the
//! cost of a commit follows the batch, not the state.
//!
//! Recovery restores the snapshot and replays the journal's batches from the log with their
//! recorded wall times: the engine makes the same decisions again and ends exactly at the
//! committed offsets. Absolute counts make a replayed write harmless. A crash before a commit
//! loses nothing: the records are in the log and the offsets were not advanced.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::engine::snapshot::{Decoder, Encoder};
use crate::engine::{Counters, Offset, Output, PartitionId, Slot};
use crate::event::{AdId, Minute};
use crate::rank::Ranked;

/// Keyed minute first: a commit's rows land together at the right edge of the tree, and a restart
/// rebuilds the popular-ads index from a range scan of the recent minutes, not all history.
const COUNTS: TableDefinition<(i64, &str), &[u8]> = TableDefinition::new("counts");
const TOPS: TableDefinition<(i64, u32), &[u8]> = TableDefinition::new("tops");
const OFFSETS: TableDefinition<u32, u64> = TableDefinition::new("offsets");
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// A store failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("store: {what}: {source}")]
pub struct StoreError {
    what: &'static str,
    #[source]
    source: redb::Error,
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
}

impl BatchRecord {
    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.i(self.wall);
        e.u(self.ranges.len() as u64);
        for (p, a, b) in &self.ranges {
            e.u(p.0 as u64);
            e.u(a.0);
            e.u(b.0);
        }
        e.buf
    }
    fn decode(bytes: &[u8]) -> Option<BatchRecord> {
        let mut d = Decoder::raw(bytes);
        let wall = d.i().ok()?;
        let n = d.count().ok()?;
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            ranges.push((
                PartitionId(u32::try_from(d.u().ok()?).ok()?),
                Offset(d.u().ok()?),
                Offset(d.u().ok()?),
            ));
        }
        d.finish().ok()?;
        Some(BatchRecord { wall, ranges })
    }
}

/// What a restart needs.
#[derive(Debug, Default)]
pub struct Recovery {
    pub checkpoint: Option<Vec<u8>>,
    /// Batches after the checkpoint, in order.
    pub journal: Vec<(u64, BatchRecord)>,
    pub next_seq: u64,
    pub offsets: Vec<(PartitionId, Offset)>,
    pub filters: Option<Vec<String>>,
}

pub struct Store {
    db: Database,
    /// Where checkpoint files live: `checkpoints/` beside the database file.
    checkpoints: PathBuf,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let checkpoints = path.parent().unwrap_or(Path::new(".")).join("checkpoints");
        std::fs::create_dir_all(&checkpoints).map_err(|e| StoreError {
            what: "creating the checkpoints directory",
            source: redb::Error::Io(e),
        })?;
        let db = Database::create(path).ctx("open")?;
        let txn = db.begin_write().ctx("begin")?;
        {
            txn.open_table(COUNTS).ctx("create counts")?;
            txn.open_table(TOPS).ctx("create tops")?;
            txn.open_table(OFFSETS).ctx("create offsets")?;
            txn.open_table(JOURNAL).ctx("create journal")?;
            txn.open_table(META).ctx("create meta")?;
        }
        txn.commit().ctx("commit")?;
        Ok(Store { db, checkpoints })
    }

    /// Commits one batch's results atomically (see the module doc). With `checkpoint`, also
    /// stores the engine snapshot taken after this batch and drops the journal it covers.
    pub fn commit(
        &self,
        seq: u64,
        batch: &BatchRecord,
        output: &Output,
        filters: &[String],
        checkpoint: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().ctx("begin commit")?;
        {
            let mut counts = txn.open_table(COUNTS).ctx("open counts")?;
            let mut row = Vec::new();
            for (minute, ad, c) in output.counts.iter() {
                row.clear();
                for v in c {
                    row.extend_from_slice(&v.to_le_bytes());
                }
                counts.insert((minute.0, ad.as_str()), row.as_slice()).ctx("write count")?;
            }
            let mut tops = txn.open_table(TOPS).ctx("open tops")?;
            for t in &output.top {
                let mut e = Encoder::default();
                e.u(t.ads.len() as u64);
                for (ad, c) in &t.ads {
                    e.bytes(ad.as_str().as_bytes());
                    e.u(*c);
                }
                tops.insert((t.minute.0, t.slot.index() as u32), e.buf.as_slice())
                    .ctx("write top")?;
            }
            let mut offsets = txn.open_table(OFFSETS).ctx("open offsets")?;
            for (p, o) in &output.offsets {
                offsets.insert(p.0, o.0).ctx("write offset")?;
            }
            crate::fault::point("store.mid_commit");
            let mut journal = txn.open_table(JOURNAL).ctx("open journal")?;
            let mut meta = txn.open_table(META).ctx("open meta")?;
            meta.insert("watermark", output.watermark.to_le_bytes().as_slice())
                .ctx("write watermark")?;
            let mut e = Encoder::default();
            output.counters.encode(&mut e);
            meta.insert("counters", e.buf.as_slice()).ctx("write counters")?;
            let mut e = Encoder::default();
            e.u(filters.len() as u64);
            for f in filters {
                e.bytes(f.as_bytes());
            }
            meta.insert("filters", e.buf.as_slice()).ctx("write filters")?;
            match checkpoint {
                Some(snapshot) => {
                    self.write_checkpoint(seq, snapshot)?;
                    meta.insert("checkpoint_seq", seq.to_le_bytes().as_slice())
                        .ctx("write checkpoint seq")?;
                    journal.retain(|k, _| k > seq).ctx("trim journal")?;
                }
                None => {
                    journal
                        .insert(seq, BatchRecord::encode(batch).as_slice())
                        .ctx("write journal")?;
                }
            }
        }
        txn.commit().ctx("commit")?;
        if checkpoint.is_some() {
            self.remove_checkpoints_except(seq);
        }
        Ok(())
    }

    fn checkpoint_path(&self, seq: u64) -> PathBuf {
        self.checkpoints.join(format!("{seq:020}.snap"))
    }

    /// Writes a checkpoint file durably (temporary name, fsync, rename, directory fsync).
    fn write_checkpoint(&self, seq: u64, snapshot: &[u8]) -> Result<(), StoreError> {
        let io = |what| move |e: std::io::Error| StoreError { what, source: redb::Error::Io(e) };
        let path = self.checkpoint_path(seq);
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io("create checkpoint file"))?;
        f.write_all(snapshot).map_err(io("write checkpoint file"))?;
        f.sync_all().map_err(io("sync checkpoint file"))?;
        std::fs::rename(&tmp, &path).map_err(io("rename checkpoint file"))?;
        File::open(&self.checkpoints)
            .and_then(|d| d.sync_all())
            .map_err(io("sync checkpoint directory"))
    }

    fn remove_checkpoints_except(&self, keep: u64) {
        let Ok(entries) = std::fs::read_dir(&self.checkpoints) else { return };
        for e in entries.flatten() {
            if e.path() != self.checkpoint_path(keep) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!(path = %e.path().display(), "removing an old checkpoint: {err}");
                }
            }
        }
    }

    pub fn recovery(&self) -> Result<Recovery, StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let meta = txn.open_table(META).ctx("open meta")?;
        let checkpoint_seq =
            meta.get("checkpoint_seq").ctx("read checkpoint seq")?.map(|v| le_u64(v.value()));
        let checkpoint = match checkpoint_seq {
            None => None,
            Some(seq) => {
                Some(std::fs::read(self.checkpoint_path(seq)).map_err(|e| StoreError {
                    what: "reading the committed checkpoint file",
                    source: redb::Error::Io(e),
                })?)
            }
        };
        let filters = meta.get("filters").ctx("read filters")?.and_then(|v| {
            let mut d = Decoder::raw(v.value());
            (0..d.count().ok()?).map(|_| d.str().ok().map(str::to_owned)).collect()
        });
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
            journal.last().map(|(s, _)| s + 1).or(checkpoint_seq.map(|s| s + 1)).unwrap_or(0);
        let offsets = self.offsets()?;
        Ok(Recovery { checkpoint, journal, next_seq, offsets, filters })
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

    /// The committed watermark (`i64::MIN` before any).
    pub fn watermark(&self) -> Result<i64, StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let meta = txn.open_table(META).ctx("open meta")?;
        Ok(meta
            .get("watermark")
            .ctx("read watermark")?
            .map_or(i64::MIN, |v| le_u64(v.value()) as i64))
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

    /// Per-minute counts of one ad and slot over `[from, to)`, only minutes with clicks: one
    /// point lookup per minute, within the minutes the store holds at all.
    pub fn series(
        &self,
        ad: &str,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<Vec<(Minute, u64)>, StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let t = txn.open_table(COUNTS).ctx("open counts")?;
        let (Some(first), Some(last)) =
            (t.first().ctx("read counts")?, t.last().ctx("read counts")?)
        else {
            return Ok(Vec::new());
        };
        let (first, last) = (first.0.value().0, last.0.value().0);
        let mut out = Vec::new();
        for minute in from.0.max(first)..to.0.min(last + 1) {
            if let Some(v) = t.get((minute, ad)).ctx("read count")? {
                let c = slot_value(v.value(), slot);
                if c > 0 {
                    out.push((Minute(minute), c));
                }
            }
        }
        Ok(out)
    }

    /// Every stored count at or after `since`, for rebuilding in-memory indexes at start: a
    /// range scan of those minutes only, bounded by the window, not by history.
    pub fn scan_counts(
        &self,
        since: Minute,
        mut f: impl FnMut(Minute, &str, &[u64]),
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let t = txn.open_table(COUNTS).ctx("open counts")?;
        let mut row = Vec::new();
        for item in t.range((since.0, "")..).ctx("scan counts")? {
            let (k, v) = item.ctx("read count")?;
            let (minute, ad) = k.value();
            row.clear();
            row.extend(v.value().chunks_exact(8).map(le_u64));
            f(Minute(minute), ad, &row);
        }
        Ok(())
    }

    /// The stored top-N of a minute and slot.
    pub fn top(&self, minute: Minute, slot: Slot) -> Result<Option<Vec<Ranked>>, StoreError> {
        let txn = self.db.begin_read().ctx("begin read")?;
        let t = txn.open_table(TOPS).ctx("open tops")?;
        Ok(t.get((minute.0, slot.index() as u32)).ctx("read top")?.and_then(|v| {
            let mut d = Decoder::raw(v.value());
            (0..d.count().ok()?).map(|_| Some((AdId::new(d.str().ok()?), d.u().ok()?))).collect()
        }))
    }
}

fn slot_value(row: &[u8], slot: Slot) -> u64 {
    row.get(slot.index() * 8..slot.index() * 8 + 8).map_or(0, le_u64)
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let batch = BatchRecord { wall: 0, ranges: vec![(PartitionId(0), Offset(0), Offset(6))] };
        store.commit(0, &batch, &out, &[], None).unwrap();

        assert_eq!(
            store.series("ad-0", Slot::Total, Minute(0), Minute(10)).unwrap(),
            vec![(Minute(1), 3)]
        );
        assert_eq!(store.series("ad-1", Slot::Total, Minute(2), Minute(10)).unwrap(), vec![]);
        assert_eq!(
            store.top(Minute(1), Slot::Total).unwrap(),
            Some(vec![(AdId::new("ad-0"), 3), (AdId::new("ad-1"), 2)])
        );
        assert_eq!(store.offsets().unwrap(), vec![(PartitionId(0), Offset(6))]);
        assert_eq!(store.watermark().unwrap(), 185_000);
        assert_eq!(store.counters().unwrap().counted, 6);
        let mut seen = Vec::new();
        store
            .scan_counts(Minute(2), |m, ad, c| seen.push((m, ad.to_string(), c.to_vec())))
            .unwrap();
        assert_eq!(seen, vec![(Minute(3), "x".to_string(), vec![1])]);
        let rec = store.recovery().unwrap();
        assert_eq!((rec.journal.len(), rec.next_seq, rec.checkpoint.is_some()), (1, 1, false));

        let snapshot = engine.snapshot();
        store
            .commit(
                1,
                &BatchRecord::default(),
                &engine.process(EventTime(0), &[]),
                &[],
                Some(&snapshot),
            )
            .unwrap();
        let rec = store.recovery().unwrap();
        assert_eq!((rec.journal.len(), rec.next_seq), (0, 2), "the checkpoint covers the journal");
        assert_eq!(rec.checkpoint.as_deref(), Some(snapshot.as_slice()));
        // A later checkpoint replaces the file; an orphan from a crash before commit goes too.
        std::fs::write(dir.path().join("checkpoints").join(format!("{:020}.snap", 9)), b"orphan")
            .unwrap();
        store
            .commit(
                2,
                &BatchRecord::default(),
                &engine.process(EventTime(0), &[]),
                &[],
                Some(&snapshot),
            )
            .unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path().join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(files, vec![std::ffi::OsString::from(format!("{:020}.snap", 2))]);
        assert_eq!(store.recovery().unwrap().checkpoint.as_deref(), Some(snapshot.as_slice()));
    }

    #[test]
    fn batch_records_round_trip() {
        let b = BatchRecord {
            wall: -5,
            ranges: vec![
                (PartitionId(3), Offset(10), Offset(20)),
                (PartitionId(0), Offset(0), Offset(1)),
            ],
        };
        assert_eq!(BatchRecord::decode(&b.encode()), Some(b));
        assert_eq!(BatchRecord::decode(&[1, 2, 3]), None);
    }
}
