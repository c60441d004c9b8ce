//! `adclick recalc`, `adclick reconcile` and `adclick explain` on a data directory, whether or
//! not a server runs on it.
//!
//! The store is single-process (redb locks its file), so the command first tries to open it:
//! - it opens: no server runs. The command starts the pipeline without its HTTP side, lets the
//!   aggregator and the archiver catch up with the log (a crash can leave both behind), runs the
//!   job, and stops;
//! - it is locked: a server holds it. `serve` wrote `<data_dir>/server.json` (mode 0600) with its
//!   address and a random admin token; the command posts the job to the server's
//!   `/v1/admin/{job}` endpoint and reads the NDJSON progress and result it streams back.
//!
//! Either way the same code (`QueryState::run_job`) does the work, and the output is the same.
//!
//! Scaled out (with `kafka` and `postgres` set), the command reads the archive role's files and
//! replaces the results in PostgreSQL itself (`scaleout::recalc`), with the same output.

use std::io::{BufRead, IsTerminal, Read};

use anyhow::Context;

use crate::config::Settings;
use crate::event::Minute;
use crate::recalc::{Explained, Fate, Job, JobResult, Progress, Question};
use crate::serve::{server_file_path, ServerFile};

/// Runs a job and prints its result (a table, or JSON with `json`). Returns whether the stored
/// results matched the archive (reconcile) or the job succeeded (recalc).
pub fn run(
    settings: &Settings,
    job: Job,
    from: Minute,
    to: Minute,
    json: bool,
) -> anyhow::Result<bool> {
    anyhow::ensure!(from < to, "--from must be before --to");
    let mut bar = Bar::new();
    if let Some(scale) = &settings.scaleout {
        // Scaled out: the archive role's files against the results in PostgreSQL.
        let result =
            crate::scaleout::recalc::run_job(settings, scale, job, from, to, &mut |p| bar.show(p));
        bar.done();
        return report(job, &result?, json);
    }
    let result = if server_holds(settings)? {
        run_on_server(settings, job, from, to, &mut bar)?
    } else {
        run_here(settings, job, from, to, &mut bar)?
    };
    bar.done();
    report(job, &result, json)
}

/// Whether a running server holds the data directory's store (redb locks its file), so that
/// a job runs there; an error when the directory holds no adclick data.
fn server_holds(settings: &Settings) -> anyhow::Result<bool> {
    let store_path = settings.data_dir.join("store.redb");
    anyhow::ensure!(
        store_path.exists(),
        "{} holds no adclick data (no store.redb); use --data-dir or --config",
        settings.data_dir.display()
    );
    match crate::store::Store::open(&store_path) {
        Ok(_) => Ok(false),
        Err(e) if e.is_locked() => Ok(true),
        Err(e) => Err(e).context("opening the store"),
    }
}

/// Prints the result; whether the stored results matched (reconcile) or the job succeeded.
fn report(job: Job, result: &JobResult, json: bool) -> anyhow::Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(result)?);
    } else {
        print_table(result);
    }
    Ok(match job {
        Job::Reconcile => result.report.matches,
        Job::Recalc { .. } => true,
    })
}

/// Explains one stored count and prints it (a table, or JSON with `json`). Returns whether the
/// counted clicks add up to the stored count.
pub fn explain(settings: &Settings, q: &Question, json: bool) -> anyhow::Result<bool> {
    let result = if let Some(scale) = &settings.scaleout {
        crate::scaleout::recalc::explain(settings, scale, q)?
    } else if server_holds(settings)? {
        explain_on_server(settings, q)?
    } else {
        let pipeline = crate::pipeline::Pipeline::start(settings)?;
        let result = pipeline.query.explain(q, std::time::Duration::from_secs(3600));
        pipeline.stop();
        result?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print_explained(&result);
    }
    Ok(result.matches)
}

