//! Refusals and damage on the real binary: what would lose or mix counts is refused with a
//! message that says what to do; a half-written checkpoint, an undecodable log record, a
//! failing fsync and a full disk are handled as what they are; hostile requests cost what their
//! size allows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::service::*;

/// Starts a server that must refuse to start; returns what it printed.
fn start_refused(dir: &Path, config: &str) -> String {
    let cfg = dir.join("adclick.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .arg("--config")
        .arg(&cfg)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .env_remove("ADCLICK_FAULT")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the server started: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `n` distinct clicks of `minute` over seven ads, as one body.
fn minute_clicks(minute: i64, n: usize) -> String {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"ad_id":"ad-{}","click_timestamp":{},"click_id":"{i}"}}"#,
                i % 7,
                minute + i as i64
            )
        })
        .collect();
    lines.join("\n")
}

/// Sends `n` clicks of the previous minute and waits until they are committed.
fn feed_and_commit(server: &Server, n: usize) -> i64 {
    let minute = (now_ms() / 60_000 - 1) * 60_000;
    assert_eq!(server.post(minute_clicks(minute, n).as_bytes()).0, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = server.get("/healthz");
        if v["lag_records"] == 0 {
            return minute;
        }
        assert!(Instant::now() < deadline, "never committed: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn total_count(server: &Server, minute: i64) -> u64 {
    (0..7)
        .map(|ad| {
            let (_, v) = server.get(&format!(
                "/v1/ads/ad-{ad}/aggregated_count?from={minute}&to={}",
                minute + 60_000
            ));
            v["count"].as_u64().unwrap()
        })
        .sum()
}

/// Refuse instead of losing: changed settings, a log that lost committed records, and a
/// corrupt newest checkpoint (the server falls back to the previous one and stays exact).
#[test]
fn refuses_what_would_lose_or_mix_counts() {
    let config = "partitions = 2\nwatermark_delay = \"1s\"\nidle_timeout = \"1s\"\ncheckpoint_interval = \"200ms\"\ncommit_interval = \"50ms\"\n[[filters]]\nid = \"us\"\ncountry = [\"US\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), config, &[]);
    let minute = feed_and_commit(&server, 500);
    assert_eq!(total_count(&server, minute), 500);
    // Two checkpoints taken after the clicks (one every 200 ms), each an incremental file.
    let checkpoints = dir.path().join("data/checkpoints");
    let newest = |dir: &Path| -> Vec<PathBuf> {
        let mut files: Vec<_> =
            std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        files
    };
    let before = newest(&checkpoints);
    let deadline = Instant::now() + Duration::from_secs(20);
    while newest(&checkpoints).iter().filter(|f| !before.contains(f)).count() < 2 {
        assert!(Instant::now() < deadline, "no checkpoints: {:?}", newest(&checkpoints));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Stopped, not killed: the last checkpoint is recorded, so the newest file is its own.
    server.stop();

    // Settings that change results: each changed key is named with both values.
    let changed = config
        .replace("partitions = 2", "partitions = 3")
        .replace("country = [\"US\"]", "country = [\"DE\"]");
    let err = start_refused(dir.path(), &changed);
    assert!(err.contains("partitions: the data was aggregated with 2, the config has 3"), "{err}");
    assert!(err.contains("filters.us: "), "{err}");
    assert!(err.contains("new data_dir"), "{err}");

    // The newest checkpoint is corrupt: the previous one (its files, kept) and the journal
    // rebuild the state.
    let files = newest(&checkpoints);
    assert!(files.len() >= 2, "the previous checkpoint is kept: {files:?}");
    std::fs::write(files.last().unwrap(), b"garbage").unwrap();
    let mut server = Server::start(dir.path(), config, &[]);
    assert!(server.log().contains("falling back"), "{}", server.log());
    feed_and_commit(&server, 0);
    // Re-sent clicks are still recognised as duplicates: the dedup state came back.
    assert_eq!(server.post(minute_clicks(minute, 500).as_bytes()).0, 200);
    feed_and_commit(&server, 0);
    assert_eq!(total_count(&server, minute), 500);
    server.kill();

    // The log lost records the store committed: refuse, naming the partition and offsets.
    for entry in std::fs::read_dir(dir.path().join("data/log/p000")).unwrap().flatten() {
        std::fs::remove_file(entry.path()).unwrap();
    }
    // (The archive, flushed by the graceful stop, holds them too: whichever check comes first.)
    let err = start_refused(dir.path(), config);
    assert!(err.contains("partition 0: the log ends at offset 0 but the"), "{err}");
    assert!(err.contains("the log lost records"), "{err}");
}

/// Crash image: the process dies while a checkpoint file is half written (not yet durable) and
/// earlier manifests, whose files it would have joined, are committed. The start restores the
/// last recorded checkpoint from its files and the journal, exactly; the orphan goes.
#[test]
fn a_half_written_checkpoint_file_at_a_crash_is_never_restored() {
    let config = "partitions = 2\nwatermark_delay = \"1s\"\nidle_timeout = \"1s\"\ncheckpoint_interval = \"200ms\"\ncommit_interval = \"50ms\"\n";
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        Server::start(dir.path(), config, &[("ADCLICK_FAULT", "checkpoint.before_sync:6")]);
    let minute = (now_ms() / 60_000 - 1) * 60_000;
    assert_eq!(server.post(minute_clicks(minute, 500).as_bytes()).0, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the fault point never fired:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.log().contains("fault point checkpoint.before_sync"), "{}", server.log());
    let checkpoints = dir.path().join("data/checkpoints");
    let orphans = || {
        std::fs::read_dir(&checkpoints)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
            .count()
    };
    assert_eq!(orphans(), 1, "the crash image holds the half-written file");

    server = Server::start(dir.path(), config, &[]);
    feed_and_commit(&server, 0);
    assert_eq!(total_count(&server, minute), 500);
    // The dedup state came back from the recorded files: re-sent clicks are duplicates.
    assert_eq!(server.post(minute_clicks(minute, 500).as_bytes()).0, 200);
    feed_and_commit(&server, 0);
    assert_eq!(total_count(&server, minute), 500);
    let deadline = Instant::now() + Duration::from_secs(20);
    while orphans() > 0 {
        assert!(Instant::now() < deadline, "the orphan stays");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.kill();
}

/// Bounded cost per request: a 16 MiB body of junk lines, eight of them at once, an ancient click
/// followed by a 10,000-year range, compressed bodies and a zip bomb; `/healthz` answers
/// throughout and the server's memory stays bounded.
#[test]
fn hostile_requests_cost_what_their_size_allows() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let config = "partitions = 2\nwatermark_delay = \"1s\"\nidle_timeout = \"1s\"\nmax_body_bytes = 16777216\nmax_inflight_bytes = 67108864\n";
    let server = Server::start(dir.path(), config, &[]);
    let junk = "x\n".repeat(8 << 20);
    let (status, v) = server.post(junk.as_bytes());
    assert_eq!(status, 200);
    assert_eq!(v["accepted"], 0);
    assert_eq!(v["rejected"].as_array().unwrap().len(), 1000, "only the first 1,000 are listed");
    assert_eq!(v["rejected"][999]["line"], 1000);
    assert_eq!(v["rejected_total"], 8 << 20);
    assert_eq!(v["rejected_by_reason"]["not_json"], 8 << 20);

    // Eight at once: some may be refused with 503 (in-flight budget), none breaks the server.
    let statuses = Mutex::new(Vec::new());
    let health = Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let posts: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let r = agent().post(format!("{}/v1/clicks", server.url)).send(junk.as_bytes());
                    statuses.lock().unwrap().push(r.map(|r| r.status().as_u16()).unwrap_or(0));
                })
            })
            .collect();
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, _) = server.get("/healthz");
                health.lock().unwrap().push(status);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        for p in posts {
            p.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let statuses = statuses.into_inner().unwrap();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    let health = health.into_inner().unwrap();
    assert!(!health.is_empty() && health.iter().all(|s| *s == 200), "{health:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    eprintln!("peak RSS with 8 concurrent 16 MiB junk bodies: {} MiB", peak_kib / 1024);
    assert!(peak_kib < 1 << 20, "peak RSS {peak_kib} KiB");

    // An ancient click, then a range from year 1 to now: read by the hours that hold the ad.
    let (status, v) = server.post(br#"{"ad_id":"old","click_timestamp":"0001-01-01T00:00:00Z"}"#);
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(1)), "{v}");
    let to = now_ms() / 60_000 * 60_000;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) =
            server.get(&format!("/v1/ads/old/aggregated_count?from=0001-01-01T00:00:00Z&to={to}"));
        assert_eq!(status, 200, "{v}");
        if v["count"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, v) = server
        .get("/v1/ads/old/aggregated_count?from=0000-01-01T00:00:00Z&to=9999-12-31T23:58:00Z");
    assert_eq!((status, v["count"].as_u64()), (200, Some(1)), "{v}");

    // Compressed bodies, as shippers send them.
    let t = now_ms();
    let lines = format!(
        "{{\"ad_id\":\"z\",\"click_timestamp\":{t},\"click_id\":\"1\"}}\n{{\"ad_id\":\"z\",\"click_timestamp\":{t},\"click_id\":\"2\"}}"
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(lines.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(lines.as_bytes(), 3).unwrap();
    let send = |encoding: &str, body: &[u8]| {
        let mut r = agent()
            .post(format!("{}/v1/clicks", server.url))
            .header("content-encoding", encoding)
            .send(body)
            .unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        (status, serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)))
    };
    assert_eq!(send("gzip", &gz).1["accepted"], 2);
    assert_eq!(send("zstd", &zst).1["accepted"], 2);
    // A zip bomb: 16 MiB + 1 of zeros after decompression is over the limit.
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&vec![b'\n'; (16 << 20) + 1]).unwrap();
    let bomb = bomb.finish().unwrap();
    assert!(bomb.len() < 100_000);
    let (status, v) = send("gzip", &bomb);
    assert_eq!(status, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("max_body_bytes"), "{v}");
    let (status, v) = send("br", lines.as_bytes());
    assert_eq!(status, 415, "{v}");
    assert!(v["error"].as_str().unwrap().starts_with("Content-Encoding: \"br\""), "{v}");
    let (status, v) = send("gzip", lines.as_bytes());
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().starts_with("body is not valid gzip"), "{v}");
    let (status, v) = server.get("/v1/clicks");
    assert_eq!(status, 405, "{v}");
    assert_eq!(v["error"], "method not allowed on this endpoint");
    assert_eq!(server.get("/healthz").0, 200);
}

