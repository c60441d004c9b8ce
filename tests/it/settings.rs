//! Settings on the real binary: mistakes named in the user's terms, the effective configuration,
//! every setting reachable by file, variable and flag with one default, and CORS.

use std::process::Command;

use serde_json::Value;

use super::service::*;

/// Settings a new user gets wrong: each refused before start, the message naming the key, the
/// value, the expected form and where it came from, nothing of the config library's internals.
#[test]
fn configuration_mistakes_are_named_in_the_users_terms() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| -> String {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adclick"));
        cmd.args(args).arg("--data-dir").arg(dir.path().join("data"));
        cmd.args(["--listen", "127.0.0.1:0"]).env_remove("ADCLICK_FAULT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{args:?} {env:?} started");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("unsigned int") && !err.contains("Serialized"), "internals: {err}");
        err
    };
    let err = run(&["serve", "--watermark-delay", "15"], &[]);
    assert!(err.contains(r#"watermark_delay: "15" is not a duration like 15s"#), "{err}");
    let err = run(&["serve"], &[("ADCLICK_WATERMARK_DELAY", "15")]);
    assert!(err.contains(r#"watermark_delay: "15" is not a duration"#), "{err}");
    let err = run(&["serve"], &[("ADCLICK_BOGUS_KEY", "1")]);
    assert!(err.contains("ADCLICK_BOGUS_KEY is not a setting"), "{err}");
    assert!(err.contains("ADCLICK_WATERMARK_DELAY"), "the settings are listed: {err}");
    let err = run(&["serve"], &[("ADCLICK_PARTITIONS", "many")]);
    assert!(
        err.contains(r#"partitions: "many" is not a whole number (from ADCLICK_PARTITIONS)"#),
        "{err}"
    );
    let file = dir.path().join("adclick.toml");
    std::fs::write(&file, "top_n = \"ten\"\n").unwrap();
    let err = run(&["--config", file.to_str().unwrap(), "serve"], &[]);
    assert!(err.contains(r#"top_n: "ten" is not a whole number (in "#), "{err}");
    std::fs::write(&file, "colour = \"red\"\n").unwrap();
    let err = run(&["--config", file.to_str().unwrap(), "serve"], &[]);
    assert!(err.contains("colour: not a setting (in "), "{err}");
}

/// `adclick config --print` shows the merged configuration (file < variables < flags) as TOML
/// that reads back; `serve --help` lists every setting with its default and its variable.
#[test]
fn the_effective_configuration_and_every_setting_are_shown() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("adclick.toml");
    std::fs::write(&file, "top_n = 5\nshards = 3\n[[filters]]\nid = \"us\"\ncountry = [\"US\"]\n")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .arg("--config")
        .arg(&file)
        .args(["config", "--print", "--shards", "4"])
        .env("ADCLICK_TOP_N", "7")
        .env_remove("ADCLICK_FAULT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let back = dir.path().join("printed.toml");
    std::fs::write(&back, &text).unwrap();
    let c = adclick::config::Config::load(Some(&back), &[]).expect("the printed TOML reads back");
    assert_eq!((c.top_n, c.shards, c.watermark_delay.as_str()), (7, 4, "15s"), "{text}");
    assert_eq!(c.filters.len(), 1, "{text}");
    let help =
        Command::new(env!("CARGO_BIN_EXE_adclick")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for (setting, var) in [
        ("watermark_delay = \"15s\"", "ADCLICK_WATERMARK_DELAY"),
        ("partitions = 8", "ADCLICK_PARTITIONS"),
        ("log_interval = \"10s\"", "ADCLICK_LOG_INTERVAL"),
    ] {
        let line = help
            .lines()
            .find(|l| l.contains(setting))
            .unwrap_or_else(|| panic!("{setting}: {help}"));
        assert!(line.contains(var), "{line}");
    }
}

/// CORS is off by default; `cors_origins` lets the named origins call the API from a browser
/// (simple requests and preflights), and no other.
#[test]
fn cors_allows_the_configured_origins_only() {
    let origin_of = |server: &Server, origin: &str| -> Option<String> {
        let r = agent().get(format!("{}/healthz", server.url)).header("Origin", origin).call();
        let r = r.unwrap();
        r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string())
    };
    let dir = tempfile::tempdir().unwrap();
    let mut plain = Server::start(dir.path(), CONFIG, &[]);
    assert_eq!(origin_of(&plain, "https://dash.example.com"), None);
    plain.kill();
    let dir = tempfile::tempdir().unwrap();
    let env = [("ADCLICK_CORS_ORIGINS", "https://dash.example.com, http://localhost:3000")];
    let mut server = Server::start(dir.path(), CONFIG, &env);
    assert_eq!(
        origin_of(&server, "https://dash.example.com").as_deref(),
        Some("https://dash.example.com")
    );
    assert_eq!(
        origin_of(&server, "http://localhost:3000").as_deref(),
        Some("http://localhost:3000")
    );
    assert_eq!(origin_of(&server, "https://evil.example.com"), None);
    let preflight = agent()
        .options(format!("{}/v1/clicks", server.url))
        .header("Origin", "http://localhost:3000")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .call()
        .unwrap();
    assert_eq!(preflight.status().as_u16(), 200);
    let methods = preflight.headers().get("access-control-allow-methods").unwrap();
    assert!(methods.to_str().unwrap().contains("POST"), "{methods:?}");
    server.kill();
    let err = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(["config", "--print"])
        .env("ADCLICK_CORS_ORIGINS", "dash.example.com")
        .output()
        .unwrap();
    assert!(!err.status.success());
    let err = String::from_utf8_lossy(&err.stderr);
    assert!(err.contains(r#"cors_origins: "dash.example.com" is not an origin"#), "{err}");
}

/// A valid value, other than the default, for every setting (all valid together, so that
/// `config --print` accepts them): a setting added without one here fails the test below.
fn other_values() -> Vec<(&'static str, Value)> {
    use serde_json::json;
    vec![
        ("listen", json!("127.0.0.1:9099")),
        ("data_dir", json!("/tmp/adclick-settings-test")),
        ("partitions", json!(9)),
        ("watermark_delay", json!("16s")),
        ("idle_timeout", json!("31s")),
        ("allowed_lateness", json!("6m")),
        ("dedup_horizon", json!("11m")),
        ("max_clock_skew", json!("4m")),
        ("top_n", json!(99)),
        ("max_body_bytes", json!(2048)),
        ("max_inflight_bytes", json!(4096)),
        ("commit_interval", json!("200ms")),
        ("checkpoint_interval", json!("6s")),
        ("shards", json!(3)),
        ("dedup_capacity", json!(1000)),
        ("max_lag_records", json!(77)),
        ("segment_bytes", json!(1_000_000)),
        ("log_retention", json!("2h")),
        ("log_interval", json!("20s")),
        ("cors_origins", json!("http://a.example")),
        ("archive", json!("arch")),
        ("archive_endpoint", json!("http://s3.local:9000")),
        ("archive_region", json!("eu-1")),
        ("archive_allow_http", json!(true)),
        ("archive_flush_interval", json!("2m")),
        ("archive_file_rows", json!(500)),
        ("kafka", json!("k:9092")),
        ("postgres", json!("postgres://u@h/db")),
        ("topic", json!("t2")),
        ("consumer_group", json!("g2")),
        ("roles", json!("collect,query")),
        ("session_timeout", json!("11s")),
        ("postgres_wait", json!("45s")),
    ]
}

/// `adclick config --print` with `args` and `env`, read back: every setting's value.
fn printed(args: &[String], env: &[(String, String)]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_adclick"));
    cmd.args(["config", "--print"]).args(args).env_remove("ADCLICK_FAULT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("printed.toml"), &text).unwrap();
    let c = adclick::config::Config::load(Some(&dir.path().join("printed.toml")), &[]).unwrap();
    serde_json::to_value(c).unwrap()
}

/// Each setting is declared once (`src/config/settings.rs`): it has one default, the one
/// `config --print` shows with nothing set and `serve --help` lists; and the file key, the
/// `ADCLICK_` variable and the flag each set it.
#[test]
fn every_setting_has_one_default_and_is_reachable_by_file_variable_and_flag() {
    use adclick::config::{Config, SETTINGS};
    let values = other_values();
    let value_of = |key: &str| -> &Value {
        &values
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no test value for {key}"))
            .1
    };
    let plain = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let defaults = serde_json::to_value(Config::default()).unwrap();
    assert_eq!(printed(&[], &[]), defaults, "config --print with nothing set shows the defaults");
    let help = Command::new(env!("CARGO_BIN_EXE_adclick")).args(["serve", "--help"]).output();
    let help = String::from_utf8(help.unwrap().stdout).unwrap();
    for s in SETTINGS {
        assert_ne!(value_of(s.key), &defaults[s.key], "{}: the test value is the default", s.key);
        let default = match &defaults[s.key] {
            Value::Null => "(none)".to_string(),
            v => v.to_string(),
        };
        let row = format!("{} = {default}", s.key);
        assert_eq!(help.matches(&row).count(), 1, "serve --help lists {row:?} once:\n{help}");
        let flag = format!("--{} <VALUE>", s.key.replace('_', "-"));
        assert_eq!(help.matches(&flag).count(), 1, "serve --help lists {flag}:\n{help}");
    }
    let file = tempfile::tempdir().unwrap();
    let path = file.path().join("all.toml");
    let toml: String =
        SETTINGS.iter().map(|s| format!("{} = {}\n", s.key, value_of(s.key))).collect();
    std::fs::write(&path, toml).unwrap();
    let by_file = printed(&["--config".into(), path.display().to_string()], &[]);
    let env: Vec<(String, String)> =
        SETTINGS.iter().map(|s| (s.variable(), plain(value_of(s.key)))).collect();
    let by_variable = printed(&[], &env);
    let flags: Vec<String> =
        SETTINGS.iter().flat_map(|s| [format!("--{}", s.flag()), plain(value_of(s.key))]).collect();
    let by_flag = printed(&flags, &[]);
    for s in SETTINGS {
        let want = value_of(s.key);
        assert_eq!(&by_file[s.key], want, "{} from the file", s.key);
        assert_eq!(&by_variable[s.key], want, "{} from {}", s.key, s.variable());
        assert_eq!(&by_flag[s.key], want, "{} from --{}", s.key, s.flag());
    }
}
