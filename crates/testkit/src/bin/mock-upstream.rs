//! A fast mock upstream as a process, for measuring the gateway's own cost:
//! `mock-upstream [TOKENS]` answers every completion at once with TOKENS
//! tokens (default 4) and prints its base URL.

// A measuring tool: failing loudly is right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use neocloud_testkit::mock_upstream::{Behaviour, MockUpstream};

fn main() {
    let tokens = std::env::args()
        .nth(1)
        .map(|t| t.parse().expect("TOKENS must be a number"))
        .unwrap_or(4);
    let mock = MockUpstream::start(Behaviour::Fast { tokens });
    println!("{}", mock.base_url());
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::park();
    }
}
