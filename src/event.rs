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

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use xxhash_rust::xxh3::xxh3_64;

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

/// Why a `click_timestamp` string is not an accepted RFC 3339 time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error("not RFC 3339 (expected YYYY-MM-DDThh:mm:ss[.frac](Z|±hh:mm))")]
    Syntax,
    #[error("month must be 01-12")]
    Month,
    #[error("day does not exist in that month")]
    Day,
    #[error("hour must be 00-23")]
    Hour,
    #[error("minute must be 00-59")]
    Minute,
    #[error("seconds must be 00-59")]
    Second,
    #[error("offset must be between -23:59 and +23:59")]
    Offset,
    #[error("outside years 0000-9999")]
    OutOfRange,
}

/// Parses an RFC 3339 timestamp with offset into milliseconds, truncating extra fraction digits.
pub fn parse_rfc3339(s: &str) -> Result<EventTime, TimestampError> {
    use TimestampError as E;
    let b = s.as_bytes();
    let digits = |at: usize, n: usize| -> Result<i64, TimestampError> {
        let part = b.get(at..at + n).ok_or(E::Syntax)?;
        part.iter().try_fold(0i64, |acc, &c| {
            if c.is_ascii_digit() {
                Ok(acc * 10 + (c - b'0') as i64)
            } else {
                Err(E::Syntax)
            }
        })
    };
    let expect = |at: usize, what: &[u8]| match b.get(at) {
        Some(c) if what.contains(c) => Ok(*c),
        _ => Err(E::Syntax),
    };
    let year = digits(0, 4)?;
    expect(4, b"-")?;
    let month = digits(5, 2)?;
    expect(7, b"-")?;
    let day = digits(8, 2)?;
    expect(10, b"Tt")?;
    let hour = digits(11, 2)?;
    expect(13, b":")?;
    let minute = digits(14, 2)?;
    expect(16, b":")?;
    let second = digits(17, 2)?;
    let mut at = 19;
    let mut millis = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 3 {
                millis = millis * 10 + (b[at] - b'0') as i64;
            }
            at += 1;
        }
        let n = at - start;
        if n == 0 {
            return Err(E::Syntax);
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_min = match expect(at, b"Zz+-")? {
        b'Z' | b'z' => {
            at += 1;
            0
        }
        sign => {
            let oh = digits(at + 1, 2)?;
            expect(at + 3, b":")?;
            let om = digits(at + 4, 2)?;
            at += 6;
            if oh > 23 || om > 59 {
                return Err(E::Offset);
            }
            let m = oh * 60 + om;
            if sign == b'-' {
                -m
            } else {
                m
            }
        }
    };
    if at != b.len() {
        return Err(E::Syntax);
    }
    if !(1..=12).contains(&month) {
        return Err(E::Month);
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(E::Day);
    }
    if hour > 23 {
        return Err(E::Hour);
    }
    if minute > 59 {
        return Err(E::Minute);
    }
    if second > 59 {
        return Err(E::Second);
    }
    let days = days_from_civil(year, month, day);
    let ms = ((days * 24 + hour) * 60 + minute - offset_min) * MINUTE_MS + second * 1000 + millis;
    time_in_range(ms).ok_or(E::OutOfRange)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_rfc3339(t: EventTime) -> String {
    let days = t.0.div_euclid(86_400_000);
    let ms_of_day = t.0.rem_euclid(86_400_000);
    // Inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

/// Parsing limits that depend on configuration and the clock.
#[derive(Clone, Copy, Debug)]
pub struct Validation {
    /// The wall clock at ingestion.
    pub now: EventTime,
    /// How far ahead of `now` an event time may be (`max_clock_skew`).
    pub max_skew_ms: i64,
}

/// Parses one line (without its `\n`). `Ok(None)` for a blank line.
pub fn parse_line<'a>(line: &'a [u8], v: Validation) -> Result<Option<Click<'a>>, Invalid> {
    if line.len() > MAX_LINE_BYTES {
        return Err(Invalid::LineTooLong { bytes: line.len() });
    }
    if line.iter().all(|c| matches!(c, b' ' | b'\t' | b'\r')) {
        return Ok(None);
    }
    if !line.is_ascii() {
        std::str::from_utf8(line).map_err(|e| Invalid::NotUtf8 { at: e.valid_up_to() })?;
    }
    let mut raw = RawClick { line, ..RawClick::default() };
    if !fast::scan(line, &mut raw) {
        raw = RawClick { line, ..RawClick::default() };
        let text = std::str::from_utf8(line).expect("validated above");
        parse_with_serde(text, &mut raw)?;
    }
    raw.validate(v).map(Some)
}

