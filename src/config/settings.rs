//! Every setting, declared once: its key, type, default and help. From the one declaration come
//! the config file's keys ([`Config`]), the `ADCLICK_<KEY>` variables, the `--<key>` flags of
//! `serve`, `demo` and `config` ([`SettingFlags`]), `config --print`, the settings table of
//! `serve --help`, and the engine's defaults (`Config::default().validate()`).
//!
//! Durations and lists are kept as written (text) until [`Config::validate`] turns the whole
//! into typed `Settings`, so that an error names the key and quotes the value.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::filter::FilterConfig;

/// A setting's name and help, for flags, variables and `--help`.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The config file key; the variable is `ADCLICK_<KEY>`, the flag `--<key-with-dashes>`.
    pub key: &'static str,
    pub help: &'static str,
}

impl Setting {
    pub fn variable(&self) -> String {
        format!("ADCLICK_{}", self.key.to_ascii_uppercase())
    }

    pub fn flag(&self) -> String {
        self.key.replace('_', "-")
    }
}

/// Declares the settings: `/// help` then `key: Type = default,` for each.
macro_rules! settings {
    ($( $(#[doc = $doc:literal])+ $key:ident: $ty:ty = $default:expr, )*) => {
        /// The settings as written in the config file, variables and flags (durations as text
        /// like `15s`), merged; [`Config::validate`] checks them into `Settings`.
        #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct Config {
            $(
                $(#[doc = $doc])+
                #[serde(default, deserialize_with = "lenient")]
                pub $key: $ty,
            )*
            /// `[[filters]]` tables: the pre-defined filters (file only).
            #[serde(default)]
            pub filters: Vec<FilterConfig>,
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $key: IntoSetting::into_setting($default), )* filters: Vec::new() }
            }
        }

        /// Every setting, in declaration order.
        pub const SETTINGS: &[Setting] = &[
            $( Setting { key: stringify!($key), help: first_line(concat!($($doc, "\n"),+)) }, )*
        ];
    };
}

settings! {
    /// Address to listen on (port 0 picks a free port, printed at start).
    listen: String = "127.0.0.1:8080",
    /// Data directory (the demo's: ./adclick-demo-data).
    data_dir: PathBuf = "./adclick-data",
    /// Log partitions, keyed by hash(ad_id); fixed once a data directory holds data.
    partitions: u32 = 8,
    /// Event-time watermark delay: how long a minute waits for its late clicks.
    watermark_delay: String = "15s",
    /// Idle time after which a partition stops holding the watermark back.
    idle_timeout: String = "30s",
    /// How late a click may be and still correct a final minute.
    allowed_lateness: String = "5m",
    /// Duplicates within this much event time of each other count once.
    dedup_horizon: String = "10m",
    /// How far ahead of the clock a click's time may be.
    max_clock_skew: String = "5m",
    /// Ads in each minute's top-N list.
    top_n: usize = 100,
    /// Largest accepted POST /v1/clicks body, after decompression.
    max_body_bytes: usize = 16 << 20,
    /// Ingest body bytes held in memory across all requests; past it the collector answers 503.
    max_inflight_bytes: usize = 64 << 20,
    /// How often the aggregator commits results (freshness of queries).
    commit_interval: String = "100ms",
    /// How often the engine state is checkpointed (bounds recovery time).
    checkpoint_interval: String = "5s",
    /// Aggregate shards, each on its own thread.
    shards: usize = 2,
    /// Identities each shard's dedup table is sized for up front.
    dedup_capacity: usize = 1 << 20,
    /// Log records not yet aggregated beyond which the collector answers 503.
    max_lag_records: u64 = 5_000_000,
    /// Log segment size in bytes.
    segment_bytes: u64 = 128 << 20,
    /// How long aggregated log segments are kept (raw data for recalculation).
    log_retention: String = "24h",
    /// How often serve logs a status line (rate, lag, watermark delay); 0 for never.
    log_interval: String = "10s",
    /// Origins allowed to call the HTTP API from a browser (CORS), comma-separated, or *.
    cors_origins: String = "",
    /// The raw archive: a directory (relative: under data_dir) or s3://bucket/prefix.
    archive: String = "archive",
    /// S3: the endpoint of an S3-compatible service (credentials: the AWS_* variables).
    archive_endpoint: Option<String> = None,
    /// S3: the region.
    archive_region: Option<String> = None,
    /// S3: allow an http:// endpoint (local emulators).
    archive_allow_http: bool = false,
    /// How long accepted clicks may wait before they are archived (files roll by time).
    archive_flush_interval: String = "1m",
    /// Most clicks per archive flush (files roll by size).
    archive_file_rows: usize = 1_000_000,
    /// Scale-out: Kafka bootstrap brokers (host:port,…), with postgres.
    kafka: Option<String> = None,
    /// Scale-out: PostgreSQL URL (postgres://user:pass@host:port/db), with kafka.
    postgres: Option<String> = None,
    /// Scale-out: the Kafka topic of raw clicks.
    topic: String = "ad-clicks",
    /// Scale-out: the aggregators' Kafka consumer group.
    consumer_group: String = "adclick-aggregators",
    /// Scale-out: the roles this process runs, any of collect,aggregate,query,archive.
    roles: String = "collect,aggregate,query,archive",
    /// Scale-out: how long an aggregator may stay silent before its partitions move.
    session_timeout: String = "10s",
    /// Scale-out: how long a start waits for a PostgreSQL that is down or restarting; 0s: none.
    postgres_wait: String = "2m",
}

