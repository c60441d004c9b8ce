//! The scale-out aggregator: a consumer-group member that runs one engine per Kafka partition
//! it owns and commits each partition's results, position and checkpoint to PostgreSQL in one
//! transaction.
//!
//! ```text
//!  poll (≤ commit_interval) ──▶ per owned partition: records buffered in offset order
//!     │  rebalance callback: claim (epoch + 1, stored offset, checkpoint files), or revoke
//!     │  (what is buffered is committed, then the partition dropped)
//!     ▼
//!  per partition with records (or a due watermark tick):
//!     Engine::process(wall, records) → Engine::checkpoint() (what changed since the last one)
//!     → pg::commit: epoch check, counts, tops, checkpoint file, next offset, watermark
//! ```
//!
//! A partition's state depends only on its own records and on the decisions its owners
//! committed, never on which process owns which other partitions, so a rebalance cannot change
//! an answer. A checkpoint goes with every commit, so a new owner restores the state exactly as
//! committed and resumes at the committed offset; no journal replay is needed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::Message;

use crate::config::Settings;
use crate::engine::{Engine, EngineConfig, Extent, Offset, PartitionId, Payload, Record};
use crate::event::EventTime;
use crate::filter::Filters;
use crate::pipeline::now_ms;
use crate::scaleout::kafka::{self, Change, GroupContext};
use crate::scaleout::{fatal, pg, ScaleOut, WIRE_MAGIC};

/// Most records buffered across partitions before a round of commits.
const MAX_BUFFERED: usize = 200_000;

/// One owned partition.
struct Owned {
    engine: Engine,
    epoch: i64,
    /// The offset of the next record to process.
    next: i64,
    seq: u64,
    /// The checkpoint files the state restores from: (seq, extent).
    manifest: Vec<(u64, Extent)>,
    buf: Vec<(i64, Vec<u8>)>,
    last_commit: Instant,
    assigned_at: Instant,
}

pub struct Aggregator {
    settings: Settings,
    config: EngineConfig,
    filters: Arc<Filters>,
    owned: BTreeMap<PartitionId, Owned>,
    client: postgres::Client,
    days: pg::Days,
}

impl Aggregator {
    pub fn new(settings: &Settings, scale: &ScaleOut) -> anyhow::Result<Aggregator> {
        let config = EngineConfig { shards: 1, ..settings.engine.clone() };
        Ok(Aggregator {
            settings: settings.clone(),
            config,
            filters: Arc::new(settings.filters.clone()),
            owned: BTreeMap::new(),
            client: pg::connect(&scale.postgres)?,
            days: pg::Days::new(),
        })
    }

