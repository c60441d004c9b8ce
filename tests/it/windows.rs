//! Windows (`GET /v1/ads/{ad_id}/windows`) against an oracle written from their definitions:
//! called by the shared end-to-end oracle, so every workload that checks counts checks windows
//! too, on both deployments (messy input, late corrections, history a month old, backfills).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::service::{Server, SLOT_NAMES};

/// Windows as the definitions say, minute by minute: (start, end, count, cut_start, cut_end).
fn oracle(
    kind: &str,
    counts: &BTreeMap<i64, u64>,
    (from, to): (i64, i64),
    (size, hop, gap, origin): (i64, i64, i64, i64),
) -> Vec<(i64, i64, u64, bool, bool)> {
    let clicks =
        |a: i64, b: i64| -> u64 { (a..b).map(|m| counts.get(&m).copied().unwrap_or(0)).sum() };
    let every = |step: i64| (from..to).filter(move |s| (s - origin).rem_euclid(step) == 0);
    match kind {
        "tumbling" => {
            every(size).map(|s| (s, s + size, clicks(s, s + size), false, false)).collect()
        }
        "hopping" => every(hop).map(|s| (s, s + size, clicks(s, s + size), false, false)).collect(),
        "sliding" => (from..to)
            .map(|m| (m + 1 - size, m + 1, clicks(m + 1 - size, m + 1), false, false))
            .collect(),
        _ => {
            let mut runs: Vec<(i64, i64)> = Vec::new();
            for m in (from..to).filter(|&m| clicks(m, m + 1) > 0) {
                match runs.last_mut() {
                    Some((_, last)) if m - *last - 1 < gap => *last = m,
                    _ => runs.push((m, m)),
                }
            }
            runs.into_iter()
                .map(|(s, l)| (s, l + 1, clicks(s, l + 1), s - from < gap, to - (l + 1) < gap))
                .collect()
        }
    }
}

/// The windows of the three ads with the most clicks, every kind and slot, over the oracle's
/// minutes `[first, last]`, against [`oracle`]. Only windows inside those minutes are compared:
/// the server may hold clicks outside them.
pub(crate) fn assert_windows_match_oracle(
    server: &Server,
    expected: &BTreeMap<(i64, String, usize), u64>,
) {
    let first = expected.keys().map(|k| k.0).min().unwrap();
    let last = expected.keys().map(|k| k.0).max().unwrap();
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for ((_, ad, slot), c) in expected {
        if *slot == 0 {
            *totals.entry(ad).or_default() += c;
        }
    }
    let mut ads: Vec<(&str, u64)> = totals.into_iter().collect();
    ads.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    // Origins off the hour, sizes that cross hours and (over long workloads) UTC days.
    let params = [
        ("tumbling", "size=7&origin=ORIGIN", (7, 0, 0, first + 3)),
        ("hopping", "size=10m&hop=4m&origin=ORIGIN", (10, 4, 0, first + 1)),
        ("sliding", "size=15", (15, 0, 0, 0)),
        ("session", "gap=2", (0, 0, 2, 0)),
    ];
    let (from, to) = (first, last + 1);
    for (ad, _) in ads.iter().take(3) {
        for (slot, name) in SLOT_NAMES.iter().enumerate() {
            let counts: BTreeMap<i64, u64> = expected
                .iter()
                .filter(|((_, a, s), _)| a == ad && *s == slot)
                .map(|((m, _, _), c)| (*m, *c))
                .collect();
            let filter = if name.is_empty() { String::new() } else { format!("&filter={name}") };
            for (kind, query, shape) in params {
                let query = query.replace("ORIGIN", &(shape.3 * 60_000).to_string());
                let url = format!(
                    "/v1/ads/{ad}/windows?type={kind}&{query}&from={}&to={}{filter}",
                    from * 60_000,
                    to * 60_000
                );
                let (status, v) = server.get(&url);
                assert_eq!(status, 200, "{url}: {v}");
                let inside = |w: &&Value| {
                    w["start_ms"].as_i64().unwrap() >= from * 60_000
                        && w["end_ms"].as_i64().unwrap() <= to * 60_000
                };
                let windows = v["windows"].as_array().unwrap();
                // The oracle's minutes are final (the caller waited for them).
                assert!(windows.iter().filter(inside).all(|w| w["final"] == true), "{url}: {v}");
                let got: Vec<(i64, i64, u64, bool, bool)> = windows
                    .iter()
                    .filter(inside)
                    .map(|w: &Value| {
                        (
                            w["start_ms"].as_i64().unwrap() / 60_000,
                            w["end_ms"].as_i64().unwrap() / 60_000,
                            w["count"].as_u64().unwrap(),
                            w["cut_start"].as_bool().unwrap_or(false),
                            w["cut_end"].as_bool().unwrap_or(false),
                        )
                    })
                    .collect();
                let want: Vec<_> = oracle(kind, &counts, (from, to), shape)
                    .into_iter()
                    .filter(|w| w.0 >= from && w.1 <= to)
                    .collect();
                assert_eq!(got, want, "{url}");
            }
        }
    }
}
