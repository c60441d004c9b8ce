//! Scale-out end to end: real `adclick serve` processes in separate roles against a real
//! Kafka-protocol broker and PostgreSQL (started by `scripts/services`, addresses in
//! `ADCLICK_TEST_KAFKA` and `ADCLICK_TEST_POSTGRES`). Each test uses its own topic and database.
//!
//! Without those variables the tests skip, unless `ADCLICK_REQUIRE_SERVICES` is set (CI sets
//! it): then a missing service fails them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use adclick::event::EventTime;

use crate::service::{
    assert_matches_oracle, generator, generator_config, now_ms, oracle, post, Server,
};

/// The addresses of the broker and the database, or `None` (skip) when they are not configured
/// and not required.
pub(crate) fn services() -> Option<(String, String)> {
    let kafka = std::env::var("ADCLICK_TEST_KAFKA").ok().filter(|v| !v.is_empty());
    let pg = std::env::var("ADCLICK_TEST_POSTGRES").ok().filter(|v| !v.is_empty());
    match (kafka, pg) {
        (Some(k), Some(p)) => Some((k, p)),
        _ if std::env::var_os("ADCLICK_REQUIRE_SERVICES").is_some() => panic!(
            "ADCLICK_REQUIRE_SERVICES is set but ADCLICK_TEST_KAFKA / ADCLICK_TEST_POSTGRES are \
             not: start them with scripts/services (scripts/test does)"
        ),
        _ => {
            eprintln!(
                "skipped: no ADCLICK_TEST_KAFKA / ADCLICK_TEST_POSTGRES (see scripts/services)"
            );
            None
        }
    }
}

/// A fresh database on the test server, and a topic name no other test uses.
pub(crate) fn fresh(pg: &str, name: &str) -> (String, String) {
    let unique = format!("{name}_{}_{}", std::process::id(), now_ms() % 1_000_000_000);
    let mut client = postgres::Client::connect(pg, postgres::NoTls).expect("connect to postgres");
    client.batch_execute(&format!("CREATE DATABASE {unique}")).unwrap();
    let base = pg.rsplit_once('/').unwrap().0;
    (format!("{base}/{unique}"), format!("clicks-{unique}"))
}

fn config(partitions: u32, group: &str) -> String {
    format!(
        r#"
consumer_group = "{group}"
watermark_delay = "1s"
idle_timeout = "2s"
allowed_lateness = "30m"
dedup_horizon = "40m"
partitions = {partitions}
commit_interval = "200ms"
session_timeout = "6s"

[[filters]]
id = "us"
country = ["US"]

[[filters]]
id = "office"
ip = ["10.0.0.0/8", "2001:db8::/32"]
"#
    )
}

/// What every role process of one deployment shares.
pub(crate) struct Deployment {
    pub(crate) kafka: String,
    pub(crate) pg: String,
    pub(crate) topic: String,
    pub(crate) config: String,
    pub(crate) root: tempfile::TempDir,
    started: usize,
}

impl Deployment {
    pub(crate) fn new(kafka: &str, pg: &str, name: &str, partitions: u32) -> Deployment {
        let (pg, topic) = fresh(pg, name);
        let pg_db = pg.rsplit_once('/').unwrap().1.to_string();
        // A group of its own: members killed by other tests must not hold up its assignments.
        Deployment {
            kafka: kafka.into(),
            pg,
            topic,
            config: config(partitions, &format!("aggregators-{pg_db}")),
            root: tempfile::tempdir().unwrap(),
            started: 0,
        }
    }

    pub(crate) fn command(
        &mut self,
        roles: &str,
        env: &[(&str, &str)],
    ) -> (Command, std::path::PathBuf) {
        let (kafka, pg) = (self.kafka.clone(), self.pg.clone());
        self.command_with(roles, env, &kafka, &pg)
    }

