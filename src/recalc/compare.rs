//! Reconciliation's comparison: stored rows against a recomputation, merged in one pass, each
//! difference classified.

use serde::{Deserialize, Serialize};

use super::{Context, Recomputed};
use crate::event::{format_rfc3339, EventTime, Minute, MINUTE_MS};
use crate::store::RangeRows;

/// How a difference between stored and recomputed counts is explained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The archive holds clicks the live path found too late (SPEC §2); recalc counts them.
    TooLate,
    /// The store counted more than the archive holds: raw data is missing from the archive.
    MissingFromArchive,
    Unexplained,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Difference {
    pub minute: String,
    pub minute_ms: i64,
    pub ad_id: String,
    /// `null` for the unfiltered total.
    pub filter: Option<String>,
    pub stored: u64,
    pub recomputed: u64,
    pub difference: i64,
    pub kind: Kind,
}

/// What reconciliation found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub from: String,
    pub to: String,
    pub rows_stored: u64,
    pub rows_recomputed: u64,
    pub events_read: u64,
    pub matches: bool,
    pub too_late: u64,
    pub missing_from_archive: u64,
    pub unexplained: u64,
    /// The command that corrects the too-late differences, when there are any.
    pub fix: Option<String>,
    pub differences: Vec<Difference>,
}

/// Compares stored rows (read in one transaction) with a recomputation of the same range.
pub fn compare(ctx: &Context, rec: &Recomputed, stored: &RangeRows) -> Report {
    let slots = ctx.filters.len() + 1;
    let mut differences = Vec::new();
    // Both sides are sorted by (minute, ad): one merge pass.
    let mut stored_rows = stored.counts.iter().peekable();
    let mut recomputed_rows = rec.counts.iter().peekable();
    loop {
        let (key, s, r) = match (stored_rows.peek(), recomputed_rows.peek()) {
            (None, None) => break,
            (Some((ks, _)), Some((kr, _))) => match ks.cmp(kr) {
                std::cmp::Ordering::Less => {
                    let (k, s) = stored_rows.next().expect("peeked");
                    (k, Some(s), None)
                }
                std::cmp::Ordering::Greater => {
                    let (k, r) = recomputed_rows.next().expect("peeked");
                    (k, None, Some(r))
                }
                std::cmp::Ordering::Equal => {
                    let (k, s) = stored_rows.next().expect("peeked");
                    let (_, r) = recomputed_rows.next().expect("peeked");
                    (k, Some(s), Some(r))
                }
            },
            (Some(_), None) => {
                let (k, s) = stored_rows.next().expect("peeked");
                (k, Some(s), None)
            }
            (None, Some(_)) => {
                let (k, r) = recomputed_rows.next().expect("peeked");
                (k, None, Some(r))
            }
        };
        if s == r {
            continue;
        }
        for slot in 0..slots {
            let sv = s.and_then(|c| c.get(slot)).copied().unwrap_or(0);
            let rv = r.and_then(|c| c.get(slot)).copied().unwrap_or(0);
            if sv == rv {
                continue;
            }
            let late = stored.too_late.get(key).and_then(|c| c.get(slot)).copied().unwrap_or(0);
            let kind = if rv > sv && rv - sv <= late {
                Kind::TooLate
            } else if sv > rv {
                Kind::MissingFromArchive
            } else {
                Kind::Unexplained
            };
            differences.push(Difference {
                minute: format_rfc3339(Minute(key.0).start()),
                minute_ms: Minute(key.0).start().0,
                ad_id: key.1.clone(),
                filter: (slot > 0).then(|| ctx.filters.ids()[slot - 1].clone()),
                stored: sv,
                recomputed: rv,
                difference: rv as i64 - sv as i64,
                kind,
            });
        }
    }
    let count = |k: Kind| differences.iter().filter(|d| d.kind == k).count() as u64;
    let late_minutes: Vec<i64> =
        differences.iter().filter(|d| d.kind == Kind::TooLate).map(|d| d.minute_ms).collect();
    let fix = match (late_minutes.iter().min(), late_minutes.iter().max()) {
        (Some(&lo), Some(&hi)) => Some(format!(
            "adclick recalc --from {} --to {}",
            format_rfc3339(EventTime(lo)),
            format_rfc3339(EventTime(hi + MINUTE_MS))
        )),
        _ => None,
    };
    Report {
        from: format_rfc3339(rec.from.start()),
        to: format_rfc3339(rec.to.start()),
        rows_stored: stored.counts.len() as u64,
        rows_recomputed: rec.counts.len() as u64,
        events_read: rec.progress.events,
        matches: differences.is_empty(),
        too_late: count(Kind::TooLate),
        missing_from_archive: count(Kind::MissingFromArchive),
        unexplained: count(Kind::Unexplained),
        fix,
        differences,
    }
}