/// The full JSON parser, for every line the fast path declines.
fn parse_with_serde<'a>(text: &'a str, raw: &mut RawClick<'a>) -> Result<(), Invalid> {
    let mut de = serde_json::Deserializer::from_str(text);
    match de::DeserializeSeed::deserialize(raw, &mut de).and_then(|()| de.end()) {
        Ok(()) => Ok(()),
        Err(e) if e.classify() == serde_json::error::Category::Data => Err(Invalid::NotAnObject),
        Err(e) => Err(Invalid::NotJson { detail: e.to_string() }),
    }
}

/// [`parse_line`] with the fast path disabled, for differential tests.
#[doc(hidden)]
pub fn parse_line_serde_only<'a>(
    line: &'a [u8],
    v: Validation,
) -> Result<Option<Click<'a>>, Invalid> {
    if line.len() > MAX_LINE_BYTES {
        return Err(Invalid::LineTooLong { bytes: line.len() });
    }
    if line.iter().all(|c| matches!(c, b' ' | b'\t' | b'\r')) {
        return Ok(None);
    }
    let text = std::str::from_utf8(line).map_err(|e| Invalid::NotUtf8 { at: e.valid_up_to() })?;
    let mut raw = RawClick { line, ..RawClick::default() };
    parse_with_serde(text, &mut raw)?;
    raw.validate(v).map(Some)
}

/// A JSON value as seen by the visitor, before validation.
#[derive(Debug)]
enum Scalar<'a> {
    Null,
    Bool,
    Unsigned(u64),
    Negative(i64),
    Float,
    /// A `-0` or `-0.0`: serde_json reads both as a float; `-0` is the integer 0 (SPEC §1).
    NegZero,
    Str(Cow<'a, str>),
    Array,
    Object,
}

impl Scalar<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool => "a boolean",
            Scalar::Unsigned(_) | Scalar::Negative(_) => "an integer",
            Scalar::Float | Scalar::NegZero => "a non-integer number",
            Scalar::Str(_) => "a string",
            Scalar::Array => "an array",
            Scalar::Object => "an object",
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool)
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Unsigned(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(if v >= 0 { Scalar::Unsigned(v as u64) } else { Scalar::Negative(v) })
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(if v == 0.0 && v.is_sign_negative() { Scalar::NegZero } else { Scalar::Float })
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Array)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Object)
            }
        }
        d.deserialize_any(V)
    }
}

/// The object's known fields as the JSON gave them.
#[derive(Default)]
struct RawClick<'a> {
    /// The whole line, to tell `-0` from `-0.0` (see [`Scalar::NegZero`]).
    line: &'a [u8],
    fields: [Option<Scalar<'a>>; 6],
    duplicate: Option<Field>,
}

/// An object key: one of the known fields, or anything else.
struct Key(Option<Field>);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(match v {
                    "ad_id" => Some(Field::AdId),
                    "click_timestamp" => Some(Field::ClickTimestamp),
                    "user_id" => Some(Field::UserId),
                    "ip" => Some(Field::Ip),
                    "country" => Some(Field::Country),
                    "click_id" => Some(Field::ClickId),
                    _ => None,
                }))
            }
        }
        d.deserialize_str(V)
    }
}

/// Fills a `RawClick` in place (it is large: moving it per line shows in profiles).
impl<'de> de::DeserializeSeed<'de> for &mut RawClick<'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        struct V<'r, 'de>(&'r mut RawClick<'de>);
        impl<'de> Visitor<'de> for V<'_, 'de> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                let raw = self.0;
                while let Some(Key(field)) = map.next_key()? {
                    match field {
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        Some(field) => {
                            let value: Scalar = map.next_value()?;
                            let slot = &mut raw.fields[field as usize];
                            if slot.is_some() {
                                raw.duplicate.get_or_insert(field);
                            }
                            *slot = Some(value);
                        }
                    }
                }
                Ok(())
            }
        }
        d.deserialize_map(V(self))
    }
}

