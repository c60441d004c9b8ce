//! Recovery of the embedded service: restore the newest readable checkpoint, replay the journal
//! from the log with its recorded wall times (the engine makes every decision again and must end
//! exactly at the committed offsets, watermark and counters), hand the unsealed minutes to the
//! store, and rebuild the popular-ads index off the aggregator's path.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Instant;

use super::aggregate::{decode_records, recent_window_start, run_shards, Aggregator};
use super::writer::ToWriter;
use super::{QueryState, StartError};
use crate::config::Settings;
use crate::engine::{Engine, EngineConfig, Offset, PartitionId};
use crate::event::{AdId, EventTime, IdentityKey, Minute, MINUTE_MS};
use crate::fault::fatal;
use crate::filter::Filters;
use crate::log::{read_ranges, LogHandle, Records};
use crate::popular::Popular;
use crate::store::{BatchRecord, CheckpointRecord, Recovery, Store, StoreError};

/// Returns [`StartError::Recovery`] with the message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(StartError::Recovery(format!($($msg)+)));
        }
    };
}

impl Aggregator {
    pub(super) fn recover(
        settings: &Settings,
        engine_config: EngineConfig,
        store: Arc<Store>,
        log: LogHandle,
        query: Arc<QueryState>,
        writer: SyncSender<ToWriter>,
        shutdown: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Aggregator, StartError> {
        let started = Instant::now();
        let filters = query.filters.clone();
        let rec = store.recovery()?;
        let read_ms = started.elapsed().as_millis() as u64;
        // A log that ends below what the store committed lost records (damaged, deleted or
        // restored files): new clicks would reuse those offsets and be skipped as replays.
        for &(p, committed) in &rec.offsets {
            let end =
                if (p.0 as usize) < log.partitions() { log.durable_end(p) } else { Offset(0) };
            ensure!(
                end >= committed,
                "partition {}: the log ends at offset {} but the store has committed offset {}; \
                 the log lost records that were aggregated (damaged, deleted or restored files). \
                 Restore the log, or start a new data_dir",
                p.0,
                end.0,
                committed.0
            );
        }
        let (mut engine, restored) = restore_engine(&engine_config, &filters, &rec)?;
        let restored_ms = started.elapsed().as_millis() as u64;
        let base = restored.as_ref().map(|c| c.seq);
        let partitions = settings.partitions as usize;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.engine.shards)
            .thread_name(|i| format!("adclick-shard-{i}"))
            .build()
            .map_err(|e| StartError::Recovery(format!("starting the shard threads: {e}")))?;
        let mut next = vec![0; partitions];
        for (p, o) in engine.offsets() {
            ensure!((p.0 as usize) < partitions, "checkpoint holds partition {}", p.0);
            next[p.0 as usize] = o.0;
        }
        let mut readers: Vec<_> =
            (0..partitions).map(|p| log.reader(PartitionId(p as u32))).collect();
        let mut buf: Vec<Records> = (0..partitions).map(|_| Records::default()).collect();
        let journal: Vec<_> =
            rec.journal.iter().filter(|(seq, _)| base.is_none_or(|b| *seq > b)).collect();
        for (seq, batch) in &journal {
            for r in &batch.ranges {
                let p = r.partition;
                ensure!(
                    r.from.0 == next[p.0 as usize],
                    "journal batch {seq} does not continue the checkpoint at partition {}",
                    p.0
                );
                next[p.0 as usize] = r.to.0;
            }
            read_ranges(&mut readers, &mut buf, &batch.ranges).map_err(|e| {
                StartError::Recovery(format!("reading the log to replay the journal: {e}"))
            })?;
            let records = decode_records(&buf, &batch.ranges)
                .map_err(|e| StartError::Recovery(format!("replaying the journal: {e}")))?;
            if !batch.assign.is_empty() {
                engine.assign(&batch.assign, EventTime(batch.wall));
            }
            engine.process_with(EventTime(batch.wall), &records, |work| run_shards(&pool, work));
        }
        for (p, o) in &rec.offsets {
            ensure!(
                next[p.0 as usize] == o.0,
                "after replay partition {} is at offset {} but the store committed {}",
                p.0,
                next[p.0 as usize],
                o.0
            );
        }
        // The replay must have made every decision again as committed (it is given the same
        // records, wall times and assignments): the same watermark and the same counters.
        let committed = store.counters()?;
        ensure!(
            engine.watermark() == rec.watermark && engine.counters() == committed,
            "the replay diverged from what was committed: watermark {:?} against {:?}, \
             counters {:?} against {:?}; refusing to go on with state that differs from the store",
            engine.watermark(),
            rec.watermark,
            engine.counters(),
            committed
        );
        let replayed_ms = started.elapsed().as_millis() as u64;
        let (rows, tops) = engine.unsealed();
        store.load_open(&rows, &tops, settings.engine.allowed_lateness_ms)?;
        let mut agg = Aggregator {
            engine,
            pool,
            store,
            readers,
            buf,
            log,
            query,
            writer,
            next,
            seq: rec.next_seq,
            commit_interval: settings.commit_interval,
            checkpoint_interval: settings.checkpoint_interval,
            lateness_ms: settings.engine.allowed_lateness_ms,
            previous_checkpoint: None,
            manifest: restored.map(|c| c.files).unwrap_or_default(),
            pending: None,
            full_next: false,
            shutdown,
        };
        for (p, o) in agg.next.iter().enumerate() {
            agg.query.committed[p].store(*o, Ordering::Release);
        }
        agg.assign_all()?;
        agg.query.ready.store(true, Ordering::Release);
        tracing::info!(
            replayed_batches = journal.len(),
            read_ms,
            restore_ms = restored_ms - read_ms,
            replay_ms = replayed_ms - restored_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        Ok(agg)
    }

    /// Takes every partition at the current wall time (SPEC §2: each holds the watermark back
    /// until it delivers or idles), committed as a journaled batch so that a replay after a
    /// crash assigns at the same instant.
    fn assign_all(&mut self) -> Result<(), StoreError> {
        let wall = EventTime::now().0;
        let all: Vec<PartitionId> = (0..self.next.len()).map(|p| PartitionId(p as u32)).collect();
        self.engine.assign(&all, EventTime(wall));
        let output =
            self.engine.process_with(EventTime(wall), &[], |work| run_shards(&self.pool, work));
        self.commit(&BatchRecord { wall, ranges: Vec::new(), assign: all }, output, None)
    }

    /// Minutes below this can no longer be corrected by the live path.
    pub(super) fn sealed_below(&self) -> Minute {
        match self.engine.watermark().oldest_countable(self.lateness_ms) {
            Some(start) => Minute(start.div_euclid(MINUTE_MS)),
            None => Minute(i64::MIN),
        }
    }
}

/// Fills the popular-ads index of a starting server from the store (see [`LiveIndex`]), while
/// queries already run against the store; `sealed`: the minutes the live path can no longer
/// change at recovery. A failed read stops the process, like a failed commit.
pub(super) fn rebuild_popular(query: &QueryState, sealed: Minute) {
    let started = Instant::now();
    let keep_from = recent_window_start();
    let mut slots: Vec<Popular> = (0..query.filters.len() + 1).map(|_| Popular::new()).collect();
    let mut rows = 0u64;
    let scanned = query.store.scan_counts(keep_from, |minute, ad, counts| {
        rows += 1;
        let ad = AdId::new(ad);
        for (p, &c) in slots.iter_mut().zip(counts) {
            if c > 0 {
                p.set(minute, &ad, c);
            }
        }
    });
    let watermark = scanned.unwrap_or_else(|e| fatal("rebuilding the popular-ads index", e));
    for p in &mut slots {
        p.seal_below(sealed);
    }
    query.live.install(slots, keep_from, watermark);
    tracing::info!(
        rows,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "popular-ads index rebuilt"
    );
}

/// Restores the newest committed checkpoint that can be read, falling back to the previous one
/// (and a longer journal replay), and says so. Returns the engine and the checkpoint restored.
fn restore_engine(
    config: &EngineConfig,
    filters: &Arc<Filters>,
    rec: &Recovery,
) -> Result<(Engine, Option<CheckpointRecord>), StartError> {
    let mut failures = Vec::new();
    for (checkpoint, files) in &rec.checkpoints {
        let seq = checkpoint.seq;
        let restored = files.as_ref().map_err(Clone::clone).and_then(|files| {
            let files: Vec<&[u8]> = files.iter().map(|f| &f[..]).collect();
            Engine::restore_chain(config.clone(), filters.clone(), &files)
                .map_err(|e| e.to_string())
        });
        match restored {
            Ok(engine) => {
                if !failures.is_empty() {
                    tracing::warn!(
                        checkpoint = seq,
                        "falling back to the previous checkpoint: {}",
                        failures.join("; ")
                    );
                    eprintln!(
                        "adclick: warning: {}; falling back to checkpoint {seq} and replaying the journal from there",
                        failures.join("; ")
                    );
                }
                return Ok((engine, Some(checkpoint.clone())));
            }
            Err(e) => failures.push(format!("checkpoint {seq} cannot be restored ({e})")),
        }
    }
    // No checkpoint, or none readable: a fresh engine, if the journal reaches back to the start.
    let from_start = rec.journal.first().is_none_or(|(seq, _)| *seq == 0);
    ensure!(
        failures.is_empty() || from_start,
        "{}; the journal does not reach back to the start, so the state cannot be rebuilt. \
         Restore the checkpoints directory, or start a new data_dir",
        failures.join("; ")
    );
    if !failures.is_empty() {
        eprintln!("adclick: warning: {}; replaying the whole journal", failures.join("; "));
    }
    let engine = Engine::new(config.clone(), filters.clone())
        .map_err(|e| StartError::Recovery(format!("engine settings: {e}")))?;
    Ok((engine, None))
}

/// The identity key of a data directory: read, or created (random, durable) on first start.
pub fn identity_key(data_dir: &Path) -> Result<IdentityKey, StartError> {
    use std::io::{Read, Write};
    let path = data_dir.join("identity.key");
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StartError::Io { what, path, source }
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let key: [u8; IdentityKey::LEN] = bytes.as_slice().try_into().map_err(|_| {
                StartError::Recovery(format!(
                    "{}: must hold {} bytes, holds {}; it keys deduplication and cannot be replaced",
                    path.display(),
                    IdentityKey::LEN,
                    bytes.len()
                ))
            })?;
            Ok(IdentityKey(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let checkpoints = data_dir.join("checkpoints");
            let keyed = checkpoints.exists()
                && std::fs::read_dir(&checkpoints)
                    .map_err(io("reading", &checkpoints))?
                    .next()
                    .is_some();
            ensure!(
                !keyed,
                "{} is missing but the data directory holds checkpoints keyed with it; restore it",
                path.display()
            );
            let mut key = [0u8; IdentityKey::LEN];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut key))
                .map_err(io("reading random bytes for", &path))?;
            let tmp = path.with_extension("tmp");
            std::fs::File::create(&tmp)
                .and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()))
                .map_err(io("writing", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp))?;
            std::fs::File::open(data_dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing", data_dir))?;
            Ok(IdentityKey(key))
        }
        Err(e) => Err(io("reading", &path)(e)),
    }
}
