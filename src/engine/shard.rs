//! The aggregate stage for the ads of one shard: dedup, minute windows, local top-N.
//!
//! A window holds, per ad, one row of counts (total, then each filter). Rows live in flat vectors
//! indexed through a hash table keyed by the ad's routing hash and compared by the ad string, so
//! a row costs no allocation of its own. A window is *open* until the watermark reaches its end,
//! then *final*: its local top-N per slot is computed once and afterwards kept exact under late
//! corrections with [`rank::raise`]. It is evicted when the watermark is more than
//! `allowed_lateness` past its end: no event can change it any more.

use std::collections::BTreeMap;

use hashbrown::HashTable;

use crate::event::{AdId, Minute};
use crate::rank::{self, Ranked};

use super::dedup::{Dedup, DedupPart};
use super::map::ShardBatch;
use super::snapshot::{Decoder, Encoder, SnapshotError};
use super::{CountUpdates, Counters, EngineConfig};

/// Local top-N lists of one minute, one per slot.
pub type MinuteTops = (Minute, Vec<Vec<Ranked>>);

/// What one shard changed in a batch.
#[derive(Debug, Default)]
pub struct ShardOutput {
    pub(crate) counts: CountUpdates,
    /// Minutes that became final or were corrected, with their new local top-N lists.
    pub(crate) tops: Vec<MinuteTops>,
    /// This shard's cumulative counted/duplicate/late counters.
    pub(crate) counters: Counters,
}

#[derive(Default)]
struct Window {
    index: HashTable<u32>,
    ads: Vec<AdId>,
    hashes: Vec<u64>,
    counts: Vec<u64>,
    /// Rows touched by the current batch (each once).
    touched: Vec<u32>,
    stamp: Vec<u64>,
    /// Rows changed since the last checkpoint (each once), and whether each row is listed.
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
    is_final: bool,
    top: Vec<Vec<Ranked>>,
}

impl Window {
    fn row(&mut self, ad: &AdId, hash: u64, slots: usize) -> usize {
        let Window { index, ads, hashes, counts, stamp, is_dirty, .. } = self;
        if let Some(&r) = index.find(hash, |&r| ads[r as usize] == *ad) {
            return r as usize;
        }
        let r = ads.len();
        ads.push(ad.clone());
        hashes.push(hash);
        counts.resize(counts.len() + slots, 0);
        stamp.push(0);
        is_dirty.push(false);
        index.insert_unique(hash, r as u32, |&r| hashes[r as usize]);
        r
    }

    fn compute_tops(&mut self, slots: usize, n: usize) {
        self.top = (0..slots)
            .map(|slot| {
                let items = self
                    .ads
                    .iter()
                    .zip(self.counts.chunks(slots))
                    .filter(|(_, c)| c[slot] > 0)
                    .map(|(a, c)| (a.clone(), c[slot]))
                    .collect();
                rank::top(items, n)
            })
            .collect();
    }
}

pub struct Shard {
    slots: usize,
    top_n: usize,
    lateness_ms: i64,
    windows: BTreeMap<Minute, Window>,
    dedup: Dedup,
    counters: Counters,
    batch_no: u64,
}

impl Shard {
    pub fn new(config: &EngineConfig, filters: usize) -> Shard {
        Shard {
            slots: filters + 1,
            top_n: config.top_n,
            lateness_ms: config.allowed_lateness_ms,
            windows: BTreeMap::new(),
            dedup: Dedup::new(config.dedup_horizon_ms, config.dedup_capacity),
            counters: Counters::default(),
            batch_no: 0,
        }
    }

    /// Identities held for deduplication (for metrics and tests of its bound).
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// This shard's cumulative counted/duplicate/late counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Windows held (open, or final within the lateness).
    pub fn windows(&self) -> usize {
        self.windows.len()
    }

