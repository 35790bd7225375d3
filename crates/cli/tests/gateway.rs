//! The fleet gateway (`neocloud serve --config fleet.toml`) as a process on
//! loopback: in front of fault-injecting mock upstreams (RELIABILITY rows
//! 9 and 17-22, error mapping, conformance, accounting), and in front of two
//! real `neocloud serve` upstreams plus the in-process engine, where
//! upstreams are killed under load and mid-stream.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use neocloud_testkit::http::{post_json, request, Response, Server};
use neocloud_testkit::mock_upstream::{Behaviour, MockUpstream};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_neocloud");

/// Writes a config file and returns its path.
fn config_file(name: &str, text: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn gateway(name: &str, text: &str) -> Server {
    let path = config_file(name, text);
    Server::start(BIN, &["--config", path.to_str().unwrap()])
}

fn chat_body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "stream": stream,
    })
}

fn chat(addr: SocketAddr, body: &Value) -> Response {
    post_json(addr, "/v1/chat/completions", body)
}

/// The value of one series in `/metrics`.
fn metric(addr: SocketAddr, series: &str) -> f64 {
    let text = request(addr, "GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in metrics"))
        .trim()
        .parse()
        .unwrap()
}

fn error_of(resp: &Response) -> Value {
    resp.json()["error"].clone()
}

