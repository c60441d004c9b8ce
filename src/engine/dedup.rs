//! Deduplication state of one shard (SPEC §2): the identities of counted clicks with their event
//! times, expired by the watermark so that memory is bounded by the horizon, not by history.
//!
//! A click is a duplicate when a click with the same [`Identity`] was counted earlier (in log
//! order) with an event time within `dedup_horizon` of its own (|Δ| ≤ horizon). Identities are
//! 128-bit hashes, so the table hashes them by their low 64 bits without rehashing.
//!
//! ```text
//!  insert(id, t) ──▶ seen: id → t (one probe; the rare ids counted twice keep their times in many)
//!                └─▶ buckets[minute of t]: (id, t) in insertion order
//!                        │ expiry: whole minutes leave, each entry removed from seen once
//!                        └ checkpoint: the entries after `written`, each written once
//! ```
//!
//! Expiry: once the watermark is `W`, no click earlier than `W − allowed_lateness − 1 min` can be
//! counted any more (it would be too late), so a stored time `t` that is more than the horizon
//! before that bound can never match again. Whole minute buckets below that bound are dropped;
//! no sweep over the table. Lookups keep one probe of one table: probing a table per minute of
//! the horizon instead measured slower (see the README's engine benchmark).

use std::collections::BTreeMap;
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

/// Marks an identity whose times live in `Dedup::many`.
const MANY: i64 = i64::MIN;

/// Entries per block of a bucket at most: big buckets grow without copying.
const BLOCK: usize = 1 << 16;

/// A counted click: identity (as two halves, so an entry is 24 bytes) and event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    lo: u64,
    hi: u64,
    t: i64,
}

impl Entry {
    fn id(&self) -> u128 {
        (self.hi as u128) << 64 | self.lo as u128
    }
}

/// The counted clicks of one event minute, in insertion order, in blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Bucket {
    blocks: Vec<Vec<Entry>>,
    len: usize,
    /// Entries before this one are in a checkpoint file already.
    written: usize,
}

impl Bucket {
    fn push(&mut self, e: Entry) {
        match self.blocks.last_mut() {
            Some(b) if b.len() < b.capacity() => b.push(e),
            last => {
                // Blocks double up to BLOCK: small buckets stay small.
                let cap = last.map_or(64, |b| (b.capacity() * 2).min(BLOCK));
                let mut b = Vec::with_capacity(cap);
                b.push(e);
                self.blocks.push(b);
            }
        }
        self.len += 1;
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.blocks.iter().flatten()
    }

    fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.capacity() * std::mem::size_of::<Entry>()).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedup {
    horizon_ms: i64,
    /// Identity → the event time of its counted click: 32-byte entries, the hot table.
    seen: HashMap<u128, i64, BuildHasherDefault<IdentityHasher>>,
    /// The rare identities counted more than once (copies further apart than the horizon).
    many: HashMap<u128, Vec<i64>, BuildHasherDefault<IdentityHasher>>,
    /// Event minute → its counted clicks.
    buckets: BTreeMap<i64, Bucket>,
    /// Times below this (a minute boundary) have been dropped.
    expired_below: i64,
}

impl Dedup {
    pub fn new(horizon_ms: i64, capacity: usize) -> Self {
        Dedup {
            horizon_ms,
            seen: HashMap::with_capacity_and_hasher(capacity, Default::default()),
            many: HashMap::default(),
            buckets: BTreeMap::new(),
            expired_below: i64::MIN,
        }
    }

