//! The streaming aggregation engine (SPEC §2): a pure, synchronous map → aggregate → reduce
//! dataflow. No threads, files, sockets or clocks inside: the caller feeds batches stamped with a
//! wall-clock time and maps shards to threads as it likes.
//!
//! ```text
//!   Batch { wall, [Record { partition, offset, Line | Click }] }
//!        │
//!   Mapper::map      validate lines (SPEC §1), skip offsets already reflected, apply the idle
//!        │           rule, advance per-partition watermarks event by event, classify each event
//!        │           (counted / late → correction / too late), match filters, route by
//!        │           hash(ad_id) to one of S shards, pre-aggregate into (ad, minute, filters)
//!        │           groups so a hot ad costs one window update per batch
//!        ▼
//!   Shard::apply ×S  dedup each event in log order, add group deltas to the minute windows,
//!        │           finalize windows the watermark passed (local top-N per filter), keep
//!        │           corrected tops exact, evict windows past the lateness and expire dedup
//!        ▼
//!   Reducer::reduce  merge local top-N lists into the global top-N per minute and filter (exact:
//!                    an ad lives in one shard), sum counters, emit the [`Output`]
//! ```
//!
//! **Using it from an adapter.** Build an [`Engine`] from an [`EngineConfig`] and compiled
//! [`Filters`]; feed it batches with [`Engine::process`] (all stages in the calling thread) or
//! [`Engine::process_with`], which hands the shard stage to the caller as `(shard, batch)` pairs
//! to run anywhere (the embedded service uses a fixed pool of OS threads) and to return outputs
//! in order. Persist [`Output::counts`] (absolute), [`Output::top`] and [`Output::offsets`]
//! together with [`Engine::snapshot`] bytes, or with enough to replay the batches since the last
//! snapshot (their records and wall times); restore with [`Engine::restore`]. Records below a
//! partition's reflected offset are skipped, so re-feeding a batch is harmless.
//!
//! **Determinism.** Given the same batches (records and wall times) the engine makes the same
//! decisions, whatever the shard count and however the records are cut into batches: every
//! classification is made per event with the watermark as it stands after the events before it.
//! The only inputs beyond the records are the batches' wall times: a caller that replays after a
//! crash must record them and give the same ones again.
//!
//! **Output.** Counts are absolute (idempotent to write again) for every (minute, ad) a batch
//! touched, over the unfiltered total and every filter. Top-N lists are emitted when a minute
//! becomes final and again whenever a correction changes it. `offsets` says, per partition, the
//! offset below which every record is reflected; a snapshot taken after the batch holds exactly
//! that state, so results + offsets + snapshot can be committed together.

mod dedup;
mod map;
mod reduce;
mod shard;
pub mod snapshot;
mod watermark;

use std::sync::Arc;

pub use map::{Mapper, ShardBatch};
pub use reduce::Reducer;
pub use shard::{Shard, ShardOutput};
pub use snapshot::SnapshotError;
pub use watermark::{AtomicWatermark, PartitionView, Watermark};

use crate::event::{AdId, Click, EventTime, IdentityKey, Invalid, InvalidKind, Minute, MINUTE_MS};
use crate::filter::Filters;
use crate::rank::Ranked;

/// A source partition (a log partition or a Kafka partition).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct PartitionId(pub u32);

/// A record's position in its partition.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Offset(pub u64);

/// The records `[from, to)` of one partition: what an aggregator batch read, a journal entry
/// replays, or an archive flush writes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct OffsetRange {
    pub partition: PartitionId,
    pub from: Offset,
    pub to: Offset,
}

impl OffsetRange {
    pub fn new(partition: PartitionId, from: Offset, to: Offset) -> OffsetRange {
        OffsetRange { partition, from, to }
    }

    /// Records in the range.
    pub fn len(&self) -> u64 {
        self.to.0.saturating_sub(self.from.0)
    }

    pub fn is_empty(&self) -> bool {
        self.to <= self.from
    }
}

/// Which count of an (ad, minute): the unfiltered total or one filter.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Slot {
    Total,
    Filter(usize),
}

impl Slot {
    /// Position in a row of counts: 0 for the total, 1 + i for filter i.
    pub fn index(self) -> usize {
        match self {
            Slot::Total => 0,
            Slot::Filter(i) => i + 1,
        }
    }
    pub fn from_index(i: usize) -> Slot {
        if i == 0 {
            Slot::Total
        } else {
            Slot::Filter(i - 1)
        }
    }
}

