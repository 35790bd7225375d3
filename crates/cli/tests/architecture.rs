//! The dependency invariants of ARCHITECTURE.md, checked with `cargo metadata`.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Workspace crate name -> its normal (non-dev) dependencies.
fn dependency_graph() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut graph = BTreeMap::new();
    for pkg in meta["packages"].as_array().unwrap() {
        let deps = pkg["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        graph.insert(pkg["name"].as_str().unwrap().to_string(), deps);
    }
    graph
}

fn workspace_deps(graph: &BTreeMap<String, BTreeSet<String>>, krate: &str) -> BTreeSet<String> {
    graph[krate]
        .iter()
        .filter(|d| graph.contains_key(*d))
        .cloned()
        .collect()
}

#[test]
fn crate_dependencies_point_one_way() {
    let graph = dependency_graph();
    assert!(graph.contains_key("neocloud-openai") && graph.contains_key("neocloud-engine"));
    assert!(
        workspace_deps(&graph, "neocloud-openai").is_empty(),
        "openai depends on no other workspace crate"
    );
    let engine = workspace_deps(&graph, "neocloud-engine");
    assert!(
        engine.iter().all(|d| d == "neocloud-openai"),
        "engine depends only on openai, found {engine:?}"
    );
    for (krate, deps) in &graph {
        if krate == "neocloud-fleet" {
            // The simulator will run the fleet's code: it stays free of the
            // engine and of any async runtime or HTTP stack.
            for banned in ["neocloud-engine", "tokio", "axum", "reqwest", "hyper"] {
                assert!(!deps.contains(banned), "fleet never depends on {banned}");
            }
        }
        if krate == "neocloud-sim" {
            for banned in ["neocloud-engine", "tokio", "axum"] {
                assert!(!deps.contains(banned), "sim never depends on {banned}");
            }
        }
        if krate == "neocloud-bench" {
            for banned in ["neocloud-server", "neocloud-engine"] {
                assert!(!deps.contains(banned), "bench talks HTTP, not to {banned}");
            }
        }
    }
}

#[test]
fn the_binary_is_thin() {
    let main =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/main.rs")).unwrap();
    let code_lines = main
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("//"))
        .count();
    assert!(
        code_lines <= 20,
        "main.rs parses arguments and calls run: {code_lines} lines"
    );
    assert!(main.contains("neocloud::run("));
}
