//! `adclick explain AD --minute T`: every archived click of one ad and minute, each with its
//! fate, the audit of one stored count.
//!
//! ```text
//!  archive files of the hours of [minute − horizon, minute end + horizon), the ad's rows only
//!     ▼  sorted by (partition, offset): the order the live path read them
//!  too late: in each minute, the last `too_late + recounted` clicks in log order (the watermark
//!     │  only grows, so once a minute is too late every later click of it is; the store keeps
//!     │  how many per minute and ad, and how many of them a recalculation has counted since)
//!  live dedup: the clicks counted live, in log order; a click is a duplicate of the first
//!     │  counted click with its identity within the horizon of its time (SPEC §1, §2)
//!  recomputed dedup: the same over every click, too-late ones included (what recalc counts)
//!     ▼
//!  each click of the minute: counted · duplicate of (partition, offset) · too late (counted by a
//!  recalculation since, or not) · outside the filter; the counted ones against the stored count
//! ```
//!
//! The fates follow SPEC's definitions, not the engine's code, so the audit checks the engine
//! rather than repeating it. Copies chained over more than a horizon are the limit of the rule,
//! as in recalculation (see the module doc of `recalc`).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Context, JobError, Kind, Scope};
use crate::engine::{Offset, PartitionId};
use crate::event::{format_rfc3339, Click, EventTime, Minute, MINUTE_MS};
use crate::store::AdMinute;

const HOUR_MS: i64 = 3_600_000;

/// Which count to explain.
#[derive(Clone, Debug)]
pub struct Question {
    pub ad: String,
    pub minute: Minute,
    /// A filter's id; `None`: the unfiltered total.
    pub filter: Option<String>,
}

/// What happened to one click.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    Counted,
    /// The same click (SPEC §1) was counted earlier: `duplicate_of`.
    Duplicate,
    /// The minute was past `allowed_lateness` when it arrived; `recalculated` says whether a
    /// recalculation has counted it since.
    TooLate,
    /// It does not match the filter asked about.
    OutsideFilter,
}

/// A click's place in the source: (partition, offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct At {
    pub partition: u32,
    pub offset: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainedClick {
    pub partition: u32,
    pub offset: u64,
    pub click_timestamp: String,
    pub click_timestamp_ms: i64,
    pub user_id: Option<String>,
    pub ip: Option<String>,
    pub country: Option<String>,
    pub click_id: Option<String>,
    pub fate: Fate,
    /// Whether the stored count includes it.
    pub counted: bool,
    /// The click it repeats: for a duplicate, and for a too-late click that a recalculation
    /// does not count because it repeats one.
    pub duplicate_of: Option<At>,
    /// For a too-late click: whether a recalculation has counted it since.
    pub recalculated: Option<bool>,
}

/// The audit of one stored count.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Explained {
    pub ad_id: String,
    pub minute: String,
    pub minute_ms: i64,
    pub filter: Option<String>,
    pub stored: u64,
    /// The clicks found counted; equal to `stored` unless something is wrong.
    pub counted: u64,
    pub matches: bool,
    /// When they differ, the difference named as `reconcile` names it.
    pub difference: Option<Kind>,
    /// Per fate, how many clicks.
    pub fates: BTreeMap<String, u64>,
    /// Too-late clicks not counted yet that a recalculation would count.
    pub recalc_would_count: u64,
    /// The command that counts them, when there are any.
    pub fix: Option<String>,
    pub clicks: Vec<ExplainedClick>,
    /// Archived rows of the ad read (the minute and its dedup horizons).
    pub rows_read: u64,
    pub elapsed_s: f64,
}

