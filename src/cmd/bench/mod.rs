//! `adclick bench`: the end-to-end benchmark. It runs `adclick serve` as a child process on a
//! temporary data directory and drives it over HTTP from this process.
//!
//! 1. **Ingest**: `--events` pre-generated clicks (Zipf ads, 1% duplicates) in POSTs of
//!    `--batch` lines from `--clients` threads. Event time is historical and advances one minute
//!    per `--per-minute` events, so minutes become final through the stream itself.
//!    Throughput = events / (first send → the last minute final in the API).
//!    Latency, per minute: from the moment the client has sent the first click at or past the
//!    minute's end + watermark delay (the minute could be final from then on), to the moment
//!    `popular_ads?to=` reports it final (polled every 5 ms).
//! 2. **History queries**: `--history-events` clicks stamped a month back (older than the
//!    in-memory popular index holds) are ingested into a fresh server; then `popular_ads` over
//!    M = 60 and M = 1440 minutes ending in that history (answered from the store) and an
//!    `aggregated_count` over a 10,000-year range are timed.
//! 3. **Recovery**: a fresh server with checkpoints effectively off takes `--recovery-events`
//!    clicks, is killed with SIGKILL, and is restarted; the time until it listens again (after
//!    replaying the whole uncommitted tail) is reported.
//!
//! `--soak DURATION` runs a different benchmark instead: `adclick generate --rate --ads` drives a
//! server with default settings at a steady rate with live event times for DURATION, and a
//! table reports each minute of the run (see [`soak`]); then the server is killed with SIGKILL
//! at that steady state and the time until it listens again is reported.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::event::{EventTime, MINUTE_MS};
use crate::generate::{GenConfig, Generator};