    fn command_with(
        &mut self,
        roles: &str,
        env: &[(&str, &str)],
        kafka: &str,
        pg: &str,
    ) -> (Command, std::path::PathBuf) {
        self.started += 1;
        let dir = self.root.path().join(format!("{}-{roles}", self.started));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adclick.toml"), &self.config).unwrap();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_adclick"));
        cmd.arg("--config").arg(dir.join("adclick.toml")).arg("serve");
        cmd.args(["--kafka", kafka, "--postgres", pg, "--topic", &self.topic]);
        cmd.args(["--roles", roles, "--listen", "127.0.0.1:0"]);
        cmd.stdout(Stdio::piped()).stderr(log).env_remove("ADCLICK_FAULT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        (cmd, dir)
    }

    /// Starts a process running `roles` and waits until it listens.
    pub(crate) fn start(&mut self, roles: &str, env: &[(&str, &str)]) -> Server {
        let (mut cmd, dir) = self.command(roles, env);
        let mut child = cmd.spawn().expect("spawn adclick");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("{roles} did not start: {line:?}\n{log}"))
            .to_string();
        Server { child, url, dir }
    }

    pub(crate) fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.pg, postgres::NoTls).unwrap()
    }
}

impl Drop for Deployment {
    /// A failed test shows the last lines of every process's log.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if let Ok(mut c) = postgres::Client::connect(&self.pg, postgres::NoTls) {
            if let Ok(rows) = c.query(
                "SELECT partition, epoch, owner, next_offset, watermark, seq, updated_at::text, now()::text FROM adclick_partitions ORDER BY partition",
                &[],
            ) {
                for r in rows {
                    eprintln!(
                        "partition {} epoch {} owner {:?} next {} watermark {} seq {} at {} (now {})",
                        r.get::<_, i32>(0),
                        r.get::<_, i64>(1),
                        r.get::<_, Option<String>>(2),
                        r.get::<_, i64>(3),
                        r.get::<_, i64>(4),
                        r.get::<_, i64>(5),
                        r.get::<_, String>(6),
                        r.get::<_, String>(7)
                    );
                }
            }
        }
        let mut dirs: Vec<_> =
            std::fs::read_dir(self.root.path()).unwrap().flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("=== {} ===\n{tail}", dir.file_name().unwrap().to_string_lossy());
        }
    }
}

