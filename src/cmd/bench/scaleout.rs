//! `adclick bench --kafka BROKERS --postgres URL`: the scale-out benchmark. For each aggregator
//! count of `--aggregators` (default 1,2) it runs a collector, a query process and that many
//! aggregators as child processes against a fresh topic and a fresh database, and reports:
//!
//! 1. **Throughput**: `--events` historical clicks posted to the collector by `--clients`
//!    threads; events/s from the first send until PostgreSQL's results reflect every accepted
//!    click (all of it aggregated and committed), and the ingest rate alone.
//! 2. **Freshness** (`--live-seconds`, at `--live-rate`): clicks stamped with the clock; for each
//!    minute, the delay from its end + watermark delay until the query role reports it final.
//! 3. **Rebalance** (with 2 or more aggregators): one is killed with SIGKILL during the live
//!    stream; the time until every partition it owned is committed again by another.

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{agent, send_all, workload, BenchArgs, Server};
use crate::event::{EventTime, MINUTE_MS};
use crate::generate::{GenConfig, Generator};

const PARTITIONS: i64 = 8;
const DELAY_MS: i64 = 15_000;

/// An `adclick serve` running `roles`.
fn start_role(env: &[(&str, String)], args: &[&str], roles: &str) -> anyhow::Result<Server> {
    let mut cmd = Command::new(std::env::current_exe().context("locating adclick")?);
    cmd.args(["-q", "serve", "--listen", "127.0.0.1:0", "--roles", roles]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Server::spawn(cmd, roles)
}

fn pg(url: &str) -> anyhow::Result<postgres::Client> {
    crate::scaleout::pg::connect(url).map_err(anyhow::Error::from)
}

/// Records reflected in the committed results (not the offsets: those also pass end
/// markers), partitions present, distinct owners.
fn progress(c: &mut postgres::Client) -> anyhow::Result<(i64, i64, i64)> {
    let r = c.query_one(
        "SELECT coalesce(sum(counted + duplicates + too_late + invalid), 0)::bigint, count(*), \
         count(DISTINCT owner) \
         FROM adclick_partitions",
        &[],
    )?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

fn await_until(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f()? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn run(args: &BenchArgs, brokers: &str, pg_url: &str) -> anyhow::Result<()> {
    let counts: Vec<usize> = args
        .aggregators
        .split(',')
        .map(|s| s.trim().parse().context("--aggregators: a list like 1,2"))
        .collect::<anyhow::Result<_>>()?;
    for n in counts {
        one(args, brokers, pg_url, n)?;
    }
    Ok(())
}

fn one(args: &BenchArgs, brokers: &str, pg_url: &str, n: usize) -> anyhow::Result<()> {
    let tag = format!("{}_{n}", EventTime::now().0);
    let db = format!("adclick_bench_{tag}");
    pg(pg_url)?.batch_execute(&format!("CREATE DATABASE {db}")).context("creating the database")?;
    let url = format!("{}/{db}", pg_url.rsplit_once('/').map_or(pg_url, |(base, _)| base));
    let topic = format!("adclick-bench-{tag}");
    let env = [("ADCLICK_CONSUMER_GROUP", format!("bench-{tag}"))];
    let common = ["--kafka", brokers, "--postgres", &url, "--topic", &topic, "--partitions", "8"];
    println!("scale-out, {n} aggregator process(es), topic {topic}, database {db}:");
    let query = start_role(&env, &common, "query")?;
    let collector = start_role(&env, &common, "collect")?;
    let mut aggs =
        (0..n).map(|_| start_role(&env, &common, "aggregate")).collect::<Result<Vec<_>, _>>()?;
    let mut c = pg(&url)?;
    await_until(120, "the aggregators to share the partitions", || {
        let (_, parts, owners) = progress(&mut c)?;
        Ok(parts == PARTITIONS && owners == n as i64)
    })?;

    // 1. Throughput.
    let start = (EventTime::now().0 / MINUTE_MS - 120) * MINUTE_MS;
    let batches = workload(args.events, args.batch, args.per_minute, start, 42);
    let t0 = Instant::now();
    send_all(&collector.url, &batches, args.clients, &Mutex::new(Vec::new()))?;
    let acked = t0.elapsed();
    // Every line of the workload is valid: the topic holds exactly `events` records.
    await_until(1800, "every click to be committed", || {
        Ok(progress(&mut c)?.0 >= args.events as i64)
    })?;
    let done = t0.elapsed();
    println!(
        "  throughput: {} clicks in {:.1} s = {:.0} clicks/s end to end (collector acknowledged all in {:.1} s: {:.0}/s)",
        args.events,
        done.as_secs_f64(),
        args.events as f64 / done.as_secs_f64(),
        acked.as_secs_f64(),
        args.events as f64 / acked.as_secs_f64()
    );

    // 2 and 3. A live stream; minutes' freshness; a kill during it.
    let live = Duration::from_secs(args.live_seconds);
    let rate = args.live_rate.max(1);
    let mut g = Generator::new(GenConfig {
        seed: 7,
        ads: 10_000,
        disorder_ms: 1_000,
        duplicate: 0.01,
        late: 0.0,
        too_late: 0.0,
        invalid: 0.0,
        ..GenConfig::default()
    });
    let agent = agent();
    let began = Instant::now();
    let first_minute = EventTime::now().0 / MINUTE_MS + 1;
    // The last minute the stream covers whole.
    let last_minute = (EventTime::now().0 + live.as_millis() as i64) / MINUTE_MS - 1;
    let mut killed: Option<(Instant, String)> = None;
    let mut rebalanced: Option<Duration> = None;
    let mut finals: Vec<(i64, f64)> = Vec::new();
    let mut next_minute = first_minute;
    let batch = (rate / 10).max(1) as usize;
    while began.elapsed() < live || next_minute <= last_minute {
        let tick = Instant::now();
        if began.elapsed() < live {
            let at = EventTime::now().0;
            let lines: Vec<String> = (0..batch).map(|_| g.line(EventTime(at))).collect();
            super::post(&agent, &collector.url, &lines.join("\n"))?;
        }
        if n >= 2 && killed.is_none() && began.elapsed() >= live / 3 {
            let victim = aggs.pop().expect("n >= 2");
            let pid = format!(":{}", victim.child.id());
            drop(victim); // SIGKILL
            killed = Some((Instant::now(), pid));
        }
        if let (Some((at, pid)), None) = (&killed, rebalanced) {
            let r = c.query_one(
                "SELECT count(*) FROM adclick_partitions WHERE owner LIKE '%' || $1",
                &[pid],
            )?;
            if r.get::<_, i64>(0) == 0 {
                rebalanced = Some(at.elapsed());
            }
        }
        // Has the next minute become final?
        if next_minute <= last_minute
            && EventTime::now().0 >= (next_minute + 1) * MINUTE_MS + DELAY_MS
        {
            let to = (next_minute + 1) * MINUTE_MS;
            let body = agent
                .get(format!("{}/v1/ads/popular_ads?to={to}", query.url))
                .call()?
                .body_mut()
                .read_to_string()?;
            if body.contains("\"final\":true") {
                let late = EventTime::now().0 - (to + DELAY_MS);
                finals.push((next_minute, late as f64 / 1000.0));
                next_minute += 1;
            }
        }
        if began.elapsed() > live + Duration::from_secs(180) {
            bail!("minute {next_minute} never became final");
        }
        std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
    }
    let mut lat: Vec<f64> = finals.iter().map(|(_, s)| *s).collect();
    lat.sort_by(f64::total_cmp);
    if let (Some(first), Some(last)) = (lat.first(), lat.last()) {
        println!(
            "  freshness at {rate}/s live: minute end + {}s → final in the query role: min {first:.2} s, p50 {:.2} s, max {last:.2} s ({} minutes)",
            DELAY_MS / 1000,
            lat[lat.len() / 2],
            lat.len()
        );
    }
    match (killed, rebalanced) {
        (Some(_), Some(d)) => println!(
            "  rebalance: one aggregator killed (SIGKILL) mid-stream; its partitions committed by the others after {:.1} s",
            d.as_secs_f64()
        ),
        (Some(_), None) => println!("  rebalance: the killed aggregator's partitions were not taken over during the run"),
        _ => {}
    }
    drop(aggs);
    drop(collector);
    drop(query);
    Ok(())
}
