//! The archiver's ledger in the embedded store: its offsets, its next flush number and the
//! flush it is writing (see `archive`).

use redb::{ReadableDatabase, ReadableTable};

use crate::engine::snapshot::{Decoder, Encoder};
use crate::engine::{Offset, OffsetRange, PartitionId};

use super::codec::{decode_ranges, encode_ranges};
use super::{le_u64, Context as _, Store, StoreError, ARCHIVE_OFFSETS, META};

/// The archiver's committed position (see `archive`).
#[derive(Debug, Default)]
pub struct ArchiveState {
    pub offsets: Vec<(PartitionId, Offset)>,
    pub next_seq: u64,
    /// A flush recorded but not committed: (seq, ranges), to redo.
    pub pending: Option<(u64, Vec<OffsetRange>)>,
}

impl Store {
    pub fn archive_state(&self) -> Result<ArchiveState, StoreError> {
        let txn = self.db()?.begin_read().ctx("begin read")?;
        let t = txn.open_table(ARCHIVE_OFFSETS).ctx("open archive_offsets")?;
        let mut state = ArchiveState::default();
        for item in t.iter().ctx("read archive offsets")? {
            let (k, v) = item.ctx("read archive offset")?;
            state.offsets.push((PartitionId(k.value()), Offset(v.value())));
        }
        let meta = txn.open_table(META).ctx("open meta")?;
        if let Some(v) = meta.get("archive_next_seq").ctx("read archive seq")? {
            state.next_seq = le_u64(v.value());
        }
        if let Some(v) = meta.get("archive_pending").ctx("read archive flush")? {
            let mut d = Decoder::raw(v.value());
            let decode = |d: &mut Decoder| Some((d.u().ok()?, decode_ranges(d)?));
            state.pending = Some(decode(&mut d).ok_or(StoreError::Corrupt {
                what: "the recorded archive flush",
                detail: "meta archive_pending".into(),
            })?);
        }
        Ok(state)
    }

    /// Records, durably, that flush `seq` is about to write the files of `ranges`.
    pub fn archive_begin(&self, seq: u64, ranges: &[OffsetRange]) -> Result<(), StoreError> {
        let mut e = Encoder::default();
        e.u(seq);
        encode_ranges(&mut e, ranges);
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META).ctx("open meta")?;
            meta.insert("archive_pending", e.buf.as_slice()).ctx("write archive flush")?;
        }
        txn.commit().ctx("commit archive flush intent")
    }

    /// Commits flush `seq`: its files are written; the archive offsets advance past `ranges`.
    pub fn archive_commit(&self, seq: u64, ranges: &[OffsetRange]) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(ARCHIVE_OFFSETS).ctx("open archive_offsets")?;
            for r in ranges {
                t.insert(r.partition.0, r.to.0).ctx("write archive offset")?;
            }
            let mut meta = txn.open_table(META).ctx("open meta")?;
            meta.remove("archive_pending").ctx("clear archive flush")?;
            meta.insert("archive_next_seq", (seq + 1).to_le_bytes().as_slice())
                .ctx("write archive seq")?;
        }
        txn.commit().ctx("commit archive flush")
    }
}
