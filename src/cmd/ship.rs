//! `adclick ship`: the log watcher (SPEC §4). Follows NDJSON files that ad servers write and
//! sends their lines to a collector, exactly as written, nothing lost across crashes.
//!
//! ```text
//! poll: expand --follow globs ─▶ per file (by device + inode): read complete lines from its
//!       position (rotation by rename: the old inode is drained through its open handle;
//!       truncation: back to the start)
//!   ─▶ batch ─▶ pending/<seq>.ndjson (fsync) ─▶ state.json: positions + next seq (atomic)
//!   ─▶ POST /v1/clicks until acknowledged ─▶ rejected lines to dead-letter.ndjson (fsync)
//!      (or, to Kafka: validated here, invalid lines dead-lettered, the rest produced until
//!      every broker acknowledged)
//!   ─▶ pending file removed
//! ```
//!
//! A line is read only once its newline is written. Positions advance only together with a
//! durable pending batch, and a pending batch is removed only after the collector acknowledged
//! it, so a crash at any point re-sends at most the batch in flight: the collector deduplicates
//! resent clicks by identity (SPEC §1). A restart first re-sends every pending batch, then
//! goes on from the saved positions. Lines the collector rejects, lines that are not UTF-8 and
//! lines over 64 KiB go to `<state-dir>/dead-letter.ndjson` (see [`DeadLetter`]). A crash
//! between writing dead letters and removing the batch can write those dead letters twice; it
//! never loses one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::scaleout::kafka::LineProducer;

#[derive(Args, Debug, Clone)]
pub struct ShipArgs {
    /// Files to follow: paths or globs (quote them), e.g. '/var/log/ads/clicks*.ndjson'.
    #[arg(long, required = true, num_args = 1..)]
    pub follow: Vec<String>,
    /// The collector: its base URL (http://host:port) or the full /v1/clicks URL; or Kafka,
    /// kafka://host:port[,host:port]/topic (lines are validated here, the invalid ones
    /// dead-lettered, the rest sent as written, keyed by ad_id).
    #[arg(long)]
    pub to: String,
    /// Where positions, unacknowledged batches and dead letters are kept.
    #[arg(long, default_value = "./adclick-ship")]
    pub state_dir: PathBuf,
    /// Lines per request (at most 1000, so that every rejected line is listed in the answer).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// How often the files are checked for new lines.
    #[arg(long, default_value = "200ms")]
    pub poll: String,
    /// Send what the files hold now, then exit (a backfill), instead of following them.
    #[arg(long)]
    pub once: bool,
}

/// The collector's `/v1/clicks` URL, from a base URL or the full one.
pub fn clicks_url(to: &str) -> anyhow::Result<String> {
    if to.starts_with("https://") {
        bail!("--to: https is not supported; use http:// on a trusted network");
    }
    if !to.starts_with("http://") {
        bail!("--to: {to:?} is not an http:// URL");
    }
    let base = to.trim_end_matches('/');
    Ok(if base.ends_with("/v1/clicks") { base.to_string() } else { format!("{base}/v1/clicks") })
}

/// A line that cannot be counted, with why: (line, error).
/// A line that is not sent, kept byte for byte up to [`DEAD_LETTER_BYTES`], as one line of
/// `dead-letter.ndjson`: `{"line": text, "error": why, "bytes": its length}`, with
/// `"line_base64"` instead of `"line"` when it is not UTF-8, and `"truncated": true` when it is
/// longer than the bound (then only its first bytes are kept; `bytes` is still its length).
struct DeadLetter {
    kept: Vec<u8>,
    len: usize,
    error: String,
}

/// Most bytes of one dead letter kept; longer lines keep their start.
const DEAD_LETTER_BYTES: usize = READ_CHUNK;

impl DeadLetter {
    fn new(line: &[u8], error: impl Into<String>) -> DeadLetter {
        let kept = line[..line.len().min(DEAD_LETTER_BYTES)].to_vec();
        DeadLetter { kept, len: line.len(), error: error.into() }
    }

    fn json(&self) -> serde_json::Value {
        use base64::Engine;
        let truncated = self.len > self.kept.len();
        // A cut may split a character: the text up to it is still the line's text.
        let text = match std::str::from_utf8(&self.kept) {
            Ok(s) => Some(s),
            Err(e) if truncated && e.error_len().is_none() => {
                std::str::from_utf8(&self.kept[..e.valid_up_to()]).ok()
            }
            Err(_) => None,
        };
        let mut v = serde_json::json!({ "error": self.error, "bytes": self.len });
        match text {
            Some(t) => v["line"] = t.into(),
            None => {
                v["line_base64"] =
                    base64::engine::general_purpose::STANDARD.encode(&self.kept).into()
            }
        }
        if truncated {
            v["truncated"] = true.into();
        }
        v
    }
}

