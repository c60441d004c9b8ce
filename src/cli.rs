//! The `adclick` command line: parses flags, starts tracing, loads settings and dispatches.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Settings};
use crate::event::EventTime;
use crate::generate::{GenConfig, Generator};
use crate::pipeline::{now_ms, Pipeline};

/// Exact, crash-safe ad click aggregation: per-ad per-minute counts, top ads and filters.
#[derive(Parser, Debug)]
#[command(name = "adclick", version, about)]
pub struct Cli {
    /// A TOML config file (keys as in SPEC §4).
    #[arg(long, global = true, env = "ADCLICK_CONFIG")]
    pub config: Option<PathBuf>,
    /// More logging (-v, -vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less logging.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Log lines as text for people or as JSON objects for log pipelines (level, timestamp,
    /// target, message and fields).
    #[arg(long, global = true, env = "ADCLICK_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Collector, aggregator and query API on an embedded data directory.
    Serve(ServeArgs),
    /// The effective configuration (file, ADCLICK_ variables and flags merged), as TOML.
    Config {
        /// Print it (the only action so far).
        #[arg(long)]
        print: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// `serve` on a demo data directory, fed by the built-in generator at a live rate.
    Demo {
        #[command(flatten)]
        serve: ServeArgs,
        /// Clicks per second the generator sends.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
    },
    /// Deterministic synthetic clicks (Zipf ads, countries, duplicates, late and invalid lines).
    Generate(GenerateArgs),
    /// The end-to-end benchmark: HTTP ingest through to final results, latency, RSS, recovery.
    Bench(crate::bench::BenchArgs),
    /// Recompute a time range from the raw archive (too-late clicks included) and replace its
    /// stored counts, top-N and popular-ads data atomically (SPEC §3.4).
    Recalc {
        #[command(flatten)]
        range: RangeArgs,
        /// Print what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compare stored results with a recomputation from the raw archive (SPEC §3.5). Exit 0
    /// when all match, 1 when not.
    Reconcile {
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Follow NDJSON files through rotation and send their lines to a collector (SPEC §4).
    Ship(crate::ship::ShipArgs),
    /// The health of a running server: status, watermark and its delay, lag, clicks accepted
    /// and rejected. Exit 0 when it is ok, 1 when not, 2 when it cannot be reached.
    Status {
        /// The server's URL (default: the server running on --data-dir).
        #[arg(long)]
        url: Option<String>,
        /// Data directory of the server (default ./adclick-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The range and data of `recalc` and `reconcile`; both work whether or not `serve` runs.
#[derive(Args, Debug)]
pub struct RangeArgs {
    /// First minute, inclusive: RFC 3339 or epoch ms, minute-aligned.
    #[arg(long)]
    pub from: String,
    /// End minute, exclusive.
    #[arg(long)]
    pub to: String,
    /// Data directory (default ./adclick-data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Settings that flags may override (environment: the `ADCLICK_*` variable of each key).
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port, printed at start).
    #[arg(long)]
    pub listen: Option<String>,
    /// Data directory (default ./adclick-data; for demo ./adclick-demo-data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Log partitions (fixed once the data directory holds data).
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Event-time watermark delay, like 15s.
    #[arg(long)]
    pub watermark_delay: Option<String>,
    /// Idle time after which a partition stops holding the watermark back.
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// How late a click may be and still correct a final minute.
    #[arg(long)]
    pub allowed_lateness: Option<String>,
    /// Duplicates within this much event time of each other count once.
    #[arg(long)]
    pub dedup_horizon: Option<String>,
    /// How far ahead of the clock a click's time may be.
    #[arg(long)]
    pub max_clock_skew: Option<String>,
    /// How often results are committed.
    #[arg(long)]
    pub commit_interval: Option<String>,
    /// How often the engine state is checkpointed.
    #[arg(long)]
    pub checkpoint_interval: Option<String>,
    /// Aggregate shards (threads).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Scale out: Kafka bootstrap brokers (host:port,…), with --postgres.
    #[arg(long)]
    pub kafka: Option<String>,
    /// Scale out: PostgreSQL URL (postgres://user:pass@host:port/db), with --kafka.
    #[arg(long)]
    pub postgres: Option<String>,
    /// Scale out: the Kafka topic of raw clicks (default ad-clicks).
    #[arg(long)]
    pub topic: Option<String>,
    /// Scale out: the roles to run, any of collect,aggregate,query,archive (default all).
    #[arg(long)]
    pub roles: Option<String>,
}

impl ServeArgs {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        let mut o = Vec::new();
        let mut put = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                o.push((k, v));
            }
        };
        put("listen", self.listen.clone());
        put("data_dir", self.data_dir.as_ref().map(|p| p.display().to_string()));
        put("partitions", self.partitions.map(|v| v.to_string()));
        put("watermark_delay", self.watermark_delay.clone());
        put("idle_timeout", self.idle_timeout.clone());
        put("allowed_lateness", self.allowed_lateness.clone());
        put("dedup_horizon", self.dedup_horizon.clone());
        put("max_clock_skew", self.max_clock_skew.clone());
        put("commit_interval", self.commit_interval.clone());
        put("checkpoint_interval", self.checkpoint_interval.clone());
        put("shards", self.shards.map(|v| v.to_string()));
        put("kafka", self.kafka.clone());
        put("postgres", self.postgres.clone());
        put("topic", self.topic.clone());
        put("roles", self.roles.clone());
        o
    }
}

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

pub fn main() -> anyhow::Result<()> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command()
        .mut_subcommand("serve", |c| c.after_help(settings_help()))
        .mut_subcommand("config", |c| c.after_help(settings_help()))
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ADCLICK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    match cli.command {
        Command::Serve(args) => {
            let settings = settings(cli.config.as_deref(), &args, None)?;
            serve(settings, None)
        }
        Command::Demo { serve: args, rate } => {
            let settings = settings(cli.config.as_deref(), &args, Some("./adclick-demo-data"))?;
            serve(settings, Some(rate))
        }
        Command::Generate(args) => generate(args),
        Command::Status { url, data_dir, json } => status(url, data_dir, json),
        Command::Config { print: _, serve: args } => {
            let config = effective_config(cli.config.as_deref(), &args)?;
            print!("{}", toml::to_string(&config).context("writing the configuration")?);
            Ok(())
        }
        Command::Bench(args) => crate::bench::run(args),
        Command::Recalc { range, dry_run } => {
            job(cli.config.as_deref(), range, crate::recalc::Job::Recalc { dry_run })
        }
        Command::Reconcile { range } => {
            job(cli.config.as_deref(), range, crate::recalc::Job::Reconcile)
        }
        Command::Ship(args) => crate::ship::run(args),
    }
}

