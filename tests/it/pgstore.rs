//! The scale-out commit path against the reference model, in process: the engine workloads of
//! `engine.rs` fed partition by partition through `scaleout::aggregate::Owned` and committed to
//! a real PostgreSQL (see `scaleout.rs` for the service variables), with owners crashing at
//! random (state dropped, partition claimed again and restored from PostgreSQL), zombies whose
//! late commits must be refused, commits skipped (records held over to a later wall time), event
//! times a month behind the wall clock, and partitions served in a shuffled order. Checkpoint
//! chains are compacted into full checkpoints on the way, so restores read both kinds.
//!
//! The oracle is the model of `model.rs` run per partition (each partition has its own engine in
//! the scale-out deployment) over the history that was committed: every batch with the wall time
//! at which its records were committed. What a crashed owner processed but did not commit is not
//! history: it is read again by the next owner.

use std::collections::BTreeMap;

use adclick::engine::{EngineConfig, PartitionId, Slot};
use adclick::event::Minute;
use adclick::scaleout::aggregate::Owned;
use adclick::scaleout::{pg, PgResults};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::engine::{filters, small_config, workload};
use crate::model::{run_model, Batch, Folded};
use crate::scaleout::{fresh, services};

/// One partition as the driver sees it: what its source has delivered, its owner (if any), the
/// history committed so far and what is pending since the last commit.
struct Lane {
    log: Vec<Vec<u8>>,
    owner: Option<Owned>,
    committed: Vec<Batch>,
    /// Delivered by the source, not yet committed.
    pending: Vec<(u32, u64, Vec<u8>)>,
    /// The source's position: the next offset it delivers.
    delivered: usize,
    restored: bool,
}

struct Run {
    model: Vec<Folded>,
    crashes: usize,
    zombies_refused: usize,
    held_over: usize,
    /// Checkpoint chains replaced by a full checkpoint (the zombies' not included).
    compactions: u64,
    /// Whether the midway check met minutes both rolled into hour sums and not.
    mixed: bool,
}

