//! End to end: the real `adclick serve` binary on a temp data directory and a free port,
//! compared with an independent oracle; killed with SIGKILL and fault-injected aborts; fed bad
//! input.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use adclick::event::{parse_line, EventTime, Validation};
use adclick::filter::{FilterConfig, Filters};
use adclick::generate::{GenConfig, Generator};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

pub(crate) const CONFIG: &str = r#"
watermark_delay = "1s"
idle_timeout = "1s"
allowed_lateness = "2m"
dedup_horizon = "4m"
partitions = 4
shards = 2
checkpoint_interval = "1s"
max_body_bytes = 200000

[[filters]]
id = "us"
country = ["US"]

[[filters]]
id = "office"
ip = ["10.0.0.0/8", "2001:db8::/32"]
"#;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

/// A running `adclick serve`.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) url: String,
    pub(crate) dir: PathBuf,
}

impl Server {
    /// Starts `adclick serve` without waiting for it to listen.
    pub(crate) fn spawn(dir: &Path, config: &str, env: &[(&str, &str)]) -> Child {
        let cfg = dir.join("adclick.toml");
        std::fs::write(&cfg, config).unwrap();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_adclick"));
        cmd.arg("--config").arg(&cfg).arg("serve").arg("--data-dir").arg(dir.join("data"));
        cmd.args(["--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).stderr(stderr);
        cmd.env_remove("ADCLICK_FAULT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn adclick")
    }

    /// Starts `adclick serve` and waits for its address. An armed fault point may abort it
    /// before it listens (a crash during recovery): then it is started again without one.
    pub(crate) fn start(dir: &Path, config: &str, env: &[(&str, &str)]) -> Server {
        let mut child = Server::spawn(dir, config, env);
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) else {
            let _ = child.wait();
            let faulted = env.iter().any(|(k, _)| *k == "ADCLICK_FAULT");
            assert!(
                faulted && log.contains("fault point"),
                "server did not start: {line:?}\n{log}"
            );
            let clean: Vec<_> =
                env.iter().filter(|(k, _)| *k != "ADCLICK_FAULT").copied().collect();
            return Server::start(dir, config, &clean);
        };
        Server { child, url: url.to_string(), dir: dir.to_owned() }
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// Stops the server the way an operator does (SIGTERM): it commits, checkpoints and
    /// archives what it holds.
    pub(crate) fn stop(&mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "a graceful stop: {status}\n{}", self.log());
        let log = self.log();
        assert!(!log.contains("panicked"), "a graceful stop without a panic:\n{log}");
    }

    pub(crate) fn get(&self, path: &str) -> (u16, Value) {
        let mut r = agent().get(format!("{}{path}", self.url)).call().expect("GET");
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    pub(crate) fn post(&self, body: &[u8]) -> (u16, Value) {
        post(&self.url, body).expect("POST")
    }

    pub(crate) fn metrics(&self) -> String {
        agent()
            .get(format!("{}/metrics", self.url))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn post(url: &str, body: &[u8]) -> Result<(u16, Value), ureq::Error> {
    let mut r = agent().post(format!("{url}/v1/clicks")).send(body)?;
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string()?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

pub(crate) fn filters() -> Filters {
    let list = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    Filters::compile(&[
        FilterConfig { id: "us".into(), country: list(&["US"]), ..Default::default() },
        FilterConfig {
            id: "office".into(),
            ip: list(&["10.0.0.0/8", "2001:db8::/32"]),
            ..Default::default()
        },
    ])
    .unwrap()
}

#[derive(PartialEq, Eq, Hash)]
enum Key {
    ClickId(String, String),
    Fields(String, i64, Option<String>, Option<IpAddr>),
}

/// Distinct valid clicks per (minute, ad, slot), counted plainly. Every line here is recent,
/// so none is late; all copies of a click share its time, so the horizon never splits them.
pub(crate) fn oracle(lines: &[(String, i64)]) -> (BTreeMap<(i64, String, usize), u64>, usize) {
    let f = filters();
    let mut seen = HashSet::new();
    let mut counts = BTreeMap::new();
    let mut invalid = 0;
    for (line, at) in lines {
        let v = Validation { now: EventTime(*at), max_skew_ms: 300_000 };
        let c = match parse_line(line.as_bytes(), v) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(_) => {
                invalid += 1;
                continue;
            }
        };
        let key = match &c.click_id {
            Some(id) => Key::ClickId(c.ad_id.to_string(), id.to_string()),
            None => Key::Fields(
                c.ad_id.to_string(),
                c.time.0,
                c.user_id.as_ref().map(|u| u.to_string()),
                c.ip,
            ),
        };
        if !seen.insert(key) {
            continue;
        }
        let minute = c.time.0.div_euclid(60_000);
        let mask = f.matches(&c);
        *counts.entry((minute, c.ad_id.to_string(), 0)).or_default() += 1;
        for i in 0..f.len() {
            if mask.contains(i) {
                *counts.entry((minute, c.ad_id.to_string(), i + 1)).or_default() += 1;
            }
        }
    }
    (counts, invalid)
}

pub(crate) fn generator(seed: u64) -> Generator {
    Generator::new(generator_config(seed))
}

/// The end-to-end tests' workload: 25 Zipf ads, disorder, duplicates, 2% invalid lines.
pub(crate) fn generator_config(seed: u64) -> GenConfig {
    GenConfig {
        seed,
        ads: 25,
        zipf: 1.1,
        disorder_ms: 3_000,
        duplicate: 0.08,
        late: 0.0,
        too_late: 0.0,
        invalid: 0.02,
        click_id: 0.6,
        users: 20,
        ..GenConfig::default()
    }
}

pub(crate) const SLOT_NAMES: [&str; 3] = ["", "us", "office"];

/// Waits until every minute up to `last` is final, then checks every count, every time series
/// and popular ads over several windows against the oracle.
pub(crate) fn assert_matches_oracle(
    server: &Server,
    expected: &BTreeMap<(i64, String, usize), u64>,
) {
    let first = expected.keys().map(|k| k.0).min().unwrap();
    let last = expected.keys().map(|k| k.0).max().unwrap();
    let (from, to) = (first * 60_000, (last + 1) * 60_000);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, v) = server.get(&format!("/v1/ads/popular_ads?to={to}"));
        if v["final"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "minutes never became final: {v}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let ads: BTreeSet<&String> = expected.keys().map(|k| &k.1).collect();
    for ad in &ads {
        for (slot, name) in SLOT_NAMES.iter().enumerate() {
            let filter = if name.is_empty() { String::new() } else { format!("&filter={name}") };
            let (status, v) =
                server.get(&format!("/v1/ads/{ad}/timeseries?from={from}&to={to}{filter}"));
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["final"], true);
            for p in v["points"].as_array().unwrap() {
                let minute =
                    adclick::event::parse_rfc3339(p["minute"].as_str().unwrap()).unwrap().0
                        / 60_000;
                // Epoch ms beside RFC 3339, for chart tools.
                assert_eq!(p["minute_ms"].as_i64(), Some(minute * 60_000), "{p}");
                let want = expected.get(&(minute, ad.to_string(), slot)).copied().unwrap_or(0);
                assert_eq!(
                    p["count"].as_u64().unwrap(),
                    want,
                    "{ad} minute {minute} slot {name:?}"
                );
            }
            let (_, v) =
                server.get(&format!("/v1/ads/{ad}/aggregated_count?from={from}&to={to}{filter}"));
            let want: u64 = expected
                .iter()
                .filter(|((_, a, s), _)| a == *ad && *s == slot)
                .map(|(_, c)| c)
                .sum();
            assert_eq!(v["count"].as_u64().unwrap(), want, "{ad} total slot {name:?}: {v}");
            assert_eq!((v["from_ms"].as_i64(), v["to_ms"].as_i64()), (Some(from), Some(to)), "{v}");
        }
    }
    for (slot, name) in SLOT_NAMES.iter().enumerate() {
        for window in [1, 2, last - first + 1] {
            for end in first + 1..=last + 1 {
                let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
                for ((m, ad, s), c) in expected {
                    if *s == slot && (end - window..end).contains(m) {
                        *sums.entry(ad).or_default() += c;
                    }
                }
                let mut want: Vec<(&str, u64)> = sums.into_iter().collect();
                want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.as_bytes().cmp(b.0.as_bytes())));
                want.truncate(5);
                let filter =
                    if name.is_empty() { String::new() } else { format!("&filter={name}") };
                let (_, v) = server.get(&format!(
                    "/v1/ads/popular_ads?count=5&window={window}&to={}{filter}",
                    end * 60_000
                ));
                let got: Vec<(String, u64)> = v["ads"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| {
                        (a["ad_id"].as_str().unwrap().to_string(), a["count"].as_u64().unwrap())
                    })
                    .collect();
                let want: Vec<(String, u64)> =
                    want.into_iter().map(|(a, c)| (a.to_string(), c)).collect();
                assert_eq!(got, want, "popular_ads window {window} to minute {end} slot {name:?}");
            }
        }
        // Totals per minute across ads, every minute listed (zeros too), with epoch ms; over
        // the oracle's minutes only (a caller's server may hold clicks after them).
        let filter = if name.is_empty() { String::new() } else { format!("&filter={name}") };
        let window = last - first + 1;
        let (status, v) = server.get(&format!("/v1/totals?window={window}&to={to}{filter}"));
        assert_eq!(status, 200, "{v}");
        let got: Vec<(i64, u64)> = v["minutes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["minute_ms"].as_i64().unwrap() / 60_000, p["count"].as_u64().unwrap()))
            .collect();
        let want: Vec<(i64, u64)> = (first..last + 1)
            .map(|m| {
                let n = expected.iter().filter(|((em, _, s), _)| *em == m && *s == slot);
                (m, n.map(|(_, c)| c).sum())
            })
            .collect();
        assert_eq!(got, want, "totals slot {name:?}");
    }
    crate::windows::assert_windows_match_oracle(server, expected);
}

#[test]
fn serve_matches_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG, &[]);
    let mut g = generator(11);
    let mut sent = Vec::new();
    let mut rejected = 0;
    for _ in 0..16 {
        let at = now_ms();
        let lines: Vec<String> = (0..400).map(|_| g.line(EventTime(at))).collect();
        let (status, v) = server.post(lines.join("\n").as_bytes());
        assert_eq!(status, 200, "{v}");
        rejected += v["rejected"].as_array().unwrap().len();
        sent.extend(lines.into_iter().map(|l| (l, at)));
        std::thread::sleep(Duration::from_millis(150));
    }
    let (expected, invalid) = oracle(&sent);
    assert_eq!(rejected, invalid, "the collector rejects exactly the invalid lines");
    assert!(invalid > 50 && expected.len() > 50);
    assert_matches_oracle(&server, &expected);
    let (_, v) = server.get("/v1/ads/popular_ads?filter=nope");
    assert_eq!(v["error"], "filter: unknown filter \"nope\" (configured: [\"us\", \"office\"])");
}