mod duckdb;
mod observe;
mod recalc;
mod scaleout;
mod soak;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Clicks to ingest.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: usize,
    /// Lines per POST.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Concurrent client threads.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Events per minute of event time.
    #[arg(long, default_value_t = 20_000)]
    pub per_minute: usize,
    /// Clicks a month old for the history-query phase (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub history_events: usize,
    /// Clicks left uncommitted before the kill of the recovery phase (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub recovery_events: usize,
    /// Keep the data directories (printed) instead of deleting them.
    #[arg(long)]
    pub keep: bool,
    /// Run the soak benchmark for this long instead (e.g. 30m): a steady --rate with live times.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub soak: Option<Duration>,
    /// Clicks per second of the soak.
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// Distinct ads of the soak.
    #[arg(long, default_value_t = 200_000)]
    pub ads: u64,
    /// Scale-out benchmark: Kafka bootstrap brokers (with --postgres).
    #[arg(long)]
    pub kafka: Option<String>,
    /// Scale-out benchmark: a PostgreSQL URL whose user may create databases (one per run).
    #[arg(long)]
    pub postgres: Option<String>,
    /// Scale-out benchmark: aggregator process counts to run, one deployment each.
    #[arg(long, default_value = "1,2")]
    pub aggregators: String,
    /// Scale-out benchmark: seconds of the live stream (freshness, rebalance).
    #[arg(long, default_value_t = 150)]
    pub live_seconds: u64,
    /// Scale-out benchmark: clicks per second of the live stream.
    #[arg(long, default_value_t = 5_000)]
    pub live_rate: u64,
    /// Measure what observing costs instead: ingest throughput alone, with a dashboard open
    /// (its requests every 2 s) and with /metrics scraped every second, in this many
    /// interleaved rounds of --events clicks, each on a fresh server.
    #[arg(long)]
    pub observe_cost: Option<usize>,
    /// Measure against DuckDB instead: the --events workload written to one NDJSON file, then
    /// DuckDB's read_json + GROUP BY ad_id, minute over it and the same lines through adclick to
    /// durable, final results, alternating, in this many rounds; prints the ratio.
    #[arg(long)]
    pub duckdb: Option<usize>,
    /// Measure recalculation against DuckDB instead: the --events workload written as archive
    /// files, then DuckDB's count(DISTINCT identity) per ad and minute with the demo's filters
    /// and top-N over them and adclick's recomputation of the same, alternating, in this many
    /// rounds; prints the ratio and checks both computed the same totals.
    #[arg(long)]
    pub recalc_duckdb: Option<usize>,
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> anyhow::Result<(Server, Duration)> {
        let started = Instant::now();
        let mut cmd = Command::new(std::env::current_exe().context("locating adclick")?);
        cmd.args(["-q", "serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir).args(extra);
        Ok((Server::spawn(cmd, "the server")?, started.elapsed()))
    }

    /// Starts `cmd` (an `adclick serve`) and waits for the address it prints once listening.
    fn spawn(mut cmd: Command, what: &str) -> anyhow::Result<Server> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting adclick serve")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            bail!("{what} did not start: {line:?}");
        };
        Ok(Server { url: url.to_string(), child })
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn post(agent: &ureq::Agent, url: &str, body: &str) -> anyhow::Result<()> {
    loop {
        let r = agent.post(format!("{url}/v1/clicks")).send(body.as_bytes())?;
        match r.status().as_u16() {
            200 => return Ok(()),
            503 => std::thread::sleep(Duration::from_millis(20)),
            s => bail!("collector answered {s}"),
        }
    }
}

/// Batches of lines whose event time starts at `start` and advances a minute per `per_minute`.
fn workload(
    events: usize,
    batch: usize,
    per_minute: usize,
    start: i64,
    seed: u64,
) -> Vec<(i64, String)> {
    let mut g = Generator::new(GenConfig {
        seed,
        ads: 100_000,
        disorder_ms: 2_000,
        duplicate: 0.01,
        late: 0.0,
        too_late: 0.0,
        invalid: 0.0,
        ..GenConfig::default()
    });
    let step = MINUTE_MS as f64 / per_minute as f64;
    (0..events.div_ceil(batch))
        .map(|b| {
            let lines: Vec<String> = (b * batch..((b + 1) * batch).min(events))
                .map(|i| g.line(EventTime(start + (i as f64 * step) as i64)))
                .collect();
            let newest = start + (((b + 1) * batch).min(events) as f64 * step) as i64;
            (newest, lines.join("\n"))
        })
        .collect()
}

fn send_all(
    url: &str,
    batches: &[(i64, String)],
    clients: usize,
    sent_at: &Mutex<Vec<(i64, Instant)>>,
) -> anyhow::Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients.max(1))
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    let agent = agent();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((newest, body)) = batches.get(i) else { return Ok(()) };
                        post(&agent, url, body)?;
                        sent_at.lock().expect("not poisoned").push((*newest, Instant::now()));
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("client thread panicked"))
    })
}

/// Times a query `n` times; returns (p50, max) in ms and the last body.
fn time_query(agent: &ureq::Agent, url: &str, n: usize) -> anyhow::Result<(f64, f64, String)> {
    let mut took = Vec::with_capacity(n);
    let mut body = String::new();
    for _ in 0..n {
        let t = Instant::now();
        let mut r = agent.get(url).call()?;
        body = r.body_mut().read_to_string()?;
        took.push(t.elapsed().as_secs_f64() * 1000.0);
        if r.status() != 200 {
            bail!("{url}: {} {body}", r.status());
        }
    }
    took.sort_by(f64::total_cmp);
    Ok((took[took.len() / 2], took[took.len() - 1], body))
}

