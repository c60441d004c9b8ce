//! Pre-defined filters (SPEC §2): compiled from the config's `[[filters]]` into a form that
//! matches one click against every filter without allocating.
//!
//! A filter is a row of dimension conditions (`country`, `ip`, `user_id`); a click matches when it
//! meets every condition the filter gives. The result of matching is a [`FilterMask`], bit `i` set
//! for filter `i` in config order. Countries are a 676-bit set, CIDRs are integer ranges, user ids
//! a hash set. At most [`MAX_FILTERS`] filters, so a mask is one `u64`.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::event::{Click, Country};

/// At most this many filters: a mask is one `u64`.
pub const MAX_FILTERS: usize = 64;

/// One `[[filters]]` table of the config file, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Vec<String>>,
}

/// Why a filter definition is rejected. Each names the filter and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("filters: id {id:?} must match [a-z0-9_-]{{1,32}}")]
    BadId { id: String },
    #[error("filters: id {id:?} is defined twice")]
    DuplicateId { id: String },
    #[error("filters: at most {MAX_FILTERS} filters, found {count}")]
    TooMany { count: usize },
    #[error("filters.{id}.{key}: an empty list matches nothing")]
    EmptyList { id: String, key: &'static str },
    #[error("filters.{id}.country: {value:?} is not an assigned ISO 3166-1 alpha-2 code")]
    BadCountry { id: String, value: String },
    #[error("filters.{id}.ip: {value:?} is not a CIDR (like 10.0.0.0/8) or an IP address")]
    BadCidr { id: String, value: String },
}

/// Bit `i` set when the click matches filter `i`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FilterMask(pub u64);

impl FilterMask {
    pub fn contains(self, i: usize) -> bool {
        self.0 >> i & 1 == 1
    }
    /// The indexes of the filters matched, ascending.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                i
            })
        })
    }
}

/// The compiled filters, in config order.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    ids: Vec<String>,
    compiled: Vec<Compiled>,
}

#[derive(Debug, Clone)]
struct Compiled {
    countries: Option<[u64; 11]>,
    /// Inclusive address ranges; IPv4 and IPv6 apart so an address only meets its own family.
    v4: Option<Vec<(u32, u32)>>,
    v6: Vec<(u128, u128)>,
    users: Option<HashSet<Box<str>>>,
}

impl Filters {
    pub fn compile(configs: &[FilterConfig]) -> Result<Filters, FilterError> {
        if configs.len() > MAX_FILTERS {
            return Err(FilterError::TooMany { count: configs.len() });
        }
        let mut filters = Filters::default();
        for config in configs {
            let id = &config.id;
            let id_ok = (1..=32).contains(&id.len())
                && id.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !id_ok {
                return Err(FilterError::BadId { id: id.clone() });
            }
            if filters.ids.contains(id) {
                return Err(FilterError::DuplicateId { id: id.clone() });
            }
            let non_empty = |list: &Option<Vec<String>>, key| match list {
                Some(l) if l.is_empty() => Err(FilterError::EmptyList { id: id.clone(), key }),
                _ => Ok(()),
            };
            non_empty(&config.country, "country")?;
            non_empty(&config.ip, "ip")?;
            non_empty(&config.user_id, "user_id")?;

            let countries = match &config.country {
                None => None,
                Some(list) => {
                    let mut bits = [0u64; 11];
                    for value in list {
                        let c = Country::parse(value).ok_or_else(|| FilterError::BadCountry {
                            id: id.clone(),
                            value: value.clone(),
                        })?;
                        bits[c.index() / 64] |= 1 << (c.index() % 64);
                    }
                    Some(bits)
                }
            };
            let (v4, v6) = match &config.ip {
                None => (None, Vec::new()),
                Some(list) => {
                    let (mut v4, mut v6) = (Vec::new(), Vec::new());
                    for value in list {
                        let net = parse_net(value).ok_or_else(|| FilterError::BadCidr {
                            id: id.clone(),
                            value: value.clone(),
                        })?;
                        match net {
                            IpNet::V4(n) => v4.push((n.network().into(), n.broadcast().into())),
                            IpNet::V6(n) => v6.push((n.network().into(), n.broadcast().into())),
                        }
                    }
                    (Some(v4), v6)
                }
            };
            let users =
                config.user_id.as_ref().map(|l| l.iter().map(|u| u.as_str().into()).collect());
            filters.ids.push(id.clone());
            filters.compiled.push(Compiled { countries, v4, v6, users });
        }
        Ok(filters)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Filter ids in config order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|i| i == id)
    }

    /// Which filters the click matches.
    pub fn matches(&self, click: &Click<'_>) -> FilterMask {
        let mut mask = 0u64;
        for (i, f) in self.compiled.iter().enumerate() {
            if f.matches(click) {
                mask |= 1 << i;
            }
        }
        FilterMask(mask)
    }
}

impl Compiled {
    fn matches(&self, click: &Click<'_>) -> bool {
        if let Some(bits) = &self.countries {
            match click.country {
                Some(c) if bits[c.index() / 64] >> (c.index() % 64) & 1 == 1 => {}
                _ => return false,
            }
        }
        if let Some(v4) = &self.v4 {
            let hit = match click.ip {
                Some(IpAddr::V4(a)) => {
                    let a = u32::from(a);
                    v4.iter().any(|&(lo, hi)| lo <= a && a <= hi)
                }
                Some(IpAddr::V6(a)) => {
                    let a = u128::from(a);
                    self.v6.iter().any(|&(lo, hi)| lo <= a && a <= hi)
                }
                None => false,
            };
            if !hit {
                return false;
            }
        }
        if let Some(users) = &self.users {
            match &click.user_id {
                Some(u) if users.contains(u.as_ref()) => {}
                _ => return false,
            }
        }
        true
    }
}

