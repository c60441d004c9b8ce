//! The engine against the reference model: a seeded oracle workload with every kind of input,
//! and property tests for batch boundaries, shard counts, snapshots, minute edges and identity.

use std::sync::Arc;

use adclick::engine::EngineConfig;
use adclick::event::{parse_line, route_hash, EventTime, InvalidKind, Validation};
use adclick::filter::{FilterConfig, Filters};
use adclick::generate::{GenConfig, Generator};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::model::{assert_same, run_engine, run_engine_with, run_model, Batch, Folded};

pub(crate) fn filters() -> Arc<Filters> {
    let list = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    Arc::new(
        Filters::compile(&[
            FilterConfig { id: "us".into(), country: list(&["US"]), ..Default::default() },
            FilterConfig {
                id: "office".into(),
                ip: list(&["10.0.0.0/8", "2001:db8::/32"]),
                ..Default::default()
            },
            FilterConfig {
                id: "vip-de".into(),
                country: list(&["DE", "GB"]),
                user_id: list(&["u-1", "u-2", "u-3", "u-4", "u-5"]),
                ..Default::default()
            },
        ])
        .expect("valid filters"),
    )
}

pub(crate) fn small_config(shards: usize) -> EngineConfig {
    EngineConfig {
        watermark_delay_ms: 5_000,
        idle_timeout_ms: 20_000,
        allowed_lateness_ms: 2 * 60_000,
        dedup_horizon_ms: 4 * 60_000,
        max_clock_skew_ms: 60_000,
        top_n: 5,
        shards,
        dedup_capacity: 1024,
        identity_key: Default::default(),
    }
}

/// A generated stream cut into batches over `parts` partitions with random interleaving, random
/// batch sizes, occasional idle gaps and re-sent (already consumed) records.
pub(crate) fn workload(seed: u64, events: usize, parts: u32) -> Vec<Batch> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xabcdef);
    let assigned = seed % 2 == 1;
    let mut generator = Generator::new(GenConfig {
        seed,
        ads: 40,
        zipf: 1.1,
        disorder_ms: 8_000,
        duplicate: 0.06,
        late: 0.03,
        late_max_ms: 3 * 60_000,
        too_late: 0.01,
        too_late_ms: 10 * 60_000,
        invalid: 0.03,
        click_id: 0.6,
        users: 8,
    });
    let mut now = 1_796_000_000_000i64;
    let mut queues: Vec<Vec<(Vec<u8>, i64)>> = vec![Vec::new(); parts as usize];
    for i in 0..events {
        now += rng.random_range(0..40);
        let mut line = generator.line(EventTime(now)).into_bytes();
        if i % 97 == 0 {
            line = b"   ".to_vec(); // blank lines keep their offsets
        }
        let v = Validation { now: EventTime(now), max_skew_ms: 60_000 };
        let p = match parse_line(&line, v) {
            Ok(Some(c)) => (route_hash(&c.ad_id) % parts as u64) as u32,
            _ => rng.random_range(0..parts),
        };
        queues[p as usize].push((line, now));
    }
    let mut next = vec![0usize; parts as usize];
    let mut batches = Vec::new();
    let mut wall = 1_796_000_000_000i64;
    let mut records = Vec::new();
    let mut newest = wall;
    while next.iter().zip(&queues).any(|(n, q)| *n < q.len()) {
        // Mostly the partition that lags furthest in event time, as a fair consumer would.
        let lagging = (0..parts as usize)
            .filter(|&p| next[p] < queues[p].len())
            .min_by_key(|&p| queues[p][next[p]].1);
        let p = if rng.random_bool(0.7) {
            lagging.expect("some queue is not empty")
        } else {
            rng.random_range(0..parts) as usize
        };
        if next[p] == queues[p].len() {
            continue;
        }
        if next[p] > 10 && rng.random_bool(0.02) {
            // Re-send records the engine has (probably) already consumed.
            let from = next[p] - rng.random_range(1..=10);
            for (o, (line, _)) in queues[p].iter().enumerate().take(next[p]).skip(from) {
                records.push((p as u32, o as u64, line.clone()));
            }
        }
        let take = rng.random_range(1..=300).min(queues[p].len() - next[p]);
        for (o, (line, t)) in queues[p].iter().enumerate().skip(next[p]).take(take) {
            records.push((p as u32, o as u64, line.clone()));
            newest = newest.max(*t);
        }
        next[p] += take;
        if rng.random_bool(0.4) {
            wall = wall.max(newest) + rng.random_range(0..2_000);
            // Some runs own every partition from the start, and are re-assigned them now and
            // then (a restart); others meet partitions as they deliver.
            let assign = if assigned && (batches.is_empty() || rng.random_bool(0.01)) {
                (0..parts).collect()
            } else {
                Vec::new()
            };
            batches.push(Batch { wall, records: std::mem::take(&mut records), assign });
            if rng.random_bool(0.01) {
                wall += rng.random_range(20_000..40_000);
                batches.push(Batch { wall, records: Vec::new(), assign: Vec::new() });
            }
        }
    }
    wall = wall.max(newest) + 1_000;
    batches.push(Batch { wall, records, assign: Vec::new() });
    // Flush: every partition idle, the watermark follows the wall clock past every minute.
    batches.push(Batch { wall: wall + 3_600_000, records: Vec::new(), assign: Vec::new() });
    batches
}

