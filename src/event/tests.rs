use super::*;

const NOW: EventTime = EventTime(1_796_100_000_000); // 2026-12-01T04:40Z
fn v() -> Validation {
    Validation { now: NOW, max_skew_ms: 300_000 }
}
fn parse(line: &str) -> Result<Option<Click<'_>>, Invalid> {
    parse_line(line.as_bytes(), v())
}
fn ok(line: &str) -> Click<'static> {
    parse(line).expect("valid").expect("not blank").into_owned()
}
fn err(line: &str) -> Invalid {
    parse(line).expect_err("invalid")
}
const TS: &str = r#""click_timestamp":"2026-11-30T08:15:02.123Z""#;

#[test]
fn full_event_parses_borrowed() {
    let line = r#"{"ad_id":"ad-1042","click_timestamp":"2026-11-30T08:15:02.123Z","user_id":"u-77","ip":"203.0.113.7","country":"us","click_id":"c-9f2a"}"#;
    let c = parse(line).unwrap().unwrap();
    assert!(matches!(c.ad_id, Cow::Borrowed("ad-1042")));
    assert_eq!(c.time, parse_rfc3339("2026-11-30T08:15:02.123Z").unwrap());
    assert_eq!(c.time.0, 1_796_026_502_123);
    assert!(matches!(c.user_id, Some(Cow::Borrowed("u-77"))));
    assert_eq!(c.ip, Some("203.0.113.7".parse().unwrap()));
    assert_eq!(c.country.unwrap().as_str(), "US");
    assert_eq!(c.click_id.as_deref(), Some("c-9f2a"));
}

