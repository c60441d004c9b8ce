//! Deduplication state of one shard (SPEC §2): the identities of counted clicks with their event
//! times, expired by the watermark so that memory is bounded by the horizon, not by history.
//!
//! A click is a duplicate when a click with the same [`Identity`] was counted earlier (in log
//! order) with an event time within `dedup_horizon` of its own (|Δ| ≤ horizon). Identities are
//! 128-bit hashes, so the table hashes them by their low 64 bits without rehashing.
//!
//! ```text
//!  insert(id, t) ──▶ seen: id → t (one probe; the rare ids counted twice keep their times in many)
//!                └─▶ fresh: (id, t), the clicks counted since the last checkpoint, which writes
//!                    them (each once) and empties it
//! ```
//!
//! The table is split into [`TABLES`] sub-tables by the identity's high bits: each grows (doubles
//! and rehashes) on its own, a 1/256 share of the work at a time, spread over the seconds in
//! which the sub-tables cross their thresholds, instead of one rehash of every identity that
//! stalls the shard for seconds at the chapter's peak.
//!
//! Expiry: once the watermark is `W`, no click earlier than `W − allowed_lateness − 1 min` can be
//! counted any more (it would be too late), so a stored time `t` that is more than the horizon
//! before that bound can never match again and is dropped. Expiry sweeps the table once per
//! minute of watermark progress. One table probed once per click measured faster than tables per
//! event minute (probed over the horizon, dropped whole) and than per-minute lists of entries
//! beside the table (removed entry by entry): see the README's engine benchmark.

use std::hash::{BuildHasherDefault, Hasher};

use hashbrown::HashMap;

use crate::event::{Identity, MINUTE_MS};

use super::snapshot::{Decoder, Encoder, SnapshotError};

/// Hashes an already-uniform 128-bit identity by taking its low 64 bits.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// Sub-tables of `seen`, chosen by the top bits of the identity's high half (the low half is the
/// hash inside a table, so its bits stay independent of the choice).
const TABLES: usize = 256;

type Table<V> = HashMap<u128, V, BuildHasherDefault<IdentityHasher>>;

fn table_of(id: u128) -> usize {
    ((id >> 64) as u64 >> (64 - TABLES.trailing_zeros())) as usize
}

/// Marks an identity whose times live in `Dedup::many`.
const MANY: i64 = i64::MIN;

/// A counted click: identity (as two halves, so an entry is 24 bytes) and event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    lo: u64,
    hi: u64,
    t: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedup {
    horizon_ms: i64,
    /// Identity → the event time of its counted click: 32-byte entries, the hot tables.
    seen: Vec<Table<i64>>,
    /// The rare identities counted more than once (copies further apart than the horizon).
    many: Table<Vec<i64>>,
    /// Clicks counted since the last checkpoint, in order.
    fresh: Vec<Entry>,
    /// Times below this have been dropped.
    expired_below: i64,
    /// While restoring: the decoded entries by sub-table, in file order, inserted by
    /// [`Dedup::finish_restore`] one sub-table at a time (a table in cache, not random writes
    /// over all of them).
    staged: Vec<Vec<(u128, i64)>>,
}

impl Dedup {
    pub fn new(horizon_ms: i64, capacity: usize) -> Self {
        Dedup {
            horizon_ms,
            seen: (0..TABLES)
                .map(|_| HashMap::with_capacity_and_hasher(capacity / TABLES, Default::default()))
                .collect(),
            many: HashMap::default(),
            // Reserved like the table (untouched pages cost nothing): no copies as it grows.
            fresh: Vec::with_capacity(capacity),
            expired_below: i64::MIN,
            staged: Vec::new(),
        }
    }

