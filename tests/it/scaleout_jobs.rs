//! recalc and reconcile on the scaled-out deployment: too-late clicks injected into a run of
//! every role (Kafka, PostgreSQL, the archive role writing Parquet), reported by reconcile,
//! counted by recalc (hour sums included), a clean reconcile after, and every answer of the
//! query role equal to the oracle.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adclick::event::{parse_line, EventTime, Validation};

use crate::archive::{on_time_then_too_late, reconcile_recalc_reconcile};
use crate::scaleout::{await_cond, committed_records, services, Deployment};
use crate::service::{assert_matches_oracle, generator, now_ms, oracle, post, Server};

/// The ads' total clicks over whole hours, as `popular_ads` answers them (count desc, ad asc).
fn popular_hours(server: &Server, to_ms: i64) -> Vec<(String, u64)> {
    let (status, v) = server.get(&format!("/v1/ads/popular_ads?count=1000&window=1440&to={to_ms}"));
    assert_eq!(status, 200, "{v}");
    v["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["ad_id"].as_str().unwrap().to_string(), a["count"].as_u64().unwrap()))
        .collect()
}

/// The oracle's answer to [`popular_hours`].
fn ranked(oracle: &BTreeMap<(i64, String, usize), u64>, to_ms: i64) -> Vec<(String, u64)> {
    let to = to_ms / 60_000;
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    for ((minute, ad, slot), c) in oracle {
        if *slot == 0 && (to - 1440..to).contains(minute) {
            *sums.entry(ad.clone()).or_default() += c;
        }
    }
    let mut v: Vec<(String, u64)> = sums.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.as_bytes().cmp(b.0.as_bytes())));
    v.truncate(1000);
    v
}

/// How many of the lines the collector accepts (valid at the time they were sent).
fn accepted_of(lines: &[(String, i64)]) -> i64 {
    let valid = |(l, at): &&(String, i64)| {
        let v = Validation { now: EventTime(*at), max_skew_ms: 300_000 };
        matches!(parse_line(l.as_bytes(), v), Ok(Some(_)))
    };
    lines.iter().filter(valid).count() as i64
}

