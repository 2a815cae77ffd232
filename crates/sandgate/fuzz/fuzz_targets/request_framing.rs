//! Fuzz target: the fast lane's request framing against hyper's HTTP/1.1 server on the same
//! bytes (`sandgate::fastlane::differential::check_request`); any disagreement is a crash.
//! Run: `cargo +nightly fuzz run request_framing` in `crates/sandgate` (see docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = sandgate::fastlane::differential::check_request(data) {
        panic!("{}\n{e}", data.escape_ascii());
    }
});
