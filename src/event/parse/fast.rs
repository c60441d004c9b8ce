//! The fast path for the common line shape.

use std::borrow::Cow;

use super::{RawClick, Scalar};
use crate::event::Field;

/// Scans a flat JSON object whose strings have no escapes and whose numbers are integers,
/// filling `raw` exactly as the serde visitor would. Returns false, leaving `raw` in any state,
/// for anything else (escapes, floats, nesting, malformed input): the caller then parses the
/// line with serde_json, which also words every error. `text` is valid UTF-8.
pub(in crate::event) fn scan<'a>(text: &'a [u8], raw: &mut RawClick<'a>) -> bool {
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
