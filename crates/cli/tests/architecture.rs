//! The dependency invariants of ARCHITECTURE.md, checked on the resolved
//! dependency graph of `cargo metadata`, transitively: a crate that a
//! dependency of a dependency pulls in counts as pulled in.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// The resolved graph: package name -> names of its normal (non-dev,
/// non-build) dependencies on the host platform; plus the workspace's names.
struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
    workspace: BTreeSet<String>,
}

/// The platform this test runs on, as `rustc -vV` names it.
fn host_triple() -> String {
    let out = Command::new("rustc").arg("-vV").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap()
        .to_owned()
}

fn resolved_graph() -> Graph {
    let host = host_triple();
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let workspace = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| name_of[id.as_str().unwrap()].to_owned())
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let name = name_of[node["id"].as_str().unwrap()].to_owned();
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| name_of[d["pkg"].as_str().unwrap()].to_owned());
        edges.entry(name).or_default().extend(deps);
    }
    Graph { edges, workspace }
}

impl Graph {
    /// Every package `krate` pulls in, directly or through others.
    fn closure(&self, krate: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![krate.to_owned()];
        while let Some(next) = stack.pop() {
            for dep in self.edges.get(&next).into_iter().flatten() {
                if seen.insert(dep.clone()) {
                    stack.push(dep.clone());
                }
            }
        }
        seen
    }

    /// The workspace crates in `krate`'s closure.
    fn workspace_closure(&self, krate: &str) -> BTreeSet<String> {
        self.closure(krate)
            .into_iter()
            .filter(|d| self.workspace.contains(d))
            .collect()
    }
}

/// One crate's invariant: (crate, the workspace crates it may pull in, if
/// limited; the packages it must never pull in).
type Rule = (
    &'static str,
    Option<&'static [&'static str]>,
    &'static [&'static str],
);

/// The invariants. A crate not in the workspace yet is skipped.
const RULES: &[Rule] = &[
    ("neocloud-openai", Some(&[]), &[]),
    ("neocloud-accelerators", Some(&[]), &[]),
    (
        "neocloud-engine",
        Some(&["neocloud-openai"]),
        &[
            "tokio",
            "reqwest",
            "hyper",
            "ureq",
            "hf-hub",
            "zip",
            "axum",
            "async-std",
        ],
    ),
    (
        "neocloud-models",
        None,
        &["neocloud-engine", "tokio", "axum", "hyper"],
    ),
    (
        "neocloud-fleet",
        None,
        &[
            "neocloud-engine",
            "tokio",
            "hyper",
            "reqwest",
            "axum",
            "ureq",
        ],
    ),
    (
        "neocloud-sim",
        None,
        &["neocloud-engine", "tokio", "axum", "hyper", "reqwest"],
    ),
    ("neocloud-tenancy", None, &["neocloud-engine"]),
    (
        "neocloud-bench",
        None,
        &["neocloud-server", "neocloud-engine"],
    ),
];

fn check(graph: &Graph) -> Vec<String> {
    let mut broken = Vec::new();
    for (krate, allowed, banned) in RULES {
        if !graph.workspace.contains(*krate) {
            continue;
        }
        let closure = graph.closure(krate);
        if let Some(allowed) = allowed {
            for dep in graph.workspace_closure(krate) {
                if !allowed.contains(&dep.as_str()) {
                    broken.push(format!("{krate} pulls in the workspace crate {dep}"));
                }
            }
        }
        for dep in *banned {
            if closure.contains(*dep) {
                broken.push(format!("{krate} pulls in {dep}"));
            }
        }
    }
    broken
}

#[test]
fn crate_dependencies_point_one_way_transitively() {
    let graph = resolved_graph();
    for krate in [
        "neocloud-openai",
        "neocloud-engine",
        "neocloud-fleet",
        "neocloud-bench",
    ] {
        assert!(
            graph.workspace.contains(krate),
            "{krate} is in the workspace"
        );
    }
    let broken = check(&graph);
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn a_dependency_two_steps_away_counts() {
    // A graph where fleet reaches tokio only through another crate: the
    // check must see it, as it must see openai reaching a workspace crate.
    let mut graph = Graph {
        edges: BTreeMap::new(),
        workspace: ["neocloud-fleet", "neocloud-openai", "neocloud-accelerators"]
            .map(String::from)
            .into(),
    };
    let edge = |g: &mut Graph, a: &str, b: &str| {
        g.edges.entry(a.into()).or_default().insert(b.into());
    };
    edge(&mut graph, "neocloud-fleet", "some-helper");
    edge(&mut graph, "some-helper", "tokio");
    edge(&mut graph, "neocloud-openai", "serde");
    assert_eq!(check(&graph), ["neocloud-fleet pulls in tokio"]);
    edge(&mut graph, "serde", "neocloud-accelerators");
    assert_eq!(
        check(&graph),
        [
            "neocloud-openai pulls in the workspace crate neocloud-accelerators",
            "neocloud-fleet pulls in tokio"
        ]
    );
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
