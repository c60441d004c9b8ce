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
//! A commit that PostgreSQL cannot take (an outage) is kept as processed and tried again, with
//! backoff, before the partition processes anything newer; fetching that partition pauses
//! meanwhile, while polling goes on, so the process stays in the group.
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

use crate::config::ScaleOut;
use crate::config::Settings;
use crate::engine::{Engine, EngineConfig, Extent, Offset, PartitionId, Payload, Record};
use crate::event::EventTime;
use crate::fault::fatal;
use crate::filter::Filters;
use crate::scaleout::kafka::{self, Change, GroupContext};
use crate::scaleout::{pg, RoleError, WIRE_MAGIC};
use crate::telemetry::AggregatorReport;

/// Most records buffered across partitions before a round of commits.
const MAX_BUFFERED: usize = 200_000;

/// A full checkpoint replaces a partition's chain of incremental ones once the chain has at
/// least this many files and twice the bytes of the last full one: a claim then reads at most
/// about twice the state, and the full checkpoints cost at most as much as the increments did.
const COMPACT_FILES: usize = 16;

/// One owned partition: its engine, as restored from its claim, and the records read since its
/// last commit. Independent of Kafka, so that the tests drive it from any source.
pub struct Owned {
    id: PartitionId,
    engine: Engine,
    epoch: i64,
    /// The offset of the next record to process.
    next: i64,
    seq: u64,
    /// The checkpoint files the state restores from: (seq, extent, bytes).
    manifest: Vec<(u64, Extent, usize)>,
    /// Minutes below this one are summed into the hour sums (see `pg::Commit::roll`).
    rolled_through: i64,
    lateness_ms: i64,
    /// Bytes of the last full checkpoint (unknown after a claim: 0).
    full_bytes: usize,
    compactions: u64,
    buf: Vec<(i64, Vec<u8>)>,
    /// One past the newest end marker read (markers are not records of the engine).
    skipped_to: i64,
    /// The end marker sent to this partition while it has delivered no valid click: whether it
    /// was read back (see [`Aggregator::empty_partitions`]).
    marker: Option<Marker>,
    /// A batch processed and checkpointed but not committed yet (PostgreSQL unreachable): it is
    /// committed as it is before the partition processes anything else.
    prepared: Option<Prepared>,
    last_commit: Instant,
    assigned_at: Instant,
}

/// A processed batch waiting for its commit: everything [`pg::Commit`] refers to.
struct Prepared {
    output: crate::engine::Output,
    next: i64,
    bytes: Vec<u8>,
    extent: Extent,
    dropped: Vec<u64>,
    roll: Option<(i64, i64)>,
    compact: bool,
}

/// An end marker sent: its nonce, the wall time it was sent, and whether it was read back.
#[derive(Clone, Copy)]
struct Marker {
    nonce: u64,
    sent: i64,
    seen: bool,
}

/// An end marker not read back within this long is sent again (one may be lost).
pub const MARKER_RESEND_MS: i64 = 10_000;

/// What the idle rule does next for a partition (see [`Owned::idle_step`]).
#[derive(Debug, PartialEq, Eq)]
pub enum IdleStep {
    Wait,
    /// Append an end marker with this nonce to the partition.
    SendMarker(u64),
    /// Everything before the marker is read and committed: store this watermark for the
    /// partition, and this next offset (past the marker).
    Advance(crate::engine::Watermark, i64),
}

pub struct Aggregator {
    settings: Settings,
    config: EngineConfig,
    filters: Arc<Filters>,
    owned: BTreeMap<PartitionId, Owned>,
    /// Commits and watermarks; reconnected after an outage (see [`crate::scaleout::conn::Conn`]).
    client: crate::scaleout::conn::Conn,
    days: pg::Days,
    /// Set when the process stops: a commit waiting for PostgreSQL then gives up.
    shutdown: Arc<AtomicBool>,
    /// End markers for partitions that have delivered no valid click.
    markers: kafka::Markers,
    /// Partitions not fetched while a commit of theirs waits (see `pause_while_pending`).
    paused: std::collections::BTreeSet<PartitionId>,
    /// When the owned partitions' end offsets were last asked of the broker (for metrics).
    ends_read: Option<Instant>,
}

