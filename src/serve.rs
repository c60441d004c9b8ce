//! `adclick serve`: assembles one process from its settings and runs it until SIGTERM or SIGINT.
//!
//! ```text
//!  Settings ─┬─ embedded:  Pipeline (log, aggregator, archiver, store): collector, results, jobs
//!            └─ scale-out: Kafka Sink (collect), PgResults (query), aggregator and archiver
//!                          threads (aggregate, archive)
//!        ──▶ api::router over them; bind, print "listening on …", write <data_dir>/server.json,
//!            serve; on a signal: stop serving, then commit and stop the threads, in that order
//! ```
//!
//! This is the one place that names both the HTTP API and the adapters behind it.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::api::AppState;
use crate::config::{ScaleOut, Settings};
use crate::engine::Watermark;
use crate::event::EventTime;
use crate::fault::fatal;
use crate::pipeline::{Pipeline, QueryState};
use crate::scaleout::{aggregate, kafka, PgResults};

/// Called once the listener is bound, with its address (the demo starts its generator there).
pub type OnListening = Box<dyn FnOnce(SocketAddr) + Send>;

/// Runs the process `settings` describe until a signal stops it.
pub fn run(settings: Settings, on_listening: Option<OnListening>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    match settings.scaleout.clone() {
        Some(scale) => runtime.block_on(scaled_out(settings, scale, on_listening)),
        None => embedded(&runtime, settings, on_listening),
    }
}

fn embedded(
    runtime: &tokio::runtime::Runtime,
    settings: Settings,
    on_listening: Option<OnListening>,
) -> anyhow::Result<()> {
    let pipeline = Pipeline::start(&settings)?;
    let state = AppState {
        collector: Some(Arc::new(pipeline.ingest.clone())),
        results: Some(pipeline.query.clone()),
        jobs: Some(pipeline.query.clone()),
        counters: pipeline.query.ingest.clone(),
        filters: pipeline.query.filters.clone(),
        ..AppState::new(&settings)
    };
    let failure = pipeline.fatal.clone();
    failure.handle();
    let result = runtime.block_on(async {
        let signal = shutdown_signal();
        let shutdown = async move {
            tokio::select! { _ = signal => {}, _ = failure.raised() => {} }
        };
        let (listener, addr) = bind(&settings).await?;
        println!("adclick: listening on http://{addr} (data in {})", settings.data_dir.display());
        let _ = std::io::stdout().flush();
        let token = write_server_file(&settings.data_dir, addr)?;
        if !settings.log_interval.is_zero() {
            tokio::spawn(log_status(Arc::downgrade(&pipeline.query), settings.log_interval));
        }
        if let Some(f) = on_listening {
            f(addr);
        }
        let state = AppState { admin_token: Arc::new(token), ..state };
        axum::serve(listener, crate::api::router(state))
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving")
    });
    tracing::info!("shutting down: committing and checkpointing");
    let _ = std::fs::remove_file(server_file_path(&settings.data_dir));
    let failed = pipeline.fatal.cause();
    pipeline.stop();
    if let Some((what, err)) = failed {
        fatal(&what, err);
    }
    result
}

