//! Scenario tests of exact boundaries; the model comparisons live in `tests/it/engine.rs`.

use std::sync::Arc;

use super::*;
use crate::filter::{FilterConfig, Filters};

fn config() -> EngineConfig {
    EngineConfig {
        watermark_delay_ms: 5_000,
        idle_timeout_ms: 20_000,
        allowed_lateness_ms: 120_000,
        dedup_horizon_ms: 240_000,
        max_clock_skew_ms: 86_400_000,
        top_n: 2,
        shards: 2,
        dedup_capacity: 0,
        identity_key: Default::default(),
    }
}

struct Feed {
    engine: Engine,
    offsets: std::collections::HashMap<u32, u64>,
}

impl Feed {
    fn new() -> Feed {
        Feed::with(config(), Filters::default())
    }
    fn with(cfg: EngineConfig, filters: Filters) -> Feed {
        Feed { engine: Engine::new(cfg, Arc::new(filters)).unwrap(), offsets: Default::default() }
    }
    /// Sends lines on a partition, wall clock fixed at 0 unless given.
    fn send(&mut self, partition: u32, wall: i64, lines: &[String]) -> Output {
        let records: Vec<Record> = lines
            .iter()
            .map(|l| {
                let o = self.offsets.entry(partition).or_default();
                *o += 1;
                Record {
                    partition: PartitionId(partition),
                    offset: Offset(*o - 1),
                    payload: Payload::Line(l.as_bytes()),
                }
            })
            .collect();
        self.engine.process(EventTime(wall), &records)
    }
}

