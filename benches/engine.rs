//! `cargo bench --bench engine`: the engine on one core.
//!
//! - `engine/pipeline`: 1,000,000 pre-generated NDJSON lines (100,000 ads, Zipf 1.05, 2 filters,
//!   1% duplicates) through parse + validate + dedup + aggregate + top-N, in batches of 10,000,
//!   ending with a flush that finalizes every minute.
//! - `engine/pipeline_grown`: the same with the dedup table grown from empty (`dedup_capacity` 0)
//!   instead of sized up front (the default, 2^20 identities).
//! - `engine/prevalidated`: the same clicks validated upstream (the service's aggregator path).
//! - `engine/parse_only`: the same lines through `parse_line` alone, the baseline for the JSON cost.
//! - `snapshot/*`: encoding and restoring the state left by those lines (size printed).
//! - `popular/*`: exact popular ads over 60 minutes of about 1.7 million distinct ads.

use std::hint::black_box;
use std::sync::Arc;

use adclick::engine::{Engine, EngineConfig, Offset, PartitionId, Payload, Record};
use adclick::event::{parse_line, EventTime, Validation};
use adclick::filter::{FilterConfig, Filters};
use adclick::generate::{GenConfig, Generator};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const EVENTS: usize = 1_000_000;
const BATCH: usize = 10_000;
const START: i64 = 1_796_000_000_000;

struct Input {
    lines: Vec<String>,
    /// Wall time of each batch: the newest event time in it.
    walls: Vec<i64>,
}

fn input() -> Input {
    let mut g = Generator::new(GenConfig {
        seed: 42,
        ads: 100_000,
        zipf: 1.05,
        duplicate: 0.01,
        late: 0.0,
        too_late: 0.0,
        invalid: 0.0,
        ..GenConfig::default()
    });
    // 20,000 clicks per second of event time: 50 s of traffic.
    let lines: Vec<String> =
        (0..EVENTS).map(|i| g.line(EventTime(START + i as i64 / 20))).collect();
    let walls = (0..EVENTS / BATCH).map(|b| START + ((b + 1) * BATCH) as i64 / 20).collect();
    Input { lines, walls }
}

fn filters() -> Arc<Filters> {
    Arc::new(
        Filters::compile(&[
            FilterConfig {
                id: "us".into(),
                country: Some(vec!["US".into()]),
                ..Default::default()
            },
            FilterConfig {
                id: "office".into(),
                ip: Some(vec!["10.0.0.0/8".into()]),
                ..Default::default()
            },
        ])
        .expect("valid"),
    )
}

fn run(engine: &mut Engine, input: &Input, flush: bool) -> u64 {
    let mut records = Vec::with_capacity(BATCH);
    for (b, chunk) in input.lines.chunks(BATCH).enumerate() {
        records.clear();
        records.extend(chunk.iter().enumerate().map(|(i, l)| Record {
            partition: PartitionId(0),
            offset: Offset((b * BATCH + i) as u64),
            payload: Payload::Line(l.as_bytes()),
        }));
        black_box(engine.process(EventTime(input.walls[b]), &records));
    }
    finish(engine, flush)
}

