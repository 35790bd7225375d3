//! `neocloud bench` against a real `neocloud serve` on loopback: a
//! concurrency run and a rate run give JSON with every metric and an HTML
//! report with SVG charts, and the bench's time to first token and output
//! throughput agree with the server's own `/metrics` over the same window.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use neocloud_testkit::http::{request, Server};
use serde_json::Value;

const GEMMA: &str = "gemma-3-270m";

fn bench(server: &Server, dir: &std::path::Path, name: &str, args: &[&str]) -> Value {
    let json = dir.join(format!("{name}.json"));
    let html = dir.join(format!("{name}.html"));
    let out = Command::new(env!("CARGO_BIN_EXE_neocloud"))
        .args([
            "bench",
            "--url",
            &format!("http://{}/v1", server.addr),
            "--quiet",
            "--seed",
            "3",
        ])
        .args(args)
        .arg("--out")
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ttft p50"), "{stdout}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.matches("<svg").count() >= 6, "charts are SVG");
    assert!(
        !page.contains("<script") && !page.contains("http-equiv"),
        "self-contained"
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name}"))
        .parse()
        .unwrap()
}

#[test]
fn bench_reports_every_metric_and_agrees_with_the_server() {
    let server = Server::start(env!("CARGO_BIN_EXE_neocloud"), &["--model", GEMMA]);
    let dir = std::env::temp_dir().join(format!("nc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let report = bench(
        &server,
        &dir,
        "levels",
        &[
            "--concurrency",
            "1,2",
            "--rate",
            "4",
            "--arrival",
            "gamma",
            "--burstiness",
            "0.5",
            "--requests",
            "4",
            "--input-tokens",
            "48:8",
            "--output-tokens",
            "16",
            "--slo",
            "ttft=2s,tpot=200ms",
            "--power",
            "estimate:cpux2",
        ],
    );
    assert_eq!(report["schema"], "neocloud-bench/1");
    assert_eq!(report["targets"][0]["model"], GEMMA);
    let levels = report["levels"].as_array().unwrap();
    let modes: Vec<&str> = levels
        .iter()
        .map(|l| l["load"]["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, vec!["concurrency", "concurrency", "rate"]);
    for l in levels {
        assert_eq!(l["completed"], 4, "{l}");
        assert!(l["errors"].as_object().unwrap().is_empty());
        for metric in ["ttft_s", "tpot_s", "itl_s", "e2e_s"] {
            for stat in ["mean", "p50", "p90", "p99", "max"] {
                let v = l[metric][stat].as_f64().unwrap();
                assert!(v > 0.0, "{metric}.{stat} = {v}");
            }
        }
        assert!(l["ttft_s"]["p50"].as_f64() < l["e2e_s"]["p50"].as_f64());
        // Exactly the asked output length, counted from usage.
        assert_eq!(l["output_tokens"]["mean"], 16.0);
        assert!(l["input_tokens"]["mean"].as_f64().unwrap() > 30.0);
        for rate in [
            "request_throughput",
            "output_throughput",
            "total_throughput",
        ] {
            assert!(l[rate].as_f64().unwrap() > 0.0, "{rate}");
        }
        let goodput = &l["goodput"];
        assert!(goodput["requests_per_s"].as_f64().unwrap() >= 0.0);
        let energy = &l["energy"];
        assert_eq!(energy["estimate"], true);
        assert!(energy["joules_per_output_token"].as_f64().unwrap() > 0.0);
    }

    // One more window, with nothing else running: the bench's figures
    // against the server's own counters over the same requests.
    let before = request(server.addr, "GET", "/metrics", None).text();
    let report = bench(
        &server,
        &dir,
        "agreement",
        &[
            "--concurrency",
            "1",
            "--requests",
            "6",
            "--warmup",
            "0",
            "--input-tokens",
            "32",
            "--output-tokens",
            "24",
        ],
    );
    let after = request(server.addr, "GET", "/metrics", None).text();
    let delta = |name: &str| metric_sum(&after, name) - metric_sum(&before, name);
    let level = &report["levels"][0];
    let server_ttft = delta("neocloud:time_to_first_token_seconds_sum")
        / delta("neocloud:time_to_first_token_seconds_count");
    assert_eq!(delta("neocloud:time_to_first_token_seconds_count"), 6.0);
    let bench_ttft = level["ttft_s"]["mean"].as_f64().unwrap();
    eprintln!("mean TTFT: bench {bench_ttft:.4} s, server {server_ttft:.4} s");
    assert!(
        (bench_ttft - server_ttft).abs() <= 0.1 * server_ttft,
        "bench {bench_ttft} vs server {server_ttft}"
    );
    let duration = level["duration_s"].as_f64().unwrap();
    let server_throughput = delta("neocloud:generation_tokens_total") / duration;
    let bench_throughput = level["output_throughput"].as_f64().unwrap();
    eprintln!("output tokens/s: bench {bench_throughput:.2}, server {server_throughput:.2}");
    assert!((bench_throughput - server_throughput).abs() <= 0.1 * server_throughput);

    // A sweep probes rates and reports the highest that met the SLO.
    let report = bench(
        &server,
        &dir,
        "sweep",
        &[
            "--sweep",
            "--slo",
            "ttft=1500ms,tpot=200ms",
            "--rate",
            "0.5",
            "--sweep-steps",
            "3",
            "--requests",
            "3",
            "--warmup",
            "0",
            "--input-tokens",
            "16",
            "--output-tokens",
            "8",
        ],
    );
    let probes: Vec<(f64, bool)> = report["levels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["load"]["mode"], "rate");
            (
                l["load"]["value"].as_f64().unwrap(),
                l["goodput"]["p99_within_slo"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(probes.len(), 3, "{probes:?}");
    assert_eq!(probes[0].0, 0.5);
    let best = probes
        .iter()
        .filter(|p| p.1)
        .map(|p| p.0)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    assert_eq!(report["sweep"][0].as_f64(), best, "{probes:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_bench_arguments_are_clear_errors() {
    for args in [
        vec!["bench"],
        vec!["bench", "--url", "http://127.0.0.1:9/v1", "--slo", "fast"],
        vec!["bench", "--url", "ftp://x/v1"],
        vec!["bench", "--target", "noequals"],
        vec!["bench", "--url", "http://127.0.0.1:9/v1", "--sweep"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_neocloud"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    }
}
