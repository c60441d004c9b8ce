//! The compact encoding of a validated click, as the log stores it: the collector validates
//! once and the aggregator decodes without parsing JSON again.
//!
//! ```text
//! time i64 LE | flags u8 | ad len u8, ad | [user len u8, user] | [ip 4 or 16] | [country 2] | [click_id len u8, click_id]
//! flags: 1 user_id, 2 IPv4, 4 IPv6, 8 country, 16 click_id
//! ```

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