fn drive(url: &str, cfg: &EngineConfig, batches: &[Batch], parts: u32, seed: u64) -> Run {
    let filters = filters();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut client = pg::connect(url).expect("connect");
    pg::migrate(&mut client).expect("migrate");
    let mut days = pg::Days::new();
    let mut lanes: Vec<Lane> = (0..parts)
        .map(|_| Lane {
            log: Vec::new(),
            owner: None,
            committed: Vec::new(),
            pending: Vec::new(),
            delivered: 0,
            restored: false,
        })
        .collect();
    // Paused owners, with the batch they paused in: their partition is claimed again from the
    // next batch on.
    let mut zombies: Vec<(usize, Owned)> = Vec::new();
    let (mut crashes, mut zombies_refused, mut held_over, mut compactions) = (0, 0, 0, 0);
    let mut mixed = false;
    let last = batches.len() - 1;
    // Where owners die and pause: (batch, partition), a few of each, anywhere but the end.
    let mut faults = |n: usize| -> Vec<(usize, u32)> {
        (0..n).map(|_| (rng.random_range(1..last), rng.random_range(0..parts))).collect()
    };
    let (crash_at, pause_at) = (faults(6), faults(3));
    for (i, b) in batches.iter().enumerate() {
        // The source: records in offset order per partition (re-sends are below its position).
        for (p, o, line) in &b.records {
            let lane = &mut lanes[*p as usize];
            if *o as usize == lane.log.len() {
                lane.log.push(line.clone());
            }
        }
        let mut order: Vec<u32> = (0..parts).collect();
        order.shuffle(&mut rng);
        for p in order {
            let lane = &mut lanes[p as usize];
            if lane.owner.is_none() {
                let claim = pg::claim(&mut client, PartitionId(p), "test").expect("claim");
                let owned =
                    Owned::restore(cfg, &filters, PartitionId(p), claim, b.wall).expect("restore");
                // The source delivers from the committed position again.
                lane.delivered = owned.next_offset() as usize;
                lane.pending.clear();
                lane.owner = Some(owned);
                lane.restored = true;
            }
            for (o, line) in lane.log.iter().enumerate().skip(lane.delivered) {
                lane.pending.push((p, o as u64, line.clone()));
            }
            lane.delivered = lane.log.len();
            // Now and then a commit is not due yet: the records wait for a later wall time
            // (never at the end, and never for a fresh owner, whose assignment time counts).
            if i < last && !lane.restored && rng.random_bool(0.2) {
                held_over += 1;
                continue;
            }
            if crash_at.contains(&(i, p)) {
                // The owner dies before its commit: nothing of it is history.
                compactions += lane.owner.take().expect("owned").compactions();
                crashes += 1;
                continue;
            }
            let owned = lane.owner.as_mut().expect("owned");
            if pause_at.contains(&(i, p)) {
                // The owner pauses holding records; another process claims the partition.
                for (_, o, line) in lane.pending.drain(..) {
                    owned.push(o as i64, line);
                }
                zombies.push((i, lane.owner.take().expect("owned")));
                continue;
            }
            // Committed in slices, at the same wall time: more commits, longer chains.
            let pending = std::mem::take(&mut lane.pending);
            for (k, slice) in pending.chunks(40).enumerate() {
                for (_, o, line) in slice {
                    owned.push(*o as i64, line.clone());
                }
                owned.commit(&mut client, &mut days, b.wall).expect("commit");
                lane.committed.push(Batch {
                    wall: b.wall,
                    records: slice.to_vec(),
                    assign: if lane.restored && k == 0 { vec![p] } else { Vec::new() },
                });
            }
            if pending.is_empty() {
                owned.commit(&mut client, &mut days, b.wall).expect("commit");
                let assign = if lane.restored { vec![p] } else { Vec::new() };
                lane.committed.push(Batch { wall: b.wall, records: Vec::new(), assign });
            }
            lane.restored = false;
        }
        if i == last / 2 {
            // Midway, with some minutes rolled into hour sums and newer ones not yet.
            let model: Vec<Folded> =
                lanes.iter().map(|l| run_model(cfg, &filters, &l.committed)).collect();
            let what = format!("seed {seed}, midway");
            let (rolled, unrolled) = check_hours(url, &what);
            mixed = rolled > 0 && unrolled > 0;
            check_popular(url, cfg, parts, &model, &what);
        }
        // A zombie wakes up after its partition was claimed again: it must be refused.
        let woken = zombies.iter().position(|(at, _)| *at < i && rng.random_bool(0.3));
        if let Some(k) = woken {
            let (_, mut z) = zombies.swap_remove(k);
            match z.commit(&mut client, &mut days, b.wall) {
                Err(pg::PgError::Fenced(..)) => zombies_refused += 1,
                other => panic!("a zombie's commit went through: {other:?}"),
            }
        }
    }
    for (_, mut z) in zombies {
        assert!(matches!(
            z.commit(&mut client, &mut days, batches[last].wall),
            Err(pg::PgError::Fenced(..))
        ));
        zombies_refused += 1;
    }
    compactions += lanes.iter().flat_map(|l| &l.owner).map(|o| o.compactions()).sum::<u64>();
    let model = lanes.iter().map(|l| run_model(cfg, &filters, &l.committed)).collect();
    Run { model, crashes, zombies_refused, held_over, compactions, mixed }
}

/// Every stored row, per partition, in the model's shape.
fn stored(url: &str, parts: u32) -> Vec<Folded> {
    let mut client = pg::connect(url).expect("connect");
    let mut out: Vec<Folded> = (0..parts).map(|_| Folded::default()).collect();
    for r in client
        .query("SELECT minute, slot, ad_id, partition, count FROM adclick_counts", &[])
        .unwrap()
    {
        let p: i32 = r.get(3);
        let key = (r.get::<_, i64>(0), r.get::<_, String>(2), r.get::<_, i16>(1) as usize);
        out[p as usize].counts.insert(key, r.get::<_, i64>(4) as u64);
    }
    for r in client
        .query("SELECT minute, slot, partition, ad_ids, counts FROM adclick_tops", &[])
        .unwrap()
    {
        let p: i32 = r.get(2);
        let ids: Vec<String> = r.get(3);
        let counts: Vec<i64> = r.get(4);
        if !ids.is_empty() {
            let list = ids.into_iter().zip(counts.into_iter().map(|c| c as u64)).collect();
            out[p as usize].tops.insert((r.get(0), r.get::<_, i16>(1) as usize), list);
        }
    }
    for r in client
        .query(
            "SELECT partition, engine_watermark, counted, duplicates, too_late, invalid \
             FROM adclick_partitions",
            &[],
        )
        .unwrap()
    {
        let f = &mut out[r.get::<_, i32>(0) as usize];
        f.watermark = r.get(1);
        f.counters.counted = r.get::<_, i64>(2) as u64;
        f.counters.duplicate = r.get::<_, i64>(3) as u64;
        f.counters.too_late = r.get::<_, i64>(4) as u64;
        // The invalid lines by kind are not stored; their total is.
        f.counters.valid = r.get::<_, i64>(5) as u64;
    }
    out
}

