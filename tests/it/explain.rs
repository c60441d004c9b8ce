//! `adclick explain`: a disputed count built from on-time clicks, late corrections, duplicates
//! (exact copies, and a click_id repeated from the minute before), too-late clicks and copies of
//! them; every click's fate checked against an oracle written from SPEC §1–§2, with the server
//! running and stopped, before and after a recalculation, for the total and for a filter.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::service::{now_ms, post, Server, CONFIG};

const AD: &str = "disputed";
const HORIZON_MS: i64 = 240_000; // CONFIG's dedup_horizon

/// One sent line of the disputed ad, and what the oracle knows of it.
#[derive(Clone, Debug)]
struct Sent {
    line: String,
    time: i64,
    user: Option<String>,
    ip: Option<String>,
    country: Option<String>,
    click_id: Option<String>,
    /// Sent after its minute was past `allowed_lateness`.
    too_late: bool,
}

impl Sent {
    fn new(time: i64, user: &str, ip: &str, country: &str, click_id: Option<&str>) -> Sent {
        let mut v = json!({ "ad_id": AD, "click_timestamp": time, "user_id": user, "ip": ip,
                            "country": country });
        if let Some(c) = click_id {
            v["click_id"] = json!(c);
        }
        Sent {
            line: v.to_string(),
            time,
            user: Some(user.into()),
            ip: Some(ip.into()),
            country: Some(country.into()),
            click_id: click_id.map(String::from),
            too_late: false,
        }
    }

    /// SPEC §1: the ad and click_id, or without one the time, user and ip.
    fn identity(&self) -> String {
        match &self.click_id {
            Some(c) => format!("c|{c}"),
            None => format!("n|{}|{:?}|{:?}", self.time, self.user, self.ip),
        }
    }
}

/// Per sent line: the index of the earlier counted line it repeats (within the horizon), if
/// any, considering only the lines `takes_part` accepts (in send order, which is log order).
fn dedup(sent: &[Sent], takes_part: impl Fn(&Sent) -> bool) -> Vec<Option<usize>> {
    let mut counted: Vec<usize> = Vec::new();
    let mut out = Vec::new();
    for (i, s) in sent.iter().enumerate() {
        if !takes_part(s) {
            out.push(None);
            continue;
        }
        let first = counted.iter().copied().find(|&j| {
            sent[j].identity() == s.identity() && (sent[j].time - s.time).abs() <= HORIZON_MS
        });
        if first.is_none() {
            counted.push(i);
        }
        out.push(first);
    }
    out
}

/// The oracle's fate for each sent line: (fate, counted, repeats, recalculated).
fn oracle(
    sent: &[Sent],
    recalculated: usize,
) -> Vec<(&'static str, bool, Option<usize>, Option<bool>)> {
    let live = dedup(sent, |s| !s.too_late);
    let all = dedup(sent, |_| true);
    sent.iter()
        .enumerate()
        .map(|(i, s)| {
            if !s.too_late {
                match live[i] {
                    None => ("counted", true, None, None),
                    Some(j) => ("duplicate", false, Some(j), None),
                }
            } else {
                // Too-late lines sent before the recalculation are counted by it unless they
                // repeat an earlier line.
                let counted = i < recalculated && all[i].is_none();
                ("too_late", counted, all[i], Some(counted))
            }
        })
        .collect()
}

fn post_lines(server: &Server, lines: &[&Sent]) {
    let body: Vec<&str> = lines.iter().map(|s| s.line.as_str()).collect();
    let (status, v) = post(&server.url, body.join("\n").as_bytes()).unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["accepted"].as_u64(), Some(lines.len() as u64), "{v}");
}

