//! How the store encodes what it keeps besides counts: journal batches, offset ranges, top-N
//! lists and checkpoint manifests.

use crate::engine::snapshot::{Decoder, Encoder};
use crate::engine::{Extent, Offset, OffsetRange, PartitionId};
use crate::event::Minute;
use crate::rank::Ranked;

/// Which records, at which wall-clock time, made one engine batch.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BatchRecord {
    pub wall: i64,
    /// The records of each partition, in this order.
    pub ranges: Vec<OffsetRange>,
    /// Partitions assigned to the engine at `wall`, before the records (the aggregator's start).
    pub assign: Vec<PartitionId>,
}

impl BatchRecord {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.i(self.wall);
        encode_ranges(&mut e, &self.ranges);
        e.u(self.assign.len() as u64);
        for p in &self.assign {
            e.u(p.0 as u64);
        }
        e.buf
    }
    pub(super) fn decode(bytes: &[u8]) -> Option<BatchRecord> {
        let mut d = Decoder::raw(bytes);
        let wall = d.i().ok()?;
        let ranges = decode_ranges(&mut d)?;
        let mut assign = Vec::new();
        for _ in 0..d.count().ok()? {
            assign.push(PartitionId(u32::try_from(d.u().ok()?).ok()?));
        }
        d.finish().ok()?;
        Some(BatchRecord { wall, ranges, assign })
    }
}

/// Offset ranges as the journal and the archiver's recorded flush keep them: a count, then
/// (partition, from, to) each.
pub(super) fn encode_ranges(e: &mut Encoder, ranges: &[OffsetRange]) {
    e.u(ranges.len() as u64);
    for r in ranges {
        e.u(r.partition.0 as u64);
        e.u(r.from.0);
        e.u(r.to.0);
    }
}

pub(super) fn decode_ranges(d: &mut Decoder) -> Option<Vec<OffsetRange>> {
    let n = d.count().ok()?;
    let mut ranges = Vec::with_capacity(n);
    for _ in 0..n {
        ranges.push(OffsetRange::new(
            PartitionId(u32::try_from(d.u().ok()?).ok()?),
            Offset(d.u().ok()?),
            Offset(d.u().ok()?),
        ));
    }
    Some(ranges)
}

/// A top-N list as `tops` stores it.
pub(super) fn encode_top(ads: &[Ranked]) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u(ads.len() as u64);
    for (ad, c) in ads {
        e.bytes(ad.as_str().as_bytes());
        e.u(*c);
    }
    e.buf
}

/// A checkpoint file as a manifest names it: the batch it was taken after, and how long it
/// matters (see [`crate::engine::Engine::retains`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointFile {
    pub seq: u64,
    pub extent: Extent,
}

/// A checkpoint whose files are durable, to be recorded by a commit: the last batch it includes
/// and the files that restore it, oldest first (the newest is `seq`'s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub seq: u64,
    pub files: Vec<CheckpointFile>,
}

pub(super) fn encode_manifest(files: &[CheckpointFile]) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u(files.len() as u64);
    let opt = |e: &mut Encoder, v: Option<i64>| match v {
        Some(v) => {
            e.bool(true);
            e.i(v)
        }
        None => e.bool(false),
    };
    for f in files {
        e.u(f.seq);
        opt(&mut e, f.extent.max_time);
        opt(&mut e, f.extent.max_minute.map(|m| m.0));
    }
    e.buf
}

pub(super) fn decode_manifest(bytes: &[u8]) -> Option<Vec<CheckpointFile>> {
    let mut d = Decoder::raw(bytes);
    let opt = |d: &mut Decoder| -> Option<Option<i64>> {
        match d.u().ok()? {
            0 => Some(None),
            1 => d.i().ok().map(Some),
            _ => None,
        }
    };
    let n = d.count().ok()?;
    let mut files = Vec::with_capacity(n);
    for _ in 0..n {
        let seq = d.u().ok()?;
        let max_time = opt(&mut d)?;
        let max_minute = opt(&mut d)?.map(Minute);
        files.push(CheckpointFile { seq, extent: Extent { max_time, max_minute } });
    }
    Some(files)
}