#[test]
fn kill_9_at_random_moments_loses_nothing_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), CONFIG, &[]);
    let url = Arc::new(Mutex::new(server.url.clone()));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let (url, sent) = (url.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut g = generator(29);
            let mut resends = 0;
            // 150 batches of 100 spread over the whole kill period, so armed faults meet traffic.
            for _ in 0..150 {
                let at = now_ms();
                let lines: Vec<String> = (0..100).map(|_| g.line(EventTime(at))).collect();
                let body = lines.join("\n");
                sent.lock().unwrap().extend(lines.into_iter().map(|l| (l, at)));
                // Re-send until acknowledged: an unacknowledged batch may or may not be durable.
                loop {
                    let target = url.lock().unwrap().clone();
                    match post(&target, body.as_bytes()) {
                        Ok((200, _)) => break,
                        _ => {
                            resends += 1;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(40));
            }
            resends
        })
    };
    let mut rng = SmallRng::seed_from_u64(5);
    let faults = [
        "store.mid_commit:2",
        "log.before_sync:1",
        "aggregator.after_checkpoint:1",
        "store.after_commit:2",
        // A checkpoint file half written while commits go on (earlier manifests committed).
        "checkpoint.before_sync:2",
    ];
    let mut kills = 0;
    for round in 0..11 {
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1200)));
        server.kill();
        kills += 1;
        // Every other restart arms a fault point that aborts mid-commit by itself.
        let fault = (round % 2 == 1).then(|| faults[(round / 2) % faults.len()]);
        let env: Vec<(&str, &str)> = fault.iter().map(|f| ("ADCLICK_FAULT", *f)).collect();
        server = Server::start(dir.path(), CONFIG, &env);
        *url.lock().unwrap() = server.url.clone();
    }
    std::thread::sleep(Duration::from_millis(500));
    server.kill();
    server = Server::start(dir.path(), CONFIG, &[]);
    *url.lock().unwrap() = server.url.clone();
    let resends = client.join().unwrap();
    assert!(kills >= 5);
    let aborted = server.log().matches("fault point").count();
    assert!(aborted >= 1, "no fault point fired:\n{}", server.log());
    let sent = sent.lock().unwrap().clone();
    let (expected, _) = oracle(&sent);
    eprintln!(
        "crash test: {kills} SIGKILLs, {aborted} fault aborts, {resends} re-sends, {} lines",
        sent.len()
    );
    assert_matches_oracle(&server, &expected);
}