#[test]
fn oracle_seeded_workloads() {
    let filters = filters();
    for seed in 1..=6u64 {
        let parts = 1 + (seed % 4) as u32;
        let batches = workload(seed, 25_000, parts);
        let shards = 1 + (seed as usize * 7) % 5;
        let cfg = small_config(shards);
        let model = run_model(&cfg, &filters, &batches);

        // The workload must exercise every path, or the comparison proves little.
        let c = &model.counters;
        assert!(c.counted > 15_000 && c.duplicate > 500, "seed {seed}: {c:?}");
        assert!(c.late_corrected > 50 && c.too_late > 50, "seed {seed}: {c:?}");
        for kind in [
            InvalidKind::NotJson,
            InvalidKind::MissingField,
            InvalidKind::BadTimestamp,
            InvalidKind::InFuture,
        ] {
            assert!(c.invalid[kind.index()] > 0, "seed {seed}: no {kind:?}");
        }
        assert!(model.tops.len() > 20, "seed {seed}: few final minutes");

        let plain = run_engine(&cfg, &filters, &batches, &[]);
        assert_same(&plain, &model, &format!("seed {seed}, {shards} shards"));

        let n = batches.len();
        let checkpoints: Vec<usize> = (0..n).step_by((n / 12).max(1)).collect();
        let restored = run_engine_with(
            &cfg,
            &filters,
            &batches,
            &[1, n / 3, n / 2, n - 1],
            &checkpoints,
            false,
        );
        assert_same(&restored, &model, &format!("seed {seed}, restored"));

        let prevalidated = run_engine_with(&cfg, &filters, &batches, &[n / 4], &[], true);
        assert_same(&prevalidated, &model, &format!("seed {seed}, pre-validated"));
    }
}

