//! Deterministic synthetic clicks (`adclick generate`, tests, benches): Zipf-popular ads, a
//! country and IP mix, duplicates (re-sent soon or far apart, some re-encoded with the same
//! identity), late, too-late and invalid lines of every kind. The same seed and the same
//! sequence of `now` values give the same lines.

use std::collections::VecDeque;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use crate::event::{format_rfc3339, EventTime};

/// Shares and shapes of the generated traffic.
#[derive(Clone, Debug)]
pub struct GenConfig {
    pub seed: u64,
    pub ads: u64,
    /// Zipf exponent of ad popularity.
    pub zipf: f64,
    /// Event times trail `now` by up to this much (disorder).
    pub disorder_ms: i64,
    pub duplicate: f64,
    /// Share of events late by between one and `late_max_ms` minutes behind `now`.
    pub late: f64,
    pub late_max_ms: i64,
    /// Share of events far behind `now` (`too_late_ms` or more).
    pub too_late: f64,
    pub too_late_ms: i64,
    pub invalid: f64,
    /// Share of valid events that carry a `click_id`.
    pub click_id: f64,
    pub users: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 1,
            ads: 10_000,
            zipf: 1.05,
            disorder_ms: 5_000,
            duplicate: 0.01,
            late: 0.002,
            late_max_ms: 4 * 60_000,
            too_late: 0.0005,
            too_late_ms: 30 * 60_000,
            invalid: 0.001,
            click_id: 0.8,
            users: 1_000_000,
        }
    }
}

const COUNTRIES: [&str; 12] =
    ["US", "US", "US", "de", "GB", "FR", "IN", "BR", "JP", "CA", "us", "NL"];

pub struct Generator {
    cfg: GenConfig,
    rng: SmallRng,
    zipf: Zipf<f64>,
    /// Recent valid lines, for duplicates: the last few and a sample of older ones.
    recent: VecDeque<String>,
    far: Vec<String>,
    serial: u64,
}

impl Generator {
    pub fn new(cfg: GenConfig) -> Generator {
        Generator {
            rng: SmallRng::seed_from_u64(cfg.seed),
            zipf: Zipf::new(cfg.ads.max(1) as f64, cfg.zipf).expect("zipf parameters are valid"),
            cfg,
            recent: VecDeque::with_capacity(1024),
            far: Vec::with_capacity(4096),
            serial: 0,
        }
    }

    /// The next line (without newline) for wall-clock time `now`.
    pub fn line(&mut self, now: EventTime) -> String {
        let roll: f64 = self.rng.random();
        let c = &self.cfg;
        if roll < c.invalid {
            return self.invalid(now);
        }
        if roll < c.invalid + c.duplicate && !self.recent.is_empty() {
            return self.duplicate();
        }
        let behind = if roll < c.invalid + c.duplicate + c.too_late {
            c.too_late_ms + self.rng.random_range(0..=c.too_late_ms)
        } else if roll < c.invalid + c.duplicate + c.too_late + c.late {
            self.rng.random_range(60_000..=c.late_max_ms.max(60_000))
        } else {
            self.rng.random_range(0..=c.disorder_ms)
        };
        let line = self.valid(EventTime(now.0 - behind));
        self.remember(&line);
        line
    }

    fn ad(&mut self) -> u64 {
        self.zipf.sample(&mut self.rng) as u64
    }

