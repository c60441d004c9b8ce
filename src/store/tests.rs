use std::collections::BTreeMap;

use std::sync::Arc;

use super::*;
use crate::engine::{Extent, Offset, OffsetRange, PartitionId};

/// Rows of `counts` as stored, without the minutes kept in memory.
fn stored_rows(store: &Store) -> Vec<(i64, String, Vec<u64>)> {
    let txn = store.db().unwrap().begin_read().unwrap();
    let t = txn.open_table(COUNTS).unwrap();
    t.iter()
        .unwrap()
        .map(|item| {
            let (k, v) = item.unwrap();
            let (m, ad) = k.value();
            (m, ad.to_string(), v.value().chunks_exact(8).map(le_u64).collect())
        })
        .collect()
}

#[test]
fn unsealed_minutes_stay_in_memory_until_sealed_and_read_the_same() {
    use crate::engine::{CountUpdates, Output, TopUpdate};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let minute = crate::event::MINUTE_MS;
    // Minutes are sealed a minute after their end.
    store.load_open(&CountUpdates::new(2), &[], minute).unwrap();
    let output = |watermark: i64, rows: &[(i64, &str, [u64; 2])], tops: &[(i64, &str, u64)]| {
        let mut counts = CountUpdates::new(2);
        for (m, ad, c) in rows {
            counts.push(Minute(*m), &AdId::new(ad), c);
        }
        let top = tops
            .iter()
            .map(|(m, ad, c)| TopUpdate {
                minute: Minute(*m),
                slot: Slot::Total,
                ads: vec![(AdId::new(ad), *c)],
            })
            .collect();
        Output { counts, top, watermark: Watermark::at(watermark), ..Output::default() }
    };
    type Reads = (
        Vec<(Minute, u64)>,
        Vec<(Minute, u64)>,
        Vec<Ranked>,
        Vec<(i64, String, Vec<u64>)>,
        Vec<(i64, String, Vec<u64>)>,
    );
    fn reads(store: &Store, to: i64) -> Reads {
        let filter = Slot::from_index(1);
        let mut scanned = Vec::new();
        store
            .scan_counts(Minute(0), |m, ad, c| scanned.push((m.0, ad.to_string(), c.to_vec())))
            .unwrap();
        scanned.sort();
        let rows = store.range_rows(Minute(0), Minute(to)).unwrap().counts;
        (
            store.series("a", Slot::Total, Minute(0), Minute(to)).unwrap().0,
            store.series("b", filter, Minute(0), Minute(to)).unwrap().0,
            store.popular(Slot::Total, Minute(0), Minute(to), 5).unwrap().0,
            rows.into_iter().map(|((m, ad), c)| (m, ad, c)).collect::<Vec<_>>(),
            scanned,
        )
    }
    let row = |m: i64, ad: &str, c: [u64; 2]| (m, ad.to_string(), c.to_vec());
    // Minutes 1 and 2 open: nothing of them written.
    let first = output(minute + 5, &[(1, "a", [3, 1]), (1, "b", [2, 2]), (2, "a", [1, 0])], &[]);
    store.commit(0, &BatchRecord::default(), &first, None).unwrap();
    assert_eq!(stored_rows(&store), vec![]);
    let (a, b, top, rows, scanned) = reads(&store, 10);
    assert_eq!(a, vec![(Minute(1), 3), (Minute(2), 1)]);
    assert_eq!(b, vec![(Minute(1), 2)]);
    assert_eq!(top, vec![(AdId::new("a"), 4), (AdId::new("b"), 2)]);
    assert_eq!(rows, vec![row(1, "a", [3, 1]), row(1, "b", [2, 2]), row(2, "a", [1, 0])]);
    assert_eq!(scanned, rows);
    assert_eq!(reads(&store, 2).0, vec![(Minute(1), 3)], "the range's end bounds the kept minutes");
    // Minute 1 final but not sealed, its top-N too: still only in memory.
    let second = output(2 * minute, &[(1, "a", [4, 1]), (2, "b", [5, 0])], &[(1, "a", 4)]);
    store.commit(1, &BatchRecord::default(), &second, None).unwrap();
    assert_eq!(stored_rows(&store), vec![]);
    assert_eq!(store.top(Minute(1), Slot::Total).unwrap(), Some(vec![(AdId::new("a"), 4)]));
    let (a, b, top, rows, _) = reads(&store, 10);
    assert_eq!(a, vec![(Minute(1), 4), (Minute(2), 1)]);
    assert_eq!(b, vec![(Minute(1), 2)]);
    assert_eq!(top, vec![(AdId::new("b"), 7), (AdId::new("a"), 5)]);
    assert_eq!(
        rows,
        vec![row(1, "a", [4, 1]), row(1, "b", [2, 2]), row(2, "a", [1, 0]), row(2, "b", [5, 0])]
    );
    // Minute 1 sealed: written once, the kept rows and list with it; minute 2 corrected late.
    let third = output(3 * minute + 1, &[(2, "a", [2, 0])], &[(2, "b", 5)]);
    store.commit(2, &BatchRecord::default(), &third, None).unwrap();
    assert_eq!(stored_rows(&store), vec![row(1, "a", [4, 1]), row(1, "b", [2, 2])]);
    assert_eq!(store.top(Minute(1), Slot::Total).unwrap(), Some(vec![(AdId::new("a"), 4)]));
    assert_eq!(store.top(Minute(2), Slot::Total).unwrap(), Some(vec![(AdId::new("b"), 5)]));
    assert_eq!(reads(&store, 10).0, vec![(Minute(1), 4), (Minute(2), 2)]);
    // A clean stop writes the rest, and a store without an aggregator reads it all.
    store.flush_open().unwrap();
    assert_eq!(stored_rows(&store).len(), 4);
    drop(store);
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let (a, b, top, rows, _) = reads(&store, 10);
    assert_eq!(a, vec![(Minute(1), 4), (Minute(2), 2)]);
    assert_eq!(b, vec![(Minute(1), 2)]);
    assert_eq!(top, vec![(AdId::new("b"), 7), (AdId::new("a"), 6)]);
    assert_eq!(rows.len(), 4);
    assert_eq!(store.top(Minute(2), Slot::Total).unwrap(), Some(vec![(AdId::new("b"), 5)]));
}