#[test]
fn dedup_state_is_bounded_by_the_horizon() {
    use adclick::engine::{Engine, Offset, PartitionId, Payload, Record};
    let cfg = small_config(1);
    let mut engine = Engine::new(cfg.clone(), Arc::new(Filters::default())).unwrap();
    let mut held = Vec::new();
    // Incremental checkpoints once a minute, kept while the engine retains them.
    let mut files: Vec<(Vec<u8>, adclick::engine::Extent)> = Vec::new();
    let mut most_files = 0;
    // One hour of 20 clicks per second, all distinct.
    for sec in 0..3_600i64 {
        let t = 1_796_000_000_000 + sec * 1000;
        let lines: Vec<String> = (0..20)
            .map(|i| {
                format!(r#"{{"ad_id":"ad-{i}","click_timestamp":{t},"click_id":"{sec}-{i}"}}"#)
            })
            .collect();
        let records: Vec<Record> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| Record {
                partition: PartitionId(0),
                offset: Offset((sec * 20) as u64 + i as u64),
                payload: Payload::Line(l.as_bytes()),
            })
            .collect();
        engine.process(EventTime(t), &records);
        held.push(engine.shard_stats().0);
        if sec % 60 == 59 {
            files.retain(|(_, extent)| engine.retains(*extent));
            files.push(engine.checkpoint());
            most_files = most_files.max(files.len());
        }
    }
    // Each file holds about a minute of changes and is dropped once its minutes expired.
    assert!(most_files <= 10, "checkpoint files kept: {most_files}");
    let chain: Vec<&[u8]> = files.iter().map(|(f, _)| f.as_slice()).collect();
    let restored =
        Engine::restore_chain(cfg.clone(), Arc::new(Filters::default()), &chain).unwrap();
    assert_eq!(restored.shard_stats(), engine.shard_stats(), "the kept files hold the whole state");
    // Horizon 4 min + lateness 2 min + a minute of sweep slack + delay: at most ~8.1 min of clicks.
    let bound = 20 * 60 * 9;
    assert!(held.iter().all(|&n| n <= bound), "max held {}", held.iter().max().unwrap());
    assert!(held[3_599] > 20 * 60 * 5, "it does hold the horizon: {}", held[3_599]);
}

/// A small event for property tests: fields drawn from tiny pools so identities collide often.
#[derive(Clone, Debug)]
struct Ev {
    part: u32,
    ad: u8,
    /// Minutes and milliseconds around a minute edge, relative to the base time.
    minute: i64,
    edge: i64,
    click_id: Option<u8>,
    user: Option<u8>,
    ip: Option<u8>,
    us: bool,
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        0..3u32,
        0..6u8,
        -2..8i64,
        // 5_000 is the watermark delay: the watermark lands exactly on minute edges.
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(59_999),
            Just(4_999),
            Just(5_000),
            Just(5_001),
            0..60_000i64
        ],
        proptest::option::of(0..4u8),
        proptest::option::of(0..2u8),
        proptest::option::of(0..2u8),
        any::<bool>(),
    )
        .prop_map(|(part, ad, minute, edge, click_id, user, ip, us)| Ev {
            part,
            ad,
            minute,
            edge,
            click_id,
            user,
            ip,
            us,
        })
}