    pub fn apply(&mut self, batch: ShardBatch) -> ShardOutput {
        let slots = self.slots;
        let mut deltas = vec![0u64; batch.groups.len()];
        for ev in &batch.events {
            if self.dedup.insert(ev.identity, ev.time) {
                deltas[ev.group as usize] += 1;
                self.counters.counted += 1;
                self.counters.late_corrected += ev.late as u64;
            } else {
                self.counters.duplicate += 1;
            }
        }
        self.batch_no += 1;
        for (g, &d) in batch.groups.iter().zip(&deltas) {
            if d == 0 {
                continue;
            }
            let w = self.windows.entry(g.minute).or_default();
            let r = w.row(&g.ad, g.ad_hash, slots);
            let row = &mut w.counts[r * slots..(r + 1) * slots];
            row[0] += d;
            for f in g.mask.iter() {
                row[f + 1] += d;
            }
            if w.stamp[r] != self.batch_no {
                w.stamp[r] = self.batch_no;
                w.touched.push(r as u32);
                if !w.is_dirty[r] {
                    w.is_dirty[r] = true;
                    w.dirty.push(r as u32);
                }
            }
        }

        let mut out = ShardOutput {
            counts: CountUpdates::with_capacity(slots, batch.groups.len()),
            ..Default::default()
        };
        let watermark = batch.watermark;
        for (&minute, w) in &mut self.windows {
            if w.touched.is_empty() {
                continue;
            }
            for &r in &w.touched {
                let r = r as usize;
                let counts = &w.counts[r * slots..(r + 1) * slots];
                out.counts.push(minute, &w.ads[r], counts);
                if w.is_final {
                    for (slot, &c) in counts.iter().enumerate() {
                        if c > 0 {
                            rank::raise(&mut w.top[slot], self.top_n, &w.ads[r], c);
                        }
                    }
                }
            }
            w.touched.clear();
            if w.is_final {
                out.tops.push((minute, w.top.clone()));
            }
        }
        for (&minute, w) in &mut self.windows {
            if !watermark.is_final(minute) {
                break;
            }
            if !w.is_final {
                w.is_final = true;
                w.compute_tops(slots, self.top_n);
                out.tops.push((minute, w.top.clone()));
            }
        }
        out.tops.sort_by_key(|(m, _)| *m);
        while let Some(entry) = self.windows.first_entry() {
            if !watermark.is_too_late(*entry.key(), self.lateness_ms) {
                break;
            }
            entry.remove();
        }
        if let Some(oldest) = watermark.oldest_countable(self.lateness_ms) {
            self.dedup.expire(oldest);
        }
        out.counters = self.counters.clone();
        out
    }

    /// The local top-N lists of every final window (to rebuild the reducer after a restore).
    pub fn final_tops(&self) -> Vec<MinuteTops> {
        self.windows.iter().filter(|(_, w)| w.is_final).map(|(m, w)| (*m, w.top.clone())).collect()
    }

    /// Every row of every window held (none is sealed), appended to `out`.
    pub fn rows(&self, out: &mut CountUpdates) {
        for (&minute, w) in &self.windows {
            for (r, ad) in w.ads.iter().enumerate() {
                out.push(minute, ad, &w.counts[r * self.slots..(r + 1) * self.slots]);
            }
        }
    }

    /// Layout: counters, window count u, per window: minute i and its rows as one length-prefixed
    /// block (so that a restore skips the windows sealed by then without decoding them): row
    /// count u, per row: ad str and `slots` counts u; then the dedup part. With `changes_only`,
    /// only the rows and dedup entries changed since the last checkpoint
    /// ([`Shard::mark_written`]); whether a window is final follows from the watermark on restore.
    pub fn encode(&self, e: &mut Encoder, changes_only: bool) {
        self.counters.encode(e);
        let rows = |w: &Window| if changes_only { w.dirty.len() } else { w.ads.len() };
        let windows: Vec<_> = self.windows.iter().filter(|(_, w)| rows(w) > 0).collect();
        e.u(windows.len() as u64);
        let mut block = Encoder::default();
        for (minute, w) in windows {
            e.i(minute.0);
            block.buf.clear();
            block.u(rows(w) as u64);
            let mut row = |r: usize| {
                block.bytes(w.ads[r].as_str().as_bytes());
                for &c in &w.counts[r * self.slots..(r + 1) * self.slots] {
                    block.u(c);
                }
            };
            if changes_only {
                w.dirty.iter().for_each(|&r| row(r as usize));
            } else {
                (0..w.ads.len()).for_each(row);
            }
            e.bytes(&block.buf);
        }
        self.dedup.encode(e, changes_only);
    }