#[test]
fn a_clean_stop_writes_open_minutes_as_a_commit_would() {
    use crate::engine::{CountUpdates, Output};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path).unwrap();
    store.load_open(&CountUpdates::new(1), &[], 0).unwrap();
    // Months away from anything stored, in minutes no commit has sealed.
    let day = 200 * DAY_MINUTES;
    let mut counts = CountUpdates::new(1);
    counts.push(Minute(day + 5), &AdId::new("z"), &[2]);
    counts.push(Minute(day + 6), &AdId::new("z"), &[3]);
    let output = Output { counts, watermark: Watermark::at(0), ..Output::default() };
    store.commit(0, &BatchRecord::default(), &output, None).unwrap();
    assert_eq!(stored_rows(&store), vec![]);
    store.flush_open().unwrap();
    drop(store);
    // Read alone: the day index finds the ad's day, the hour sums see the rows.
    let store = Store::open(&path).unwrap();
    let (series, _) = store.series("z", Slot::Total, Minute(0), Minute(day + 60)).unwrap();
    assert_eq!(series, vec![(Minute(day + 5), 2), (Minute(day + 6), 3)]);
    let (top, _) = store.popular(Slot::Total, Minute(day), Minute(day + 120), 3).unwrap();
    assert_eq!(top, vec![(AdId::new("z"), 5)]);
}

#[test]
fn reads_racing_commits_see_each_minute_once() {
    use crate::engine::{CountUpdates, Output};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
    store.load_open(&CountUpdates::new(1), &[], 0).unwrap();
    let minute = crate::event::MINUTE_MS;
    let commits = 1000;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) || reads == 0 {
                // Minute k holds one click from commit k on; commit k+1 seals it (moves it
                // from memory to the table). Each read must see minutes 1..=n exactly once.
                let (series, w) = store.series("a", Slot::Total, Minute(0), Minute(2000)).unwrap();
                let minutes: Vec<i64> = series.iter().map(|(m, _)| m.0).collect();
                assert_eq!(minutes, (1..=minutes.len() as i64).collect::<Vec<_>>(), "at {w:?}");
                assert!(series.iter().all(|(_, c)| *c == 1));
                reads += 1;
            }
            reads
        })
    };
    for k in 1..=commits {
        let mut counts = CountUpdates::new(1);
        counts.push(Minute(k), &AdId::new("a"), &[1]);
        // Minute k - 1 more than 0 ms past its end: sealed by this commit.
        let output =
            Output { counts, watermark: Watermark::at(k * minute + 1), ..Output::default() };
        store.commit(k as u64, &BatchRecord::default(), &output, None).unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(stored_rows(&store).len() as i64, commits - 1, "all but the last minute sealed");
}