#[test]
fn bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace("max_body_bytes = 200000", "max_body_bytes = 4096");
    let server = Server::start(dir.path(), &config, &[]);
    let t = now_ms();
    let body = format!(
        "{{\"ad_id\":\"a\",\"click_timestamp\":{t}}}\nnot json\n\n{{\"ad_id\":\"a\"}}\n{{\"ad_id\":\"a\",\"click_timestamp\":{},\"country\":\"XX\"}}",
        t + 3_600_000
    );
    let (status, v) = server.post(body.as_bytes());
    assert_eq!(status, 200);
    assert_eq!(v["accepted"], 1);
    let rejected: Vec<(u64, String)> = v["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["error"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(rejected.len(), 3, "{v}");
    assert_eq!(rejected[0].0, 2);
    assert!(rejected[0].1.starts_with("not JSON"));
    assert_eq!(rejected[1], (4, "click_timestamp: missing".to_string()));
    assert_eq!(rejected[2].0, 5);
    assert!(rejected[2].1.contains("ahead of the clock"), "{}", rejected[2].1);

    let (status, v) = server.post(&[0xff, 0xfe, b'\n']);
    assert_eq!(
        (status, v["error"].as_str().unwrap()),
        (400, "body is not UTF-8 (invalid byte at offset 0)")
    );
    let (status, v) = server.post(&vec![b' '; 5000]);
    assert_eq!(status, 413);
    assert!(v["error"].as_str().unwrap().contains("4096"));
    let (status, v) = server.post(b"");
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(0)));

    let m = (t / 60_000) * 60_000;
    let cases = [
        (format!("/v1/ads/a/aggregated_count?from={}", m + 1), 400, "from: "),
        (format!("/v1/ads/a/aggregated_count?from={m}&to={}", m - 60_000), 400, "from: "),
        (format!("/v1/ads/a/aggregated_count?from={m}&to={m}"), 400, "from: "),
        ("/v1/ads/a/aggregated_count?to=yesterday".into(), 400, "to: "),
        ("/v1/ads/a/aggregated_count?to=9223372036854740000".into(), 400, "to: "),
        ("/v1/ads/popular_ads?to=-9223372036854760000".into(), 400, "to: "),
        (
            "/v1/ads/a/timeseries?from=0&to=86460000".into(),
            400,
            "from: the range may span at most 1440",
        ),
        ("/v1/ads/a/aggregated_count?filter=nope".into(), 404, "filter: unknown filter"),
        ("/v1/ads/a/aggregated_count?color=red".into(), 400, "color: unknown parameter"),
        ("/v1/ads/popular_ads?count=1001".into(), 400, "count: "),
        ("/v1/ads/popular_ads?count=0".into(), 400, "count: "),
        ("/v1/ads/popular_ads?window=abc".into(), 400, "window: "),
        ("/v1/ads/popular_ads?window=1441".into(), 400, "window: "),
        (format!("/v1/ads/{}/aggregated_count", "x".repeat(65)), 400, "ad_id: "),
        ("/v1/nothing".into(), 404, "no such endpoint"),
    ];
    for (path, status, prefix) in cases {
        let (got, v) = server.get(&path);
        assert_eq!(got, status, "{path}: {v}");
        assert!(v["error"].as_str().unwrap().starts_with(prefix), "{path}: {v}");
    }
    let (status, v) = server.get("/healthz");
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")));
    let (status, v) =
        server.post(format!("{{\"ad_id\":\"b\",\"click_timestamp\":{t}}}").as_bytes());
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(1)));
    let metrics = server.metrics();
    assert!(metrics.contains("adclick_lines_invalid_total{reason=\"not_json\"} 1"), "{metrics}");
    assert!(metrics.contains("adclick_lines_invalid_total{reason=\"in_future\"} 1"));
}

