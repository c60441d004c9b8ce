//! Deduplication state of one shard (SPEC §2): the identities of counted clicks with their event
//! times, expired by the watermark so that memory is bounded by the horizon, not by history.
//!
//! A click is a duplicate when a click with the same [`Identity`] was counted earlier (in log
//! order) with an event time within `dedup_horizon` of its own (|Δ| ≤ horizon). Identities are
//! 128-bit hashes, so the table hashes them by their low 64 bits without rehashing.
//!
//! Expiry: once the watermark is `W`, no click earlier than `W − allowed_lateness − 1 min` can be
//! counted any more (it would be too late), so a stored time `t` that is more than the horizon
//! before that bound can never match again and is dropped. Expiry sweeps the table once per
//! minute of watermark progress; each entry is visited about horizon/1 min times in its life.

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedup {
    horizon_ms: i64,
    /// Identity → the event time of its counted click: 32-byte entries, the hot table.
    seen: HashMap<u128, i64, BuildHasherDefault<IdentityHasher>>,
    /// The rare identities counted more than once (copies further apart than the horizon).
    many: HashMap<u128, Vec<i64>, BuildHasherDefault<IdentityHasher>>,
    /// Times below this have been dropped.
    expired_below: i64,
}

impl Dedup {
    pub fn new(horizon_ms: i64, capacity: usize) -> Self {
        Dedup {
            horizon_ms,
            seen: HashMap::with_capacity_and_hasher(capacity, Default::default()),
            many: HashMap::default(),
            expired_below: i64::MIN,
        }
    }

    /// Records a click; true when it is new (to be counted), false for a duplicate.
    pub fn insert(&mut self, id: Identity, t: i64) -> bool {
        let h = self.horizon_ms;
        match self.seen.entry(id.0) {
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert(t);
                true
            }
            hashbrown::hash_map::Entry::Occupied(mut o) => {
                let s = *o.get();
                if s != MANY {
                    if (s - t).abs() <= h {
                        return false;
                    }
                    o.insert(MANY);
                    self.many.insert(id.0, vec![s, t]);
                    return true;
                }
                let times = self.many.get_mut(&id.0).expect("MANY entries have times");
                if times.iter().any(|&s| (s - t).abs() <= h) {
                    return false;
                }
                times.push(t);
                true
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
        self.expired_below = drop_below;
        self.many.retain(|_, v| {
            v.retain(|&t| t >= drop_below);
            !v.is_empty()
        });
        let many = &self.many;
        self.seen.retain(|id, t| if *t == MANY { many.contains_key(id) } else { *t >= drop_below });
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    fn times(&self, id: u128, t: i64) -> &[i64] {
        if t == MANY {
            &self.many[&id]
        } else {
            std::slice::from_ref(self.seen.get(&id).expect("listed identities are present"))
        }
    }

    /// Layout: `expired_below` i, entry count u, then per entry: identity (16 bytes LE), time count
    /// u, times i.
    pub fn encode(&self, e: &mut Encoder) {
        e.i(self.expired_below);
        e.u(self.seen.len() as u64);
        for (&id, &t) in &self.seen {
            e.u128(id);
            let ts = self.times(id, t);
            e.u(ts.len() as u64);
            for &t in ts {
                e.i(t);
            }
        }
    }

    pub fn decode(&mut self, d: &mut Decoder) -> Result<(), SnapshotError> {
        self.expired_below = d.i()?;
        let n = d.count()?;
        self.seen.reserve(n);
        for _ in 0..n {
            let id = d.u128()?;
            match d.count()? {
                0 => return Err(SnapshotError::Corrupt("dedup entry without times")),
                1 => {
                    let t = d.i()?;
                    if t == MANY {
                        return Err(SnapshotError::Corrupt("dedup time out of range"));
                    }
                    self.seen.insert(id, t);
                }
                k => {
                    let times = (0..k).map(|_| d.i()).collect::<Result<_, _>>()?;
                    self.seen.insert(id, MANY);
                    self.many.insert(id, times);
                }
            }
        }
        Ok(())
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
