//! `adclick generate`: deterministic synthetic clicks to a file, stdout, a collector or Kafka;
//! and the demo's generator.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::config::Settings;
use crate::event::EventTime;
use crate::generate::{GenConfig, Generator};
use crate::scaleout::kafka::LineProducer;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Seed: the same seed gives the same clicks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How many lines (default: unbounded with --rate, else 10000).
    #[arg(long)]
    pub count: Option<u64>,
    /// Lines per second (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Where to: a file path, `-` for stdout, a collector URL (http://host:port or the full
    /// http://host:port/v1/clicks), or Kafka (kafka://host:port[,host:port]/topic; raw NDJSON
    /// lines keyed by ad_id, topic default ad-clicks).
    #[arg(long, default_value = "-")]
    pub to: String,
    /// Lines per POST to a collector.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Distinct ads.
    #[arg(long, default_value_t = 10_000)]
    pub ads: u64,
    /// Share of duplicate lines.
    #[arg(long, default_value_t = 0.01)]
    pub duplicates: f64,
    /// Share of invalid lines.
    #[arg(long, default_value_t = 0.001)]
    pub invalid: f64,
    /// Share of late lines (1 to 4 minutes behind).
    #[arg(long, default_value_t = 0.002)]
    pub late: f64,
    /// Event time of the first line (RFC 3339 or epoch ms); then it advances by 1/rate (or 1 ms)
    /// per line. With it the output depends on the seed alone; without, times follow the clock.
    #[arg(long)]
    pub start: Option<String>,
    /// How long to keep re-sending to a collector that cannot be reached before giving up.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_for: Duration,
}

/// Where generated lines go; returns how many the receiver accepted and rejected (a file or a
/// broker takes every line; a collector validates).
type Sink = Box<dyn FnMut(&[String]) -> anyhow::Result<(u64, u64)>>;