#[test]
fn too_late_clicks_are_reconciled_then_recalculated_scaled_out() {
    let Some((kafka, pg)) = services() else { return };
    let mut d = Deployment::new(&kafka, &pg, "recalc", 4);
    let archive = d.root.path().join("archive");
    // The lateness and horizon of the embedded test's workload. The archive role flushes on its
    // own only once an hour: the jobs have it flush when they need it.
    d.config = format!(
        "archive = {:?}\narchive_flush_interval = \"1h\"\narchive_file_rows = 1000000\n{}",
        archive.to_str().unwrap(),
        d.config
            .replace("allowed_lateness = \"30m\"", "allowed_lateness = \"2m\"")
            .replace("dedup_horizon = \"40m\"", "dedup_horizon = \"4m\"")
    );
    let server = d.start("collect,aggregate,query,archive", &[]);
    // The commands read the same settings, with the deployment's addresses.
    let jobs = d.root.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    std::fs::write(
        jobs.join("adclick.toml"),
        format!(
            "kafka = {:?}\npostgres = {:?}\ntopic = {:?}\n{}",
            d.kafka, d.pg, d.topic, d.config
        ),
    )
    .unwrap();

    let (sent, sealed_to) = on_time_then_too_late(&server);
    let on_time = 2100;
    // Every accepted line reflected in the results before the jobs take their snapshot.
    let accepted = accepted_of(&sent);
    let mut client = d.client();
    await_cond(60, "every accepted line committed", || committed_records(&mut client) == accepted);
    let too_late: i64 = client
        .query_one("SELECT coalesce(sum(too_late), 0)::bigint FROM adclick_partitions", &[])
        .unwrap()
        .get(0);
    assert!(too_late > 100, "the workload must hold too-late clicks: {too_late}");

    // Whole hours read the hour sums: the hour of the last minute, and the one before.
    let last_hour_end = ((sealed_to + 3).div_euclid(60) + 1) * 3_600_000;
    let live = oracle(&sent[..on_time]).0;
    await_cond(60, "the sealed minutes to be rolled into their hours", || {
        let rolled: i64 = client
            .query_one("SELECT min(rolled_through) FROM adclick_partitions", &[])
            .unwrap()
            .get(0);
        rolled >= sealed_to
    });
    assert_eq!(popular_hours(&server, last_hour_end), ranked(&live, last_hour_end), "before");

    // A recalc killed inside its transaction changes nothing (the reconcile below finds every
    // difference still there).
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .arg("--config")
        .arg(jobs.join("adclick.toml"))
        .args(["recalc", "--from", &((sealed_to - 6) * 60_000).to_string()])
        .args(["--to", &(sealed_to * 60_000).to_string(), "--json"])
        .env("ADCLICK_FAULT", "pg.mid_replace:1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fault point pg.mid_replace reached"), "{err}");

    // Clicks of the current minutes go on arriving, and their commits on being made, while the
    // jobs lock the partitions to replace the range.
    let stop = Arc::new(AtomicBool::new(false));
    let ingest = {
        let (url, stop) = (server.url.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut g = generator(93);
            let mut acked = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let at = now_ms();
                let lines: Vec<String> = (0..50).map(|_| g.line(EventTime(at))).collect();
                if let Ok((200, _)) = post(&url, lines.join("\n").as_bytes()) {
                    acked.extend(lines.into_iter().map(|l| (l, at)));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            acked
        })
    };
    reconcile_recalc_reconcile(&jobs, &sent, on_time, sealed_to);
    stop.store(true, Ordering::Release);
    let ingested = ingest.join().unwrap();
    assert!(ingested.len() > 500, "ingest went on during the jobs: {}", ingested.len());
    let mut all = sent.clone();
    all.extend(ingested);
    let accepted = accepted_of(&all);
    await_cond(60, "the ingested lines committed", || committed_records(&mut client) == accepted);

    let (full, _) = oracle(&all);
    let want = ranked(&full, last_hour_end);
    assert_eq!(popular_hours(&server, last_hour_end), want, "hour sums after recalc");
    let recalculated: BTreeMap<_, _> =
        full.clone().into_iter().filter(|(k, _)| k.0 < sealed_to).collect();
    assert_matches_oracle(&server, &recalculated);
    // explain: the (minute, ad) with the most too-late clicks, every one of them listed as too
    // late and counted by the recalculation or a copy, the counted ones adding up to the count.
    let parsed: Vec<(usize, String, i64)> = sent
        .iter()
        .enumerate()
        .filter_map(|(i, (l, at))| {
            let v = Validation { now: EventTime(*at), max_skew_ms: 300_000 };
            let c = parse_line(l.as_bytes(), v).ok()??;
            Some((i, c.ad_id.to_string(), c.time.0.div_euclid(60_000)))
        })
        .collect();
    let mut late_of: BTreeMap<(i64, String), usize> = BTreeMap::new();
    for (i, ad, m) in &parsed {
        if *i >= on_time {
            *late_of.entry((*m, ad.clone())).or_default() += 1;
        }
    }
    let ((minute, ad), late) = late_of.iter().max_by_key(|(_, n)| **n).unwrap();
    let listed = parsed.iter().filter(|(_, a, m)| a == ad && m == minute).count();
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .arg("--config")
        .arg(jobs.join("adclick.toml"))
        .args(["explain", ad, "--minute", &(minute * 60_000).to_string(), "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("explain: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    assert_eq!(v["stored"].as_u64(), Some(full[&(*minute, ad.clone(), 0)]), "{v:#}");
    assert_eq!(v["counted"], v["stored"], "{v:#}");
    assert_eq!(v["clicks"].as_array().unwrap().len(), listed, "{v:#}");
    // As many too late as the aggregators found (the generator's own late lines among the
    // first ones included), at least those sent after the minute was sealed.
    let found: i64 = client
        .query_one(
            "SELECT sum(count + recounted)::bigint FROM adclick_too_late \
             WHERE minute = $1 AND ad_id = $2 AND slot = 0",
            &[minute, ad],
        )
        .unwrap()
        .get(0);
    assert_eq!(v["fates"]["too_late"].as_i64(), Some(found), "{v:#}");
    assert!(found >= *late as i64, "{found} too late, {late} sent after the seal");

    // The too-late clicks are counted now: none left for the range, all remembered as counted.
    let (left, recounted): (i64, i64) = {
        let r = client
            .query_one(
                "SELECT coalesce(sum(count), 0)::bigint, coalesce(sum(recounted), 0)::bigint \
                 FROM adclick_too_late WHERE minute < $1 AND slot = 0",
                &[&sealed_to],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((left, recounted), (0, too_late), "too-late clicks of the recalculated range");

    // A job given another archive than the archive role writes is refused, naming both.
    let elsewhere = d.root.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let config = std::fs::read_to_string(jobs.join("adclick.toml")).unwrap();
    let config = config.replace(
        &format!("archive = {:?}", archive.to_str().unwrap()),
        &format!("archive = {:?}", elsewhere.to_str().unwrap()),
    );
    std::fs::write(elsewhere.join("adclick.toml"), config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .arg("--config")
        .arg(elsewhere.join("adclick.toml"))
        .args(["reconcile", "--from", &((sealed_to - 6) * 60_000).to_string()])
        .args(["--to", &(sealed_to * 60_000).to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the archive role writes to"), "{err}");
}
