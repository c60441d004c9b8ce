//! One NDJSON line into a validated [`Click`]: the serde visitor, the rules of SPEC §1, and
//! the dispatch to the fast scanner.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::time::{parse_rfc3339, time_in_range, TimestampError};
use super::{
    Click, Country, EventTime, Field, Invalid, MAX_AD_ID_BYTES, MAX_ID_BYTES, MAX_LINE_BYTES,
};

pub(in crate::event) mod fast;

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
pub(in crate::event) struct RawClick<'a> {
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
pub(in crate::event) fn parse_ip(s: &str) -> Option<IpAddr> {
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
