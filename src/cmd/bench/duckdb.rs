//! `adclick bench --duckdb ROUNDS`: the same clicks through DuckDB's batch GROUP BY and through
//! adclick to durable, final results, in the same run, so that the ratio between them does not
//! depend on the machine.
//!
//! The `--events` workload of `adclick bench` (100,000 ads, 1% duplicates, event times two hours
//! back) is written to one NDJSON file. DuckDB (the Python package the tests install) runs
//! `read_json` over it and counts clicks per ad and minute, reading `click_timestamp` as epoch
//! milliseconds or RFC 3339 and `ad_id` as text, as the lines hold them; only the query is timed.
//! adclick gets the same lines over HTTP from `--clients` threads into a fresh server with
//! default settings, timed from the first send to every minute final in the API. DuckDB neither
//! deduplicates, validates nor keeps anything durable; adclick does all three. Rounds alternate
//! which goes first.

use std::io::Write;
use std::process::Command;

use anyhow::{bail, Context};

use super::{ingest, ingest_workload, percentile, BenchArgs};

/// The query, with `{file}` for the NDJSON path; prints seconds, groups and clicks counted.
const DUCKDB: &str = r#"
import sys, time, duckdb
con = duckdb.connect()
con.sql("SET TimeZone = 'UTC'")
query = """
SELECT count(*), sum(n) FROM (
  SELECT ad_id, date_trunc('minute',
           CASE WHEN regexp_full_match(ts, '-?[0-9]+') THEN epoch_ms(ts::BIGINT)::TIMESTAMPTZ
                ELSE ts::TIMESTAMPTZ END) AS minute,
         count(*) AS n
  FROM read_json(?, format = 'newline_delimited',
                 columns = {'ad_id': 'VARCHAR', 'click_timestamp': 'VARCHAR'}) AS t(ad_id, ts)
  GROUP BY ALL)
"""
began = time.perf_counter()
groups, clicks = con.execute(query, [sys.argv[1]]).fetchone()
print(time.perf_counter() - began, groups, clicks)
"#;

pub(super) fn against_duckdb(args: &BenchArgs, rounds: usize) -> anyhow::Result<()> {
    let (_, batches, minutes) = ingest_workload(args.events, args.batch, args.per_minute);
    let dir = tempfile::Builder::new().prefix("adclick-bench-").tempdir().context("temp dir")?;
    let file = dir.path().join("clicks.ndjson");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
    let mut lines = 0usize;
    for (_, batch) in &batches {
        out.write_all(batch.as_bytes())?;
        out.write_all(b"\n")?;
        lines += batch.lines().count();
    }
    out.flush()?;
    drop(out);
    let mut duck = Vec::new();
    let mut ours = Vec::new();
    for round in 0..rounds.max(1) {
        for first in [round % 2 == 0, round % 2 == 1] {
            if first {
                let (secs, groups, clicks) = duckdb(&file)?;
                eprintln!(
                    "round {}: DuckDB {secs:.2} s ({groups} ad-minutes, {clicks} clicks)",
                    round + 1
                );
                if clicks as usize != lines {
                    bail!("DuckDB counted {clicks} clicks of {lines} lines");
                }
                duck.push(lines as f64 / secs);
            } else {
                let data = dir.path().join(format!("adclick-{round}"));
                let run = ingest(&data, &batches, &minutes, args.clients)?;
                eprintln!(
                    "round {}: adclick {:.2} s to final (minute end → final p99 {:.0} ms)",
                    round + 1,
                    run.total.as_secs_f64(),
                    percentile(&run.latencies_ms, 0.99)
                );
                ours.push(lines as f64 / run.total.as_secs_f64());
                std::fs::remove_dir_all(&data).ok();
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(v, 0.5)
    };
    let (d, a) = (median(&mut duck), median(&mut ours));
    let show = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
    println!("adclick bench --duckdb — {lines} lines, {} minutes of event time", minutes.len());
    println!(
        "  DuckDB read_json + GROUP BY ad, minute:  {d:>10.0} lines/s  (runs: {})",
        show(&duck)
    );
    println!(
        "  adclick, HTTP to durable final results:  {a:>10.0} lines/s  (runs: {})",
        show(&ours)
    );
    println!("  adclick / DuckDB:                        {:>10.2}", a / d);
    Ok(())
}

/// Runs the query over `file`: (seconds, ad-minute groups, clicks counted).
fn duckdb(file: &std::path::Path) -> anyhow::Result<(f64, u64, u64)> {
    let out = Command::new("python3")
        .args(["-c", DUCKDB])
        .arg(file)
        .output()
        .context("running python3 (DuckDB: pip install duckdb)")?;
    if !out.status.success() {
        bail!("DuckDB failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text.split_whitespace();
    let mut next = || f.next().context("DuckDB's answer");
    Ok((next()?.parse()?, next()?.parse()?, next()?.parse()?))
}
