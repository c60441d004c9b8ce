//! The click event of SPEC §1: parse one NDJSON line into a validated [`Click`], or say exactly
//! why it is invalid.
//!
//! Parsing borrows from the line: string fields are `Cow::Borrowed` unless the JSON escaped them,
//! so a typical line costs no heap allocation. The JSON is read by `serde_json` through a visitor
//! that records each known field as a loosely typed `Scalar`; validation then runs in plain
//! Rust, so every rule of §1 yields its own [`Invalid`] variant naming the field. Unknown fields
//! are skipped, `null` means absent, a repeated known field is rejected as ambiguous.
//!
//! The module also owns the value types the rest of adclick counts with: [`AdId`],
//! [`EventTime`], [`Minute`], [`Country`] and the deduplication [`Identity`].

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use xxhash_rust::xxh3::xxh3_64;

mod parse;
mod time;
pub mod wire;

#[cfg(test)]
mod tests;

pub use parse::{parse_line, parse_line_serde_only, Validation};
pub use time::{format_rfc3339, parse_minute, parse_rfc3339, MinuteError, TimestampError};

/// The longest line accepted, in bytes, not counting its line terminator.
pub const MAX_LINE_BYTES: usize = 65_536;
/// `ad_id` as a string: 1 to 64 bytes.
pub const MAX_AD_ID_BYTES: usize = 64;
/// `user_id` and `click_id`: at most 128 bytes.
pub const MAX_ID_BYTES: usize = 128;

/// An ad's identifier. Compact: ids up to 24 bytes are stored inline.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AdId(compact_str::CompactString);

impl AdId {
    pub fn new(s: &str) -> Self {
        AdId(compact_str::CompactString::new(s))
    }
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
    /// The 64-bit hash that routes an ad to a log partition and an engine shard.
    pub fn route_hash(&self) -> u64 {
        route_hash(self.as_str())
    }
}

/// The routing rules, side by side. Every click of an ad lands in one log partition and, within
/// an aggregator, in one engine shard, so deduplication and an ad's counts stay in one place.
///
/// The routing hash of an ad id (stable across runs and machines: xxh3-64, seed 0).
pub fn route_hash(ad_id: &str) -> u64 {
    xxh3_64(ad_id.as_bytes())
}

/// The log partition of an ad: its routing hash modulo the partition count (fixed for the life
/// of a data directory or topic).
pub fn partition_of(ad_hash: u64, partitions: u32) -> u32 {
    (ad_hash % u64::from(partitions.max(1))) as u32
}

/// The engine shard of an ad: the high bits of its routing hash, scaled to the shard count
/// (independent of the partition, which uses the low bits).
pub fn shard_of(ad_hash: u64, shards: usize) -> usize {
    (((ad_hash >> 32) * shards as u64) >> 32) as usize
}

impl fmt::Debug for AdId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for AdId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::borrow::Borrow<str> for AdId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for AdId {
    fn from(s: &str) -> Self {
        AdId::new(s)
    }
}

/// Milliseconds since the Unix epoch, UTC. Always within years 0000–9999 (see [`EventTime::MIN`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct EventTime(pub i64);

impl EventTime {
    /// 0000-01-01T00:00:00Z, the earliest time RFC 3339 can write.
    pub const MIN: EventTime = EventTime(-62_167_219_200_000);
    /// 9999-12-31T23:59:59.999Z, the latest.
    pub const MAX: EventTime = EventTime(253_402_300_799_999);

    /// The wall clock, as an event time.
    pub fn now() -> EventTime {
        use std::time::{SystemTime, UNIX_EPOCH};
        EventTime(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64))
    }

    pub fn minute(self) -> Minute {
        Minute(self.0.div_euclid(MINUTE_MS))
    }
    pub fn millis(self) -> i64 {
        self.0
    }
}

/// Milliseconds in a minute.
pub const MINUTE_MS: i64 = 60_000;

/// A one-minute tumbling window on event time: `[index·60 s, (index+1)·60 s)` since the epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Minute(pub i64);

impl Minute {
    pub fn start(self) -> EventTime {
        EventTime(self.0 * MINUTE_MS)
    }
    /// The exclusive end of the window.
    pub fn end(self) -> EventTime {
        EventTime((self.0 + 1) * MINUTE_MS)
    }
}

/// An assigned ISO 3166-1 alpha-2 code, upper-case.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Country([u8; 2]);