/// Engine settings (SPEC §4 keys), in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    pub watermark_delay_ms: i64,
    pub idle_timeout_ms: i64,
    pub allowed_lateness_ms: i64,
    pub dedup_horizon_ms: i64,
    pub max_clock_skew_ms: i64,
    pub top_n: usize,
    /// Aggregate shards (S). Fixed for the life of a snapshot.
    pub shards: usize,
    /// Identities each shard expects to hold within the horizon; the dedup table is sized for
    /// them up front (growing it while full of entries costs ~14% of throughput while it fills).
    /// Beyond it the table grows as needed.
    pub dedup_capacity: usize,
    /// Keys the identity hashes dedup compares (crafted collisions need it).
    pub identity_key: IdentityKey,
}

/// Recomputation's lateness: 1,000 years, so nothing is too late (and no sum overflows).
const RECOMPUTE_LATENESS_MS: i64 = 1000 * 366 * 24 * 60 * MINUTE_MS;

/// A setting out of its allowed range; names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let day = 24 * 60 * MINUTE_MS;
        let err = |key, reason: String| Err(ConfigError { key, reason });
        for (key, v) in [
            ("watermark_delay", self.watermark_delay_ms),
            ("idle_timeout", self.idle_timeout_ms),
            ("allowed_lateness", self.allowed_lateness_ms),
            ("max_clock_skew", self.max_clock_skew_ms),
        ] {
            if !(0..=day).contains(&v) {
                return err(key, format!("must be between 0s and 24h, got {v} ms"));
            }
        }
        let min_horizon = self.allowed_lateness_ms + self.watermark_delay_ms + MINUTE_MS;
        if self.dedup_horizon_ms < min_horizon || self.dedup_horizon_ms > 7 * day {
            return err(
                "dedup_horizon",
                format!(
                    "must be at least allowed_lateness + watermark_delay + 1m ({min_horizon} ms) and at most 7 days, got {} ms",
                    self.dedup_horizon_ms
                ),
            );
        }
        if !(1..=100_000).contains(&self.top_n) {
            return err("top_n", format!("must be between 1 and 100000, got {}", self.top_n));
        }
        if self.dedup_capacity > 1 << 30 {
            return err(
                "dedup_capacity",
                format!("must be at most 2^30, got {}", self.dedup_capacity),
            );
        }
        if !(1..=1024).contains(&self.shards) {
            return err("shards", format!("must be between 1 and 1024, got {}", self.shards));
        }
        Ok(())
    }
}

/// What a record carries: a raw NDJSON line, or a click validated upstream (the collector
/// validates to answer its client; the aggregator must not parse again).
#[derive(Clone, Debug)]
pub enum Payload<'a> {
    Line(&'a [u8]),
    Click(Click<'a>),
}

/// One record of a source partition.
#[derive(Clone, Debug)]
pub struct Record<'a> {
    pub partition: PartitionId,
    pub offset: Offset,
    pub payload: Payload<'a>,
}

/// A line rejected as invalid, for the dead-letter file and the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub partition: PartitionId,
    pub offset: Offset,
    pub error: Invalid,
}

/// Cumulative counters (SPEC §2 metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Lines that passed validation (counted + duplicate + too late).
    pub valid: u64,
    /// Distinct clicks counted.
    pub counted: u64,
    /// Of `counted`, those that corrected a final minute.
    pub late_corrected: u64,
    pub duplicate: u64,
    pub too_late: u64,
    /// Invalid lines, by `InvalidKind::index`.
    pub invalid: [u64; InvalidKind::ALL.len()],
}

impl Counters {
    pub fn invalid_total(&self) -> u64 {
        self.invalid.iter().sum()
    }
    pub(crate) fn add(&mut self, o: &Counters) {
        self.valid += o.valid;
        self.counted += o.counted;
        self.late_corrected += o.late_corrected;
        self.duplicate += o.duplicate;
        self.too_late += o.too_late;
        for (a, b) in self.invalid.iter_mut().zip(o.invalid) {
            *a += b;
        }
    }
    /// Appends the counters in the snapshot encoding (the store keeps them the same way).
    pub fn encode(&self, e: &mut snapshot::Encoder) {
        for v in [self.valid, self.counted, self.late_corrected, self.duplicate, self.too_late] {
            e.u(v);
        }
        e.u(self.invalid.len() as u64);
        for v in self.invalid {
            e.u(v);
        }
    }
    pub fn decode(d: &mut snapshot::Decoder) -> Result<Counters, SnapshotError> {
        let mut c = Counters {
            valid: d.u()?,
            counted: d.u()?,
            late_corrected: d.u()?,
            duplicate: d.u()?,
            too_late: d.u()?,
            ..Counters::default()
        };
        if d.u()? != c.invalid.len() as u64 {
            return Err(SnapshotError::Corrupt("invalid counter kinds"));
        }
        for v in &mut c.invalid {
            *v = d.u()?;
        }
        Ok(c)
    }
}

