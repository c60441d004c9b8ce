//! `adclick status`: a running server's health in the terminal, from its `/healthz` and
//! `/metrics` (found by its data directory's `server.json`, or given by `--url`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::event::EventTime;
use crate::serve::{server_file_path, ServerFile};

/// `adclick status`: reads `/healthz` and `/metrics` of a running server and prints a summary.
pub fn run(url: Option<String>, data_dir: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let url = match url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let dir = data_dir.unwrap_or_else(|| PathBuf::from("./adclick-data"));
            let path = server_file_path(&dir);
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "no server runs on {} ({} cannot be read); give --url",
                    dir.display(),
                    path.display()
                )
            })?;
            let server: ServerFile = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a server file", path.display()))?;
            server.url
        }
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let get = |path: &str| -> anyhow::Result<(u16, String)> {
        let r = agent.get(format!("{url}{path}")).call();
        let mut r = match r {
            Ok(r) => r,
            Err(e) => {
                eprintln!("adclick: cannot reach {url}: {e}");
                std::process::exit(2);
            }
        };
        Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
    };
    let (code, health) = get("/healthz")?;
    let health: serde_json::Value =
        serde_json::from_str(&health).with_context(|| format!("{url}/healthz: {health:?}"))?;
    let (_, metrics) = get("/metrics")?;
    // Sums of the samples of a metric (over its labels), of those whose lines hold `having`.
    let metric = |name: &str, having: &[&str]| -> serde_json::Value {
        let values: Vec<f64> = metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.split([' ', '{']).next() == Some(name) && having.iter().all(|h| l.contains(h))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        match values.iter().sum::<f64>() {
            _ if values.is_empty() => serde_json::Value::Null,
            n if n.fract() == 0.0 && n >= 0.0 => serde_json::json!(n as u64),
            n => serde_json::json!(n),
        }
    };
    let watermark = health["watermark"].as_str().map(str::to_string);
    let behind = watermark
        .as_deref()
        .and_then(|w| crate::event::parse_rfc3339(w).ok())
        .map(|w| (EventTime::now().0 - w.0) as f64 / 1000.0);
    let summary = serde_json::json!({
        "url": url,
        "status": health["status"],
        "error": health["error"],
        "commits_stalled": metric(crate::telemetry::STALLED, &[]),
        "watermark": watermark,
        "watermark_behind_seconds": behind,
        "lag_records": health["lag_records"],
        "archive_lag_records": health["archive_lag_records"],
        "accepted_total": metric(crate::telemetry::ACCEPTED, &[]),
        "rejected_total": metric(crate::telemetry::INVALID, &[]),
        "overloaded_total": metric(
            crate::telemetry::REQUESTS,
            &["endpoint=\"/v1/clicks\"", "code=\"503\""]
        ),
    });
    if json {
        println!("{summary}");
    } else {
        let show = |v: &serde_json::Value| match v {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => other.to_string(),
        };
        println!("adclick at {url}: {}", show(&summary["status"]));
        if let Some(error) = summary["error"].as_str() {
            println!("  error            {error}");
        }
        if summary["commits_stalled"] == 1 {
            println!("  commits          stalled, retrying");
        }
        println!(
            "  watermark        {} ({} s behind the clock)",
            show(&summary["watermark"]),
            behind.map_or("-".into(), |b| format!("{b:.1}"))
        );
        println!("  not aggregated   {} records", show(&summary["lag_records"]));
        println!("  not archived     {} records", show(&summary["archive_lag_records"]));
        println!("  accepted         {} clicks", show(&summary["accepted_total"]));
        println!("  rejected         {} lines", show(&summary["rejected_total"]));
        println!("  answered 503     {} requests", show(&summary["overloaded_total"]));
    }
    if code != 200 || health["status"] != "ok" {
        std::process::exit(1);
    }
    Ok(())
}
