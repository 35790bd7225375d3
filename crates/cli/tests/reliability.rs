//! Rows 1–8 and 25 of `../shared/RELIABILITY.md` against a real
//! `neocloud serve` on loopback: bad bodies, bad parameters, limits, odd
//! text, and SIGTERM with a stream open. (Rows 15 and 16 are in `serve.rs`,
//! row 23 in the server's engine worker tests.)

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};

use neocloud_testkit::http::{
    exchange, post_json, request, request_with_headers, Response, Server,
};
use serde_json::{json, Value};

const GEMMA: &str = "gemma-3-270m";
const LIMIT: usize = 1 << 20;

fn assert_error(resp: &Response, status: u16, kind: &str, param: Option<&str>) -> Value {
    assert_eq!(resp.status, status, "{}", resp.text());
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{}",
        resp.text()
    );
    let err = resp.json()["error"].clone();
    assert_eq!(err["type"], kind, "{err}");
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    for field in ["param", "code"] {
        assert!(err.get(field).is_some(), "{field} missing in {err}");
    }
    if let Some(p) = param {
        assert_eq!(err["param"], p, "{err}");
    }
    err
}

fn chat(s: &Server, body: Value) -> Response {
    post_json(s.addr, "/v1/chat/completions", &body)
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// One server, configured by a file (a 1 MiB body limit instead of the
/// default 2 MiB), runs the input checks in turn.
#[test]
fn bad_input_gets_openai_errors_and_never_a_panic() {
    let dir = std::env::temp_dir().join(format!("nc-reliability-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("neocloud.toml");
    std::fs::write(
        &config,
        format!("models = [\"{GEMMA}\"]\nbody_limit = {LIMIT}\nqueue = 8\n"),
    )
    .unwrap();
    let server = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--config", config.to_str().unwrap()],
    );
    let s = &server;
    row1_malformed_bodies(s);
    row2_bodies_over_the_limit(s);
    row3_deep_nesting(s);
    row4_missing_and_unknown_models(s);
    row5_out_of_range_parameters(s);
    row6_context_overflow(s);
    row7_limits(s);
    row8_odd_text(s);
    // After all of it, the server still answers.
    let ok = chat(
        s,
        json!({"model": GEMMA, "messages": user("hi"), "max_tokens": 2}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    let _ = std::fs::remove_dir_all(&dir);
}

fn row1_malformed_bodies(s: &Server) {
    let path = "/v1/chat/completions";
    for body in [
        &b""[..],
        b"   ",
        b"{not json",
        b"[1, 2]",
        b"\"text\"",
        b"{\"model\": \"x\"} trailing",
    ] {
        let resp = request(s.addr, "POST", path, Some(body));
        assert_error(&resp, 400, "invalid_request_error", None);
    }
    let good = json!({"model": GEMMA, "messages": user("hi"), "max_tokens": 1}).to_string();
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ] {
        let resp = request_with_headers(
            s.addr,
            "POST",
            path,
            &[("content-type", content_type)],
            Some(good.as_bytes()),
        );
        let err = assert_error(&resp, 400, "invalid_request_error", None);
        assert!(err["message"]
            .as_str()
            .unwrap()
            .contains("application/json"));
    }
    // No content type at all is refused too: a browser's blind cross-site
    // POST sends none (or a form type).
    let resp = request_with_headers(s.addr, "POST", path, &[], Some(good.as_bytes()));
    let err = assert_error(&resp, 400, "invalid_request_error", None);
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("application/json"));
    let missing = request(s.addr, "GET", "/v1/nowhere", None);
    assert_error(&missing, 404, "not_found_error", None);
}

fn row2_bodies_over_the_limit(s: &Server) {
    let path = "/v1/chat/completions";
    // Declared too long.
    let big = vec![b' '; LIMIT + 1];
    assert_error(
        &request(s.addr, "POST", path, Some(&big)),
        413,
        "request_too_large",
        None,
    );
    // Under the built-in 2 MiB default but over the configured 1 MiB: the
    // config file is in force.
    let body = json!({"model": GEMMA, "messages": user(&"a".repeat(LIMIT + 1000))}).to_string();
    assert_error(
        &request(s.addr, "POST", path, Some(body.as_bytes())),
        413,
        "request_too_large",
        None,
    );
    // Chunked, with no length declared: cut off at the limit all the same.
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    let chunk = vec![b' '; 256 * 1024];
    for _ in 0..6 {
        raw.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend(&chunk);
        raw.extend(b"\r\n");
    }
    raw.extend(b"0\r\n\r\n");
    assert_error(&exchange(s.addr, &raw), 413, "request_too_large", None);
    // A gzip bomb: 64 MiB of spaces in about 64 KiB, stopped at the limit.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(b"{\"model\": \"gemma-3-270m\", \"x\": \"")
        .unwrap();
    gz.write_all(&vec![b' '; 64 << 20]).unwrap();
    gz.write_all(b"\"}").unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < LIMIT / 4);
    let resp = request_with_headers(
        s.addr,
        "POST",
        path,
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        Some(&bomb),
    );
    assert_error(&resp, 413, "request_too_large", None);
    // A small gzip body is fine; an unknown encoding is refused.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(
        json!({"model": GEMMA, "messages": user("hi"), "max_tokens": 1})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let small = gz.finish().unwrap();
    let resp = request_with_headers(
        s.addr,
        "POST",
        path,
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        Some(&small),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = request_with_headers(
        s.addr,
        "POST",
        path,
        &[
            ("content-type", "application/json"),
            ("content-encoding", "br"),
        ],
        Some(b"{}"),
    );
    assert_error(&resp, 400, "invalid_request_error", None);
}

fn row3_deep_nesting(s: &Server) {
    let depth = 10_000;
    let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let in_content =
        format!(r#"{{"model": "{GEMMA}", "messages": [{{"role": "user", "content": {deep}}}]}}"#);
    let in_tools = format!(
        r#"{{"model": "{GEMMA}", "messages": [{{"role": "user", "content": "hi"}}], "tools": [{{"type": "function", "function": {{"name": "f", "parameters": {deep}}}}}]}}"#
    );
    let objects = format!(
        r#"{{"model": "{GEMMA}", "messages": [], "x": {}{}}}"#,
        "{\"a\":".repeat(depth),
        "}".repeat(depth)
    );
    for body in [in_content, in_tools, objects] {
        let resp = request(
            s.addr,
            "POST",
            "/v1/chat/completions",
            Some(body.as_bytes()),
        );
        assert_error(&resp, 400, "invalid_request_error", None);
    }
}

fn row4_missing_and_unknown_models(s: &Server) {
    let resp = chat(s, json!({"messages": user("hi")}));
    assert_error(&resp, 400, "invalid_request_error", Some("model"));
    let resp = chat(s, json!({"model": "no-such-model", "messages": user("hi")}));
    let err = assert_error(&resp, 404, "not_found_error", Some("model"));
    assert_eq!(err["code"], "model_not_found");
    let resp = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": "no-such-model", "prompt": "hi"}),
    );
    assert_error(&resp, 404, "not_found_error", Some("model"));
}

fn row5_out_of_range_parameters(s: &Server) {
    let cases = [
        (json!({"temperature": -1}), "temperature"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"n": 0}), "n"),
        (json!({"max_tokens": "x"}), "max_tokens"),
        (json!({"max_tokens": -5}), "max_tokens"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"stop": ""}), "stop"),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": [{"type": "function"}]}), "tools[0]"),
        (json!({"min_tokens": 10, "max_tokens": 5}), "min_tokens"),
        (json!({"priority": 1u64 << 40}), "priority"),
        (json!({"priority": "high"}), "priority"),
        (json!({"priority": 1.5}), "priority"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": "hi"}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": 7}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content",
        ),
    ];
    for (patch, param) in cases {
        let mut body = json!({"model": GEMMA, "messages": user("hi"), "max_tokens": 2});
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let resp = chat(s, body.clone());
        assert_eq!(resp.status, 400, "{body} -> {}", resp.text());
        assert_error(&resp, 400, "invalid_request_error", Some(param));
    }
    let resp = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": GEMMA, "prompt": "hi", "logprobs": 21}),
    );
    assert_error(&resp, 400, "invalid_request_error", Some("logprobs"));
}