/// Posts one batch, retrying (the same lines: duplicates are deduplicated) until acknowledged.
/// Returns how many lines the collector accepted.
pub(crate) fn post_acked(url: &str, body: &[u8]) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match post(url, body) {
            Ok((200, v)) => return v["accepted"].as_i64().unwrap(),
            other => assert!(Instant::now() < deadline, "never acknowledged: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `cond` holds, polling; panics with `what` after `secs`.
pub(crate) fn await_cond(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The records reflected in the committed results, summed over partitions: every one is
/// counted, a duplicate, too late or invalid. (Not the committed offsets: those also pass the
/// aggregators' end markers.)
pub(crate) fn committed_records(client: &mut postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT coalesce(sum(counted + duplicates + too_late + invalid), 0)::bigint \
             FROM adclick_partitions",
            &[],
        )
        .unwrap()
        .get(0)
}

/// 8 partitions, 3 aggregators, a collector and a query process. During ingest one aggregator
/// is killed with SIGKILL, another joins later (rebalances) and the collector is killed and
/// restarted; every answer of the query role then equals the oracle's.
#[test]
fn roles_in_separate_processes_survive_kill_9_and_rebalances_exactly() {
    let Some((kafka, pg)) = services() else { return };
    let mut d = Deployment::new(&kafka, &pg, "multi", 8);
    let query = d.start("query", &[]);
    let mut collector = d.start("collect", &[]);
    let _a1 = d.start("aggregate", &[]);
    let mut a2 = d.start("aggregate", &[]);
    let _a3 = d.start("aggregate", &[]);
    let mut client = d.client();
    // Every aggregator owns partitions before the one killed is killed.
    await_cond(60, "three aggregators to share the partitions", || {
        let row = client
            .query_one("SELECT count(*), count(DISTINCT owner) FROM adclick_partitions", &[])
            .unwrap();
        row.get::<_, i64>(0) == 8 && row.get::<_, i64>(1) == 3
    });
    let killed = format!(":{}", a2.child.id());
    let mut late_joiner = None;
    let mut g = generator(91);
    let mut sent = Vec::new();
    for batch in 0..30 {
        match batch {
            8 => a2.kill(),
            14 => late_joiner = Some(d.start("aggregate", &[])),
            20 => {
                collector.kill();
                collector = d.start("collect", &[]);
            }
            _ => {}
        }
        let at = now_ms();
        let lines: Vec<String> = (0..300).map(|_| g.line(EventTime(at))).collect();
        post_acked(&collector.url, lines.join("\n").as_bytes());
        sent.extend(lines.into_iter().map(|l| (l, at)));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (expected, invalid) = oracle(&sent);
    assert!(
        invalid > 50 && expected.len() > 50,
        "a workload worth checking: {invalid} invalid, {} rows",
        expected.len()
    );
    assert_matches_oracle(&query, &expected);
    let late_joiner = late_joiner.unwrap();
    assert!(
        late_joiner.log().contains("assigned"),
        "the aggregator started later took partitions:\n{}",
        late_joiner.log()
    );
    let stale: i64 = client
        .query_one("SELECT count(*) FROM adclick_partitions WHERE owner LIKE '%' || $1", &[&killed])
        .unwrap()
        .get(0);
    assert_eq!(stale, 0, "the killed aggregator's partitions were claimed by others");
    // Metrics: every partition is reported by the live aggregators, the collector counted what
    // it accepted, and promtool finds nothing wrong with any of them.
    let metrics = |url: &str| {
        crate::service::agent()
            .get(format!("{url}/metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    let mut reported = std::collections::BTreeSet::new();
    for a in [&_a1, &_a3, &late_joiner] {
        let m = metrics(&a.url);
        crate::observe::promtool_check_metrics(&m);
        for l in m.lines().filter(|l| l.starts_with("adclick_partition_committed_offset{")) {
            let p = l.split('"').nth(1).unwrap().to_string();
            // The broker's end offset, asked every 5 s, beside each committed offset.
            let end = format!("adclick_partition_log_end_offset{{partition=\"{p}\"}}");
            await_cond(30, &end, || metrics(&a.url).contains(&end));
            reported.insert(p.parse::<u32>().unwrap());
        }
        assert!(m.contains("adclick_commit_duration_seconds_count"), "{m}");
    }
    assert_eq!(reported, (0..8).collect(), "committed offsets of every partition");
    let m = metrics(&collector.url);
    crate::observe::promtool_check_metrics(&m);
    let accepted: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("adclick_clicks_accepted_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(accepted > 0.0, "the restarted collector counts what it accepted");
    // The query role observes minutes turning final (its stored watermark, read each second).
    await_cond(75, "a minute turning final, seen by the query role", || {
        metrics(&query.url).lines().any(|l| {
            l.strip_prefix("adclick_minute_final_delay_seconds_count ")
                .is_some_and(|n| n.trim().parse::<f64>().unwrap() >= 1.0)
        })
    });
}

/// An aggregator stops itself (SIGSTOP) holding a processed batch, past its session timeout;
/// its partitions move to the other one, which commits newer results; resumed (SIGCONT), the
/// zombie's commit is refused by the epoch check and the results stay exact.
#[test]
fn a_zombie_aggregator_is_fenced_off() {
    let Some((kafka, pg)) = services() else { return };
    let mut d = Deployment::new(&kafka, &pg, "zombie", 4);
    let query = d.start("query", &[]);
    let collector = d.start("collect", &[]);
    // Its third commit that carries records stops it.
    let mut zombie = d.start("aggregate", &[("ADCLICK_FAULT", "aggregator.before_commit:3")]);
    let mut g = generator(17);
    let mut sent = Vec::new();
    let mut accepted = 0;
    let mut send = |n: usize, sent: &mut Vec<(String, i64)>| -> i64 {
        let mut accepted = 0;
        for _ in 0..n {
            let at = now_ms();
            let lines: Vec<String> = (0..200).map(|_| g.line(EventTime(at))).collect();
            accepted += post_acked(&collector.url, lines.join("\n").as_bytes());
            sent.extend(lines.into_iter().map(|l| (l, at)));
            std::thread::sleep(Duration::from_millis(150));
        }
        accepted
    };
    accepted += send(6, &mut sent);
    await_cond(30, "the aggregator to stop itself", || {
        zombie.log().contains("aggregator.before_commit reached")
    });
    let survivor = d.start("aggregate", &[]);
    let mut client = d.client();
    // The survivor claims every partition once the group drops the silent member.
    await_cond(60, "the survivor to own every partition", || {
        let pid = format!(":{}", survivor.child.id());
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM adclick_partitions WHERE owner LIKE '%' || $1",
                &[&pid],
            )
            .unwrap()
            .get(0);
        n == 4
    });
    accepted += send(6, &mut sent);
    // Everything sent is committed by the survivor before the zombie wakes up.
    // Only one collector, no failed request: the topic holds exactly the accepted clicks.
    let total: i64 = accepted;
    await_cond(60, "the survivor to commit everything", || committed_records(&mut client) == total);
    let pid = zombie.child.id().to_string();
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    await_cond(30, "the zombie's commit to be refused", || zombie.log().contains("fenced off"));
    send(2, &mut sent);
    let (expected, _) = oracle(&sent);
    assert_matches_oracle(&query, &expected);
    zombie.kill();
}

/// Runs `serve` with the given broker and database (and `args`) and returns its exit code and
/// stderr; fails if it takes more than `secs`.
fn refused(d: &mut Deployment, kafka: &str, pg: &str, args: &[&str], secs: u64) -> (i32, String) {
    let (mut cmd, dir) = d.command_with("collect,aggregate,query", &[], kafka, pg);
    cmd.args(args);
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("serve {args:?} did not exit within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code().unwrap_or(-1), std::fs::read_to_string(dir.join("server.log")).unwrap())
}

fn assert_refused(d: &mut Deployment, kafka: &str, pg: &str, args: &[&str], wants: &str) {
    let (code, log) = refused(d, kafka, pg, args, 40);
    assert_ne!(code, 0, "{args:?} must fail");
    assert!(log.contains(wants), "{args:?}: the error should say {wants:?}:\n{log}");
}

/// Unreachable broker or database, wrong credentials, a topic whose partition count changed:
/// each a clear error and a non-zero exit within a bounded time.
#[test]
fn bad_scale_out_configuration_is_a_clear_error_not_a_hang() {
    let Some((kafka, pg)) = services() else { return };
    let mut d = Deployment::new(&kafka, &pg, "badcfg", 4);
    let db = d.pg.clone();
    assert_refused(&mut d, "127.0.0.1:1", &db, &[], "cannot reach the brokers at 127.0.0.1:1");
    let nowhere = "postgres://postgres@127.0.0.1:1/x";
    assert_refused(
        &mut d,
        &kafka,
        nowhere,
        &["--postgres-wait", "0s"],
        "cannot connect to postgres://postgres@127.0.0.1:1/x",
    );
    let wrong_user = db.replace("postgres@", "nobody:secret@");
    let (code, log) = refused(&mut d, &kafka, &wrong_user, &[], 40);
    assert_ne!(code, 0);
    assert!(
        log.contains("nobody") && !log.contains("secret"),
        "names the user, hides the password:\n{log}"
    );
    // The topic is created with 4 partitions; a start with 8 is refused.
    let mut ok = d.start("collect", &[]);
    ok.stop();
    assert_refused(
        &mut d,
        &kafka,
        &db,
        &["--partitions", "8"],
        "has 4 partitions but partitions = 8",
    );
}

/// The partition the collector sends an ad's clicks to (`partitions` = 4).
fn partition_of_line(line: &str) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let ad = v["ad_id"].as_str()?;
    Some(adclick::event::partition_of(adclick::event::route_hash(ad), 4))
}

/// A partition that never delivered a click must not hold every minute back from final, and
/// history it receives later (a month old, a backfill) is still counted and ranked exactly:
/// its minutes' top-N come from the counts until its own engine has finalized them.
#[test]
fn an_empty_partition_then_a_backfill_into_it_stay_exact() {
    let Some((kafka, pg)) = services() else { return };
    let mut d = Deployment::new(&kafka, &pg, "backfill", 4);
    let query = d.start("query", &[]);
    let collector = d.start("collect", &[]);
    let _agg = d.start("aggregate", &[]);
    let mut g = generator(5);
    let mut sent = Vec::new();
    let mut accepted = 0;
    // Live clicks for ads of partitions 0 to 2 only.
    for _ in 0..6 {
        let at = now_ms();
        let lines: Vec<String> = (0..300)
            .map(|_| g.line(EventTime(at)))
            .filter(|l| partition_of_line(l).is_some_and(|p| p < 3))
            .collect();
        accepted += post_acked(&collector.url, lines.join("\n").as_bytes());
        sent.extend(lines.into_iter().map(|l| (l, at)));
    }
    let (live, _) = oracle(&sent);
    assert_matches_oracle(&query, &live);
    // A month-old backfill for the ads of partition 3, three minutes of it.
    let month_ago = now_ms() - 30 * 1440 * 60_000;
    // A generator of its own: its duplicates must repeat history, not the live clicks above
    // (a live click would make partition 3 judge the backfill too late, rightly); and no
    // invalid lines: its "too far in the future" ones are only an hour past this old clock.
    let mut g = adclick::generate::Generator::new(adclick::generate::GenConfig {
        invalid: 0.0,
        ..generator_config(6)
    });
    for i in 0..6 {
        let t = month_ago + i * 30_000;
        let lines: Vec<String> = (0..400)
            .map(|_| g.line(EventTime(t)))
            .filter(|l| partition_of_line(l) == Some(3))
            .collect();
        assert!(!lines.is_empty());
        accepted += post_acked(&collector.url, lines.join("\n").as_bytes());
        sent.extend(lines.into_iter().map(|l| (l, now_ms())));
    }
    // The live minutes are final, and partition 3's stored watermark follows the clock: the
    // backfill's minutes read final before it is aggregated (it then corrects them, as late
    // clicks do). So wait for its commit, then compare.
    let mut client = d.client();
    await_cond(60, "the backfill to be committed", || committed_records(&mut client) == accepted);
    let (all, _) = oracle(&sent);
    let history: std::collections::BTreeMap<_, _> = all
        .iter()
        .filter(|((m, _, _), _)| *m < month_ago / 60_000 + 10)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert!(history.len() > 10, "a backfill worth checking");
    assert_matches_oracle(&query, &history);
    // The live minutes are unchanged by the backfill.
    let recent: std::collections::BTreeMap<_, _> =
        all.into_iter().filter(|((m, _, _), _)| *m >= month_ago / 60_000 + 10).collect();
    assert_eq!(recent, live);
    assert_matches_oracle(&query, &live);
}

/// `generate --to kafka://…` produces raw NDJSON lines as any other producer would; the
/// aggregator validates them itself: counts equal the oracle's, invalid lines are counted as
/// invalid, none is lost.
#[test]
fn raw_lines_from_another_producer_are_validated_and_counted_exactly() {
    let Some((kafka, pg)) = services() else { return };
    let mut d = Deployment::new(&kafka, &pg, "rawlines", 4);
    let query = d.start("query", &[]); // creates the topic
    let _agg = d.start("aggregate", &[]);
    let start = (now_ms() - 120_000).to_string();
    let args = [
        "generate",
        "--seed",
        "3",
        "--count",
        "3000",
        "--start",
        &start,
        "--ads",
        "30",
        "--invalid",
        "0.03",
        "--duplicates",
        "0.05",
        "--late",
        "0",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(args)
        .args(["--to", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let at = now_ms();
    let sent: Vec<(String, i64)> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| (l.to_string(), at)).collect();
    let to = format!("kafka://{}/{}", d.kafka, d.topic);
    let status = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(args)
        .args(["--to", &to])
        .status()
        .unwrap();
    assert!(status.success(), "generate to Kafka");
    // `generate` also writes a share of clicks far too late (more than 30 minutes behind):
    // the live path rightly does not count those (the archive would); the oracle leaves them out.
    let too_late_before = now_ms() - 20 * 60_000;
    let on_time: Vec<(String, i64)> = sent
        .iter()
        .filter(|(l, at)| {
            let v = adclick::event::Validation { now: EventTime(*at), max_skew_ms: 300_000 };
            !matches!(adclick::event::parse_line(l.as_bytes(), v), Ok(Some(c)) if c.time.0 < too_late_before)
        })
        .cloned()
        .collect();
    assert!(on_time.len() < sent.len(), "the workload has too-late clicks");
    let (expected, invalid) = oracle(&on_time);
    assert!(invalid > 30 && expected.len() > 50);
    let mut client = d.client();
    await_cond(60, "every line to be committed", || {
        committed_records(&mut client) == sent.len() as i64
    });
    assert_matches_oracle(&query, &expected);
    let counted: i64 = client
        .query_one("SELECT sum(invalid)::bigint FROM adclick_partitions", &[])
        .unwrap()
        .get(0);
    assert_eq!(counted, invalid as i64, "every invalid line counted as invalid");
    // One click sent twice, its ad_id once a number and once a string: one ad, one partition,
    // counted once.
    let t = now_ms() - 30_000;
    let twice = [
        format!(r#"{{"ad_id":987654,"click_timestamp":{t},"click_id":"twice"}}"#),
        format!(r#"{{"ad_id":"987654","click_timestamp":{t},"click_id":"twice"}}"#),
    ];
    let producer =
        adclick::scaleout::kafka::LineProducer::connect(&format!("{}/{}", d.kafka, d.topic))
            .unwrap();
    producer.send(&twice).unwrap();
    let total = sent.len() as i64 + 2;
    await_cond(60, "the two lines to be committed", || committed_records(&mut client) == total);
    let minute = t / 60_000 * 60_000;
    let (_, v) =
        query.get(&format!("/v1/ads/987654/aggregated_count?from={minute}&to={}", minute + 60_000));
    assert_eq!(v["count"], 1, "{v}");
}

/// `ship --to kafka://…` validates as the collector would: invalid lines go to its dead-letter
/// file with their reason, the rest reach the topic and are counted exactly.
#[test]
fn ship_to_kafka_dead_letters_invalid_lines_and_counts_the_rest_exactly() {
    let Some((kafka, pg)) = services() else { return };
    let mut d = Deployment::new(&kafka, &pg, "ship", 4);
    let query = d.start("query", &[]); // creates the topic
    let _agg = d.start("aggregate", &[]);
    let mut g = generator(23);
    let at = now_ms();
    let sent: Vec<(String, i64)> = (0..2500).map(|_| (g.line(EventTime(at)), at)).collect();
    let file = d.root.path().join("clicks.ndjson");
    let text: String = sent.iter().map(|(l, _)| format!("{l}\n")).collect();
    std::fs::write(&file, text).unwrap();
    let state = d.root.path().join("ship-state");
    let to = format!("kafka://{}/{}", d.kafka, d.topic);
    let status = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(["ship", "--once", "--follow"])
        .arg(&file)
        .args(["--to", &to, "--state-dir"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(status.success());
    let (expected, invalid) = oracle(&sent);
    assert!(invalid > 20);
    let dead = std::fs::read_to_string(state.join("dead-letter.ndjson")).unwrap();
    assert_eq!(dead.lines().count(), invalid, "exactly the invalid lines are dead letters");
    assert!(dead.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["error"]
        .as_str()
        .is_some_and(|e| !e.is_empty())));
    let mut client = d.client();
    let valid = (sent.len() - invalid) as i64;
    await_cond(60, "the shipped lines to be committed", || committed_records(&mut client) == valid);
    assert_matches_oracle(&query, &expected);
}

#[test]
fn the_archive_role_holds_exactly_the_accepted_clicks_across_kill_9_and_a_takeover() {
    let Some((kafka, pg)) = services() else { return };
    let mut d = Deployment::new(&kafka, &pg, "archiver", 4);
    let dir = d.root.path().join("archive");
    d.config = format!(
        "archive = {:?}\narchive_flush_interval = \"300ms\"\narchive_file_rows = 300\n{}",
        dir.to_str().unwrap(),
        d.config
    );
    let collector = d.start("collect", &[]); // creates the topic

    // The first archiver aborts (as kill -9 would) in its 4th file, mid-flush; the second stands
    // by until the first's session, and with it the lock, is gone, then redoes that flush.
    let mut first = d.start("archive", &[("ADCLICK_FAULT", "archive.mid_flush:4")]);
    let log = first.dir.join("server.log");
    await_cond(30, "the first archiver to take the lock", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("archiving the topic")
    });
    let _second = d.start("archive", &[]);
    let mut expected: Vec<String> = Vec::new();
    let mut records = 0i64;
    let mut g = generator(31);
    for _ in 0..12 {
        let at = now_ms();
        let lines: Vec<String> = (0..250).map(|_| g.line(EventTime(at))).collect();
        let v = adclick::event::Validation { now: EventTime(at), max_skew_ms: 300_000 };
        for l in &lines {
            if let Ok(Some(c)) = adclick::event::parse_line(l.as_bytes(), v) {
                expected.push(crate::archive::click_key(&c));
            }
        }
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        records += post_acked(&collector.url, body.as_bytes());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Raw lines from another producer: the archiver validates them; the invalid ones are not
    // archived.
    let start = now_ms().to_string();
    let args = ["generate", "--seed", "5", "--count", "1000", "--ads", "20", "--invalid", "0.05"];
    let out = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(args)
        .args(["--start", &start, "--to", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let raw = String::from_utf8(out.stdout).unwrap();
    let v = adclick::event::Validation { now: EventTime(now_ms()), max_skew_ms: 300_000 };
    let mut raw_invalid = 0;
    for l in raw.lines() {
        match adclick::event::parse_line(l.as_bytes(), v) {
            Ok(Some(c)) => expected.push(crate::archive::click_key(&c)),
            _ => raw_invalid += 1,
        }
    }
    assert!(raw_invalid > 20, "the raw lines must hold invalid ones");
    let status = Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(args)
        .args(["--start", &start, "--to", &format!("kafka://{}/{}", d.kafka, d.topic)])
        .status()
        .unwrap();
    assert!(status.success(), "generate to Kafka");
    records += raw.lines().count() as i64;
    await_cond(60, "the first archiver to abort at its fault point", || {
        first.child.try_wait().unwrap().is_some()
    });
    let mut client = d.client();
    let mut archived = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while archived != records {
        assert!(Instant::now() < deadline, "archived {archived} of {records} records");
        std::thread::sleep(Duration::from_millis(100));
        archived = client
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM adclick_archive_offsets",
                &[],
            )
            .unwrap()
            .get(0);
    }
    let pending: Option<i64> =
        client.query_one("SELECT pending_seq FROM adclick_archive", &[]).unwrap().get(0);
    assert_eq!(pending, None, "a flush left in progress");
    // Each (partition, offset) once (read_archive panics on a second), and exactly the
    // accepted clicks.
    let mut got: Vec<String> = crate::archive::read_archive(&dir).into_values().collect();
    got.sort();
    expected.sort();
    assert_eq!(got.len(), expected.len(), "archived rows");
    assert_eq!(got, expected, "the archived clicks");
}