    /// Records a click; true when it is new (to be counted), false for a duplicate.
    pub fn insert(&mut self, id: Identity, t: i64) -> bool {
        let h = self.horizon_ms;
        match self.seen.entry(id.0) {
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
        self.bucket(t).push(Entry { lo: id.0 as u64, hi: (id.0 >> 64) as u64, t });
        true
    }

    fn bucket(&mut self, t: i64) -> &mut Bucket {
        self.buckets.entry(t.div_euclid(MINUTE_MS)).or_default()
    }

    /// Records a click counted before (restoring a checkpoint), whatever the table holds.
    fn record(&mut self, id: u128, t: i64) {
        match self.seen.entry(id) {
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
        let b = self.bucket(t);
        b.push(Entry { lo: id as u64, hi: (id >> 64) as u64, t });
        b.written = b.len;
    }

    /// Forgets one counted click (its minute expired).
    fn forget(&mut self, id: u128, t: i64) {
        let Some(s) = self.seen.get(&id).copied() else { return };
        if s != MANY {
            if s == t {
                self.seen.remove(&id);
            }
            return;
        }
        let times = self.many.get_mut(&id).expect("MANY entries have times");
        if let Some(i) = times.iter().position(|&s| s == t) {
            times.swap_remove(i);
        }
        match times.len() {
            0 => {
                self.many.remove(&id);
                self.seen.remove(&id);
            }
            1 => {
                let last = times[0];
                self.many.remove(&id);
                self.seen.insert(id, last);
            }
            _ => {}
        }
    }

    /// Drops what can no longer match, given that no click before `oldest_countable` will be
    /// counted again: every minute bucket wholly below `oldest_countable − horizon`.
    pub fn expire(&mut self, oldest_countable: i64) {
        let drop_below =
            oldest_countable.saturating_sub(self.horizon_ms).div_euclid(MINUTE_MS) * MINUTE_MS;
        self.expire_below(drop_below);
    }

    fn expire_below(&mut self, drop_below: i64) {
        if drop_below <= self.expired_below {
            return;
        }
        self.expired_below = drop_below;
        while let Some(entry) = self.buckets.first_entry() {
            if *entry.key() >= drop_below.div_euclid(MINUTE_MS) {
                break;
            }
            let bucket = entry.remove();
            for e in bucket.entries() {
                self.forget(e.id(), e.t);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn expired_below(&self) -> i64 {
        self.expired_below
    }

    /// Bytes the state holds in memory (tables and buckets, by capacity).
    pub fn bytes(&self) -> usize {
        let table = self.seen.capacity() * (std::mem::size_of::<(u128, i64)>() + 1);
        let many = self.many.capacity() * (std::mem::size_of::<(u128, Vec<i64>)>() + 1)
            + self.many.values().map(|v| v.capacity() * 8).sum::<usize>();
        table + many + self.buckets.values().map(Bucket::bytes).sum::<usize>()
    }

    /// The largest event time of the entries [`Dedup::encode`] writes, if any.
    pub fn max_time(&self, changes_only: bool) -> Option<i64> {
        self.buckets
            .values()
            .rev()
            .filter(|b| !changes_only || b.written < b.len)
            .flat_map(|b| b.entries().skip(if changes_only { b.written } else { 0 }))
            .map(|e| e.t)
            .max()
    }

    /// Layout: `expired_below` i, bucket count u, then per bucket: minute i, entry count u, per
    /// entry: identity (16 bytes LE) and time − minute start u. With `changes_only`, only the
    /// entries no checkpoint has written yet.
    pub fn encode(&self, e: &mut Encoder, changes_only: bool) {
        e.i(self.expired_below);
        let skip = |b: &Bucket| if changes_only { b.written } else { 0 };
        let buckets: Vec<_> = self.buckets.iter().filter(|(_, b)| b.len > skip(b)).collect();
        e.u(buckets.len() as u64);
        for (&minute, b) in buckets {
            e.i(minute);
            e.u((b.len - skip(b)) as u64);
            for entry in b.entries().skip(skip(b)) {
                e.u128(entry.id());
                e.u((entry.t - minute * MINUTE_MS) as u64);
            }
        }
    }

    /// Everything so far is in a checkpoint file.
    pub fn mark_written(&mut self) {
        for b in self.buckets.values_mut() {
            b.written = b.len;
        }
    }

    /// Adds the entries of one [`Dedup::encode`]d part; `expired_below` is taken from the
    /// newest (`base`) one. Call [`Dedup::finish_restore`] after the last.
    pub fn decode(&mut self, d: &mut Decoder, base: bool) -> Result<(), SnapshotError> {
        let expired_below = d.i()?;
        if base {
            self.expired_below = expired_below;
        }
        for _ in 0..d.count()? {
            let minute = d.i()?;
            let start = minute.checked_mul(MINUTE_MS).ok_or(SnapshotError::Corrupt("minute"))?;
            for _ in 0..d.count()? {
                let id = d.u128()?;
                let t = i64::try_from(d.u()?)
                    .ok()
                    .filter(|&o| o < MINUTE_MS)
                    .ok_or(SnapshotError::Corrupt("dedup time"))?;
                self.record(id, start + t);
            }
        }
        Ok(())
    }

    /// Drops what older parts held that had expired by the newest.
    pub fn finish_restore(&mut self) {
        let below = self.expired_below;
        self.expired_below = i64::MIN;
        self.expire_below(below);
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
}