fn job(
    config: Option<&std::path::Path>,
    range: RangeArgs,
    job: crate::recalc::Job,
) -> anyhow::Result<()> {
    let args = ServeArgs { data_dir: range.data_dir.clone(), ..ServeArgs::default() };
    let settings = settings(config, &args, None)?;
    let from = crate::api::parse_minute("--from", &range.from).map_err(anyhow::Error::msg)?;
    let to = crate::api::parse_minute("--to", &range.to).map_err(anyhow::Error::msg)?;
    if !crate::admin::run(&settings, job, from, to, range.json)? {
        std::process::exit(1);
    }
    Ok(())
}

/// The merged configuration `serve` would run with, validated.
fn effective_config(file: Option<&std::path::Path>, args: &ServeArgs) -> anyhow::Result<Config> {
    let config = Config::load(file, &args.overrides())?;
    config.validate()?;
    Ok(config)
}

fn settings(
    file: Option<&std::path::Path>,
    args: &ServeArgs,
    demo_dir: Option<&str>,
) -> anyhow::Result<Settings> {
    let mut overrides = args.overrides();
    if let (Some(dir), None) = (demo_dir, &args.data_dir) {
        if std::env::var_os("ADCLICK_DATA_DIR").is_none() {
            overrides.push(("data_dir", dir.to_string()));
        }
    }
    let mut config = Config::load(file, &overrides)?;
    if demo_dir.is_some() && config.filters.is_empty() {
        // The demo shows filters at work: two examples, unless a config file brings its own.
        let list = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
        config.filters = vec![
            crate::filter::FilterConfig {
                id: "us".into(),
                country: list(&["US"]),
                ..Default::default()
            },
            crate::filter::FilterConfig {
                id: "office".into(),
                ip: list(&["10.0.0.0/8"]),
                ..Default::default()
            },
        ];
    }
    Ok(config.validate()?)
}