    fn valid(&mut self, t: EventTime) -> String {
        self.serial += 1;
        let ad = self.ad();
        let rng = &mut self.rng;
        // Every tenth ad is numeric, written as a number or a string at random.
        let ad_json = if ad % 10 == 0 {
            if rng.random_bool(0.5) {
                format!("{ad}")
            } else {
                format!("\"{ad}\"")
            }
        } else {
            format!("\"ad-{ad}\"")
        };
        let ts = if rng.random_bool(0.5) {
            format!("\"{}\"", format_rfc3339(t))
        } else {
            t.0.to_string()
        };
        let mut line = format!("{{\"ad_id\":{ad_json},\"click_timestamp\":{ts}");
        if rng.random_bool(0.9) {
            line += &format!(",\"user_id\":\"u-{}\"", rng.random_range(0..self.cfg.users));
        }
        match rng.random_range(0..10) {
            0 => {
                line += &format!(
                    ",\"ip\":\"10.{}.{}.{}\"",
                    rng.random::<u8>(),
                    rng.random::<u8>(),
                    rng.random::<u8>()
                )
            }
            1 => line += &format!(",\"ip\":\"2001:db8::{:x}\"", rng.random::<u16>()),
            2 => {}
            _ => {
                line += &format!(",\"ip\":\"203.0.{}.{}\"", rng.random::<u8>(), rng.random::<u8>())
            }
        }
        if rng.random_bool(0.95) {
            line +=
                &format!(",\"country\":\"{}\"", COUNTRIES[rng.random_range(0..COUNTRIES.len())]);
        }
        if rng.random_bool(self.cfg.click_id) {
            line += &format!(",\"click_id\":\"c-{:x}-{}\"", self.cfg.seed, self.serial);
        }
        line.push('}');
        line
    }

    fn remember(&mut self, line: &str) {
        if self.recent.len() == 1024 {
            let old = self.recent.pop_front().expect("full");
            if self.far.len() < 4096 {
                self.far.push(old);
            } else {
                let i = self.rng.random_range(0..self.far.len());
                self.far[i] = old;
            }
        }
        self.recent.push_back(line.to_owned());
    }

    fn duplicate(&mut self) -> String {
        let far = !self.far.is_empty() && self.rng.random_bool(0.3);
        let line = if far {
            self.far[self.rng.random_range(0..self.far.len())].clone()
        } else {
            self.recent[self.rng.random_range(0..self.recent.len())].clone()
        };
        // Sometimes the same click re-encoded: other spacing, an extra field.
        match self.rng.random_range(0..4) {
            0 => line.replacen('{', "{ \"resent\": true, ", 1),
            1 => line.replace(",\"", ", \""),
            _ => line,
        }
    }

    fn invalid(&mut self, now: EventTime) -> String {
        let ts = now.0;
        let kinds: [&dyn Fn(&mut SmallRng) -> String; 12] = [
            &|_| "not json at all".into(),
            &|_| format!("{{\"ad_id\":\"ad-1\",\"click_timestamp\":{ts}"),
            &|_| format!("{{\"click_timestamp\":{ts}}}"),
            &|_| "{\"ad_id\":\"ad-1\"}".into(),
            &|_| format!("{{\"ad_id\":\"\",\"click_timestamp\":{ts}}}"),
            &|_| "{\"ad_id\":\"ad-1\",\"click_timestamp\":\"2026-02-30T00:00:00Z\"}".into(),
            &|_| format!("{{\"ad_id\":\"ad-1\",\"click_timestamp\":{ts},\"country\":\"XX\"}}"),
            &|_| format!("{{\"ad_id\":\"ad-1\",\"click_timestamp\":{ts},\"ip\":\"300.1.1.1\"}}"),
            &|r| {
                format!(
                    "{{\"ad_id\":\"ad-1\",\"click_timestamp\":{},\"user_id\":\"u\"}}",
                    ts + 3_600_000 + r.random_range(0..1000)
                )
            },
            &|_| format!("{{\"ad_id\":true,\"click_timestamp\":{ts}}}"),
            &|_| {
                format!(
                    "{{\"ad_id\":\"ad-1\",\"click_timestamp\":{ts},\"click_id\":\"{}\"}}",
                    "x".repeat(200)
                )
            },
            &|_| "[1,2,3]".into(),
        ];
        let i = self.rng.random_range(0..kinds.len());
        kinds[i](&mut self.rng)
    }
}
