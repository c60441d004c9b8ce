//! `adclick bench --observe-cost`: what watching costs: ingest throughput with nobody watching,
//! with a dashboard open and with `/metrics` scraped every second, in interleaved rounds.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::event::{EventTime, MINUTE_MS};

use super::*;

/// Who watches the server while clicks are ingested, in [`observe_cost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Observer {
    Nobody,
    /// The requests the dashboard page makes, every 2 s.
    Dashboard,
    /// `GET /metrics` every second, as Prometheus would with a 1 s scrape interval.
    Scrape,
}

/// One dashboard refresh, as src/dashboard.html makes it: health, metrics, the top ads of the
/// window and of the latest final minute, the totals and the top 5 ads' series.
fn dashboard_refresh(agent: &ureq::Agent, url: &str) -> anyhow::Result<()> {
    let get = |path: String| -> anyhow::Result<String> {
        Ok(agent.get(format!("{url}{path}")).call()?.body_mut().read_to_string()?)
    };
    let to = (EventTime::now().0 / MINUTE_MS + 1) * MINUTE_MS;
    get("/healthz".into())?;
    get("/metrics".into())?;
    let top: serde_json::Value =
        serde_json::from_str(&get(format!("/v1/ads/popular_ads?count=20&window=5&to={to}"))?)?;
    get(format!("/v1/ads/popular_ads?count=10&window=1&to={}", to - MINUTE_MS))?;
    get(format!("/v1/totals?window=60&to={to}"))?;
    let ads = top["ads"].as_array().cloned().unwrap_or_default();
    for ad in ads.iter().take(5).filter_map(|a| a["ad_id"].as_str()) {
        let from = to - 60 * MINUTE_MS;
        get(format!("/v1/ads/{ad}/timeseries?from={from}&to={to}"))?;
    }
    Ok(())
}

/// The cost of observing: ingest throughput (acknowledged, and through to aggregated) with
/// nobody watching, with a dashboard open and with a 1 s scrape; rounds interleave the three so
/// that drift on a shared machine spreads over all of them.
pub(super) fn observe_cost(args: &BenchArgs, rounds: usize) -> anyhow::Result<()> {
    let start = (EventTime::now().0 / MINUTE_MS - 120) * MINUTE_MS;
    eprintln!("bench: generating {} clicks…", args.events);
    let batches = workload(args.events, args.batch, args.per_minute, start, 42);
    let dir = tempfile::Builder::new().prefix("adclick-observe-").tempdir().context("temp dir")?;
    let observers = [Observer::Nobody, Observer::Dashboard, Observer::Scrape];
    // (observer, acked/s, aggregated/s, ms per refresh)
    let mut results: Vec<(Observer, f64, f64, f64)> = Vec::new();
    for round in 0..rounds {
        for (i, &observer) in observers.iter().enumerate() {
            let data = dir.path().join(format!("{round}-{i}"));
            let (server, _) = Server::start(&data, &[])?;
            let stop = AtomicBool::new(false);
            let requests = AtomicUsize::new(0);
            let busy_us = AtomicUsize::new(0);
            let began = Instant::now();
            let (acked, aggregated) = std::thread::scope(|s| -> anyhow::Result<(f64, f64)> {
                let watcher = s.spawn(|| -> anyhow::Result<()> {
                    let agent = agent();
                    let every = match observer {
                        Observer::Nobody => return Ok(()),
                        Observer::Dashboard => Duration::from_secs(2),
                        Observer::Scrape => Duration::from_secs(1),
                    };
                    while !stop.load(Ordering::Acquire) {
                        let t = Instant::now();
                        match observer {
                            Observer::Dashboard => dashboard_refresh(&agent, &server.url)?,
                            _ => {
                                agent.get(format!("{}/metrics", server.url)).call()?;
                            }
                        }
                        requests.fetch_add(1, Ordering::Relaxed);
                        busy_us.fetch_add(t.elapsed().as_micros() as usize, Ordering::Relaxed);
                        while t.elapsed() < every && !stop.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    Ok(())
                });
                let sent = send_all(&server.url, &batches, args.clients, &Mutex::new(Vec::new()));
                let acked = began.elapsed();
                let agent = agent();
                let drained = (|| -> anyhow::Result<()> {
                    sent?;
                    while !agent
                        .get(format!("{}/healthz", server.url))
                        .call()?
                        .body_mut()
                        .read_to_string()?
                        .contains("\"lag_records\":0")
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Ok(())
                })();
                let aggregated = began.elapsed();
                stop.store(true, Ordering::Release);
                watcher.join().expect("watcher panicked")?;
                drained?;
                let n = args.events as f64;
                Ok((n / acked.as_secs_f64(), n / aggregated.as_secs_f64()))
            })?;
            drop(server);
            // Each run starts on an empty disk: earlier runs' files would slow later ones.
            std::fs::remove_dir_all(&data).context("removing a run's data")?;
            let n = requests.load(Ordering::Relaxed);
            let each_ms = busy_us.load(Ordering::Relaxed) as f64 / 1000.0 / n.max(1) as f64;
            eprintln!(
                "bench: round {round} {observer:?}: {acked:.0} acked/s, {aggregated:.0} aggregated/s \
                 ({n} refreshes, {each_ms:.1} ms each)"
            );
            results.push((observer, acked, aggregated, each_ms));
        }
    }
    let median = |o: Observer, f: fn(&(Observer, f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = results.iter().filter(|r| r.0 == o).map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "adclick bench --observe-cost — {} clicks per run, {rounds} interleaved rounds, medians",
        args.events
    );
    let (base_acked, base_aggr) =
        (median(Observer::Nobody, |r| r.1), median(Observer::Nobody, |r| r.2));
    for (o, what) in [
        (Observer::Nobody, "nobody watching"),
        (Observer::Dashboard, "dashboard open (every 2 s)"),
        (Observer::Scrape, "/metrics scraped every 1 s"),
    ] {
        let (acked, aggr, each) = (median(o, |r| r.1), median(o, |r| r.2), median(o, |r| r.3));
        println!(
            "  {what:<28} {acked:>9.0} acked/s ({:>+5.1}%)  {aggr:>9.0} aggregated/s ({:>+5.1}%)  \
             {each:.1} ms per refresh under load",
            100.0 * (acked / base_acked - 1.0),
            100.0 * (aggr / base_aggr - 1.0)
        );
    }
    Ok(())
}
