//! One usage record per finished request, from the real binary's usage log
//! (`--usage-log`): collected, streamed, `n > 1`, a client that leaves
//! mid-stream, an engine refusal, a full queue's 503, and a request the
//! gateway retried on a second upstream. Plain `serve` answers carry the
//! request id, the pool, the upstream and the energy, as the gateway's do.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use neocloud_testkit::http::{post_json, request, send_chat, Response, Server};
use neocloud_testkit::mock_upstream::{Behaviour, MockUpstream};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_neocloud");
const GEMMA: &str = "gemma-3-270m";

fn usage_log(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.jsonl"));
    let _ = std::fs::remove_file(&path);
    path
}

/// The log's records once it holds `n` (the writer runs on its own thread).
fn records(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            // A little longer, so that an extra record would show.
            std::thread::sleep(Duration::from_millis(300));
            let text = std::fs::read_to_string(path).unwrap_or_default();
            return text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 8,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn request_id(resp: &Response) -> String {
    let id = resp
        .header("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id: {:?}", resp.headers))
        .to_owned();
    // A UUIDv7: 8-4-4-4-12 hex digits, version 7.
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
    assert_eq!(&id[14..15], "7", "{id}");
    id
}

/// Writes a streamed chat request and reads `events` events, then hangs up.
fn leave_mid_stream(addr: std::net::SocketAddr, events: usize) -> String {
    let body = json!({
        "model": GEMMA, "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 2000, "temperature": 0, "ignore_eos": true, "stream": true,
    });
    let mut conn = send_chat(addr, &body);
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data: ").count() < events {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let id = seen
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .trim()
        .to_owned();
    drop(conn);
    id
}

/// Each record by request id; every id once.
fn by_id(records: &[Value]) -> BTreeMap<String, Value> {
    let mut map = BTreeMap::new();
    for r in records {
        let id = r["request_id"].as_str().unwrap().to_owned();
        assert!(map.insert(id.clone(), r.clone()).is_none(), "{id} twice");
    }
    map
}

#[test]
fn every_finished_request_of_a_plain_serve_has_exactly_one_record() {
    let log = usage_log("serve-usage");
    let server = Server::start_with(
        BIN,
        &[
            "--model",
            GEMMA,
            "--queue",
            "2",
            "--max-batch",
            "1",
            "--kv-cache-mb",
            "16",
            "--usage-log",
            log.to_str().unwrap(),
        ],
        &[],
        Stdio::inherit(),
    );
    let addr = server.addr;
    let mut ids = Vec::new();

    // Collected: the answer names its pool, upstream and energy.
    let collected = post_json(addr, "/v1/chat/completions", &chat(GEMMA, json!({})));
    assert_eq!(collected.status, 200, "{}", collected.text());
    assert_eq!(collected.header("x-neocloud-pool"), Some(GEMMA));
    assert_eq!(
        collected.header("x-neocloud-upstream"),
        Some(format!("{GEMMA}/0").as_str())
    );
    let usage = collected.json()["usage"].clone();
    assert!(usage["energy_joules"].as_f64().unwrap() > 0.0, "{usage}");
    assert_eq!(usage["energy_source"], "estimated");
    ids.push(("collected", request_id(&collected)));

    // Streamed, with usage in the last chunk.
    let streamed = post_json(
        addr,
        "/v1/chat/completions",
        &chat(
            GEMMA,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.header("x-neocloud-pool"), Some(GEMMA));
    assert!(streamed.text().contains("\"energy_joules\""));
    ids.push(("streamed", request_id(&streamed)));

    // n > 1: one request, one record.
    let two = post_json(addr, "/v1/chat/completions", &chat(GEMMA, json!({"n": 2})));
    assert_eq!(two.status, 200);
    assert_eq!(two.json()["choices"].as_array().unwrap().len(), 2);
    ids.push(("n=2", request_id(&two)));

    // Text completions too.
    let text = post_json(
        addr,
        "/v1/completions",
        &json!({"model": GEMMA, "prompt": "Once upon a time", "max_tokens": 4}),
    );
    assert_eq!(text.status, 200, "{}", text.text());
    assert!(text.json()["usage"]["energy_joules"].as_f64().unwrap() > 0.0);
    ids.push(("completion", request_id(&text)));

    // The engine refuses a prompt larger than its key/value memory.
    let long = "All work and no play makes Jack a dull boy. ".repeat(300);
    let refused = post_json(
        addr,
        "/v1/chat/completions",
        &json!({"model": GEMMA, "messages": [{"role": "user", "content": long}], "max_tokens": 4}),
    );
    assert_eq!(refused.status, 400, "{}", refused.text());
    ids.push(("refused", request_id(&refused)));

    // A client that leaves mid-stream.
    let left = leave_mid_stream(addr, 4);
    ids.push(("left", left));

    // One running, two waiting: the next gets 503.
    let long = move |delay: u64| {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            post_json(
                addr,
                "/v1/chat/completions",
                &chat(GEMMA, json!({"max_tokens": 96, "ignore_eos": true})),
            )
        })
    };
    let queued = [long(0), long(100), long(200)];
    let mut full = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    std::thread::sleep(Duration::from_millis(400));
    while full.is_none() && Instant::now() < deadline {
        let r = post_json(addr, "/v1/chat/completions", &chat(GEMMA, json!({})));
        ids.push(("probe", request_id(&r)));
        if r.status == 503 {
            full = Some(request_id(&r));
        }
    }
    let full = full.expect("a full queue answers 503");
    for handle in queued {
        let r = handle.join().unwrap();
        assert_eq!(r.status, 200);
        ids.push(("queued", request_id(&r)));
    }

    let recorded = by_id(&records(&log, ids.len()));
    assert_eq!(recorded.len(), ids.len(), "{recorded:#?}");
    for (what, id) in &ids {
        let r = recorded
            .get(id)
            .unwrap_or_else(|| panic!("{what} {id} has no record"));
        assert_eq!(r["model"], GEMMA, "{what}");
        assert!(r["duration_s"].as_f64().unwrap() >= 0.0);
    }
    let record = |what: &str| {
        let id = &ids.iter().find(|(w, _)| *w == what).unwrap().1;
        recorded[id].clone()
    };
    let c = record("collected");
    assert_eq!(c["status"], 200);
    assert_eq!(c["pool"], GEMMA);
    assert_eq!(c["upstream"], format!("{GEMMA}/0"));
    assert_eq!(c["accelerator"], "cpu");
    assert_eq!(c["prompt_tokens"], usage["prompt_tokens"]);
    assert_eq!(c["completion_tokens"], usage["completion_tokens"]);
    let joules = c["energy_joules"].as_f64().unwrap();
    assert!((joules - usage["energy_joules"].as_f64().unwrap()).abs() < 1e-6);
    assert!(c["ttft_s"].as_f64().unwrap() <= c["duration_s"].as_f64().unwrap());
    assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
    let s = record("streamed");
    assert!(s["ttft_s"].as_f64().is_some(), "{s}");
    assert!(s["completion_tokens"].as_u64().unwrap() > 0);
    assert!(s["energy_joules"].as_f64().unwrap() > 0.0);
    let n2 = record("n=2");
    assert!(n2["completion_tokens"].as_u64().unwrap() > c["completion_tokens"].as_u64().unwrap());
    assert_eq!(record("refused")["status"], 400);
    let l = record("left");
    assert_eq!(l["status"], 200);
    assert_eq!(l["finish_reason"], "abort", "{l}");
    assert_eq!(recorded[&full]["status"], 503);

    // The in-process engine's answers reach the client as the engine wrote
    // them: its streams were never relayed (the relay, the server's only
    // SSE parser, times every frame it passes on), though the engine's own
    // histograms counted their tokens and the pool counted the requests.
    let metrics = request(addr, "GET", "/metrics", None).text();
    let series = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    let labels = format!("{{pool=\"{GEMMA}\",upstream=\"{GEMMA}/0\"}}");
    assert!(series(&format!("neocloud:upstream_requests_total{labels}")) >= ids.len() as f64 - 2.0);
    assert_eq!(
        series(&format!(
            "neocloud:upstream_inter_token_latency_seconds_count{labels}"
        )),
        0.0
    );
    assert_eq!(
        series(&format!(
            "neocloud:upstream_time_to_first_token_seconds_count{labels}"
        )),
        0.0
    );
    assert!(series("neocloud:inter_token_latency_seconds_count") > 10.0);
    assert!(series(&format!("neocloud:upstream_energy_joules_total{labels}")) > 0.0);
}