#[test]
fn commits_read_back_and_checkpoints_trim_the_journal() {
    use crate::engine::{Engine, EngineConfig, Payload, Record};
    use crate::event::EventTime;
    use crate::filter::Filters;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let config = EngineConfig {
        watermark_delay_ms: 15_000,
        idle_timeout_ms: 30_000,
        allowed_lateness_ms: 5 * 60_000,
        dedup_horizon_ms: 10 * 60_000,
        max_clock_skew_ms: 5 * 60_000,
        top_n: 100,
        shards: 1,
        dedup_capacity: 1 << 10,
        identity_key: Default::default(),
    };
    let mut engine = Engine::new(config, std::sync::Arc::new(Filters::default())).unwrap();
    let lines: Vec<String> = (0..5)
        .map(|i| {
            format!(
                r#"{{"ad_id":"ad-{}","click_timestamp":{},"click_id":"{i}"}}"#,
                i % 2,
                60_000 + i
            )
        })
        .chain([r#"{"ad_id":"x","click_timestamp":200000}"#.to_string()])
        .collect();
    let records: Vec<Record> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| Record {
            partition: PartitionId(0),
            offset: Offset(i as u64),
            payload: Payload::Line(l.as_bytes()),
        })
        .collect();
    let out = engine.process(EventTime(0), &records);
    assert!(!out.top.is_empty(), "minute 1 is final in this batch");
    let batch = BatchRecord {
        wall: 0,
        ranges: vec![OffsetRange::new(PartitionId(0), Offset(0), Offset(6))],
        assign: vec![PartitionId(0)],
    };
    store.commit(0, &batch, &out, None).unwrap();

    let w = Watermark::at(185_000);
    assert_eq!(
        store.series("ad-0", Slot::Total, Minute(0), Minute(10)).unwrap(),
        (vec![(Minute(1), 3)], w)
    );
    assert_eq!(store.series("ad-1", Slot::Total, Minute(2), Minute(10)).unwrap(), (vec![], w));
    // A 10,000-year range reads only the days that hold the ad.
    assert_eq!(
        store.series("x", Slot::Total, Minute(-5_000_000_000), Minute(5_000_000_000)).unwrap(),
        (vec![(Minute(3), 1)], w)
    );
    assert_eq!(
        store.popular(Slot::Total, Minute(0), Minute(10), 2).unwrap(),
        (vec![(AdId::new("ad-0"), 3), (AdId::new("ad-1"), 2)], w)
    );
    assert_eq!(
        store.top(Minute(1), Slot::Total).unwrap(),
        Some(vec![(AdId::new("ad-0"), 3), (AdId::new("ad-1"), 2)])
    );
    assert_eq!(store.offsets().unwrap(), vec![(PartitionId(0), Offset(6))]);
    assert_eq!(store.watermark().unwrap(), w);
    assert_eq!(store.counters().unwrap().counted, 6);
    let mut seen = Vec::new();
    store.scan_counts(Minute(2), |m, ad, c| seen.push((m, ad.to_string(), c.to_vec()))).unwrap();
    assert_eq!(seen, vec![(Minute(3), "x".to_string(), vec![1])]);
    let rec = store.recovery().unwrap();
    assert_eq!((rec.journal.len(), rec.next_seq, rec.checkpoints.len()), (1, 1, 0));
    assert_eq!(rec.journal[0].1, batch);

    let snapshot = engine.snapshot();
    let empty = |e: &mut Engine| e.process(EventTime(0), &[]);
    let nothing = BatchRecord::default();
    // A checkpoint: its file written first, then a commit records its manifest.
    let checkpoint = |seq: u64, bytes: &[u8], files: &[u64]| {
        store.write_checkpoint(seq, bytes).unwrap();
        let files =
            files.iter().map(|&seq| CheckpointFile { seq, extent: Extent::default() }).collect();
        CheckpointRecord { seq, files }
    };
    let first = checkpoint(1, &snapshot, &[1]);
    store.commit(1, &nothing, &empty(&mut engine), Some(&first)).unwrap();
    let rec = store.recovery().unwrap();
    assert_eq!(rec.next_seq, 2);
    assert_eq!(rec.journal.len(), 2, "no previous checkpoint: the journal stays whole");
    assert_eq!(loaded(&rec), vec![(first.clone(), Ok(vec![snapshot.clone()]))]);
    // The second checkpoint is taken after batch 2, its file written while batch 3 commits
    // without it, and recorded by batch 3's commit. It keeps file 1 (incremental) and the
    // first checkpoint (and the journal after it) for a fallback.
    std::fs::write(dir.path().join("checkpoints").join(format!("{:020}.snap", 9)), b"orphan")
        .unwrap();
    store.commit(2, &nothing, &empty(&mut engine), None).unwrap();
    let second = checkpoint(2, b"second", &[1, 2]);
    store.commit(3, &nothing, &empty(&mut engine), Some(&second)).unwrap();
    let rec = store.recovery().unwrap();
    assert_eq!(
        loaded(&rec),
        vec![
            (second.clone(), Ok(vec![snapshot.clone(), b"second".to_vec()])),
            (first.clone(), Ok(vec![snapshot.clone()]))
        ]
    );
    assert_eq!(rec.journal.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 3]);
    // Files neither manifest names go after each recording commit: the orphan at once, file
    // 1 once no kept checkpoint needs it.
    let files = || {
        let mut files: Vec<_> = std::fs::read_dir(dir.path().join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        files.sort();
        files
    };
    let named =
        |seqs: &[u64]| -> Vec<String> { seqs.iter().map(|s| format!("{s:020}.snap")).collect() };
    assert_eq!(files(), named(&[1, 2]));
    let fourth = checkpoint(4, b"fourth", &[2, 4]);
    store.commit(4, &nothing, &empty(&mut engine), Some(&fourth)).unwrap();
    assert_eq!(files(), named(&[1, 2, 4]), "the previous checkpoint still needs file 1");
    let fifth = checkpoint(5, b"fifth", &[4, 5]);
    store.commit(5, &nothing, &empty(&mut engine), Some(&fifth)).unwrap();
    assert_eq!(files(), named(&[2, 4, 5]));
    std::fs::remove_file(dir.path().join("checkpoints").join(format!("{:020}.snap", 5))).unwrap();
    let rec = store.recovery().unwrap();
    assert!(rec.checkpoints[0].1.is_err(), "a missing file of the newest is reported");
    assert_eq!(loaded(&rec)[1], (fourth, Ok(vec![b"second".to_vec(), b"fourth".to_vec()])));
    assert_eq!(rec.journal.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![5]);
}

/// The checkpoints a recovery found, with their files' bytes.
type Loaded = (CheckpointRecord, Result<Vec<Vec<u8>>, String>);

fn loaded(rec: &Recovery) -> Vec<Loaded> {
    rec.checkpoints
        .iter()
        .map(|(c, files)| {
            (c.clone(), files.clone().map(|f| f.iter().map(|m| m.to_vec()).collect()))
        })
        .collect()
}

/// History popular ads: whole hours from the hour cache, edges from rows; a commit into a
/// cached hour is seen at once.
#[test]
fn popular_over_history_uses_hour_blocks_and_sees_later_commits() {
    use crate::engine::CountUpdates;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let commit = |seq: u64, rows: &[(i64, &str, u64)]| {
        let mut counts = CountUpdates::new(1);
        for &(m, ad, c) in rows {
            counts.push(Minute(m), &AdId::new(ad), &[c]);
        }
        let out = Output { counts, ..Output::default() };
        store.commit(seq, &BatchRecord::default(), &out, None).unwrap();
    };
    // Hours 0..3 (minutes 0..180): ad a once a minute, b twice every third minute.
    let mut rows = Vec::new();
    for m in 0..180 {
        rows.push((m, "a", 1));
        if m % 3 == 0 {
            rows.push((m, "b", 2));
        }
    }
    commit(0, &rows);
    let top =
        |from: i64, to: i64| store.popular(Slot::Total, Minute(from), Minute(to), 5).unwrap().0;
    let naive = |from: i64, to: i64, rows: &[(i64, &str, u64)]| {
        // Counts are absolute: the last write of a (minute, ad) wins.
        let cells: BTreeMap<(i64, &str), u64> = rows.iter().map(|&(m, a, c)| ((m, a), c)).collect();
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for (&(m, ad), &c) in &cells {
            if (from..to).contains(&m) {
                *sums.entry(ad.to_string()).or_default() += c;
            }
        }
        let mut v: Vec<(AdId, u64)> = sums.into_iter().map(|(a, c)| (AdId::new(&a), c)).collect();
        v.sort_by(crate::rank::order);
        v
    };
    for (from, to) in [(0, 180), (0, 60), (30, 150), (59, 121), (60, 61)] {
        assert_eq!(top(from, to), naive(from, to, &rows), "[{from}, {to})");
        assert_eq!(top(from, to), naive(from, to, &rows), "[{from}, {to}) cached");
    }
    assert!(store.hours.lock().unwrap().blocks.len() >= 3, "whole hours are cached");
    // A later commit into hour 1 (a correction, or a recalculation) is seen.
    let late = [(70, "c", 500), (71, "a", 7)];
    commit(1, &late);
    rows.extend(late);
    for (from, to) in [(0, 180), (60, 120)] {
        assert_eq!(top(from, to), naive(from, to, &rows), "[{from}, {to}) after a commit");
    }
    assert_eq!(top(60, 120)[0], (AdId::new("c"), 500));
}

#[test]
fn changed_settings_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let kv = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let first = kv(&[("partitions", "4"), ("watermark_delay", "15s"), ("filters.us", "a")]);
    store.check_settings(&first).unwrap();
    store.check_settings(&first).unwrap();
    let changed = kv(&[("partitions", "8"), ("watermark_delay", "15s"), ("filters.eu", "b")]);
    let err = store.check_settings(&changed).unwrap_err().to_string();
    assert!(err.contains("partitions: the data was aggregated with 4, the config has 8"), "{err}");
    assert!(err.contains("filters.us: the data was aggregated with a, the config has (none)"));
    assert!(err.contains("filters.eu: the data was aggregated with (none), the config has b"));
    assert!(!err.contains("watermark_delay"), "{err}");
    drop(store);
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    assert!(store.check_settings(&changed).is_err(), "recorded durably");
}

