//! Exact popular ads over a window of M minutes (SPEC §2 `popular_ads`, 1 ≤ M ≤ 1440), computed
//! from per-minute counts of one slot (the total or one filter).
//!
//! Ads are interned to dense `u32` ids. A minute holds `id → count`. A query sums the columns of
//! the window into a dense array and selects the top `k` in two phases: an integer selection finds
//! the k-th largest count, then only the ads tied at that count are ordered by `ad_id` bytes
//! (SPEC's tie-break), so string comparisons stay few even with long tails of equal counts.
//!
//! Minutes below the *sealed* bound (the engine evicted them: no correction can reach them) are
//! also summed, lazily and once, into aligned blocks of 10 and 60 minutes. A window is cut into
//! the largest sealed blocks that fit plus single minutes at its edges, so M = 60 reads at most
//! 5 ten-minute blocks and 18 minutes (or one hour block), and M = 1440 about 23 hour blocks.
//! Replacing a sealed minute (recalculation) drops the blocks that contain it.
//!
//! Memory is bounded by the minutes held: an ad id no minute refers to any more is dead, and
//! once dead ids outnumber live ones the interner is rebuilt (ids renumbered, blocks dropped).
//!
//! The structure does no I/O; the service fills it from engine output and its store.

mod live;

pub use live::{LiveIndex, LiveState, Published};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::event::{AdId, Minute};
use crate::rank::Ranked;

/// The longest window a query may ask for, in minutes.
pub const MAX_WINDOW_MINUTES: u32 = 1440;

/// Block sizes in minutes, largest first.
const LEVELS: [i64; 2] = [60, 10];

/// A summed column: (ad id, count), sorted by ad id.
type Column = Arc<Vec<(u32, u64)>>;

/// One minute's counts: a hash map while the minute can change; once sealed, a sorted array of
/// (id, count) at 8 bytes a row instead of about 27, since the index holds two hours of minutes
/// (a minute with a count that does not fit 32 bits stays a map).
enum MinuteCounts {
    Open(HashMap<u32, u64>),
    Packed(Box<[(u32, u32)]>),
}

impl MinuteCounts {
    fn open(&mut self) -> &mut HashMap<u32, u64> {
        if let MinuteCounts::Packed(rows) = self {
            *self = MinuteCounts::Open(rows.iter().map(|&(id, c)| (id, u64::from(c))).collect());
        }
        match self {
            MinuteCounts::Open(map) => map,
            MinuteCounts::Packed(_) => unreachable!("opened above"),
        }
    }

    fn pack(&mut self) {
        let MinuteCounts::Open(map) = self else { return };
        let Some(mut rows) = map
            .iter()
            .map(|(&id, &c)| u32::try_from(c).ok().map(|c| (id, c)))
            .collect::<Option<Vec<_>>>()
        else {
            return;
        };
        rows.sort_unstable();
        *self = MinuteCounts::Packed(rows.into_boxed_slice());
    }

    fn get(&self, id: u32) -> Option<u64> {
        match self {
            MinuteCounts::Open(map) => map.get(&id).copied(),
            MinuteCounts::Packed(rows) => {
                rows.binary_search_by_key(&id, |r| r.0).ok().map(|i| u64::from(rows[i].1))
            }
        }
    }

    fn for_each(&self, mut f: impl FnMut(u32, u64)) {
        match self {
            MinuteCounts::Open(map) => map.iter().for_each(|(&id, &c)| f(id, c)),
            MinuteCounts::Packed(rows) => rows.iter().for_each(|&(id, c)| f(id, u64::from(c))),
        }
    }

    fn remap(&mut self, remap: &[u32]) {
        match self {
            MinuteCounts::Open(map) => {
                *map = map.drain().map(|(id, c)| (remap[id as usize], c)).collect();
            }
            MinuteCounts::Packed(rows) => {
                rows.iter_mut().for_each(|r| r.0 = remap[r.0 as usize]);
                rows.sort_unstable();
            }
        }
    }
}