/// The first line of a doc comment (the macro's `concat!` of them).
const fn first_line(doc: &'static str) -> &'static str {
    let bytes = doc.as_bytes();
    let mut end = 0;
    while end < bytes.len() && bytes[end] != b'\n' {
        end += 1;
    }
    let mut start = 0;
    while start < end && bytes[start] == b' ' {
        start += 1;
    }
    let (_, rest) = bytes.split_at(start);
    let (line, _) = rest.split_at(end - start);
    match std::str::from_utf8(line) {
        Ok(s) => s,
        Err(_) => doc,
    }
}

/// A declared default as the setting's type.
trait IntoSetting<T> {
    fn into_setting(self) -> T;
}

impl IntoSetting<String> for &str {
    fn into_setting(self) -> String {
        self.to_string()
    }
}

impl IntoSetting<PathBuf> for &str {
    fn into_setting(self) -> PathBuf {
        PathBuf::from(self)
    }
}

impl IntoSetting<Option<String>> for Option<&str> {
    fn into_setting(self) -> Option<String> {
        self.map(str::to_string)
    }
}

macro_rules! as_is {
    ($($t:ty),*) => { $( impl IntoSetting<$t> for $t { fn into_setting(self) -> $t { self } } )* };
}
as_is!(u32, u64, usize, bool);

/// How a setting's value is read from the merged layers. Text settings also take a bare number
/// or boolean (variables and flags are parsed: `--watermark-delay 15`), kept as written, so that
/// validation says what is wrong with it.
trait Lenient: Sized {
    fn read<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}

fn lenient<'de, D: serde::Deserializer<'de>, T: Lenient>(d: D) -> Result<T, D::Error> {
    T::read(d)
}

/// A text value as written, whatever the layer parsed it as.
#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    S(String),
    U(u64),
    I(i64),
    F(f64),
    B(bool),
}

impl From<Text> for String {
    fn from(t: Text) -> String {
        match t {
            Text::S(s) => s,
            Text::U(n) => n.to_string(),
            Text::I(n) => n.to_string(),
            Text::F(n) => n.to_string(),
            Text::B(b) => b.to_string(),
        }
    }
}

impl Lenient for String {
    fn read<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Text::deserialize(d).map(String::from)
    }
}

impl Lenient for Option<String> {
    fn read<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<Text>::deserialize(d).map(|t| t.map(String::from))
    }
}

macro_rules! strict {
    ($($t:ty),*) => { $(
        impl Lenient for $t {
            fn read<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <$t>::deserialize(d)
            }
        }
    )* };
}
strict!(PathBuf, u32, u64, usize, bool);

/// A flag for every setting (`--watermark-delay 20s`), for the commands that read settings:
/// what was given, as (key, value) pairs, the top layer of `Config::load`.
#[derive(Clone, Debug, Default)]
pub struct SettingFlags(pub Vec<(&'static str, String)>);

impl SettingFlags {
    /// Sets `key` unless a flag already did.
    pub fn or(mut self, key: &'static str, value: impl Into<String>) -> SettingFlags {
        if !self.has(key) {
            self.0.push((key, value.into()));
        }
        self
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| *k == key)
    }
}

impl clap::FromArgMatches for SettingFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = SettingFlags::default();
        flags.update_from_arg_matches(m)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        for s in SETTINGS {
            if let Some(v) = m.get_one::<String>(s.key) {
                self.0.retain(|(k, _)| *k != s.key);
                self.0.push((s.key, v.clone()));
            }
        }
        Ok(())
    }
}

impl clap::Args for SettingFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.args(SETTINGS.iter().map(|s| {
            clap::Arg::new(s.key)
                .long(s.flag())
                .value_name("VALUE")
                .help(s.help)
                .help_heading("Settings (see the table below)")
        }))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}
