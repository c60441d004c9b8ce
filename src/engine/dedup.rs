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
//! beside the table (removed entry by entry): see docs/benchmarks.md, the engine.

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

    /// Layout (version 5): `expired_below` i, then per sub-table its entry count u and byte
    /// length u, then each sub-table's entries: identity (16 bytes LE) and the time as the
    /// difference from the previous entry's i (clicks come nearly in time order). Grouped so that
    /// a restore builds one table at a time from every file. With `changes_only`, the clicks
    /// counted since the last checkpoint ([`Dedup::mark_written`]), in order within each table.
    pub fn encode(&self, e: &mut Encoder, changes_only: bool) {
        let mut groups: Vec<(usize, i64, Encoder)> =
            (0..TABLES).map(|_| (0, 0, Encoder::default())).collect();
        for (id, t) in self.entries(changes_only) {
            let (n, previous, g) = &mut groups[table_of(id)];
            g.u128(id);
            g.i(t.wrapping_sub(*previous));
            *previous = t;
            *n += 1;
        }
        e.i(self.expired_below);
        for (n, _, g) in &groups {
            e.u(*n as u64);
            e.u(g.buf.len() as u64);
        }
        for (_, _, g) in &groups {
            e.buf.extend_from_slice(&g.buf);
        }
    }

    /// Everything so far is in a checkpoint file.
    pub fn mark_written(&mut self) {
        self.fresh.clear();
    }

    /// Rebuilds the state from the encoded parts of a checkpoint's files, oldest first (times
    /// and counts repeat in log order); `expired_below` is the newest's, and entries below it
    /// are skipped. Each sub-table is sized once and filled from every part in turn: one table
    /// in cache at a time, instead of random writes over GiBs.
    pub fn restore(&mut self, parts: &[DedupPart<'_>]) -> Result<(), SnapshotError> {
        let Some(newest) = parts.last() else { return Ok(()) };
        self.expired_below = newest.expired_below;
        let below = self.expired_below;
        for i in 0..TABLES {
            self.seen[i].reserve(parts.iter().map(|p| p.groups[i].0).sum());
            for part in parts {
                let (n, range) = part.groups[i].clone();
                let mut d = Decoder::raw(&part.body[range]);
                let mut previous = 0i64;
                for _ in 0..n {
                    let id = d.u128()?;
                    let t = previous.wrapping_add(d.i()?);
                    if t == MANY || table_of(id) != i {
                        return Err(SnapshotError::Corrupt("dedup entry out of range"));
                    }
                    previous = t;
                    if t >= below {
                        self.record(id, t);
                    }
                }
                d.finish()?;
            }
        }
        Ok(())
    }
}

/// One file's dedup entries, located by sub-table (see [`Dedup::encode`]).
pub struct DedupPart<'a> {
    expired_below: i64,
    body: std::borrow::Cow<'a, [u8]>,
    /// Per sub-table: entry count and byte range in `body`.
    groups: Vec<(usize, std::ops::Range<usize>)>,
}

impl<'a> DedupPart<'a> {
    /// Reads the part at `d` (the rest of a shard's part), written in layout `version`.
    pub fn read(d: &mut Decoder<'a>, version: u16) -> Result<DedupPart<'a>, SnapshotError> {
        if version < 5 {
            return DedupPart::regroup(d);
        }
        let expired_below = d.i()?;
        let mut groups = Vec::with_capacity(TABLES);
        let mut at = 0usize;
        for _ in 0..TABLES {
            let (n, len) = (d.count()?, d.count()?);
            let end = at.checked_add(len).ok_or(SnapshotError::Corrupt("dedup group length"))?;
            groups.push((n, at..end));
            at = end;
        }
        let body = d.take(at)?;
        Ok(DedupPart { expired_below, body: body.into(), groups })
    }

    /// Layouts 3 and 4 (entry count, then every entry in log order), grouped as 5 is.
    fn regroup(d: &mut Decoder<'a>) -> Result<DedupPart<'a>, SnapshotError> {
        let mut dedup = Dedup::new(0, 0);
        dedup.expired_below = d.i()?;
        let mut previous = 0i64;
        for _ in 0..d.count()? {
            let id = d.u128()?;
            let t = previous.wrapping_add(d.i()?);
            if t == MANY {
                return Err(SnapshotError::Corrupt("dedup time out of range"));
            }
            previous = t;
            dedup.fresh.push(Entry { lo: id as u64, hi: (id >> 64) as u64, t });
        }
        let mut e = Encoder::default();
        dedup.encode(&mut e, true);
        let mut d = Decoder::raw(&e.buf);
        let part = DedupPart::read(&mut d, 5)?;
        Ok(DedupPart { body: part.body.into_owned().into(), ..part })
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
        /// Restoring every checkpoint part of a run gives the state the run holds, identities
        /// counted many times and collapsed by expiry included, from both layouts.
        #[test]
        fn restoring_the_parts_of_a_run_gives_its_state(
            ops in proptest::collection::vec(op(), 0..200),
            legacy: bool,
        ) {
            // Spread over the sub-tables, with several identities per table.
            let id = |k: u8| Identity((k as u128 % 6).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) ^ (k as u128 / 6));
            let mut run = Dedup::new(5 * MINUTE_MS, 0);
            let mut parts = Vec::new();
            // Each checkpoint's part, in this build's layout or in that of version 4 (every
            // entry in log order) that restores still read.
            let checkpoint = |run: &mut Dedup| {
                let mut e = Encoder::default();
                if legacy {
                    e.i(run.expired_below);
                    e.u(run.fresh.len() as u64);
                    let mut previous = 0i64;
                    for entry in &run.fresh {
                        e.u128((entry.hi as u128) << 64 | entry.lo as u128);
                        e.i(entry.t - previous);
                        previous = entry.t;
                    }
                } else {
                    run.encode(&mut e, true);
                }
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
            let mut decoders: Vec<Decoder> = parts.iter().map(|p| Decoder::raw(p)).collect();
            let read: Vec<DedupPart> = decoders
                .iter_mut()
                .map(|d| DedupPart::read(d, if legacy { 4 } else { 5 }).unwrap())
                .collect();
            assert!(decoders.into_iter().all(|d| d.finish().is_ok()));
            let mut restored = Dedup::new(5 * MINUTE_MS, 0);
            restored.restore(&read).unwrap();
            proptest::prop_assert_eq!(restored, run);
        }
    }
}