fn serve(settings: Settings, demo_rate: Option<u64>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    if let Some(scale) = settings.scaleout.clone() {
        return runtime.block_on(crate::scaleout::serve(settings, scale));
    }
    let pipeline = Pipeline::start(&settings)?;
    let state = crate::api::AppState {
        collector: crate::api::Collector::Log(pipeline.ingest.clone()),
        results: crate::api::Results::Embedded(pipeline.query.clone()),
        metrics: pipeline.query.metrics.clone(),
        filters: pipeline.query.filters.clone(),
        ..crate::api::AppState::new(&settings)
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal();
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("listen: cannot bind {}", settings.listen))?;
        let addr = listener.local_addr().context("listen address")?;
        println!("adclick: listening on http://{addr} (data in {})", settings.data_dir.display());
        let _ = std::io::stdout().flush();
        let token = crate::admin::write_server_file(&settings.data_dir, addr)?;
        if !settings.log_interval.is_zero() {
            tokio::spawn(log_status(pipeline.query.clone(), settings.log_interval));
        }
        if let Some(rate) = demo_rate {
            print_demo_help(addr, &settings);
            let url = format!("http://{addr}");
            std::thread::spawn(move || {
                let args = GenerateArgs {
                    seed: now_ms() as u64,
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
                if let Err(e) = generate(args) {
                    tracing::error!("demo generator: {e:#}");
                }
            });
        }
        let state = crate::api::AppState { admin_token: std::sync::Arc::new(token), ..state };
        axum::serve(listener, crate::api::router(state))
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving")
    });
    tracing::info!("shutting down: committing and checkpointing");
    let _ = std::fs::remove_file(crate::admin::server_file_path(&settings.data_dir));
    pipeline.stop();
    result
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
            crate::event::Minute(EventTime(now_ms()).minute().0 - 10).start()
        )
    );
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called (not when it is
/// first polled), so a SIGTERM during start-up is a graceful stop too.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! { _ = wait(term) => {}, _ = wait(int) => {} }
    }
}

/// `adclick status`: reads `/healthz` and `/metrics` of a running server and prints a summary.
fn status(url: Option<String>, data_dir: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let url = match url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let dir = data_dir.unwrap_or_else(|| PathBuf::from("./adclick-data"));
            let path = crate::admin::server_file_path(&dir);
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "no server runs on {} ({} cannot be read); give --url",
                    dir.display(),
                    path.display()
                )
            })?;
            let server: crate::admin::ServerFile = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a server file", path.display()))?;
            server.url
        }
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let get = |path: &str| -> anyhow::Result<(u16, String)> {
        let r = agent.get(format!("{url}{path}")).call();
        let mut r = match r {
            Ok(r) => r,
            Err(e) => {
                eprintln!("adclick: cannot reach {url}: {e}");
                std::process::exit(2);
            }
        };
        Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
    };
    let (code, health) = get("/healthz")?;
    let health: serde_json::Value =
        serde_json::from_str(&health).with_context(|| format!("{url}/healthz: {health:?}"))?;
    let (_, metrics) = get("/metrics")?;
    // Sums of the samples of a metric (over its labels), of those whose lines hold `having`.
    let metric = |name: &str, having: &[&str]| -> serde_json::Value {
        let values: Vec<f64> = metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.split([' ', '{']).next() == Some(name) && having.iter().all(|h| l.contains(h))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        match values.iter().sum::<f64>() {
            _ if values.is_empty() => serde_json::Value::Null,
            n if n.fract() == 0.0 && n >= 0.0 => serde_json::json!(n as u64),
            n => serde_json::json!(n),
        }
    };
    let watermark = health["watermark"].as_str().map(str::to_string);
    let behind = watermark
        .as_deref()
        .and_then(|w| crate::event::parse_rfc3339(w).ok())
        .map(|w| (now_ms() - w.0) as f64 / 1000.0);
    let summary = serde_json::json!({
        "url": url,
        "status": health["status"],
        "watermark": watermark,
        "watermark_behind_seconds": behind,
        "lag_records": health["lag_records"],
        "archive_lag_records": health["archive_lag_records"],
        "accepted_total": metric(crate::telemetry::ACCEPTED, &[]),
        "rejected_total": metric(crate::telemetry::INVALID, &[]),
        "overloaded_total": metric(
            crate::telemetry::REQUESTS,
            &["endpoint=\"/v1/clicks\"", "code=\"503\""]
        ),
    });
    if json {
        println!("{summary}");
    } else {
        let show = |v: &serde_json::Value| match v {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => other.to_string(),
        };
        println!("adclick at {url}: {}", show(&summary["status"]));
        println!(
            "  watermark        {} ({} s behind the clock)",
            show(&summary["watermark"]),
            behind.map_or("-".into(), |b| format!("{b:.1}"))
        );
        println!("  not aggregated   {} records", show(&summary["lag_records"]));
        println!("  not archived     {} records", show(&summary["archive_lag_records"]));
        println!("  accepted         {} clicks", show(&summary["accepted_total"]));
        println!("  rejected         {} lines", show(&summary["rejected_total"]));
        println!("  answered 503     {} requests", show(&summary["overloaded_total"]));
    }
    if code != 200 || health["status"] != "ok" {
        std::process::exit(1);
    }
    Ok(())
}

