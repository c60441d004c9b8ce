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

/// The counted event times of one identity: almost always exactly one.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Times {
    One(i64),
    Many(Vec<i64>),
}

impl Times {
    fn as_slice(&self) -> &[i64] {
        match self {
            Times::One(t) => std::slice::from_ref(t),
            Times::Many(v) => v,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedup {
    horizon_ms: i64,
    seen: HashMap<u128, Times, BuildHasherDefault<IdentityHasher>>,
    /// Times at or below this have been dropped.
    expired_below: i64,
}

impl Dedup {
    pub fn new(horizon_ms: i64) -> Self {
        Dedup {
            horizon_ms,
            seen: HashMap::default(),
            expired_below: i64::MIN,
        }
    }

    /// Records a click; true when it is new (to be counted), false for a duplicate.
    pub fn insert(&mut self, id: Identity, t: i64) -> bool {
        let h = self.horizon_ms;
        match self.seen.entry(id.0) {
            hashbrown::hash_map::Entry::Vacant(v) => {
                v.insert(Times::One(t));
                true
            }
            hashbrown::hash_map::Entry::Occupied(mut o) => {
                if o.get().as_slice().iter().any(|&s| (s - t).abs() <= h) {
                    return false;
                }
                let times = o.get_mut();
                match times {
                    Times::One(s) => *times = Times::Many(vec![*s, t]),
                    Times::Many(v) => v.push(t),
                }
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
        self.seen.retain(|_, times| match times {
            Times::One(t) => *t >= drop_below,
            Times::Many(v) => {
                v.retain(|&t| t >= drop_below);
                !v.is_empty()
            }
        });
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Layout: `expired_below` i, entry count u, then per entry: identity (16 bytes LE), time count
    /// u, times i.
    pub fn encode(&self, e: &mut Encoder) {
        e.i(self.expired_below);
        e.u(self.seen.len() as u64);
        for (id, times) in &self.seen {
            e.u128(*id);
            let ts = times.as_slice();
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
            let times = match d.count()? {
                0 => return Err(SnapshotError::Corrupt("dedup entry without times")),
                1 => Times::One(d.i()?),
                k => Times::Many((0..k).map(|_| d.i()).collect::<Result<_, _>>()?),
            };
            self.seen.insert(id, times);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizon_is_inclusive_and_expiry_forgets() {
        let mut d = Dedup::new(600_000);
        let id = Identity(42);
        assert!(d.insert(id, 0));
        assert!(!d.insert(id, 0));
        assert!(
            !d.insert(id, 600_000),
            "exactly the horizon apart is a duplicate"
        );
        assert!(d.insert(id, 600_001), "beyond the horizon counts again");
        assert!(
            !d.insert(id, 300_000),
            "within the horizon of both counted copies"
        );
        assert!(d.insert(Identity(43), 0));
        d.expire(600_000 + 60_000);
        assert_eq!(
            d.len(),
            1,
            "identity 43 (t=0) can no longer match a countable click"
        );
        assert!(!d.insert(id, 600_001));
    }
}