/// The `n` ads with the most clicks in `[from, to)` in `slot`, by the model.
fn model_popular(
    model: &[Folded],
    slot: usize,
    from: i64,
    to: i64,
    n: usize,
) -> Vec<(String, u64)> {
    let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
    for f in model {
        for ((m, ad, s), c) in &f.counts {
            if *s == slot && (from..to).contains(m) {
                *sums.entry(ad).or_default() += c;
            }
        }
    }
    let mut v: Vec<(String, u64)> = sums.into_iter().map(|(a, c)| (a.to_string(), c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.as_bytes().cmp(b.0.as_bytes())));
    v.truncate(n);
    v
}

fn check(url: &str, cfg: &EngineConfig, parts: u32, run: &Run, what: &str) {
    let got = stored(url, parts);
    for (p, (g, m)) in got.iter().zip(&run.model).enumerate() {
        let what = format!("{what}, partition {p}");
        assert_eq!(g.counts, m.counts, "{what}: counts");
        for (k, v) in &m.tops {
            assert_eq!(g.tops.get(k), Some(v), "{what}: top-N of {k:?}");
        }
        assert_eq!(g.tops.len(), m.tops.len(), "{what}: top-N lists");
        assert_eq!(g.watermark, m.watermark, "{what}: watermark");
        let (gc, mc) = (&g.counters, &m.counters);
        assert_eq!(
            (gc.counted, gc.duplicate, gc.too_late, gc.valid),
            (mc.counted, mc.duplicate, mc.too_late, mc.invalid_total()),
            "{what}: counted, duplicate, too late, invalid"
        );
    }
    check_hours(url, what);
    check_popular(url, cfg, parts, &run.model, what);
}

/// The hour sums hold exactly the minutes below each partition's roll point. Returns how many
/// count rows are rolled and how many are not yet.
fn check_hours(url: &str, what: &str) -> (i64, i64) {
    let mut client = pg::connect(url).expect("connect");
    let mismatched: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT floor(c.minute / 60.0)::bigint AS hour, c.slot, c.ad_id, \
             c.partition, sum(c.count) AS n FROM adclick_counts c JOIN adclick_partitions p \
             ON p.partition = c.partition WHERE c.minute < p.rolled_through GROUP BY 1, 2, 3, 4) m \
             FULL JOIN adclick_hours h USING (hour, slot, ad_id, partition) \
             WHERE m.n IS DISTINCT FROM h.count",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(mismatched, 0, "{what}: hour sums that differ from their rolled minutes");
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE c.minute < p.rolled_through), \
             count(*) FILTER (WHERE c.minute >= p.rolled_through) \
             FROM adclick_counts c JOIN adclick_partitions p ON p.partition = c.partition",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// Popular ads through the query role's reads, against the model's counts.