/// Explains the stored count `stored` asks about, from the archive (see the module doc).
/// `scope` as for recomputation: per partition and below a snapshot's offsets when scaled out.
pub fn explain(
    ctx: &Context,
    scope: &Scope,
    q: &Question,
    stored: &AdMinute,
) -> Result<Explained, JobError> {
    let started = Instant::now();
    let slot = match &q.filter {
        None => 0,
        Some(f) => {
            1 + ctx.filters.index_of(f).ok_or_else(|| {
                JobError::Invalid(format!(
                    "filter: no filter {f:?} (configured: {})",
                    ctx.filters.ids().join(", ")
                ))
            })?
        }
    };
    let horizon = ctx.engine.dedup_horizon_ms;
    let (lo, hi) = (q.minute.start().0 - horizon, q.minute.start().0 + MINUTE_MS + horizon);
    let mut files = Vec::new();
    for hour in lo.div_euclid(HOUR_MS)..=(hi - 1).div_euclid(HOUR_MS) {
        files.extend(ctx.archive.files_of_hour(hour)?);
    }
    // A file at a time per thread, only the ad's rows kept: memory follows one decoded file
    // (at most `archive_file_rows` clicks) per core, not the hours read.
    let mut rows: Vec<(PartitionId, Offset, Click<'static>)> = files
        .par_iter()
        .map(|f| {
            let batches = ctx.archive.read(f)?;
            let mut kept = Vec::new();
            for b in &batches {
                let rows = crate::archive::clicks_where(b, |ad, t| ad == q.ad && t >= lo && t < hi)
                    .map_err(|e| {
                        crate::archive::ArchiveError::Format(format!(
                            "archive file {}: {e}",
                            f.location
                        ))
                    })?;
                kept.extend(
                    rows.into_iter()
                        .filter(|(p, o, _)| scope.reads(*p, *o))
                        .map(|(p, o, c)| (p, o, c.into_owned())),
                );
            }
            Ok(kept)
        })
        .collect::<Result<Vec<_>, crate::archive::ArchiveError>>()?
        .into_iter()
        .flatten()
        .collect();
    rows.sort_unstable_by_key(|(p, o, _)| (*p, *o));
    let audit = Audit {
        key: &ctx.engine.identity_key,
        horizon: ctx.engine.dedup_horizon_ms,
        per_partition: scope.per_partition,
        stored,
    };
    let fates = audit.run(&rows);

    let mut out = Explained {
        ad_id: q.ad.clone(),
        minute: format_rfc3339(q.minute.start()),
        minute_ms: q.minute.start().0,
        filter: q.filter.clone(),
        stored: stored.counts.get(slot).copied().unwrap_or(0),
        counted: 0,
        matches: false,
        difference: None,
        fates: BTreeMap::new(),
        recalc_would_count: 0,
        fix: None,
        clicks: Vec::new(),
        rows_read: rows.len() as u64,
        elapsed_s: 0.0,
    };
    for ((p, o, c), f) in rows.iter().zip(fates) {
        if c.time.minute() != q.minute {
            continue;
        }
        let outside = slot > 0 && !ctx.filters.matches(c).contains(slot - 1);
        let (fate, counted, duplicate_of, recalculated) = if outside {
            (Fate::OutsideFilter, false, None, None)
        } else {
            match f {
                Verdict::Counted => (Fate::Counted, true, None, None),
                Verdict::Duplicate(of) => (Fate::Duplicate, false, Some(of), None),
                Verdict::TooLate { recounted, repeats } => {
                    let counted = recounted && repeats.is_none();
                    if !recounted && repeats.is_none() {
                        out.recalc_would_count += 1;
                    }
                    (Fate::TooLate, counted, repeats, Some(counted))
                }
            }
        };
        out.counted += u64::from(counted);
        let name = serde_json::to_value(fate).ok().and_then(|v| v.as_str().map(String::from));
        *out.fates.entry(name.unwrap_or_default()).or_default() += 1;
        out.clicks.push(ExplainedClick {
            partition: p.0,
            offset: o.0,
            click_timestamp: format_rfc3339(c.time),
            click_timestamp_ms: c.time.0,
            user_id: c.user_id.as_deref().map(String::from),
            ip: c.ip.map(|ip| ip.to_string()),
            country: c.country.map(|c| c.as_str().to_string()),
            click_id: c.click_id.as_deref().map(String::from),
            fate,
            counted,
            duplicate_of,
            recalculated,
        });
    }
    out.matches = out.counted == out.stored;
    out.difference = match out.counted.cmp(&out.stored) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Less => Some(Kind::MissingFromArchive),
        std::cmp::Ordering::Greater => Some(Kind::Unexplained),
    };
    if out.recalc_would_count > 0 {
        out.fix = Some(format!(
            "adclick recalc --from {} --to {}",
            format_rfc3339(q.minute.start()),
            format_rfc3339(EventTime(q.minute.start().0 + MINUTE_MS))
        ));
    }
    out.elapsed_s = started.elapsed().as_secs_f64();
    Ok(out)
}

/// What the rules say of one click, before the filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Counted,
    Duplicate(At),
    /// `recounted`: in the part of the minute's too-late clicks that a recalculation has counted
    /// since; `repeats`: the click it repeats when every click counts (recalc does not count it).
    TooLate {
        recounted: bool,
        repeats: Option<At>,
    },
}

/// The rules of SPEC §1–§2 applied to the ad's clicks in log order.
struct Audit<'a> {
    key: &'a crate::event::IdentityKey,
    horizon: i64,
    per_partition: bool,
    stored: &'a AdMinute,
}

