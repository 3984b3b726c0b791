//! The harness every fuzz target runs under: proptest on the stable
//! toolchain, with the seed printed and settable so any failure reproduces.
//!
//! - `FLOTILLA_FUZZ_SEED=N` replays the run that printed seed `N` (the same
//!   cases in the same order, the same shrinking).
//! - `FLOTILLA_FUZZ_CASES=N` runs `N` cases per target;
//!   `FLOTILLA_FUZZ_SCALE=K` runs `K` times each target's default. A long
//!   campaign:
//!   `FLOTILLA_FUZZ_SCALE=20 cargo test -p flotilla-shared --test fuzz_decoders`
//!   and `... -p flotilla-coordinator --test fuzz_ledger` (`--release` runs
//!   more cases per second; a debug build also traps integer overflow).
//!
//! Without them each target runs its modest default (the whole set takes a
//! few seconds in CI's `cargo test --workspace`) from a fresh seed, so every
//! CI run explores new inputs and still says how to replay a failure.
//!
//! Included by `#[path]` from each crate's fuzz tests, so that one harness
//! serves them all.

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use std::time::{SystemTime, UNIX_EPOCH};

/// splitmix64: spreads a 64-bit seed over the 32 bytes ChaCha wants.
fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn env_u64(key: &str) -> Option<u64> {
    let text = std::env::var(key).ok()?;
    match text.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{key}={text:?} is not a whole number"),
    }
}

/// The seed of this run of target `name`: `FLOTILLA_FUZZ_SEED`, else fresh.
fn seed_for(name: &str) -> u64 {
    if let Some(seed) = env_u64("FLOTILLA_FUZZ_SEED") {
        return seed;
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos ^ u64::from(std::process::id()).rotate_left(32);
    for b in name.bytes() {
        x = splitmix(&mut x) ^ u64::from(b);
    }
    splitmix(&mut x) >> 11 // short enough to copy by hand
}

/// Cases to run for a target whose default is `default`.
pub fn cases(default: u32) -> u32 {
    if let Some(n) = env_u64("FLOTILLA_FUZZ_CASES") {
        return n.clamp(1, u64::from(u32::MAX)) as u32;
    }
    let scale = env_u64("FLOTILLA_FUZZ_SCALE").unwrap_or(1).max(1);
    (u64::from(default) * scale).min(u64::from(u32::MAX)) as u32
}

/// Runs `test` on `cases(default_cases)` values of `strategy`. A failing
/// case (an `Err` or a panic) is shrunk, and the test fails with the minimal
/// input, the seed and the command that replays it. `name` must be the test
/// function's name, so the printed command selects it.
pub fn check<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let seed = seed_for(name);
    let cases = cases(default_cases);
    let replay = format!(
        "FLOTILLA_FUZZ_SEED={seed} FLOTILLA_FUZZ_CASES={cases} cargo test -p {} --test {} -- --exact {name}",
        env!("CARGO_PKG_NAME"),
        env!("CARGO_CRATE_NAME"),
    );
    eprintln!("fuzz {name}: {cases} cases, seed {seed}; replay: {replay}");
    let mut x = seed;
    let key: Vec<u8> = (0..4).flat_map(|_| splitmix(&mut x).to_le_bytes()).collect();
    let config = Config {
        cases,
        failure_persistence: None,
        // a target's inputs are small; bound the shrinking of a slow one
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    match runner.run(&strategy, test) {
        Ok(()) => {}
        Err(TestError::Fail(why, input)) => {
            panic!("fuzz {name} failed: {why}\nminimal input: {input:#?}\nseed {seed}; replay: {replay}")
        }
        Err(TestError::Abort(why)) => panic!("fuzz {name} aborted: {why}\nseed {seed}; replay: {replay}"),
    }
}
