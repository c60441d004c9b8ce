//! Window functions over one ad's committed per-minute counts: tumbling, hopping, sliding and
//! session windows, at the resolution of the minute (sizes, hops and gaps are whole minutes).
//!
//! ```text
//!  per-minute counts of [read.from, read.to) (minutes with clicks) ─▶ prefix sums ─▶ windows
//!  tumbling  size, aligned to origin:       every window whose start lies in [from, to)
//!  hopping   size every hop, from origin:   every window whose start lies in [from, to)
//!  sliding   size:                          at each minute m of [from, to), [m + 1 − size, m + 1)
//!  session   gap:                           runs of minutes with clicks in [from, to) whose
//!                                           neighbours are less than gap empty minutes apart
//! ```
//!
//! A window covers its whole span even where it reaches outside `[from, to)`: [`Spec::read`]
//! says which minutes to read for that. A window is final when every minute it covers is final
//! (a session: also the `gap` minutes after it, which a late click could join to it). Pure: the
//! caller reads the counts and the watermark in one read, so `final` matches the counts.

use crate::engine::Watermark;
use crate::event::Minute;

/// Which windows, in minutes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tumbling { size: i64, origin: i64 },
    Hopping { size: i64, hop: i64, origin: i64 },
    Sliding { size: i64 },
    Session { gap: i64 },
}

/// The windows asked for over `[from, to)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub kind: Kind,
    pub from: Minute,
    pub to: Minute,
}

/// One window: `[start, end)` and its clicks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: Minute,
    pub end: Minute,
    pub count: u64,
    pub final_: bool,
    /// Sessions only: an earlier minute with clicks, before `from`, could belong to it.
    pub cut_start: bool,
    /// Sessions only: a later minute with clicks, at or after `to`, could belong to it.
    pub cut_end: bool,
}

impl Spec {
    /// The minutes whose counts the windows need.
    pub fn read(&self) -> (Minute, Minute) {
        let (from, to) = (self.from.0, self.to.0);
        match self.kind {
            Kind::Tumbling { size, origin } => {
                let first = first_start(from, origin, size);
                let last = first_start(to, origin, size) - size;
                (Minute(first), Minute((last + size).max(first)))
            }
            Kind::Hopping { size, hop, origin } => {
                let first = first_start(from, origin, hop);
                let last = first_start(to, origin, hop) - hop;
                (Minute(first), Minute((last + size).max(first)))
            }
            Kind::Sliding { size } => (Minute(from + 1 - size), Minute(to)),
            Kind::Session { .. } => (Minute(from), Minute(to)),
        }
    }

    /// How many windows the spec yields (to bound a request before reading anything).
    pub fn windows(&self) -> i64 {
        let (from, to) = (self.from.0, self.to.0);
        match self.kind {
            Kind::Tumbling { size, origin } => {
                (first_start(to, origin, size) - first_start(from, origin, size)) / size
            }
            Kind::Hopping { hop, origin, .. } => {
                (first_start(to, origin, hop) - first_start(from, origin, hop)) / hop
            }
            Kind::Sliding { .. } => to - from,
            // At most one per two minutes of the range.
            Kind::Session { .. } => (to - from + 1) / 2,
        }
    }

