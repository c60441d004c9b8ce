//! Event-time watermarks (SPEC §2).
//!
//! [`Watermark`] is the one finality rule: a minute is final once the watermark has reached its
//! end, and too late once the watermark is more than `allowed_lateness` past its end.
//!
//! [`Watermarks`] computes it. Per source partition: the largest event time seen minus
//! `watermark_delay`. The engine's watermark is the minimum over the partitions it owns that are
//! not idle; an owned partition that has delivered nothing yet holds it back entirely (at "none")
//! until it delivers or has been quiet for `idle_timeout` since it was assigned. A partition with
//! new records in a batch is not idle in that batch, whatever came before: a batch that reads
//! one partition's run before another's first records cannot judge the latter too late. When
//! every partition is idle the watermark follows the wall clock minus `watermark_delay`. Before
//! any partition has delivered, it waits for data: a fresh engine fed history counts it. It never
//! moves backwards.
//!
//! **Replay.** Wall-clock input arrives only through [`Watermarks::assign`] and
//! [`Watermarks::tick`] (once per batch, with the batch's wall time, raised to be
//! non-decreasing). A tick's outcome depends on the ticks before it, so a caller that replays
//! must give every batch it processed, empty ones included, with their wall times: the service
//! journals every batch it processes, and asks [`Watermarks::peek`] first to skip ticks that
//! would change nothing worth a commit.
//!
//! The partition table also keeps each partition's next offset, the resume point.

use std::collections::HashMap;

use crate::event::{EventTime, Minute, MINUTE_MS};

use super::snapshot::{Decoder, Encoder, SnapshotError};
use super::{Offset, PartitionId};

/// The event-time watermark: `None` until something advanced it. Ordered, `None` lowest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Watermark(Option<i64>);

impl Watermark {
    pub const NONE: Watermark = Watermark(None);

    pub fn at(ms: i64) -> Watermark {
        Watermark(Some(ms))
    }

    /// The watermark in ms, if any.
    pub fn ms(self) -> Option<i64> {
        self.0
    }

    /// A minute is final once the watermark has reached its end.
    pub fn is_final(self, minute: Minute) -> bool {
        self.0.is_some_and(|w| w >= minute.end().0)
    }

    /// Every minute before `to` is final.
    pub fn all_final_before(self, to: Minute) -> bool {
        self.0.is_some_and(|w| w >= to.start().0)
    }

    /// A click of `minute` can no longer be counted: the watermark is more than `lateness_ms`
    /// past the minute's end.
    pub fn is_too_late(self, minute: Minute, lateness_ms: i64) -> bool {
        self.0.is_some_and(|w| w.saturating_sub(minute.end().0) > lateness_ms)
    }

    /// The start of the oldest minute whose clicks can still be counted (see
    /// [`Self::is_too_late`]); `None` while everything can be.
    pub fn oldest_countable(self, lateness_ms: i64) -> Option<i64> {
        self.0.map(|w| {
            // The first minute m with w - end(m) <= lateness, i.e. end(m) >= w - lateness.
            let bound = w.saturating_sub(lateness_ms);
            let ceil = bound.div_euclid(MINUTE_MS) + i64::from(bound.rem_euclid(MINUTE_MS) != 0);
            Minute(ceil - 1).start().0
        })
    }

    /// For atomics and the store: `i64::MIN` stands for none.
    pub fn to_raw(self) -> i64 {
        self.0.unwrap_or(i64::MIN)
    }

    pub fn from_raw(v: i64) -> Watermark {
        Watermark((v != i64::MIN).then_some(v))
    }
}

/// A watermark shared between threads (the committed one, for queries and metrics).
#[derive(Debug)]
pub struct AtomicWatermark(std::sync::atomic::AtomicI64);

impl Default for AtomicWatermark {
    fn default() -> Self {
        AtomicWatermark(std::sync::atomic::AtomicI64::new(Watermark::NONE.to_raw()))
    }
}