#[test]
fn mock_upstream_faults_are_contained() {
    std::env::set_var("NEOCLOUD_TEST_UPSTREAM_KEY", "sk-test-9999");
    let always_500 = || MockUpstream::start(Behaviour::Flaky { every: 1 });
    let fast = || MockUpstream::start(Behaviour::Fast { tokens: 4 });
    let (retry_bad, retry_good) = (always_500(), fast());
    let (dead_a, dead_b) = (always_500(), always_500());
    let down = always_500();
    let rescue = MockUpstream::start(Behaviour::Slow {
        tokens: 4,
        per_token: Duration::from_millis(25),
    });
    let (limited, limited_good) = (
        MockUpstream::start(Behaviour::RateLimited { secs: 30 }),
        fast(),
    );
    let limited_only = MockUpstream::start(Behaviour::RateLimited { secs: 7 });
    let hang = MockUpstream::start(Behaviour::HangAfter { tokens: 2 });
    let die = MockUpstream::start(Behaviour::DieAfter { tokens: 2 });
    let garbage = MockUpstream::start(Behaviour::GarbageSse);
    let silent = MockUpstream::start(Behaviour::HangAfter { tokens: 0 });
    let target = fast();
    let redirect = MockUpstream::start(Behaviour::Fixed {
        status: "307 Temporary Redirect".into(),
        headers: format!("location: {}/chat/completions\r\n", target.base_url()),
        body: String::new(),
    });
    let refuse = MockUpstream::start(Behaviour::Fixed {
        status: "400 Bad Request".into(),
        headers: String::new(),
        body: r#"{"error":{"message":"key sk-test-9999 may not set temperature","type":"invalid_request_error","param":"temperature","code":null}}"#.into(),
    });
    let groq = fast();
    let pool = |name: &str, model: &str, upstreams: &[&MockUpstream], extra: &str| {
        let urls: Vec<String> = upstreams
            .iter()
            .map(|m| format!("\"{}\"", m.base_url()))
            .collect();
        format!(
            "[[pool]]\nname = \"{name}\"\nmodel = \"{model}\"\naccelerator = \"cpu\"\nupstreams = [{}]\n{extra}\n",
            urls.join(", ")
        )
    };
    let config = [
        "[router]\npolicy = \"round-robin\"\nstall_timeout_secs = 1\nhealth_check_interval_secs = 0.5\n".to_string(),
        pool("retry", "m-retry", &[&retry_bad, &retry_good], ""),
        pool("dead", "m-dead", &[&dead_a, &dead_b], ""),
        pool("rescue", "m-rescue", &[&rescue], "watts = 100"),
        pool("down", "m-down", &[&down], "fallback = \"rescue\""),
        pool("limited", "m-429", &[&limited, &limited_good], ""),
        pool("limited-only", "m-429-only", &[&limited_only], ""),
        pool("stall", "m-stall", &[&hang], "fallback = \"rescue\""),
        pool("die", "m-die", &[&die], "fallback = \"rescue\""),
        pool("garbage", "m-garbage", &[&garbage], "fallback = \"rescue\""),
        pool("silent", "m-silent", &[&silent], "fallback = \"rescue\""),
        pool("redirect", "m-redirect", &[&redirect], ""),
        pool("refuse", "m-refuse", &[&refuse], "api_key_env = \"NEOCLOUD_TEST_UPSTREAM_KEY\""),
        pool("groq", "m-groq", &[&groq], "profile = \"groq\""),
    ]
    .concat();
    let gw = gateway("gateway-mocks", &config);
    let addr = gw.addr;

    // Answers name their pool and upstream and carry their energy.
    let r = chat(addr, &chat_body("m-rescue", false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-neocloud-pool"), Some("rescue"));
    assert_eq!(r.header("x-neocloud-upstream"), Some("rescue/0"));
    let usage = &r.json()["usage"];
    assert_eq!(usage["energy_source"], "estimated");
    // 100 W over at least 4 x 25 ms.
    assert!(usage["energy_joules"].as_f64().unwrap() >= 9.0, "{usage}");
    let mut streamed = chat_body("m-rescue", true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = chat(addr, &streamed).text();
    assert!(
        text.contains("\"energy_joules\":") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    // Usage is metered but not shown when the client did not ask for it.
    let text = chat(addr, &chat_body("m-rescue", true)).text();
    assert!(
        !text.contains("\"usage\":{") && text.contains("[DONE]"),
        "{text}"
    );

    // Row 9 and the model checks happen before any upstream is called.
    let mut redirecting = chat_body("m-rescue", false);
    redirecting["api_base"] = json!("http://169.254.169.254/v1");
    let r = chat(addr, &redirecting);
    assert_eq!(
        (r.status, error_of(&r)["param"].as_str()),
        (400, Some("api_base"))
    );
    let r = chat(addr, &json!({"messages": []}));
    assert_eq!(
        (r.status, error_of(&r)["param"].as_str()),
        (400, Some("model"))
    );
    let r = chat(addr, &chat_body("no-such-model", false));
    assert_eq!(
        (r.status, error_of(&r)["code"].as_str()),
        (404, Some("model_not_found"))
    );

    // Row 18: a failing upstream is retried around, then ejected; the
    // client never sees its 500 or its body.
    for _ in 0..12 {
        let r = chat(addr, &chat_body("m-retry", false));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-neocloud-upstream"), Some("retry/1"));
    }
    assert_eq!(
        retry_bad.requests(),
        5,
        "ejected after 5 consecutive failures"
    );
    assert_eq!(
        metric(
            addr,
            "neocloud:upstream_ejections_total{pool=\"retry\",upstream=\"retry/0\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(addr, "neocloud:upstream_errors_total{pool=\"retry\",upstream=\"retry/0\",kind=\"server_error\"}"),
        5.0
    );

    // Row 19: with every upstream failing, 503 with Retry-After; no more
    // than the configured share of the pool (half) is ever ejected, and no
    // request is tried more than once per upstream.
    for _ in 0..10 {
        let r = chat(addr, &chat_body("m-dead", false));
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(!r.text().contains("secret"), "{}", r.text());
    }
    assert!(dead_a.requests() + dead_b.requests() <= 20);
    let ejections = metric(
        addr,
        "neocloud:upstream_ejections_total{pool=\"dead\",upstream=\"dead/0\"}",
    ) + metric(
        addr,
        "neocloud:upstream_ejections_total{pool=\"dead\",upstream=\"dead/1\"}",
    );
    assert_eq!(ejections, 1.0);
    // ... and with a fallback pool, the fallback answers.
    let r = chat(addr, &chat_body("m-down", false));
    assert_eq!(
        (r.status, r.header("x-neocloud-pool")),
        (200, Some("rescue"))
    );
    assert!(metric(addr, "neocloud:fallback_requests_total") >= 1.0);

    // Row 20: a 429 cools its upstream down; requests go elsewhere.
    for _ in 0..6 {
        assert_eq!(chat(addr, &chat_body("m-429", false)).status, 200);
    }
    assert_eq!(limited.requests(), 1);
    let r = chat(addr, &chat_body("m-429-only", false));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(error_of(&r)["code"], "rate_limit_exceeded");
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((6..=7).contains(&wait), "{wait}");

    // Row 21: after the first token, a stall or a broken stream ends with an
    // SSE error event, and is not retried.
    let rescued_before = rescue.requests();
    let started = Instant::now();
    let text = chat(addr, &chat_body("m-stall", true)).text();
    assert_eq!(text.matches("\"content\"").count(), 2, "{text}");
    assert!(
        text.contains("upstream_stream_error") && !text.contains("[DONE]"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let text = chat(addr, &chat_body("m-die", true)).text();
    assert_eq!(text.matches("\"content\"").count(), 2, "{text}");
    assert!(
        text.contains("upstream_stream_error") && !text.contains("[DONE]"),
        "{text}"
    );
    assert_eq!(rescue.requests(), rescued_before);
    // Before the first token, garbage or silence moves the stream elsewhere.
    for model in ["m-garbage", "m-silent"] {
        let text = chat(addr, &chat_body(model, true)).text();
        assert_eq!(text.matches("\"content\"").count(), 4, "{model}: {text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{model}: {text}");
    }
    assert_eq!(rescue.requests(), rescued_before + 2);

    // Row 22: redirects are not followed.
    let r = chat(addr, &chat_body("m-redirect", false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(target.requests(), 0);

    // An upstream's refusal is passed on without the pool's key.
    let r = chat(addr, &chat_body("m-refuse", false));
    assert_eq!(r.status, 400);
    let error = error_of(&r);
    assert_eq!(error["param"], "temperature");
    assert_eq!(error["message"], "key [redacted] may not set temperature");

    // Conformance: Groq drops logit_bias and top_k, said in a header, and
    // cannot give several choices.
    let mut body = chat_body("m-groq", false);
    body["logit_bias"] = json!({"42": 1});
    body["top_k"] = json!(5);
    let r = chat(addr, &body);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-neocloud-dropped-params"),
        Some("logit_bias,top_k")
    );
    body["n"] = json!(2);
    let r = chat(addr, &body);
    assert_eq!((r.status, error_of(&r)["param"].as_str()), (400, Some("n")));

    // Per-upstream metrics.
    assert_eq!(
        metric(
            addr,
            "neocloud:upstream_requests_total{pool=\"limited\",upstream=\"limited/0\"}"
        ),
        1.0
    );
    assert!(
        metric(
            addr,
            "neocloud:upstream_energy_joules_total{pool=\"rescue\",upstream=\"rescue/0\"}"
        ) > 0.0
    );
    assert!(
        metric(addr, "neocloud:upstream_time_to_first_token_seconds_count{pool=\"rescue\",upstream=\"rescue/0\"}") >= 2.0
    );
}

#[test]
fn metadata_addresses_are_refused_at_start() {
    // The second is the same address to the URL parser reqwest uses.
    for url in ["http://169.254.169.254/v1", "http://169.254.169.254./v1"] {
        let path = config_file(
            "gateway-metadata",
            &format!("[[pool]]\nname = \"p\"\nmodel = \"m\"\naccelerator = \"cpu\"\nupstreams = [\"{url}\"]\n"),
        );
        let out = Command::new(BIN)
            .args(["serve", "--port", "0", "--config", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("refused"), "{url}: {stderr}");
    }
}

/// Sends a streamed request on a raw connection and returns it, with the
/// response read until `until` has appeared `count` times.
fn open_stream(addr: SocketAddr, body: &Value, until: &str, count: usize) -> (TcpStream, String) {
    let mut conn = neocloud_testkit::http::send_chat(addr, body);
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches(until).count() < count {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    (conn, String::from_utf8_lossy(&seen).into_owned())
}

#[test]
fn a_gateway_over_real_servers_loses_nothing_when_upstreams_die() {
    let s1 = Server::start(BIN, &["--model", "gemma-3-270m"]);
    let s2 = Server::start(BIN, &["--model", "gemma-3-270m"]);
    let config = format!(
        r#"
[router]
policy = "round-robin"
health_check_interval_secs = 0.5
stall_timeout_secs = 20

[[pool]]
name = "gemma"
model = "gemma"
served_model = "gemma-3-270m"
accelerator = "cpu"
count = 2
profile = "neocloud"
upstreams = ["http://{}/v1", "http://{}/v1", "engine:gemma-3-270m"]

[[pool]]
name = "direct"
model = "gemma-direct"
served_model = "gemma-3-270m"
accelerator = "cpu"
profile = "neocloud"
upstreams = ["http://{}/v1"]
"#,
        s1.addr, s2.addr, s1.addr
    );
    let gw = gateway("gateway-real", &config);
    let addr = gw.addr;

    let r = chat(addr, &chat_body("gemma", false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "gemma");
    assert!(r.json()["usage"]["energy_joules"].as_f64().unwrap() > 0.0);
    // Streamed text completions, on every upstream of the pool in turn.
    for _ in 0..3 {
        let r = post_json(
            addr,
            "/v1/completions",
            &json!({"model": "gemma", "prompt": "Once upon a time", "max_tokens": 4, "stream": true}),
        );
        let text = r.text();
        assert_eq!(r.status, 200, "{text}");
        assert!(
            text.contains("\"model\":\"gemma\"") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
        assert!(
            !text.contains("\"usage\":{"),
            "usage only when asked: {text}"
        );
    }

    // A stream whose upstream dies mid-way ends with an error event.
    let mut long = chat_body("gemma-direct", true);
    long["max_tokens"] = json!(2000);
    long["ignore_eos"] = json!(true);
    let (mut conn, head) = open_stream(addr, &long, "\"content\"", 3);
    assert!(head.contains("x-neocloud-upstream: direct/0"), "{head}");
    drop(s1);
    let mut rest = String::new();
    let started = Instant::now();
    conn.read_to_string(&mut rest).unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        rest.contains("upstream_stream_error") && !rest.contains("[DONE]"),
        "{rest}"
    );

    // Non-streamed requests keep being answered while the second server is
    // killed under them: none is lost.
    let done = Arc::new(AtomicUsize::new(0));
    let upstreams = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let (done, upstreams) = (Arc::clone(&done), Arc::clone(&upstreams));
            std::thread::spawn(move || {
                for i in 0..8 {
                    let mut body = chat_body("gemma", false);
                    body["messages"][0]["content"] =
                        json!(format!("Worker {w}, request {i}: say hello."));
                    let r = chat(addr, &body);
                    assert_eq!(r.status, 200, "{}", r.text());
                    upstreams
                        .lock()
                        .unwrap()
                        .push(r.header("x-neocloud-upstream").unwrap().to_owned());
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    while done.load(Ordering::SeqCst) < 6 {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s2);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 24);
    let served = upstreams.lock().unwrap().clone();
    assert!(served.iter().any(|u| u == "gemma/1"), "{served:?}");
    assert!(served.iter().any(|u| u == "gemma/2"), "{served:?}");
    let after_kill = &served[served.len() - 6..];
    assert!(after_kill.iter().all(|u| u == "gemma/2"), "{served:?}");
    // The in-process engine's own gauges are in the gateway's metrics.
    assert!(metric(addr, "neocloud:generation_tokens_total") > 0.0);
}

#[test]
fn the_gateway_sheds_load_beyond_its_in_flight_limit() {
    let slow = MockUpstream::start(Behaviour::Slow {
        tokens: 4,
        per_token: Duration::from_millis(300),
    });
    let config = format!(
        "[router]\nmax_in_flight = 1\n\n[[pool]]\nname = \"slow\"\nmodel = \"m\"\naccelerator = \"cpu\"\nupstreams = [\"{}\"]\n",
        slow.base_url()
    );
    let gw = gateway("gateway-shed", &config);
    let addr = gw.addr;
    let first = std::thread::spawn(move || chat(addr, &chat_body("m", false)));
    while slow.requests() == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let r = chat(addr, &chat_body("m", false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(error_of(&r)["message"]
        .as_str()
        .unwrap()
        .contains("capacity"));
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(slow.requests(), 1);
}

/// An upstream key reaches neither a log line (at the most verbose level,
/// HTTP client internals included) nor an answer, whatever the upstream
/// does with it: refuse with it in the body, refuse the key, stall, send
/// garbage, or not answer at all.
#[test]
fn upstream_keys_never_reach_a_log_line_or_an_answer() {
    const KEY: &str = "sk-upstream-key-7f3a9c";
    let echo = |status: &str| {
        MockUpstream::start(Behaviour::Fixed {
            status: status.into(),
            headers: String::new(),
            body: format!(
                r#"{{"error":{{"message":"bad key {KEY}","type":"invalid_request_error","param":"{KEY}","code":"{KEY}"}}}}"#
            ),
        })
    };
    let (refuse, unauthorized, failing) = (
        echo("400 Bad Request"),
        echo("401 Unauthorized"),
        echo("500 Internal Server Error"),
    );
    let garbage = MockUpstream::start(Behaviour::GarbageSse);
    let fast = MockUpstream::start(Behaviour::Fast { tokens: 3 });
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let pool = |name: &str, urls: &[String]| {
        let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "[[pool]]\nname = \"{name}\"\nmodel = \"m-{name}\"\naccelerator = \"cpu\"\n\
             upstreams = [{}]\napi_key_env = \"NEOCLOUD_SECRET_TEST_KEY\"\n",
            urls.join(", ")
        )
    };
    let config = [
        "[router]\nstall_timeout_secs = 1\nhealth_check_interval_secs = 0.2\n".to_string(),
        pool("refuse", &[refuse.base_url()]),
        pool("unauthorized", &[unauthorized.base_url()]),
        pool("failing", &[failing.base_url()]),
        pool("garbage", &[garbage.base_url()]),
        pool("closed", &[closed_url]),
        pool("fine", &[fast.base_url()]),
    ]
    .concat();
    let log_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("upstream-keys.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let path = config_file("upstream-keys", &config);
    let gw = Server::start_with(
        BIN,
        &["--config", path.to_str().unwrap()],
        &[("NEOCLOUD_SECRET_TEST_KEY", KEY), ("NEOCLOUD_LOG", "trace")],
        log,
    );
    let mut answers = String::new();
    for name in [
        "refuse",
        "unauthorized",
        "failing",
        "garbage",
        "closed",
        "fine",
    ] {
        for stream in [false, true] {
            let resp = chat(gw.addr, &chat_body(&format!("m-{name}"), stream));
            answers.push_str(&format!("{:?}\n{}\n", resp.headers, resp.text()));
        }
    }
    // Let a few active health checks run with the key.
    std::thread::sleep(Duration::from_millis(800));
    drop(gw);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines().count() > 20,
        "the trace-level log has lines: {log}"
    );
    for (i, line) in log.lines().enumerate() {
        assert!(!line.contains(KEY), "log line {i} shows the key: {line}");
    }
    assert!(!answers.contains(KEY), "an answer shows the key: {answers}");
}

/// A process's resident memory in KiB (`VmRSS`).
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// An upstream that sends one event without end (no blank line, ever) is
/// cut off at the relay's event cap: before its first event the request
/// moves on; after it, the stream ends with an error event. Either way the
/// upstream counts as failed and the gateway holds at most the cap.
#[test]
fn an_endless_upstream_event_is_cut_off_at_the_cap() {
    let endless_late = MockUpstream::start(Behaviour::EndlessEvent { tokens: 2 });
    let endless_early = MockUpstream::start(Behaviour::EndlessEvent { tokens: 0 });
    let rescue = MockUpstream::start(Behaviour::Fast { tokens: 3 });
    let pool = |name: &str, url: String, extra: &str| {
        format!(
            "[[pool]]\nname = \"{name}\"\nmodel = \"m-{name}\"\naccelerator = \"cpu\"\nupstreams = [\"{url}\"]\n{extra}\n"
        )
    };
    let config = [
        "[router]\nstall_timeout_secs = 5\n".to_string(),
        pool("late", endless_late.base_url(), ""),
        pool("early", endless_early.base_url(), "fallback = \"rescue\""),
        pool("rescue", rescue.base_url(), ""),
    ]
    .concat();
    let gw = gateway("endless-event", &config);
    let before = resident_kib(gw.pid());
    let late = chat(gw.addr, &chat_body("m-late", true));
    assert_eq!(late.status, 200);
    let text = late.text();
    assert_eq!(text.matches("\"content\":\"t").count(), 2, "{text:.400}");
    assert!(
        text.contains("upstream_stream_error"),
        "{:.400}",
        &text[text.len().saturating_sub(400)..]
    );
    let early = chat(gw.addr, &chat_body("m-early", true));
    assert_eq!(early.status, 200);
    // The answer came from the fallback pool (the headers went out with the
    // first upstream's acceptance).
    let early_text = early.text();
    assert_eq!(
        early_text.matches("\"content\":\"t").count(),
        3,
        "{early_text:.400}"
    );
    assert!(early_text.contains("data: [DONE]"));
    let grown_mib = resident_kib(gw.pid()).saturating_sub(before) / 1024;
    assert!(grown_mib < 8, "the gateway grew by {grown_mib} MiB");
    let errors = |upstream: &str| {
        metric(
            gw.addr,
            &format!("neocloud:upstream_errors_total{{pool=\"{upstream}\",upstream=\"{upstream}/0\",kind=\"bad_reply\"}}"),
        ) + metric(
            gw.addr,
            &format!("neocloud:upstream_errors_total{{pool=\"{upstream}\",upstream=\"{upstream}/0\",kind=\"broken\"}}"),
        )
    };
    assert!(errors("late") >= 1.0 && errors("early") >= 1.0);
}

/// How one request of the failover run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A whole answer.
    Answered,
    /// A stream that had sent events when its upstream died, ended with an
    /// error event: the gateway cannot move it, and says so.
    CutAfterFirstEvent,
    /// No answer: an error status, or a stream that failed before its first
    /// event.
    Lost,
}

/// One request of the failover run, streamed or not.
fn failover_request(addr: SocketAddr, worker: usize, i: usize, stream: bool) -> Outcome {
    let mut body = chat_body("gemma", stream);
    body["max_tokens"] = json!(16);
    body["messages"][0]["content"] = json!(format!("Worker {worker}, request {i}: say hello."));
    let r = chat(addr, &body);
    if r.status != 200 {
        return Outcome::Lost;
    }
    if !stream {
        return Outcome::Answered;
    }
    let text = r.text();
    if text.ends_with("data: [DONE]\n\n") {
        Outcome::Answered
    } else if text.contains("\"content\"") {
        Outcome::CutAfterFirstEvent
    } else {
        Outcome::Lost
    }
}

/// Two real upstreams behind the gateway, one killed (SIGKILL) while 40
/// requests run at concurrency 4, 16 and 64: none is lost. Requests in
/// flight on the dead upstream and those that find its port closed move to
/// the other; a refused connection spends no retry, and a retry over the
/// budget waits for a place among the retries in flight instead of failing.
/// The same for streams that had not sent their first event.
#[test]
fn failover_loses_no_request_at_any_concurrency() {
    for concurrency in [4, 16, 64] {
        for stream in [false, true] {
            let s1 = Server::start(BIN, &["--model", "gemma-3-270m"]);
            let s2 = Server::start(BIN, &["--model", "gemma-3-270m"]);
            let config = format!(
                "[router]\npolicy = \"round-robin\"\nhealth_check_interval_secs = 0.5\n\n[[pool]]\nname = \"gemma\"\nmodel = \"gemma\"\nserved_model = \"gemma-3-270m\"\naccelerator = \"cpu\"\nprofile = \"neocloud\"\nupstreams = [\"http://{}/v1\", \"http://{}/v1\"]\n",
                s1.addr, s2.addr
            );
            let gw = gateway(&format!("gateway-failover-{concurrency}-{stream}"), &config);
            let addr = gw.addr;
            let total = 40;
            let next = Arc::new(AtomicUsize::new(0));
            let done = Arc::new(AtomicUsize::new(0));
            let outcomes = Arc::new(Mutex::new(Vec::new()));
            let workers: Vec<_> = (0..concurrency)
                .map(|w| {
                    let (next, done, outcomes) =
                        (Arc::clone(&next), Arc::clone(&done), Arc::clone(&outcomes));
                    std::thread::spawn(move || loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= total {
                            return;
                        }
                        let outcome = failover_request(addr, w, i, stream);
                        outcomes.lock().unwrap().push(outcome);
                        done.fetch_add(1, Ordering::SeqCst);
                    })
                })
                .collect();
            // Killed once a few have been answered, with the rest in flight
            // or still to come.
            while done.load(Ordering::SeqCst) < 4 {
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(s2);
            for w in workers {
                w.join().unwrap();
            }
            let outcomes = outcomes.lock().unwrap().clone();
            assert_eq!(outcomes.len(), total);
            let lost = outcomes.iter().filter(|o| **o == Outcome::Lost).count();
            let cut = outcomes
                .iter()
                .filter(|o| **o == Outcome::CutAfterFirstEvent)
                .count();
            eprintln!(
                "failover at concurrency {concurrency}, stream {stream}: {lost} lost, {cut} cut after their first event, of {total}"
            );
            assert_eq!(
                lost, 0,
                "concurrency {concurrency}, stream {stream}: {outcomes:?}"
            );
            drop(s1);
        }
    }
}