    /// The windows over `counts` (per minute, minutes with clicks, any order; minutes outside
    /// [`Spec::read`] are ignored), with `watermark` from the same read.
    pub fn compute(&self, counts: &[(Minute, u64)], watermark: Watermark) -> Vec<Window> {
        let (lo, hi) = self.read();
        let span = (hi.0 - lo.0).max(0) as usize;
        // prefix[i] = clicks of the minutes [lo, lo + i).
        let mut per_minute = vec![0u64; span];
        for &(m, c) in counts {
            if m >= lo && m < hi {
                per_minute[(m.0 - lo.0) as usize] += c;
            }
        }
        let mut prefix = Vec::with_capacity(span + 1);
        prefix.push(0u64);
        for c in &per_minute {
            prefix.push(prefix.last().copied().unwrap_or(0) + c);
        }
        let sum = |a: i64, b: i64| {
            let (a, b) = ((a - lo.0).clamp(0, span as i64), (b - lo.0).clamp(0, span as i64));
            prefix[b as usize] - prefix[a as usize]
        };
        let window = |start: i64, end: i64| Window {
            start: Minute(start),
            end: Minute(end),
            count: sum(start, end),
            final_: watermark.all_final_before(Minute(end)),
            cut_start: false,
            cut_end: false,
        };
        let (from, to) = (self.from.0, self.to.0);
        match self.kind {
            Kind::Tumbling { size, origin } => {
                let first = first_start(from, origin, size);
                (0..self.windows()).map(|i| first + i * size).map(|s| window(s, s + size)).collect()
            }
            Kind::Hopping { size, hop, origin } => {
                let first = first_start(from, origin, hop);
                (0..self.windows()).map(|i| first + i * hop).map(|s| window(s, s + size)).collect()
            }
            Kind::Sliding { size } => (from..to).map(|m| window(m + 1 - size, m + 1)).collect(),
            Kind::Session { gap } => {
                let mut out = Vec::new();
                let mut run: Option<(i64, i64)> = None; // first and last minute with clicks
                for m in from..to {
                    if per_minute[(m - lo.0) as usize] == 0 {
                        continue;
                    }
                    run = match run {
                        Some((start, last)) if m - last - 1 < gap => Some((start, m)),
                        Some((start, last)) => {
                            out.push(session(start, last, gap, self, &window, watermark));
                            Some((m, m))
                        }
                        None => Some((m, m)),
                    };
                }
                if let Some((start, last)) = run {
                    out.push(session(start, last, gap, self, &window, watermark));
                }
                out
            }
        }
    }
}

/// A session of the minutes `[start, last]`: cut where fewer than `gap` empty minutes separate
/// it from the edge of the range; final once the `gap` minutes after it are final too.
fn session(
    start: i64,
    last: i64,
    gap: i64,
    spec: &Spec,
    window: &dyn Fn(i64, i64) -> Window,
    watermark: Watermark,
) -> Window {
    let mut w = window(start, last + 1);
    w.cut_start = start - spec.from.0 < gap;
    w.cut_end = spec.to.0 - (last + 1) < gap;
    w.final_ = watermark.all_final_before(Minute((last + 1 + gap).min(spec.to.0)));
    w
}