fn to_batches(base: i64, events: &[Ev], cuts: &[usize], assign: bool) -> Vec<Batch> {
    let mut offsets = [0u64; 3];
    let mut records = Vec::new();
    for e in events {
        let t = base + e.minute * 60_000 + e.edge;
        let mut line = format!(r#"{{"ad_id":"a{}","click_timestamp":{t}"#, e.ad);
        if let Some(c) = e.click_id {
            line += &format!(r#","click_id":"c{c}""#);
        }
        if let Some(u) = e.user {
            line += &format!(r#","user_id":"u{u}""#);
        }
        if let Some(i) = e.ip {
            // Two spellings of each address: identities compare addresses, not text.
            let prefix = if e.us { "::ffff:" } else { "" };
            line += &format!(r#","ip":"{prefix}10.0.0.{i}""#);
        }
        if e.us {
            line += r#","country":"us""#;
        }
        line.push('}');
        records.push((e.part, offsets[e.part as usize], line.into_bytes()));
        offsets[e.part as usize] += 1;
    }
    // A constant wall far before the events: only event time moves the watermark.
    let wall = base - 3_600_000;
    let mut batches = Vec::new();
    let mut at = 0;
    // Owning every partition that will deliver, from the start.
    let mut owned: Vec<u32> = events.iter().map(|e| e.part).collect();
    owned.sort_unstable();
    owned.dedup();
    let first = |batches: &Vec<Batch>| {
        if assign && batches.is_empty() {
            owned.clone()
        } else {
            Vec::new()
        }
    };
    for &cut in cuts {
        let cut = cut.min(records.len()).max(at);
        let assign = first(&batches);
        batches.push(Batch { wall, records: records[at..cut].to_vec(), assign });
        at = cut;
    }
    let assign = first(&batches);
    batches.push(Batch { wall, records: records[at..].to_vec(), assign });
    batches
}

fn prop_config(shards: usize) -> EngineConfig {
    EngineConfig { max_clock_skew_ms: 86_400_000, top_n: 3, ..small_config(shards) }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The results are the model's whatever the batch boundaries, shard counts and
    /// incremental checkpoint and restore points, and with every partition owned from the start the boundaries
    /// change nothing; also across minute edges at epoch 0 and before 1970.
    #[test]
    fn boundaries_shards_and_snapshots_do_not_matter(
        events in proptest::collection::vec(ev(), 1..120),
        cuts_a in proptest::collection::vec(0..120usize, 0..6),
        cuts_b in proptest::collection::vec(0..120usize, 0..6),
        shards_a in 1..5usize,
        shards_b in 1..5usize,
        restore in proptest::collection::vec(0..8usize, 0..3),
        checkpoints in proptest::collection::vec(0..8usize, 0..5),
        base in prop_oneof![Just(0i64), Just(-120_000), Just(-86_400_000 * 365), Just(1_796_000_000_000)],
        assign in any::<bool>(),
    ) {
        let filters = filters();
        let mut cuts_a = cuts_a;
        cuts_a.sort();
        let mut cuts_b = cuts_b;
        cuts_b.sort();
        let a = to_batches(base, &events, &cuts_a, assign);
        let b = to_batches(base, &events, &cuts_b, assign);
        let ea = run_engine(&prop_config(shards_a), &filters, &a, &[]);
        let eb = run_engine_with(&prop_config(shards_b), &filters, &b, &restore, &checkpoints, false);
        assert_same(&ea, &run_model(&prop_config(1), &filters, &a), "cuts a");
        assert_same(&eb, &run_model(&prop_config(1), &filters, &b), "cuts b, restored");
        // Batch cuts cannot matter once every partition is owned from the start; before a
        // partition's first record the engine cannot know it exists.
        if assign {
            prop_assert_eq!(model_without_tops(&ea), model_without_tops(&eb));
        }
    }

    /// Top-N lists order by count descending, then ad id bytes ascending, whatever the input order.
    #[test]
    fn top_n_tie_breaks(items in proptest::collection::btree_map("[a-cA-C0-9é]{1,3}", 1..4u64, 0..30), n in 0..8usize) {
        let ranked: Vec<_> = items.iter().rev().map(|(a, c)| (adclick::event::AdId::new(a), *c)).collect();
        let got = adclick::rank::top(ranked, n);
        let mut want: Vec<_> = items.into_iter().collect();
        want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.as_bytes().cmp(b.0.as_bytes())));
        want.truncate(n);
        let got: Vec<_> = got.into_iter().map(|(a, c)| (a.to_string(), c)).collect();
        prop_assert_eq!(got, want);
    }
}

fn model_without_tops(f: &Folded) -> Folded {
    Folded { tops: Default::default(), ..f.clone() }
}

/// SPEC §2: the watermark is the minimum over every owned partition, those that have delivered
/// nothing yet included. Partition 0's run over ten minutes of history is read before partition
/// 1's first records, in one batch or in two: none of partition 1's clicks is too late.
#[test]
fn an_owned_partition_that_has_not_delivered_holds_the_watermark() {
    use adclick::engine::{Engine, Offset, PartitionId, Payload, Record};
    let cfg = small_config(2);
    let month_ago = 1_796_000_000_000 - 30 * 86_400_000;
    let wall = EventTime(1_796_000_000_000);
    let line = |ad: &str, t: i64, id: usize| {
        format!(r#"{{"ad_id":"{ad}","click_timestamp":{t},"click_id":"{id}"}}"#)
    };
    // Partition 0: 600 clicks over ten minutes; partition 1: 60 clicks in the first minute.
    let p0: Vec<String> = (0..600).map(|i| line("a", month_ago + i as i64 * 1_000, i)).collect();
    let p1: Vec<String> = (0..60).map(|i| line("b", month_ago + i as i64 * 1_000, i)).collect();
    let records: Vec<Record> = p0
        .iter()
        .enumerate()
        .map(|(i, l)| (0, i, l))
        .chain(p1.iter().enumerate().map(|(i, l)| (1, i, l)))
        .map(|(p, i, l)| Record {
            partition: PartitionId(p),
            offset: Offset(i as u64),
            payload: Payload::Line(l.as_bytes()),
        })
        .collect();
    // One batch: partition 1's records, read after partition 0's run, are not too late.
    let mut engine = Engine::new(cfg.clone(), Arc::new(Filters::default())).unwrap();
    let out = engine.process(wall, &records);
    assert_eq!(out.counters.too_late, 0, "{:?}", out.counters);
    assert_eq!(out.counters.counted, 660);
    // Two batches: partition 0's run, then (a second later) partition 1's first records. An
    // owned partition holds the watermark although it has delivered nothing yet.
    let (first, second) = records.split_at(600);
    let mut owned = Engine::new(cfg.clone(), Arc::new(Filters::default())).unwrap();
    owned.assign(&[PartitionId(0), PartitionId(1)], wall);
    owned.process(wall, first);
    let out = owned.process(EventTime(wall.0 + 1_000), second);
    assert_eq!((out.counters.too_late, out.counters.counted), (0, 660));
    // Without the assignment partition 0's run alone moves the watermark and partition 1's clicks
    // are judged too late: the case this rule exists for.
    let mut unassigned = Engine::new(cfg, Arc::new(Filters::default())).unwrap();
    unassigned.process(wall, first);
    let out = unassigned.process(EventTime(wall.0 + 1_000), second);
    assert_eq!(out.counters.too_late, 60);
}

/// Every wall-clock decision replays identically: the service processes a tick only when it
/// will commit (and so journal) it, deciding with `peek_watermark`, which must agree with the
/// tick and change nothing. Skipping a tick is not harmless in general: this workload shows one
/// that changes the outcome, which is why uncommitted ticks are never run.
#[test]
fn ticks_are_run_only_when_committed() {
    use adclick::engine::{Engine, Offset, PartitionId, Payload, Record};
    let cfg = small_config(1);
    let base = 1_796_000_000_000i64;
    let click = |ad: &str, t: i64| format!(r#"{{"ad_id":"{ad}","click_timestamp":{t}}}"#);
    let (a, b, c) = (click("a", base + 50_000), click("b", base), click("c", base + 40_000));
    fn rec(p: u32, o: u64, l: &str) -> Record<'_> {
        Record {
            partition: PartitionId(p),
            offset: Offset(o),
            payload: Payload::Line(l.as_bytes()),
        }
    }
    let run = |ticks: &[i64]| {
        let mut e = Engine::new(cfg.clone(), Arc::new(Filters::default())).unwrap();
        e.assign(&[PartitionId(0), PartitionId(1)], EventTime(base));
        e.process(EventTime(base), &[rec(0, 0, &a), rec(1, 0, &b)]);
        e.process(EventTime(base + 5_000), &[rec(0, 1, &a)]);
        for &t in ticks {
            let peeked = e.peek_watermark(EventTime(t));
            let before = e.snapshot();
            assert_eq!(e.peek_watermark(EventTime(t)), peeked);
            assert_eq!(e.snapshot(), before, "peeking changes no state");
            assert_eq!(e.process(EventTime(t), &[]).watermark, peeked);
        }
        e.process(EventTime(base + 30_000), &[rec(1, 1, &c)]).watermark
    };
    // At base + 21 s partition 1 is idle and partition 0 (at base + 50 s) alone sets the
    // watermark; by the next batch partition 1 delivers again and would hold it lower.
    assert_eq!(run(&[]), adclick::engine::Watermark::at(base + 35_000));
    assert_eq!(run(&[base + 21_000]), adclick::engine::Watermark::at(base + 45_000));
}
