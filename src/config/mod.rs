//! Settings (SPEC §4): raw [`Config`] as written in TOML, `ADCLICK_*` variables and flags, then
//! validated into typed [`Settings`] with errors that name the key.
//!
//! Layers, lowest first: built-in defaults < `--config` file < `ADCLICK_*` variables < flags.
//! Every setting is declared once, in `settings.rs`; everything else here reads that list.

mod settings;

pub use settings::{Config, Setting, SettingFlags, SETTINGS};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;

use crate::engine::EngineConfig;
use crate::filter::{FilterConfig, Filters};

/// A setting that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// What the layers could not be read as: one line per problem, naming the key, the value,
    /// the expected form and where it came from.
    #[error("{0}")]
    Load(String),
    #[error("{0} is not a setting (settings: {list})", list = env_names())]
    UnknownEnv(String),
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error(transparent)]
    Filter(#[from] crate::filter::FilterError),
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub partitions: u32,
    pub engine: EngineConfig,
    pub filters: Filters,
    pub filter_configs: Vec<FilterConfig>,
    pub max_body_bytes: usize,
    pub max_inflight_bytes: usize,
    pub commit_interval: Duration,
    pub checkpoint_interval: Duration,
    pub max_lag_records: u64,
    pub segment_bytes: u64,
    pub log_retention: Duration,
    pub log_interval: Duration,
    /// Origins allowed by CORS (`*` for any); empty for none.
    pub cors_origins: Vec<String>,
    pub archive: crate::archive::ArchiveSettings,
    /// Kafka and PostgreSQL instead of the embedded log and store.
    pub scaleout: Option<ScaleOut>,
}

impl Config {
    /// Merges the layers. `overrides` are flags given on the command line (TOML-shaped keys).
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid {
                    key: "--config",
                    reason: format!("{} does not exist", path.display()),
                });
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        let keys: Vec<&str> = SETTINGS.iter().map(|s| s.key).collect();
        for (name, _) in std::env::vars_os() {
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ADCLICK_")) else {
                continue;
            };
            let key = rest.to_ascii_lowercase();
            if !keys.contains(&key.as_str()) && !OTHER_ENV.contains(&rest) {
                return Err(ConfigError::UnknownEnv(format!("ADCLICK_{rest}")));
            }
        }
        fig = fig.merge(Env::prefixed("ADCLICK_").only(&keys));
        for (key, value) in overrides {
            // Parsed as figment parses variables: "7" is a number, "15s" a string.
            let value: figment::value::Value = value.parse().unwrap_or_else(|never| match never {});
            fig = fig.merge(Serialized::default(key, value));
        }
        fig.extract().map_err(|e| ConfigError::Load(describe(e, overrides)))
    }

    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let invalid = |key, reason: String| ConfigError::Invalid { key, reason };
        let ms = |key: &'static str, v: &str| -> Result<i64, ConfigError> {
            Ok(duration(key, v)?.as_millis() as i64)
        };
        let listen = self.listen.parse().map_err(|e| {
            invalid(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:8080 ({e})", self.listen),
            )
        })?;
        if !(1..=1024).contains(&self.partitions) {
            return Err(invalid(
                "partitions",
                format!("must be between 1 and 1024, got {}", self.partitions),
            ));
        }
        let engine = EngineConfig {
            watermark_delay_ms: ms("watermark_delay", &self.watermark_delay)?,
            idle_timeout_ms: ms("idle_timeout", &self.idle_timeout)?,
            allowed_lateness_ms: ms("allowed_lateness", &self.allowed_lateness)?,
            dedup_horizon_ms: ms("dedup_horizon", &self.dedup_horizon)?,
            max_clock_skew_ms: ms("max_clock_skew", &self.max_clock_skew)?,
            top_n: self.top_n,
            shards: self.shards,
            dedup_capacity: self.dedup_capacity,
            identity_key: Default::default(),
        };
        engine.validate().map_err(|e| invalid(e.key, e.reason))?;
        let commit_interval = duration("commit_interval", &self.commit_interval)?;
        let checkpoint_interval = duration("checkpoint_interval", &self.checkpoint_interval)?;
        if commit_interval.is_zero() || checkpoint_interval < commit_interval {
            return Err(invalid(
                "checkpoint_interval",
                "must be at least commit_interval, which must be above 0".into(),
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid(
                "max_body_bytes",
                format!("must be at least 1024, got {}", self.max_body_bytes),
            ));
        }
        if self.max_inflight_bytes < self.max_body_bytes
            || self.max_inflight_bytes > tokio::sync::Semaphore::MAX_PERMITS
        {
            return Err(invalid(
                "max_inflight_bytes",
                format!(
                    "must be at least max_body_bytes ({}), got {}",
                    self.max_body_bytes, self.max_inflight_bytes
                ),
            ));
        }
        let scaleout = match (&self.kafka, &self.postgres) {
            (None, None) => {
                if Roles::parse(&self.roles).map_err(|e| invalid("roles", e))? != Roles::ALL {
                    return Err(invalid(
                        "roles",
                        "an embedded server runs every role; roles need kafka and postgres".into(),
                    ));
                }
                None
            }
            (Some(brokers), Some(postgres)) => {
                if self.topic.is_empty() || self.consumer_group.is_empty() {
                    return Err(invalid(
                        "topic",
                        "topic and consumer_group must not be empty".into(),
                    ));
                }
                Some(ScaleOut {
                    brokers: brokers.clone(),
                    postgres: postgres.clone(),
                    topic: self.topic.clone(),
                    group: self.consumer_group.clone(),
                    roles: Roles::parse(&self.roles).map_err(|e| invalid("roles", e))?,
                    session_timeout: duration("session_timeout", &self.session_timeout)?,
                    postgres_wait: duration("postgres_wait", &self.postgres_wait)?,
                })
            }
            (Some(_), None) => {
                return Err(invalid("postgres", "kafka is set: postgres must be set too".into()))
            }
            (None, Some(_)) => {
                return Err(invalid("kafka", "postgres is set: kafka must be set too".into()))
            }
        };
        Ok(Settings {
            scaleout,
            listen,
            data_dir: self.data_dir.clone(),
            partitions: self.partitions,
            engine,
            filters: Filters::compile(&self.filters)?,
            filter_configs: self.filters.clone(),
            max_body_bytes: self.max_body_bytes,
            max_inflight_bytes: self.max_inflight_bytes,
            commit_interval,
            checkpoint_interval,
            max_lag_records: self.max_lag_records,
            segment_bytes: self.segment_bytes.max(1 << 16),
            log_retention: duration("log_retention", &self.log_retention)?,
            cors_origins: cors_origins(&self.cors_origins)?,
            log_interval: if self.log_interval.trim() == "0" {
                Duration::ZERO
            } else {
                duration("log_interval", &self.log_interval)?
            },
            archive: crate::archive::ArchiveSettings {
                location: self.archive.clone(),
                endpoint: self.archive_endpoint.clone(),
                region: self.archive_region.clone(),
                allow_http: self.archive_allow_http,
                flush_interval: duration("archive_flush_interval", &self.archive_flush_interval)?,
                file_rows: if (1..=1 << 26).contains(&self.archive_file_rows) {
                    self.archive_file_rows
                } else {
                    return Err(invalid(
                        "archive_file_rows",
                        format!("must be between 1 and 2^26, got {}", self.archive_file_rows),
                    ));
                },
            },
        })
    }
}

