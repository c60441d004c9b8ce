//! The scale-out deployment (SPEC §4, §5): Kafka for the click stream, PostgreSQL for results,
//! and four roles that run alone or together (`--roles collect,aggregate,query,archive`).
//!
//! ```text
//!  collect:   HTTP POST /v1/clicks → validate → Kafka (idempotent, acks=all, key ad_id) → answer
//!  aggregate: consumer group member → one engine per owned partition → one PostgreSQL
//!             transaction per partition commit (results + offset + checkpoint, epoch-fenced)
//!  query:     HTTP GET … → PostgreSQL: counts summed over partitions, per-partition top-N merged
//!  archive:   the topic → Parquet files per event hour, offsets in PostgreSQL (one at a time)
//! ```
//!
//! The engine, its checkpoints and the HTTP API are the embedded service's; only the source
//! (Kafka instead of the log) and the store (PostgreSQL instead of the embedded one) differ.

pub mod aggregate;
pub mod archive;
pub mod kafka;
pub mod pg;

use std::sync::Mutex;
use std::time::Duration;

use crate::engine::{Slot, Watermark};
use crate::event::{AdId, Minute};

/// The first byte of a record the collector produced: a validated click in `event::wire` form
/// follows. NDJSON lines never start with it.
pub const WIRE_MAGIC: u8 = 0;

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
    const NONE: Roles = Roles { collect: false, aggregate: false, query: false, archive: false };

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
}

/// Stops the process after a failure that leaves only the committed state trustworthy: a
/// restart (or another aggregator, after a rebalance) resumes from PostgreSQL.
pub fn fatal(what: &str, err: impl std::fmt::Display) -> ! {
    tracing::error!("{what}: {err}; stopping so that a restart resumes from what is committed");
    eprintln!("adclick: fatal: {what}: {err}");
    std::process::exit(70)
}

/// Longest a query role's statement may run.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The query role's reads, on a small pool of connections.
pub struct PgResults {
    url: String,
    pool: Mutex<Vec<postgres::Client>>,
    partitions: u32,
    top_n: usize,
}

impl PgResults {
    pub fn new(url: &str, partitions: u32, top_n: usize) -> Result<PgResults, pg::PgError> {
        let first = Self::connect(url)?;
        Ok(PgResults { url: url.into(), pool: Mutex::new(vec![first]), partitions, top_n })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, pg::PgError>,
    ) -> Result<T, pg::PgError> {
        let taken = self.pool.lock().expect("not poisoned").pop();
        let mut client = match taken {
            Some(c) if !c.is_closed() => c,
            _ => Self::connect(&self.url)?,
        };
        let out = f(&mut client);
        if out.is_ok() {
            let mut pool = self.pool.lock().expect("not poisoned");
            if pool.len() < 8 {
                pool.push(client);
            }
        }
        out
    }

    /// A query connection: no statement may run longer than [`QUERY_TIMEOUT`], so that one
    /// request (popular ads over a day of a million ads, say) cannot hold the database for long;
    /// it is answered 503 instead.
    fn connect(url: &str) -> Result<postgres::Client, pg::PgError> {
        let mut c = pg::connect(url)?;
        c.batch_execute(&format!("SET statement_timeout = {}", QUERY_TIMEOUT.as_millis()))?;
        Ok(c)
    }

    /// The watermark over every partition (see [`pg::watermark`]).
    pub fn watermark(&self) -> Result<Watermark, pg::PgError> {
        self.with(|c| pg::watermark(c, self.partitions).map(|(w, _)| w))
    }

    /// As the embedded store's `series`: the watermark is read first, so `final` never claims
    /// more than the counts read after it show.
    pub fn series(
        &self,
        ad: &str,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), pg::PgError> {
        self.with(|c| {
            let (w, _) = pg::watermark(c, self.partitions)?;
            Ok((pg::series(c, ad, slot, from, to)?, w))
        })
    }

    pub fn totals(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), pg::PgError> {
        self.with(|c| {
            let (w, _) = pg::watermark(c, self.partitions)?;
            Ok((pg::totals(c, slot, from, to)?, w))
        })
    }