fn click(ad: &str, t: i64, id: &str) -> String {
    format!(r#"{{"ad_id":"{ad}","click_timestamp":{t},"click_id":"{id}"}}"#)
}

#[test]
fn final_exactly_when_the_watermark_reaches_the_end() {
    let mut f = Feed::new();
    f.send(0, 0, &[click("a", 10_000, "1")]);
    // Watermark 59_999: minute 0 is still open.
    let o = f.send(0, 0, &[click("b", 64_999, "2")]);
    assert_eq!(o.watermark, Watermark::at(59_999));
    assert!(o.top.is_empty());
    let o = f.send(0, 0, &[click("a", 20_000, "3")]);
    assert_eq!(o.counters.late_corrected, 0);
    // Watermark 60_000: minute 0 is final, its top-N emitted once.
    let o = f.send(0, 0, &[click("b", 65_000, "4")]);
    assert_eq!(o.watermark, Watermark::at(60_000));
    assert_eq!(o.top.len(), 1);
    assert_eq!(o.top[0].minute, Minute(0));
    assert_eq!(o.top[0].ads, vec![(AdId::new("a"), 2)]);
    // Now an event for minute 0 is a correction, and the top-N is re-emitted.
    let o = f.send(0, 0, &[click("c", 1, "5"), click("c", 2, "6"), click("c", 3, "7")]);
    assert_eq!(o.counters.late_corrected, 3);
    assert_eq!(o.top.len(), 1);
    assert_eq!(o.top[0].ads, vec![(AdId::new("c"), 3), (AdId::new("a"), 2)]);
    let rows: Vec<_> = o.counts.iter().map(|(m, a, c)| (m, a.clone(), c.to_vec())).collect();
    assert_eq!(
        rows,
        vec![(Minute(0), AdId::new("c"), vec![3])],
        "absolute counts of touched rows only"
    );
}

#[test]
fn too_late_exactly_past_the_lateness() {
    let mut f = Feed::new();
    // Watermark 180_000: minute 0 ends 120_000 before it, exactly the allowed lateness.
    f.send(0, 0, &[click("x", 185_000, "1")]);
    let o = f.send(0, 0, &[click("a", 0, "2")]);
    assert_eq!((o.counters.counted, o.counters.too_late, o.counters.late_corrected), (2, 0, 1));
    f.send(0, 0, &[click("x", 185_001, "3")]);
    let o = f.send(0, 0, &[click("a", 59_999, "4")]);
    assert_eq!((o.counters.counted, o.counters.too_late), (3, 1));
    assert!(o.counts.is_empty());
}

#[test]
fn dedup_holds_until_no_copy_can_be_counted() {
    let mut f = Feed::new();
    f.send(0, 0, &[click("a", 0, "c1")]);
    // Watermark = horizon + lateness + 1 min − 1 s: a copy at t = horizon is still countable
    // (its minute ends within the lateness) and must still be recognised.
    f.send(0, 0, &[click("x", 240_000 + 120_000 + 60_000 - 1_000 + 5_000, "w")]);
    let o = f.send(0, 0, &[click("a", 240_000, "c1")]);
    assert_eq!((o.counters.duplicate, o.counters.too_late), (1, 0));
    // One horizon and a millisecond apart: a new click.
    let o = f.send(0, 0, &[click("a", 240_001, "c1")]);
    assert_eq!(o.counters.duplicate, 1);
    assert_eq!(o.counters.counted, 3);
}

#[test]
fn idle_partitions_stop_holding_the_watermark() {
    let mut f = Feed::new();
    f.send(0, 1_000_000, &[click("a", 100_000, "1")]);
    f.send(1, 1_010_000, &[click("b", 300_000, "2")]);
    assert_eq!(f.engine.watermark(), Watermark::at(95_000), "the minimum over partitions");
    // Partition 0 has been quiet for the idle timeout: only partition 1 holds the watermark.
    let o = f.send(1, 1_020_000, &[]);
    assert_eq!(o.watermark, Watermark::at(295_000));
    // Every partition idle: the watermark follows the wall clock.
    let o = f.send(1, 1_030_000, &[]);
    assert_eq!(o.watermark, Watermark::at(1_025_000));
    // A partition with records is not idle in that batch: the wall clock does not move the
    // watermark past them; and it never goes back when a partition wakes up behind it.
    let o = f.send(0, 1_030_001, &[click("a", 1_000_000, "3")]);
    assert_eq!(o.watermark, Watermark::at(1_025_000));
    assert_eq!((o.counters.too_late, o.counters.late_corrected), (0, 1), "within the lateness");
}

#[test]
fn the_wall_clock_moves_nothing_before_the_first_event() {
    let mut f = Feed::new();
    let o = f.send(0, 600_000, &[]);
    assert_eq!(o.watermark, Watermark::NONE);
    let o = f.send(0, 700_000, &["{bad".into()]);
    assert_eq!(o.watermark, Watermark::NONE, "an invalid line is no event time");
    let o = f.send(0, 800_000, &[click("a", 0, "1")]);
    assert_eq!(o.watermark, Watermark::at(-5_000));
    assert_eq!(o.counters.counted, 1, "history sent to a fresh engine is counted");
}

#[test]
fn replayed_offsets_are_ignored() {
    let mut f = Feed::new();
    let lines = [click("a", 0, "1"), click("a", 1, "2")];
    f.send(0, 0, &lines);
    f.offsets.insert(0, 1); // re-send from offset 1
    let o = f.send(0, 0, &[click("a", 1, "2"), click("a", 2, "3")]);
    assert_eq!(o.counters.duplicate, 0, "offset 1 was skipped, not deduplicated");
    assert_eq!(o.counters.counted, 3);
    assert_eq!(o.offsets, vec![(PartitionId(0), Offset(3))]);
}

#[test]
fn invalid_lines_are_reported_with_offsets() {
    let mut f = Feed::new();
    let o =
        f.send(3, 0, &["{oops".into(), click("a", 0, "1"), "".into(), r#"{"ad_id":"a"}"#.into()]);
    let got: Vec<_> =
        o.rejected.iter().map(|r| (r.partition.0, r.offset.0, r.error.kind())).collect();
    assert_eq!(got, vec![(3, 0, InvalidKind::NotJson), (3, 3, InvalidKind::MissingField)]);
    assert_eq!(o.counters.invalid_total(), 2);
    assert_eq!(o.counters.valid, 1);
}

#[test]
fn snapshot_refuses_other_shards_or_filters_and_damage() {
    let mut f = Feed::new();
    f.send(0, 0, &[click("a", 0, "1")]);
    let bytes = f.engine.snapshot();
    let other = EngineConfig { shards: 3, ..config() };
    assert!(matches!(
        Engine::restore(other, Arc::new(Filters::default()), &bytes),
        Err(SnapshotError::Mismatch { what: "shards", .. })
    ));
    let filters = Filters::compile(&[FilterConfig {
        id: "us".into(),
        country: Some(vec!["US".into()]),
        ..Default::default()
    }])
    .unwrap();
    assert!(matches!(
        Engine::restore(config(), Arc::new(filters), &bytes),
        Err(SnapshotError::Mismatch { what: "filters", .. })
    ));
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    assert!(Engine::restore(config(), Arc::new(Filters::default()), &bad).is_err());
    let back = Engine::restore(config(), Arc::new(Filters::default()), &bytes).unwrap();
    assert_eq!(back.snapshot(), bytes, "restore then snapshot is the identity");
}

#[test]
fn config_is_validated_with_the_key_named() {
    let bad = EngineConfig { dedup_horizon_ms: 60_000, ..config() };
    assert_eq!(bad.validate().unwrap_err().key, "dedup_horizon");
    let bad = EngineConfig { top_n: 0, ..config() };
    assert_eq!(bad.validate().unwrap_err().key, "top_n");
}

#[test]
fn too_late_clicks_are_reported_per_minute_ad_and_slot_and_recompute_counts_them() {
    let us = FilterConfig {
        id: "us".into(),
        country: Some(vec!["US".into()]),
        ..FilterConfig::default()
    };
    let filters = Filters::compile(&[us]).unwrap();
    let lines = [
        click("a", 600_000, "1"),
        // Minute 0 ends at 60 s; the watermark is 595 s: more than 2 min late.
        r#"{"ad_id":"a","click_timestamp":1000,"click_id":"2","country":"US"}"#.to_string(),
        click("a", 2_000, "3"),
        click("b", 3_000, "4"),
        click("a", 1_000, "2"), // a copy of a too-late click: too late as well
        click("a", 600_500, "1"), // a duplicate (same click_id)
    ];
    let mut live = Feed::with(config(), filters.clone());
    let out = live.send(0, 0, &lines);
    assert_eq!(out.counters.too_late, 4);
    let late: Vec<(i64, String, Vec<u64>)> =
        out.too_late.iter().map(|(m, ad, c)| (m.0, ad.to_string(), c.to_vec())).collect();
    assert_eq!(late, vec![(0, "a".into(), vec![3, 1]), (0, "b".into(), vec![1, 0])]);

    // Recomputation: nothing is too late; duplicates still count once; finish makes it final.
    let mut engine = Engine::recompute(config(), Arc::new(filters)).unwrap();
    let records: Vec<Record> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| Record {
            partition: PartitionId(0),
            offset: Offset(i as u64),
            payload: Payload::Line(l.as_bytes()),
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    let mut tops = Vec::new();
    for out in [engine.process(EventTime(0), &records), engine.finish(EventTime(700_000))] {
        assert_eq!(out.counters.too_late, 0);
        for (m, ad, c) in out.counts.iter() {
            counts.insert((m.0, ad.to_string()), c.to_vec());
        }
        tops.extend(out.top);
    }
    assert_eq!(counts[&(0, "a".to_string())], vec![2, 1]);
    assert_eq!(counts[&(0, "b".to_string())], vec![1, 0]);
    assert_eq!(counts[&(10, "a".to_string())], vec![1, 0]);
    let top0 = tops.iter().find(|t| t.minute == Minute(0) && t.slot == Slot::Total).unwrap();
    assert_eq!(top0.ads, vec![(AdId::new("a"), 2), (AdId::new("b"), 1)]);
    assert!(engine.watermark().is_final(Minute(10)), "finish makes every minute final");
}