impl Settings {
    /// The settings that change results, as (key, value) pairs recorded with the data: a
    /// restart with other values is refused (see `Store::check_settings`).
    pub fn recorded(&self) -> Vec<(String, String)> {
        let d = |ms: i64| humantime::format_duration(Duration::from_millis(ms as u64)).to_string();
        let e = &self.engine;
        let mut out = vec![
            ("partitions".to_string(), self.partitions.to_string()),
            ("watermark_delay".to_string(), d(e.watermark_delay_ms)),
            ("idle_timeout".to_string(), d(e.idle_timeout_ms)),
            ("allowed_lateness".to_string(), d(e.allowed_lateness_ms)),
            ("dedup_horizon".to_string(), d(e.dedup_horizon_ms)),
            ("filters".to_string(), format!("{:?}", self.filters.ids())),
        ];
        for f in &self.filter_configs {
            let json = serde_json::to_string(f).expect("filters serialize");
            out.push((format!("filters.{}", f.id), json));
        }
        out
    }
}

/// `ADCLICK_` variables that are not settings.
const OTHER_ENV: &[&str] = &[
    "CONFIG",
    "LOG",
    "LOG_FORMAT",
    "FAULT",
    "RECALC_CHUNK_BYTES",
    "TEST_KAFKA",
    "TEST_POSTGRES",
    "REQUIRE_SERVICES",
];

fn env_names() -> String {
    SETTINGS.iter().map(Setting::variable).collect::<Vec<_>>().join(", ")
}