#[test]
fn numeric_ad_id_is_its_decimal_string() {
    let a = ok(&format!(r#"{{"ad_id":1042,{TS}}}"#));
    let b = ok(&format!(r#"{{"ad_id":"1042",{TS}}}"#));
    assert_eq!(a.ad_id, "1042");
    assert_eq!(a.identity(), b.identity());
    assert_eq!(ok(&format!(r#"{{"ad_id":0,{TS}}}"#)).ad_id, "0");
    assert_eq!(
        ok(&format!(r#"{{"ad_id":18446744073709551615,{TS}}}"#)).ad_id,
        "18446744073709551615"
    );
}

#[test]
fn blank_lines_are_skipped() {
    assert_eq!(parse(""), Ok(None));
    assert_eq!(parse("  \t\r"), Ok(None));
}

#[test]
fn unknown_fields_ignored_and_null_is_absent() {
    let c = ok(&format!(
        r#"{{"ad_id":"a",{TS},"extra":{{"deep":[1,2,{{"x":null}}]}},"user_id":null,"ip":null,"country":null,"click_id":null}}"#
    ));
    assert_eq!(c.user_id, None);
    assert_eq!(c.ip, None);
    assert_eq!(c.country, None);
    assert_eq!(c.click_id, None);
}

#[test]
fn escaped_strings_are_decoded() {
    let c = ok(&format!(r#"{{"ad_\u0069d":"ad\u002d1",{TS}}}"#));
    assert_eq!(c.ad_id, "ad-1");
}

#[test]
fn line_too_long() {
    let pad = "x".repeat(MAX_LINE_BYTES);
    let line = format!(r#"{{"ad_id":"a",{TS},"pad":"{pad}"}}"#);
    assert_eq!(err(&line), Invalid::LineTooLong { bytes: line.len() });
    // Exactly at the limit is fine.
    let head = format!(r#"{{"ad_id":"a",{TS},"pad":""}}"#);
    let fill = "y".repeat(MAX_LINE_BYTES - head.len());
    let line = format!(r#"{{"ad_id":"a",{TS},"pad":"{fill}"}}"#);
    assert_eq!(line.len(), MAX_LINE_BYTES);
    assert!(parse(&line).is_ok());
}

#[test]
fn not_utf8() {
    let mut line = format!(r#"{{"ad_id":"a",{TS}}}"#).into_bytes();
    line[10] = 0xff;
    assert_eq!(parse_line(&line, v()), Err(Invalid::NotUtf8 { at: 10 }));
}

#[test]
fn not_json() {
    for line in ["{", "hello", r#"{"ad_id":"a",}"#, r#"{"ad_id":"a"} x"#, "{'ad_id':'a'}"] {
        assert!(matches!(err(line), Invalid::NotJson { .. }), "{line}");
    }
    let deep = r#"{"a":"#.repeat(10_000);
    assert!(matches!(err(&deep), Invalid::NotJson { .. }));
}

#[test]
fn not_an_object() {
    for line in ["[1]", "3", r#""ad""#, "null", "true"] {
        assert_eq!(err(line), Invalid::NotAnObject, "{line}");
    }
}

#[test]
fn duplicate_field() {
    assert_eq!(
        err(&format!(r#"{{"ad_id":"a","ad_id":"b",{TS}}}"#)),
        Invalid::DuplicateField { field: Field::AdId }
    );
}

#[test]
fn missing_required() {
    assert_eq!(err(&format!("{{{TS}}}")), Invalid::Missing { field: Field::AdId });
    assert_eq!(err(r#"{"ad_id":"a"}"#), Invalid::Missing { field: Field::ClickTimestamp });
    assert_eq!(err(&format!(r#"{{"ad_id":null,{TS}}}"#)), Invalid::Missing { field: Field::AdId });
}

#[test]
fn wrong_types() {
    let cases = [
        (format!(r#"{{"ad_id":-1,{TS}}}"#), Field::AdId, "an integer"),
        (format!(r#"{{"ad_id":1.5,{TS}}}"#), Field::AdId, "a non-integer number"),
        (format!(r#"{{"ad_id":true,{TS}}}"#), Field::AdId, "a boolean"),
        (format!(r#"{{"ad_id":["a"],{TS}}}"#), Field::AdId, "an array"),
        (
            r#"{"ad_id":"a","click_timestamp":1.5e12}"#.to_string(),
            Field::ClickTimestamp,
            "a non-integer number",
        ),
        (r#"{"ad_id":"a","click_timestamp":{}}"#.to_string(), Field::ClickTimestamp, "an object"),
        (format!(r#"{{"ad_id":"a",{TS},"user_id":7}}"#), Field::UserId, "an integer"),
        (format!(r#"{{"ad_id":"a",{TS},"ip":false}}"#), Field::Ip, "a boolean"),
        (format!(r#"{{"ad_id":"a",{TS},"country":1}}"#), Field::Country, "an integer"),
        (format!(r#"{{"ad_id":"a",{TS},"click_id":[]}}"#), Field::ClickId, "an array"),
    ];
    for (line, field, found) in cases {
        match err(&line) {
            Invalid::WrongType { field: f, found: got, .. } => {
                assert_eq!((f, got), (field, found), "{line}");
            }
            other => panic!("{line}: {other:?}"),
        }
    }
}

#[test]
fn lengths() {
    assert_eq!(err(&format!(r#"{{"ad_id":"",{TS}}}"#)), Invalid::Empty { field: Field::AdId });
    let ad64 = "a".repeat(64);
    assert_eq!(ok(&format!(r#"{{"ad_id":"{ad64}",{TS}}}"#)).ad_id, ad64);
    let ad65 = "a".repeat(65);
    assert_eq!(
        err(&format!(r#"{{"ad_id":"{ad65}",{TS}}}"#)),
        Invalid::TooLong { field: Field::AdId, bytes: 65, max: 64 }
    );
    // Limits are in UTF-8 bytes, not characters: 33 × 'é' is 66 bytes.
    let e33 = "é".repeat(33);
    assert_eq!(
        err(&format!(r#"{{"ad_id":"{e33}",{TS}}}"#)),
        Invalid::TooLong { field: Field::AdId, bytes: 66, max: 64 }
    );
    for field in ["user_id", "click_id"] {
        let ok128 = "u".repeat(128);
        assert!(parse(&format!(r#"{{"ad_id":"a",{TS},"{field}":"{ok128}"}}"#)).is_ok());
        let long = "u".repeat(129);
        match err(&format!(r#"{{"ad_id":"a",{TS},"{field}":"{long}"}}"#)) {
            Invalid::TooLong { field: f, bytes: 129, max: 128 } => assert_eq!(f.name(), field),
            other => panic!("{other:?}"),
        }
    }
    // An empty user_id or click_id is allowed (only ad_id has a minimum).
    assert!(parse(&format!(r#"{{"ad_id":"a",{TS},"user_id":"","click_id":""}}"#)).is_ok());
}

#[test]
fn timestamps_accepted() {
    let t = |s: &str| parse_rfc3339(s).unwrap().0;
    assert_eq!(t("1970-01-01T00:00:00Z"), 0);
    assert_eq!(t("1970-01-01t00:00:00z"), 0);
    assert_eq!(t("1970-01-01T00:00:00.1Z"), 100);
    assert_eq!(t("1970-01-01T00:00:00.12Z"), 120);
    assert_eq!(t("1970-01-01T00:00:00.123456789Z"), 123);
    assert_eq!(t("1970-01-01T00:00:00.999999Z"), 999);
    assert_eq!(t("1970-01-01T01:00:00+01:00"), 0);
    assert_eq!(t("1969-12-31T23:30:00-00:30"), 0);
    assert_eq!(t("1969-12-31T23:59:59.999Z"), -1);
    assert_eq!(t("2024-02-29T12:00:00Z"), 1_709_208_000_000);
    assert_eq!(t("2000-02-29T00:00:00Z"), 951_782_400_000);
    assert_eq!(t("0000-01-01T00:00:00Z"), EventTime::MIN.0);
    assert_eq!(t("9999-12-31T23:59:59.999Z"), EventTime::MAX.0);
    // Integer milliseconds, including before 1970.
    let c = ok(r#"{"ad_id":"a","click_timestamp":-1}"#);
    assert_eq!(c.time, EventTime(-1));
    assert_eq!(c.time.minute(), Minute(-1));
    assert_eq!(ok(r#"{"ad_id":"a","click_timestamp":1796000000000}"#).time.0, 1_796_000_000_000);
    // SPEC §1: `-0` is 0, by both parsers (an escaped string sends the line to serde_json).
    assert_eq!(ok(r#"{"ad_id":"a","click_timestamp":-0}"#).time, EventTime(0));
    assert_eq!(ok(r#"{"ad_id":"\u0061","click_timestamp": -0 }"#).time, EventTime(0));
    assert_eq!(
        parse_line_serde_only(br#"{"ad_id":"a","click_timestamp":-0}"#, v()).unwrap().unwrap().time,
        EventTime(0)
    );
    for not_integer in ["-0.0", "-0e0", "-0.0e1", "0.0"] {
        let line = format!(r#"{{"ad_id":"a","click_timestamp":{not_integer}}}"#);
        assert!(matches!(err(&line), Invalid::WrongType { .. }), "{line}");
    }
}

#[test]
fn timestamps_rejected() {
    use TimestampError as E;
    let cases = [
        ("2026-11-30 08:15:02Z", E::Syntax),
        ("2026-11-30T08:15:02", E::Syntax),
        ("2026-11-30T08:15:02.Z", E::Syntax),
        ("2026-11-30T08:15Z", E::Syntax),
        ("26-11-30T08:15:02Z", E::Syntax),
        ("2026-11-30T08:15:02+0100", E::Syntax),
        ("2026-11-30T08:15:02Z ", E::Syntax),
        ("+2026-11-30T08:15:02Z", E::Syntax),
        ("2026-13-30T08:15:02Z", E::Month),
        ("2026-00-30T08:15:02Z", E::Month),
        ("2026-02-29T08:15:02Z", E::Day),
        ("1900-02-29T08:15:02Z", E::Day),
        ("2026-04-31T08:15:02Z", E::Day),
        ("2026-11-00T08:15:02Z", E::Day),
        ("2026-11-30T24:00:00Z", E::Hour),
        ("2026-11-30T08:60:02Z", E::Minute),
        ("2026-11-30T08:15:60Z", E::Second),
        ("2026-11-30T08:15:02+24:00", E::Offset),
        ("2026-11-30T08:15:02+01:60", E::Offset),
        ("0000-01-01T00:00:00+00:01", E::OutOfRange),
    ];
    for (s, want) in cases {
        assert_eq!(parse_rfc3339(s), Err(want), "{s}");
        let line = format!(r#"{{"ad_id":"a","click_timestamp":"{s}"}}"#);
        assert_eq!(err(&line), Invalid::BadTimestamp(want), "{s}");
    }
    assert_eq!(
        err(r#"{"ad_id":"a","click_timestamp":253402300800000}"#),
        Invalid::BadTimestamp(E::OutOfRange)
    );
    assert_eq!(
        err(r#"{"ad_id":"a","click_timestamp":-62167219200001}"#),
        Invalid::BadTimestamp(E::OutOfRange)
    );
}

#[test]
fn clock_skew() {
    let at = |ms: i64| format!(r#"{{"ad_id":"a","click_timestamp":{ms}}}"#);
    assert!(parse(&at(NOW.0 + 300_000)).is_ok());
    assert_eq!(err(&at(NOW.0 + 300_001)), Invalid::InFuture { ahead_ms: 300_001 });
    assert!(parse(&at(0)).is_ok(), "the past is never rejected by skew");
}

#[test]
fn ips() {
    let ip = |s: &str| ok(&format!(r#"{{"ad_id":"a",{TS},"ip":"{s}"}}"#)).ip.unwrap();
    assert_eq!(ip("2001:DB8:0:0::1"), ip("2001:db8::1"));
    assert_eq!(ip("::ffff:1.2.3.4"), ip("1.2.3.4"));
    for bad in ["1.2.3", "1.2.3.256", "", "fe80::1%eth0", "01.2.3.4", " 1.2.3.4", "2001:db8::/32"] {
        assert_eq!(
            err(&format!(r#"{{"ad_id":"a",{TS},"ip":"{bad}"}}"#)),
            Invalid::BadIp { value: bad.to_string() },
            "{bad}"
        );
    }
}

#[test]
fn countries() {
    assert_eq!(Country::all_assigned().count(), 249);
    let c = |s: &str| ok(&format!(r#"{{"ad_id":"a",{TS},"country":"{s}"}}"#)).country.unwrap();
    assert_eq!(c("de").as_str(), "DE");
    assert_eq!(c("Gb").as_str(), "GB");
    for bad in ["UK", "XK", "EU", "ZZ", "USA", "U", "", "1A", "ü"] {
        assert_eq!(
            err(&format!(r#"{{"ad_id":"a",{TS},"country":"{bad}"}}"#)),
            Invalid::UnknownCountry { value: bad.to_string() },
            "{bad}"
        );
    }
}

#[test]
fn identities_are_keyed() {
    let c = ok(r#"{"ad_id":"a","click_timestamp":1,"click_id":"c1"}"#);
    let (k1, k2) = (IdentityKey::from_seed(1), IdentityKey::from_seed(2));
    assert_eq!(c.identity_with(&k1), c.identity_with(&k1.clone()));
    assert_ne!(c.identity_with(&k1), c.identity_with(&k2), "another key, another hash");
    assert_ne!(k1, k2);
    assert_eq!(format!("{k1:?}"), "IdentityKey(..)", "the secret is not printed");
}

#[test]
fn identity_rules() {
    let id = |s: &str| ok(s).identity();
    // click_id decides when present on both.
    let a = id(r#"{"ad_id":"a","click_timestamp":1,"click_id":"c1","user_id":"x"}"#);
    let b = id(r#"{"ad_id":"a","click_timestamp":2,"click_id":"c1","user_id":"y"}"#);
    assert_eq!(a, b);
    assert_ne!(a, id(r#"{"ad_id":"b","click_timestamp":1,"click_id":"c1"}"#));
    assert_ne!(a, id(r#"{"ad_id":"a","click_timestamp":1,"click_id":"c2"}"#));
    // Present on one only: different clicks.
    assert_ne!(
        id(r#"{"ad_id":"a","click_timestamp":1}"#),
        id(r#"{"ad_id":"a","click_timestamp":1,"click_id":""}"#)
    );
    // Without click_id: ad, time (ms), user and ip.
    let base = id(
        r#"{"ad_id":"a","click_timestamp":"1970-01-01T00:00:00.0019Z","user_id":"u","ip":"::1"}"#,
    );
    assert_eq!(
        base,
        id(r#"{"ad_id":"a","click_timestamp":1,"user_id":"u","ip":"0:0::1","country":"US"}"#)
    );
    assert_ne!(base, id(r#"{"ad_id":"a","click_timestamp":2,"user_id":"u","ip":"::1"}"#));
    assert_ne!(base, id(r#"{"ad_id":"a","click_timestamp":1,"user_id":"v","ip":"::1"}"#));
    assert_ne!(base, id(r#"{"ad_id":"a","click_timestamp":1,"ip":"::1"}"#));
    assert_ne!(base, id(r#"{"ad_id":"a","click_timestamp":1,"user_id":"u"}"#));
    assert_ne!(
        id(r#"{"ad_id":"a","click_timestamp":1,"user_id":""}"#),
        id(r#"{"ad_id":"a","click_timestamp":1}"#),
        "an empty user_id is not an absent one"
    );
}

#[test]
fn minutes_and_formatting() {
    assert_eq!(EventTime(0).minute(), Minute(0));
    assert_eq!(EventTime(59_999).minute(), Minute(0));
    assert_eq!(EventTime(60_000).minute(), Minute(1));
    assert_eq!(EventTime(-1).minute(), Minute(-1));
    assert_eq!(EventTime(-60_000).minute(), Minute(-1));
    assert_eq!(EventTime(-60_001).minute(), Minute(-2));
    assert_eq!(Minute(-1).end(), EventTime(0));
    for ms in [0, -1, 1_796_026_502_123, EventTime::MIN.0, EventTime::MAX.0, 951_782_400_000] {
        assert_eq!(parse_rfc3339(&format_rfc3339(EventTime(ms))), Ok(EventTime(ms)));
    }
    assert_eq!(format_rfc3339(EventTime(1_796_026_502_123)), "2026-11-30T08:15:02.123Z");
}

mod differential {
    use super::*;
    use crate::event::parse::{fast, parse_ip, RawClick};
    use proptest::prelude::*;

    /// JSON-ish lines: mostly well-formed flat objects with the real keys, with perturbations
    /// that the fast path must either parse exactly as serde_json does or decline.
    fn line() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("ad_id".to_string()),
            Just("click_timestamp".to_string()),
            Just("user_id".to_string()),
            Just("ip".to_string()),
            Just("country".to_string()),
            Just("click_id".to_string()),
            Just("ad_\\u0069d".to_string()),
            "[a-z_]{0,8}",
        ];
        let value = prop_oneof![
            Just("\"ad-1\"".to_string()),
            Just("\"2026-11-30T08:15:02.123Z\"".to_string()),
            Just("\"10.0.0.1\"".to_string()),
            Just("\"us\"".to_string()),
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("nul".to_string()),
            Just("-0".to_string()),
            Just("01".to_string()),
            Just("1.5".to_string()),
            Just("1e3".to_string()),
            Just("18446744073709551616".to_string()),
            Just("-9223372036854775808".to_string()),
            Just("-9223372036854775809".to_string()),
            Just("{\"a\":[1,{}]}".to_string()),
            Just("[]".to_string()),
            Just("\"a\\\"b\"".to_string()),
            Just("\"tab\there\"".to_string()),
            Just("\"é€\"".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "\"[ -~]{0,6}\"",
        ];
        let ws = prop_oneof![Just(""), Just(" "), Just("\t"), Just("\r"), Just(" \r\n ")];
        (proptest::collection::vec((key, value, ws.clone()), 0..8), ws, any::<u8>(), 0..4u8)
            .prop_map(|(pairs, ws, junk, mode)| {
                let body: Vec<String> =
                    pairs.into_iter().map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}{w}")).collect();
                let mut s = format!("{ws}{{{}}}{ws}", body.join(","));
                match mode {
                    0 => s.push(junk as char),
                    1 => {
                        let at =
                            (0..=s.len() / 2).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                        s.insert(at, junk as char)
                    }
                    2 => s = s.replacen(',', ",,", 1),
                    _ => {}
                }
                s
            })
    }

    #[test]
    fn fast_path_takes_the_common_shape_and_declines_the_rest() {
        let mut raw = RawClick::default();
        let common = br#"{"ad_id":"ad-1042","click_timestamp":"2026-11-30T08:15:02.123Z","user_id":"u-77","ip":"203.0.113.7","country":"US","click_id":"c-9f2a","n":-5,"x":null}"#;
        assert!(fast::scan(common, &mut raw));
        assert!(fast::scan(
            br#" { "ad_id" : 1 , "click_timestamp" : 2 } "#,
            &mut RawClick::default()
        ));
        for declined in
            [&br#"{"ad_id":"a"b"}"#[..], br#"{"a":1.5}"#, br#"{"a":{}}"#, br#"{"a":1}x"#, b"[1]"]
        {
            assert!(
                !fast::scan(declined, &mut RawClick::default()),
                "{}",
                String::from_utf8_lossy(declined)
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

        #[test]
        fn fast_path_equals_serde(line in line()) {
            let v = Validation { now: EventTime(i64::MAX / 4), max_skew_ms: 0 };
            prop_assert_eq!(parse_line(line.as_bytes(), v), parse_line_serde_only(line.as_bytes(), v), "{}", line);
        }

        #[test]
        fn fast_path_equals_serde_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let v = Validation { now: EventTime(0), max_skew_ms: 0 };
            prop_assert_eq!(parse_line(&bytes, v), parse_line_serde_only(&bytes, v));
        }

        #[test]
        fn ipv4_quick_path_equals_std(s in "[0-9.]{1,16}|[0-9]{1,3}(\\.[0-9]{1,3}){3}") {
            prop_assert_eq!(parse_ip(&s), s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical()));
        }
    }
}

#[test]
fn wire_round_trip() {
    let lines = [
        r#"{"ad_id":"ad-1042","click_timestamp":"2026-11-30T08:15:02.123Z","user_id":"u-77","ip":"203.0.113.7","country":"us","click_id":"c-9f2a"}"#,
        r#"{"ad_id":7,"click_timestamp":-5,"ip":"2001:db8::1"}"#,
        r#"{"ad_id":"é","click_timestamp":0,"user_id":"","click_id":""}"#,
    ];
    for line in lines {
        let c = ok(line);
        let mut buf = Vec::new();
        wire::encode(&c, &mut buf);
        let back = wire::decode(&buf).expect("decodes");
        assert_eq!(back, c);
        assert_eq!(back.identity(), c.identity());
        for cut in 0..buf.len() {
            assert_eq!(wire::decode(&buf[..cut]), None);
        }
    }
    let max = format!(
        r#"{{"ad_id":"{}","click_timestamp":0,"user_id":"{}","click_id":"{}"}}"#,
        "a".repeat(64),
        "u".repeat(128),
        "c".repeat(128)
    );
    let c = ok(&max);
    let mut buf = Vec::new();
    wire::encode(&c, &mut buf);
    assert_eq!(wire::decode(&buf), Some(c));
}