fn check_popular(url: &str, cfg: &EngineConfig, parts: u32, model: &[Folded], what: &str) {
    // Single final minutes (the merged top-N lists), windows of whole and partial hours.
    let results = PgResults::new(url, parts, cfg.top_n).expect("query connection");
    let minutes: Vec<i64> = model.iter().flat_map(|f| f.counts.keys().map(|k| k.0)).collect();
    let (lo, hi) = (*minutes.iter().min().unwrap(), *minutes.iter().max().unwrap() + 1);
    let mut rng = SmallRng::seed_from_u64(lo as u64);
    let mut windows = vec![(lo, hi), (lo - 90, hi + 90)];
    for _ in 0..12 {
        let from = rng.random_range(lo - 5..hi);
        windows.push((from, from + 1));
        windows.push((from, (from + rng.random_range(2..200)).min(hi + 5)));
    }
    for (from, to) in windows {
        for slot in 0..3 {
            for n in [1, cfg.top_n, 3 * cfg.top_n] {
                let (got, _) = results
                    .popular(Slot::from_index(slot), Minute(from), Minute(to), n)
                    .expect("popular");
                let got: Vec<(String, u64)> =
                    got.into_iter().map(|(a, c)| (a.to_string(), c)).collect();
                assert_eq!(
                    got,
                    model_popular(model, slot, from, to, n),
                    "{what}: popular over [{from}, {to}) slot {slot} n {n}"
                );
            }
        }
    }
}

#[test]
fn the_commit_path_matches_the_model_across_crashes_and_zombies() {
    let Some((_, pg_url)) = services() else { return };
    for seed in 1..=4u64 {
        let parts = 2 + (seed % 3) as u32;
        let mut batches = workload(seed, 12_000, parts);
        let month_behind = seed % 2 == 0;
        if month_behind {
            // The same clicks, replayed a month after they happened: history.
            for b in &mut batches {
                b.wall += 30 * 24 * 3_600_000;
            }
        }
        // History is counted while its partition delivers; once it idles, its watermark follows
        // the wall clock (a month ahead) and the rest is too late, or corrects final minutes
        // within the two hours of lateness.
        let cfg = if month_behind {
            EngineConfig {
                allowed_lateness_ms: 2 * 3_600_000,
                dedup_horizon_ms: 2 * 3_600_000 + 120_000,
                ..small_config(1)
            }
        } else {
            small_config(1)
        };
        let (url, _) = fresh(&pg_url, &format!("pgstore{seed}"));
        let run = drive(&url, &cfg, &batches, parts, seed);
        let what = format!("seed {seed}, {parts} partitions, month behind {month_behind}");
        eprintln!(
            "{what}: {} crashes, {} zombies refused, {} commits held over, {} compactions",
            run.crashes, run.zombies_refused, run.held_over, run.compactions
        );
        assert!(
            run.crashes > 0 && run.zombies_refused > 0 && run.held_over > 0 && run.compactions > 0,
            "{what}: the faults must happen"
        );
        if !month_behind {
            assert!(run.mixed, "{what}: midway, minutes must be both rolled and not");
        }
        let sum = |f: fn(&Folded) -> u64| run.model.iter().map(f).sum::<u64>();
        let (counted, dup, late, too_late) = (
            sum(|m| m.counters.counted),
            sum(|m| m.counters.duplicate),
            sum(|m| m.counters.late_corrected),
            sum(|m| m.counters.too_late),
        );
        eprintln!("{what}: {counted} counted, {dup} duplicate, {late} late, {too_late} too late");
        assert!(counted > 2_000 && dup > 100, "{what}: the workload must count and deduplicate");
        assert!(late > 0 && too_late > 0, "{what}: the workload must be late and too late");
        check(&url, &cfg, parts, &run, &what);
        if seed == 1 {
            // A database from before the hour sums (schema version 1): migrated, it answers
            // from the counts; the next commit of each partition rolls its sealed minutes.
            let mut client = pg::connect(&url).expect("connect");
            client
                .batch_execute(
                    "DROP TABLE adclick_hours, adclick_archive, adclick_archive_offsets, adclick_too_late; \
                     ALTER TABLE adclick_partitions DROP COLUMN rolled_through; \
                     UPDATE adclick_schema SET version = 1",
                )
                .unwrap();
            pg::migrate(&mut client).expect("migrate from version 1");
            let what = format!("{what}, migrated from version 1");
            check(&url, &cfg, parts, &run, &what);
            let wall = batches.last().unwrap().wall;
            let mut days = pg::Days::new();
            for p in 0..parts {
                let claim = pg::claim(&mut client, PartitionId(p), "upgraded").expect("claim");
                let mut owned =
                    Owned::restore(&cfg, &filters(), PartitionId(p), claim, wall).expect("restore");
                owned.commit(&mut client, &mut days, wall).expect("commit");
            }
            let (rolled, _) = check_hours(&url, &what);
            assert!(rolled > 0, "{what}: nothing rolled into hour sums");
            check_popular(&url, &cfg, parts, &run.model, &what);
        }
    }
}