    /// Records a click; true when it is new (to be counted), false for a duplicate.
    pub fn insert(&mut self, id: Identity, t: i64) -> bool {
        let h = self.horizon_ms;
        match self.seen[table_of(id.0)].entry(id.0) {
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert(t);
            }
            hashbrown::hash_map::Entry::Occupied(mut o) => {
                let s = *o.get();
                if s != MANY {
                    if (s - t).abs() <= h {
                        return false;
                    }
                    o.insert(MANY);
                    self.many.insert(id.0, vec![s, t]);
                } else {
                    let times = self.many.get_mut(&id.0).expect("MANY entries have times");
                    if times.iter().any(|&s| (s - t).abs() <= h) {
                        return false;
                    }
                    times.push(t);
                }
            }
        }
        self.fresh.push(Entry { lo: id.0 as u64, hi: (id.0 >> 64) as u64, t });
        true
    }

    /// Records a click counted before (restoring a checkpoint), whatever the table holds.
    fn record(&mut self, id: u128, t: i64) {
        match self.seen[table_of(id)].entry(id) {
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert(t);
            }
            hashbrown::hash_map::Entry::Occupied(mut o) => {
                let s = *o.get();
                if s == MANY {
                    self.many.get_mut(&id).expect("MANY entries have times").push(t);
                } else {
                    o.insert(MANY);
                    self.many.insert(id, vec![s, t]);
                }
            }
        }
    }

    /// Drops what can no longer match, given that no click before `oldest_countable` will be
    /// counted again. Sweeps only when the bound has moved by a minute or more.
    pub fn expire(&mut self, oldest_countable: i64) {
        let drop_below = oldest_countable.saturating_sub(self.horizon_ms);
        if drop_below < self.expired_below.saturating_add(MINUTE_MS) {
            return;
        }
        self.expire_below(drop_below);
    }

    fn expire_below(&mut self, drop_below: i64) {
        self.expired_below = drop_below;
        // An identity left with one time goes back to a plain entry, as if counted once: the
        // state depends only on the times held, so a restore that skips expired entries
        // rebuilds it exactly.
        let mut single = Vec::new();
        self.many.retain(|&id, v| {
            v.retain(|&t| t >= drop_below);
            match v[..] {
                [] => false,
                [t] => {
                    single.push((id, t));
                    false
                }
                _ => true,
            }
        });
        let many = &self.many;
        for table in &mut self.seen {
            table.retain(|id, t| if *t == MANY { many.contains_key(id) } else { *t >= drop_below });
        }
        for (id, t) in single {
            self.seen[table_of(id)].insert(id, t);
        }
    }

    pub fn len(&self) -> usize {
        self.seen.iter().map(HashMap::len).sum()
    }

    pub fn expired_below(&self) -> i64 {
        self.expired_below
    }

    /// Bytes the state holds in memory (by capacity).
    pub fn bytes(&self) -> usize {
        let table = self.seen.iter().map(HashMap::capacity).sum::<usize>()
            * (std::mem::size_of::<(u128, i64)>() + 1);
        let many = self.many.capacity() * (std::mem::size_of::<(u128, Vec<i64>)>() + 1)
            + self.many.values().map(|v| v.capacity() * 8).sum::<usize>();
        table + many + self.fresh.capacity() * std::mem::size_of::<Entry>()
    }

    /// Every (identity, time) held, or with `changes_only` those counted since the last checkpoint.
    fn entries(&self, changes_only: bool) -> Box<dyn Iterator<Item = (u128, i64)> + '_> {
        if changes_only {
            return Box::new(self.fresh.iter().map(|e| ((e.hi as u128) << 64 | e.lo as u128, e.t)));
        }
        Box::new(self.seen.iter().flatten().flat_map(|(&id, t)| {
            let times: &[i64] = if *t == MANY { &self.many[&id] } else { std::slice::from_ref(t) };
            times.iter().map(move |&t| (id, t))
        }))
    }

    /// The largest event time [`Dedup::encode`] writes, if any.
    pub fn max_time(&self, changes_only: bool) -> Option<i64> {
        self.entries(changes_only).map(|(_, t)| t).max()
    }

    /// Layout: `expired_below` i, entry count u, per entry: identity (16 bytes LE) and the time as
    /// the difference from the previous entry's i (clicks come nearly in time order). With
    /// `changes_only`, the clicks counted since the last checkpoint ([`Dedup::mark_written`]).
    pub fn encode(&self, e: &mut Encoder, changes_only: bool) {
        e.i(self.expired_below);
        let n = if changes_only {
            self.fresh.len()
        } else {
            self.seen.iter().flat_map(|t| t.values()).filter(|&&t| t != MANY).count()
                + self.many.values().map(Vec::len).sum::<usize>()
        };
        e.u(n as u64);
        let mut previous = 0i64;
        for (id, t) in self.entries(changes_only) {
            e.u128(id);
            e.i(t.wrapping_sub(previous));
            previous = t;
        }
    }

    /// Everything so far is in a checkpoint file.
    pub fn mark_written(&mut self) {
        self.fresh.clear();
    }

    /// Adds the entries of one [`Dedup::encode`]d part; `expired_below` is taken from the
    /// newest (`base`) one. Call [`Dedup::finish_restore`] after the last.
    pub fn decode(&mut self, d: &mut Decoder, base: bool) -> Result<(), SnapshotError> {
        let expired_below = d.i()?;
        if base {
            self.expired_below = expired_below;
        }
        let n = d.count()?;
        if self.staged.is_empty() {
            self.staged = (0..TABLES).map(|_| Vec::new()).collect();
        }
        let share = n / TABLES + n / TABLES / 8 + 16;
        for bucket in &mut self.staged {
            bucket.reserve(share);
        }
        let mut previous = 0i64;
        for _ in 0..n {
            let id = d.u128()?;
            let t = previous.wrapping_add(d.i()?);
            if t == MANY {
                return Err(SnapshotError::Corrupt("dedup time out of range"));
            }
            previous = t;
            self.staged[table_of(id)].push((id, t));
        }
        Ok(())
    }

    /// Builds the tables from the decoded parts, without what had expired by the newest: each
    /// sub-table sized once and filled from its own entries, whose memory is freed as it goes.
    pub fn finish_restore(&mut self) {
        let below = self.expired_below;
        for (i, bucket) in std::mem::take(&mut self.staged).into_iter().enumerate() {
            let keep = bucket.iter().filter(|(_, t)| *t >= below).count();
            self.seen[i].reserve(keep);
            for (id, t) in bucket {
                if t >= below {
                    self.record(id, t);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizon_is_inclusive_and_expiry_forgets() {
        let mut d = Dedup::new(600_000, 0);
        let id = Identity(42);
        assert!(d.insert(id, 0));
        assert!(!d.insert(id, 0));
        assert!(!d.insert(id, 600_000), "exactly the horizon apart is a duplicate");
        assert!(d.insert(id, 600_001), "beyond the horizon counts again");
        assert!(!d.insert(id, 300_000), "within the horizon of both counted copies");
        assert!(d.insert(Identity(43), 0));
        d.expire(600_000 + 60_000);
        assert_eq!(d.len(), 1, "identity 43 (t=0) can no longer match a countable click");
        assert!(!d.insert(id, 600_001));
    }

    /// What a run does to the state: a click, the watermark's bound moving, or a checkpoint.
    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, i64),
        Expire(i64),
        Checkpoint,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0..12u8, 0..40 * MINUTE_MS).prop_map(|(k, t)| Op::Insert(k, t)),
            1 => (0..40 * MINUTE_MS).prop_map(Op::Expire),
            1 => Just(Op::Checkpoint),
        ]
    }

    proptest::proptest! {
        /// Restoring every checkpoint part of a run (the staged, pre-filtered path) gives the
        /// state the run holds, identities counted many times and collapsed by expiry included.
        #[test]
        fn restoring_the_parts_of_a_run_gives_its_state(
            ops in proptest::collection::vec(op(), 0..200)
        ) {
            // Spread over the sub-tables, with several identities per table.
            let id = |k: u8| Identity((k as u128 % 6).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) ^ (k as u128 / 6));
            let mut run = Dedup::new(5 * MINUTE_MS, 0);
            let mut parts = Vec::new();
            let checkpoint = |run: &mut Dedup| {
                let mut e = Encoder::default();
                run.encode(&mut e, true);
                run.mark_written();
                e.buf
            };
            for op in ops {
                match op {
                    Op::Insert(k, t) => {
                        let expired = t < run.expired_below();
                        if !expired {
                            run.insert(id(k), t);
                        }
                    }
                    Op::Expire(bound) => run.expire(bound.max(run.expired_below() + 5 * MINUTE_MS)),
                    Op::Checkpoint => parts.push(checkpoint(&mut run)),
                }
            }
            parts.push(checkpoint(&mut run));
            let mut restored = Dedup::new(5 * MINUTE_MS, 0);
            for (i, part) in parts.iter().enumerate() {
                let mut d = Decoder::raw(part);
                restored.decode(&mut d, i + 1 == parts.len()).unwrap();
                d.finish().unwrap();
            }
            restored.finish_restore();
            proptest::prop_assert_eq!(restored, run);
        }
    }
}
