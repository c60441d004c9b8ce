//! Event-time watermarks (SPEC §2): per source partition the largest event time seen minus
//! `watermark_delay`; the engine's watermark is the minimum over the partitions that are not idle,
//! and it advances with the wall clock when every partition is idle. It never moves backwards.
//!
//! Wall-clock input arrives only through [`Watermarks::tick`], once per batch with the batch's
//! wall time, so replaying the same batches with the same wall times makes the same decisions.
//! The partition table also keeps each partition's next offset, the resume point.

use std::collections::HashMap;

use crate::event::EventTime;

use super::snapshot::{Decoder, Encoder, SnapshotError};
use super::{Offset, PartitionId};

#[derive(Clone, Debug, PartialEq, Eq)]
struct Partition {
    id: PartitionId,
    /// Largest event time seen; `None` before the first valid event.
    max_time: Option<i64>,
    /// Wall time of the last batch that brought this partition a valid event.
    last_active_wall: i64,
    idle: bool,
    /// Every record below this offset is reflected in the state.
    next_offset: Offset,
}

/// The watermark state of one engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watermarks {
    delay_ms: i64,
    idle_timeout_ms: i64,
    parts: Vec<Partition>,
    index: HashMap<PartitionId, usize>,
    /// The watermark in ms; `i64::MIN` until the first advance.
    current: i64,
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
            current: i64::MIN,
            last: None,
        }
    }

    /// The watermark, in ms (`i64::MIN` when nothing has advanced it yet).
    pub fn current(&self) -> i64 {
        self.current
    }

    /// Applies the idle rule at the start of a batch stamped with wall time `wall`.
    pub fn tick(&mut self, wall: EventTime) {
        for p in &mut self.parts {
            p.idle = wall.0.saturating_sub(p.last_active_wall) >= self.idle_timeout_ms;
        }
        // With no event seen yet there is no quiet period to end: the watermark waits for data.
        if self.parts.iter().all(|p| p.max_time.is_none()) {
            return;
        }
        let active = self.active_min();
        self.current = self.current.max(active.unwrap_or(wall.0.saturating_sub(self.delay_ms)));
    }

    fn active_min(&self) -> Option<i64> {
        self.parts
            .iter()
            .filter(|p| !p.idle)
            .filter_map(|p| p.max_time)
            .min()
            .map(|t| t - self.delay_ms)
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

    /// Records a valid event of partition `id` at event time `t`.
    pub fn observe(&mut self, id: PartitionId, t: EventTime, wall: EventTime) {
        let i = self.slot(id);
        let p = &mut self.parts[i];
        p.last_active_wall = wall.0;
        p.idle = false;
        if p.max_time.is_none_or(|m| t.0 > m) {
            p.max_time = Some(t.0);
            if let Some(min) = self.active_min() {
                self.current = self.current.max(min);
            }
        }
    }

    pub fn next_offset(&self, id: PartitionId) -> Option<Offset> {
        self.index.get(&id).map(|&i| self.parts[i].next_offset)
    }

    /// Every partition seen and its next offset, by partition id.
    pub fn offsets(&self) -> Vec<(PartitionId, Offset)> {
        let mut v: Vec<_> = self.parts.iter().map(|p| (p.id, p.next_offset)).collect();
        v.sort();
        v
    }

    pub fn encode(&self, e: &mut Encoder) {
        e.i(self.current);
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
        self.current = d.i()?;
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
