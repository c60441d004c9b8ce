//! Queries over committed results: an ad's series, popular ads and per-minute totals over
//! history (with the cache of summed hours), and the scans that rebuild in-memory indexes.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable};

use super::{day_of, le_u64, read_watermark, slot_value, Context as _, Store, StoreError};
use super::{AD_DAYS, COUNTS, DAY_MINUTES, HOUR_VERSIONS, META, OFFSETS, TOPS};
use crate::engine::snapshot::Decoder;
use crate::engine::{Counters, Offset, PartitionId, Slot, Watermark};
use crate::event::{AdId, Minute};
use crate::rank::Ranked;

/// One hour's summed counts of one slot: every ad with a count, unordered.
type Block = Arc<Vec<(AdId, u64)>>;

/// Most (ad, count) entries the hour cache holds across its blocks (about 32 bytes each).
const HOUR_CACHE_ENTRIES: usize = 4 << 20;

/// Per (slot, hour): every ad's count summed over the hour, with the hour's version (see
/// `HOUR_VERSIONS`) it was summed at. A query uses a block only when the version it reads in its
/// own transaction matches, so a cached block always equals the committed counts it stands for.
/// Oldest blocks are dropped first.
#[derive(Default)]
pub(super) struct HourCache {
    pub(super) blocks: std::collections::HashMap<(usize, i64), (u64, Block)>,
    order: std::collections::VecDeque<(usize, i64)>,
    entries: usize,
}

impl HourCache {
    pub(super) fn get(&self, key: (usize, i64), version: u64) -> Option<Block> {
        self.blocks.get(&key).filter(|(v, _)| *v == version).map(|(_, b)| b.clone())
    }

    pub(super) fn insert(&mut self, key: (usize, i64), version: u64, block: Block) {
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

impl Store {
    pub fn offsets(&self) -> Result<Vec<(PartitionId, Offset)>, StoreError> {
        let txn = self.db()?.begin_read().ctx("begin read")?;
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
        let txn = self.db()?.begin_read().ctx("begin read")?;
        read_watermark(&txn)
    }

    pub fn counters(&self) -> Result<Counters, StoreError> {
        let txn = self.db()?.begin_read().ctx("begin read")?;
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