/// The 249 officially assigned ISO 3166-1 alpha-2 codes.
const ASSIGNED_COUNTRIES: &str = "\
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ \
BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ \
CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ \
DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR \
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU \
ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ \
LA LB LC LI LK LR LS LT LU LV LY \
MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ \
NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA \
RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ \
TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ \
VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// Bit `i` set when code number `i` (`(a-'A')*26 + (b-'A')`) is assigned.
static COUNTRY_BITS: std::sync::LazyLock<[u64; 11]> = std::sync::LazyLock::new(|| {
    let mut bits = [0u64; 11];
    for code in ASSIGNED_COUNTRIES.split_ascii_whitespace() {
        let b = code.as_bytes();
        let i = (b[0] - b'A') as usize * 26 + (b[1] - b'A') as usize;
        bits[i / 64] |= 1 << (i % 64);
    }
    bits
});

impl Country {
    /// Parses a code case-insensitively; `None` unless it is assigned.
    pub fn parse(s: &str) -> Option<Country> {
        let b = s.as_bytes();
        if b.len() != 2 || !b[0].is_ascii_alphabetic() || !b[1].is_ascii_alphabetic() {
            return None;
        }
        let code = [b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()];
        let c = Country(code);
        let i = c.index();
        (COUNTRY_BITS[i / 64] >> (i % 64) & 1 == 1).then_some(c)
    }
    /// A dense index in `0..676`, for bitsets.
    pub fn index(self) -> usize {
        (self.0[0] - b'A') as usize * 26 + (self.0[1] - b'A') as usize
    }
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("country codes are ASCII letters")
    }
    pub fn all_assigned() -> impl Iterator<Item = Country> {
        ASSIGNED_COUNTRIES
            .split_ascii_whitespace()
            .map(|c| Country::parse(c).expect("the table holds assigned codes"))
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated click. Strings borrow from the parsed line where they can.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Click<'a> {
    pub ad_id: Cow<'a, str>,
    pub time: EventTime,
    pub user_id: Option<Cow<'a, str>>,
    /// Canonical: an IPv4-mapped IPv6 address is stored as the IPv4 address it maps.
    pub ip: Option<IpAddr>,
    pub country: Option<Country>,
    pub click_id: Option<Cow<'a, str>>,
}

/// The identity of a click for deduplication (SPEC §1), as a 128-bit hash.
///
/// Two clicks are the same when they share `ad_id` and `click_id`, or, with no `click_id` on
/// either, when `ad_id`, time, `user_id` and `ip` all match. The hashed bytes are length-prefixed
/// and tagged, so no two different identities share an encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Identity(pub u128);

/// The secret that keys identity hashes (xxh3-128 with a custom secret), so that lines crafted
/// to collide with another ad's click cannot be made without it. The service keeps one per data
/// directory (`identity.key`); the default is a fixed key for tests and benchmarks.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentityKey(pub [u8; IdentityKey::LEN]);

impl IdentityKey {
    pub const LEN: usize = 192;

    /// A key expanded from a seed (splitmix64); deterministic.
    pub fn from_seed(seed: u64) -> IdentityKey {
        let mut key = [0u8; Self::LEN];
        let mut x = seed;
        for chunk in key.chunks_mut(8) {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        IdentityKey(key)
    }
}

impl Default for IdentityKey {
    fn default() -> Self {
        IdentityKey::from_seed(0)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityKey(..)")
    }
}

impl Click<'_> {
    /// The identity under the default key (tests and tools; the engine uses its own key).
    pub fn identity(&self) -> Identity {
        self.identity_with(&IdentityKey::default())
    }

    /// SPEC §1 identity: a keyed 128-bit hash of a tagged, length-prefixed encoding.
    pub fn identity_with(&self, key: &IdentityKey) -> Identity {
        // ad 1+64, tag 1, then either click_id 1+128 or time 8 + user 2+128 + ip 17: at most 221.
        let mut buf = [0u8; 224];
        let mut n = 0;
        let mut put = |bytes: &[u8]| {
            buf[n..n + bytes.len()].copy_from_slice(bytes);
            n += bytes.len();
        };
        put(&[self.ad_id.len() as u8]);
        put(self.ad_id.as_bytes());
        match &self.click_id {
            Some(id) => {
                put(&[1, id.len() as u8]);
                put(id.as_bytes());
            }
            None => {
                put(&[0]);
                put(&self.time.0.to_le_bytes());
                match &self.user_id {
                    Some(u) => {
                        put(&[1, u.len() as u8]);
                        put(u.as_bytes());
                    }
                    None => put(&[0]),
                }
                match self.ip {
                    Some(IpAddr::V4(v4)) => {
                        put(&[4]);
                        put(&v4.octets());
                    }
                    Some(IpAddr::V6(v6)) => {
                        put(&[6]);
                        put(&v6.octets());
                    }
                    None => put(&[0]),
                }
            }
        }
        Identity(xxhash_rust::xxh3::xxh3_128_with_secret(&buf[..n], &key.0))
    }

