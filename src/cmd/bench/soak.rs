//! `adclick bench --soak DURATION`: a steady rate with live event times against a server with
//! default settings, a line per minute (throughput, backlog, finality, memory, disk), then a kill
//! and the time to recover.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::event::{EventTime, MINUTE_MS};

use super::*;

/// What the soak samples once a second.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    accepted: f64,
    commits: f64,
    checkpoint_bytes: f64,
    log_bytes: f64,
    lag: f64,
    dedup_entries: f64,
    dedup_bytes: f64,
    /// `/proc/PID/io` write_bytes: everything the server made the kernel write to disk.
    disk_bytes: f64,
    rss_bytes: f64,
}

fn sample(agent: &ureq::Agent, url: &str, pid: u32) -> anyhow::Result<Sample> {
    let text = agent.get(format!("{url}/metrics")).call()?.body_mut().read_to_string()?;
    let metric = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let proc_field = |file: &str, key: &str| -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0.0)
    };
    Ok(Sample {
        accepted: metric(crate::telemetry::ACCEPTED),
        commits: metric("adclick_commit_duration_seconds_count"),
        checkpoint_bytes: metric(crate::telemetry::CHECKPOINT_WRITTEN),
        log_bytes: metric(crate::telemetry::LOG_WRITTEN),
        lag: metric(crate::telemetry::LAG),
        dedup_entries: metric(crate::telemetry::DEDUP_ENTRIES),
        dedup_bytes: metric(crate::telemetry::DEDUP_BYTES),
        disk_bytes: proc_field("io", "write_bytes:"),
        rss_bytes: proc_field("status", "VmRSS:") * 1024.0,
    })
}