impl Audit<'_> {
    /// A verdict per row of `rows` (sorted by partition and offset).
    fn run(&self, rows: &[(PartitionId, Offset, Click<'_>)]) -> Vec<Verdict> {
        // Too late: in each minute, the last `pending + recounted` clicks in log order, the
        // first `recounted` of those counted by a recalculation since.
        let mut per_minute: HashMap<i64, u64> = HashMap::new();
        for (_, _, c) in rows {
            *per_minute.entry(c.time.minute().0).or_default() += 1;
        }
        let mut seen: HashMap<i64, u64> = HashMap::new();
        let late: Vec<Option<bool>> = rows
            .iter()
            .map(|(_, _, c)| {
                let m = c.time.minute().0;
                let (pending, recounted) = self.stored.too_late.get(&m).copied().unwrap_or((0, 0));
                let i = seen.entry(m).or_default();
                let first_late = per_minute[&m].saturating_sub(pending + recounted);
                let out = (*i >= first_late).then_some(*i < first_late + recounted);
                *i += 1;
                out
            })
            .collect();
        let live = self.dedup(rows, |i| late[i].is_none());
        let all = self.dedup(rows, |_| true);
        (0..rows.len())
            .map(|i| match late[i] {
                None => live[i].map_or(Verdict::Counted, Verdict::Duplicate),
                Some(recounted) => Verdict::TooLate { recounted, repeats: all[i] },
            })
            .collect()
    }

    /// For each row that `takes_part`: the earlier counted click it repeats, if any. A click
    /// repeats one counted earlier in log order with the same identity and an event time within
    /// the horizon of its own.
    fn dedup(
        &self,
        rows: &[(PartitionId, Offset, Click<'_>)],
        takes_part: impl Fn(usize) -> bool,
    ) -> Vec<Option<At>> {
        // (partition when dedup is per partition, identity) → the counted clicks' times.
        type Counted = HashMap<(Option<PartitionId>, u128), Vec<(i64, At)>>;
        let mut counted = Counted::new();
        rows.iter()
            .enumerate()
            .map(|(i, (p, o, c))| {
                if !takes_part(i) {
                    return None;
                }
                let id = (self.per_partition.then_some(*p), c.identity_with(self.key).0);
                let earlier = counted.entry(id).or_default();
                let hit = earlier.iter().find(|(t, _)| (c.time.0 - t).abs() <= self.horizon);
                match hit {
                    Some((_, at)) => Some(*at),
                    None => {
                        earlier.push((c.time.0, At { partition: p.0, offset: o.0 }));
                        None
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineConfig, Payload, Record};
    use crate::filter::Filters;
    use proptest::prelude::*;

    const HORIZON: i64 = 240_000;

    fn config() -> EngineConfig {
        EngineConfig {
            watermark_delay_ms: 5_000,
            idle_timeout_ms: 20_000,
            allowed_lateness_ms: 120_000,
            dedup_horizon_ms: HORIZON,
            max_clock_skew_ms: 86_400_000,
            top_n: 2,
            shards: 2,
            dedup_capacity: 0,
            identity_key: Default::default(),
        }
    }

    /// Per (minute, ad): the clicks the audit finds counted.
    fn counted(
        rows: &[(PartitionId, Offset, Click<'_>)],
        stored: &AdMinute,
    ) -> BTreeMap<(i64, String), u64> {
        let key = Default::default();
        let audit = Audit { key: &key, horizon: HORIZON, per_partition: false, stored };
        let mut out = BTreeMap::new();
        for ((_, _, c), v) in rows.iter().zip(audit.run(rows)) {
            let n = match v {
                Verdict::Counted | Verdict::TooLate { recounted: true, repeats: None } => 1,
                _ => 0,
            };
            *out.entry((c.time.minute().0, c.ad_id.to_string())).or_default() += n;
        }
        out.retain(|_, n| *n > 0);
        out
    }

    proptest! {
        /// The audit's rules and the engine agree on every count: with nothing too late (the
        /// live dedup) and with every click too late and recounted (the dedup over all clicks,
        /// as recalculation counts). Copies fall within and beyond the horizon of each other.
        #[test]
        fn the_audit_counts_what_the_engine_recomputes(
            clicks in prop::collection::vec((0u8..3, 0i64..600_000, 0u8..5, prop::option::of(0u8..4)), 1..200)
        ) {
            let mut rows: Vec<(PartitionId, Offset, Click<'static>)> = clicks
                .iter()
                .enumerate()
                .map(|(i, (ad, t, user, id))| {
                    let click = Click {
                        ad_id: format!("ad{ad}").into(),
                        time: EventTime(*t),
                        user_id: Some(format!("u{user}").into()),
                        ip: None,
                        country: None,
                        click_id: id.map(|c| format!("c{c}").into()),
                    };
                    (PartitionId(u32::from(*ad) % 2), Offset(i as u64), click)
                })
                .collect();
            rows.sort_by_key(|(p, o, _)| (*p, *o));
            let mut engine =
                Engine::recompute(config(), std::sync::Arc::new(Filters::default())).unwrap();
            let records: Vec<Record<'_>> = rows
                .iter()
                .map(|(p, o, c)| Record { partition: *p, offset: *o, payload: Payload::Click(c.clone()) })
                .collect();
            let mut recomputed: BTreeMap<(i64, String), u64> = BTreeMap::new();
            for out in [engine.process(EventTime(0), &records), engine.finish(EventTime(700_000))] {
                for (m, ad, c) in out.counts.iter() {
                    recomputed.insert((m.0, ad.to_string()), c[0]);
                }
            }
            recomputed.retain(|_, n| *n > 0);
            prop_assert_eq!(&counted(&rows, &AdMinute::default()), &recomputed);
            // Every click too late, all of them counted by a recalculation since.
            let mut all_late = AdMinute::default();
            for (_, _, c) in &rows {
                all_late.too_late.entry(c.time.minute().0).or_insert((0, 0)).1 += 1;
            }
            prop_assert_eq!(&counted(&rows, &all_late), &recomputed);
        }
    }
}