/// `adclick generate`: writes or sends generated lines; to a collector, re-sends any batch not
/// acknowledged until it is.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.duplicates)
        || !(0.0..=1.0).contains(&args.invalid)
        || !(0.0..=1.0).contains(&args.late)
    {
        bail!("--duplicates, --invalid and --late are shares between 0 and 1");
    }
    let mut generator = Generator::new(GenConfig {
        seed: args.seed,
        ads: args.ads.max(1),
        duplicate: args.duplicates,
        invalid: args.invalid,
        late: args.late,
        ..GenConfig::default()
    });
    let count = args.count.or(if args.rate.is_some() { None } else { Some(10_000) });
    let mut sink: Sink = if let Some(rest) = args.to.strip_prefix("kafka://") {
        let producer = LineProducer::connect(rest)?;
        Box::new(move |lines: &[String]| {
            producer.send(lines)?;
            Ok((lines.len() as u64, 0))
        })
    } else if args.to.starts_with("http://") {
        let url = super::ship::clicks_url(&args.to)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let retry_for = args.retry_for;
        Box::new(move |lines: &[String]| post_until_acknowledged(&agent, &url, lines, retry_for))
    } else if args.to == "-" {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        Box::new(move |lines: &[String]| {
            for l in lines {
                writeln!(out, "{l}")?;
            }
            out.flush()?;
            Ok((lines.len() as u64, 0))
        })
    } else if args.to.starts_with("https://") {
        bail!("--to: https is not supported; use http:// on a trusted network or a file");
    } else {
        let file = std::fs::File::create(&args.to)
            .with_context(|| format!("--to: cannot create {}", args.to))?;
        let mut out = std::io::BufWriter::new(file);
        Box::new(move |lines: &[String]| {
            for l in lines {
                writeln!(out, "{l}")?;
            }
            out.flush()?;
            Ok((lines.len() as u64, 0))
        })
    };
    let start = match &args.start {
        None => None,
        Some(raw) => Some(match raw.parse::<i64>() {
            Ok(ms) => ms,
            Err(_) => {
                crate::event::parse_rfc3339(raw)
                    .map_err(|e| anyhow::anyhow!("--start: {raw:?}: {e}"))?
                    .0
            }
        }),
    };
    let step_ms = 1000.0 / args.rate.unwrap_or(1000).max(1) as f64;
    let progress = std::io::stderr().is_terminal();
    let started = Instant::now();
    let (mut sent, mut accepted, mut rejected) = (0u64, 0u64, 0u64);
    let mut last_report = Instant::now();
    let batch = args.batch.max(1);
    loop {
        let n = count.map_or(batch as u64, |c| (c - sent).min(batch as u64)) as usize;
        if n == 0 {
            break;
        }
        let lines: Vec<String> = (0..n)
            .map(|i| {
                let t = match start {
                    Some(t0) => t0 + ((sent + i as u64) as f64 * step_ms) as i64,
                    None => EventTime::now().0,
                };
                generator.line(EventTime(t))
            })
            .collect();
        let (a, r) = sink(&lines)?;
        sent += n as u64;
        accepted += a;
        rejected += r;
        if let Some(rate) = args.rate {
            let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if progress && last_report.elapsed() >= Duration::from_millis(500) {
            last_report = Instant::now();
            let total = count.map(|c| format!("/{c}")).unwrap_or_default();
            eprint!(
                "\rgenerated {sent}{total} lines, {:.0}/s   ",
                sent as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let to = if args.to == "-" { "stdout" } else { args.to.as_str() };
    eprintln!(
        "{}generated {sent} lines to {to} in {secs:.1}s ({:.0}/s): accepted {accepted}, \
         rejected {rejected}",
        if progress { "\r" } else { "" },
        sent as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Posts one batch until the collector acknowledges it (re-sent batches are deduplicated);
/// gives up when the collector has been unreachable for `retry_for`.
fn post_until_acknowledged(
    agent: &ureq::Agent,
    url: &str,
    lines: &[String],
    retry_for: Duration,
) -> anyhow::Result<(u64, u64)> {
    let body = lines.join("\n");
    let mut delay = Duration::from_millis(100);
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match agent.post(url).header("content-type", "application/x-ndjson").send(body.as_bytes()) {
            Ok(r) if r.status().is_success() => {
                let text = r.into_body().read_to_string().context("the collector's answer")?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("the collector's answer {text:?}"))?;
                let count = |k: &str| v[k].as_u64().unwrap_or(0);
                return Ok((count("accepted"), count("rejected_total")));
            }
            Ok(r) if r.status().is_client_error() => {
                bail!(
                    "the collector refused the batch: {} {}",
                    r.status(),
                    r.into_body().read_to_string().unwrap_or_default()
                )
            }
            Ok(r) => {
                unreachable_since = None;
                tracing::warn!("collector answered {}; re-sending", r.status());
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= retry_for {
                    bail!(
                        "cannot reach the collector at {url} for {} (--retry-for): {e}",
                        humantime::format_duration(retry_for)
                    );
                }
                tracing::warn!("collector unreachable ({e}); re-sending");
            }
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

fn print_demo_help(addr: std::net::SocketAddr, settings: &Settings) {
    let filter = settings.filters.ids().first().map(|f| format!("&filter={f}")).unwrap_or_default();
    println!(
        "\nadclick demo: the generator is sending clicks now.\n\
         dashboard:   http://{addr}/\n\
         try:\n  \
         curl -s 'http://{addr}/v1/ads/popular_ads?count=5&window=5{filter}'\n  \
         curl -s 'http://{addr}/v1/ads/ad-1/aggregated_count'\n  \
         curl -s 'http://{addr}/v1/ads/ad-1/timeseries?from={}'\n  \
         curl -s http://{addr}/metrics | grep adclick_\n\
         Ctrl-C stops (results are committed first).\n",
        crate::event::format_rfc3339(
            crate::event::Minute(EventTime::now().minute().0 - 10).start()
        )
    );
}

/// What `adclick demo` does once its server listens: prints where to look, and starts the
/// generator sending `rate` clicks a second to it.
pub fn demo(rate: u64, settings: &Settings) -> crate::serve::OnListening {
    let settings = settings.clone();
    Box::new(move |addr| {
        print_demo_help(addr, &settings);
        let url = format!("http://{addr}");
        std::thread::spawn(move || {
            let args = GenerateArgs {
                seed: EventTime::now().0 as u64,
                count: None,
                rate: Some(rate),
                to: url,
                batch: (rate as usize / 10).clamp(1, 1000),
                ads: 1000,
                duplicates: 0.02,
                invalid: 0.002,
                late: 0.01,
                start: None,
                retry_for: Duration::from_secs(30),
            };
            if let Err(e) = run(args) {
                tracing::error!("demo generator: {e:#}");
            }
        });
    })
}