/// Longest line sent (SPEC §1); longer ones are dead letters.
const MAX_LINE: usize = 65_536;
const READ_CHUNK: usize = 1 << 20;

#[derive(Serialize, Deserialize, Default, Debug)]
struct State {
    files: Vec<FilePos>,
    next_batch: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct FilePos {
    path: PathBuf,
    dev: u64,
    ino: u64,
    offset: u64,
}

struct Followed {
    pos: FilePos,
    file: File,
    /// Still matched by a --follow pattern at the last poll.
    present: bool,
}

struct Shipper {
    args: ShipArgs,
    url: String,
    agent: ureq::Agent,
    /// Set when shipping to Kafka instead of a collector.
    kafka: Option<LineProducer>,
    files: HashMap<(u64, u64), Followed>,
    next_batch: u64,
    pending_dir: PathBuf,
    dead_letters: File,
    sent_lines: u64,
    dead: u64,
}

pub fn run(args: ShipArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=1000).contains(&args.batch), "--batch: must be between 1 and 1000");
    let poll = humantime::parse_duration(&args.poll)
        .map_err(|e| anyhow::anyhow!("--poll: {:?} is not a duration ({e})", args.poll))?;
    let kafka = match args.to.strip_prefix("kafka://") {
        Some(rest) => Some(LineProducer::connect(rest)?),
        None => None,
    };
    let url = if kafka.is_some() { String::new() } else { clicks_url(&args.to)? };
    std::fs::create_dir_all(args.state_dir.join("pending"))
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let dead_letters = OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.state_dir.join("dead-letter.ndjson"))
        .context("opening dead-letter.ndjson")?;
    let state: State = match std::fs::read(args.state_dir.join("state.json")) {
        Ok(b) => serde_json::from_slice(&b).context("state.json is corrupt")?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
        Err(e) => return Err(e).context("reading state.json"),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut s = Shipper {
        kafka,
        pending_dir: args.state_dir.join("pending"),
        url,
        agent,
        files: HashMap::new(),
        next_batch: state.next_batch,
        dead_letters,
        sent_lines: 0,
        dead: 0,
        args,
    };
    for mut pos in state.files {
        // The file may have been rotated (renamed) while the shipper was down: look for its
        // inode in its directory.
        match find_inode(&pos) {
            Some((path, file)) => {
                pos.path = path;
                s.files.insert((pos.dev, pos.ino), Followed { pos, file, present: true });
            }
            None => tracing::warn!(
                path = %pos.path.display(),
                "a followed file is gone since the last run; its unread lines cannot be sent"
            ),
        }
    }
    s.resend_pending()?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        s.discover()?;
        let sent = s.ship_available()?;
        if progress && last_report.elapsed() >= Duration::from_millis(500) {
            last_report = Instant::now();
            eprint!(
                "\rshipped {} lines ({} dead letters) from {} files, {:.0}/s   ",
                s.sent_lines,
                s.dead,
                s.files.len(),
                s.sent_lines as f64 / started.elapsed().as_secs_f64()
            );
        }
        if sent == 0 {
            if s.args.once {
                break;
            }
            std::thread::sleep(poll);
        }
    }
    if progress {
        eprintln!();
    }
    eprintln!("adclick ship: sent {} lines, {} dead letters", s.sent_lines, s.dead);
    Ok(())
}