/// A CIDR or a bare address (a /32 or /128). An IPv4-mapped IPv6 network is taken as the IPv4
/// network it maps, as click addresses are.
fn parse_net(s: &str) -> Option<IpNet> {
    let net =
        s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))?.trunc();
    if let IpNet::V6(n) = net {
        if let (Some(v4), true) = (n.network().to_ipv4_mapped(), n.prefix_len() >= 96) {
            return ipnet::Ipv4Net::new(v4, n.prefix_len() - 96).ok().map(IpNet::V4);
        }
    }
    Some(net)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{parse_line, Validation};

    fn cfg(id: &str, country: &[&str], ip: &[&str], user: &[&str]) -> FilterConfig {
        let list = |l: &[&str]| (!l.is_empty()).then(|| l.iter().map(|s| s.to_string()).collect());
        FilterConfig { id: id.into(), country: list(country), ip: list(ip), user_id: list(user) }
    }

    fn mask(filters: &Filters, line: &str) -> FilterMask {
        let v = Validation { now: crate::event::EventTime(i64::MAX / 2), max_skew_ms: 0 };
        filters.matches(&parse_line(line.as_bytes(), v).unwrap().unwrap())
    }

    #[test]
    fn every_condition_must_hold() {
        let f = Filters::compile(&[
            cfg("us", &["US"], &[], &[]),
            cfg("office", &[], &["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"], &[]),
            cfg("us-office-bob", &["us", "ca"], &["10.0.0.0/8"], &["bob"]),
            cfg("all", &[], &[], &[]),
        ])
        .unwrap();
        let m = |l| mask(&f, l).iter().collect::<Vec<_>>();
        assert_eq!(m(r#"{"ad_id":"a","click_timestamp":0}"#), vec![3]);
        assert_eq!(m(r#"{"ad_id":"a","click_timestamp":0,"country":"us"}"#), vec![0, 3]);
        assert_eq!(m(r#"{"ad_id":"a","click_timestamp":0,"ip":"10.255.255.255"}"#), vec![1, 3]);
        assert_eq!(m(r#"{"ad_id":"a","click_timestamp":0,"ip":"11.0.0.0"}"#), vec![3]);
        assert_eq!(m(r#"{"ad_id":"a","click_timestamp":0,"ip":"192.168.1.7"}"#), vec![1, 3]);
        assert_eq!(m(r#"{"ad_id":"a","click_timestamp":0,"ip":"192.168.1.8"}"#), vec![3]);
        assert_eq!(m(r#"{"ad_id":"a","click_timestamp":0,"ip":"2001:DB8:ffff::1"}"#), vec![1, 3]);
        assert_eq!(m(r#"{"ad_id":"a","click_timestamp":0,"ip":"::ffff:10.1.2.3"}"#), vec![1, 3]);
        assert_eq!(
            m(
                r#"{"ad_id":"a","click_timestamp":0,"ip":"10.1.2.3","country":"CA","user_id":"bob"}"#
            ),
            vec![1, 2, 3]
        );
        assert_eq!(
            m(
                r#"{"ad_id":"a","click_timestamp":0,"ip":"10.1.2.3","country":"CA","user_id":"Bob"}"#
            ),
            vec![1, 3],
            "user ids are exact"
        );
    }

    #[test]
    fn bad_definitions_are_named() {
        let err = |c: FilterConfig| Filters::compile(&[c]).unwrap_err().to_string();
        assert!(err(cfg("US", &["US"], &[], &[])).contains("\"US\" must match"));
        assert!(err(cfg("", &["US"], &[], &[])).contains("must match"));
        assert!(err(cfg(&"a".repeat(33), &["US"], &[], &[])).contains("must match"));
        assert!(err(cfg("x", &["UK"], &[], &[])).contains("filters.x.country: \"UK\""));
        assert!(err(cfg("x", &[], &["10.0.0.0/33"], &[])).contains("filters.x.ip: \"10.0.0.0/33\""));
        let empty = FilterConfig { id: "x".into(), country: Some(vec![]), ..Default::default() };
        assert!(err(empty).contains("filters.x.country: an empty list"));
        let twice = Filters::compile(&[cfg("x", &["US"], &[], &[]), cfg("x", &["DE"], &[], &[])]);
        assert_eq!(twice.unwrap_err(), FilterError::DuplicateId { id: "x".into() });
        let many: Vec<_> = (0..65).map(|i| cfg(&format!("f{i}"), &["US"], &[], &[])).collect();
        assert_eq!(Filters::compile(&many).unwrap_err(), FilterError::TooMany { count: 65 });
    }

    #[test]
    fn host_bits_in_a_cidr_are_ignored() {
        let f = Filters::compile(&[cfg("n", &[], &["10.1.2.3/8"], &[])]).unwrap();
        assert!(mask(&f, r#"{"ad_id":"a","click_timestamp":0,"ip":"10.200.0.1"}"#).contains(0));
    }
}