fn explain_on_server(settings: &Settings, q: &Question) -> anyhow::Result<Explained> {
    let (server, agent) = server(settings)?;
    let mut req = agent
        .post(format!("{}/v1/admin/explain", server.url))
        .query("ad_id", &q.ad)
        .query("minute", q.minute.start().0.to_string());
    if let Some(f) = &q.filter {
        req = req.query("filter", f);
    }
    let response = req
        .header("authorization", &format!("Bearer {}", server.token))
        .send_empty()
        .with_context(|| format!("asking the server at {}", server.url))?;
    let status = response.status();
    // Every click of a busy minute: tens of megabytes of JSON are expected.
    let body = response
        .into_body()
        .into_with_config()
        .limit(u64::MAX)
        .read_to_string()
        .context("reading the server's answer")?;
    if !status.is_success() {
        let error = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or(body);
        anyhow::bail!("the server answered {status}: {error}");
    }
    serde_json::from_str(&body).context("the server's answer")
}

/// The server running on the data directory (from `server.json`), and an agent to ask it.
fn server(settings: &Settings) -> anyhow::Result<(ServerFile, ureq::Agent)> {
    let path = server_file_path(&settings.data_dir);
    let server: ServerFile = serde_json::from_slice(&std::fs::read(&path).with_context(|| {
        format!("a server holds the store, but {} cannot be read", path.display())
    })?)
    .with_context(|| format!("{} is not a server file", path.display()))?;
    eprintln!(
        "adclick: a server (pid {}) holds {}; running there",
        server.pid,
        settings.data_dir.display()
    );
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    Ok((server, agent))
}

fn print_explained(e: &Explained) {
    println!(
        "{:>9} {:>12} {:<24} {:<16} {:<39} {:<7} {:<20} {:<13} detail",
        "partition", "offset", "click_timestamp", "user_id", "ip", "country", "click_id", "fate"
    );
    for c in &e.clicks {
        let fate = serde_json::to_value(c.fate)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let repeats =
            c.duplicate_of.map(|d| format!("of partition {} offset {}", d.partition, d.offset));
        let detail = match (c.fate, c.recalculated, repeats) {
            (Fate::Duplicate, _, Some(r)) => r,
            (Fate::TooLate, Some(true), _) => "counted by a recalculation since".to_string(),
            (Fate::TooLate, _, Some(r)) => {
                format!("not counted; a recalculation would not either: a duplicate {r}")
            }
            (Fate::TooLate, _, None) => "not counted yet; a recalculation counts it".to_string(),
            _ => String::new(),
        };
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let line = format!(
            "{:>9} {:>12} {:<24} {:<16} {:<39} {:<7} {:<20} {:<13} {detail}",
            c.partition,
            c.offset,
            c.click_timestamp,
            dash(&c.user_id),
            dash(&c.ip),
            dash(&c.country),
            dash(&c.click_id),
            fate
        );
        println!("{}", line.trim_end());
    }
    println!();
    let fates: Vec<String> = e.fates.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "{} minute {} ({}): {} clicks in the archive ({}); {} counted, {} stored",
        e.ad_id,
        e.minute,
        e.filter.as_deref().unwrap_or("total"),
        e.clicks.len(),
        if fates.is_empty() { "none".to_string() } else { fates.join(", ") },
        e.counted,
        e.stored
    );
    match e.difference {
        None => println!("the counted clicks add up to the stored count"),
        Some(kind) => println!(
            "they differ by {:+}: {}",
            e.counted as i64 - e.stored as i64,
            serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        ),
    }
    if let Some(fix) = &e.fix {
        println!("{} too-late clicks are counted by: {fix}", e.recalc_would_count);
    }
}

fn run_here(
    settings: &Settings,
    job: Job,
    from: Minute,
    to: Minute,
    bar: &mut Bar,
) -> anyhow::Result<JobResult> {
    // The pipeline without its HTTP side: recovery, then the aggregator and the archiver catch
    // up with what the log holds (a crash can leave both behind), so that stored results and
    // the archive both reflect every accepted click before they are compared.
    let pipeline = crate::pipeline::Pipeline::start(settings)?;
    let hour = std::time::Duration::from_secs(3600);
    let result = pipeline.query.run_job(job, from, to, hour, &mut |p| bar.show(p));
    pipeline.stop();
    Ok(result?)
}

