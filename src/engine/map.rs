//! The map stage: validation, watermarks, classification, filters, routing and map-side
//! pre-aggregation. Owns the watermark and offset state and the valid/invalid/too-late counters.
//!
//! Each surviving event becomes a [`ShardEvent`] (its identity and time, for dedup in log order)
//! pointing at a [`Group`]: the batch's distinct (ad, minute, filter mask) triples, so the shard
//! updates a window once per group instead of once per click.

use std::sync::Arc;

use hashbrown::HashTable;

use crate::event::{
    parse_line, route_hash, shard_of, AdId, Click, EventTime, Identity, Minute, Validation,
};
use crate::filter::{FilterMask, Filters};

use super::snapshot::{Decoder, Encoder, SnapshotError};
use super::watermark::{Watermark, Watermarks};
use super::{CountUpdates, Counters, EngineConfig, Offset, PartitionId, Payload, Record, Rejected};

/// One (ad, minute, filter mask) of a batch.
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub ad: AdId,
    pub ad_hash: u64,
    pub minute: Minute,
    pub mask: FilterMask,
}

/// One event for a shard's dedup, in log order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShardEvent {
    pub identity: Identity,
    pub time: i64,
    pub group: u32,
    /// Its minute was already final when the event arrived: counting it is a correction.
    pub late: bool,
}

/// The part of a batch routed to one shard.
#[derive(Clone, Debug, Default)]
pub struct ShardBatch {
    pub(crate) groups: Vec<Group>,
    pub(crate) events: Vec<ShardEvent>,
    /// The watermark after the whole batch.
    pub(crate) watermark: Watermark,
}

/// What the map stage hands the reducer directly.
#[derive(Clone, Debug, Default)]
pub struct MapMeta {
    pub(crate) watermark: Watermark,
    pub(crate) offsets: Vec<(PartitionId, Offset)>,
    pub(crate) rejected: Vec<Rejected>,
    pub(crate) counters: Counters,
    /// The batch's too-late clicks, one row of 1 + filters counts per (minute, ad) (rare).
    pub(crate) too_late: CountUpdates,
}

/// The map stage's result for one batch.
pub struct Mapped {
    meta: MapMeta,
    batches: Vec<ShardBatch>,
}

impl Mapped {
    pub fn split(self) -> (MapMeta, Vec<ShardBatch>) {
        (self.meta, self.batches)
    }
}

pub struct Mapper {
    config: EngineConfig,
    filters: Arc<Filters>,
    watermarks: Watermarks,
    counters: Counters,
    /// Scratch: (key hash, shard, group index) of this batch's groups.
    groups: HashTable<(u64, u32, u32)>,
}

impl Mapper {
    pub fn new(config: EngineConfig, filters: Arc<Filters>) -> Mapper {
        Mapper {
            watermarks: Watermarks::new(config.watermark_delay_ms, config.idle_timeout_ms),
            config,
            filters,
            counters: Counters::default(),
            groups: HashTable::new(),
        }
    }