#[test]
fn generate_is_deterministic_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    let run = |seed: &str, name: &str| {
        let out = dir.path().join(name);
        let status = Command::new(env!("CARGO_BIN_EXE_adclick"))
            .args([
                "generate",
                "--seed",
                seed,
                "--count",
                "3000",
                "--start",
                "2026-11-30T08:00:00Z",
                "--to",
            ])
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read_to_string(out).unwrap()
    };
    let a = run("7", "a");
    assert_eq!(a, run("7", "b"));
    assert_ne!(a, run("8", "c"));
    assert_eq!(a.lines().count(), 3000);
    let v = Validation { now: EventTime(1_796_100_000_000), max_skew_ms: 300_000 };
    let valid = a.lines().filter(|l| matches!(parse_line(l.as_bytes(), v), Ok(Some(_)))).count();
    assert!(valid > 2900, "{valid} valid lines");
}

/// Wall-clock decisions replay identically: a click judged too late because its partition had
/// gone idle stays uncounted after `kill -9`, although a recomputation from the log alone (both
/// clicks in one batch, no idle period) would count it.
#[test]
fn wall_clock_decisions_replay_identically_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
watermark_delay = "1s"
idle_timeout = "1s"
allowed_lateness = "0s"
dedup_horizon = "2m"
partitions = 1
checkpoint_interval = "1h"
"#;
    let mut server = Server::start(dir.path(), config, &[]);
    let prev = (now_ms() / 60_000 - 1) * 60_000;
    let click =
        |t: i64, id: &str| format!(r#"{{"ad_id":"a","click_timestamp":{t},"click_id":"{id}"}}"#);
    let count = |s: &Server| {
        let (_, v) = s.get(&format!("/v1/ads/a/aggregated_count?from={prev}&to={}", prev + 60_000));
        v["count"].as_u64().unwrap()
    };
    let metric = |s: &Server, name: &str| -> u64 {
        let text = s.metrics();
        text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap().parse().unwrap()
    };
    let wait = |what: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !what() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(server.post(click(prev + 10_000, "e1").as_bytes()).0, 200);
    wait(&|| count(&server) == 1);
    // The partition goes idle: the watermark follows the wall clock past the previous minute.
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(server.post(click(prev + 20_000, "e2").as_bytes()).0, 200);
    wait(&|| metric(&server, "adclick_clicks_too_late_total") == 1);
    assert_eq!(count(&server), 1);

    server.kill();
    let server = Server::start(dir.path(), config, &[]);
    assert_eq!(
        metric(&server, "adclick_clicks_too_late_total"),
        1,
        "the replay made the same decision"
    );
    assert_eq!(count(&server), 1);
    assert!(server.log().contains("replayed_batches="), "{}", server.log());
}