/// Every setting with its default and its variable, for `--help`.
fn settings_help() -> String {
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    let mut out = String::from(
        "Settings (config file key = default, and its environment variable; flags override \
         both; see the README for what each does):\n",
    );
    if let Some(map) = defaults.as_object() {
        for (key, value) in map {
            if key == "filters" {
                continue;
            }
            let value = if value.is_null() { "(none)".to_string() } else { value.to_string() };
            let var = format!("ADCLICK_{}", key.to_ascii_uppercase());
            out.push_str(&format!("  {:<40} {var}\n", format!("{key} = {value}")));
        }
    }
    out.push_str("  [[filters]] tables (see the README)\n");
    out
}

/// Logs a status line every `every`: clicks accepted per second since the last line, records
/// not yet aggregated, and how far the watermark trails the clock.
async fn log_status(q: std::sync::Arc<crate::pipeline::QueryState>, every: Duration) {
    use std::sync::atomic::Ordering;
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last = (Instant::now(), q.metrics.accepted.load(Ordering::Relaxed));
    loop {
        tick.tick().await;
        let accepted = q.metrics.accepted.load(Ordering::Relaxed);
        let rate = (accepted - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        last = (Instant::now(), accepted);
        let watermark = q.watermark.load(Ordering::Relaxed);
        let behind = (watermark != i64::MIN).then(|| (now_ms() - watermark) as f64 / 1000.0);
        tracing::info!(
            clicks_per_second = rate.round() as u64,
            accepted,
            lag_records = q.lag(),
            watermark_behind_seconds = behind.map(|b| format!("{b:.1}")).unwrap_or("none".into()),
            "status"
        );
    }
}

/// Where generated lines go; returns how many the receiver accepted and rejected (a file or a
/// broker takes every line; a collector validates).
type Sink = Box<dyn FnMut(&[String]) -> anyhow::Result<(u64, u64)>>;

/// `adclick generate`: writes or sends generated lines; to a collector, re-sends any batch not
/// acknowledged until it is.
pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
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
        let (brokers, topic) = match rest.split_once('/') {
            Some((b, t)) if !t.is_empty() => (b.to_string(), t.to_string()),
            _ => (rest.trim_end_matches('/').to_string(), "ad-clicks".to_string()),
        };
        let partitions = crate::scaleout::kafka::partition_count(&brokers, &topic)?;
        let producer = crate::scaleout::kafka::line_producer(&brokers)?;
        Box::new(move |lines: &[String]| {
            crate::scaleout::kafka::send_lines(&producer, &topic, partitions, lines)?;
            Ok((lines.len() as u64, 0))
        })
    } else if args.to.starts_with("http://") {
        let url = crate::ship::clicks_url(&args.to)?;
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
                    None => now_ms(),
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