#[test]
fn a_request_retried_on_a_second_upstream_has_one_record_naming_it() {
    let failing = MockUpstream::start(Behaviour::Flaky { every: 1 });
    let good = MockUpstream::start(Behaviour::Fast { tokens: 4 });
    let log = usage_log("gateway-usage");
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("usage-fleet.toml");
    std::fs::write(
        &config,
        format!(
            "[router]\npolicy = \"round-robin\"\n\n[[pool]]\nname = \"mock\"\nmodel = \"m\"\naccelerator = \"cpu\"\nupstreams = [\"{}\", \"{}\"]\n",
            failing.base_url(),
            good.base_url()
        ),
    )
    .unwrap();
    let gateway = Server::start_with(
        BIN,
        &[
            "--config",
            config.to_str().unwrap(),
            "--usage-log",
            log.to_str().unwrap(),
        ],
        &[],
        Stdio::inherit(),
    );
    let mut ids = Vec::new();
    for stream in [false, true, false, true] {
        let r = post_json(
            gateway.addr,
            "/v1/chat/completions",
            &chat("m", json!({"stream": stream})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-neocloud-upstream"), Some("mock/1"));
        ids.push(request_id(&r));
    }
    let unknown = post_json(
        gateway.addr,
        "/v1/chat/completions",
        &chat("nope", json!({})),
    );
    assert_eq!(unknown.status, 404);
    ids.push(request_id(&unknown));
    let recorded = by_id(&records(&log, ids.len()));
    assert_eq!(recorded.len(), ids.len(), "{recorded:#?}");
    for id in &ids[..4] {
        let r = &recorded[id];
        assert_eq!(r["upstream"], "mock/1", "{r}");
        assert_eq!(r["status"], 200);
        assert!(r["completion_tokens"].as_u64().unwrap() > 0, "{r}");
        assert!(r["energy_joules"].as_f64().is_some());
    }
    assert_eq!(recorded[&ids[4]]["status"], 404);
    // The metrics show the retry the record hides.
    let metrics = request(gateway.addr, "GET", "/metrics", None).text();
    assert!(metrics.contains("retries"), "{metrics}");
}