fn run_on_server(
    settings: &Settings,
    job: Job,
    from: Minute,
    to: Minute,
    bar: &mut Bar,
) -> anyhow::Result<JobResult> {
    let (server, agent) = server(settings)?;
    let (name, dry) = match job {
        Job::Recalc { dry_run } => ("recalc", format!("&dry_run={dry_run}")),
        Job::Reconcile => ("reconcile", String::new()),
    };
    let url =
        format!("{}/v1/admin/{name}?from={}&to={}{dry}", server.url, from.start().0, to.start().0);
    let response = agent
        .post(&url)
        .header("authorization", &format!("Bearer {}", server.token))
        .send_empty()
        .with_context(|| format!("asking the server at {}", server.url))?;
    let status = response.status();
    let mut reader = std::io::BufReader::new(response.into_body().into_reader());
    if !status.is_success() {
        let mut body = String::new();
        let _ = reader.read_to_string(&mut body);
        anyhow::bail!("the server answered {status}: {body}");
    }
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).context("reading the server's answer")? == 0 {
            anyhow::bail!("the server closed the connection before the result");
        }
        let v: serde_json::Value = serde_json::from_str(&line).context("the server's answer")?;
        if let Some(p) = v.get("progress") {
            if let Ok(p) = serde_json::from_value::<Progress>(p.clone()) {
                bar.show(&p);
            }
        } else if let Some(r) = v.get("result") {
            return serde_json::from_value(r.clone()).context("the server's result");
        } else if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!("{e}");
        }
    }
}

/// A one-line progress bar on a terminal's stderr.
struct Bar {
    on: bool,
    shown: bool,
}

impl Bar {
    fn new() -> Bar {
        Bar { on: std::io::stderr().is_terminal(), shown: false }
    }
    fn show(&mut self, p: &Progress) {
        if !self.on {
            return;
        }
        let share = p.minutes_done as f64 / p.minutes_total.max(1) as f64;
        let filled = (share * 30.0) as usize;
        eprint!(
            "\r[{}{}] {:>3.0}%  {} events  {:.0} events/s  {} files   ",
            "#".repeat(filled),
            "-".repeat(30 - filled.min(30)),
            share * 100.0,
            p.events,
            p.events as f64 / p.elapsed_s.max(1e-9),
            p.files
        );
        self.shown = true;
    }
    fn done(&mut self) {
        if self.shown {
            eprintln!();
        }
    }
}

/// Most differences the table lists; `--json` lists them all.
const TABLE_ROWS: usize = 50;

fn print_table(r: &JobResult) {
    let rep = &r.report;
    let verb = match (r.job.as_str(), r.dry_run) {
        ("recalc", true) => "would change",
        ("recalc", false) => "changed",
        _ => "differ",
    };
    if !rep.differences.is_empty() {
        println!(
            "{:<20} {:<24} {:<12} {:>10} {:>10} {:>10}  kind",
            "minute", "ad_id", "filter", "stored", "recomputed", "difference"
        );
        for d in rep.differences.iter().take(TABLE_ROWS) {
            println!(
                "{:<20} {:<24} {:<12} {:>10} {:>10} {:>+10}  {}",
                d.minute,
                d.ad_id,
                d.filter.as_deref().unwrap_or("(total)"),
                d.stored,
                d.recomputed,
                d.difference,
                serde_json::to_value(d.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            );
        }
        if rep.differences.len() > TABLE_ROWS {
            println!("… and {} more (--json lists all)", rep.differences.len() - TABLE_ROWS);
        }
        println!();
    }
    println!(
        "{} [{}, {}): {} events read from the archive in {:.1}s ({:.0} events/s); {} stored rows, {} recomputed",
        r.job, rep.from, rep.to, rep.events_read, r.elapsed_s, r.events_per_s, rep.rows_stored, rep.rows_recomputed
    );
    if rep.differences.is_empty() {
        println!("all stored counts match the archive");
    } else {
        println!(
            "{} counts {verb}: {} too late, {} missing from the archive, {} unexplained",
            rep.differences.len(),
            rep.too_late,
            rep.missing_from_archive,
            rep.unexplained
        );
    }
    if let Some(fix) = rep.fix.as_ref().filter(|_| r.job == "reconcile") {
        println!("too-late clicks are counted by: {fix}");
    }
    if let Some(rep) = &r.replaced {
        println!(
            "replaced atomically: {} rows before, {} after, {} top-N lists",
            rep.rows_before, rep.rows_after, rep.tops
        );
    }
}