/// Posts a click of another ad at `time` until the watermark has passed `past`: once the
/// disputed ad's partition has been idle for `idle_timeout`, the other partition's click moves
/// the watermark (a copy each time, deduplicated).
fn advance(server: &Server, time: i64, past: i64) {
    let filler = json!({ "ad_id": "filler", "click_timestamp": time, "user_id": "f" });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = post(&server.url, filler.to_string().as_bytes()).unwrap();
        assert_eq!(status, 200);
        let (_, h) = server.get("/healthz");
        let w = h["watermark"].as_str().and_then(|w| adclick::event::parse_rfc3339(w).ok());
        if w.is_some_and(|w| w.0 >= past) {
            return;
        }
        assert!(Instant::now() < deadline, "watermark stuck: {h}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `adclick explain` on the test's data dir; (exit code, result).
fn explain(dir: &Path, minute: i64, filter: Option<&str>) -> (i32, Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_adclick"));
    cmd.arg("--config").arg(dir.join("adclick.toml"));
    cmd.args(["explain", AD, "--minute", &minute.to_string(), "--json", "--data-dir"]);
    cmd.arg(dir.join("data"));
    if let Some(f) = filter {
        cmd.args(["--filter", f]);
    }
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!("explain: no JSON: {text}\n{}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), v)
}

/// Checks every click explain lists for `minute` against the oracle, mapping each listed click
/// back to the line sent (exact copies in order of offset, which is send order).
fn assert_fates(
    v: &Value,
    sent: &[Sent],
    minute: i64,
    filter: Option<&str>,
    recalculated: usize,
    at_of: &BTreeMap<usize, (u64, u64)>,
) {
    let want = oracle(sent, recalculated);
    let in_minute: Vec<usize> =
        (0..sent.len()).filter(|&i| sent[i].time.div_euclid(60_000) * 60_000 == minute).collect();
    let clicks = v["clicks"].as_array().unwrap();
    assert_eq!(clicks.len(), in_minute.len(), "every click of the minute listed: {v:#}");
    let mut counted = 0;
    for (c, &i) in clicks.iter().zip(&in_minute) {
        let s = &sent[i];
        assert_eq!(c["click_timestamp_ms"].as_i64(), Some(s.time), "{c}");
        assert_eq!(c["user_id"].as_str(), s.user.as_deref(), "{c}");
        assert_eq!(c["click_id"].as_str(), s.click_id.as_deref(), "{c}");
        let outside = filter == Some("us") && s.country.as_deref() != Some("US");
        let (fate, is_counted, repeats, recalc) =
            if outside { ("outside_filter", false, None, None) } else { want[i] };
        assert_eq!(c["fate"], fate, "line {i} {}: {c}", s.line);
        assert_eq!(c["counted"], is_counted, "line {i}: {c}");
        assert_eq!(c["recalculated"].as_bool(), recalc, "line {i}: {c}");
        let of = c["duplicate_of"]
            .as_object()
            .map(|d| (d["partition"].as_u64().unwrap(), d["offset"].as_u64().unwrap()));
        assert_eq!(of, repeats.map(|j| at_of[&j]), "line {i} repeats line {repeats:?}: {c}");
        counted += u64::from(is_counted);
    }
    assert_eq!(v["counted"].as_u64(), Some(counted), "{v:#}");
    assert_eq!(v["stored"].as_u64(), Some(counted), "the stored count is the oracle's: {v:#}");
    assert_eq!(v["matches"], true);
}

#[test]
fn explain_names_every_clicks_fate_as_the_oracle_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("archive_flush_interval = \"200ms\"\n{CONFIG}");
    let mut server = Server::start(dir.path(), &config, &[]);
    // The disputed minute lies ahead of the wall clock (within max_clock_skew), so the idle
    // rule's wall-clock watermark never finalizes it: the test moves the watermark itself.
    let m = (now_ms().div_euclid(60_000) + 1) * 60_000;
    let end = m + 60_000;
    let mut sent: Vec<Sent> = Vec::new();
    // On time: distinct clicks, exact copies, and a click_id first seen in the minute before.
    let before = Sent::new(m - 20_000, "u0", "10.0.0.1", "US", Some("carried"));
    sent.push(before);
    for k in 0..12 {
        let country = if k % 3 == 0 { "DE" } else { "US" };
        let click_id = (k % 4 == 0).then(|| format!("id{k}"));
        sent.push(Sent::new(
            m + k * 1_000,
            &format!("u{k}"),
            "10.0.0.2",
            country,
            click_id.as_deref(),
        ));
    }
    sent.push(sent[3].clone()); // an exact copy
    sent.push(sent[1].clone()); // an exact copy of a click with a click_id
                                // Repeats the click of the minute before (the same click_id, another time and user).
    sent.push(Sent::new(m + 15_000, "u99", "192.0.2.1", "US", Some("carried")));
    let batch: Vec<&Sent> = sent.iter().collect();
    post_lines(&server, &batch);
    // Late, within allowed_lateness: corrections and a copy.
    advance(&server, end + 60_000, end + 50_000);
    let n = sent.len();
    sent.push(Sent::new(m + 30_000, "late1", "10.0.0.3", "US", None));
    sent.push(Sent::new(m + 31_000, "late2", "10.0.0.4", "FR", Some("late-id")));
    sent.push(sent[5].clone());
    post_lines(&server, &sent[n..].iter().collect::<Vec<_>>());
    // Too late: new clicks, copies of counted ones, and a copy of a too-late one.
    advance(&server, end + 125_000, end + 121_000);
    let n = sent.len();
    for k in 0..5 {
        let mut s = Sent::new(m + 40_000 + k, &format!("tl{k}"), "10.0.0.5", "US", None);
        s.too_late = true;
        sent.push(s);
    }
    for j in [2, 7] {
        let mut s = sent[j].clone();
        s.too_late = true;
        sent.push(s);
    }
    let mut s = sent[n].clone();
    s.too_late = true;
    sent.push(s);
    // A too-late click with a click_id, and the same click_id two minutes on, on time: the
    // too-late one was never counted live, so the later one is not its duplicate.
    let mut s = Sent::new(m + 45_000, "tl-id", "10.0.0.7", "US", Some("tl-id"));
    s.too_late = true;
    sent.push(s);
    let later = sent.len();
    sent.push(Sent::new(m + 130_000, "tl-id", "10.0.0.7", "US", Some("tl-id")));
    post_lines(&server, &sent[n..].iter().collect::<Vec<_>>());

    // Where each sent line is: explain lists the minute before and the minute.
    let locate = |sent: &[Sent], v_before: &Value, v: &Value| -> BTreeMap<usize, (u64, u64)> {
        let mut at = BTreeMap::new();
        let rows: Vec<&Value> = v_before["clicks"]
            .as_array()
            .unwrap()
            .iter()
            .chain(v["clicks"].as_array().unwrap())
            .collect();
        let order: Vec<usize> = (0..sent.len())
            .filter(|&i| sent[i].time.div_euclid(60_000) * 60_000 == m - 60_000)
            .chain((0..sent.len()).filter(|&i| sent[i].time.div_euclid(60_000) * 60_000 == m))
            .collect();
        assert_eq!(rows.len(), order.len(), "clicks listed for the two minutes");
        for (r, i) in rows.iter().zip(order) {
            at.insert(i, (r["partition"].as_u64().unwrap(), r["offset"].as_u64().unwrap()));
        }
        at
    };

    // With the server running (the command asks it).
    let (code, v) = explain(dir.path(), m, None);
    let (_, v_before) = explain(dir.path(), m - 60_000, None);
    assert_eq!(code, 0, "{v:#}");
    let at_of = locate(&sent, &v_before, &v);
    assert_fates(&v, &sent, m, None, 0, &at_of);
    assert_eq!(v["recalc_would_count"].as_u64(), Some(6), "{v:#}");
    let (code, v2) = explain(dir.path(), m + 120_000, None);
    assert_eq!(code, 0, "{v2:#}");
    assert_eq!(v2["clicks"].as_array().unwrap().len(), 1, "{v2:#}");
    assert_eq!(v2["clicks"][0]["click_timestamp_ms"].as_i64(), Some(sent[later].time));
    assert_eq!(v2["clicks"][0]["fate"], "counted", "{v2:#}");
    assert_eq!(v2["stored"].as_u64(), Some(1), "{v2:#}");
    assert!(v["fix"].as_str().unwrap().starts_with("adclick recalc --from "), "{v:#}");
    let (code, vf) = explain(dir.path(), m, Some("us"));
    assert_eq!(code, 0, "{vf:#}");
    assert_fates(&vf, &sent, m, Some("us"), 0, &at_of);
    assert!(vf["fates"]["outside_filter"].as_u64().unwrap() > 0, "{vf:#}");

    // Recalculated: the too-late clicks sent so far are counted, except the copies.
    let recalculated = sent.len();
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .arg("--config")
        .arg(dir.path().join("adclick.toml"))
        .args(["recalc", "--from", &m.to_string(), "--to", &end.to_string(), "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Two more too-late clicks after it: too late, not counted yet.
    let n = sent.len();
    for k in 0..2 {
        let mut s = Sent::new(m + 50_000 + k, &format!("after{k}"), "10.0.0.6", "US", None);
        s.too_late = true;
        sent.push(s);
    }
    post_lines(&server, &sent[n..].iter().collect::<Vec<_>>());
    let (code, v) = explain(dir.path(), m, None);
    assert_eq!(code, 0, "{v:#}");
    let at_of = locate(&sent, &v_before, &v);
    assert_fates(&v, &sent, m, None, recalculated, &at_of);
    assert_eq!(v["recalc_would_count"].as_u64(), Some(2), "{v:#}");

    // With the server stopped, the command reads the data directory itself: the same answer.
    server.stop();
    let (code, stopped) = explain(dir.path(), m, None);
    assert_eq!(code, 0, "{stopped:#}");
    assert_eq!(stopped["clicks"], v["clicks"]);
    assert_eq!(stopped["stored"], v["stored"]);
}
