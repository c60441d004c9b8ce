use super::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn payload(i: u64) -> Vec<u8> {
    format!("record-{i}-{}", "x".repeat((i % 37) as usize)).into_bytes()
}

fn read_all(h: &LogHandle, p: u32) -> Vec<(u64, Vec<u8>)> {
    let mut r = h.reader(PartitionId(p));
    let mut out = Records::default();
    let start = h.start(PartitionId(p));
    r.read(start, Offset(u64::MAX), usize::MAX, &mut out).unwrap();
    out.iter().map(|(o, b)| (o.0, b.to_vec())).collect()
}

#[test]
fn append_sync_read_across_segments_and_reopen() {
    let dir = tmp();
    let mut w = Writer::open(dir.path(), 2, 256).unwrap();
    for i in 0..100u64 {
        let first = w.append(PartitionId((i % 2) as u32), [payload(i).as_slice()]).unwrap();
        assert_eq!(first, Offset(i / 2));
    }
    let h = w.handle();
    assert_eq!(h.durable_end(PartitionId(0)), Offset(0), "nothing is durable before sync");
    assert!(read_all(&h, 0).is_empty(), "readers stop at the durable end");
    w.sync().unwrap();
    assert_eq!(h.durable_end(PartitionId(0)), Offset(50));
    let got = read_all(&h, 1);
    assert_eq!(got.len(), 50);
    for (k, (o, b)) in got.iter().enumerate() {
        assert_eq!((*o, b.clone()), (k as u64, payload(2 * k as u64 + 1)));
    }
    let segments = fs::read_dir(partition_dir(dir.path(), 0)).unwrap().count();
    assert!(segments > 3, "small segments roll: {segments}");
    // Reading from the middle, in small steps.
    let mut r = h.reader(PartitionId(0));
    let mut out = Records::default();
    let mut at = Offset(17);
    while at < Offset(50) {
        at = r.read(at, Offset(50), 3, &mut out).unwrap();
    }
    assert_eq!(out.spans.len(), 33);
    assert_eq!(out.iter().next().unwrap(), (Offset(17), payload(34).as_slice()));
    drop(w);
    let mut w = Writer::open(dir.path(), 2, 256).unwrap();
    assert_eq!(read_all(&w.handle(), 0).len(), 50);
    assert_eq!(w.append(PartitionId(0), [b"after".as_slice()]).unwrap(), Offset(50));
}

/// A crash can tear the last record at any byte: reopening keeps every earlier record, drops the
/// torn one, and appends continue at its offset.
#[test]
fn crash_image_cut_at_every_byte_of_the_last_record() {
    let dir = tmp();
    let mut w = Writer::open(dir.path(), 1, 1 << 20).unwrap();
    for i in 0..10 {
        w.append(PartitionId(0), [payload(i).as_slice()]).unwrap();
    }
    w.sync().unwrap();
    drop(w);
    let seg = segment_path(&partition_dir(dir.path(), 0), 0);
    let full = fs::read(&seg).unwrap();
    let last = FRAME_HEADER + payload(9).len();
    for cut in full.len() - last..full.len() {
        let image = tmp();
        let pdir = partition_dir(image.path(), 0);
        fs::create_dir_all(&pdir).unwrap();
        fs::write(segment_path(&pdir, 0), &full[..cut]).unwrap();
        let mut w = Writer::open(image.path(), 1, 1 << 20).unwrap();
        let got = read_all(&w.handle(), 0);
        assert_eq!(got.len(), 9, "cut at {cut}");
        assert_eq!(got[8].1, payload(8));
        assert_eq!(fs::metadata(segment_path(&pdir, 0)).unwrap().len() as usize, full.len() - last);
        assert_eq!(w.append(PartitionId(0), [b"next".as_slice()]).unwrap(), Offset(9));
        w.sync().unwrap();
        assert_eq!(read_all(&w.handle(), 0)[9].1, b"next");
    }
}

#[test]
fn retention_removes_whole_segments_only() {
    let dir = tmp();
    let mut w = Writer::open(dir.path(), 1, 100).unwrap();
    for i in 0..40 {
        w.append(PartitionId(0), [payload(i).as_slice()]).unwrap();
        w.sync().unwrap();
    }
    let h = w.handle();
    assert_eq!(
        w.delete_below(PartitionId(0), Offset(20), std::time::Duration::from_secs(3600)).unwrap(),
        0,
        "too young"
    );
    let removed = w.delete_below(PartitionId(0), Offset(20), std::time::Duration::ZERO).unwrap();
    assert!(removed > 0);
    let start = h.start(PartitionId(0));
    assert!(start.0 <= 20 && start.0 > 0, "start {start:?}");
    let got = read_all(&h, 0);
    assert_eq!(got.first().unwrap().0, start.0);
    assert_eq!(got.last().unwrap().0, 39);
    let mut r = h.reader(PartitionId(0));
    let err = r.read(Offset(0), Offset(40), 10, &mut Records::default()).unwrap_err();
    assert!(err.to_string().contains("deleted by retention"), "{err}");
    w.delete_below(PartitionId(0), Offset(1000), std::time::Duration::ZERO).unwrap();
    assert!(h.start(PartitionId(0)).0 <= 39, "the active segment stays");
}

#[test]
fn the_partition_count_is_fixed() {
    let dir = tmp();
    Writer::open(dir.path(), 4, 1 << 20).unwrap();
    let err = Writer::open(dir.path(), 2, 1 << 20).err().expect("refused");
    assert!(err.to_string().contains("partition count is fixed"), "{err}");
    Writer::open(dir.path(), 4, 1 << 20).unwrap();
}

mod fuzzed_recovery {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Whatever damage follows the synced records (garbage, a torn frame, flipped bits in
        /// the unsynced tail), reopening never panics, keeps every synced record, and yields a
        /// prefix of what was appended.
        #[test]
        fn damage_after_the_synced_prefix(
            synced in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..20),
            unsynced in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..5),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        ) {
            let dir = tmp();
            let mut w = Writer::open(dir.path(), 1, 1 << 20).unwrap();
            for r in &synced {
                w.append(PartitionId(0), [r.as_slice()]).unwrap();
            }
            w.sync().unwrap();
            for r in &unsynced {
                w.append(PartitionId(0), [r.as_slice()]).unwrap();
            }
            drop(w);
            let seg = segment_path(&partition_dir(dir.path(), 0), 0);
            let mut bytes = fs::read(&seg).unwrap();
            let synced_len: usize = synced.iter().map(|r| r.len() + FRAME_HEADER).sum();
            for (at, x) in flips {
                let tail = bytes.len() - synced_len;
                if tail > 0 {
                    bytes[synced_len + at % tail] ^= x;
                }
            }
            bytes.extend_from_slice(&garbage);
            fs::write(&seg, &bytes).unwrap();

            let w = Writer::open(dir.path(), 1, 1 << 20).unwrap();
            let got: Vec<Vec<u8>> = read_all(&w.handle(), 0).into_iter().map(|(_, b)| b).collect();
            let all: Vec<Vec<u8>> = synced.iter().chain(&unsynced).cloned().collect();
            prop_assert!(got.len() >= synced.len());
            prop_assert!(got.len() <= all.len() + 64, "garbage cannot add many records");
            prop_assert_eq!(&got[..synced.len()], &synced[..]);
        }
    }
}
