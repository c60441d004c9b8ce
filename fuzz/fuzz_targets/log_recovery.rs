//! Log recovery under arbitrary damage: records are appended and synced, then the fuzzer's bytes
//! overwrite and extend the segment after the synced prefix. Reopening must not panic, must keep
//! every synced record, and must accept appends at the recovered end.
#![no_main]

use adclick::engine::{Offset, PartitionId};
use adclick::log::{Records, Writer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, damage) = data.split_at(data.len().min(64));
    let dir = tempfile::tempdir().expect("temp dir");
    let mut w = Writer::open(dir.path(), 1, 1 << 20).expect("open");
    let records: Vec<&[u8]> = head.chunks(7).collect();
    for r in &records {
        w.append(PartitionId(0), [*r]).expect("append");
    }
    w.sync().expect("sync");
    drop(w);
    let seg = dir.path().join("p000").join(format!("{:020}.seg", 0));
    let mut bytes = std::fs::read(&seg).expect("read");
    bytes.extend_from_slice(damage);
    std::fs::write(&seg, &bytes).expect("write");

    let mut w = Writer::open(dir.path(), 1, 1 << 20).expect("reopen never fails on a torn tail");
    let mut out = Records::default();
    let mut r = w.handle().reader(PartitionId(0));
    r.read(Offset(0), Offset(u64::MAX), usize::MAX, &mut out).expect("read back");
    let got: Vec<&[u8]> = out.iter().map(|(_, b)| b).collect();
    assert!(got.len() >= records.len());
    assert_eq!(&got[..records.len()], &records[..]);
    let next = w.append(PartitionId(0), [b"after".as_slice()]).expect("append after recovery");
    assert_eq!(next.0 as usize, got.len());
});
