//! Observability end to end (docs/operations.md, "Metrics", "Dashboard"): `/metrics` after a
//! known input, checked value by value and by `promtool`.

use std::process::Command;

use serde_json::Value;
use std::time::{Duration, Instant};

use crate::service::{now_ms, Server, CONFIG};

/// The value of the sample `series` (name with its labels, as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

/// Waits until `what` holds for a fresh `/metrics`, or fails naming it.
fn await_metrics(server: &Server, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = server.metrics();
        if cond(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn click(ad: &str, t: i64, id: &str) -> String {
    format!(r#"{{"ad_id":"{ad}","click_timestamp":{t},"click_id":"{id}"}}"#)
}

/// Starts a tool the tests need; None (with a note) where it is not installed, except in CI
/// (ADCLICK_REQUIRE_SERVICES), which installs it: there its absence fails the test.
fn spawn_tool(cmd: &mut Command) -> Option<std::process::Child> {
    match cmd.spawn() {
        Ok(c) => Some(c),
        Err(e) => {
            let name = cmd.get_program().to_string_lossy().into_owned();
            assert!(
                std::env::var_os("ADCLICK_REQUIRE_SERVICES").is_none(),
                "{name} is required here: {e}"
            );
            eprintln!("skipping what needs {name}: {e}");
            None
        }
    }
}

/// Runs `promtool args` with `input` on its standard input: (success, stdout and stderr).
fn promtool(args: &[&str], input: &str) -> Option<(bool, String)> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = spawn_tool(
        Command::new("promtool")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), report))
}

/// `promtool check metrics` on `text`: nothing to report.
pub(crate) fn promtool_check_metrics(text: &str) {
    if let Some((ok, report)) = promtool(&["check", "metrics"], text) {
        assert!(ok && report.trim().is_empty(), "promtool: {report}");
    }
}

