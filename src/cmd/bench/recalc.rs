//! `adclick bench --recalc-duckdb ROUNDS`: recalculation against DuckDB on the same Parquet
//! files, in the same run, so that the ratio between them does not depend on the machine.
//!
//! The `--events` workload of `adclick bench` is written as the archiver writes it: one flush
//! per million clicks, a file per event hour, each click with its partition and offset. Both
//! then compute the same results over every file: distinct clicks (SPEC §1 identities) per ad
//! and minute, for the total and the two filters of the demo (`country = US`, `ip = 10.0.0.0/8`),
//! and each minute's top 100 per slot. DuckDB (the Python package the tests install) runs one
//! SQL query with `count(DISTINCT identity)` and `row_number()`; adclick runs
//! `recalc::recompute` (dedup within the horizon, the filters, top-N). Only the computation is
//! timed, files in the page cache. The totals of both are printed and must agree (the
//! workload's copies are exact, so per-minute distinct and dedup within the horizon agree).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};

use super::{ingest_workload, percentile, BenchArgs};
use crate::archive::{Archive, FileWriter};
use crate::engine::{Offset, PartitionId};
use crate::event::{parse_line, partition_of, route_hash, EventTime, Minute, Validation};
use crate::recalc::{recompute, Context as Sources, Scope};

/// Clicks per flush, as the archiver's default `archive_file_rows`.
const FLUSH_ROWS: usize = 1_000_000;

/// The query over the files' glob; prints seconds, ad-minutes, the three slot totals and the
/// top-N entries.
const DUCKDB: &str = r#"
import sys, time, duckdb
con = duckdb.connect()
con.sql("SET TimeZone = 'UTC'")
query = """
WITH c AS (
  SELECT ad_id, date_trunc('minute', click_timestamp) AS minute,
         coalesce('c' || click_id,
                  'n' || epoch_ms(click_timestamp) || '|' || coalesce(user_id, '') || '|' || coalesce(ip, '')) AS id,
         country = 'US' AS us, starts_with(ip, '10.') AS office
  FROM read_parquet(?)),
n AS MATERIALIZED (
  SELECT ad_id, minute, count(DISTINCT id) AS total,
         count(DISTINCT id) FILTER (WHERE us) AS us,
         count(DISTINCT id) FILTER (WHERE office) AS office
  FROM c GROUP BY ALL),
t AS (
  SELECT minute, ad_id FROM n
    QUALIFY row_number() OVER (PARTITION BY minute ORDER BY total DESC, ad_id) <= 100
  UNION ALL SELECT minute, ad_id FROM n WHERE us > 0
    QUALIFY row_number() OVER (PARTITION BY minute ORDER BY us DESC, ad_id) <= 100
  UNION ALL SELECT minute, ad_id FROM n WHERE office > 0
    QUALIFY row_number() OVER (PARTITION BY minute ORDER BY office DESC, ad_id) <= 100)
SELECT (SELECT count(*) FROM n), (SELECT sum(total) FROM n), (SELECT sum(us) FROM n),
       (SELECT sum(office) FROM n), (SELECT count(*) FROM t)
"""
began = time.perf_counter()
row = con.execute(query, [sys.argv[1]]).fetchone()
print(time.perf_counter() - began, *row)
"#;

/// What one side computed: (ad-minutes, total, us, office, top-N entries).
type Totals = [u64; 5];

