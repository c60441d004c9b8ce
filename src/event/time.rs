//! RFC 3339 times: parsing (as click_timestamp and query parameters accept them) and
//! formatting (as answers write them).

use super::{EventTime, Minute, MINUTE_MS};

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

pub(super) fn time_in_range(ms: i64) -> Option<EventTime> {
    (EventTime::MIN.0..=EventTime::MAX.0).contains(&ms).then_some(EventTime(ms))
}

/// Why a time given as a parameter (`from`, `--to`) cannot be used as a minute.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MinuteError {
    #[error("{name}: {raw:?} is not an RFC 3339 time or epoch milliseconds ({why})")]
    Syntax { name: String, raw: String, why: TimestampError },
    #[error("{name}: {raw:?} is outside years 0000-9999")]
    OutOfRange { name: String, raw: String },
    #[error("{name}: {raw:?} is not aligned to a minute")]
    Unaligned { name: String, raw: String },
}

/// Parses a minute-aligned time (RFC 3339 or epoch milliseconds); errors name `name`.
pub fn parse_minute(name: &str, raw: &str) -> Result<Minute, MinuteError> {
    let t = match raw.parse::<i64>() {
        Ok(ms) => EventTime(ms),
        Err(_) => parse_rfc3339(raw).map_err(|why| MinuteError::Syntax {
            name: name.into(),
            raw: raw.into(),
            why,
        })?,
    };
    if !(EventTime::MIN.0..=EventTime::MAX.0 - MINUTE_MS).contains(&t.0) {
        return Err(MinuteError::OutOfRange { name: name.into(), raw: raw.into() });
    }
    if t.0.rem_euclid(MINUTE_MS) != 0 {
        return Err(MinuteError::Unaligned { name: name.into(), raw: raw.into() });
    }
    Ok(t.minute())
}