/// As [`run`] with clicks validated upstream (the service's aggregator path: no JSON).
fn run_prevalidated(engine: &mut Engine, batches: &[Vec<Record<'_>>], walls: &[i64]) -> u64 {
    for (b, records) in batches.iter().enumerate() {
        black_box(engine.process(EventTime(walls[b]), records));
    }
    finish(engine, true)
}

fn finish(engine: &mut Engine, flush: bool) -> u64 {
    if flush {
        let out = engine.process(EventTime(START + 3_600_000), &[]);
        assert!(!out.top.is_empty());
        return out.counters.counted;
    }
    0
}

fn bench(c: &mut Criterion) {
    let input = input();
    let defaults = adclick::config::Config::default().validate().expect("the defaults are valid");
    let config = EngineConfig { shards: 1, ..defaults.engine };
    let filters = filters();

    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("pipeline", |b| {
        b.iter_batched(
            || Engine::new(config.clone(), filters.clone()).expect("valid"),
            |mut engine| run(&mut engine, &input, true),
            BatchSize::PerIteration,
        )
    });
    // The same with a dedup table grown from empty instead of sized up front (dedup_capacity 0).
    let grown = EngineConfig { dedup_capacity: 0, ..config.clone() };
    g.bench_function("pipeline_grown", |b| {
        b.iter_batched(
            || Engine::new(grown.clone(), filters.clone()).expect("valid"),
            |mut engine| run(&mut engine, &input, true),
            BatchSize::PerIteration,
        )
    });
    let v = Validation { now: EventTime(START + 3_600_000), max_skew_ms: 300_000 };
    let batches: Vec<Vec<Record>> = input
        .lines
        .chunks(BATCH)
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, l)| Record {
                    partition: PartitionId(0),
                    offset: Offset((b * BATCH + i) as u64),
                    payload: Payload::Click(
                        parse_line(l.as_bytes(), v).expect("valid").expect("not blank"),
                    ),
                })
                .collect()
        })
        .collect();
    g.bench_function("prevalidated", |b| {
        b.iter_batched(
            || Engine::new(config.clone(), filters.clone()).expect("valid"),
            |mut engine| run_prevalidated(&mut engine, &batches, &input.walls),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("parse_only", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for l in &input.lines {
                n += parse_line(l.as_bytes(), v).map(|c| c.is_some()).unwrap_or(false) as usize;
            }
            n
        })
    });
    g.finish();

    let mut engine = Engine::new(config.clone(), filters.clone()).expect("valid");
    run(&mut engine, &input, false);
    let bytes = engine.snapshot();
    let (identities, windows) = engine.shard_stats();
    eprintln!(
        "snapshot: {} bytes for {identities} identities and {windows} windows ({:.1} bytes/identity)",
        bytes.len(),
        bytes.len() as f64 / identities as f64
    );
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("encode", |b| b.iter(|| engine.snapshot()));
    g.bench_function("restore", |b| {
        b.iter(|| Engine::restore(config.clone(), filters.clone(), &bytes).expect("restores"))
    });
    g.finish();

    // An incremental checkpoint after the last 5% of the input (what changed since the one before).
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10);
    let tail = input.lines.len() / 20;
    g.throughput(Throughput::Elements(tail as u64));
    g.bench_function("incremental_5pct", |b| {
        b.iter_batched(
            || {
                let mut engine = Engine::new(config.clone(), filters.clone()).expect("valid");
                let head = Input {
                    lines: input.lines[..input.lines.len() - tail].to_vec(),
                    walls: input.walls.clone(),
                };
                run(&mut engine, &head, false);
                engine.checkpoint();
                let rest = Input {
                    lines: input.lines[input.lines.len() - tail..].to_vec(),
                    walls: input.walls.clone(),
                };
                run(&mut engine, &rest, false);
                engine
            },
            |mut engine| engine.checkpoint().0.len(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// `dedup_lookup/*`: the lookup structure alone, for the choice in `engine::dedup`: one table
/// for every identity against one table per event minute probed over the ±10 min horizon
/// (expiry would then drop whole tables). 2 M distinct identities, 2 per ms of event time (so the
/// horizon spans its 11 minutes before), each checked and inserted once.
fn dedup_lookup(c: &mut Criterion) {
    use hashbrown::HashMap;
    use rand::{rngs::SmallRng, Rng, SeedableRng};
    const N: usize = 2_000_000;
    const HORIZON: i64 = 600_000;
    let mut rng = SmallRng::seed_from_u64(3);
    let ids: Vec<(u128, i64)> = (0..N).map(|i| (rng.random(), START + i as i64 / 2)).collect();
    let mut g = c.benchmark_group("dedup_lookup");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("one_table", |b| {
        b.iter(|| {
            let mut t: HashMap<u128, i64> = HashMap::with_capacity(1 << 20);
            let mut new = 0;
            for &(id, at) in &ids {
                match t.get(&id) {
                    Some(&s) if (s - at).abs() <= HORIZON => {}
                    _ => {
                        t.insert(id, at);
                        new += 1;
                    }
                }
            }
            new
        })
    });
    g.bench_function("table_per_minute", |b| {
        b.iter(|| {
            let mut minutes: std::collections::BTreeMap<i64, HashMap<u128, i64>> =
                Default::default();
            let mut new = 0;
            for &(id, at) in &ids {
                let m = at.div_euclid(60_000);
                let lo = (at - HORIZON).div_euclid(60_000);
                let hi = (at + HORIZON).div_euclid(60_000);
                let dup = minutes
                    .range(lo..=hi)
                    .any(|(_, t)| t.get(&id).is_some_and(|&s| (s - at).abs() <= HORIZON));
                if !dup {
                    minutes.entry(m).or_default().insert(id, at);
                    new += 1;
                }
            }
            new
        })
    });
    g.finish();
}

/// `popular/*`: exact top-k over 60 minutes holding about 1.7 million distinct ads (per minute
/// 50,000 Zipf-popular ads of a million, plus 16,667 ads seen only in that minute), on live
/// minutes (no blocks) and on sealed minutes (pre-summed blocks).
fn popular(c: &mut Criterion) {
    use adclick::event::{AdId, Minute};
    use adclick::popular::Popular;
    use rand::{rngs::SmallRng, Rng, SeedableRng};
    use rand_distr::{Distribution, Zipf};

    let mut rng = SmallRng::seed_from_u64(7);
    let zipf = Zipf::new(1_000_000.0, 1.05).expect("valid");
    let mut p = Popular::new();
    let mut distinct = std::collections::HashSet::new();
    for m in 0..60i64 {
        let mut column = std::collections::HashMap::new();
        while column.len() < 50_000 {
            *column.entry(zipf.sample(&mut rng) as u64).or_insert(0u64) += 1;
        }
        for t in 0..16_667u64 {
            column.insert(1_000_000 + m as u64 * 16_667 + t, rng.random_range(1..3));
        }
        for (ad, n) in column {
            let ad = AdId::new(&format!("ad-{ad}"));
            distinct.insert(ad.clone());
            p.set(Minute(m), &ad, n);
        }
    }
    eprintln!("popular: {} distinct ads over 60 minutes", distinct.len());
    let mut g = c.benchmark_group("popular");
    g.sample_size(20);
    g.bench_function("top10_m60_live", |b| b.iter(|| black_box(p.top(Minute(60), 60, 10))));
    p.seal_below(Minute(60));
    let _ = p.top(Minute(60), 60, 10);
    g.bench_function("top10_m60_sealed", |b| b.iter(|| black_box(p.top(Minute(60), 60, 10))));
    g.bench_function("top1000_m55_sealed_unaligned", |b| {
        b.iter(|| black_box(p.top(Minute(57), 55, 1000)))
    });
    g.finish();
}

criterion_group!(benches, bench, popular, dedup_lookup);
criterion_main!(benches);