/// Absolute counts of the (minute, ad) rows a batch touched: columnar, one row of `1 + filters`
/// counts per entry (see [`Slot::index`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CountUpdates {
    stride: usize,
    minutes: Vec<Minute>,
    ads: Vec<AdId>,
    counts: Vec<u64>,
}

impl CountUpdates {
    pub fn new(stride: usize) -> Self {
        CountUpdates { stride, ..Default::default() }
    }
    pub fn with_capacity(stride: usize, rows: usize) -> Self {
        CountUpdates {
            stride,
            minutes: Vec::with_capacity(rows),
            ads: Vec::with_capacity(rows),
            counts: Vec::with_capacity(rows * stride),
        }
    }
    pub fn push(&mut self, minute: Minute, ad: &AdId, counts: &[u64]) {
        debug_assert_eq!(counts.len(), self.stride);
        self.minutes.push(minute);
        self.ads.push(ad.clone());
        self.counts.extend_from_slice(counts);
    }
    pub fn append(&mut self, other: &mut CountUpdates) {
        self.minutes.append(&mut other.minutes);
        self.ads.append(&mut other.ads);
        self.counts.append(&mut other.counts);
    }
    pub fn len(&self) -> usize {
        self.minutes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.minutes.is_empty()
    }
    /// Rows with the same (minute, ad) summed into one, in (minute, ad) order.
    pub fn merged(self) -> CountUpdates {
        let mut sums: std::collections::BTreeMap<(Minute, &AdId), Vec<u64>> = Default::default();
        for (m, ad, c) in self.iter() {
            let row = sums.entry((m, ad)).or_insert_with(|| vec![0; c.len()]);
            for (a, b) in row.iter_mut().zip(c) {
                *a += b;
            }
        }
        let mut out = CountUpdates::with_capacity(self.stride, sums.len());
        for ((m, ad), c) in &sums {
            out.push(*m, ad, c);
        }
        out
    }

    /// Each row: its minute, ad and counts indexed by [`Slot::index`].
    pub fn iter(&self) -> impl Iterator<Item = (Minute, &AdId, &[u64])> {
        let stride = self.stride.max(1);
        self.minutes
            .iter()
            .zip(&self.ads)
            .zip(self.counts.chunks(stride))
            .map(|((m, a), c)| (*m, a, c))
    }
}

/// The global top-N of one minute and slot, as it now stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopUpdate {
    pub minute: Minute,
    pub slot: Slot,
    pub ads: Vec<Ranked>,
}

/// What one batch changed.
#[derive(Clone, Debug, Default)]
pub struct Output {
    pub counts: CountUpdates,
    pub top: Vec<TopUpdate>,
    /// The watermark after the batch; see [`Watermark::is_final`].
    pub watermark: Watermark,
    /// Per partition seen so far, the offset below which every record is reflected.
    pub offsets: Vec<(PartitionId, Offset)>,
    pub rejected: Vec<Rejected>,
    pub counters: Counters,
    /// Clicks of this batch that came too late to be counted, per (minute, ad) and slot: they
    /// stay in the raw archive, and reconciliation explains differences with them.
    pub too_late: CountUpdates,
}

/// The whole engine in one thread: a mapper, its shards and a reducer.
pub struct Engine {
    mapper: Mapper,
    shards: Vec<Shard>,
    reducer: Reducer,
}

impl Engine {
    pub fn new(config: EngineConfig, filters: Arc<Filters>) -> Result<Engine, ConfigError> {
        config.validate()?;
        let shards = (0..config.shards).map(|_| Shard::new(&config, filters.len())).collect();
        Ok(Engine {
            reducer: Reducer::new(&config, filters.len()),
            mapper: Mapper::new(config, filters),
            shards,
        })
    }

    /// An engine for recomputation from the raw archive (SPEC §3.4): the same dataflow, dedup
    /// and top-N with `config`'s settings, but no click is ever too late, so every distinct
    /// valid click is counted. Feed each partition's records in offset order, then
    /// [`Engine::finish`] makes every minute final.
    pub fn recompute(
        mut config: EngineConfig,
        filters: Arc<Filters>,
    ) -> Result<Engine, ConfigError> {
        config.validate()?;
        config.allowed_lateness_ms = RECOMPUTE_LATENESS_MS;
        let shards = (0..config.shards).map(|_| Shard::new(&config, filters.len())).collect();
        Ok(Engine {
            reducer: Reducer::new(&config, filters.len()),
            mapper: Mapper::new(config, filters),
            shards,
        })
    }

