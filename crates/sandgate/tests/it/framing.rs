//! Differential test of request framing: the fast lane's (`fastlane::frame::request_framing`,
//! the lane's own code) against hyper 1.x's HTTP/1.1 server, in-process, on known desync
//! shapes (`tests/corpus/desync.txt`), a few large ones, and seeded mutations of them. Any
//! disagreement on where a request or body ends, or whether it is valid, fails. The same
//! comparison is the fuzz target `crates/sandgate/fuzz` runs.

use rand::{rngs::StdRng, SeedableRng};
use sandgate::fastlane::differential::{check_request, large_inputs, mutate, parse_corpus, CORPUS};
use sandgate::fastlane::frame::{request_framing, Verdict};

/// Generated mutations per run: bounded, a few seconds.
const MUTATIONS: usize = 2000;

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
    for input in corpus.iter().chain(&large_inputs()) {
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
