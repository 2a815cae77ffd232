//! Differential test of request framing: the fast lane's (`fastlane::frame::request_framing`,
//! the lane's own code) against hyper 1.x's HTTP/1.1 server, in-process, on known desync
//! shapes (`tests/corpus/desync.txt`), a few large ones, and seeded mutations of them. Any
//! disagreement on where a request or body ends, or whether it is valid, fails. The same
//! comparison is the fuzz target `crates/sandgate/fuzz` runs.

use rand::{rngs::StdRng, SeedableRng};
use sandgate::fastlane::differential::{check_request, mutate, parse_corpus};
use sandgate::fastlane::frame::{request_framing, Verdict};

const CORPUS: &str = include_str!("../corpus/desync.txt");
/// Generated mutations per run: bounded, a few seconds.
const MUTATIONS: usize = 2000;

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut r = b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    r.extend_from_slice(body);
    r.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
    r
}

/// Shapes too long for a corpus line: extensions and trailers at and over hyper's limits,
/// many trailer fields, long runs of leading zeros.
fn large() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for ext in [16 * 1024 - 2, 16 * 1024 - 1, 16 * 1024, 20_000] {
        let mut body = b"1;".to_vec();
        body.extend(std::iter::repeat_n(b'e', ext - 1));
        body.extend(b"\r\nx\r\n0\r\n\r\n");
        out.push(chunked(&body));
    }
    let mut spread = Vec::new();
    for _ in 0..3 {
        spread.extend(b"1;");
        spread.extend([b'e'; 6000]);
        spread.extend(b"\r\nx\r\n");
    }
    spread.extend(b"0\r\n\r\n");
    out.push(chunked(&spread));
    for len in [16 * 1024 - 12, 16 * 1024 - 11, 16 * 1024 - 10, 16 * 1024] {
        let mut body = b"0\r\nx: ".to_vec();
        body.extend(std::iter::repeat_n(b'a', len - 7));
        body.extend(b"\r\n\r\n");
        out.push(chunked(&body));
    }
    for fields in [99, 100, 101] {
        let mut body = b"0\r\n".to_vec();
        for i in 0..fields {
            body.extend(format!("t{i}: 1\r\n").as_bytes());
        }
        body.extend(b"\r\n");
        out.push(chunked(&body));
    }
    for zeros in [100, 20_000] {
        let mut body = vec![b'0'; zeros];
        body.extend(b"1\r\nx\r\n0\r\n\r\n");
        out.push(chunked(&body));
    }
    out
}

#[test]
fn the_fast_lane_frames_requests_as_hyper_does() {
    let corpus = parse_corpus(CORPUS);
    assert!(corpus.len() > 80, "the corpus reads");
    // The corpus covers each of the fast lane's verdicts, not just one.
    let mut seen = [0; 4];
    for input in &corpus {
        seen[match request_framing(input) {
            Verdict::Partial => 0,
            Verdict::Handoff => 1,
            Verdict::Refuse(_) => 2,
            Verdict::Complete { .. } => 3,
        }] += 1;
    }
    assert!(seen.iter().all(|&n| n >= 1), "verdicts seen: {seen:?}");
    let mut failures = Vec::new();
    for input in corpus.iter().chain(&large()) {
        if let Err(e) = check_request(input) {
            failures.push(format!("{}\n  {e}", input.escape_ascii()));
        }
    }
    let mut rng = StdRng::seed_from_u64(0x5a9d_6a7e);
    for i in 0..MUTATIONS {
        let input = mutate(&corpus[i % corpus.len()], &mut rng);
        if let Err(e) = check_request(&input) {
            failures.push(format!("mutation {i}: {}\n  {e}", input.escape_ascii()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes the corpus as the fuzzer's seed files (docs/fuzzing.md):
/// `cargo test --test it framing::fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes the fuzzer's seed files; run by hand"]
fn fuzz_seeds() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/request_framing");
    std::fs::create_dir_all(dir).unwrap();
    for (i, input) in parse_corpus(CORPUS).iter().chain(&large()).enumerate() {
        std::fs::write(format!("{dir}/desync-{i:03}"), input).unwrap();
    }
}