#[test]
fn a_commit_that_seals_its_own_minutes_rolls_them_even_after_a_jump() {
    let Some((_, pg_url)) = services() else { return };
    let (url, _) = fresh(&pg_url, "pgroll");
    let mut client = pg::connect(&url).expect("connect");
    pg::migrate(&mut client).expect("migrate");
    let mut days = pg::Days::new();
    let cfg = small_config(1);
    let base = 1_796_000_000_000i64 / 60_000 * 60_000;
    let line =
        |i: usize, t: i64| format!(r#"{{"ad_id":"a","click_timestamp":{t},"click_id":"c{i}"}}"#);
    let wall = base + 3 * 86_400_000 + 600_000;
    let claim = pg::claim(&mut client, PartitionId(0), "test").expect("claim");
    let mut owned = Owned::restore(&cfg, &filters(), PartitionId(0), claim, wall).expect("restore");
    // One commit of eleven minutes in order: the first ones are sealed by its own watermark,
    // on the first roll of the partition.
    for i in 0..11 {
        owned.push(i as i64, line(i, base + i as i64 * 60_000).into_bytes());
    }
    owned.commit(&mut client, &mut days, wall).expect("a first commit that seals its minutes");
    let (rolled, _) = check_hours(&url, "first commit");
    assert!(rolled > 0, "the sealed minutes of the first commit are rolled");
    // Three days later: the watermark jumps past more than two days of minutes at once.
    owned.push(11, line(11, base + 3 * 86_400_000).into_bytes());
    owned.commit(&mut client, &mut days, wall).expect("a commit after a jump of three days");
    let (rolled, unrolled) = check_hours(&url, "after the jump");
    assert_eq!((rolled, unrolled), (11, 1), "every minute but the newest is rolled");
    let results = PgResults::new(&url, 1, cfg.top_n).expect("query connection");
    let m = base / 60_000;
    for (from, to, n) in [(m - 60, m + 5 * 1440, 12), (m, m + 11, 11), (m + 3, m + 200, 8)] {
        let (got, _) =
            results.popular(Slot::from_index(0), Minute(from), Minute(to), 5).expect("popular");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, n, "popular over [{from}, {to})");
    }
}

/// Commits every batch twice, as a retry does after a connection cut once the commit had landed.
struct Twice<'a>(&'a mut postgres::Client);

impl pg::Committer for Twice<'_> {
    fn commit(&mut self, days: &mut pg::Days, c: &pg::Commit<'_>) -> Result<(), pg::PgError> {
        pg::commit(self.0, days, c)?;
        pg::commit(self.0, days, c)
    }
}

