//! The commands besides `serve` on the real binary: `generate` against a collector, the logs of
//! `serve`, and `status`.

use std::process::Command;
use std::time::Duration;

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
