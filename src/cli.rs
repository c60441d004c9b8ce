//! The `adclick` command line: parses flags, starts tracing, loads settings and dispatches to
//! `serve` or to a command of `cmd`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Settings};
use crate::event::parse_minute;

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
    Generate(crate::cmd::generate::GenerateArgs),
    /// The end-to-end benchmark: HTTP ingest through to final results, latency, RSS, recovery.
    Bench(crate::cmd::bench::BenchArgs),
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
    Ship(crate::cmd::ship::ShipArgs),
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
            crate::serve::run(settings, None)
        }
        Command::Demo { serve: args, rate } => {
            let settings = settings(cli.config.as_deref(), &args, Some("./adclick-demo-data"))?;
            let demo = crate::cmd::generate::demo(rate, &settings);
            crate::serve::run(settings, Some(demo))
        }
        Command::Generate(args) => crate::cmd::generate::run(args),
        Command::Status { url, data_dir, json } => crate::cmd::status::run(url, data_dir, json),
        Command::Config { print: _, serve: args } => {
            let config = effective_config(cli.config.as_deref(), &args)?;
            print!("{}", toml::to_string(&config).context("writing the configuration")?);
            Ok(())
        }
        Command::Bench(args) => crate::cmd::bench::run(args),
        Command::Recalc { range, dry_run } => {
            job(cli.config.as_deref(), range, crate::recalc::Job::Recalc { dry_run })
        }
        Command::Reconcile { range } => {
            job(cli.config.as_deref(), range, crate::recalc::Job::Reconcile)
        }
        Command::Ship(args) => crate::cmd::ship::run(args),
    }
}

fn job(
    config: Option<&std::path::Path>,
    range: RangeArgs,
    job: crate::recalc::Job,
) -> anyhow::Result<()> {
    let args = ServeArgs { data_dir: range.data_dir.clone(), ..ServeArgs::default() };
    let settings = settings(config, &args, None)?;
    let from = parse_minute("--from", &range.from)?;
    let to = parse_minute("--to", &range.to)?;
    if !crate::cmd::admin::run(&settings, job, from, to, range.json)? {
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
