//! The popular-ads index of recent minutes as queries share it with the aggregator: one
//! [`Popular`] per slot and the watermark of the same commits, so that an answer's `final`
//! matches its counts.
//!
//! ```text
//!  aggregator commit ──publish(Published)──▶ pending (short lock) ──▶ applied when the index
//!  recalculation ──replace(rows)───────────▶     is free, or by the next query before it reads
//!  start: rebuilding ── install(index read from the store) ──▶ every pending change, in order
//! ```
//!
//! Publishing never waits for a query. Changes carry absolute counts, so applying one again, in
//! order, after a newer read of the store leaves the same index. No I/O: the service fills it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::Popular;
use crate::engine::{CountUpdates, Watermark};
use crate::event::{AdId, Minute};

/// What one committed batch changed, for the in-memory popular-ads index.
pub struct Published {
    pub counts: CountUpdates,
    pub watermark: Watermark,
    /// Minutes below this can no longer be corrected by the live path.
    pub sealed_below: Minute,
    /// Minutes below this leave the index (older windows are read from the store).
    pub keep_from: Minute,
}

/// A change to the index: a commit's rows, or a recalculation's. Both carry absolute counts, so
/// applying a change again, in order, after a newer read of the store leaves the same index.
enum Change {
    Commit(Published),
    Replace(Vec<(Minute, AdId, Vec<u64>)>),
}

/// The popular-ads index of recent minutes, one [`Popular`] per slot, with the watermark of the
/// same commits so that a query's `final` matches its counts.
///
/// Publishing never waits for a query: the aggregator appends to `pending` (a short lock) and
/// applies it only if the index is free; a query applies whatever is pending before it reads.
///
/// At start the index is empty and `rebuilding`: queries read the store, changes wait in
/// `pending`, and [`rebuild_popular`] fills the index from the store off the aggregator's path,
/// then applies every change published since it began.
pub struct LiveIndex {
    state: Mutex<LiveState>,
    pending: Mutex<Vec<Change>>,
    rebuilding: AtomicBool,
}

pub struct LiveState {
    /// Total, then each filter.
    pub slots: Vec<Popular>,
    pub watermark: Watermark,
    /// The oldest minute the index holds; older windows are answered from the store.
    pub keep_from: Minute,
}

impl LiveState {
    fn apply(&mut self, change: Change) {
        let p = match change {
            Change::Commit(p) => p,
            Change::Replace(changed) => return self.replace(&changed),
        };
        for (slot, index) in self.slots.iter_mut().enumerate() {
            for (minute, ad, counts) in p.counts.iter() {
                if minute < p.keep_from {
                    continue;
                }
                if let Some(&c) = counts.get(slot) {
                    index.set(minute, ad, c);
                }
            }
            index.seal_below(p.sealed_below);
            index.evict_before(p.keep_from);
        }
        self.watermark = self.watermark.max(p.watermark);
        self.keep_from = self.keep_from.max(p.keep_from);
    }

    fn replace(&mut self, changed: &[(Minute, AdId, Vec<u64>)]) {
        for (minute, ad, counts) in changed {
            if *minute < self.keep_from {
                continue;
            }
            for (slot, index) in self.slots.iter_mut().enumerate() {
                index.set(*minute, ad, counts.get(slot).copied().unwrap_or(0));
            }
        }
    }
}

impl LiveIndex {
    pub fn new(slots: usize) -> LiveIndex {
        LiveIndex {
            state: Mutex::new(LiveState {
                slots: (0..slots).map(|_| Popular::new()).collect(),
                watermark: Watermark::NONE,
                // Nothing held yet: every window is read from the store.
                keep_from: Minute(i64::MAX),
            }),
            pending: Mutex::new(Vec::new()),
            rebuilding: AtomicBool::new(true),
        }
    }

    pub fn publish(&self, p: Published) {
        self.pending.lock().expect("not poisoned").push(Change::Commit(p));
        if self.rebuilding.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut state) = self.state.try_lock() {
            self.drain(&mut state);
        }
    }

    fn drain(&self, state: &mut LiveState) {
        if self.rebuilding.load(Ordering::Acquire) {
            return;
        }
        let pending = std::mem::take(&mut *self.pending.lock().expect("not poisoned"));
        for change in pending {
            state.apply(change);
        }
    }

    /// Applies a recalculation's changes (absolute counts per slot; zeros remove) at once.
    pub fn replace(&self, changed: &[(Minute, AdId, Vec<u64>)]) {
        let mut state = self.read();
        if self.rebuilding.load(Ordering::Acquire) {
            // Held with the state lock, which the end of the rebuild takes to apply these.
            let change = Change::Replace(changed.to_vec());
            self.pending.lock().expect("not poisoned").push(change);
            return;
        }
        state.replace(changed);
    }

    /// Ends the rebuild: the index read from the store, then every change since, in order.
    pub fn install(&self, slots: Vec<Popular>, keep_from: Minute, watermark: Watermark) {
        let mut state = self.state.lock().expect("not poisoned");
        state.slots = slots;
        state.keep_from = keep_from;
        state.watermark = state.watermark.max(watermark);
        self.rebuilding.store(false, Ordering::Release);
        self.drain(&mut state);
    }

    /// The index with every published commit applied. Holding it blocks other queries only.
    pub fn read(&self) -> std::sync::MutexGuard<'_, LiveState> {
        let mut state = self.state.lock().expect("not poisoned");
        self.drain(&mut state);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AdId;

    fn commit(minute: i64, rows: &[(&str, u64)]) -> Published {
        let mut counts = CountUpdates::new(1);
        for (ad, c) in rows {
            counts.push(Minute(minute), &AdId::new(ad), &[*c]);
        }
        Published {
            counts,
            watermark: Watermark::NONE,
            sealed_below: Minute(0),
            keep_from: Minute(0),
        }
    }

    /// Changes published while the index is rebuilt from the store wait, and are applied in
    /// order over the store's rows: absolute counts, so those the scan already saw do no harm.
    #[test]
    fn changes_during_the_rebuild_are_applied_after_it_in_order() {
        let live = LiveIndex::new(1);
        live.publish(commit(5, &[("x", 3)]));
        assert_eq!(live.read().keep_from, Minute(i64::MAX), "queries read the store meanwhile");
        live.publish(commit(5, &[("x", 7), ("y", 2)]));
        live.replace(&[(Minute(5), AdId::new("z"), vec![4])]);
        live.publish(commit(6, &[("y", 6)]));
        // The store's rows as the rebuild read them, between the first two commits.
        let mut scanned = Popular::new();
        scanned.set(Minute(5), &AdId::new("x"), 3);
        scanned.set(Minute(4), &AdId::new("w"), 1);
        live.install(vec![scanned], Minute(0), Watermark::NONE);
        let mut state = live.read();
        assert_eq!(state.keep_from, Minute(0));
        let top = state.slots[0].top(Minute(7), 5, 10);
        let top: Vec<(&str, u64)> = top.iter().map(|(ad, c)| (ad.as_str(), *c)).collect();
        assert_eq!(top, vec![("y", 8), ("x", 7), ("z", 4), ("w", 1)]);
    }
}
