//! The line parser on arbitrary bytes: never panics, and the JSON fast path agrees with
//! serde_json on every input.
#![no_main]

use adclick::event::{parse_line, parse_line_serde_only, EventTime, Validation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let v = Validation { now: EventTime(1_796_000_000_000), max_skew_ms: 300_000 };
    assert_eq!(parse_line(data, v), parse_line_serde_only(data, v));
});
