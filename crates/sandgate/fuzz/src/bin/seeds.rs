//! Writes the differential test's inputs (the desync corpus and the large shapes) as the
//! fuzzer's seed files under `fuzz/corpus/request_framing` (docs/fuzzing.md):
//! `cargo +nightly run --manifest-path crates/sandgate/fuzz/Cargo.toml --bin seeds`.

use sandgate::fastlane::differential::{large_inputs, parse_corpus, CORPUS};

fn main() -> std::io::Result<()> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/request_framing");
    std::fs::create_dir_all(dir)?;
    let inputs: Vec<Vec<u8>> = parse_corpus(CORPUS).into_iter().chain(large_inputs()).collect();
    for (i, input) in inputs.iter().enumerate() {
        std::fs::write(format!("{dir}/desync-{i:03}"), input)?;
    }
    println!("{} seed files in {dir}", inputs.len());
    Ok(())
}