/// The soak benchmark: a steady rate with live event times for `duration`, reported per minute
/// of the run: clicks/s accepted, the largest backlog sampled (records not yet aggregated; once
/// a second), commits/s, checkpoint and disk write rates against the click log's, RSS against
/// the dedup state's own memory, and minute end → final latency (from the minute's end plus the
/// watermark delay, polled every 20 ms) of the minutes that turned final in it. Then recovery
/// after `kill -9` at that steady state.
pub(super) fn soak(args: &BenchArgs, duration: Duration) -> anyhow::Result<()> {
    let delay_ms = 15_000; // the default watermark_delay
    let dir = tempfile::Builder::new().prefix("adclick-soak-").tempdir().context("temp dir")?;
    let data = dir.path().join("data");
    let (mut server, _) = Server::start(&data, &[])?;
    let pid = server.child.id();
    eprintln!(
        "bench: soak for {} at {} clicks/s over {} ads into {}…",
        humantime::format_duration(duration),
        args.rate,
        args.ads,
        server.url
    );
    let mut generator = Command::new(std::env::current_exe().context("locating adclick")?)
        .args(["-q", "generate", "--to", &server.url])
        .args(["--rate", &args.rate.to_string(), "--ads", &args.ads.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting adclick generate")?;
    let began = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Minute end → final: each minute ending after the start, polled until final.
    let finals: Arc<Mutex<Vec<(Instant, f64)>>> = Arc::default();
    let poller = {
        let (url, finals, stop) = (server.url.clone(), finals.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let agent = agent();
            let mut end = (EventTime::now().0 / MINUTE_MS + 1) * MINUTE_MS;
            while !stop.load(Ordering::Relaxed) {
                let ready = end + delay_ms;
                if EventTime::now().0 < ready {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let body = agent
                    .get(format!("{url}/v1/ads/popular_ads?count=1&to={end}"))
                    .call()?
                    .body_mut()
                    .read_to_string()?;
                if body.contains("\"final\":true") {
                    let late = (EventTime::now().0 - ready) as f64;
                    finals.lock().expect("not poisoned").push((Instant::now(), late));
                    end += MINUTE_MS;
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Ok(())
        })
    };
    let agent = agent();
    let mut samples: Vec<(Instant, Sample)> = Vec::new();
    println!(
        "adclick bench --soak {} --rate {} --ads {} (default settings, 1 s samples)",
        humantime::format_duration(duration),
        args.rate,
        args.ads
    );
    println!(
        "{:>4} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>6} {:>8} {:>9} {:>8} {:>8} {:>18}",
        "min",
        "clicks/s",
        "backlog",
        "commit/s",
        "ckpt MB/s",
        "disk MB/s",
        "log MB/s",
        "disk/log",
        "RSS MiB",
        "dedup",
        "dedupMiB",
        "RSS/ddp",
        "final p50/p99/max"
    );
    let mut minute_start = (began, sample(&agent, &server.url, pid)?);
    let mut backlog_max = 0.0f64;
    let mut rows = Vec::new();
    while began.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(status) = generator.try_wait()? {
            bail!("the generator stopped: {status}");
        }
        let s = sample(&agent, &server.url, pid)?;
        backlog_max = backlog_max.max(s.lag);
        samples.push((Instant::now(), s));
        let now = Instant::now();
        if now.duration_since(minute_start.0) >= Duration::from_secs(60)
            || began.elapsed() >= duration
        {
            let (t0, a) = minute_start;
            let secs = now.duration_since(t0).as_secs_f64();
            let rate = |f: fn(&Sample) -> f64| (f(&s) - f(&a)) / secs;
            let mut lat: Vec<f64> = finals
                .lock()
                .expect("not poisoned")
                .iter()
                .filter(|(at, _)| *at > t0 && *at <= now)
                .map(|(_, l)| *l)
                .collect();
            lat.sort_by(f64::total_cmp);
            let pct = |p: f64| {
                lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            let log = rate(|s| s.log_bytes);
            let row = (
                rate(|s| s.accepted),
                backlog_max,
                rate(|s| s.commits),
                rate(|s| s.checkpoint_bytes) / 1e6,
                rate(|s| s.disk_bytes) / 1e6,
                log / 1e6,
                rate(|s| s.disk_bytes) / log.max(1.0),
                s.rss_bytes / 1048576.0,
                s.dedup_entries,
                s.dedup_bytes / 1048576.0,
                s.rss_bytes / s.dedup_bytes.max(1.0),
                (pct(0.5), pct(0.99), lat.last().copied().unwrap_or(f64::NAN)),
            );
            println!(
                "{:>4} {:>9.0} {:>9.0} {:>8.1} {:>9.2} {:>9.2} {:>9.2} {:>6.2} {:>8.0} {:>9.0} {:>8.0} {:>8.2} {:>6.0}/{:.0}/{:.0}",
                rows.len() + 1,
                row.0,
                row.1,
                row.2,
                row.3,
                row.4,
                row.5,
                row.6,
                row.7,
                row.8,
                row.9,
                row.10,
                row.11 .0,
                row.11 .1,
                row.11 .2
            );
            rows.push(row);
            minute_start = (now, s);
            backlog_max = 0.0;
        }
    }
    // Over the whole run.
    let (first, last) = (
        samples.first().map(|s| s.1).unwrap_or_default(),
        samples.last().map(|s| s.1).unwrap_or_default(),
    );
    let mut all: Vec<f64> = finals.lock().expect("not poisoned").iter().map(|(_, l)| *l).collect();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
    };
    let log = last.log_bytes - first.log_bytes;
    println!(
        "whole run: {:.0} clicks/s accepted; backlog max {:.0} records ({:.2} s of input); disk writes {:.2}× the click log's ({:.1} vs {:.1} MB/s); checkpoints {:.2} MB/s; final p50 {:.0} p99 {:.0} max {:.0} ms over {} minutes; RSS max {:.0} MiB",
        (last.accepted - first.accepted) / duration.as_secs_f64(),
        rows.iter().map(|r| r.1).fold(0.0, f64::max),
        rows.iter().map(|r| r.1).fold(0.0, f64::max) / args.rate.max(1) as f64,
        (last.disk_bytes - first.disk_bytes) / log.max(1.0),
        (last.disk_bytes - first.disk_bytes) / duration.as_secs_f64() / 1e6,
        log / duration.as_secs_f64() / 1e6,
        (last.checkpoint_bytes - first.checkpoint_bytes) / duration.as_secs_f64() / 1e6,
        pct(0.5),
        pct(0.99),
        all.last().copied().unwrap_or(f64::NAN),
        all.len(),
        samples.iter().map(|s| s.1.rss_bytes).fold(0.0, f64::max) / 1048576.0,
    );
    stop.store(true, Ordering::Relaxed);
    // kill -9 at steady state, traffic still flowing; then the generator stops.
    let _ = server.child.kill();
    let _ = server.child.wait();
    let _ = generator.kill();
    let _ = generator.wait();
    let _ = poller.join();
    drop(server);
    // Its recovery log line says where the time went.
    std::env::set_var("ADCLICK_LOG", "adclick=info");
    let (server, took) = Server::start(&data, &[])?;
    println!("recovery after kill -9 at steady state: {:.2} s to listening", took.as_secs_f64());
    drop(server);
    if args.keep {
        println!("  data kept in {}", dir.keep().display());
    }
    Ok(())
}