#[derive(Default)]
pub struct Popular {
    ids: HashMap<AdId, u32>,
    ads: Vec<AdId>,
    /// Per id, how many minutes hold it; `dead` ids have none.
    refs: Vec<u32>,
    dead: usize,
    minutes: BTreeMap<i64, MinuteCounts>,
    /// Per level, block start minute → summed column. Only over sealed minutes.
    blocks: [HashMap<i64, Column>; LEVELS.len()],
    /// Minutes below this no longer change through the live path.
    sealed_below: i64,
    /// Per minute, the sum over every ad (totals for charts), kept as counts are set.
    totals: BTreeMap<i64, u64>,
}

impl Popular {
    pub fn new() -> Popular {
        Popular { sealed_below: i64::MIN, ..Popular::default() }
    }

    /// Sets the absolute count of `ad` in `minute` (0 removes it).
    pub fn set(&mut self, minute: Minute, ad: &AdId, count: u64) {
        let id = match self.ids.get(ad) {
            Some(&id) => id,
            None => {
                let id = u32::try_from(self.ads.len()).expect("fewer than 2^32 distinct ads");
                self.ids.insert(ad.clone(), id);
                self.ads.push(ad.clone());
                self.refs.push(0);
                self.dead += 1;
                id
            }
        };
        let column = self
            .minutes
            .entry(minute.0)
            .or_insert_with(|| MinuteCounts::Open(HashMap::new()))
            .open();
        let had = if count == 0 { column.remove(&id) } else { column.insert(id, count) };
        let total = self.totals.entry(minute.0).or_default();
        *total = *total - had.unwrap_or(0) + count;
        match (had.is_some(), count > 0) {
            (false, true) => {
                self.refs[id as usize] += 1;
                if self.refs[id as usize] == 1 {
                    self.dead -= 1;
                }
            }
            (true, false) => self.unref(id),
            _ => {}
        }
        if minute.0 < self.sealed_below {
            for (level, size) in LEVELS.iter().enumerate() {
                self.blocks[level].remove(&minute.0.div_euclid(*size).saturating_mul(*size));
            }
        }
    }

    /// Declares that minutes before `minute` will not change any more (except by [`Self::set`]
    /// on purpose, which then invalidates their blocks).
    pub fn seal_below(&mut self, minute: Minute) {
        self.sealed_below = self.sealed_below.max(minute.0);
        for (_, column) in self.minutes.range_mut(..self.sealed_below) {
            column.pack();
        }
    }

    fn unref(&mut self, id: u32) {
        self.refs[id as usize] -= 1;
        if self.refs[id as usize] == 0 {
            self.dead += 1;
        }
    }

    /// Forgets every minute before `minute` (retention), and the ads no minute holds any more.
    pub fn evict_before(&mut self, minute: Minute) {
        let kept = self.minutes.split_off(&minute.0);
        let evicted = std::mem::replace(&mut self.minutes, kept);
        self.totals = self.totals.split_off(&minute.0);
        for column in evicted.into_values() {
            column.for_each(|id, _| self.unref(id));
        }
        for (level, size) in LEVELS.iter().enumerate() {
            self.blocks[level].retain(|start, _| start + size > minute.0);
        }
        if self.dead > self.ads.len() / 2 + 1024 {
            self.compact();
        }
    }

    /// Renumbers the live ads densely and drops the dead ones (and the blocks, rebuilt lazily).
    fn compact(&mut self) {
        let mut remap = vec![u32::MAX; self.ads.len()];
        let mut ads = Vec::with_capacity(self.ads.len() - self.dead);
        let mut refs = Vec::with_capacity(ads.capacity());
        for (old, ad) in self.ads.drain(..).enumerate() {
            if self.refs[old] > 0 {
                remap[old] = ads.len() as u32;
                refs.push(self.refs[old]);
                ads.push(ad);
            }
        }
        for column in self.minutes.values_mut() {
            column.remap(&remap);
        }
        self.ids = ads.iter().enumerate().map(|(i, a)| (a.clone(), i as u32)).collect();
        self.ads = ads;
        self.refs = refs;
        self.dead = 0;
        self.blocks = Default::default();
    }

    /// Ads interned (live and dead), for tests of the memory bound.
    pub fn interned(&self) -> usize {
        self.ads.len()
    }

    /// Per minute of `[from, to)` that has counts: the sum over every ad.
    pub fn totals(&self, from: Minute, to: Minute) -> Vec<(Minute, u64)> {
        self.totals
            .range(from.0..to.0)
            .filter(|(_, &n)| n > 0)
            .map(|(&m, &n)| (Minute(m), n))
            .collect()
    }