/// The first minute at or after `at` that is `origin` plus a multiple of `step`.
fn first_start(at: i64, origin: i64, step: i64) -> i64 {
    origin
        + (at - origin).div_euclid(step) * step
        + if (at - origin).rem_euclid(step) == 0 { 0 } else { step }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// The definitions, minute by minute, without prefix sums or alignment arithmetic.
    fn oracle(spec: &Spec, counts: &BTreeMap<i64, u64>, w: Watermark) -> Vec<Window> {
        let clicks = |a: i64, b: i64| (a..b).map(|m| counts.get(&m).copied().unwrap_or(0)).sum();
        let plain = |start: i64, end: i64| Window {
            start: Minute(start),
            end: Minute(end),
            count: clicks(start, end),
            final_: (start..end).all(|m| w.is_final(Minute(m))),
            cut_start: false,
            cut_end: false,
        };
        let (from, to) = (spec.from.0, spec.to.0);
        match spec.kind {
            Kind::Tumbling { size, origin } => (from..to)
                .filter(|s| (s - origin).rem_euclid(size) == 0)
                .map(|s| plain(s, s + size))
                .collect(),
            Kind::Hopping { size, hop, origin } => (from..to)
                .filter(|s| (s - origin).rem_euclid(hop) == 0)
                .map(|s| plain(s, s + size))
                .collect(),
            Kind::Sliding { size } => (from..to).map(|m| plain(m + 1 - size, m + 1)).collect(),
            Kind::Session { gap } => {
                let with: Vec<i64> = (from..to).filter(|m| clicks(*m, m + 1) > 0).collect();
                let mut runs: Vec<(i64, i64)> = Vec::new();
                for m in with {
                    match runs.last_mut() {
                        Some((_, last)) if m - *last - 1 < gap => *last = m,
                        _ => runs.push((m, m)),
                    }
                }
                runs.into_iter()
                    .map(|(s, l)| Window {
                        cut_start: s - from < gap,
                        cut_end: to - (l + 1) < gap,
                        final_: (s..(l + 1 + gap).min(to)).all(|m| w.is_final(Minute(m))),
                        ..plain(s, l + 1)
                    })
                    .collect()
            }
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            (1i64..90, -100i64..100).prop_map(|(size, origin)| Kind::Tumbling { size, origin }),
            (1i64..90, 1i64..40, -100i64..100).prop_map(|(size, hop, origin)| Kind::Hopping {
                size,
                hop,
                origin
            }),
            (1i64..90).prop_map(|size| Kind::Sliding { size }),
            (1i64..30).prop_map(|gap| Kind::Session { gap }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        /// Every window type against its definition, with minutes before 1970 and a watermark
        /// anywhere (history a month old is just larger numbers).
        #[test]
        fn windows_match_their_definitions(
            kind in kind(),
            from in -200i64..200,
            len in 0i64..300,
            clicks in proptest::collection::btree_map(-400i64..600, 1u64..50, 0..120),
            w in proptest::option::of(-600i64..700),
        ) {
            let spec = Spec { kind, from: Minute(from), to: Minute(from + len) };
            let watermark = w.map_or(Watermark::NONE, |m| Watermark::at(m * 60_000));
            let counts: Vec<(Minute, u64)> = clicks.iter().map(|(&m, &c)| (Minute(m), c)).collect();
            let got = spec.compute(&counts, watermark);
            match kind {
                Kind::Session { .. } => prop_assert!(got.len() as i64 <= spec.windows()),
                _ => prop_assert_eq!(got.len() as i64, spec.windows()),
            }
            prop_assert_eq!(got, oracle(&spec, &clicks, watermark));
        }

        /// A tumbling window of one minute is the time series.
        #[test]
        fn tumbling_of_one_minute_is_the_series(
            from in -100i64..100,
            len in 0i64..200,
            clicks in proptest::collection::btree_map(-100i64..300, 1u64..9, 0..80),
        ) {
            let spec = Spec { kind: Kind::Tumbling { size: 1, origin: 0 }, from: Minute(from), to: Minute(from + len) };
            let counts: Vec<(Minute, u64)> = clicks.iter().map(|(&m, &c)| (Minute(m), c)).collect();
            let got = spec.compute(&counts, Watermark::NONE);
            let series: Vec<(i64, u64)> = (from..from + len).map(|m| (m, clicks.get(&m).copied().unwrap_or(0))).collect();
            let windows: Vec<(i64, u64)> = got.iter().map(|w| (w.start.0, w.count)).collect();
            prop_assert_eq!(windows, series);
        }

        /// Sessions partition the minutes with clicks: each such minute of the range lies in
        /// exactly one session, and the sessions' counts add up to the range's clicks.
        #[test]
        fn sessions_partition_the_minutes_with_clicks(
            gap in 1i64..20,
            from in -100i64..100,
            len in 0i64..200,
            clicks in proptest::collection::btree_map(-100i64..300, 1u64..9, 0..80),
        ) {
            let spec = Spec { kind: Kind::Session { gap }, from: Minute(from), to: Minute(from + len) };
            let counts: Vec<(Minute, u64)> = clicks.iter().map(|(&m, &c)| (Minute(m), c)).collect();
            let sessions = spec.compute(&counts, Watermark::NONE);
            for (&m, _) in clicks.range(from..from + len) {
                let holding = sessions.iter().filter(|s| s.start.0 <= m && m < s.end.0).count();
                prop_assert_eq!(holding, 1, "minute {} in {:?}", m, sessions);
            }
            let total: u64 = clicks.range(from..from + len).map(|(_, c)| c).sum();
            prop_assert_eq!(sessions.iter().map(|s| s.count).sum::<u64>(), total);
            for pair in sessions.windows(2) {
                prop_assert!(pair[1].start.0 - pair[0].end.0 >= gap, "{:?}", pair);
            }
        }
    }

    #[test]
    fn hopping_ten_minutes_every_five() {
        let spec = Spec {
            kind: Kind::Hopping { size: 10, hop: 5, origin: 0 },
            from: Minute(3),
            to: Minute(16),
        };
        let counts = [(Minute(4), 1), (Minute(9), 2), (Minute(12), 4), (Minute(19), 8)];
        let got: Vec<(i64, i64, u64)> = spec
            .compute(&counts, Watermark::at(17 * 60_000))
            .iter()
            .map(|w| (w.start.0, w.end.0, w.count))
            .collect();
        assert_eq!(got, [(5, 15, 6), (10, 20, 12), (15, 25, 8)]);
        assert_eq!(spec.read(), (Minute(5), Minute(25)));
    }
}