fn metric(s: &Server, name: &str) -> f64 {
    let text = request(s.addr, "GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

fn row6_context_overflow(s: &Server) {
    let prompt_tokens_before = metric(s, "neocloud:prompt_tokens_total");
    for stream in [false, true] {
        let resp = chat(
            s,
            json!({"model": GEMMA, "messages": user("hi"), "max_tokens": 40_000, "stream": stream}),
        );
        let err = assert_error(&resp, 400, "invalid_request_error", Some("messages"));
        assert_eq!(err["code"], "context_length_exceeded");
        // The prompt alone overflows: 40,000 tokens of "a " repeated.
        let long = "a ".repeat(40_000);
        let resp = chat(
            s,
            json!({"model": GEMMA, "messages": user(&long), "stream": stream}),
        );
        let err = assert_error(&resp, 400, "invalid_request_error", Some("messages"));
        assert_eq!(err["code"], "context_length_exceeded");
        let resp = post_json(
            s.addr,
            "/v1/completions",
            &json!({"model": GEMMA, "prompt": "hi", "max_tokens": 40_000, "stream": stream}),
        );
        let err = assert_error(&resp, 400, "invalid_request_error", Some("prompt"));
        assert_eq!(err["code"], "context_length_exceeded");
    }
    // Refused before queueing: the engine saw none of it.
    assert_eq!(
        metric(s, "neocloud:prompt_tokens_total"),
        prompt_tokens_before
    );
}

fn row7_limits(s: &Server) {
    let stops: Vec<String> = (0..100).map(|i| format!("stop{i}")).collect();
    let resp = chat(
        s,
        json!({"model": GEMMA, "messages": user("hi"), "stop": stops}),
    );
    let err = assert_error(&resp, 400, "invalid_request_error", Some("stop"));
    assert!(
        err["message"].as_str().unwrap().contains("at most 4"),
        "{err}"
    );
    let bias: serde_json::Map<String, Value> =
        (0..1000).map(|i| (i.to_string(), json!(1))).collect();
    let resp = chat(
        s,
        json!({"model": GEMMA, "messages": user("hi"), "logit_bias": bias}),
    );
    let err = assert_error(&resp, 400, "invalid_request_error", Some("logit_bias"));
    assert!(
        err["message"].as_str().unwrap().contains("at most 300"),
        "{err}"
    );
    let resp = chat(
        s,
        json!({"model": GEMMA, "messages": user("hi"), "n": 1000}),
    );
    let err = assert_error(&resp, 400, "invalid_request_error", Some("n"));
    assert!(err["message"].as_str().unwrap().contains("16"), "{err}");
    let resp = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": GEMMA, "prompt": "hi", "n": 1000}),
    );
    assert_error(&resp, 400, "invalid_request_error", Some("n"));
}

fn row8_odd_text(s: &Server) {
    let path = "/v1/chat/completions";
    // A lone surrogate and invalid UTF-8 are not JSON text: 400.
    let surrogate =
        format!(r#"{{"model": "{GEMMA}", "messages": [{{"role": "user", "content": "\ud800"}}]}}"#);
    let resp = request(s.addr, "POST", path, Some(surrogate.as_bytes()));
    assert_error(&resp, 400, "invalid_request_error", None);
    let mut invalid =
        format!(r#"{{"model": "{GEMMA}", "messages": [{{"role": "user", "content": "a"#)
            .into_bytes();
    invalid.extend([0xff, 0xfe, b'b', b'"', b'}', b']', b'}']);
    let resp = request(s.addr, "POST", path, Some(&invalid));
    assert_error(&resp, 400, "invalid_request_error", None);
    // NUL is a character like any other.
    let resp = chat(
        s,
        json!({"model": GEMMA, "messages": user("a\u{0}b"), "max_tokens": 2}),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    // 1 MB of one emoji (just under this server's 1 MiB limit): tokenised
    // in linear time, and refused as too long for the context.
    let emoji = "😀".repeat(250_000);
    let resp = post_json(
        s.addr,
        "/tokenize",
        &json!({"model": GEMMA, "prompt": emoji}),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.json()["count"].as_u64().unwrap() > 32_768);
    let resp = chat(s, json!({"model": GEMMA, "messages": user(&emoji)}));
    let err = assert_error(&resp, 400, "invalid_request_error", Some("messages"));
    assert_eq!(err["code"], "context_length_exceeded");
}

/// Runs `neocloud serve --config` on a config file holding `text`, which
/// must fail to start; returns its standard error.
fn serve_refuses_config(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("nc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("neocloud.toml");
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_neocloud"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_at_start() {
    let stderr = serve_refuses_config("badconfig", "models = [\"gemma-3-270m\"]\nprot = 9000\n");
    assert!(stderr.contains("prot"), "{stderr}");
}

#[test]
fn activation_bits_other_than_16_8_or_mixed_are_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_neocloud"))
        .args([
            "serve",
            "--model",
            "gemma-3-270m",
            "--activation-bits",
            "12",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("activation-bits"), "{stderr}");

    let stderr = serve_refuses_config(
        "bits",
        "models = [\"gemma-3-270m\"]\nactivation_bits = 12\n",
    );
    assert!(
        stderr.contains("activation_bits must be 16, 8 or \"mixed\", not 12"),
        "{stderr}"
    );
}

/// Row 25: on SIGTERM an open stream runs to its end, new requests get 503,
/// and the process then exits with success.
#[test]
fn sigterm_drains_open_streams_and_refuses_new_work() {
    let server = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--model", GEMMA, "--shutdown-timeout-secs", "60"],
    );
    let body = json!({
        "model": GEMMA, "messages": user("Count to a thousand."),
        "max_tokens": 48, "temperature": 0, "ignore_eos": true, "stream": true,
    });
    let mut conn = neocloud_testkit::http::send_chat(server.addr, &body);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < 3 {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Once the signal is handled, /health says so (load balancers look
    // there), and new work is refused while the stream drains.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while request(server.addr, "GET", "/health", None).status != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "never started draining"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let refused = chat(
        &server,
        json!({"model": GEMMA, "messages": user("hi"), "max_tokens": 1}),
    );
    assert_error(&refused, 503, "service_unavailable", None);
    assert_eq!(refused.header("retry-after"), Some("1"));
    // The open stream runs to its end.
    conn.read_to_end(&mut seen).unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert_eq!(server.wait(), Some(0));
}

/// A GET with a raw `Host` header (or none).
fn get_with_host(s: &Server, host: Option<&str>) -> Response {
    let host = host.map(|h| format!("host: {h}\r\n")).unwrap_or_default();
    exchange(
        s.addr,
        format!("GET /v1/models HTTP/1.1\r\n{host}connection: close\r\n\r\n").as_bytes(),
    )
}

/// DNS rebinding: a web page that makes its own name resolve to 127.0.0.1
/// reaches a loopback server with its own name in `Host`. A server bound to
/// loopback answers only loopback names, unless told which others to take.
#[test]
fn a_loopback_server_answers_only_requests_addressed_to_loopback() {
    let server = Server::start(env!("CARGO_BIN_EXE_neocloud"), &["--model", GEMMA]);
    let port = server.addr.port();
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        "169.254.169.254".to_string(),
        "[fe80::1]".to_string(),
    ] {
        let resp = get_with_host(&server, Some(&host));
        assert_error(&resp, 403, "permission_error", None);
        assert!(!resp.text().contains("gemma"), "{host}: {}", resp.text());
    }
    for host in [
        "localhost".to_string(),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        let resp = get_with_host(&server, Some(&host));
        assert_eq!(resp.status, 200, "{host}: {}", resp.text());
    }
    // Told to, it takes another name too.
    let named = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--model", GEMMA, "--allowed-host", "api.example.com"],
    );
    let port = named.addr.port();
    assert_eq!(
        get_with_host(&named, Some(&format!("api.example.com:{port}"))).status,
        200
    );
    assert_eq!(get_with_host(&named, Some("localhost")).status, 200);
    assert_eq!(get_with_host(&named, Some("evil.example")).status, 403);
}

/// Any client could ask for `priority: -2147483648` and preempt everyone.
/// Priorities below the configured floor (0 unless told otherwise) are
/// refused, naming `priority`.
#[test]
fn priorities_below_the_configured_floor_are_refused() {
    let body = |priority: i64| json!({"model": GEMMA, "messages": user("hi"), "max_tokens": 1, "priority": priority});
    let plain = Server::start(env!("CARGO_BIN_EXE_neocloud"), &["--model", GEMMA]);
    for p in [-1, -2147483648] {
        let err = assert_error(
            &chat(&plain, body(p)),
            400,
            "invalid_request_error",
            Some("priority"),
        );
        assert!(
            err["message"].as_str().unwrap().contains("priority"),
            "{err}"
        );
    }
    for p in [0, 7] {
        assert_eq!(chat(&plain, body(p)).status, 200);
    }
    let trusted = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--model", GEMMA, "--min-priority", "-5"],
    );
    assert_eq!(chat(&trusted, body(-5)).status, 200);
    assert_error(
        &chat(&trusted, body(-6)),
        400,
        "invalid_request_error",
        Some("priority"),
    );
}