    /// The count of one ad over `[from, to)`.
    pub fn count(&self, ad: &AdId, from: Minute, to: Minute) -> u64 {
        let Some(id) = self.ids.get(ad) else { return 0 };
        self.minutes.range(from.0..to.0).filter_map(|(_, c)| c.get(*id)).sum()
    }

    /// The `k` most clicked ads over the `m` minutes `[to − m, to)`, count descending then
    /// `ad_id` ascending. Exact.
    pub fn top(&mut self, to: Minute, m: u32, k: usize) -> Vec<Ranked> {
        let from = to.0 - i64::from(m.min(MAX_WINDOW_MINUTES));
        let mut sums = vec![0u64; self.ads.len()];
        let mut touched: Vec<u32> = Vec::new();
        let mut add = |id: u32, c: u64, sums: &mut Vec<u64>| {
            let s = &mut sums[id as usize];
            if *s == 0 {
                touched.push(id);
            }
            *s += c;
        };
        let mut at = from;
        'window: while at < to.0 {
            for (level, &size) in LEVELS.iter().enumerate() {
                if at.rem_euclid(size) == 0 && at + size <= to.0 && at + size <= self.sealed_below {
                    for &(id, c) in self.block(level, at).iter() {
                        add(id, c, &mut sums);
                    }
                    at += size;
                    continue 'window;
                }
            }
            if let Some(column) = self.minutes.get(&at) {
                column.for_each(|id, c| add(id, c, &mut sums));
            }
            at += 1;
        }
        self.select(&sums, touched, k)
    }

    fn block(&mut self, level: usize, start: i64) -> Column {
        if let Some(c) = self.blocks[level].get(&start) {
            return c.clone();
        }
        let size = LEVELS[level];
        let mut sums: HashMap<u32, u64> = HashMap::new();
        match LEVELS.get(level + 1) {
            // Built from the next level's blocks where there is one.
            Some(&sub) => {
                for s in (start..start + size).step_by(sub as usize) {
                    for &(id, c) in self.block(level + 1, s).iter() {
                        *sums.entry(id).or_default() += c;
                    }
                }
            }
            None => {
                for (_, column) in self.minutes.range(start..start + size) {
                    column.for_each(|id, c| *sums.entry(id).or_default() += c);
                }
            }
        }
        let mut column: Vec<(u32, u64)> = sums.into_iter().collect();
        column.sort_unstable();
        let column = Arc::new(column);
        self.blocks[level].insert(start, column.clone());
        column
    }

    fn select(&self, sums: &[u64], mut ids: Vec<u32>, k: usize) -> Vec<Ranked> {
        if k == 0 || ids.is_empty() {
            return Vec::new();
        }
        let by_count_desc = |a: &u32, b: &u32| sums[*b as usize].cmp(&sums[*a as usize]);
        if ids.len() > k {
            // Phase 1: the k-th largest count, by integers only.
            ids.select_nth_unstable_by(k - 1, by_count_desc);
            let kth = sums[ids[k - 1] as usize];
            // Everything above kth is in; the ads tied at kth compete by ad_id.
            let mut above: Vec<u32> =
                ids.iter().copied().filter(|&i| sums[i as usize] > kth).collect();
            let mut tied: Vec<u32> =
                ids.iter().copied().filter(|&i| sums[i as usize] == kth).collect();
            let need = k - above.len();
            let by_ad = |a: &u32, b: &u32| {
                self.ads[*a as usize]
                    .as_str()
                    .as_bytes()
                    .cmp(self.ads[*b as usize].as_str().as_bytes())
            };
            if tied.len() > need {
                tied.select_nth_unstable_by(need - 1, by_ad);
                tied.truncate(need);
            }
            above.append(&mut tied);
            ids = above;
        }
        let mut out: Vec<Ranked> =
            ids.into_iter().map(|i| (self.ads[i as usize].clone(), sums[i as usize])).collect();
        out.sort_unstable_by(crate::rank::order);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(
        counts: &BTreeMap<(i64, String), u64>,
        to: i64,
        m: i64,
        k: usize,
    ) -> Vec<(String, u64)> {
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for ((minute, ad), c) in counts {
            if (to - m..to).contains(minute) {
                *sums.entry(ad.clone()).or_default() += c;
            }
        }
        let mut v: Vec<_> = sums.into_iter().filter(|(_, c)| *c > 0).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.as_bytes().cmp(b.0.as_bytes())));
        v.truncate(k);
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Any window, any k, with sealing and late overwrites of sealed minutes: equal to a
        /// plain sum and sort.
        #[test]
        fn equals_naive(
            sets in proptest::collection::vec((0..200i64, 0..30u8, 0..4u64), 1..400),
            late in proptest::collection::vec((0..200i64, 0..30u8, 0..4u64), 0..20),
            seal in 0..220i64,
            queries in proptest::collection::vec((0..230i64, 1..200i64, 0..12usize), 1..8),
        ) {
            let mut p = Popular::new();
            let mut model = BTreeMap::new();
            let mut apply = |p: &mut Popular, (m, ad, c): (i64, u8, u64)| {
                let ad = format!("ad{ad}");
                p.set(Minute(m), &AdId::new(&ad), c);
                model.insert((m, ad), c);
            };
            for s in sets {
                apply(&mut p, s);
            }
            p.seal_below(Minute(seal));
            for &(to, m, k) in &queries {
                let _ = p.top(Minute(to), m as u32, k); // build blocks
            }
            for s in late {
                apply(&mut p, s);
            }
            for (to, m, k) in queries {
                let got: Vec<_> = p.top(Minute(to), m as u32, k).into_iter().map(|(a, c)| (a.to_string(), c)).collect();
                prop_assert_eq!(got, naive(&model, to, m, k), "to {} m {} k {}", to, m, k);
            }
            // Totals per minute: the plain sum over ads, before and after an eviction.
            let plain = |model: &BTreeMap<(i64, String), u64>, from: i64| {
                let mut t: BTreeMap<i64, u64> = BTreeMap::new();
                for ((m, _), c) in model.range((from, String::new())..) {
                    *t.entry(*m).or_default() += c;
                }
                t.into_iter().filter(|(_, n)| *n > 0).map(|(m, n)| (Minute(m), n)).collect::<Vec<_>>()
            };
            prop_assert_eq!(p.totals(Minute(0), Minute(200)), plain(&model, 0));
            p.evict_before(Minute(seal));
            prop_assert_eq!(p.totals(Minute(i64::MIN), Minute(i64::MAX)), plain(&model, seal));
        }
    }

    #[test]
    fn the_interner_is_bounded_by_the_minutes_held() {
        let mut p = Popular::new();
        for minute in 0..200i64 {
            // 100 new ads a minute; a window of 10 minutes is kept.
            for i in 0..100 {
                p.set(Minute(minute), &AdId::new(&format!("ad-{minute}-{i}")), 1 + i as u64 % 3);
            }
            p.seal_below(Minute(minute - 2));
            let _ = p.top(Minute(minute + 1), 60, 5);
            p.evict_before(Minute(minute - 9));
            // Dead ids are dropped once they outnumber the live ones by 2048.
            assert!(p.interned() <= 2 * 1000 + 2048 + 100, "minute {minute}: {}", p.interned());
        }
        // Still exact after compactions.
        let got = p.top(Minute(200), 2, 2);
        assert_eq!(got, vec![(AdId::new("ad-198-11"), 3), (AdId::new("ad-198-14"), 3)]);
        assert_eq!(p.count(&AdId::new("ad-199-2"), Minute(199), Minute(200)), 3);
        assert_eq!(p.count(&AdId::new("ad-5-2"), Minute(0), Minute(200)), 0, "evicted");
    }

    #[test]
    fn ties_at_the_cut_go_by_ad_id() {
        let mut p = Popular::new();
        for (ad, c) in [("b", 2), ("a", 2), ("c", 2), ("z", 5), ("d", 1)] {
            p.set(Minute(0), &AdId::new(ad), c);
        }
        let got: Vec<_> =
            p.top(Minute(1), 1, 3).into_iter().map(|(a, c)| (a.to_string(), c)).collect();
        assert_eq!(got, vec![("z".into(), 5), ("a".into(), 2), ("b".into(), 2)]);
        assert_eq!(p.count(&AdId::new("a"), Minute(0), Minute(1)), 2);
        assert_eq!(p.count(&AdId::new("a"), Minute(1), Minute(2)), 0);
    }
}