/// `serve` with Kafka and PostgreSQL: checks both (bounded waits, clear errors), applies the
/// schema, then runs this process's roles until SIGTERM or SIGINT.
async fn scaled_out(
    settings: Settings,
    scale: ScaleOut,
    on_listening: Option<OnListening>,
) -> anyhow::Result<()> {
    let (s2, sc2) = (settings.clone(), scale.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        kafka::ensure_topic(&sc2.brokers, &sc2.topic, s2.partitions)?;
        let check = || crate::scaleout::prepare_database(&s2, &sc2).map(drop);
        // A database that is down or restarting is waited for, `postgres_wait` (a process
        // started during an outage joins once it is back); anything else is an error at once.
        let wait = sc2.postgres_wait;
        let deadline = std::time::Instant::now() + wait;
        loop {
            match check() {
                Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                    tracing::warn!("{e}; waiting for PostgreSQL (postgres_wait {wait:?})");
                    std::thread::sleep(Duration::from_secs(2));
                }
                other => return Ok(other?),
            }
        }
    })
    .await
    .context("start-up checks")??;
    let mut state = AppState::new(&settings);
    let mut sink = None;
    if scale.roles.collect {
        let s = Arc::new(kafka::Sink::new(&scale.brokers, &scale.topic, settings.partitions)?);
        state.collector = Some(s.clone());
        sink = Some(s);
    }
    let shutdown = Arc::new(AtomicBool::new(false));
    if scale.roles.query {
        let (url, parts, top_n) =
            (scale.postgres.clone(), settings.partitions, settings.engine.top_n);
        let results = tokio::task::spawn_blocking(move || PgResults::new(&url, parts, top_n))
            .await
            .context("connecting")??;
        let results = Arc::new(results);
        observe_finality(results.clone(), shutdown.clone())?;
        state.results = Some(results);
    }
    let aggregator = if scale.roles.aggregate {
        let (stop, sc, st) = (shutdown.clone(), scale.clone(), settings.clone());
        Some(spawn("aggregator", move || {
            let run = aggregate::Aggregator::new(&st, &sc, stop).and_then(|a| a.run(&sc));
            if let Err(e) = run {
                fatal("aggregator", crate::fault::chain(&e));
            }
        })?)
    } else {
        None
    };
    let archiver = if scale.roles.archive {
        let (stop, sc, st) = (shutdown.clone(), scale.clone(), settings.clone());
        Some(spawn("archiver", move || {
            if let Err(e) = crate::scaleout::archive::run(&st, &sc, &stop) {
                fatal("archive", crate::fault::chain(&e));
            }
        })?)
    } else {
        None
    };
    // Signal handlers first: a SIGTERM right after the listening line must stop gracefully.
    let stop_signal = shutdown_signal();
    let (listener, addr) = bind(&settings).await?;
    let roles = scale.roles;
    println!(
        "adclick: listening on http://{addr} (roles {}{}{}{}; kafka {} topic {}; postgres)",
        if roles.collect { "collect " } else { "" },
        if roles.aggregate { "aggregate " } else { "" },
        if roles.query { "query " } else { "" },
        if roles.archive { "archive" } else { "" },
        scale.brokers,
        scale.topic
    );
    let _ = std::io::stdout().flush();
    if let Some(f) = on_listening {
        f(addr);
    }
    let served = axum::serve(listener, crate::api::router(state))
        .with_graceful_shutdown(stop_signal)
        .await
        .context("serving");
    tracing::info!("shutting down: committing what the aggregator holds");
    shutdown.store(true, Ordering::Release);
    if let Some(sink) = sink {
        sink.flush();
    }
    for t in [aggregator, archiver].into_iter().flatten() {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    served
}

fn spawn(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("adclick-{name}"))
        .spawn(f)
        .with_context(|| format!("starting the {name} thread"))
}

/// Minute end → final as the query role's readers see it: the stored watermark, read once a
/// second, for the final-delay histogram.
fn observe_finality(results: Arc<PgResults>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    spawn("finality", move || {
        let mut before = Watermark::NONE;
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_secs(1));
            if let Ok(w) = results.watermark() {
                crate::telemetry::observe_final(before, w, EventTime::now().0);
                before = before.max(w);
            }
        }
    })
    .map(drop)
}

/// Binds the listener (port 0 picks a free port).
async fn bind(settings: &Settings) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listen: cannot bind {}", settings.listen))?;
    let addr = listener.local_addr().context("listen address")?;
    Ok((listener, addr))
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

/// Logs a status line every `every`: clicks accepted per second since the last line, records
/// not yet aggregated, and how far the watermark trails the clock.
///
/// It holds the query state weakly: the last strong reference must be dropped by `serve` on its
/// own thread after the runtime stopped, since dropping the state drops the archive's I/O
/// runtime, which may not happen inside another runtime's task.
async fn log_status(q: std::sync::Weak<QueryState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last = (Instant::now(), q.upgrade().map_or(0, |q| q.ingest.accepted()));
    loop {
        tick.tick().await;
        let Some(q) = q.upgrade() else { return };
        let accepted = q.ingest.accepted();
        let rate = (accepted - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        last = (Instant::now(), accepted);
        let behind = q.watermark.load().ms().map(|w| (EventTime::now().0 - w) as f64 / 1000.0);
        tracing::info!(
            clicks_per_second = rate.round() as u64,
            accepted,
            lag_records = q.lag(),
            watermark_behind_seconds = behind.map(|b| format!("{b:.1}")).unwrap_or("none".into()),
            "status"
        );
    }
}

/// What `serve` tells commands on the same data directory (`recalc`, `reconcile`, `status`).
#[derive(Serialize, Deserialize)]
pub struct ServerFile {
    pub url: String,
    pub token: String,
    pub pid: u32,
}

pub fn server_file_path(data_dir: &Path) -> PathBuf {
    data_dir.join("server.json")
}

/// Writes `server.json` for a server listening on `addr` (atomically, readable by the owner
/// only) and returns its admin token.
pub fn write_server_file(data_dir: &Path, addr: SocketAddr) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading random bytes for the admin token")?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let host = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let file =
        ServerFile { url: format!("http://{host}"), token: token.clone(), pid: std::process::id() };
    let path = server_file_path(data_dir);
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    // Not fsynced: after a machine crash no server runs, and the file is not read then.
    f.write_all(&serde_json::to_vec(&file)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}
