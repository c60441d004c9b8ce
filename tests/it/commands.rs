//! The commands besides `serve` on the real binary: `generate` against a collector, the logs of
//! `serve`, `status`, and what `ship` keeps of its dead letters.

use std::process::Command;
use std::time::{Duration, Instant};

use adclick::event::{parse_line, EventTime, Validation};
use serde_json::Value;

use super::service::*;

/// `generate --to URL` says what it sent and what the collector accepted and rejected, and
/// gives up on a port where nothing listens after `--retry-for`, with an error naming it.
#[test]
fn generate_reports_what_was_accepted_and_gives_up_on_an_unreachable_collector() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG, &[]);
    let start = now_ms().to_string();
    let args = ["generate", "--seed", "9", "--count", "800", "--invalid", "0.1", "--start", &start];
    let lines = Command::new(env!("CARGO_BIN_EXE_adclick")).args(args).output().unwrap();
    let v = Validation { now: EventTime(now_ms()), max_skew_ms: 300_000 };
    let invalid = String::from_utf8(lines.stdout)
        .unwrap()
        .lines()
        .filter(|l| parse_line(l.as_bytes(), v).is_err())
        .count();
    assert!(invalid > 40, "{invalid} invalid lines");
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(args)
        .args(["--to", &server.url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let summary = format!("accepted {}, rejected {invalid}", 800 - invalid);
    assert!(err.contains("generated 800 lines to http://") && err.contains(&summary), "{err}");

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(["generate", "--count", "10", "--retry-for", "1s"])
        .args(["--to", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the collector at http://127.0.0.1:"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "gave up after {:?}", started.elapsed());
}

/// `ADCLICK_LOG_FORMAT=json`: every log line is a JSON object; `serve` logs a status line every
/// `log_interval` with the clicks accepted so far.
#[test]
fn json_logs_and_a_periodic_status_line() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("ADCLICK_LOG_FORMAT", "json"), ("ADCLICK_LOG_INTERVAL", "200ms")];
    let mut server = Server::start(dir.path(), CONFIG, &env);
    let at = now_ms();
    let body: String = (0..50)
        .map(|i| {
            format!("{{\"ad_id\":\"ad-{i}\",\"click_timestamp\":{at},\"click_id\":\"c{i}\"}}\n")
        })
        .collect();
    assert_eq!(server.post(body.as_bytes()).0, 200);
    let log = dir.path().join("server.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let status = lines.iter().find(|v| {
            v["fields"]["message"] == "status" && v["fields"]["accepted"].as_u64() == Some(50)
        });
        if let Some(v) = status {
            assert_eq!(v["level"], "INFO", "{v}");
            assert!(v["fields"]["lag_records"].is_u64(), "{v}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no status line with 50 accepted:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.kill();
}

/// `adclick status` prints a running server's health in the terminal (and as JSON), found by
/// its data directory; a server that is not running is exit code 2 with a clear message. And
/// `GET /v1/filters` lists the filters as configured.
#[test]
fn status_summarises_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), CONFIG, &[]);
    let at = now_ms();
    let mut body: String = (0..30)
        .map(|i| {
            format!("{{\"ad_id\":\"ad-{i}\",\"click_timestamp\":{at},\"click_id\":\"c{i}\"}}\n")
        })
        .collect();
    body.push_str("not json\n{\"ad_id\":\"x\"}\n");
    assert_eq!(server.post(body.as_bytes()).0, 200);
    let status = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_adclick"))
            .args(["status", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(extra)
            .output()
            .unwrap()
    };
    // The filters a dashboard offers, as configured.
    let (code, filters) = server.get("/v1/filters");
    assert_eq!(code, 200);
    let ids: Vec<&str> =
        filters["filters"].as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["us", "office"], "{filters}");
    assert_eq!(filters["filters"][0]["country"], serde_json::json!(["US"]), "{filters}");
    let out = status(&["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["accepted_total"], 30, "{v}");
    assert_eq!(v["rejected_total"], 2, "{v}");
    let out = status(&[]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("accepted         30 clicks") && text.contains("rejected         2 lines"),
        "{text}"
    );
    server.kill();
    let out = status(&["--url", &server.url]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

/// `ship` keeps what a dead letter holds: a line over 64 KiB whole up to the 1 MiB bound, a
/// longer one's first MiB with `"truncated": true` and its length, a line that is not UTF-8 byte
/// for byte (base64); the valid line around them is sent.
#[test]
fn ship_dead_letters_keep_what_they_hold() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG, &[]);
    let at = now_ms();
    let valid = format!("{{\"ad_id\":\"shipped\",\"click_timestamp\":{at},\"click_id\":\"s1\"}}");
    let long = format!("{{\"ad_id\":\"{}\"}}", "é".repeat(50_000)); // 100 KiB of 2-byte chars
    let longer = "x".repeat(3 << 20);
    let binary: Vec<u8> = vec![b'{', 0xff, 0xfe, b'"', 0x80, b'}'];
    let mut file = Vec::new();
    for line in [long.as_bytes(), longer.as_bytes(), &binary, valid.as_bytes()] {
        file.extend_from_slice(line);
        file.push(b'\n');
    }
    std::fs::write(dir.path().join("clicks.ndjson"), &file).unwrap();
    let state = dir.path().join("ship-state");
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(["ship", "--once", "--follow"])
        .arg(dir.path().join("clicks.ndjson"))
        .args(["--to", &server.url, "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let letters: Vec<Value> = std::fs::read_to_string(state.join("dead-letter.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!(letters[0]["line"], long.as_str());
    let bytes = letters[0]["bytes"].as_u64();
    assert_eq!((bytes, letters[0]["truncated"].as_bool()), (Some(long.len() as u64), None));
    assert_eq!(letters[1]["line"].as_str().map(str::len), Some(1 << 20));
    assert_eq!(letters[1]["truncated"], true);
    assert_eq!(letters[1]["bytes"], 3 << 20);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(letters[2]["line_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, binary);
    assert!(letters.iter().all(|l| !l["error"].as_str().unwrap().is_empty()), "{letters:?}");
    let minute = at.div_euclid(60_000) * 60_000;
    let path = format!("/v1/ads/shipped/aggregated_count?from={minute}&to={}", minute + 60_000);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.get(&path).1["count"] != 1 {
        assert!(Instant::now() < deadline, "the valid line was not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}