/// How often an aggregator asks the broker for its partitions' end offsets, for the lag metrics.
const ENDS_EVERY: Duration = Duration::from_secs(5);

impl Aggregator {
    /// Connects to PostgreSQL lazily: an aggregator started while the database is down waits
    /// for it instead of exiting.
    pub fn new(
        settings: &Settings,
        scale: &ScaleOut,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Aggregator, RoleError> {
        let config = EngineConfig { shards: 1, ..settings.engine.clone() };
        Ok(Aggregator {
            settings: settings.clone(),
            config,
            filters: Arc::new(settings.filters.clone()),
            owned: BTreeMap::new(),
            client: crate::scaleout::conn::Conn::lazy(&scale.postgres, shutdown.clone()),
            days: pg::Days::new(),
            shutdown,
            markers: kafka::Markers::new(&scale.brokers, &scale.topic)?,
            paused: Default::default(),
            ends_read: None,
        })
    }

    /// Consumes until `shutdown`, then commits what it holds.
    pub fn run(mut self, scale: &ScaleOut) -> Result<(), RoleError> {
        let shutdown = self.shutdown.clone();
        let owner = format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "adclick".into()),
            std::process::id()
        );
        let ctx = GroupContext {
            claims: Mutex::new(crate::scaleout::conn::Conn::lazy(
                &scale.postgres,
                shutdown.clone(),
            )),
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
                            o.push(m.offset(), m.payload().unwrap_or(&[]).to_vec());
                            buffered += 1;
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
            self.pause_while_pending(&consumer, &scale.topic);
            self.empty_partitions();
            self.export_ends(&consumer, &scale.topic);
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
                    self.paused.remove(&p);
                    if let Some(mut o) = self.owned.remove(&p) {
                        if !o.buf.is_empty() || o.commit_pending() {
                            let committed =
                                o.commit(&mut self.client, &mut self.days, EventTime::now().0);
                            committed_or_fenced(p, committed, true);
                        }
                    }
                }
                Change::Assigned(p, claim) => {
                    match Owned::restore(&self.config, &self.filters, p, claim, EventTime::now().0)
                    {
                        Ok(o) => {
                            self.owned.insert(p, o);
                        }
                        Err(e) => fatal("restoring a partition's state", e),
                    }
                }
            }
        }
    }

    /// Processes and commits every partition that has records or a watermark step due.
    fn commit_round(&mut self, stopping: bool) {
        let wall = EventTime::now().0;
        let mut fenced = Vec::new();
        for (&p, o) in self.owned.iter_mut() {
            if o.buf.is_empty() && !stopping && !o.commit_pending() {
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
            let committed = o.commit(&mut self.client, &mut self.days, wall);
            if !committed_or_fenced(p, committed, stopping) {
                fenced.push(p);
            }
        }
        for p in fenced {
            self.owned.remove(&p);
        }
        self.export_metrics();
    }

    /// Stops fetching a partition while a commit of it waits for PostgreSQL (what was read
    /// stays buffered, bounded), and fetches again once it is made. Polling goes on meanwhile,
    /// so the process stays in the consumer group through an outage.
    fn pause_while_pending(
        &mut self,
        consumer: &rdkafka::consumer::BaseConsumer<GroupContext>,
        topic: &str,
    ) {
        for (&p, o) in &self.owned {
            let pending = o.commit_pending();
            if pending == self.paused.contains(&p) {
                continue;
            }
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition(topic, p.0 as i32);
            let done = if pending { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
            match done {
                Ok(()) if pending => {
                    self.paused.insert(p);
                }
                Ok(()) => {
                    self.paused.remove(&p);
                }
                Err(e) => tracing::warn!(partition = p.0, "kafka: pausing or resuming: {e}"),
            }
        }
        self.paused.retain(|p| self.owned.contains_key(p));
    }

    /// Every [`ENDS_EVERY`]: each owned partition's end offset as the broker reports it, and the
    /// records between it and the committed offset. (Kafka counts records; the Tansu broker of
    /// the tests counts record batches, so there the figures are low: docs/operations.md, Metrics.)
    fn export_ends(
        &mut self,
        consumer: &rdkafka::consumer::BaseConsumer<GroupContext>,
        topic: &str,
    ) {
        use crate::telemetry::{self as t, set_partition_gauge};
        if self.ends_read.is_some_and(|at| at.elapsed() < ENDS_EVERY) {
            return;
        }
        self.ends_read = Some(Instant::now());
        for (&p, o) in &self.owned {
            match consumer.fetch_watermarks(topic, p.0 as i32, Duration::from_secs(1)) {
                Ok((_, high)) => {
                    set_partition_gauge(t::PARTITION_END, p.0, high as f64);
                    set_partition_gauge(t::PARTITION_LAG, p.0, (high - o.next).max(0) as f64);
                }
                Err(e) => {
                    tracing::debug!(partition = p.0, "kafka: reading the end offset: {e}");
                    return;
                }
            }
        }
    }

    /// This process's share: per owned partition its committed offset, watermark and idle
    /// flag; counters and state summed over the engines it owns (a rebalance moves them).
    fn export_metrics(&self) {
        let mut report = AggregatorReport::default();
        for (&p, o) in &self.owned {
            let from = report.partitions.len();
            report.add_engine(&o.engine);
            for r in &mut report.partitions[from..] {
                if r.id == p {
                    r.committed = o.next as u64;
                }
            }
        }
        report.export();
    }
}

impl Aggregator {
    /// A partition that never delivered a valid click keeps its engine's watermark at none (a
    /// first click may be history of any age). Once it has been quiet for `idle_timeout` since
    /// its assignment and everything in it has been read, its stored watermark follows the wall
    /// clock (minus `watermark_delay`), so that it does not hold every minute of the other
    /// partitions back from final. "Everything read" does not come from the broker's end
    /// offsets (some brokers count record batches there): the aggregator appends an end marker
    /// to the partition and waits to read it back. Every record before it has then been read
    /// and committed, and the watermark may follow the clock as of when the marker was sent. A
    /// click arriving later for such a partition is still counted (its engine judges nothing
    /// too late), correcting minutes already reported final.
    fn empty_partitions(&mut self) {
        let idle = Duration::from_millis(self.config.idle_timeout_ms as u64);
        let delay = self.config.watermark_delay_ms;
        let wall = EventTime::now().0;
        let mut fenced = Vec::new();
        for (&p, o) in self.owned.iter_mut() {
            if o.assigned_at.elapsed() < idle || o.last_commit.elapsed() < Duration::from_secs(1) {
                continue;
            }
            match o.idle_step(wall, delay) {
                IdleStep::Wait => {}
                IdleStep::SendMarker(nonce) => self.markers.send(p, nonce, wall),
                IdleStep::Advance(w, next) => {
                    let epoch = o.epoch;
                    let stored = self.client.attempt("committing a watermark", |c| {
                        pg::empty_watermark(c, p, epoch, w, next)
                    });
                    match stored {
                        Ok(()) => {
                            o.last_commit = Instant::now();
                            o.next = next;
                        }
                        Err(pg::PgError::Fenced(..)) => fenced.push(p),
                        Err(e) if e.is_transient() => {} // a later marker tries again
                        Err(e) => fatal("committing a watermark", e),
                    }
                }
            }
        }
        for p in fenced {
            tracing::warn!(partition = p.0, "fenced off: another aggregator owns it now");
            self.owned.remove(&p);
        }
    }
}

impl Owned {
    /// The state a claim hands over: the checkpoint chain restored (or a new engine), the
    /// partition assigned at `wall` (it holds the watermark back until it delivers or idles).
    pub fn restore(
        config: &EngineConfig,
        filters: &Arc<Filters>,
        p: PartitionId,
        claim: pg::Claim,
        wall: i64,
    ) -> Result<Owned, RoleError> {
        let started = Instant::now();
        let mut engine = if claim.files.is_empty() {
            Engine::new(config.clone(), filters.clone())
                .map_err(|e| RoleError::State(format!("engine settings: {e}")))?
        } else {
            let files: Vec<&[u8]> = claim.files.iter().map(|(_, _, b)| b.as_slice()).collect();
            Engine::restore_chain(config.clone(), filters.clone(), &files)
                .map_err(|e| RoleError::State(format!("partition {}: checkpoint: {e}", p.0)))?
        };
        if let Some(next) = engine.offsets().iter().find(|(q, _)| *q == p).map(|(_, o)| o.0) {
            if next as i64 > claim.next_offset {
                return Err(RoleError::State(format!(
                    "partition {}: the checkpoint is at offset {next}, past the committed {}",
                    p.0, claim.next_offset
                )));
            }
        }
        // Holds the watermark back from now until it delivers or idles (SPEC §2); committed
        // with the next checkpoint like every other decision.
        engine.assign(&[p], EventTime(wall));
        let seq = claim.files.last().map_or(1, |(s, _, _)| s + 1);
        tracing::info!(
            partition = p.0,
            files = claim.files.len(),
            restore_ms = started.elapsed().as_millis() as u64,
            "partition state restored"
        );
        Ok(Owned {
            id: p,
            engine,
            epoch: claim.epoch,
            next: claim.next_offset,
            seq,
            manifest: claim.files.iter().map(|(s, e, b)| (*s, *e, b.len())).collect(),
            rolled_through: claim.rolled_through,
            lateness_ms: config.allowed_lateness_ms,
            full_bytes: 0,
            compactions: 0,
            buf: Vec::new(),
            skipped_to: claim.next_offset,
            marker: None,
            prepared: None,
            last_commit: Instant::now(),
            assigned_at: Instant::now(),
        })
    }

    /// Buffers a record read from the source; those below the next offset are ignored, and
    /// end markers only move the position (and are noted when they are this owner's).
    pub fn push(&mut self, offset: i64, bytes: Vec<u8>) {
        if offset < self.next_offset() {
            return;
        }
        if let Some((nonce, _)) = crate::scaleout::read_marker(&bytes) {
            if let Some(m) = self.marker.as_mut().filter(|m| m.nonce == nonce) {
                m.seen = true;
            }
            self.skipped_to = offset + 1;
            return;
        }
        self.buf.push((offset, bytes));
    }

    /// The idle rule's next step at `wall` for a partition that has delivered no valid click
    /// (see [`Aggregator::empty_partitions`]): send an end marker, wait for it, then advance
    /// the stored watermark to when it was sent, less `delay_ms`. A partition that has
    /// delivered a click, or holds records not committed yet, waits.
    pub fn idle_step(&mut self, wall: i64, delay_ms: i64) -> IdleStep {
        if self.engine.watermark() != crate::engine::Watermark::NONE || !self.buf.is_empty() {
            return IdleStep::Wait;
        }
        match self.marker {
            Some(m) if m.seen => {
                self.marker = None;
                IdleStep::Advance(
                    crate::engine::Watermark::at(m.sent - delay_ms),
                    self.next_offset(),
                )
            }
            Some(m) if wall - m.sent < MARKER_RESEND_MS => IdleStep::Wait,
            _ => {
                let nonce = (u64::from(std::process::id()) << 44) ^ (wall as u64 & ((1 << 44) - 1));
                self.marker = Some(Marker { nonce, sent: wall, seen: false });
                IdleStep::SendMarker(nonce)
            }
        }
    }

    /// How many times this owner replaced the partition's checkpoint chain by a full one.
    pub fn compactions(&self) -> u64 {
        self.compactions
    }

    /// The offset of the first record not yet committed or buffered.
    pub fn next_offset(&self) -> i64 {
        self.buf.last().map_or(self.next, |(o, _)| o + 1).max(self.skipped_to)
    }

    /// Processes the buffered records at `wall` and commits them with a checkpoint, in one
    /// transaction. A commit the database cannot take now (see
    /// [`PgError::is_transient`](pg::PgError::is_transient)) is kept and made, unchanged, by
    /// the next call, before anything newer; `Fenced` means another process claimed the
    /// partition, which must then be dropped (its engine has moved on), as after other errors.
    pub fn commit(
        &mut self,
        client: &mut impl pg::Committer,
        days: &mut pg::Days,
        wall: i64,
    ) -> Result<(), pg::PgError> {
        if self.prepared.is_none() {
            self.prepared = Some(self.prepare(wall));
        }
        let pr = self.prepared.as_ref().expect("prepared above");
        let commit = pg::Commit {
            partition: self.id,
            epoch: self.epoch,
            next_offset: pr.next,
            output: &pr.output,
            checkpoint: (self.seq, pr.extent, &pr.bytes),
            dropped: &pr.dropped,
            roll: pr.roll,
        };
        let committing = Instant::now();
        client.commit(days, &commit)?;
        crate::telemetry::observe(crate::telemetry::COMMIT, committing.elapsed());
        let pr = self.prepared.take().expect("prepared above");
        metrics::counter!(crate::telemetry::ROWS_WRITTEN).increment(pr.output.counts.len() as u64);
        metrics::counter!(crate::telemetry::CHECKPOINT_WRITTEN).increment(pr.bytes.len() as u64);
        if let Some((_, to)) = pr.roll {
            self.rolled_through = to;
        }
        if pr.compact {
            self.full_bytes = pr.bytes.len();
            self.compactions += 1;
        }
        self.manifest.push((self.seq, pr.extent, pr.bytes.len()));
        self.seq += 1;
        self.next = pr.next;
        self.last_commit = Instant::now();
        Ok(())
    }

    /// Whether a processed batch waits for its commit.
    pub fn commit_pending(&self) -> bool {
        self.prepared.is_some()
    }

    /// Processes the buffered records at `wall` and takes the checkpoint that goes with them.
    fn prepare(&mut self, wall: i64) -> Prepared {
        let (p, o) = (self.id, self);
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
        let next = buf.last().map_or(o.next, |(off, _)| off + 1).max(o.skipped_to);
        let chain: usize = o.manifest.iter().map(|(_, _, b)| b).sum();
        let compact = o.manifest.len() >= COMPACT_FILES && chain >= 2 * o.full_bytes;
        let mut dropped = Vec::new();
        let taking = Instant::now();
        let (bytes, extent) = if compact {
            dropped.extend(o.manifest.drain(..).map(|(seq, _, _)| seq));
            o.engine.full_checkpoint()
        } else {
            o.manifest.retain(|(seq, e, _)| {
                let keep = o.engine.retains(*e);
                if !keep {
                    dropped.push(*seq);
                }
                keep
            });
            o.engine.checkpoint()
        };
        crate::telemetry::observe(crate::telemetry::CHECKPOINT, taking.elapsed());
        let sealed = output
            .watermark
            .oldest_countable(o.lateness_ms)
            .map(|ms| ms.div_euclid(crate::event::MINUTE_MS));
        let roll = sealed.filter(|&to| to > o.rolled_through).map(|to| (o.rolled_through, to));
        if !buf.is_empty() {
            crate::fault::pause("aggregator.before_commit");
        }
        Prepared { output, next, bytes, extent, dropped, roll, compact }
    }
}

/// Whether to keep the partition after a commit: yes when committed, or when PostgreSQL cannot
/// take it now (the commit is kept and made later), unless the process is stopping. No when
/// fenced off, or unreachable as the process stops: the caller drops the partition and its next
/// owner resumes from what is committed. Other errors stop the process, whose restart resumes
/// from there.
fn committed_or_fenced(p: PartitionId, committed: Result<(), pg::PgError>, stopping: bool) -> bool {
    match committed {
        Ok(()) => true,
        Err(e) if e.is_transient() && !stopping => true,
        Err(e) if e.is_transient() => {
            tracing::warn!(partition = p.0, "stopping with this partition uncommitted: {e}");
            false
        }
        Err(pg::PgError::Fenced(_, epoch)) => {
            tracing::warn!(
                partition = p.0,
                epoch,
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