    /// Ends a recomputation: every partition seen goes idle and the watermark passes `until`,
    /// so every window before it is final and its top-N emitted.
    pub fn finish(&mut self, until: EventTime) -> Output {
        let wall = EventTime(until.0 + self.mapper.idle_and_delay_ms() + MINUTE_MS);
        self.process(wall, &[])
    }

    /// Processes one batch stamped with wall-clock time `wall`.
    pub fn process(&mut self, wall: EventTime, records: &[Record<'_>]) -> Output {
        let mapped = self.mapper.map(wall, records);
        let (meta, batches) = mapped.split();
        let outputs = self.shards.iter_mut().zip(batches).map(|(s, b)| s.apply(b)).collect();
        self.reducer.reduce(meta, outputs)
    }

    /// As [`Engine::process`], with the caller running the shard stage: `run` gets each shard
    /// with its batch and returns their outputs in the same order (e.g. on a thread pool).
    pub fn process_with<F>(&mut self, wall: EventTime, records: &[Record<'_>], run: F) -> Output
    where
        F: FnOnce(Vec<(&mut Shard, ShardBatch)>) -> Vec<ShardOutput>,
    {
        let (meta, batches) = self.mapper.map(wall, records).split();
        let outputs = run(self.shards.iter_mut().zip(batches).collect());
        assert_eq!(outputs.len(), self.shards.len(), "one output per shard, in order");
        self.reducer.reduce(meta, outputs)
    }

    pub fn watermark(&self) -> Watermark {
        self.mapper.watermark()
    }

    /// The watermark a batch without records at `wall` would leave; changes nothing.
    pub fn peek_watermark(&self, wall: EventTime) -> Watermark {
        self.mapper.peek_watermark(wall)
    }

    /// Declares the source partitions this engine owns, at wall time `wall` (start, or a
    /// rebalance): each holds the watermark back until it delivers or idles (SPEC §2). A caller
    /// that replays must give the same assignment at the same point (the embedded service
    /// journals it).
    pub fn assign(&mut self, partitions: &[PartitionId], wall: EventTime) {
        self.mapper.assign(partitions, wall);
    }

    pub fn offsets(&self) -> Vec<(PartitionId, Offset)> {
        self.mapper.offsets()
    }

    /// Each owned partition's own watermark and idle flag, by partition id.
    pub fn partitions(&self) -> Vec<PartitionView> {
        self.mapper.partitions()
    }

    /// The cumulative counters, as the last [`Output::counters`] reported them.
    pub fn counters(&self) -> Counters {
        let mut c = self.mapper.counters().clone();
        for s in &self.shards {
            c.add(s.counters());
        }
        c
    }

    /// State held across shards: (identities kept for dedup, minute windows).
    pub fn shard_stats(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(d, w), s| (d + s.dedup_len(), w + s.windows()))
    }

    /// The whole state as bytes, see [`snapshot`]: one self-contained checkpoint file.
    pub fn snapshot(&self) -> Vec<u8> {
        self.encode(false)
    }

    /// An incremental checkpoint file: the mapper's and shards' small state whole, and only the
    /// window rows and dedup entries changed since the previous checkpoint, each written once.
    /// Restoring needs the files of earlier checkpoints that [`Engine::retains`] still (see
    /// [`Engine::restore_chain`]). Its cost follows what changed, not the state.
    pub fn checkpoint(&mut self) -> (Vec<u8>, Extent) {
        self.take_checkpoint(true)
    }

    /// A checkpoint file of the whole state that restores alone, after which
    /// [`Engine::checkpoint`] goes on from here: it replaces the chain of files before it.
    pub fn full_checkpoint(&mut self) -> (Vec<u8>, Extent) {
        self.take_checkpoint(false)
    }

    /// A checkpoint file, after which the next incremental one holds only what changes.
    fn take_checkpoint(&mut self, changes_only: bool) -> (Vec<u8>, Extent) {
        let bytes = self.encode(changes_only);
        let extent = self.extent(changes_only);
        for s in &mut self.shards {
            s.mark_written();
        }
        (bytes, extent)
    }

    fn encode(&self, changes_only: bool) -> Vec<u8> {
        let mut e = snapshot::Encoder::default();
        self.mapper.encode(&mut e);
        // Each shard's part length-prefixed, so that a restore splits files without decoding.
        let mut part = snapshot::Encoder::default();
        for s in &self.shards {
            part.buf.clear();
            s.encode(&mut part, changes_only);
            e.bytes(&part.buf);
        }
        e.finish()
    }

    fn extent(&self, changes_only: bool) -> Extent {
        self.shards.iter().fold(Extent::default(), |x, s| {
            let (time, minute) = s.extent(changes_only);
            Extent { max_time: x.max_time.max(time), max_minute: x.max_minute.max(minute) }
        })
    }

    /// Whether restoring the current state still needs a checkpoint file of this extent: some
    /// of its dedup entries are not expired or some of its windows not evicted.
    pub fn retains(&self, extent: Extent) -> bool {
        let watermark = self.mapper.watermark();
        let lateness = self.mapper.config().allowed_lateness_ms;
        let expired_below = self.shards.iter().map(|s| s.expired_below()).min();
        extent.max_time.is_some_and(|t| expired_below.is_none_or(|b| t >= b))
            || extent.max_minute.is_some_and(|m| !watermark.is_too_late(m, lateness))
    }

    /// Every row and final top-N list of the minutes that can still change (not yet more than
    /// `allowed_lateness` behind the watermark): what the store keeps in memory until they can't.
    pub fn unsealed(&self) -> (CountUpdates, Vec<TopUpdate>) {
        let mut out = CountUpdates::new(self.mapper.slots());
        for s in &self.shards {
            s.rows(&mut out);
        }
        (out, self.reducer.tops())
    }

    /// Bytes of deduplication state held in memory, across shards.
    pub fn dedup_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.dedup_bytes()).sum()
    }