impl Shipper {
    /// Matches the patterns: new files are followed from their start; a known inode moved
    /// (rotation by rename) keeps its position; files no longer matched are drained and dropped.
    fn discover(&mut self) -> anyhow::Result<()> {
        for f in self.files.values_mut() {
            f.present = false;
        }
        for pattern in &self.args.follow {
            let paths: Vec<PathBuf> = match glob::glob(pattern) {
                Ok(paths) => paths.filter_map(Result::ok).collect(),
                Err(e) => bail!("--follow {pattern:?}: {e}"),
            };
            for path in paths {
                let Ok(file) = File::open(&path) else { continue };
                let meta = file.metadata()?;
                if !meta.is_file() {
                    continue;
                }
                let key = (meta.dev(), meta.ino());
                match self.files.get_mut(&key) {
                    Some(f) => {
                        f.present = true;
                        f.pos.path = path;
                    }
                    None => {
                        tracing::info!(path = %path.display(), "following");
                        let pos = FilePos { path, dev: key.0, ino: key.1, offset: 0 };
                        self.files.insert(key, Followed { pos, file, present: true });
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads and sends every complete line available; returns how many lines it sent.
    fn ship_available(&mut self) -> anyhow::Result<u64> {
        let mut total = 0;
        loop {
            let (lines, dead) = self.read_batch()?;
            if lines.is_empty() && dead.is_empty() {
                break;
            }
            self.write_dead(&dead)?;
            if lines.is_empty() {
                self.save_state()?;
                continue;
            }
            let seq = self.next_batch;
            self.next_batch += 1;
            let path = self.pending_dir.join(format!("{seq:012}.ndjson"));
            write_durably(&path, lines.join("\n").as_bytes())?;
            self.save_state()?;
            self.send(&path, &lines)?;
            total += lines.len() as u64;
        }
        // Drop files no pattern matches any more, once drained.
        self.files.retain(|_, f| f.present);
        Ok(total)
    }

    /// Up to `batch` complete lines across the files, advancing their positions in memory.
    fn read_batch(&mut self) -> anyhow::Result<(Vec<String>, Vec<DeadLetter>)> {
        let mut lines = Vec::new();
        let mut dead = Vec::new();
        let mut keys: Vec<_> = self.files.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            let f = self.files.get_mut(&key).expect("listed");
            let size = f.file.metadata()?.len();
            if size < f.pos.offset {
                tracing::warn!(path = %f.pos.path.display(), "truncated; reading it from the start");
                f.pos.offset = 0;
            }
            while lines.len() < self.args.batch && f.pos.offset < size {
                let want = (size - f.pos.offset).min(READ_CHUNK as u64) as usize;
                let mut buf = vec![0u8; want];
                f.file.seek(SeekFrom::Start(f.pos.offset))?;
                f.file.read_exact(&mut buf)?;
                let mut at = 0;
                while lines.len() < self.args.batch {
                    let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') else { break };
                    let line = &buf[at..at + nl];
                    at += nl + 1;
                    if line.len() > MAX_LINE {
                        dead.push(DeadLetter::new(line, too_long()));
                    } else {
                        match std::str::from_utf8(line) {
                            Ok(l) => lines.push(l.to_string()),
                            Err(_) => dead.push(DeadLetter::new(line, "line is not UTF-8")),
                        }
                    }
                }
                if at == 0 && want == READ_CHUNK {
                    // No newline in a whole chunk: a line over the bound. Its start is kept, its
                    // length counted up to its newline (not yet written: wait for it).
                    match line_end(&mut f.file, f.pos.offset + want as u64, size)? {
                        Some(len) => {
                            let mut letter = DeadLetter::new(&buf, too_long());
                            letter.len = want + len as usize;
                            dead.push(letter);
                            at = want + len as usize + 1;
                        }
                        None => break,
                    }
                }
                f.pos.offset += at as u64;
                if at == 0 {
                    break; // an unfinished last line: wait for its newline
                }
            }
            if lines.len() >= self.args.batch {
                break;
            }
        }
        Ok((lines, dead))
    }

    fn save_state(&self) -> anyhow::Result<()> {
        let state = State {
            files: self.files.values().map(|f| f.pos.clone()).collect(),
            next_batch: self.next_batch,
        };
        write_durably(&self.args.state_dir.join("state.json"), &serde_json::to_vec(&state)?)
    }

    /// Re-sends the batches a previous run left unacknowledged, oldest first.
    fn resend_pending(&mut self) -> anyhow::Result<()> {
        let mut pending: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.pending_dir)?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let seq = name.strip_suffix(".ndjson")?.parse().ok()?;
                Some((seq, e.path()))
            })
            .collect();
        pending.sort();
        for (seq, path) in pending {
            if seq >= self.next_batch {
                // Written, but its positions were never saved: its lines are read again.
                std::fs::remove_file(&path)?;
                continue;
            }
            let body = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let lines: Vec<String> = body.split('\n').map(String::from).collect();
            tracing::info!(batch = seq, lines = lines.len(), "re-sending an unacknowledged batch");
            self.send(&path, &lines)?;
        }
        Ok(())
    }

    /// Kafka: validates here as the collector would (default clock skew), dead-letters the
    /// invalid lines, sends the rest until acknowledged, then removes the batch.
    fn send_kafka(&mut self, path: &Path, lines: &[String]) -> anyhow::Result<()> {
        let k = self.kafka.as_ref().expect("a Kafka target");
        let v = crate::event::Validation {
            now: crate::event::EventTime::now(),
            max_skew_ms: 5 * 60_000,
        };
        let mut valid = Vec::with_capacity(lines.len());
        let mut dead = Vec::new();
        for line in lines {
            match crate::event::parse_line(line.as_bytes(), v) {
                Ok(Some(_)) => valid.push(line.clone()),
                Ok(None) => {} // blank
                Err(e) => dead.push(DeadLetter::new(line.as_bytes(), e.to_string())),
            }
        }
        let mut delay = Duration::from_millis(100);
        while let Err(e) = k.send(&valid) {
            tracing::warn!("{e}; re-sending");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        self.write_dead(&dead)?;
        self.sent_lines += lines.len() as u64;
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        Ok(())
    }

    /// Sends a pending batch until the collector answers it, dead-letters what it rejected,
    /// then removes the batch.
    fn send(&mut self, path: &Path, lines: &[String]) -> anyhow::Result<()> {
        if self.kafka.is_some() {
            return self.send_kafka(path, lines);
        }
        let body = lines.join("\n");
        let mut delay = Duration::from_millis(100);
        let answer: serde_json::Value = loop {
            let r = self
                .agent
                .post(&self.url)
                .header("content-type", "application/x-ndjson")
                .send(body.as_bytes());
            match r {
                Ok(r) if r.status().is_success() => {
                    let text = r.into_body().read_to_string().context("the collector's answer")?;
                    break serde_json::from_str(&text).context("the collector's answer")?;
                }
                Ok(r) if r.status().is_client_error() && r.status() != 429 => {
                    // The whole batch refused (e.g. too large): every line is a dead letter.
                    let status = r.status();
                    let why = r.into_body().read_to_string().unwrap_or_default();
                    let dead: Vec<_> = lines
                        .iter()
                        .map(|l| {
                            let why = format!("the collector refused the batch: {status} {why}");
                            DeadLetter::new(l.as_bytes(), why)
                        })
                        .collect();
                    self.write_dead(&dead)?;
                    break serde_json::json!({"accepted": 0, "rejected": []});
                }
                Ok(r) => tracing::warn!("collector answered {}; re-sending", r.status()),
                Err(e) => tracing::warn!("collector unreachable ({e}); re-sending"),
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        let mut dead = Vec::new();
        for r in answer["rejected"].as_array().into_iter().flatten() {
            let i = r["line"].as_u64().unwrap_or(0) as usize;
            if let Some(line) = i.checked_sub(1).and_then(|i| lines.get(i)) {
                let why = r["error"].as_str().unwrap_or("rejected");
                dead.push(DeadLetter::new(line.as_bytes(), why));
            }
        }
        let listed = dead.len() as u64;
        let total = answer["rejected_total"].as_u64().unwrap_or(listed);
        anyhow::ensure!(
            total == listed,
            "the collector rejected {total} lines but listed {listed}"
        );
        self.write_dead(&dead)?;
        self.sent_lines += lines.len() as u64;
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        Ok(())
    }

    fn write_dead(&mut self, dead: &[DeadLetter]) -> anyhow::Result<()> {
        if dead.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for letter in dead {
            serde_json::to_writer(&mut out, &letter.json())?;
            out.push(b'\n');
        }
        self.dead_letters.write_all(&out)?;
        self.dead_letters.sync_data().context("syncing dead-letter.ndjson")?;
        self.dead += dead.len() as u64;
        Ok(())
    }
}

/// The file with `pos`'s device and inode: at its path, or renamed within its directory.
fn find_inode(pos: &FilePos) -> Option<(PathBuf, File)> {
    let same = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == (pos.dev, pos.ino) && m.is_file())
    };
    let path = if same(&pos.path) {
        pos.path.clone()
    } else {
        let dir = pos.path.parent()?;
        std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| same(p))?
    };
    let file = File::open(&path).ok()?;
    let m = file.metadata().ok()?;
    ((m.dev(), m.ino()) == (pos.dev, pos.ino)).then_some((path, file))
}

fn too_long() -> String {
    format!("line is longer than {MAX_LINE} bytes")
}

/// Bytes from `from` to the next newline of `file` (below `size`), or `None` when none is
/// written yet.
fn line_end(file: &mut File, from: u64, size: u64) -> anyhow::Result<Option<u64>> {
    let mut at = from;
    let mut buf = vec![0u8; READ_CHUNK];
    file.seek(SeekFrom::Start(from))?;
    while at < size {
        let n = ((size - at) as usize).min(READ_CHUNK);
        file.read_exact(&mut buf[..n])?;
        if let Some(nl) = buf[..n].iter().position(|&b| b == b'\n') {
            return Ok(Some(at + nl as u64 - from));
        }
        at += n as u64;
    }
    Ok(None)
}

/// Writes a file whole: temporary name, fsync, rename, directory fsync.
fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