/// Known input, known numbers: accepted, invalid by reason, counted, duplicate, late-corrected
/// and too-late clicks; histogram counts of acknowledgements, lateness buckets and queries;
/// every per-partition series for every partition; a minute turning final is observed.
#[test]
fn metrics_count_exactly_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG, &[]);
    let now = now_ms();
    // 10 distinct clicks 4 s old over many ads (every partition), 3 copies, 2 invalid lines.
    let mut body: Vec<String> =
        (0..10).map(|i| click(&format!("ad{i}"), now - 4_000, &format!("c{i}"))).collect();
    body.extend((0..3).map(|i| click(&format!("ad{i}"), now - 4_000, &format!("c{i}"))));
    body.push("not json".into());
    body.push(r#"{"ad_id":"x"}"#.into());
    let (status, v) = server.post(body.join("\n").as_bytes());
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(13)), "{v}");
    let (status, _) = server.post(b"\xff\xfe");
    assert_eq!(status, 400);
    // Once the watermark is near the clock: a click for a final minute within allowed_lateness
    // (2m) corrects it; one 10 minutes old is too late.
    await_metrics(&server, "the watermark", |m| {
        sample(m, "adclick_watermark_delay_seconds").is_some_and(|d| d < 3.0)
    });
    let now = now_ms();
    assert_eq!(server.post(click("late", now - 70_000, "l1").as_bytes()).0, 200);
    assert_eq!(server.post(click("old", now - 600_000, "o1").as_bytes()).0, 200);
    for _ in 0..2 {
        assert_eq!(server.get("/v1/ads/popular_ads?window=5").0, 200);
    }
    let m = await_metrics(&server, "every click aggregated and a checkpoint", |m| {
        sample(m, "adclick_clicks_counted_total") == Some(11.0)
            && sample(m, "adclick_clicks_too_late_total") == Some(1.0)
            && sample(m, "adclick_lag_records") == Some(0.0)
            && sample(m, "adclick_checkpoint_duration_seconds_count").is_some_and(|c| c >= 1.0)
    });
    assert_eq!(value(&m, "adclick_clicks_accepted_total"), 15.0);
    assert_eq!(value(&m, r#"adclick_lines_invalid_total{reason="not_json"}"#), 1.0);
    assert_eq!(value(&m, r#"adclick_lines_invalid_total{reason="missing_field"}"#), 1.0);
    assert_eq!(value(&m, r#"adclick_lines_invalid_total{reason="bad_timestamp"}"#), 0.0);
    assert_eq!(value(&m, "adclick_clicks_duplicate_total"), 3.0);
    assert_eq!(value(&m, "adclick_clicks_late_corrected_total"), 1.0);
    assert_eq!(value(&m, r#"adclick_http_requests_total{endpoint="/v1/clicks",code="200"}"#), 3.0);
    assert_eq!(value(&m, r#"adclick_http_requests_total{endpoint="/v1/clicks",code="400"}"#), 1.0);
    assert_eq!(value(&m, "adclick_ingest_ack_duration_seconds_count"), 3.0);
    assert_eq!(
        value(&m, r#"adclick_query_duration_seconds_count{endpoint="/v1/ads/popular_ads"}"#),
        2.0
    );
    // Lateness: 13 clicks about 4 s late, one 70 s, one 600 s.
    assert_eq!(value(&m, "adclick_event_lateness_seconds_count"), 15.0);
    assert_eq!(value(&m, r#"adclick_event_lateness_seconds_bucket{le="2"}"#), 0.0);
    assert_eq!(value(&m, r#"adclick_event_lateness_seconds_bucket{le="10"}"#), 13.0);
    assert_eq!(value(&m, r#"adclick_event_lateness_seconds_bucket{le="300"}"#), 14.0);
    assert_eq!(value(&m, r#"adclick_event_lateness_seconds_bucket{le="1800"}"#), 15.0);
    assert!(value(&m, "adclick_commit_duration_seconds_count") >= 1.0);
    assert!(value(&m, "adclick_log_fsync_duration_seconds_count") >= 1.0);
    // Rows: 10 ads, then the late one, each once (the too-late click writes nothing; no click
    // has a country or an address, so no filter slot has a row).
    assert_eq!(value(&m, "adclick_rows_written_total"), 11.0);
    assert!(value(&m, "adclick_checkpoint_bytes") > 0.0);
    assert!(value(&m, "adclick_log_disk_bytes") > 0.0);
    assert!(value(&m, "adclick_store_disk_bytes") > 0.0);
    assert_eq!(value(&m, "adclick_dedup_entries"), 11.0, "the distinct clicks counted");
    assert!(value(&m, "process_resident_memory_bytes") > 1e6);
    assert!(value(&m, "process_open_fds") > 3.0);
    let build = format!(r#"adclick_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION"));
    assert_eq!(value(&m, &build), 1.0);
    // Per partition: every series for every partition, offsets adding up to the 15 records.
    let mut ends = 0.0;
    for p in 0..4 {
        let label = format!("{{partition=\"{p}\"}}");
        let end = value(&m, &format!("adclick_partition_log_end_offset{label}"));
        assert_eq!(value(&m, &format!("adclick_partition_committed_offset{label}")), end);
        assert_eq!(value(&m, &format!("adclick_partition_lag_records{label}")), 0.0);
        let idle = value(&m, &format!("adclick_partition_idle{label}"));
        assert!(idle == 0.0 || idle == 1.0);
        if end > 0.0 {
            let w = value(&m, &format!("adclick_partition_watermark_timestamp_seconds{label}"));
            assert!((now_ms() as f64 / 1000.0 - w).abs() < 700.0, "partition {p}: {w}");
        }
        ends += end;
    }
    assert_eq!(ends, 15.0);
    let w = value(&m, "adclick_watermark_timestamp_seconds");
    assert!((w - now_ms() as f64 / 1000.0).abs() < 10.0, "{w}");
    promtool_check_metrics(&m);
    assert_deploy_names_exist(&m);
    // A minute turns final at most a minute later (plus the 1 s delay): its delay is observed.
    let m = await_metrics(&server, "a minute turning final", |m| {
        sample(m, "adclick_minute_final_delay_seconds_count").is_some_and(|c| c >= 1.0)
    });
    // With a 1 s watermark delay and 1 s idle timeout, within 10 s (a first step of the
    // watermark from the clicks' times to the clock's may cross a minute end a few seconds old).
    let within = value(&m, r#"adclick_minute_final_delay_seconds_bucket{le="10"}"#);
    assert!(within >= 1.0, "the minute turned final late:\n{m}");
}

/// Checks `v` against the JSON Schema subset the description uses (`$ref`, `type`, `required`,
/// `properties`, `additionalProperties`, `items`, `enum`, `minimum`, `maxItems`, `format:
/// date-time`); anything else in a schema fails, so the checker cannot silently skip a rule.
fn check_schema(spec: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(spec, schema);
    let obj = schema.as_object().ok_or(format!("{at}: schema is not an object"))?;
    for (key, rule) in obj {
        match key.as_str() {
            "description" | "default" | "example" => {}
            "$ref" => unreachable!("resolved"),
            "type" => {
                let types: Vec<&str> = match rule {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                    _ => return Err(format!("{at}: bad type rule")),
                };
                let ok = types.iter().any(|t| match *t {
                    "object" => v.is_object(),
                    "array" => v.is_array(),
                    "string" => v.is_string(),
                    "integer" => v.is_i64() || v.is_u64(),
                    "number" => v.is_number(),
                    "boolean" => v.is_boolean(),
                    "null" => v.is_null(),
                    _ => false,
                });
                if !ok {
                    return Err(format!("{at}: {v} is not of type {types:?}"));
                }
            }
            "required" => {
                for name in rule.as_array().unwrap() {
                    let name = name.as_str().unwrap();
                    if v.get(name).is_none() {
                        return Err(format!("{at}: {name:?} is missing in {v}"));
                    }
                }
            }
            "properties" => {
                for (name, sub) in rule.as_object().unwrap() {
                    if let Some(x) = v.get(name) {
                        check_schema(spec, sub, x, &format!("{at}.{name}"))?;
                    }
                }
            }
            "additionalProperties" => {
                let known = obj.get("properties").and_then(Value::as_object);
                for (name, x) in v.as_object().into_iter().flatten() {
                    if known.is_some_and(|k| k.contains_key(name)) {
                        continue;
                    }
                    match rule {
                        Value::Bool(false) => {
                            return Err(format!("{at}: {name:?} is not in the description"))
                        }
                        Value::Bool(true) => {}
                        sub => check_schema(spec, sub, x, &format!("{at}.{name}"))?,
                    }
                }
            }
            "items" => {
                for (i, x) in v.as_array().into_iter().flatten().enumerate() {
                    check_schema(spec, rule, x, &format!("{at}[{i}]"))?;
                }
            }
            "enum" => {
                if !rule.as_array().unwrap().contains(v) {
                    return Err(format!("{at}: {v} is not one of {rule}"));
                }
            }
            "minimum" => {
                if v.as_f64().is_some_and(|x| x < rule.as_f64().unwrap()) {
                    return Err(format!("{at}: {v} < {rule}"));
                }
            }
            "maxItems" => {
                if v.as_array().is_some_and(|a| a.len() as u64 > rule.as_u64().unwrap()) {
                    return Err(format!("{at}: more than {rule} items"));
                }
            }
            "format" => {
                assert_eq!(rule, "date-time");
                if let Some(s) = v.as_str() {
                    adclick::event::parse_rfc3339(s).map_err(|e| format!("{at}: {s:?}: {e}"))?;
                }
            }
            other => return Err(format!("{at}: the checker does not know {other:?}")),
        }
    }
    Ok(())
}

/// Follows `$ref`s within the description.
fn resolve<'a>(spec: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        v = spec.pointer(r.strip_prefix('#').unwrap()).unwrap_or_else(|| panic!("no {r}"));
    }
    v
}

/// Every endpoint of `/openapi.json` is called, in success and error cases; each answer's status
/// is described for its path and method, and its JSON body matches the described schema.
#[test]
fn answers_match_the_openapi_description() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG, &[]);
    let (status, spec) = server.get("/openapi.json");
    assert_eq!(status, 200);
    assert_eq!(spec["openapi"], "3.1.0");
    assert_eq!(spec["info"]["version"], env!("CARGO_PKG_VERSION"));
    let now = now_ms();
    let minute = now / 60_000 * 60_000;
    let body = format!(
        "{}\n{}\nnot json\n",
        click("ad-1", now - 2_000, "k1"),
        r#"{"ad_id":"ad-2","click_timestamp":1,"country":"US"}"#
    );
    let from = minute - 120_000;
    let cases: Vec<(&str, &str, String, Option<Vec<u8>>)> = vec![
        ("post", "/v1/clicks", "/v1/clicks".into(), Some(body.into_bytes())),
        ("post", "/v1/clicks", "/v1/clicks".into(), Some(b"\xff".to_vec())),
        (
            "get",
            "/v1/ads/{ad_id}/aggregated_count",
            format!("/v1/ads/ad-1/aggregated_count?from={from}&to={}", minute + 60_000),
            None,
        ),
        (
            "get",
            "/v1/ads/{ad_id}/aggregated_count",
            "/v1/ads/ad-1/aggregated_count?filter=nope".into(),
            None,
        ),
        (
            "get",
            "/v1/ads/{ad_id}/aggregated_count",
            "/v1/ads/ad-1/aggregated_count?from=x".into(),
            None,
        ),
        (
            "get",
            "/v1/ads/{ad_id}/timeseries",
            format!("/v1/ads/ad-1/timeseries?from={from}&to={}&filter=us", minute + 60_000),
            None,
        ),
        ("get", "/v1/ads/{ad_id}/timeseries", "/v1/ads/ad-1/timeseries?to=12".into(), None),
        (
            "get",
            "/v1/ads/{ad_id}/windows",
            format!("/v1/ads/ad-1/windows?type=hopping&size=10m&hop=5m&to={}", minute + 60_000),
            None,
        ),
        (
            "get",
            "/v1/ads/{ad_id}/windows",
            format!("/v1/ads/ad-1/windows?type=session&gap=3&to={}", minute + 60_000),
            None,
        ),
        ("get", "/v1/ads/{ad_id}/windows", "/v1/ads/ad-1/windows?type=weekly".into(), None),
        (
            "get",
            "/v1/ads/popular_ads",
            format!("/v1/ads/popular_ads?window=5&to={}", minute + 60_000),
            None,
        ),
        ("get", "/v1/ads/popular_ads", "/v1/ads/popular_ads?count=0".into(), None),
        ("get", "/v1/totals", format!("/v1/totals?window=3&to={}", minute + 60_000), None),
        ("get", "/v1/totals", "/v1/totals?window=1441".into(), None),
        ("get", "/v1/filters", "/v1/filters".into(), None),
        ("post", "/v1/admin/{job}", "/v1/admin/recalc".into(), Some(Vec::new())),
        (
            "post",
            "/v1/admin/explain",
            "/v1/admin/explain?ad_id=ad-1&minute=0".into(),
            Some(Vec::new()),
        ),
        ("get", "/healthz", "/healthz".into(), None),
        ("get", "/metrics", "/metrics".into(), None),
        ("get", "/openapi.json", "/openapi.json".into(), None),
        ("get", "/", "/".into(), None),
    ];
    // Answers with counts, once the click is aggregated.
    assert_eq!(server.post(&cases[0].3.clone().unwrap()).0, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.get(&cases[2].2).1["count"] != 1 {
        assert!(Instant::now() < deadline, "the click was never counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut covered = std::collections::BTreeSet::new();
    for (method, path, url, body) in &cases {
        let url = format!("{}{url}", server.url);
        let mut r = match body {
            Some(b) => crate::service::agent().post(&url).send(b.as_slice()),
            None => crate::service::agent().get(&url).call(),
        }
        .unwrap();
        let status = r.status().as_u16().to_string();
        let ctype = r
            .headers()
            .get("content-type")
            .map(|h| h.to_str().unwrap().split(';').next().unwrap().to_string())
            .unwrap_or_default();
        let text = r.body_mut().read_to_string().unwrap();
        let op = &spec["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not described");
        let described = resolve(&spec, &op["responses"][&status]);
        assert!(described.is_object(), "{method} {url}: status {status} is not described: {text}");
        let content = &described["content"][&ctype];
        assert!(content.is_object(), "{method} {url}: {ctype} is not described for {status}");
        if ctype == "application/json" {
            let v: Value = serde_json::from_str(&text).unwrap();
            if let Err(e) = check_schema(&spec, &content["schema"], &v, "$") {
                panic!("{method} {url} ({status}): {e}\n{v}");
            }
        }
        covered.insert((method.to_string(), path.to_string()));
    }
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            assert!(covered.contains(&(method.clone(), path.clone())), "{method} {path} untested");
        }
    }
    // The checker itself catches a field the description does not have.
    let (_, filters) = server.get("/v1/filters");
    let mut extra = filters.clone();
    extra["surprise"] = Value::from(1);
    let schema = &spec["components"]["schemas"]["Filters"];
    assert!(check_schema(&spec, schema, &filters, "$").is_ok());
    assert!(check_schema(&spec, schema, &extra, "$").is_err());
}

/// A headless Chromium driven over WebDriver (chromedriver), with plain HTTP requests.
struct Browser {
    driver: std::process::Child,
    base: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// None where chromedriver is not installed, except in CI, which installs it.
    fn start() -> Option<Browser> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = spawn_tool(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )?;
        let mut b = Browser { driver, base: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::service::agent().get(format!("{}/status", b.base)).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1400,1000"]}
        }}});
        let v = b.call("POST", "/session", caps);
        b.base = format!("{}/session/{}", b.base, v["sessionId"].as_str().expect("a session"));
        Some(b)
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let agent = crate::service::agent();
        let mut r = match method {
            "GET" => agent.get(&url).call(),
            "DELETE" => agent.delete(&url).call(),
            _ => agent
                .post(&url)
                .header("content-type", "application/json")
                .send(serde_json::to_vec(&body).unwrap().as_slice()),
        }
        .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        assert!(v["value"]["error"].is_null(), "webdriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn exec(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", serde_json::json!({"script": script, "args": []}))
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            serde_json::json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{id}/click"), serde_json::json!({}));
    }

    fn type_in(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{id}/clear"), serde_json::json!({}));
        self.call("POST", &format!("/element/{id}/value"), serde_json::json!({"text": text}));
    }

    /// Polls `script` until it returns `want` (the page refreshes every 2 s), or fails with
    /// what it last returned.
    fn await_value(&self, what: &str, script: &str, want: &Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.exec(script);
            if &got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: the page shows {got}, expected {want}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = crate::service::agent().delete(&self.base).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | u32::from(value(c)) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

const TOP_ROWS: &str = "return [...document.querySelectorAll('#top tbody tr')]\
    .map(tr => [tr.dataset.ad || null, tr.cells.length > 2 ? Number(tr.cells[2].textContent) : null])";
const FINAL_ROWS: &str = "return [...document.querySelectorAll('#final tbody tr')]\
    .map(tr => [tr.dataset.ad || null, tr.cells.length > 2 ? Number(tr.cells[2].textContent) : null])";

/// The points of one chart series, as drawn: [[minute_ms, count]] of the minutes with clicks.
fn series_script(name: &str) -> String {
    format!(
        "const g = [...document.querySelectorAll('#chart g')].find(g => g.dataset.series === {name:?});\
         return g ? [...g.querySelectorAll('circle')].map(c => [Number(c.dataset.minuteMs), Number(c.dataset.count)]) : null"
    )
}

/// The dashboard of a server fed known clicks, in headless Chromium: the top-N tables and the
/// chart show the known numbers; changing the filter, the window and the charted ad changes
/// them as expected; an ad id holding a `<script>` is shown as text and never runs. Saves a
/// screenshot as target/dashboard.png.
#[test]
fn the_dashboard_shows_the_known_numbers_in_a_browser() {
    let Some(browser) = Browser::start() else { return };
    // The window changes below assume the minute does not turn meanwhile: start early in one.
    while now_ms() % 60_000 > 20_000 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG, &[]);
    let c = now_ms() / 60_000 * 60_000;
    let (m1, m3) = (c - 60_000, c - 180_000);
    let script_ad = "<script>window.pwned=1</script>";
    let mut lines = Vec::new();
    let mut add = |ad: &str, t: i64, n: usize, country: Option<&str>| {
        for i in 0..n {
            let country = country.map_or(String::new(), |c| format!(r#","country":"{c}""#));
            let ad_json = serde_json::to_string(ad).unwrap();
            lines.push(format!(
                r#"{{"ad_id":{ad_json},"click_timestamp":{},"click_id":"k{}"{country}}}"#,
                t + 5_000 + i as i64,
                lines.len()
            ));
        }
    };
    add("alpha", m1, 3, Some("US"));
    add("alpha", m1 + 10_000, 2, Some("FR"));
    add("beta", m1, 3, Some("US"));
    add(script_ad, m1, 2, None);
    add("gamma", m3, 7, None);
    let (status, v) = server.post(lines.join("\n").as_bytes());
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(17)), "{v}");

    browser.call("POST", "/url", serde_json::json!({"url": format!("{}/", server.url)}));
    let rows = |v: &[(&str, u64)]| {
        Value::from(v.iter().map(|(a, c)| serde_json::json!([a, c])).collect::<Vec<_>>())
    };
    let everything = rows(&[("gamma", 7), ("alpha", 5), ("beta", 3), (script_ad, 2)]);
    browser.await_value("top ads, 5 minutes, every click", TOP_ROWS, &everything);
    browser.await_value(
        "the latest final minute",
        FINAL_ROWS,
        &rows(&[("alpha", 5), ("beta", 3), (script_ad, 2)]),
    );
    browser.await_value(
        "the total across ads in the chart",
        &series_script("all ads"),
        &serde_json::json!([[m3, 7], [m1, 10]]),
    );
    browser.await_value(
        "the top ad's series",
        &series_script("gamma"),
        &serde_json::json!([[m3, 7]]),
    );
    // The ad id is text: the cell reads it literally, no script element exists, nothing ran.
    let shown = browser.exec(&format!(
        "const tr = [...document.querySelectorAll('#top tbody tr')].find(tr => tr.dataset.ad === {script_ad:?});\
         return [tr.cells[1].textContent, document.querySelectorAll('main script, #top script').length, typeof window.pwned]"
    ));
    assert_eq!(shown, serde_json::json!([script_ad, 0, "undefined"]));
    let partitions = browser.exec("return document.querySelectorAll('#parts tbody tr').length");
    assert_eq!(partitions, 4, "one row per partition");

    // Filter "us": alpha 3 and beta 3, tied, by ad id.
    browser.click(r#"#filter option[value="us"]"#);
    browser.await_value("top ads, filter us", TOP_ROWS, &rows(&[("alpha", 3), ("beta", 3)]));
    browser.await_value(
        "the total, filter us",
        &series_script("all ads"),
        &serde_json::json!([[m1, 6]]),
    );
    // Every click again, over 2 minutes: gamma's minute is out of the window.
    browser.click(r#"#filter option[value=""]"#);
    browser.click(r#"#window option[value="2"]"#);
    browser.await_value(
        "top ads, 2 minutes",
        TOP_ROWS,
        &rows(&[("alpha", 5), ("beta", 3), (script_ad, 2)]),
    );
    // One chosen ad in the chart.
    browser.type_in("#ad", "gamma\u{E007}");
    browser.await_value(
        "the chosen ad's series",
        &series_script("gamma"),
        &serde_json::json!([[m3, 7]]),
    );
    browser.await_value(
        "only the chosen ad and the total",
        "return document.querySelectorAll('#chart g').length",
        &Value::from(2),
    );
    // The chosen ad in windows: gamma's 7 clicks in the 5-minute tumbling window holding m3,
    // and in one session.
    browser.click(r#"#shape option[value="type=tumbling&size=5"]"#);
    browser.await_value(
        "the chosen ad in tumbling windows",
        &series_script("gamma"),
        &serde_json::json!([[m3 / 300_000 * 300_000, 7]]),
    );
    browser.click(r#"#shape option[value="type=session&gap=5"]"#);
    browser.await_value(
        "the chosen ad in sessions",
        &series_script("gamma"),
        &serde_json::json!([[m3, 7]]),
    );
    browser.click(r#"#shape option[value=""]"#);
    assert!(now_ms() - c < 60_000, "the minute turned during the test; its windows moved");

    // Back to the full view for the screenshot.
    browser.type_in("#ad", "\u{E007}");
    browser.click(r#"#window option[value="5"]"#);
    browser.await_value("top ads, 5 minutes again", TOP_ROWS, &everything);
    let png = base64_decode(browser.call("GET", "/screenshot", Value::Null).as_str().unwrap());
    assert_eq!(&png[1..4], b"PNG");
    let target =
        std::path::Path::new(env!("CARGO_BIN_EXE_adclick")).parent().unwrap().parent().unwrap();
    std::fs::write(target.join("dashboard.png"), &png).unwrap();

    // The health panel's rates follow what arrives: 40 clicks and an invalid line show as
    // accepted and invalid lines per second in the next refresh.
    let now = now_ms();
    let mut body: Vec<String> = (0..40).map(|i| click("delta", now, &format!("d{i}"))).collect();
    body.push("not json".into());
    assert_eq!(server.post(body.join("\n").as_bytes()).0, 200);
    browser.await_value(
        "accepted and invalid rates above zero",
        "const v = id => parseFloat(document.getElementById(id).textContent);\
         return v('k-accepted') > 0 && v('k-invalid') > 0",
        &Value::Bool(true),
    );
}

/// The deploy/ files (Grafana dashboard, alert rules), relative to the repository.
fn deploy_file(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The PromQL expressions of the Grafana dashboard, with Grafana's variables filled in.
fn grafana_exprs() -> Vec<String> {
    let dash: Value = serde_json::from_str(&deploy_file("deploy/grafana/adclick.json")).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().unwrap();
            out.push(e.replace("$__rate_interval", "5m").replace("$instance", ".*"));
        }
    }
    assert!(out.len() >= 20, "{} panel queries", out.len());
    out
}

/// Every `adclick_…` or `process_…` metric the dashboard and the alerts use is in `text`
/// (a real `/metrics`), histogram suffixes aside.
fn assert_deploy_names_exist(text: &str) {
    let mut sources: Vec<String> = grafana_exprs();
    sources.push(deploy_file("deploy/prometheus/alerts.yml"));
    for src in &sources {
        for (i, _) in src.match_indices("adclick_").chain(src.match_indices("process_")) {
            let name: String =
                src[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let exported = text
                .lines()
                .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")));
            assert!(exported, "{name}, used in deploy/, is not in /metrics");
        }
    }
}

/// `promtool` accepts the alert rules and their unit tests pass (they fire on lag growing, a
/// stalled watermark, 503s, slow fsyncs and stalled commits, and not before their time); every Grafana query
/// parses (checked as a recording rule).
#[test]
fn alert_rules_and_grafana_queries_pass_promtool() {
    let run = |args: &[&str]| -> Option<String> {
        let (ok, text) = promtool(args, "")?;
        assert!(ok, "promtool {args:?}:\n{text}");
        Some(text)
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let Some(out) = run(&["check", "rules", &format!("{root}/deploy/prometheus/alerts.yml")])
    else {
        return;
    };
    assert!(out.contains("SUCCESS: 9 rules found"), "{out}");
    let out =
        run(&["test", "rules", &format!("{root}/deploy/prometheus/alerts_test.yml")]).unwrap();
    assert!(out.contains("SUCCESS"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let rules: Vec<Value> = grafana_exprs()
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("grafana:panel_{i}"), "expr": e}))
        .collect();
    let file = dir.path().join("grafana.yml");
    // JSON is YAML: promtool reads it as a rule file.
    let doc = serde_json::json!({"groups": [{"name": "grafana", "rules": rules}]});
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = run(&["check", "rules", file.to_str().unwrap()]).unwrap();
    assert!(out.contains(&format!("SUCCESS: {} rules found", rules.len())), "{out}");
}

/// docs/operations.md documents every metric by name.
#[test]
fn the_operations_guide_documents_every_metric() {
    let guide = deploy_file("docs/operations.md");
    for (name, _, _) in adclick::telemetry::DESCRIBED {
        assert!(guide.contains(&format!("`{name}`")), "{name} is not in docs/operations.md");
    }
}