    /// Rebuilds an engine from [`Engine::snapshot`] bytes. The shard count and the filter ids
    /// must be those the snapshot was taken with.
    pub fn restore(
        config: EngineConfig,
        filters: Arc<Filters>,
        bytes: &[u8],
    ) -> Result<Engine, SnapshotError> {
        Engine::restore_chain(config, filters, &[bytes])
    }

    /// Rebuilds an engine from checkpoint files, oldest first: the newest gives the small state,
    /// each adds the window rows and dedup entries it changed. Files are checked and decoded in
    /// parallel, per file and per shard.
    pub fn restore_chain(
        config: EngineConfig,
        filters: Arc<Filters>,
        files: &[&[u8]],
    ) -> Result<Engine, SnapshotError> {
        use rayon::prelude::*;
        let mut engine =
            Engine::new(config.clone(), filters.clone()).map_err(|e| SnapshotError::Mismatch {
                what: "configuration",
                found: String::new(),
                configured: e.to_string(),
            })?;
        let Some(newest) = files.len().checked_sub(1) else {
            return Err(SnapshotError::Corrupt("no checkpoint files"));
        };
        // Each file checked (frame, settings) and split into its shards' parts.
        let shards = engine.shards.len();
        let parts: Vec<(Vec<&[u8]>, u16)> = files
            .par_iter()
            .map(|bytes| {
                let mut d = snapshot::Decoder::open(bytes)?;
                Mapper::new(config.clone(), filters.clone()).decode(&mut d)?;
                let parts = (0..shards).map(|_| d.bytes()).collect::<Result<Vec<_>, _>>()?;
                let version = d.version();
                d.finish()?;
                Ok((parts, version))
            })
            .collect::<Result<_, SnapshotError>>()?;
        let mut d = snapshot::Decoder::open(files[newest])?;
        engine.mapper.decode(&mut d)?;
        let watermark = engine.mapper.watermark();
        engine.shards.par_iter_mut().enumerate().try_for_each(|(i, shard)| {
            let mut dedup = Vec::with_capacity(parts.len());
            for (f, (file, version)) in parts.iter().enumerate() {
                let mut d = snapshot::Decoder::raw(file[i]);
                dedup.push(shard.decode(&mut d, f == newest, watermark, *version)?);
                d.finish()?;
            }
            shard.finish_restore(watermark, &dedup)
        })?;
        let tops = engine.shards.iter().map(|s| s.final_tops()).collect();
        engine.reducer.restore(watermark, tops);
        Ok(engine)
    }
}

/// How long a checkpoint file matters: the newest dedup time and window minute it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extent {
    pub max_time: Option<i64>,
    pub max_minute: Option<Minute>,
}

#[cfg(test)]
mod tests;