#[test]
fn batch_records_round_trip() {
    let b = BatchRecord {
        wall: -5,
        ranges: vec![
            OffsetRange::new(PartitionId(3), Offset(10), Offset(20)),
            OffsetRange::new(PartitionId(0), Offset(0), Offset(1)),
        ],
        assign: vec![PartitionId(0), PartitionId(7)],
    };
    assert_eq!(BatchRecord::decode(&b.encode()), Some(b));
    assert_eq!(BatchRecord::decode(&[1, 2, 3]), None);
}

/// A commit retried after a failure that landed anyway is not applied twice, and the store
/// reopened after a failed write reads what was committed.
#[test]
fn a_retried_commit_that_had_landed_is_not_applied_twice() {
    use crate::engine::CountUpdates;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    let mut too_late = CountUpdates::new(1);
    too_late.push(Minute(3), &AdId::new("a"), &[5]);
    let out = Output { too_late, ..Output::default() };
    store.commit(0, &BatchRecord::default(), &out, None).unwrap();
    store.reopen().unwrap();
    store.commit(0, &BatchRecord::default(), &out, None).unwrap();
    let late = || {
        let txn = store.db().unwrap().begin_read().unwrap();
        let table = txn.open_table(TOO_LATE).unwrap();
        let v = table.get((3, "a")).unwrap().map(|v| le_u64(&v.value()[..8]));
        v
    };
    assert_eq!(late(), Some(5), "a retry of batch 0 adds nothing");
    store.commit(1, &BatchRecord::default(), &out, None).unwrap();
    assert_eq!(late(), Some(10), "batch 1 adds");
}