/// Phase 2: history a month old, queried from the store.
fn history_queries(server: &Server, args: &BenchArgs) -> anyhow::Result<()> {
    let start = (EventTime::now().0 / MINUTE_MS - 30 * 1440) * MINUTE_MS;
    eprintln!("bench: history phase: {} clicks a month old…", args.history_events);
    let batches = workload(args.history_events, args.batch, args.per_minute, start, 9);
    let minutes = (args.history_events / args.per_minute.max(1)) as i64 + 1;
    send_all(&server.url, &batches, args.clients, &Mutex::new(Vec::new()))?;
    let agent = agent();
    let to = start + minutes * MINUTE_MS;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let url = format!("{}/v1/ads/popular_ads?window=1&to={to}", server.url);
        let body = agent.get(&url).call()?.body_mut().read_to_string()?;
        if body.contains("\"final\":true") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the history never became final");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for window in [60, 1440] {
        let url = format!("{}/v1/ads/popular_ads?count=10&window={window}&to={to}", server.url);
        let (p50, max, body) = time_query(&agent, &url, 20)?;
        if !body.contains("\"ad_id\"") {
            bail!("popular_ads over history answered no ads: {body}");
        }
        println!(
            "  popular_ads M={window:<4} over history:  p50 {p50:.1} ms  max {max:.1} ms  ({} clicks, {minutes} minutes, from the store)",
            args.history_events
        );
    }
    let url = format!(
        "{}/v1/ads/ad-1/aggregated_count?from=0000-01-01T00:00:00Z&to=9999-12-31T23:00:00Z",
        server.url
    );
    let (p50, max, _) = time_query(&agent, &url, 20)?;
    println!("  aggregated_count, 10,000 years:   p50 {p50:.1} ms  max {max:.1} ms");
    Ok(())
}

/// The watermark delay the bench's servers run with (the default).
const DELAY_MS: i64 = 15_000;

/// The ingest workload: `events` clicks in batches, event time two hours back advancing a minute
/// per `per_minute` clicks, then one click per partition past the last minute's end + delay (the
/// watermark is the minimum over partitions), so that every minute becomes final. Returns the
/// start, the batches (newest event time, lines) and the minutes to await.
fn ingest_workload(
    events: usize,
    batch: usize,
    per_minute: usize,
) -> (i64, Vec<(i64, String)>, Vec<i64>) {
    // Whole minutes, two hours back: every minute is in the past and within any clock skew.
    let start = (EventTime::now().0 / MINUTE_MS - 120) * MINUTE_MS;
    eprintln!("bench: generating {events} clicks…");
    let mut batches = workload(events, batch, per_minute, start, 42);
    let last_minute_end = (batches.last().map_or(start, |b| b.0) / MINUTE_MS + 1) * MINUTE_MS;
    let partitions = 8u32;
    let mut covered = std::collections::BTreeSet::new();
    let sentinels: Vec<String> = (0..)
        .map(|i| format!("sentinel-{i}"))
        .filter(|ad| {
            covered.insert(crate::event::partition_of(crate::event::route_hash(ad), partitions))
        })
        .take(partitions as usize)
        .map(|ad| {
            format!("{{\"ad_id\":\"{ad}\",\"click_timestamp\":{}}}", last_minute_end + DELAY_MS + 1)
        })
        .collect();
    batches.push((last_minute_end + DELAY_MS + 1, sentinels.join("\n")));
    let minutes: Vec<i64> = (start / MINUTE_MS..last_minute_end / MINUTE_MS).collect();
    (start, batches, minutes)
}

/// What one ingest run measured.
struct Ingested {
    /// First send → the last batch acknowledged.
    sending: Duration,
    /// First send → every minute final in the API.
    total: Duration,
    /// Per minute: from the first acknowledged send whose newest click passes its end + delay,
    /// to the API reporting it final; sorted.
    latencies_ms: Vec<f64>,
    peak_rss_kib: Option<u64>,
}