impl<'a> RawClick<'a> {
    fn take(&mut self, field: Field) -> Option<Scalar<'a>> {
        match self.fields[field as usize].take() {
            Some(Scalar::Null) | None => None,
            some => some,
        }
    }

    fn validate(mut self, v: Validation) -> Result<Click<'a>, Invalid> {
        if let Some(field) = self.duplicate {
            return Err(Invalid::DuplicateField { field });
        }
        let ad_id = match self.take(Field::AdId) {
            None => return Err(Invalid::Missing { field: Field::AdId }),
            Some(Scalar::Unsigned(n)) => Cow::Owned(n.to_string()),
            Some(Scalar::Str(s)) => {
                if s.is_empty() {
                    return Err(Invalid::Empty { field: Field::AdId });
                }
                check_len(Field::AdId, &s, MAX_AD_ID_BYTES)?;
                s
            }
            Some(other) => {
                return Err(wrong_type(Field::AdId, "a string or a non-negative integer", &other))
            }
        };
        let time = match self.take(Field::ClickTimestamp) {
            None => return Err(Invalid::Missing { field: Field::ClickTimestamp }),
            Some(Scalar::Str(s)) => parse_rfc3339(&s).map_err(Invalid::BadTimestamp)?,
            Some(Scalar::Unsigned(n)) => integer_time(i64::try_from(n).unwrap_or(i64::MAX))?,
            Some(Scalar::Negative(n)) => integer_time(n)?,
            Some(Scalar::NegZero) if minus_zero_literal(self.line) => EventTime(0),
            Some(other) => {
                return Err(wrong_type(
                    Field::ClickTimestamp,
                    "an RFC 3339 string or integer milliseconds",
                    &other,
                ))
            }
        };
        if time.0 - v.now.0 > v.max_skew_ms {
            return Err(Invalid::InFuture { ahead_ms: time.0 - v.now.0 });
        }
        let user_id = self.optional_str(Field::UserId, MAX_ID_BYTES)?;
        let click_id = self.optional_str(Field::ClickId, MAX_ID_BYTES)?;
        let ip = match self.optional_str(Field::Ip, usize::MAX)? {
            None => None,
            Some(s) => Some(parse_ip(&s).ok_or_else(|| Invalid::BadIp { value: truncate(&s) })?),
        };
        let country = match self.optional_str(Field::Country, usize::MAX)? {
            None => None,
            Some(s) => Some(
                Country::parse(&s)
                    .ok_or_else(|| Invalid::UnknownCountry { value: truncate(&s) })?,
            ),
        };
        Ok(Click { ad_id, time, user_id, ip, country, click_id })
    }

    fn optional_str(&mut self, field: Field, max: usize) -> Result<Option<Cow<'a, str>>, Invalid> {
        match self.take(field) {
            None => Ok(None),
            Some(Scalar::Str(s)) => {
                check_len(field, &s, max)?;
                Ok(Some(s))
            }
            Some(other) => Err(wrong_type(field, "a string", &other)),
        }
    }
}