    /// Copies the borrowed strings so the click outlives its line.
    pub fn into_owned(self) -> Click<'static> {
        Click {
            ad_id: Cow::Owned(self.ad_id.into_owned()),
            time: self.time,
            user_id: self.user_id.map(|u| Cow::Owned(u.into_owned())),
            ip: self.ip,
            country: self.country,
            click_id: self.click_id.map(|c| Cow::Owned(c.into_owned())),
        }
    }
}

/// A field of the click event, named as in the JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Field {
    AdId,
    ClickTimestamp,
    UserId,
    Ip,
    Country,
    ClickId,
}

impl Field {
    pub fn name(self) -> &'static str {
        match self {
            Field::AdId => "ad_id",
            Field::ClickTimestamp => "click_timestamp",
            Field::UserId => "user_id",
            Field::Ip => "ip",
            Field::Country => "country",
            Field::ClickId => "click_id",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a line is not a valid click. Every variant names what is wrong; [`Invalid::kind`] gives a
/// stable short label for metrics.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("line is {bytes} bytes, longer than the limit of {MAX_LINE_BYTES}")]
    LineTooLong { bytes: usize },
    #[error("line is not valid UTF-8 (at byte {at})")]
    NotUtf8 { at: usize },
    #[error("not JSON: {detail}")]
    NotJson { detail: String },
    #[error("not a JSON object")]
    NotAnObject,
    #[error("{field}: appears more than once")]
    DuplicateField { field: Field },
    #[error("{field}: missing")]
    Missing { field: Field },
    #[error("{field}: expected {expected}, found {found}")]
    WrongType { field: Field, expected: &'static str, found: &'static str },
    #[error("{field}: is empty")]
    Empty { field: Field },
    #[error("{field}: is {bytes} bytes, more than the limit of {max}")]
    TooLong { field: Field, bytes: usize, max: usize },
    #[error("click_timestamp: {0}")]
    BadTimestamp(TimestampError),
    #[error("ip: {value:?} is not an IPv4 or IPv6 address")]
    BadIp { value: String },
    #[error("country: {value:?} is not an assigned ISO 3166-1 alpha-2 code")]
    UnknownCountry { value: String },
    #[error("click_timestamp: {ahead_ms} ms ahead of the clock, more than max_clock_skew")]
    InFuture { ahead_ms: i64 },
}

impl Invalid {
    /// A short stable label, for metrics and counters.
    pub fn kind(&self) -> InvalidKind {
        match self {
            Invalid::LineTooLong { .. } => InvalidKind::LineTooLong,
            Invalid::NotUtf8 { .. } | Invalid::NotJson { .. } | Invalid::NotAnObject => {
                InvalidKind::NotJson
            }
            Invalid::DuplicateField { .. } => InvalidKind::DuplicateField,
            Invalid::Missing { .. } => InvalidKind::MissingField,
            Invalid::WrongType { .. } => InvalidKind::WrongType,
            Invalid::Empty { .. } | Invalid::TooLong { .. } => InvalidKind::BadLength,
            Invalid::BadTimestamp(_) => InvalidKind::BadTimestamp,
            Invalid::BadIp { .. } => InvalidKind::BadIp,
            Invalid::UnknownCountry { .. } => InvalidKind::BadCountry,
            Invalid::InFuture { .. } => InvalidKind::InFuture,
        }
    }
}

/// The kinds of invalid input, for counters (`Invalid::kind`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum InvalidKind {
    LineTooLong,
    NotJson,
    DuplicateField,
    MissingField,
    WrongType,
    BadLength,
    BadTimestamp,
    BadIp,
    BadCountry,
    InFuture,
}

impl InvalidKind {
    pub const ALL: [InvalidKind; 10] = [
        InvalidKind::LineTooLong,
        InvalidKind::NotJson,
        InvalidKind::DuplicateField,
        InvalidKind::MissingField,
        InvalidKind::WrongType,
        InvalidKind::BadLength,
        InvalidKind::BadTimestamp,
        InvalidKind::BadIp,
        InvalidKind::BadCountry,
        InvalidKind::InFuture,
    ];
    pub fn label(self) -> &'static str {
        match self {
            InvalidKind::LineTooLong => "line_too_long",
            InvalidKind::NotJson => "not_json",
            InvalidKind::DuplicateField => "duplicate_field",
            InvalidKind::MissingField => "missing_field",
            InvalidKind::WrongType => "wrong_type",
            InvalidKind::BadLength => "bad_length",
            InvalidKind::BadTimestamp => "bad_timestamp",
            InvalidKind::BadIp => "bad_ip",
            InvalidKind::BadCountry => "bad_country",
            InvalidKind::InFuture => "in_future",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}
