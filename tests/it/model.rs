//! A reference model of SPEC §2, kept obviously correct rather than fast: one sequential loop,
//! tuple identities compared exactly (no hashes), dedup state never expired, top-N by a full
//! sort. The engine's output stream is folded into the same [`Folded`] shape for comparison.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use adclick::engine::{Counters, Engine, EngineConfig, Offset, PartitionId, Payload, Record};
use adclick::event::{parse_line, EventTime, Validation};
use adclick::filter::Filters;

/// One batch as fed to both: wall time and (partition, offset, line).
#[derive(Clone, Debug)]
pub struct Batch {
    pub wall: i64,
    pub records: Vec<(u32, u64, Vec<u8>)>,
    /// Partitions (re)assigned at this batch's wall time, before its records.
    pub assign: Vec<u32>,
}

/// Final state: every non-zero count, the top-N of every final minute, the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub counts: BTreeMap<(i64, String, usize), u64>,
    pub tops: BTreeMap<(i64, usize), Vec<(String, u64)>>,
    pub counters: Counters,
    pub watermark: i64,
}

/// The identity of SPEC §1, as an exact key.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Key {
    ClickId(String, String),
    Fields(String, i64, Option<String>, Option<IpAddr>),
}

struct Part {
    max: Option<i64>,
    last_active: i64,
    idle: bool,
    next: u64,
}

impl Part {
    fn new() -> Part {
        Part { max: None, last_active: i64::MIN, idle: true, next: 0 }
    }
}

pub fn run_model(cfg: &EngineConfig, filters: &Filters, batches: &[Batch]) -> Folded {
    let mut parts: BTreeMap<u32, Part> = BTreeMap::new();
    let mut w = i64::MIN;
    let mut seen: HashMap<Key, Vec<i64>> = HashMap::new();
    let mut out = Folded::default();
    let c = &mut out.counters;
    // SPEC §2: the minimum over the non-idle partitions, a non-idle one that delivered nothing
    // holding it back; all idle: the wall clock minus the delay.
    let recompute = |parts: &BTreeMap<u32, Part>, w: i64, wall: Option<i64>| {
        let active: Vec<Option<i64>> = parts.values().filter(|p| !p.idle).map(|p| p.max).collect();
        if !active.is_empty() {
            if active.contains(&None) {
                return w;
            }
            return w.max(active.into_iter().flatten().min().unwrap() - cfg.watermark_delay_ms);
        }
        match (parts.values().any(|p| p.max.is_some()), wall) {
            (true, Some(wall)) => w.max(wall - cfg.watermark_delay_ms),
            _ => w,
        }
    };
    let mut clock = i64::MIN;
    for b in batches {
        clock = clock.max(b.wall);
        for pid in &b.assign {
            let p = parts.entry(*pid).or_insert_with(Part::new);
            p.last_active = p.last_active.max(clock);
            p.idle = false;
        }
        // A partition with new records in the batch is delivering: not idle.
        for (pid, offset, _) in &b.records {
            let p = parts.entry(*pid).or_insert_with(Part::new);
            if *offset >= p.next {
                p.last_active = clock;
            }
        }
        for p in parts.values_mut() {
            p.idle = clock.saturating_sub(p.last_active) >= cfg.idle_timeout_ms;
        }
        w = recompute(&parts, w, Some(clock));
        for (pid, offset, line) in &b.records {
            let p = parts.entry(*pid).or_insert_with(Part::new);
            if *offset < p.next {
                continue;
            }
            p.next = offset + 1;
            let v = Validation { now: EventTime(b.wall), max_skew_ms: cfg.max_clock_skew_ms };
            let click = match parse_line(line, v) {
                Ok(Some(click)) => click,
                Ok(None) => continue,
                Err(e) => {
                    c.invalid[e.kind().index()] += 1;
                    continue;
                }
            };
            c.valid += 1;
            let t = click.time.0;
            let minute = t.div_euclid(60_000);
            let end = (minute + 1) * 60_000;
            let before = w;
            p.last_active = clock;
            p.idle = false;
            p.max = Some(p.max.map_or(t, |m| m.max(t)));
            w = recompute(&parts, w, None);
            if before.saturating_sub(end) > cfg.allowed_lateness_ms {
                c.too_late += 1;
                continue;
            }
            let key = match &click.click_id {
                Some(id) => Key::ClickId(click.ad_id.to_string(), id.to_string()),
                None => Key::Fields(
                    click.ad_id.to_string(),
                    t,
                    click.user_id.as_ref().map(|u| u.to_string()),
                    click.ip,
                ),
            };
            let times = seen.entry(key).or_default();
            if times.iter().any(|&s| (s - t).abs() <= cfg.dedup_horizon_ms) {
                c.duplicate += 1;
                continue;
            }
            times.push(t);
            c.counted += 1;
            if before >= end {
                c.late_corrected += 1;
            }
            let mask = filters.matches(&click);
            *out.counts.entry((minute, click.ad_id.to_string(), 0)).or_default() += 1;
            for f in 0..filters.len() {
                if mask.contains(f) {
                    *out.counts.entry((minute, click.ad_id.to_string(), f + 1)).or_default() += 1;
                }
            }
        }
    }
    out.watermark = w;
    // Top-N of every final minute, by a full sort.
    let mut by_minute: BTreeMap<(i64, usize), Vec<(String, u64)>> = BTreeMap::new();
    for ((m, ad, slot), n) in &out.counts {
        if (m + 1) * 60_000 <= w {
            by_minute.entry((*m, *slot)).or_default().push((ad.clone(), *n));
        }
    }
    for (k, mut v) in by_minute {
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.as_bytes().cmp(b.0.as_bytes())));
        v.truncate(cfg.top_n);
        out.tops.insert(k, v);
    }
    out
}