/// figment's errors in the user's terms: the key, what was found, what is expected, and where
/// it came from (the file, the variable or the flag).
fn describe(e: figment::Error, overrides: &[(&str, String)]) -> String {
    use figment::error::{Actual, Kind};
    let found = |a: &Actual| match a {
        Actual::Str(s) => format!("{s:?}"),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(n) => n.to_string(),
        Actual::Bool(b) => b.to_string(),
        Actual::Seq => "a list".into(),
        Actual::Map => "a table".into(),
        other => other.to_string(),
    };
    let expected = |x: &str| match x {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number".to_string(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a boolean" | "bool" => "true or false".to_string(),
        "a string" => "text".to_string(),
        other => other.to_string(),
    };
    e.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let from = if let Some((flag, _)) = overrides.iter().find(|(k, _)| *k == key) {
                format!(" (from --{})", flag.replace('_', "-"))
            } else {
                match e.metadata.as_ref() {
                    Some(m) if m.name.contains("environment") => {
                        format!(" (from ADCLICK_{})", key.to_ascii_uppercase())
                    }
                    Some(m) => match &m.source {
                        Some(figment::Source::File(path)) => format!(" (in {})", path.display()),
                        _ => String::new(),
                    },
                    None => String::new(),
                }
            };
            let what = match &e.kind {
                Kind::InvalidType(a, x) | Kind::InvalidValue(a, x) => {
                    format!("{} is not {}", found(a), expected(x))
                }
                Kind::UnknownField(name, _) => {
                    let keys = SETTINGS.iter().map(|s| s.key).collect::<Vec<_>>().join(", ");
                    return format!("{name}: not a setting{from}; settings: {keys}, filters");
                }
                Kind::MissingField(name) => format!("{name} is missing"),
                other => other.to_string(),
            };
            if key.is_empty() {
                format!("{what}{from}")
            } else {
                format!("{key}: {what}{from}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn cors_origins(v: &str) -> Result<Vec<String>, ConfigError> {
    let list: Vec<String> =
        v.split(',').map(str::trim).filter(|o| !o.is_empty()).map(str::to_string).collect();
    for o in &list {
        let valid = o == "*"
            || ((o.starts_with("http://") || o.starts_with("https://"))
                && !o.trim_end_matches('/').contains(|c: char| c.is_whitespace())
                && axum::http::HeaderValue::from_str(o).is_ok());
        if !valid {
            return Err(ConfigError::Invalid {
                key: "cors_origins",
                reason: format!("{o:?} is not an origin like https://dashboards.example.com or *"),
            });
        }
    }
    Ok(list)
}

fn duration(key: &'static str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.trim()).map_err(|e| ConfigError::Invalid {
        key,
        reason: format!("{v:?} is not a duration like 15s, 10m or 1h ({e})"),
    })
}

/// Which parts of the service this process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub collect: bool,
    pub aggregate: bool,
    pub query: bool,
    pub archive: bool,
}

impl Roles {
    pub const ALL: Roles = Roles { collect: true, aggregate: true, query: true, archive: true };
    pub const NONE: Roles =
        Roles { collect: false, aggregate: false, query: false, archive: false };

    pub fn parse(s: &str) -> Result<Roles, String> {
        let mut r = Roles::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "collect" => r.collect = true,
                "aggregate" => r.aggregate = true,
                "query" => r.query = true,
                "archive" => r.archive = true,
                other => {
                    return Err(format!(
                        "{other:?} is not a role; use any of collect, aggregate, query, \
                         archive, comma-separated"
                    ))
                }
            }
        }
        if r == Roles::NONE {
            return Err("names no role; use any of collect, aggregate, query, archive".into());
        }
        Ok(r)
    }
}

/// Validated scale-out settings.
#[derive(Clone, Debug)]
pub struct ScaleOut {
    pub brokers: String,
    pub postgres: String,
    pub topic: String,
    pub group: String,
    pub roles: Roles,
    pub session_timeout: Duration,
    /// How long a start waits for a PostgreSQL that is down or restarting.
    pub postgres_wait: Duration,
}

/// The demo's two example filters: `us` (country US) and `office` (ip 10.0.0.0/8).
pub fn demo_filters() -> Vec<crate::filter::FilterConfig> {
    let list = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    vec![
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
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("adclick.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nwatermark_delay = \"20s\"\n[[filters]]\nid = \"us\"\ncountry = [\"US\"]\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), &[("top_n", "7".into())]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.top_n, 7);
        let s = c.validate().unwrap();
        assert_eq!(s.engine.watermark_delay_ms, 20_000);
        assert_eq!(s.engine.dedup_horizon_ms, 600_000);
        assert_eq!(s.filters.ids(), ["us"]);

        std::fs::write(&file, "colour = \"blue\"\n").unwrap();
        let err = Config::load(Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");

        let bad = Config { watermark_delay: "soon".into(), ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().starts_with("watermark_delay:"));
        let bad = Config { dedup_horizon: "1m".into(), ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().starts_with("dedup_horizon:"));
        let bad = Config { listen: "nowhere".into(), ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().starts_with("listen:"));
        assert!(Config::load(Some(Path::new("/nonexistent.toml")), &[]).is_err());
    }
}
