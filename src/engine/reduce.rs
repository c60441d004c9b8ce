//! The reduce stage: merges the shards' local top-N lists into the global top-N of each minute
//! and slot, and gathers counts, counters and offsets into the batch's [`Output`].
//!
//! The merge is exact because every ad lives in exactly one shard: the global top-N is the top-N
//! of the union of the local ones. The reducer keeps each shard's latest lists for final minutes
//! within the lateness, so a correction from one shard re-merges with the others' lists.

use std::collections::BTreeMap;

use crate::event::Minute;
use crate::rank::{self, Ranked};

use super::map::MapMeta;
use super::shard::{MinuteTops, ShardOutput};
use super::{CountUpdates, EngineConfig, Output, Slot, TopUpdate, Watermark};

pub struct Reducer {
    shards: usize,
    slots: usize,
    top_n: usize,
    lateness_ms: i64,
    /// Per final minute: per shard, per slot, its local top-N.
    minutes: BTreeMap<Minute, Vec<Vec<Vec<Ranked>>>>,
}

impl Reducer {
    pub fn new(config: &EngineConfig, filters: usize) -> Reducer {
        Reducer {
            shards: config.shards,
            slots: filters + 1,
            top_n: config.top_n,
            lateness_ms: config.allowed_lateness_ms,
            minutes: BTreeMap::new(),
        }
    }

    /// Combines the map stage's result with every shard's output (in shard order).
    pub fn reduce(&mut self, meta: MapMeta, outputs: Vec<ShardOutput>) -> Output {
        assert_eq!(outputs.len(), self.shards, "one output per shard");
        let rows = outputs.iter().map(|o| o.counts.len()).sum();
        let mut counts = CountUpdates::with_capacity(self.slots, rows);
        let mut counters = meta.counters;
        let mut changed = Vec::new();
        for (k, mut o) in outputs.into_iter().enumerate() {
            counts.append(&mut o.counts);
            counters.add(&o.counters);
            changed.extend(o.tops.iter().map(|(m, _)| *m));
            self.accept(k, o.tops);
        }
        changed.sort_unstable();
        changed.dedup();
        let mut top = Vec::new();
        for minute in changed {
            self.merge(minute, &mut top);
        }
        self.evict(meta.watermark);
        Output {
            counts,
            top,
            watermark: meta.watermark,
            offsets: meta.offsets,
            rejected: meta.rejected,
            counters,
            too_late: meta.too_late,
        }
    }

    /// The global top-N lists of `minute`, one per slot, appended to `out`.
    fn merge(&self, minute: Minute, out: &mut Vec<TopUpdate>) {
        let per_shard = &self.minutes[&minute];
        for slot in 0..self.slots {
            let all =
                per_shard.iter().filter_map(|lists| lists.get(slot)).flatten().cloned().collect();
            out.push(TopUpdate {
                minute,
                slot: Slot::from_index(slot),
                ads: rank::top(all, self.top_n),
            });
        }
    }

    /// The global top-N lists of every final minute still open to corrections.
    pub fn tops(&self) -> Vec<TopUpdate> {
        let mut out = Vec::new();
        for &minute in self.minutes.keys() {
            self.merge(minute, &mut out);
        }
        out
    }

    fn accept(&mut self, shard: usize, tops: Vec<MinuteTops>) {
        for (minute, lists) in tops {
            self.minutes.entry(minute).or_insert_with(|| vec![Vec::new(); self.shards])[shard] =
                lists;
        }
    }

    fn evict(&mut self, watermark: Watermark) {
        while let Some(entry) = self.minutes.first_entry() {
            if !watermark.is_too_late(*entry.key(), self.lateness_ms) {
                break;
            }
            entry.remove();
        }
    }

    /// Rebuilds the state from the shards' final tops after a restore.
    pub fn restore(&mut self, watermark: Watermark, tops: Vec<Vec<MinuteTops>>) {
        for (k, t) in tops.into_iter().enumerate() {
            self.accept(k, t);
        }
        self.evict(watermark);
    }
}