impl AtomicWatermark {
    pub fn load(&self) -> Watermark {
        Watermark::from_raw(self.0.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Stores `w` and returns the watermark it replaces.
    pub fn swap(&self, w: Watermark) -> Watermark {
        Watermark::from_raw(self.0.swap(w.to_raw(), std::sync::atomic::Ordering::AcqRel))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Partition {
    id: PartitionId,
    /// Largest event time seen; `None` before the first valid event.
    max_time: Option<i64>,
    /// Wall time of the last batch that brought this partition a valid event, or of its
    /// assignment, whichever is later.
    last_active_wall: i64,
    idle: bool,
    /// Every record below this offset is reflected in the state.
    next_offset: Offset,
}

/// One partition's part in the watermark, as [`Watermarks::partitions`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionView {
    pub id: PartitionId,
    pub watermark: Watermark,
    pub idle: bool,
}

/// What the non-idle partitions say.
enum Active {
    /// Some non-idle partition has delivered nothing: the watermark stays where it is.
    Hold,
    /// The minimum of the non-idle partitions' (max time − delay).
    At(i64),
    /// Every partition is idle.
    AllIdle,
}

/// The watermark state of one engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watermarks {
    delay_ms: i64,
    idle_timeout_ms: i64,
    parts: Vec<Partition>,
    index: HashMap<PartitionId, usize>,
    current: Watermark,
    /// The latest wall time given; earlier ones are raised to it (clocks can step back).
    wall: i64,
    /// The last partition looked up: records come in runs of one partition.
    last: Option<(PartitionId, usize)>,
}

impl Watermarks {
    pub fn new(delay_ms: i64, idle_timeout_ms: i64) -> Self {
        Watermarks {
            delay_ms,
            idle_timeout_ms,
            parts: Vec::new(),
            index: HashMap::new(),
            current: Watermark::NONE,
            wall: i64::MIN,
            last: None,
        }
    }

    pub fn current(&self) -> Watermark {
        self.current
    }

    fn clamp_wall(&mut self, wall: EventTime) -> i64 {
        self.wall = self.wall.max(wall.0);
        self.wall
    }

    /// Takes ownership of `ids` at wall time `wall` (the aggregator's start, or a rebalance):
    /// each holds the watermark back until it delivers or has been quiet for `idle_timeout`
    /// from now. A partition that has delivered before starts a new quiet period too, so a
    /// restart after downtime does not judge the backlog too late.
    pub fn assign(&mut self, ids: &[PartitionId], wall: EventTime) {
        let wall = self.clamp_wall(wall);
        for &id in ids {
            let i = self.slot(id);
            let p = &mut self.parts[i];
            p.last_active_wall = p.last_active_wall.max(wall);
            p.idle = false;
        }
    }

    /// Marks partition `id` as delivering at `wall` when `offset` is new to the state (a batch's
    /// records, before [`Self::tick`]): a partition with records to read is not idle.
    pub fn touch(&mut self, id: PartitionId, offset: Offset, wall: EventTime) {
        let wall = self.wall.max(wall.0);
        let i = self.slot(id);
        let p = &mut self.parts[i];
        if offset >= p.next_offset && p.last_active_wall < wall {
            p.last_active_wall = wall;
            p.idle = false;
        }
    }

    /// Applies the idle rule at the start of a batch stamped with wall time `wall`.
    pub fn tick(&mut self, wall: EventTime) {
        let wall = self.clamp_wall(wall);
        for p in &mut self.parts {
            p.idle = wall.saturating_sub(p.last_active_wall) >= self.idle_timeout_ms;
        }
        match self.active() {
            Active::Hold => {}
            Active::At(t) => self.advance(t),
            Active::AllIdle => {
                // With no event seen yet there is no quiet period to end: wait for data.
                if self.parts.iter().any(|p| p.max_time.is_some()) {
                    self.advance(wall.saturating_sub(self.delay_ms));
                }
            }
        }
    }

    /// The watermark a batch without records at `wall` would leave, without changing anything.
    pub fn peek(&self, wall: EventTime) -> Watermark {
        let mut w = self.clone();
        w.tick(wall);
        w.current()
    }

    fn advance(&mut self, t: i64) {
        self.current = self.current.max(Watermark::at(t));
    }

    fn active(&self) -> Active {
        let mut min: Option<i64> = None;
        for p in self.parts.iter().filter(|p| !p.idle) {
            match p.max_time {
                None => return Active::Hold,
                Some(t) => min = Some(min.map_or(t, |m| m.min(t))),
            }
        }
        match min {
            Some(t) => Active::At(t.saturating_sub(self.delay_ms)),
            None => Active::AllIdle,
        }
    }

    fn slot(&mut self, id: PartitionId) -> usize {
        if let Some((last, i)) = self.last {
            if last == id {
                return i;
            }
        }
        let i = *self.index.entry(id).or_insert_with(|| {
            self.parts.push(Partition {
                id,
                max_time: None,
                last_active_wall: i64::MIN,
                idle: true,
                next_offset: Offset(0),
            });
            self.parts.len() - 1
        });
        self.last = Some((id, i));
        i
    }

    /// Claims `offset` of partition `id`: false when the state already reflects it (a replay).
    pub fn claim(&mut self, id: PartitionId, offset: Offset) -> bool {
        let i = self.slot(id);
        let p = &mut self.parts[i];
        if offset < p.next_offset {
            return false;
        }
        p.next_offset = Offset(offset.0 + 1);
        true
    }

    /// Records a valid event of partition `id` at event time `t`, in a batch stamped `wall`.
    pub fn observe(&mut self, id: PartitionId, t: EventTime, wall: EventTime) {
        let wall = self.wall.max(wall.0);
        let i = self.slot(id);
        let p = &mut self.parts[i];
        p.last_active_wall = wall;
        p.idle = false;
        if p.max_time.is_none_or(|m| t.0 > m) {
            p.max_time = Some(t.0);
            if let Active::At(min) = self.active() {
                self.advance(min);
            }
        }
    }

    pub fn next_offset(&self, id: PartitionId) -> Option<Offset> {
        self.index.get(&id).map(|&i| self.parts[i].next_offset)
    }

    /// Every partition known, by partition id: its own watermark (max event time − delay) and
    /// whether it is idle, for metrics.
    pub fn partitions(&self) -> Vec<PartitionView> {
        let mut v: Vec<_> = self
            .parts
            .iter()
            .map(|p| PartitionView {
                id: p.id,
                watermark: Watermark(p.max_time.map(|t| t.saturating_sub(self.delay_ms))),
                idle: p.idle,
            })
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Every partition known and its next offset, by partition id.
    pub fn offsets(&self) -> Vec<(PartitionId, Offset)> {
        let mut v: Vec<_> = self.parts.iter().map(|p| (p.id, p.next_offset)).collect();
        v.sort();
        v
    }

    /// Layout: watermark i (`i64::MIN` for none), wall i, partition count u, per partition: id
    /// u, has-max bool, max i, last active wall i, idle bool, next offset u.
    pub fn encode(&self, e: &mut Encoder) {
        e.i(self.current.to_raw());
        e.i(self.wall);
        e.u(self.parts.len() as u64);
        for p in &self.parts {
            e.u(p.id.0 as u64);
            e.bool(p.max_time.is_some());
            e.i(p.max_time.unwrap_or(0));
            e.i(p.last_active_wall);
            e.bool(p.idle);
            e.u(p.next_offset.0);
        }
    }

    pub fn decode(&mut self, d: &mut Decoder) -> Result<(), SnapshotError> {
        self.current = Watermark::from_raw(d.i()?);
        self.wall = d.i()?;
        for _ in 0..d.count()? {
            let id = PartitionId(
                u32::try_from(d.u()?).map_err(|_| SnapshotError::Corrupt("partition"))?,
            );
            let has = d.bool()?;
            let max = d.i()?;
            let i = self.slot(id);
            let p = &mut self.parts[i];
            p.max_time = has.then_some(max);
            p.last_active_wall = d.i()?;
            p.idle = d.bool()?;
            p.next_offset = Offset(d.u()?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finality_rules() {
        let m = Minute(10); // [600_000, 660_000)
        assert!(!Watermark::NONE.is_final(m));
        assert!(!Watermark::at(659_999).is_final(m));
        assert!(Watermark::at(660_000).is_final(m));
        assert!(Watermark::at(660_000).all_final_before(Minute(11)));
        assert!(!Watermark::at(659_999).all_final_before(Minute(11)));
        assert!(!Watermark::at(660_000 + 5_000).is_too_late(m, 5_000));
        assert!(Watermark::at(660_000 + 5_001).is_too_late(m, 5_000));
        assert!(!Watermark::NONE.is_too_late(m, 0));
        assert!(Watermark::NONE < Watermark::at(i64::MIN + 1));
        assert_eq!(Watermark::from_raw(Watermark::NONE.to_raw()), Watermark::NONE);
        // The oldest countable minute is exactly the first one not too late.
        for w in [0, 59_999, 60_000, 660_000, -1, -60_001] {
            for lateness in [0, 1, 60_000, 300_000] {
                let wm = Watermark::at(w);
                let oldest = Minute(wm.oldest_countable(lateness).unwrap().div_euclid(60_000));
                assert!(!wm.is_too_late(oldest, lateness), "w {w} l {lateness}");
                assert!(wm.is_too_late(Minute(oldest.0 - 1), lateness), "w {w} l {lateness}");
            }
        }
    }

    #[test]
    fn an_assigned_partition_holds_the_watermark_until_it_delivers_or_idles() {
        let mut w = Watermarks::new(1_000, 30_000);
        let (p0, p1) = (PartitionId(0), PartitionId(1));
        w.assign(&[p0, p1], EventTime(1_000_000));
        w.tick(EventTime(1_000_000));
        w.observe(p0, EventTime(600_000), EventTime(1_000_000));
        assert_eq!(w.current(), Watermark::NONE, "p1 has delivered nothing yet");
        w.observe(p1, EventTime(120_000), EventTime(1_000_000));
        assert_eq!(w.current(), Watermark::at(119_000));
        // p1 goes quiet for idle_timeout: p0 alone decides.
        w.tick(EventTime(1_010_000));
        w.observe(p0, EventTime(700_000), EventTime(1_010_000));
        w.tick(EventTime(1_030_000));
        assert_eq!(w.current(), Watermark::at(699_000));
        // Everything idle: the wall clock minus the delay.
        assert_eq!(w.peek(EventTime(1_040_000)), Watermark::at(1_039_000));
        assert_eq!(w.current(), Watermark::at(699_000), "peeking changes nothing");
        w.tick(EventTime(1_040_000));
        assert_eq!(w.current(), Watermark::at(1_039_000));
        // A clock stepping back changes nothing.
        w.tick(EventTime(0));
        assert_eq!(w.current(), Watermark::at(1_039_000));
        // Records in a batch make their partition active again before the idle rule runs: the
        // wall clock does not move the watermark past them (it never moves back either).
        w.touch(p1, Offset(0), EventTime(1_060_000));
        w.tick(EventTime(1_060_000));
        assert_eq!(w.current(), Watermark::at(1_039_000), "not wall − delay = 1_059_000");
        w.observe(p1, EventTime(1_200_000), EventTime(1_060_000));
        assert_eq!(w.current(), Watermark::at(1_199_000));
    }

    #[test]
    fn an_unassigned_never_delivering_partition_stops_holding_after_idle_timeout() {
        let mut w = Watermarks::new(0, 30_000);
        w.assign(&[PartitionId(0), PartitionId(1)], EventTime(0));
        w.tick(EventTime(10));
        w.observe(PartitionId(0), EventTime(5_000), EventTime(10));
        assert_eq!(w.current(), Watermark::NONE);
        w.tick(EventTime(29_999));
        assert_eq!(w.current(), Watermark::NONE, "p1 is not idle before idle_timeout");
        w.tick(EventTime(30_000));
        assert_eq!(w.current(), Watermark::at(5_000), "p1 idle, p0 active (seen at wall 10)");
    }
}