    /// Counts per row: the total, then each filter.
    pub fn slots(&self) -> usize {
        self.filters.len() + 1
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn watermark(&self) -> Watermark {
        self.watermarks.current()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// How long after its last record a partition stops holding the watermark, and its delay.
    pub fn idle_and_delay_ms(&self) -> i64 {
        self.config.idle_timeout_ms + self.config.watermark_delay_ms
    }

    pub fn peek_watermark(&self, wall: EventTime) -> Watermark {
        self.watermarks.peek(wall)
    }

    /// See [`Watermarks::assign`].
    pub fn assign(&mut self, partitions: &[PartitionId], wall: EventTime) {
        self.watermarks.assign(partitions, wall);
    }

    pub fn partitions(&self) -> Vec<super::watermark::PartitionView> {
        self.watermarks.partitions()
    }

    pub fn offsets(&self) -> Vec<(PartitionId, Offset)> {
        self.watermarks.offsets()
    }

    pub fn map(&mut self, wall: EventTime, records: &[Record<'_>]) -> Mapped {
        // A partition with new records in this batch is delivering, not idle: mark it before the
        // idle rule runs, so that a partition read later in the batch holds the watermark from
        // the batch's first record on (the batch may span minutes of event time).
        for r in records {
            self.watermarks.touch(r.partition, r.offset, wall);
        }
        self.watermarks.tick(wall);
        let per_shard = records.len() / self.config.shards + 16;
        let mut batches: Vec<ShardBatch> = (0..self.config.shards)
            .map(|_| ShardBatch {
                groups: Vec::with_capacity(per_shard / 2),
                events: Vec::with_capacity(per_shard),
                watermark: Watermark::NONE,
            })
            .collect();
        let mut rejected = Vec::new();
        let mut too_late = CountUpdates::new(self.slots());
        self.groups.clear();
        let v = Validation { now: wall, max_skew_ms: self.config.max_clock_skew_ms };
        let mut touched = Vec::new();
        for r in records {
            if !self.watermarks.claim(r.partition, r.offset) {
                continue;
            }
            if touched.last() != Some(&r.partition) {
                touched.push(r.partition);
            }
            match &r.payload {
                Payload::Click(c) => self.route(c, r.partition, wall, &mut batches, &mut too_late),
                Payload::Line(line) => match parse_line(line, v) {
                    Ok(Some(c)) => self.route(&c, r.partition, wall, &mut batches, &mut too_late),
                    Ok(None) => {}
                    Err(error) => {
                        self.counters.invalid[error.kind().index()] += 1;
                        rejected.push(Rejected { partition: r.partition, offset: r.offset, error });
                    }
                },
            }
        }
        let watermark = self.watermarks.current();
        for b in &mut batches {
            b.watermark = watermark;
        }
        touched.sort_unstable();
        touched.dedup();
        let offsets = touched
            .into_iter()
            .map(|p| (p, self.watermarks.next_offset(p).expect("claimed partitions are known")))
            .collect();
        Mapped {
            meta: MapMeta {
                watermark,
                offsets,
                rejected,
                counters: self.counters.clone(),
                too_late: too_late.merged(),
            },
            batches,
        }
    }

    fn route(
        &mut self,
        click: &Click<'_>,
        partition: PartitionId,
        wall: EventTime,
        batches: &mut [ShardBatch],
        too_late: &mut CountUpdates,
    ) {
        self.counters.valid += 1;
        let minute = click.time.minute();
        let w = self.watermarks.current();
        self.watermarks.observe(partition, click.time, wall);
        if w.is_too_late(minute, self.config.allowed_lateness_ms) {
            self.counters.too_late += 1;
            let mask = self.filters.matches(click);
            let row: Vec<u64> = (0..=self.filters.len())
                .map(|i| u64::from(i == 0 || mask.contains(i - 1)))
                .collect();
            too_late.push(minute, &AdId::new(&click.ad_id), &row);
            return;
        }
        let mask = self.filters.matches(click);
        let ad_hash = route_hash(&click.ad_id);
        let shard = shard_of(ad_hash, batches.len());
        let key = group_key(ad_hash, minute, mask);
        let batch = &mut batches[shard];
        let found = self.groups.find(key, |&(k, s, g)| {
            let grp = &batches_group(batch, s, shard, g);
            k == key
                && grp.is_some_and(|grp| {
                    grp.minute == minute && grp.mask == mask && grp.ad.as_str() == click.ad_id
                })
        });
        let group = match found {
            Some(&(_, _, g)) => g,
            None => {
                let g = batch.groups.len() as u32;
                batch.groups.push(Group { ad: AdId::new(&click.ad_id), ad_hash, minute, mask });
                self.groups.insert_unique(key, (key, shard as u32, g), |&(k, _, _)| k);
                g
            }
        };
        batch.events.push(ShardEvent {
            identity: click.identity_with(&self.config.identity_key),
            time: click.time.0,
            group,
            late: w.is_final(minute),
        });
    }

    /// Layout: shard count u, filter ids (count u, each str), watermarks, counters.
    pub fn encode(&self, e: &mut Encoder) {
        e.u(self.config.shards as u64);
        e.u(self.filters.len() as u64);
        for id in self.filters.ids() {
            e.bytes(id.as_bytes());
        }
        self.watermarks.encode(e);
        self.counters.encode(e);
    }

    pub fn decode(&mut self, d: &mut Decoder) -> Result<(), SnapshotError> {
        let shards = d.u()?;
        if shards != self.config.shards as u64 {
            return Err(SnapshotError::Mismatch {
                what: "shards",
                found: shards.to_string(),
                configured: self.config.shards.to_string(),
            });
        }
        let ids =
            (0..d.count()?).map(|_| d.str().map(str::to_owned)).collect::<Result<Vec<_>, _>>()?;
        if ids != self.filters.ids() {
            return Err(SnapshotError::Mismatch {
                what: "filters",
                found: format!("{ids:?}"),
                configured: format!("{:?}", self.filters.ids()),
            });
        }
        self.watermarks.decode(d)?;
        self.counters = Counters::decode(d)?;
        Ok(())
    }
}

/// The group `g` of shard `s`, when `s` is the shard being routed to (keys of other shards can
/// share a hash but never a group).
fn batches_group(batch: &ShardBatch, s: u32, shard: usize, g: u32) -> Option<&Group> {
    (s as usize == shard).then(|| &batch.groups[g as usize])
}

fn group_key(ad_hash: u64, minute: Minute, mask: FilterMask) -> u64 {
    let h = ad_hash
        ^ (minute.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ mask.0.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    h ^ (h >> 29)
}