    pub fn popular(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
        n: usize,
    ) -> Result<(Vec<(AdId, u64)>, Watermark), pg::PgError> {
        self.with(|c| {
            let (w, engines) = pg::watermark(c, self.partitions)?;
            Ok((pg::popular(c, slot, from, to, n, self.top_n, engines)?, w))
        })
    }
}

/// `serve` with Kafka and PostgreSQL: checks both (bounded waits, clear errors), applies the
/// schema, then runs this process's roles until SIGTERM or SIGINT.
pub async fn serve(settings: crate::config::Settings, scale: ScaleOut) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let (s2, sc2) = (settings.clone(), scale.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        kafka::ensure_topic(&sc2.brokers, &sc2.topic, s2.partitions)?;
        let mut client = pg::connect(&sc2.postgres)?;
        pg::migrate(&mut client)?;
        let mut recorded = s2.recorded();
        recorded.push(("topic".into(), sc2.topic.clone()));
        pg::check_settings(&mut client, &recorded)?;
        Ok(())
    })
    .await
    .context("start-up checks")??;
    let mut state = crate::api::AppState::new(&settings);
    if scale.roles.collect {
        let sink = kafka::Sink::new(&scale.brokers, &scale.topic, settings.partitions)?;
        state.collector = crate::api::Collector::Kafka(Arc::new(sink));
    }
    if scale.roles.query {
        let (url, parts, top_n) =
            (scale.postgres.clone(), settings.partitions, settings.engine.top_n);
        let results = tokio::task::spawn_blocking(move || PgResults::new(&url, parts, top_n))
            .await
            .context("connecting")??;
        state.results = crate::api::Results::Postgres(Arc::new(results));
    }
    let shutdown = Arc::new(AtomicBool::new(false));
    if let crate::api::Results::Postgres(results) = &state.results {
        // Minute end → final as queries see it: the stored watermark, read once a second.
        let (results, stop) = (results.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name("adclick-finality".into())
            .spawn(move || {
                let mut before = Watermark::NONE;
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_secs(1));
                    if let Ok(w) = results.watermark() {
                        crate::telemetry::observe_final(before, w, crate::pipeline::now_ms());
                        before = before.max(w);
                    }
                }
            })
            .context("starting the finality observer")?;
    }
    let aggregator = if scale.roles.aggregate {
        let (stop, sc, st) = (shutdown.clone(), scale.clone(), settings.clone());
        Some(
            std::thread::Builder::new()
                .name("adclick-aggregator".into())
                .spawn(move || {
                    let run = aggregate::Aggregator::new(&st, &sc).and_then(|a| a.run(&sc, &stop));
                    if let Err(e) = run {
                        fatal("aggregator", format!("{e:#}"));
                    }
                })
                .context("starting the aggregator")?,
        )
    } else {
        None
    };
    let archiver = if scale.roles.archive {
        let (stop, sc, st) = (shutdown.clone(), scale.clone(), settings.clone());
        Some(
            std::thread::Builder::new()
                .name("adclick-archiver".into())
                .spawn(move || {
                    if let Err(e) = archive::run(&st, &sc, &stop) {
                        fatal("archive", format!("{e:#}"));
                    }
                })
                .context("starting the archiver")?,
        )
    } else {
        None
    };
    // Signal handlers first: a SIGTERM right after the listening line must stop gracefully.
    let stop_signal = crate::cli::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listen: cannot bind {}", settings.listen))?;
    let addr = listener.local_addr().context("listen address")?;
    println!(
        "adclick: listening on http://{addr} (roles {}{}{}{}; kafka {} topic {}; postgres)",
        if scale.roles.collect { "collect " } else { "" },
        if scale.roles.aggregate { "aggregate " } else { "" },
        if scale.roles.query { "query " } else { "" },
        if scale.roles.archive { "archive" } else { "" },
        scale.brokers,
        scale.topic
    );
    let _ = std::io::stdout().flush();
    let collector = state.collector.clone();
    let served = axum::serve(listener, crate::api::router(state))
        .with_graceful_shutdown(stop_signal)
        .await
        .context("serving");
    tracing::info!("shutting down: committing what the aggregator holds");
    shutdown.store(true, Ordering::Release);
    if let crate::api::Collector::Kafka(sink) = collector {
        sink.flush();
    }
    for t in [aggregator, archiver].into_iter().flatten() {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    served
}
