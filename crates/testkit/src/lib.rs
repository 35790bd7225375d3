//! Test helpers shared by neocloud's crates: the reference outputs of
//! llama.cpp (a copy in this crate's `reference/`), and a writer of small synthetic GGUF
//! files for loader and fault tests, and a loopback HTTP client with a guard
//! around a running `neocloud serve`.

// Only tests use this crate; failing loudly on missing fixtures is its job.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

pub mod gguf_writer;
pub mod http;
pub mod mock_upstream;

use std::path::PathBuf;

/// llama.cpp's reference outputs, copied into this crate (see its README).
pub fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference")
}

/// Reads `reference/<model>/<file>` as one JSON value per line.
pub fn reference_lines(model: &str, file: &str) -> Vec<serde_json::Value> {
    json_lines(&reference_dir().join(model).join(file))
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