/// A commit retried after it landed (its answer lost with the connection) changes nothing: hour
/// sums, which add up, are not added twice.
#[test]
fn a_commit_retried_after_it_landed_is_not_applied_twice() {
    let Some((_, pg_url)) = services() else { return };
    let (url, _) = fresh(&pg_url, "pgretry");
    let mut client = pg::connect(&url).expect("connect");
    pg::migrate(&mut client).expect("migrate");
    let mut days = pg::Days::new();
    let cfg = small_config(1);
    let base = 1_796_000_000_000i64 / 60_000 * 60_000;
    let wall = base + 86_400_000;
    let claim = pg::claim(&mut client, PartitionId(0), "test").expect("claim");
    let mut owned = Owned::restore(&cfg, &filters(), PartitionId(0), claim, wall).expect("restore");
    for i in 0..11 {
        let t = base + i * 60_000;
        let line = format!(r#"{{"ad_id":"a","click_timestamp":{t},"click_id":"c{i}"}}"#);
        owned.push(i, line.into_bytes());
    }
    owned.commit(&mut Twice(&mut client), &mut days, wall).expect("commit, twice");
    let (rolled, _) = check_hours(&url, "a commit applied twice");
    assert!(rolled > 0, "the commit rolled minutes into hour sums");
    let results = PgResults::new(&url, 1, cfg.top_n).expect("query connection");
    let m = base / 60_000;
    let (got, _) = results.popular(Slot::from_index(0), Minute(m), Minute(m + 11), 5).unwrap();
    assert_eq!(got[0].1, 11, "{got:?}");
}

/// Accepts every commit (the idle rule's steps need no database).
struct Accepting;

impl pg::Committer for Accepting {
    fn commit(&mut self, _: &mut pg::Days, _: &pg::Commit<'_>) -> Result<(), pg::PgError> {
        Ok(())
    }
}

/// The idle rule of a partition that has delivered no valid click trusts no end offset: its
/// watermark advances only once the end marker it sent is read back with nothing uncommitted
/// before it, and only to when the marker was sent; a valid click read before the marker (a
/// record that was in the broker, unread) stops the rule for good.
#[test]
fn an_empty_partition_advances_only_after_reading_its_own_end_marker() {
    use adclick::scaleout::aggregate::{IdleStep, MARKER_RESEND_MS};
    use adclick::scaleout::marker;
    let cfg = small_config(1);
    let wall = 1_796_000_000_000i64;
    let claim =
        || pg::Claim { epoch: 1, next_offset: 0, files: Vec::new(), rolled_through: i64::MIN };
    let restore = || Owned::restore(&cfg, &filters(), PartitionId(0), claim(), wall).unwrap();
    let invalid = |i: i64| format!(r#"{{"click_id":"x{i}"}}"#).into_bytes();
    let delay = cfg.watermark_delay_ms;
    let mut days = pg::Days::new();

    // Only invalid lines before the marker: the watermark follows the marker's send time.
    let mut o = restore();
    for i in 0..3 {
        o.push(i, invalid(i));
    }
    assert_eq!(o.idle_step(wall, delay), IdleStep::Wait, "records not committed yet");
    o.commit(&mut Accepting, &mut days, wall).unwrap();
    let IdleStep::SendMarker(nonce) = o.idle_step(wall, delay) else { panic!("a marker") };
    assert_eq!(o.idle_step(wall + 500, delay), IdleStep::Wait, "waiting for it");
    o.push(3, marker(nonce ^ 1, wall)); // another owner's marker
    assert_eq!(o.idle_step(wall + 600, delay), IdleStep::Wait, "not its own marker");
    o.push(4, invalid(4));
    o.push(5, marker(nonce, wall));
    assert_eq!(o.idle_step(wall + 700, delay), IdleStep::Wait, "offset 4 is not committed yet");
    o.commit(&mut Accepting, &mut days, wall + 700).unwrap();
    let want = IdleStep::Advance(adclick::engine::Watermark::at(wall - delay), 6);
    assert_eq!(o.idle_step(wall + 800, delay), want);
    assert_eq!(o.next_offset(), 6, "the marker is passed, not processed");
    // A marker lost: sent again after a while.
    let IdleStep::SendMarker(_) = o.idle_step(wall + 900, delay) else { panic!("the next one") };
    assert_eq!(o.idle_step(wall + 900 + MARKER_RESEND_MS - 1, delay), IdleStep::Wait);
    assert!(matches!(o.idle_step(wall + 900 + MARKER_RESEND_MS, delay), IdleStep::SendMarker(_)));

    // A valid click that was in the broker before the marker, read only now: never advanced.
    let mut o = restore();
    o.push(0, invalid(0));
    o.commit(&mut Accepting, &mut days, wall).unwrap();
    let IdleStep::SendMarker(nonce) = o.idle_step(wall, delay) else { panic!("a marker") };
    let t = wall - 600_000;
    o.push(1, format!(r#"{{"ad_id":"a","click_timestamp":{t},"click_id":"c"}}"#).into_bytes());
    o.push(2, marker(nonce, wall));
    o.commit(&mut Accepting, &mut days, wall + 100).unwrap();
    for later in [200, 60_000, 3_600_000] {
        assert_eq!(o.idle_step(wall + later, delay), IdleStep::Wait, "the partition delivered");
    }
}