/// Parses an address as `std` does, canonical. Plain dotted quads take a quick path that accepts
/// exactly what `std` accepts (1–3 digits, no leading zero, at most 255); anything else goes to
/// `std`.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let b = s.as_bytes();
    let mut octets = [0u8; 4];
    let (mut i, mut n) = (0, 0);
    let quick = loop {
        let start = i;
        let mut v = 0u32;
        while i < b.len() && b[i].is_ascii_digit() && i - start < 3 {
            v = v * 10 + (b[i] - b'0') as u32;
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || v > 255 || (digits > 1 && b[start] == b'0') {
            break false;
        }
        octets[n] = v as u8;
        n += 1;
        if n == 4 {
            break i == b.len();
        }
        if b.get(i) != Some(&b'.') {
            break false;
        }
        i += 1;
    };
    if quick {
        return Some(IpAddr::from(octets));
    }
    s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn check_len(field: Field, s: &str, max: usize) -> Result<(), Invalid> {
    if s.len() > max {
        return Err(Invalid::TooLong { field, bytes: s.len(), max });
    }
    Ok(())
}

fn wrong_type(field: Field, expected: &'static str, found: &Scalar) -> Invalid {
    Invalid::WrongType { field, expected, found: found.type_name() }
}

fn time_in_range(ms: i64) -> Option<EventTime> {
    (EventTime::MIN.0..=EventTime::MAX.0).contains(&ms).then_some(EventTime(ms))
}

/// Whether the line's `click_timestamp` is written `-0` (the integer 0), not `-0.0` or `-0e0`.
/// Only asked for the rare line whose timestamp parsed as a negative zero.
fn minus_zero_literal(line: &[u8]) -> bool {
    let Ok(map) = serde_json::from_slice::<
        std::collections::BTreeMap<Cow<str>, &serde_json::value::RawValue>,
    >(line) else {
        return false;
    };
    map.get("click_timestamp").is_some_and(|v| v.get() == "-0")
}

fn integer_time(ms: i64) -> Result<EventTime, Invalid> {
    time_in_range(ms).ok_or(Invalid::BadTimestamp(TimestampError::OutOfRange))
}

/// A value quoted in an error message, cut to a readable length.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// The fast path for the common line shape.
mod fast {
    use std::borrow::Cow;

    use super::{Field, RawClick, Scalar};

    /// Scans a flat JSON object whose strings have no escapes and whose numbers are integers,
    /// filling `raw` exactly as the serde visitor would. Returns false, leaving `raw` in any state,
    /// for anything else (escapes, floats, nesting, malformed input): the caller then parses the
    /// line with serde_json, which also words every error. `text` is valid UTF-8.
    pub(super) fn scan<'a>(text: &'a [u8], raw: &mut RawClick<'a>) -> bool {
        let mut s = Scanner { b: text, i: 0 };
        s.ws();
        if !s.eat(b'{') {
            return false;
        }
        s.ws();
        if !s.eat(b'}') {
            loop {
                let Some(key) = s.string() else { return false };
                s.ws();
                if !s.eat(b':') {
                    return false;
                }
                s.ws();
                let Some(value) = s.value() else { return false };
                let field = match key {
                    b"ad_id" => Some(Field::AdId),
                    b"click_timestamp" => Some(Field::ClickTimestamp),
                    b"user_id" => Some(Field::UserId),
                    b"ip" => Some(Field::Ip),
                    b"country" => Some(Field::Country),
                    b"click_id" => Some(Field::ClickId),
                    _ => None,
                };
                if let Some(field) = field {
                    let slot = &mut raw.fields[field as usize];
                    if slot.is_some() {
                        raw.duplicate.get_or_insert(field);
                    }
                    *slot = Some(value);
                }
                s.ws();
                if s.eat(b'}') {
                    break;
                }
                if !s.eat(b',') {
                    return false;
                }
                s.ws();
            }
        }
        s.ws();
        s.i == s.b.len()
    }

    struct Scanner<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl<'a> Scanner<'a> {
        fn ws(&mut self) {
            while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
                self.i += 1;
            }
        }
        fn eat(&mut self, c: u8) -> bool {
            let hit = self.b.get(self.i) == Some(&c);
            self.i += hit as usize;
            hit
        }
        /// A string with no escape and no control character.
        fn string(&mut self) -> Option<&'a [u8]> {
            if !self.eat(b'"') {
                return None;
            }
            let start = self.i;
            // Eight bytes at a time: flag any '"', '\\' or control byte. The lowest flag is exact.
            const ONES: u64 = 0x0101_0101_0101_0101;
            const HIGH: u64 = 0x8080_8080_8080_8080;
            let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
            while let Some(chunk) = self.b.get(self.i..self.i + 8) {
                let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                let flags = zero(w ^ (ONES * b'"' as u64))
                    | zero(w ^ (ONES * b'\\' as u64))
                    | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
                if flags != 0 {
                    self.i += (flags.trailing_zeros() / 8) as usize;
                    break;
                }
                self.i += 8;
            }
            loop {
                match *self.b.get(self.i)? {
                    b'"' => break,
                    b'\\' => return None,
                    c if c < 0x20 => return None,
                    _ => self.i += 1,
                }
            }
            let s = &self.b[start..self.i];
            self.i += 1;
            Some(s)
        }
        fn value(&mut self) -> Option<Scalar<'a>> {
            match *self.b.get(self.i)? {
                b'"' => {
                    let s = self.string()?;
                    // The line is valid UTF-8 and the slice is cut at ASCII quotes.
                    let s = std::str::from_utf8(s).ok()?;
                    Some(Scalar::Str(Cow::Borrowed(s)))
                }
                b'n' => self.word(b"null", Scalar::Null),
                b't' => self.word(b"true", Scalar::Bool),
                b'f' => self.word(b"false", Scalar::Bool),
                b'-' => {
                    self.i += 1;
                    let n = self.digits()?;
                    // serde_json reads -0 as a float: so does this path (see Scalar::NegZero).
                    if n == 0 {
                        return Some(Scalar::NegZero);
                    }
                    let v = 0i64.checked_sub_unsigned(n)?;
                    Some(Scalar::Negative(v))
                }
                b'0'..=b'9' => Some(Scalar::Unsigned(self.digits()?)),
                _ => None,
            }
        }
        fn word(&mut self, w: &[u8], v: Scalar<'a>) -> Option<Scalar<'a>> {
            if self.b[self.i..].starts_with(w) {
                self.i += w.len();
                Some(v)
            } else {
                None
            }
        }
        /// A JSON integer's digits (no leading zero), not followed by a fraction or exponent.
        fn digits(&mut self) -> Option<u64> {
            let start = self.i;
            let mut v = 0u64;
            while let Some(&c) = self.b.get(self.i).filter(|c| c.is_ascii_digit()) {
                v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
                self.i += 1;
            }
            let n = self.i - start;
            if n == 0 || (n > 1 && self.b[start] == b'0') {
                return None;
            }
            match self.b.get(self.i) {
                Some(b'.' | b'e' | b'E') => None,
                _ => Some(v),
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// The compact encoding of a validated click, as the log stores it: the collector validates
/// once and the aggregator decodes without parsing JSON again.
///
/// ```text
/// time i64 LE | flags u8 | ad len u8, ad | [user len u8, user] | [ip 4 or 16] | [country 2] | [click_id len u8, click_id]
/// flags: 1 user_id, 2 IPv4, 4 IPv6, 8 country, 16 click_id
/// ```
pub mod wire {
    use std::borrow::Cow;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::{Click, Country, EventTime};

    const USER: u8 = 1;
    const V4: u8 = 2;
    const V6: u8 = 4;
    const COUNTRY: u8 = 8;
    const CLICK_ID: u8 = 16;

    pub fn encode(c: &Click<'_>, out: &mut Vec<u8>) {
        let flags = c.user_id.as_ref().map_or(0, |_| USER)
            | match c.ip {
                Some(IpAddr::V4(_)) => V4,
                Some(IpAddr::V6(_)) => V6,
                None => 0,
            }
            | c.country.map_or(0, |_| COUNTRY)
            | c.click_id.as_ref().map_or(0, |_| CLICK_ID);
        out.extend_from_slice(&c.time.0.to_le_bytes());
        out.push(flags);
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        };
        put_str(out, &c.ad_id);
        if let Some(u) = &c.user_id {
            put_str(out, u);
        }
        match c.ip {
            Some(IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
            Some(IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
            None => {}
        }
        if let Some(country) = c.country {
            out.extend_from_slice(country.as_str().as_bytes());
        }
        if let Some(id) = &c.click_id {
            put_str(out, id);
        }
    }

    /// Decodes one click; `None` when the bytes are not a click this module wrote.
    pub fn decode(b: &[u8]) -> Option<Click<'_>> {
        let mut r = Reader(b);
        let time = EventTime(i64::from_le_bytes(r.take(8)?.try_into().ok()?));
        let flags = r.take(1)?[0];
        let ad_id = Cow::Borrowed(r.str()?);
        let user_id = if flags & USER != 0 { Some(Cow::Borrowed(r.str()?)) } else { None };
        let ip = if flags & V4 != 0 {
            Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(r.take(4)?).ok()?)))
        } else if flags & V6 != 0 {
            Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(r.take(16)?).ok()?)))
        } else {
            None
        };
        let country = if flags & COUNTRY != 0 {
            Some(Country::parse(std::str::from_utf8(r.take(2)?).ok()?)?)
        } else {
            None
        };
        let click_id = if flags & CLICK_ID != 0 { Some(Cow::Borrowed(r.str()?)) } else { None };
        r.0.is_empty().then_some(Click { ad_id, time, user_id, ip, country, click_id })
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(a)
        }
        fn str(&mut self) -> Option<&'a str> {
            let n = self.take(1)?[0] as usize;
            std::str::from_utf8(self.take(n)?).ok()
        }
    }
}