pub(super) fn against_duckdb(args: &BenchArgs, rounds: usize) -> anyhow::Result<()> {
    let (_, batches, _) = ingest_workload(args.events, args.batch, args.per_minute);
    let dir = tempfile::Builder::new().prefix("adclick-bench-").tempdir().context("temp dir")?;
    let archive_dir = dir.path().join("archive");
    let mut config = crate::config::Config::load(None, &[])?;
    config.filters = crate::config::demo_filters();
    let settings = config.validate()?;
    eprintln!("bench: writing the archive…");
    let (rows, (first, last)) =
        write_archive(&archive_dir, batches.iter().map(|(_, b)| b.as_str()))?;
    let archive_settings = crate::archive::ArchiveSettings {
        location: archive_dir.display().to_string(),
        ..settings.archive.clone()
    };
    let ctx = Sources {
        archive: Arc::new(Archive::open(&archive_settings, dir.path())?),
        engine: settings.engine.clone(),
        filters: Arc::new(settings.filters.clone()),
    };
    // Every archived click's minute (the workload's disorder puts some before its start).
    let (from, to) = (first, Minute(last.0 + 1));
    let glob = format!("{}/**/*.parquet", archive_dir.display());
    let (mut duck, mut ours) = (Vec::new(), Vec::new());
    let mut answers: BTreeMap<&str, Totals> = BTreeMap::new();
    for round in 0..rounds.max(1) {
        for first in [round % 2 == 0, round % 2 == 1] {
            if first {
                let (secs, totals) = duckdb(&glob)?;
                eprintln!("round {}: DuckDB {secs:.2} s {totals:?}", round + 1);
                duck.push(rows as f64 / secs);
                answers.insert("DuckDB", totals);
            } else {
                let started = Instant::now();
                let rec = recompute(&ctx, &Scope::default(), from, to, &mut |_| {})?;
                let secs = started.elapsed().as_secs_f64();
                let mut totals: Totals = [rec.counts.len() as u64, 0, 0, 0, 0];
                for (_, c) in &rec.counts {
                    for (slot, n) in c.iter().enumerate().take(3) {
                        totals[1 + slot] += n;
                    }
                }
                totals[4] = rec.tops.iter().map(|t| t.ads.len() as u64).sum();
                eprintln!("round {}: adclick {secs:.2} s {totals:?}", round + 1);
                ours.push(rows as f64 / secs);
                answers.insert("adclick", totals);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(v, 0.5)
    };
    let (d, a) = (median(&mut duck), median(&mut ours));
    let show = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
    println!(
        "adclick bench --recalc-duckdb — {rows} archived clicks, {} minutes of event time",
        to.0 - from.0
    );
    println!(
        "  DuckDB count(DISTINCT) + filters + top-N:  {d:>10.0} clicks/s  (runs: {})",
        show(&duck)
    );
    println!(
        "  adclick recompute (dedup, filters, top-N): {a:>10.0} clicks/s  (runs: {})",
        show(&ours)
    );
    println!("  adclick / DuckDB:                          {:>10.2}", a / d);
    println!(
        "  results [ad-minutes, total, us, office, top-N entries]: DuckDB {:?}, adclick {:?}",
        answers.get("DuckDB"),
        answers.get("adclick")
    );
    if answers.get("DuckDB") != answers.get("adclick") {
        bail!("DuckDB and adclick computed different results (see above)");
    }
    Ok(())
}

/// Writes the lines' clicks as the archiver would (partition and offset as the collector
/// routes them; a flush per `FLUSH_ROWS`, a file per event hour, rows in (partition, offset)
/// order); returns how many, and their first and last minutes.
fn write_archive<'a>(
    dir: &std::path::Path,
    bodies: impl Iterator<Item = &'a str>,
) -> anyhow::Result<(usize, (Minute, Minute))> {
    let partitions = 8;
    let v = Validation { now: EventTime(i64::MAX / 2), max_skew_ms: i64::MAX / 4 };
    let mut offsets = [0u64; 8];
    let mut flush: Vec<(i64, PartitionId, Offset, crate::event::Click<'a>)> = Vec::new();
    let (mut seq, mut rows) = (0u64, 0usize);
    let (mut first, mut last) = (Minute(i64::MAX), Minute(i64::MIN));
    let write = |flush: &mut Vec<(i64, PartitionId, Offset, crate::event::Click<'a>)>,
                 seq: u64|
     -> anyhow::Result<()> {
        flush.sort_by_key(|(hour, p, o, _)| (*hour, *p, *o));
        let mut files: BTreeMap<i64, FileWriter> = BTreeMap::new();
        for (hour, p, o, click) in flush.drain(..) {
            let file = match files.entry(hour) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(FileWriter::new()?),
            };
            file.append(p, o, &click)?;
        }
        for (hour, file) in files {
            let path = dir.join(crate::archive::file_name(hour, seq));
            std::fs::create_dir_all(path.parent().context("a file's directory")?)?;
            std::fs::write(&path, file.finish()?)?;
        }
        Ok(())
    };
    for line in bodies.flat_map(str::lines) {
        let Ok(Some(click)) = parse_line(line.as_bytes(), v) else { continue };
        let p = partition_of(route_hash(&click.ad_id), partitions);
        let hour = click.time.0.div_euclid(3_600_000);
        (first, last) = (first.min(click.time.minute()), last.max(click.time.minute()));
        flush.push((hour, PartitionId(p), Offset(offsets[p as usize]), click));
        offsets[p as usize] += 1;
        rows += 1;
        if flush.len() == FLUSH_ROWS {
            write(&mut flush, seq)?;
            seq += 1;
        }
    }
    write(&mut flush, seq)?;
    anyhow::ensure!(rows > 0, "the workload holds no click");
    Ok((rows, (first, last)))
}

/// Runs the query over the files: (seconds, totals).
fn duckdb(glob: &str) -> anyhow::Result<(f64, Totals)> {
    let out = Command::new("python3")
        .args(["-c", DUCKDB, glob])
        .output()
        .context("running python3 (DuckDB: pip install duckdb)")?;
    if !out.status.success() {
        bail!("DuckDB failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let parse = || -> Option<(f64, Totals)> {
        let mut f = text.split_whitespace();
        let secs: f64 = f.next()?.parse().ok()?;
        let mut totals: Totals = [0; 5];
        for t in &mut totals {
            *t = f.next()?.parse::<f64>().ok()? as u64;
        }
        Some((secs, totals))
    };
    parse().with_context(|| format!("DuckDB's answer: {text:?}"))
}