/// Feeds the batches to an engine (restoring it from a snapshot before the batches listed in
/// `restore_before`) and folds its output stream.
pub fn run_engine(
    cfg: &EngineConfig,
    filters: &Arc<Filters>,
    batches: &[Batch],
    restore_before: &[usize],
) -> Folded {
    run_engine_with(cfg, filters, batches, restore_before, &[], false)
}

/// As [`run_engine`]. Before each batch of `checkpoint_before` and `restore_before` an
/// incremental checkpoint is taken, and the files kept as the service keeps them (dropped once
/// the engine no longer retains them); before each of `restore_before` the engine is rebuilt
/// from those files. With `prevalidate`, valid lines arrive as clicks validated upstream with the
/// batch's wall time, as the collector sends them.
pub fn run_engine_with(
    cfg: &EngineConfig,
    filters: &Arc<Filters>,
    batches: &[Batch],
    restore_before: &[usize],
    checkpoint_before: &[usize],
    prevalidate: bool,
) -> Folded {
    let mut engine = Engine::new(cfg.clone(), filters.clone()).expect("valid config");
    let mut out = Folded::default();
    let mut files: Vec<(Vec<u8>, adclick::engine::Extent)> = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        if restore_before.contains(&i) || checkpoint_before.contains(&i) {
            files.retain(|(_, extent)| engine.retains(*extent));
            files.push(engine.checkpoint());
        }
        if restore_before.contains(&i) {
            let chain: Vec<&[u8]> = files.iter().map(|(f, _)| f.as_slice()).collect();
            engine = Engine::restore_chain(cfg.clone(), filters.clone(), &chain).expect("restore");
        }
        if !b.assign.is_empty() {
            let ids: Vec<PartitionId> = b.assign.iter().map(|&p| PartitionId(p)).collect();
            engine.assign(&ids, EventTime(b.wall));
        }
        let records: Vec<Record> = b
            .records
            .iter()
            .map(|(p, o, l)| {
                let v = Validation { now: EventTime(b.wall), max_skew_ms: cfg.max_clock_skew_ms };
                let payload = match parse_line(l, v) {
                    Ok(Some(click)) if prevalidate => Payload::Click(click),
                    _ => Payload::Line(l),
                };
                Record { partition: PartitionId(*p), offset: Offset(*o), payload }
            })
            .collect();
        // Odd batches run the shards on threads through `process_with`, even ones in line.
        let o = if i % 2 == 1 {
            engine.process_with(EventTime(b.wall), &records, |work| {
                std::thread::scope(|s| {
                    let running: Vec<_> = work
                        .into_iter()
                        .map(|(shard, batch)| s.spawn(move || shard.apply(batch)))
                        .collect();
                    running.into_iter().map(|h| h.join().unwrap()).collect()
                })
            })
        } else {
            engine.process(EventTime(b.wall), &records)
        };
        fold(&mut out, &o);
    }
    out
}

pub fn fold(out: &mut Folded, o: &adclick::engine::Output) {
    for (minute, ad, counts) in o.counts.iter() {
        for (slot, &n) in counts.iter().enumerate() {
            if n > 0 {
                out.counts.insert((minute.0, ad.to_string(), slot), n);
            }
        }
    }
    for t in &o.top {
        let list = t.ads.iter().map(|(a, n)| (a.to_string(), *n)).collect();
        out.tops.insert((t.minute.0, t.slot.index()), list);
    }
    out.counters = o.counters.clone();
    out.watermark = o.watermark.to_raw();
}

/// Compares with a readable first difference instead of a wall of debug output.
pub fn assert_same(engine: &Folded, model: &Folded, what: &str) {
    assert_eq!(engine.counters, model.counters, "{what}: counters");
    assert_eq!(engine.watermark, model.watermark, "{what}: watermark");
    for (k, v) in &model.counts {
        assert_eq!(engine.counts.get(k), Some(v), "{what}: count of {k:?}");
    }
    for (k, v) in &engine.counts {
        assert_eq!(model.counts.get(k), Some(v), "{what}: engine has extra count {k:?}");
    }
    for (k, v) in &model.tops {
        assert_eq!(engine.tops.get(k), Some(v), "{what}: top-N of {k:?}");
    }
    // The engine may also emit tops for final minutes that are empty for a slot; the model lists
    // only slots with counts.
    for (k, v) in &engine.tops {
        if !v.is_empty() {
            assert_eq!(model.tops.get(k), Some(v), "{what}: engine top-N of {k:?}");
        }
    }
}
