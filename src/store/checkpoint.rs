//! Checkpoint files beside the database: written durably before a commit names them, read
//! (mapped) at recovery, removed once no committed manifest names them.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable};

use crate::engine::{Extent, Offset, PartitionId, Watermark};

use super::codec::decode_manifest;
use super::{le_u64, read_watermark, Context as _, Store, StoreError, JOURNAL, META};
use super::{BatchRecord, CheckpointFile, CheckpointRecord};

/// A checkpoint file that cannot be written, synced or read.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {}: {what}: {source}", path.display())]
pub struct CheckpointError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// A checkpoint's files, oldest first, or why one cannot be read.
pub type CheckpointBytes = Result<Vec<Arc<memmap2::Mmap>>, String>;

/// What a restart needs.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Committed checkpoints, newest first: its manifest, and its files' bytes (oldest first)
    /// or why they cannot be read.
    pub checkpoints: Vec<(CheckpointRecord, CheckpointBytes)>,
    /// Batches after the oldest kept checkpoint, in order.
    pub journal: Vec<(u64, BatchRecord)>,
    pub next_seq: u64,
    pub offsets: Vec<(PartitionId, Offset)>,
    pub watermark: Watermark,
}

impl Store {
    pub(super) fn checkpoint_path(&self, seq: u64) -> PathBuf {
        self.checkpoints.join(format!("{seq:020}.snap"))
    }

    /// Writes a checkpoint file durably (temporary name, fsync, rename, directory fsync), before
    /// a commit records it. Safe beside commits (the aggregator's checkpoint thread calls it).
    pub fn write_checkpoint(&self, seq: u64, bytes: &[u8]) -> Result<(), CheckpointError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError { what, path, source }
        };
        let path = self.checkpoint_path(seq);
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        crate::fault::point("checkpoint.before_sync");
        f.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
        File::open(&self.checkpoints)
            .and_then(|d| d.sync_all())
            .map_err(io("sync the directory", &self.checkpoints))
    }

    /// Removes what a checkpoint write that failed left (its temporary or final file), if it
    /// can: no manifest names it, and the next cleanup would remove it anyway.
    pub fn discard_checkpoint(&self, seq: u64) {
        let path = self.checkpoint_path(seq);
        let _ = std::fs::remove_file(path.with_extension("tmp"));
        let _ = std::fs::remove_file(path);
    }

    /// The committed checkpoints, newest first.
    pub(super) fn committed_checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError> {
        let txn = self.db()?.begin_read().ctx("begin read")?;
        let meta = txn.open_table(META).ctx("open meta")?;
        let mut out = Vec::new();
        for (seq_key, files_key) in [
            ("checkpoint_seq", "checkpoint_files"),
            ("previous_checkpoint_seq", "previous_checkpoint_files"),
        ] {
            let Some(seq) =
                meta.get(seq_key).ctx("read checkpoint seq")?.map(|v| le_u64(v.value()))
            else {
                continue;
            };
            let files = match meta.get(files_key).ctx("read manifest")? {
                Some(v) => decode_manifest(v.value()).ok_or(StoreError::Corrupt {
                    what: "a checkpoint manifest",
                    detail: format!("the manifest of checkpoint {seq}"),
                })?,
                // Written before manifests: one self-contained file.
                None => vec![CheckpointFile { seq, extent: Extent::default() }],
            };
            out.push(CheckpointRecord { seq, files });
        }
        Ok(out)
    }

    /// Removes every checkpoint file neither committed manifest names (expired ones, and orphans
    /// of a crash before their commit). Call only while no checkpoint file is being written.
    pub(super) fn remove_old_checkpoints(&self) -> Result<(), StoreError> {
        let keep: Vec<PathBuf> = self
            .committed_checkpoints()?
            .iter()
            .flat_map(|c| c.files.iter().map(|f| self.checkpoint_path(f.seq)))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.checkpoints) else { return Ok(()) };
        for e in entries.flatten() {
            if !keep.contains(&e.path()) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!(path = %e.path().display(), "removing an old checkpoint: {err}");
                }
            }
        }
        Ok(())
    }

    pub fn recovery(&self) -> Result<Recovery, StoreError> {
        let committed = self.committed_checkpoints()?;
        let seqs: Vec<u64> = committed.iter().map(|c| c.seq).collect();
        // Files are mapped, not copied: at the chapter's peak they hold about a GB, and fresh
        // memory to copy it into costs more than reading it. The two checkpoints mostly share
        // their files, mapped once. Checkpoint files are never changed, only removed once no
        // committed manifest names them.
        let mut wanted: Vec<u64> =
            committed.iter().flat_map(|c| c.files.iter().map(|f| f.seq)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let read: std::collections::HashMap<u64, Result<Arc<memmap2::Mmap>, String>> = wanted
            .into_iter()
            .map(|seq| {
                let path = self.checkpoint_path(seq);
                let map = std::fs::File::open(&path)
                    // SAFETY: checkpoint files are written once (to a temp name, then renamed)
                    // and not modified after; nothing removes them while a recovery reads them.
                    .and_then(|f| unsafe { memmap2::Mmap::map(&f) })
                    .map_err(|e| format!("{}: {e}", path.display()));
                (seq, map.map(Arc::new))
            })
            .collect();
        let checkpoints = committed
            .into_iter()
            .map(|c| {
                let files = c.files.iter().map(|f| read[&f.seq].clone()).collect();
                (c, files)
            })
            .collect();
        let txn = self.db()?.begin_read().ctx("begin read")?;
        let watermark = read_watermark(&txn)?;
        let journal_table = txn.open_table(JOURNAL).ctx("open journal")?;
        let mut journal = Vec::new();
        for item in journal_table.iter().ctx("read journal")? {
            let (k, v) = item.ctx("read journal entry")?;
            let record = BatchRecord::decode(v.value()).ok_or(StoreError::Corrupt {
                what: "a journal entry",
                detail: format!("journal entry {}", k.value()),
            })?;
            journal.push((k.value(), record));
        }
        let next_seq =
            journal.last().map(|(s, _)| s + 1).or(seqs.first().map(|s| s + 1)).unwrap_or(0);
        let offsets = self.offsets()?;
        Ok(Recovery { checkpoints, journal, next_seq, offsets, watermark })
    }
}
