//! Recalculation's side of the store: every row of a range in one read, and the atomic
//! replacement of a range's counts and top-N lists.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::engine::{Offset, PartitionId, Watermark};
use crate::event::{AdId, EventTime, Minute};

use super::codec::encode_top;
use super::{day_of, encode_counts, le_u64, Context as _, Store, StoreError};
use super::{AD_DAYS, COUNTS, HOUR_VERSIONS, META, OFFSETS, RECOUNTED, TOO_LATE, TOPS};

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

/// Refuses a range that reaches minutes the live path can still write (before `to`), given the
/// committed `watermark` (which only grows).
pub fn sealed(watermark: Watermark, to: Minute, lateness_ms: i64) -> Result<(), ReplaceError> {
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
        let txn = self.begin_write()?;
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
            // The range's too-late clicks are counted now: remembered as such, for `explain`.
            let mut late = txn.open_table(TOO_LATE).ctx("open too_late")?;
            let mut recounted = txn.open_table(RECOUNTED).ctx("open recounted")?;
            for item in late.range((from.0, "")..(to.0, "")).ctx("scan too late")? {
                let (k, v) = item.ctx("read too late")?;
                let (minute, ad) = k.value();
                let mut sum: Vec<u64> = v.value().chunks_exact(8).map(le_u64).collect();
                if let Some(old) = recounted.get((minute, ad)).ctx("read recounted")? {
                    sum.iter_mut()
                        .zip(old.value().chunks_exact(8))
                        .for_each(|(a, b)| *a += le_u64(b));
                }
                let mut row = Vec::new();
                encode_counts(&mut row, &sum);
                recounted.insert((minute, ad), row.as_slice()).ctx("write recounted")?;
            }
            late.retain_in((from.0, "")..(to.0, ""), |_, _| false).ctx("clear too late")?;
            crate::fault::point("store.mid_replace");
        }
        txn.commit().ctx("commit recalculation")?;
        Ok(replaced)
    }

    /// What `explain` compares the archive with, for `ad`: the stored counts of `minute` per
    /// slot, and per minute of `[from, to)` (the minute and its dedup horizons) the clicks found
    /// too late and not counted, and those a recalculation has counted since (totals).
    pub fn ad_minute(
        &self,
        ad: &str,
        minute: Minute,
        (from, to): (Minute, Minute),
        slots: usize,
    ) -> Result<AdMinute, StoreError> {
        let mut out = AdMinute { counts: vec![0; slots], too_late: Default::default() };
        for (slot, count) in out.counts.iter_mut().enumerate() {
            let slot = crate::engine::Slot::from_index(slot);
            *count =
                self.series(ad, slot, minute, Minute(minute.0 + 1))?.0.first().map_or(0, |p| p.1);
        }
        let txn = self.db()?.begin_read().ctx("begin read")?;
        let late = txn.open_table(TOO_LATE).ctx("open too_late")?;
        let recounted = txn.open_table(RECOUNTED).ctx("open recounted")?;
        let total = |v: Option<redb::AccessGuard<'_, &[u8]>>| {
            v.map_or(0, |v| v.value().get(..8).map_or(0, le_u64))
        };
        for m in from.0..to.0 {
            let pending = total(late.get((m, ad)).ctx("read too late")?);
            let counted = total(recounted.get((m, ad)).ctx("read recounted")?);
            if pending + counted > 0 {
                out.too_late.insert(m, (pending, counted));
            }
        }
        Ok(out)
    }
}

/// What the store holds for one ad around one minute (see [`Store::ad_minute`]).
#[derive(Debug, Default, Clone)]
pub struct AdMinute {
    /// The minute's counts per slot (the total, then each filter).
    pub counts: Vec<u64>,
    /// minute → (too late and not counted, too late and counted by a recalculation since), all
    /// clicks of the ad (the total slot).
    pub too_late: std::collections::BTreeMap<i64, (u64, u64)>,
}