/// When aggregation falls behind by more than `max_lag_records`, the collector answers 503 with
/// Retry-After instead of growing its backlog; what it accepted before is kept.
#[test]
fn backpressure_answers_503_when_aggregation_lags() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        format!("{CONFIG}\n").replace("partitions = 4", "partitions = 4\nmax_lag_records = 100");
    let server = Server::start(dir.path(), &config, &[("ADCLICK_FAULT", "aggregator.stall:1")]);
    let t = now_ms();
    let body: Vec<String> =
        (0..150).map(|i| format!(r#"{{"ad_id":"a{i}","click_timestamp":{t}}}"#)).collect();
    let (status, v) = server.post(body.join("\n").as_bytes());
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(150)), "below the limit: accepted");
    let r =
        agent().post(format!("{}/v1/clicks", server.url)).send(body.join("\n").as_bytes()).unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers().get("retry-after").map(|h| h.to_str().unwrap()), Some("1"));
    let (status, v) = server.get("/healthz");
    assert_eq!((status, v["lag_records"].as_u64()), (200, Some(150)));
    let metrics = server.metrics();
    assert!(
        metrics.contains(r#"adclick_http_requests_total{endpoint="/v1/clicks",code="503"} 1"#),
        "{metrics}"
    );
}

/// SPEC §2 across partitions, on history: event times a month old, four partitions, late and
/// duplicate clicks, POSTed back to back so that one aggregator batch spans minutes of event
/// time. Every count, series and popular_ads window (answered from the store, as the
/// minutes are older than the in-memory index) equals the oracle, and every distinct click is
/// counted.
#[test]
fn history_posted_fast_matches_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
watermark_delay = "1s"
idle_timeout = "2s"
allowed_lateness = "5m"
dedup_horizon = "10m"
partitions = 4
shards = 2
checkpoint_interval = "1s"

