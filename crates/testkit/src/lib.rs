//! Test helpers shared by neocloud's crates: the reference outputs of
//! llama.cpp in `../shared/reference`, and a writer of small synthetic GGUF
//! files for loader and fault tests, and a loopback HTTP client with a guard
//! around a running `neocloud serve`.

// Only tests use this crate; failing loudly on missing fixtures is its job.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

pub mod gguf_writer;
pub mod http;
pub mod mock_upstream;

use std::path::PathBuf;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shared folder beside the repository (`$NEOCLOUD_SHARED` overrides).
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("NEOCLOUD_SHARED") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("../shared"),
    }
}

/// Reads `reference/<model>/<file>` as one JSON value per line.
pub fn reference_lines(model: &str, file: &str) -> Vec<serde_json::Value> {
    json_lines(&shared_dir().join("reference").join(model).join(file))
}

/// Reads the file at `path` as one JSON value per line (blank lines
/// skipped).
pub fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// `n` deterministic pseudo-random values in `[lo, hi)` from `seed`
/// (xorshift), the same on every platform.
pub fn pseudo_random(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * (hi - lo) + lo
        })
        .collect()
}
