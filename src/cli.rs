//! The `adclick` command line: parses flags, starts tracing, loads settings and dispatches to
//! `serve` or to a command of `cmd`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, SettingFlags, Settings, SETTINGS};
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
    Serve(SettingFlags),
    /// The effective configuration (file, ADCLICK_ variables and flags merged), as TOML.
    Config {
        /// Print it (the only action so far).
        #[arg(long)]
        print: bool,
        #[command(flatten)]
        serve: SettingFlags,
    },
    /// `serve` on a demo data directory, fed by the built-in generator at a live rate.
    Demo {
        #[command(flatten)]
        serve: SettingFlags,
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
    /// Every archived click of one ad and minute with its fate: counted, a duplicate of which
    /// click, too late (and whether a recalculation has counted it since), or outside the
    /// filter. Exit 0 when the counted clicks add up to the stored count, 1 when not.
    Explain {
        /// The ad.
        ad_id: String,
        /// The minute: RFC 3339 or epoch ms, minute-aligned.
        #[arg(long)]
        minute: String,
        /// Explain this filter's count instead of the total.
        #[arg(long)]
        filter: Option<String>,
        /// Data directory (default ./adclick-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
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
        Command::Explain { ad_id, minute, filter, data_dir, json } => {
            let mut args = SettingFlags::default();
            if let Some(dir) = &data_dir {
                args = args.or("data_dir", dir.display().to_string());
            }
            let settings = settings(cli.config.as_deref(), &args, None)?;
            let minute = parse_minute("--minute", &minute)?;
            let q = crate::recalc::Question { ad: ad_id, minute, filter };
            if !crate::cmd::admin::explain(&settings, &q, json)? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn job(
    config: Option<&std::path::Path>,
    range: RangeArgs,
    job: crate::recalc::Job,
) -> anyhow::Result<()> {
    let mut args = SettingFlags::default();
    if let Some(dir) = &range.data_dir {
        args = args.or("data_dir", dir.display().to_string());
    }
    let settings = settings(config, &args, None)?;
    let from = parse_minute("--from", &range.from)?;
    let to = parse_minute("--to", &range.to)?;
    if !crate::cmd::admin::run(&settings, job, from, to, range.json)? {
        std::process::exit(1);
    }
    Ok(())
}

/// The merged configuration `serve` would run with, validated.
fn effective_config(file: Option<&std::path::Path>, args: &SettingFlags) -> anyhow::Result<Config> {
    let config = Config::load(file, &args.0)?;
    config.validate()?;
    Ok(config)
}

fn settings(
    file: Option<&std::path::Path>,
    args: &SettingFlags,
    demo_dir: Option<&str>,
) -> anyhow::Result<Settings> {
    let mut overrides = args.clone();
    if let Some(dir) = demo_dir {
        if std::env::var_os("ADCLICK_DATA_DIR").is_none() {
            overrides = overrides.or("data_dir", dir);
        }
    }
    let mut config = Config::load(file, &overrides.0)?;
    if demo_dir.is_some() && config.filters.is_empty() {
        // The demo shows filters at work: two examples, unless a config file brings its own.
        config.filters = crate::config::demo_filters();
    }
    Ok(config.validate()?)
}

/// Every setting with its default and its variable, for `--help`.
fn settings_help() -> String {
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    let mut out = String::from(
        "Settings (config file key = default, and its environment variable; flags override \
         both; docs/operations.md says what each does):\n",
    );
    for s in SETTINGS {
        let value = match &defaults[s.key] {
            serde_json::Value::Null => "(none)".to_string(),
            v => v.to_string(),
        };
        out.push_str(&format!("  {:<40} {}\n", format!("{} = {value}", s.key), s.variable()));
    }
    out.push_str("  [[filters]] tables (see docs/operations.md)\n");
    out
}