    /// Consumes until `shutdown`, then commits what it holds.
    pub fn run(mut self, scale: &ScaleOut, shutdown: &AtomicBool) -> anyhow::Result<()> {
        let owner = format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "adclick".into()),
            std::process::id()
        );
        let ctx = GroupContext {
            claims: Mutex::new(pg::connect(&scale.postgres)?),
            owner,
            changes: Mutex::new(Vec::new()),
        };
        let consumer = kafka::consumer(
            &scale.brokers,
            &scale.group,
            &scale.topic,
            ctx,
            scale.session_timeout,
        )?;
        let interval = self.settings.commit_interval;
        loop {
            crate::fault::stall("aggregator.stall");
            let stopping = shutdown.load(Ordering::Acquire);
            let started = Instant::now();
            let mut buffered = 0usize;
            while !stopping && buffered < MAX_BUFFERED {
                let left = interval.saturating_sub(started.elapsed());
                if left.is_zero() {
                    break;
                }
                let polled = consumer.poll(left);
                self.apply_changes(&consumer.context().changes);
                match polled {
                    None => {}
                    Some(Ok(m)) => {
                        let p = PartitionId(m.partition() as u32);
                        if let Some(o) = self.owned.get_mut(&p) {
                            if m.offset() >= o.next {
                                o.buf.push((m.offset(), m.payload().unwrap_or(&[]).to_vec()));
                                buffered += 1;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        use rdkafka::types::RDKafkaErrorCode as Code;
                        // Settings the group refuses do not heal by waiting.
                        if matches!(
                            e.rdkafka_error_code(),
                            Some(
                                Code::InvalidSessionTimeout
                                    | Code::GroupAuthorizationFailed
                                    | Code::TopicAuthorizationFailed
                            )
                        ) {
                            fatal(
                                "kafka refused this consumer (check session_timeout and ACLs)",
                                e,
                            );
                        }
                        tracing::warn!("kafka: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            self.commit_round(stopping);
            self.empty_partitions(&consumer, &scale.topic);
            if stopping {
                return Ok(());
            }
        }
    }

    fn apply_changes(&mut self, changes: &Mutex<Vec<Change>>) {
        let changes = std::mem::take(&mut *changes.lock().expect("not poisoned"));
        for change in changes {
            match change {
                Change::Revoked(p) => {
                    // What is buffered is committed now, so that the next owner need not read
                    // it again (if it has claimed the partition already, this is fenced off and
                    // it reads from the committed offset: correct either way).
                    if let Some(mut o) = self.owned.remove(&p) {
                        if !o.buf.is_empty() {
                            commit_one(&mut self.client, &mut self.days, p, &mut o, now_ms());
                        }
                    }
                }
                Change::Assigned(p, claim) => match self.restore(p, claim) {
                    Ok(o) => {
                        self.owned.insert(p, o);
                    }
                    Err(e) => fatal("restoring a partition's state", e),
                },
            }
        }
    }

    fn restore(&self, p: PartitionId, claim: pg::Claim) -> anyhow::Result<Owned> {
        let started = Instant::now();
        let mut engine = if claim.files.is_empty() {
            Engine::new(self.config.clone(), self.filters.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))?
        } else {
            let files: Vec<&[u8]> = claim.files.iter().map(|(_, _, b)| b.as_slice()).collect();
            Engine::restore_chain(self.config.clone(), self.filters.clone(), &files)
                .map_err(|e| anyhow::anyhow!("partition {}: checkpoint: {e}", p.0))?
        };
        if let Some(next) = engine.offsets().iter().find(|(q, _)| *q == p).map(|(_, o)| o.0) {
            anyhow::ensure!(
                next as i64 <= claim.next_offset,
                "partition {}: the checkpoint is at offset {next}, past the committed {}",
                p.0,
                claim.next_offset
            );
        }
        // Holds the watermark back from now until it delivers or idles (SPEC §2); committed
        // with the next checkpoint like every other decision.
        engine.assign(&[p], EventTime(now_ms()));
        let seq = claim.files.last().map_or(1, |(s, _, _)| s + 1);
        tracing::info!(
            partition = p.0,
            files = claim.files.len(),
            restore_ms = started.elapsed().as_millis() as u64,
            "partition state restored"
        );
        Ok(Owned {
            engine,
            epoch: claim.epoch,
            next: claim.next_offset,
            seq,
            manifest: claim.files.iter().map(|(s, e, _)| (*s, *e)).collect(),
            buf: Vec::new(),
            last_commit: Instant::now(),
            assigned_at: Instant::now(),
        })
    }

    /// Processes and commits every partition that has records or a watermark step due.
    fn commit_round(&mut self, stopping: bool) {
        let wall = now_ms();
        let mut fenced = Vec::new();
        for (&p, o) in self.owned.iter_mut() {
            if o.buf.is_empty() && !stopping {
                let current = o.engine.watermark();
                let next = o.engine.peek_watermark(EventTime(wall));
                let minute = |w: crate::engine::Watermark| w.ms().map(|w| w.div_euclid(60_000));
                let due = next != current
                    && (minute(next) > minute(current)
                        || o.last_commit.elapsed() >= Duration::from_secs(1));
                if !due {
                    continue;
                }
            }
            if !commit_one(&mut self.client, &mut self.days, p, o, wall) {
                fenced.push(p);
            }
        }
        for p in fenced {
            self.owned.remove(&p);
        }
    }
}

impl Aggregator {
    /// A partition that never delivered a valid click keeps its engine's watermark at none (a
    /// first click may be history of any age). Once it has been quiet for `idle_timeout` since
    /// its assignment and nothing is left to read from Kafka, its stored watermark follows the
    /// wall clock (minus `watermark_delay`), so that it does not hold every minute of the other
    /// partitions back from final. A click arriving later for such a partition is still counted
    /// (its engine judges nothing too late), correcting minutes already reported final.
    fn empty_partitions(
        &mut self,
        consumer: &rdkafka::consumer::BaseConsumer<GroupContext>,
        topic: &str,
    ) {
        let idle = Duration::from_millis(self.config.idle_timeout_ms as u64);
        let delay = self.config.watermark_delay_ms;
        let mut fenced = Vec::new();
        for (&p, o) in self.owned.iter_mut() {
            if o.engine.watermark() != crate::engine::Watermark::NONE
                || !o.buf.is_empty()
                || o.assigned_at.elapsed() < idle
                || o.last_commit.elapsed() < Duration::from_secs(1)
            {
                continue;
            }
            let high = match consumer.fetch_watermarks(topic, p.0 as i32, Duration::from_secs(5)) {
                Ok((_, high)) => high,
                Err(e) => {
                    tracing::warn!(partition = p.0, "kafka: reading the end offset: {e}");
                    continue;
                }
            };
            if high > o.next {
                continue;
            }
            let w = crate::engine::Watermark::at(now_ms() - delay);
            match pg::empty_watermark(&mut self.client, p, o.epoch, w) {
                Ok(()) => o.last_commit = Instant::now(),
                Err(pg::PgError::Fenced(..)) => fenced.push(p),
                Err(e) => fatal("committing a watermark", e),
            }
        }
        for p in fenced {
            tracing::warn!(partition = p.0, "fenced off: another aggregator owns it now");
            self.owned.remove(&p);
        }
    }
}

/// Processes a partition's buffered records and commits them with its checkpoint; false when
/// the partition is fenced off (another aggregator claimed it), and the caller drops it.
fn commit_one(
    client: &mut postgres::Client,
    days: &mut pg::Days,
    p: PartitionId,
    o: &mut Owned,
    wall: i64,
) -> bool {
    let buf = std::mem::take(&mut o.buf);
    let records: Vec<Record<'_>> = buf
        .iter()
        .map(|(offset, bytes)| Record {
            partition: p,
            offset: Offset(*offset as u64),
            payload: payload(bytes),
        })
        .collect();
    let output = o.engine.process(EventTime(wall), &records);
    let next = buf.last().map_or(o.next, |(off, _)| off + 1);
    let (bytes, extent) = o.engine.checkpoint();
    let mut dropped = Vec::new();
    o.manifest.retain(|(seq, e)| {
        let keep = o.engine.retains(*e);
        if !keep {
            dropped.push(*seq);
        }
        keep
    });
    let commit = pg::Commit {
        partition: p,
        epoch: o.epoch,
        next_offset: next,
        output: &output,
        checkpoint: (o.seq, extent, &bytes),
        dropped: &dropped,
    };
    if !buf.is_empty() {
        crate::fault::pause("aggregator.before_commit");
    }
    match pg::commit(client, days, &commit) {
        Ok(()) => {
            o.manifest.push((o.seq, extent));
            o.seq += 1;
            o.next = next;
            o.last_commit = Instant::now();
            true
        }
        Err(pg::PgError::Fenced(..)) => {
            tracing::warn!(
                partition = p.0,
                epoch = o.epoch,
                "fenced off: another aggregator owns this partition now; dropping it"
            );
            false
        }
        Err(e) => fatal("committing results", e),
    }
}

/// A record's value: the collector's validated click (`WIRE_MAGIC` + `event::wire`), or else
/// an NDJSON line from another producer, validated here like any line.
fn payload(bytes: &[u8]) -> Payload<'_> {
    if let Some(rest) = bytes.strip_prefix(&[WIRE_MAGIC]) {
        if let Some(c) = crate::event::wire::decode(rest) {
            return Payload::Click(c);
        }
    }
    Payload::Line(bytes)
}