/// A log record that passes its CRC but does not decode as a click (a bug, or damage the CRC
/// missed) stops the aggregator with exit 70; it is never skipped.
#[test]
fn an_undecodable_log_record_stops_the_aggregator() {
    use std::io::Write;
    let config = "partitions = 1\nwatermark_delay = \"1s\"\nidle_timeout = \"1s\"\n";
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), config, &[]);
    feed_and_commit(&server, 10);
    server.kill();
    let segment = std::fs::read_dir(dir.path().join("data/log/p000"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max()
        .unwrap();
    let payload = b"\xffnot a wire-encoded click";
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload);
    let mut f = std::fs::OpenOptions::new().append(true).open(&segment).unwrap();
    f.write_all(&len).unwrap();
    f.write_all(&crc.to_le_bytes()).unwrap();
    f.write_all(payload).unwrap();
    drop(f);
    // It may stop before or after it listens: wait for the process, not for its address.
    let mut child = Server::spawn(dir.path(), config, &[]);
    let log = || std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the server kept running: {}", log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(70), "{}", log());
    assert!(log().contains("partition 0 offset 10: the log record"), "{}", log());
}

/// A disk that fails an fsync: the request waiting on it is answered 503 with the log's own
/// error (nothing of it acknowledged), the server stops rather than go on with a page cache it
/// cannot trust, and after a restart the client's resend is counted once.
#[test]
fn a_failed_fsync_is_answered_as_what_it_is_and_stops_the_server() {
    let config = "partitions = 1\nwatermark_delay = \"1s\"\nidle_timeout = \"1s\"\n";
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), config, &[("ADCLICK_FAULT", "log.sync_fails:1")]);
    let minute = now_ms() / 60_000 * 60_000 - 120_000;
    let body = format!("{{\"ad_id\":\"disk\",\"click_timestamp\":{minute},\"click_id\":\"c1\"}}\n");
    let (status, answer) = server.post(body.as_bytes());
    assert_eq!(status, 503, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("the click log failed") && error.contains("fsync failed"), "{error}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server kept running: {}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(70), "{}", server.log());
    assert!(server.log().contains("fatal: appending to the log"), "{}", server.log());
    let server = Server::start(dir.path(), config, &[]);
    assert_eq!(server.post(body.as_bytes()).0, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let path = format!("/v1/ads/disk/aggregated_count?from={minute}&to={}", minute + 60_000);
        let (_, v) = server.get(&path);
        if v["final"] == true {
            assert_eq!(v["count"], 1, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the minute did not turn final: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM while clients are posting: the server stops in order (exit 0, no panic in its log:
/// every task and runtime shut down in an order that cannot panic), and after a restart every
/// click it acknowledged is counted.
#[test]
fn a_sigterm_under_load_stops_in_order_and_keeps_what_it_acknowledged() {
    let config =
        "partitions = 2\nwatermark_delay = \"1s\"\nidle_timeout = \"1s\"\nlog_interval = \"1s\"\n";
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), config, &[]);
    let minute = now_ms() / 60_000 * 60_000 - 120_000;
    let acknowledged = Arc::new(Mutex::new(0u64));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (url, acknowledged, stop) = (server.url.clone(), acknowledged.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body: String = (n..n + 200)
                    .map(|i| {
                        format!(
                            "{{\"ad_id\":\"term\",\"click_timestamp\":{},\"click_id\":\"t{i}\"}}\n",
                            minute + (i % 50_000) as i64
                        )
                    })
                    .collect();
                match post(&url, body.as_bytes()) {
                    Ok((200, _)) => *acknowledged.lock().unwrap() += 200,
                    Ok(_) | Err(_) => break, // stopping: answered 503, or the connection closed
                }
                n += 200;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while *acknowledged.lock().unwrap() < 20_000 {
        assert!(Instant::now() < deadline, "the client made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.stop(); // asserts exit 0 and no panic in the log
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    client.join().unwrap();
    let acknowledged = *acknowledged.lock().unwrap();
    let server = Server::start(dir.path(), config, &[]);
    let path = format!("/v1/ads/term/aggregated_count?from={minute}&to={}", minute + 60_000);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = server.get(&path);
        if v["final"] == true && v["count"].as_u64() >= Some(acknowledged) {
            // More than acknowledged is possible: a batch durable when the answer was cut off.
            assert!(v["count"].as_u64().unwrap() <= acknowledged + 200, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "acknowledged {acknowledged}, counted {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that sends a whole body over `max_body_bytes` before it reads (as Python's
/// `http.client` does) gets the 413, not a reset connection: the server reads the rest of the
/// body, within a bound, and throws it away.
#[test]
fn a_body_over_the_limit_sent_whole_is_answered_413() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG, &[]); // max_body_bytes = 200000
    let addr = server.url.trim_start_matches("http://").to_string();
    let body = vec![b'x'; 32 << 20];
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "POST /v1/clicks HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(&body).expect("the whole body is taken, not refused by a reset");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("}") {
        let n = conn.read(&mut buf).expect("the answer is readable");
        assert!(n > 0, "closed before the answer: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("max_body_bytes"), "{answer}");
}

/// A tmpfs of `mib` MiB mounted (as root) at `dir`, unmounted on drop. `None` where mounting is
/// not possible (not root, no tmpfs), unless `ADCLICK_REQUIRE_SERVICES` demands it.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, mib: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk(dir.to_owned())),
            other => {
                let why = format!("mounting a tmpfs (needs root): {other:?}");
                assert!(std::env::var_os("ADCLICK_REQUIRE_SERVICES").is_none(), "{why}");
                eprintln!("skipping: {why}");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `path` with a file, then keeps taking any space freed on it (old
/// checkpoints removed, a store compacted) until the returned flag is set; then removes it.
fn fill(path: &Path) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let stop = Arc::new(AtomicBool::new(false));
    let (path, flag) = (path.to_owned(), stop.clone());
    let filler = std::thread::spawn(move || {
        while !flag.load(Ordering::Acquire) {
            while f.write_all(&chunk[..4096]).is_ok() {}
            std::thread::sleep(Duration::from_millis(2));
        }
        std::fs::remove_file(path).unwrap();
    });
    (stop, filler)
}

/// The embedded node's disk fills up: ingest answers 507 and acknowledges nothing it could not
/// keep; the aggregator stops committing, and `/healthz` and the metrics say why; once space
/// returns everything resumes without a restart, and every acknowledged click is counted
/// exactly once (a refused one never).
#[test]
fn a_full_disk_refuses_what_it_cannot_keep_and_resumes_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_disk) = SmallDisk::mount(&dir.path().join("data"), 48) else { return };
    let config = "partitions = 1\nwatermark_delay = \"1s\"\nidle_timeout = \"1s\"\n\
                  allowed_lateness = \"5s\"\ncheckpoint_interval = \"1s\"\n";
    let mut server = Server::start(dir.path(), config, &[]);
    let mut acknowledged: BTreeMap<String, u64> = BTreeMap::new();
    let mut minutes = BTreeSet::new();
    let mut next_id = 0u64;
    // Clicks of `ads` distinct ads (one each) or of one ad, at the current wall time.
    let mut batch = |ads: &str, n: u64| -> (String, Vec<String>) {
        let t = now_ms();
        minutes.insert(t / 60_000 * 60_000);
        let mut body = String::new();
        let mut ids = Vec::new();
        for _ in 0..n {
            let ad = if ads == "many" { format!("b{next_id}") } else { ads.to_owned() };
            body.push_str(&format!(
                "{{\"ad_id\":\"{ad}\",\"click_timestamp\":{t},\"click_id\":\"c{next_id}\"}}\n"
            ));
            ids.push(ad);
            next_id += 1;
        }
        (body, ids)
    };
    // Many distinct ads, so that sealing their minute grows the store.
    let bulk_minute = now_ms() / 60_000 * 60_000;
    for _ in 0..20 {
        let (body, ads) = batch("many", 2_000);
        assert_eq!(server.post(body.as_bytes()).0, 200);
        for ad in ads {
            *acknowledged.entry(ad).or_default() += 1;
        }
    }
    let (space, filler) = fill(&dir.path().join("data").join("filler"));
    // The log cannot take more: 507, Retry-After, a message that says why. (Space the store
    // frees may take a batch or two first: those are acknowledged and must be counted.)
    let refused = (0..20).find_map(|_| {
        let (body, ads) = batch("full", 1_000);
        let (status, retry, answer) = post_with_retry_after(&server.url, body.as_bytes());
        if status == 200 {
            *acknowledged.entry("full".to_owned()).or_default() += ads.len() as u64;
            return None;
        }
        Some((status, retry, answer))
    });
    let (status, retry, answer) = refused.expect("the log never refused");
    assert_eq!(status, 507, "{answer}");
    assert_eq!(retry.as_deref(), Some("5"));
    assert!(answer.contains("No space left") && answer.contains("retry later"), "{answer}");
    // Sealing the many ads' minute cannot be committed: the aggregator retries and says why.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, health) = server.get("/healthz");
        let sealed = now_ms() > bulk_minute + 60_000 + 6_000;
        if sealed && status == 503 && server.metrics().contains("adclick_commits_stalled 1") {
            let error = health["error"].as_str().unwrap_or_default();
            assert!(error.contains("No space left"), "{health}");
            break;
        }
        assert!(Instant::now() < deadline, "commits never stalled: {health}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Queries go on answering what is committed; the stalled minute is not final.
    let path =
        format!("/v1/ads/b77/aggregated_count?from={bulk_minute}&to={}", bulk_minute + 60_000);
    let (status, answer) = server.get(&path);
    assert_eq!((status, &answer["final"]), (200, &Value::Bool(false)), "{answer}");
    assert!(answer["count"].as_u64() <= Some(1), "{answer}");
    assert!(server.child.try_wait().unwrap().is_none(), "the server kept running");
    // Space returns: everything resumes without a restart.
    space.store(true, Ordering::Release);
    filler.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, health) = server.get("/healthz");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never resumed: {health}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(server.metrics().contains("adclick_commits_stalled 0"));
    for _ in 0..3 {
        let (body, ads) = batch("full", 1_000);
        assert_eq!(server.post(body.as_bytes()).0, 200);
        for ad in ads {
            *acknowledged.entry(ad).or_default() += 1;
        }
    }
    // Every minute final, every acknowledged click counted once and nothing refused counted.
    let last = *minutes.last().unwrap();
    let deadline = Instant::now() + Duration::from_secs(150);
    let totals = loop {
        let (_, v) = server.get(&format!("/v1/totals?window=10&to={}", last + 60_000));
        if v["minutes"].as_array().unwrap().iter().all(|m| m["final"] == true) {
            break v;
        }
        assert!(Instant::now() < deadline, "minutes never turned final: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let total: u64 =
        totals["minutes"].as_array().unwrap().iter().map(|m| m["count"].as_u64().unwrap()).sum();
    assert_eq!(total, acknowledged.values().sum::<u64>(), "{totals}");
    let (first, to) = (*minutes.first().unwrap(), last + 60_000);
    for (ad, n) in acknowledged.iter().filter(|(ad, _)| *ad == "full" || ad.ends_with("77")) {
        let (_, v) = server.get(&format!("/v1/ads/{ad}/aggregated_count?from={first}&to={to}"));
        assert_eq!(v["count"].as_u64(), Some(*n), "{ad}: {v}");
    }
    server.stop();
}