[[filters]]
id = "us"
country = ["US"]

[[filters]]
id = "office"
ip = ["10.0.0.0/8", "2001:db8::/32"]
"#;
    let server = Server::start(dir.path(), config, &[]);
    let month_ago = (now_ms() / 60_000 - 30 * 1440) * 60_000;
    let mut g = Generator::new(GenConfig {
        seed: 77,
        ads: 25,
        zipf: 1.1,
        disorder_ms: 3_000,
        duplicate: 0.05,
        late: 0.05,
        late_max_ms: 150_000,
        too_late: 0.0,
        // The generator's "in the future" lines are valid history here: junk is added below.
        invalid: 0.0,
        click_id: 0.6,
        users: 20,
        ..GenConfig::default()
    });
    // 48,000 lines over 16 minutes of event time, in batches of 1,000.
    let step = 20;
    let at = now_ms();
    let batches: Vec<Vec<String>> = (0..48)
        .map(|b| {
            (0..1000)
                .map(|i| match i % 97 {
                    13 => "{\"ad_id\":".to_string(),
                    14 => {
                        format!("{{\"ad_id\":\"a\",\"click_timestamp\":{}}}", now_ms() + 3_600_000)
                    }
                    _ => g.line(EventTime(month_ago + 60_000 + (b * 1000 + i) * step)),
                })
                .collect()
        })
        .collect();
    // One client, back to back: each partition's order is the send order, and the aggregator's
    // batches each span many POSTs (minutes of event time).
    for lines in &batches {
        let (status, v) = server.post(lines.join("\n").as_bytes());
        assert_eq!(status, 200, "{v}");
    }
    let sent: Vec<(String, i64)> = batches.into_iter().flatten().map(|l| (l, at)).collect();
    let (expected, invalid) = oracle(&sent);
    assert!(invalid > 100 && expected.len() > 500, "{invalid} invalid, {} rows", expected.len());
    assert_matches_oracle(&server, &expected);
    // Every distinct click was counted: what is too late are copies re-sent long after.
    let total: u64 = expected.iter().filter(|((_, _, slot), _)| *slot == 0).map(|(_, c)| c).sum();
    let metrics = server.metrics();
    assert!(
        metrics.contains(&format!("adclick_clicks_counted_total {total}\n")),
        "{total}: {metrics}"
    );
}

/// A local S3-compatible emulator (moto's server, which scripts/test installs) with one bucket,
/// stopped on drop.
pub(crate) struct S3Emulator {
    child: Child,
    pub(crate) endpoint: String,
}

impl S3Emulator {
    pub(crate) fn start(bucket: &str) -> S3Emulator {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (scripts/test installs moto)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // CreateBucket: PUT /bucket.
            if let Ok(r) = agent().put(format!("{endpoint}/{bucket}")).send_empty() {
                if r.status().is_success() {
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the S3 emulator exited: {status} (scripts/test installs moto[server])");
            }
            assert!(Instant::now() < deadline, "the S3 emulator did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        S3Emulator { child, endpoint }
    }
}

impl Drop for S3Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A POST answered with its status, `Retry-After` and body.
pub(crate) fn post_with_retry_after(url: &str, body: &[u8]) -> (u16, Option<String>, String) {
    let mut r = agent().post(format!("{url}/v1/clicks")).send(body).expect("POST");
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), retry, r.body_mut().read_to_string().unwrap())
}