    /// The newest event time and minute [`Shard::encode`] writes, for how long a file matters.
    pub fn extent(&self, changes_only: bool) -> (Option<i64>, Option<Minute>) {
        let minute = self
            .windows
            .iter()
            .rev()
            .find(|(_, w)| if changes_only { !w.dirty.is_empty() } else { !w.ads.is_empty() })
            .map(|(m, _)| *m);
        (self.dedup.max_time(changes_only), minute)
    }

    /// Everything so far is in a checkpoint file.
    pub fn mark_written(&mut self) {
        for w in self.windows.values_mut() {
            for r in w.dirty.drain(..) {
                w.is_dirty[r as usize] = false;
            }
        }
        self.dedup.mark_written();
    }

    /// Applies one encoded part, oldest first: rows take the part's absolute counts; the newest
    /// part (`base`) also gives the counters. Windows sealed at `watermark` (the newest part's)
    /// are skipped. `version`: the file's layout. Returns the part's dedup entries, for
    /// [`Shard::finish_restore`] once every part is read.
    pub fn decode<'a>(
        &mut self,
        d: &mut Decoder<'a>,
        base: bool,
        watermark: super::Watermark,
        version: u16,
    ) -> Result<DedupPart<'a>, SnapshotError> {
        let counters = Counters::decode(d)?;
        if base {
            self.counters = counters;
        }
        for _ in 0..d.count()? {
            let minute = Minute(d.i()?);
            let sealed = watermark.is_too_late(minute, self.lateness_ms);
            if version >= 4 {
                let block = d.bytes()?;
                if !sealed {
                    let mut d = Decoder::raw(block);
                    self.decode_rows(minute, &mut d)?;
                    d.finish()?;
                }
            } else {
                self.decode_rows(minute, d)?;
            }
        }
        DedupPart::read(d, version)
    }

    fn decode_rows(&mut self, minute: Minute, d: &mut Decoder) -> Result<(), SnapshotError> {
        let w = self.windows.entry(minute).or_default();
        for _ in 0..d.count()? {
            let ad = AdId::new(d.str()?);
            let r = w.row(&ad, ad.route_hash(), self.slots);
            for slot in 0..self.slots {
                w.counts[r * self.slots + slot] = d.u()?;
            }
        }
        Ok(())
    }

    /// Ends a restore at `watermark`: windows too late are dropped and final ones ranked, as
    /// the batch that left this watermark did; the dedup state is built from every part's
    /// entries (oldest first) without those expired by then.
    pub fn finish_restore(
        &mut self,
        watermark: super::Watermark,
        dedup: &[DedupPart<'_>],
    ) -> Result<(), SnapshotError> {
        self.windows.retain(|m, _| !watermark.is_too_late(*m, self.lateness_ms));
        for (&minute, w) in &mut self.windows {
            if watermark.is_final(minute) {
                w.is_final = true;
                w.compute_tops(self.slots, self.top_n);
            }
        }
        self.dedup.restore(dedup)
    }

    /// Dedup times below this have been dropped.
    pub fn expired_below(&self) -> i64 {
        self.dedup.expired_below()
    }

    /// Bytes of deduplication state held in memory.
    pub fn dedup_bytes(&self) -> usize {
        self.dedup.bytes()
    }
}