/// Sends `batches` into a fresh server on `data` from `clients` threads while a poller awaits
/// each of `minutes` turning final in `popular_ads`.
fn ingest(
    data: &Path,
    batches: &[(i64, String)],
    minutes: &[i64],
    clients: usize,
) -> anyhow::Result<Ingested> {
    let (server, _) = Server::start(data, &[])?;
    eprintln!("bench: ingesting through {} ({clients} clients)…", server.url);
    let sent_at = Mutex::new(Vec::new());
    let finals: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let began = Instant::now();
    let poller = {
        let (url, finals, minutes) = (server.url.clone(), finals.clone(), minutes.to_vec());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let agent = agent();
            let deadline = Instant::now() + Duration::from_secs(600);
            for m in minutes {
                let to = (m + 1) * MINUTE_MS;
                loop {
                    let body = agent
                        .get(format!("{url}/v1/ads/popular_ads?to={to}"))
                        .call()?
                        .body_mut()
                        .read_to_string()?;
                    if body.contains("\"final\":true") {
                        finals.lock().expect("not poisoned").push((to, Instant::now()));
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("minute ending {to} never became final");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Ok(())
        })
    };
    send_all(&server.url, batches, clients, &sent_at)?;
    let sending = began.elapsed();
    poller.join().expect("poller panicked")?;
    let total = began.elapsed();
    let peak_rss_kib = server.peak_rss_kib();
    let mut sent = sent_at.into_inner().expect("not poisoned");
    sent.sort_by_key(|(_, at)| *at);
    let mut latencies_ms: Vec<f64> = finals
        .lock()
        .expect("not poisoned")
        .iter()
        .filter_map(|(end, final_at)| {
            let ready = sent.iter().find(|(newest, _)| *newest >= end + DELAY_MS)?.1;
            Some(final_at.saturating_duration_since(ready).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Ingested { sending, total, latencies_ms, peak_rss_kib })
}

/// The `p` quantile of sorted values (NaN when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match (&args.kafka, &args.postgres) {
        (Some(k), Some(p)) => return scaleout::run(&args, k, p),
        (None, None) => {}
        _ => bail!("--kafka and --postgres go together (the scale-out benchmark)"),
    }
    if let Some(duration) = args.soak {
        return soak::soak(&args, duration);
    }
    if let Some(rounds) = args.observe_cost {
        return observe::observe_cost(&args, rounds);
    }
    if let Some(rounds) = args.duckdb {
        return duckdb::against_duckdb(&args, rounds);
    }
    if let Some(rounds) = args.recalc_duckdb {
        return recalc::against_duckdb(&args, rounds);
    }
    let (start, batches, minutes) = ingest_workload(args.events, args.batch, args.per_minute);
    let dir = tempfile::Builder::new().prefix("adclick-bench-").tempdir().context("temp dir")?;
    let run = ingest(&dir.path().join("ingest"), &batches, &minutes, args.clients)?;
    let events = args.events as f64;
    println!(
        "adclick bench — {} clicks, {} clients, batches of {}, {} minutes of event time",
        args.events,
        args.clients,
        args.batch,
        minutes.len()
    );
    println!(
        "  ingest (HTTP, durable ack):       {:>10.0} events/s  ({:.2} s)",
        events / run.sending.as_secs_f64(),
        run.sending.as_secs_f64()
    );
    println!(
        "  through to final in the API:      {:>10.0} events/s  ({:.2} s)",
        events / run.total.as_secs_f64(),
        run.total.as_secs_f64()
    );
    let latencies = &run.latencies_ms;
    println!(
        "  minute end → final (ms):          p50 {:.0}  p99 {:.0}  max {:.0}  ({} minutes)",
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len()
    );
    if let Some(kib) = run.peak_rss_kib {
        println!("  server peak RSS:                  {:>10.1} MiB", kib as f64 / 1024.0);
    }
    if args.history_events > 0 {
        // A fresh server: on the first one the watermark has passed the history (too late).
        let (server, _) = Server::start(&dir.path().join("history"), &[])?;
        history_queries(&server, &args)?;
    }

    if args.recovery_events > 0 {
        let data = dir.path().join("recovery");
        let (server, _) = Server::start(&data, &["--checkpoint-interval", "24h"])?;
        eprintln!("bench: recovery phase: {} clicks, then kill -9…", args.recovery_events);
        let batches = workload(args.recovery_events, args.batch, args.per_minute, start, 7);
        send_all(&server.url, &batches, args.clients, &Mutex::new(Vec::new()))?;
        // Let the aggregator commit the tail, so the restart must replay all of it.
        let agent = agent();
        loop {
            let body =
                agent.get(format!("{}/healthz", server.url)).call()?.body_mut().read_to_string()?;
            if body.contains("\"lag_records\":0") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(server); // SIGKILL
        let (server, took) = Server::start(&data, &["--checkpoint-interval", "24h"])?;
        println!(
            "  recovery after kill -9:           {:>10.2} s  ({} clicks past the checkpoint replayed)",
            took.as_secs_f64(),
            args.recovery_events
        );
        drop(server);
    }
    if args.keep {
        println!("  data kept in {}", dir.keep().display());
    }
    Ok(())
}
