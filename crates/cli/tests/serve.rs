//! `neocloud serve` over real HTTP on loopback with the real models: the
//! OpenAI chat API, streaming, and errors in OpenAI's shape.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use neocloud_openai::sse::SseDecoder;
use neocloud_testkit::http::{post_json, request, Server};
use serde_json::{json, Value};

const QWEN: &str = "qwen2.5-coder-0.5b-instruct";
const GEMMA: &str = "gemma-3-270m";

/// One server with both models runs every check in turn, and is stopped
/// (by its PID) when the test ends, whatever happens.
#[test]
fn serve_answers_the_openai_chat_api() {
    let server = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--model", GEMMA, "--model", QWEN],
    );
    let s = &server;
    health_and_models(s);
    chat_prompt_tokens_match_the_reference_template(s);
    streaming_and_collected_answers_agree(s);
    seeds_make_sampling_reproducible(s);
    logprobs_come_with_top_alternatives(s);
    completions_score_prompts_like_llama_cpp(s);
    completions_generate_and_echo(s);
    tokenize_and_detokenize(s);
    several_choices_differ_by_seed(s);
    streamed_logprobs_match_collected_ones(s);
    streamed_completions_match_collected_ones(s);
    tool_calls_round_trip_with_qwen(s);
    json_mode_answers_are_json_objects(s);
    metrics_report_latency_histograms(s);
    a_repeated_prefix_is_served_from_the_cache(s);
}

fn a_repeated_prefix_is_served_from_the_cache(s: &Server) {
    let system = "You answer questions about lighthouses, briefly. ".repeat(80);
    let ask = |question: &str| {
        let resp = chat(
            s,
            json!({
                "model": GEMMA,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 4,
                "temperature": 0,
            }),
        );
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.json()["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    ask("Who keeps the light?");
    let before = metric(s, "neocloud:prefix_cache_hit_tokens_total");
    let prompt = ask("How tall is the tower?");
    let reused = metric(s, "neocloud:prefix_cache_hit_tokens_total") - before;
    // The shared system prompt came from the cache (all of it where the
    // kernels compute each row on its own, else its first whole prefill
    // chunk of 512 tokens); the question did not.
    assert!(prompt > 700, "{prompt}");
    assert!((512..prompt - 4).contains(&reused), "{reused} of {prompt}");
}

fn chat(s: &Server, body: Value) -> neocloud_testkit::http::Response {
    post_json(s.addr, "/v1/chat/completions", &body)
}

fn assert_error(
    resp: &neocloud_testkit::http::Response,
    status: u16,
    kind: &str,
    param: Option<&str>,
) {
    assert_eq!(resp.status, status, "{}", resp.text());
    let err = &resp.json()["error"];
    assert_eq!(err["type"], kind, "{err}");
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    match param {
        Some(p) => assert_eq!(err["param"], p, "{err}"),
        None => assert!(err.get("param").is_some()),
    }
}

fn health_and_models(s: &Server) {
    let health = request(s.addr, "GET", "/health", None);
    assert_eq!(health.status, 200);
    let models = request(s.addr, "GET", "/v1/models", None).json();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![GEMMA, QWEN]);
}

fn chat_prompt_tokens_match_the_reference_template(s: &Server) {
    for line in neocloud_testkit::reference_lines(QWEN, "chat_template.jsonl") {
        let mut body = line["request"].clone();
        body["model"] = json!(QWEN);
        body["max_tokens"] = json!(1);
        let resp = chat(s, body);
        assert_eq!(resp.status, 200, "{}", resp.text());
        let usage = &resp.json()["usage"];
        assert_eq!(usage["prompt_tokens"], line["prompt_token_count"]);
        assert_eq!(usage["completion_tokens"], 1);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            line["prompt_token_count"].as_u64().unwrap() + 1
        );
    }
}

fn streaming_and_collected_answers_agree(s: &Server) {
    let body = json!({
        "model": QWEN,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": [{"type": "text", "text": "Name three prime numbers."}]}],
        "max_tokens": 24,
        "temperature": 0,
    });
    let collected = chat(s, body.clone());
    assert_eq!(collected.status, 200, "{}", collected.text());
    let collected = collected.json();
    let choice = &collected["choices"][0];
    assert_eq!(collected["object"], "chat.completion");
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));

    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let streamed = chat(s, stream_body);
    assert_eq!(streamed.status, 200);
    assert!(streamed
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_data(&streamed.text());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let ids: std::collections::HashSet<&str> =
        chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    let streamed_text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["delta"]["content"].as_str())
        })
        .collect();
    assert_eq!(streamed_text, text);
    let usage_chunk = chunks.last().unwrap();
    assert!(usage_chunk["choices"].as_array().unwrap().is_empty());
    // The same tokens; each answer is charged the energy of its own run.
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(
            usage_chunk["usage"][field], collected["usage"][field],
            "{field}"
        );
    }
    for usage in [&usage_chunk["usage"], &collected["usage"]] {
        assert!(
            usage["energy_joules"].as_f64().is_some_and(|j| j > 0.0),
            "{usage}"
        );
        assert_eq!(usage["energy_source"], "estimated");
    }
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(*finish, choice["finish_reason"]);
}

fn seeds_make_sampling_reproducible(s: &Server) {
    let ask = |seed: u64| {
        chat(
            s,
            json!({
                "model": GEMMA,
                "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 16, "temperature": 1.0, "seed": seed,
            }),
        )
        .json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(ask(7), ask(7));
    assert_ne!(ask(7), ask(8));
}

fn logprobs_come_with_top_alternatives(s: &Server) {
    let resp = chat(
        s,
        json!({
            "model": QWEN,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 3,
        }),
    )
    .json();
    let content = resp["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        content.len() as u64,
        resp["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], entry["token"]);
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }
}

fn metric(s: &Server, name: &str) -> u64 {
    let text = request(s.addr, "GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

/// Polls until `cond` holds; the bound only keeps a broken build from hanging.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Opens a long streamed request and returns the connection once `chunks`
/// events have arrived.
fn open_stream(s: &Server, chunks: usize) -> (std::net::TcpStream, usize) {
    use std::io::Read;
    let mut conn = neocloud_testkit::http::send_chat(
        s.addr,
        &json!({
            "model": GEMMA, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true,
        }),
    );
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data: ").count() < chunks {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    (conn, seen.matches("data: ").count())
}

#[test]
fn a_request_of_higher_priority_overtakes_a_running_one() {
    let server = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--model", GEMMA, "--max-batch", "1"],
    );
    let s = &server;
    let body = |priority: i64, max_tokens: u32| {
        json!({
            "model": GEMMA, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "priority": priority,
        })
    };
    // A long request of low priority holds the one place in the batch.
    let addr = s.addr;
    let long = std::thread::spawn(move || {
        let resp = post_json(addr, "/v1/chat/completions", &body(5, 200));
        (resp.status, std::time::Instant::now())
    });
    wait_for("the long request to run", || {
        metric(s, "neocloud:generation_tokens_total") > 0
            || metric(s, "neocloud:num_requests_running") == 1
    });
    let urgent = chat(s, body(0, 4));
    let answered = std::time::Instant::now();
    assert_eq!(urgent.status, 200, "{}", urgent.text());
    let (status, long_answered) = long.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        answered < long_answered,
        "the urgent request waited for the long one"
    );
    // The long one gave its place up and was recomputed.
    assert_eq!(metric(s, "neocloud:num_preemptions_total"), 1);
}

#[test]
fn a_client_that_leaves_cancels_its_request_and_a_full_queue_refuses_at_once() {
    let server = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--model", GEMMA, "--queue", "1", "--max-batch", "1"],
    );
    let s = &server;

    // Disconnect mid-stream: the engine stops within a few tokens.
    let (conn, received) = open_stream(s, 8);
    assert_eq!(metric(s, "neocloud:num_requests_running"), 1);
    let kv_usage = |s: &Server| -> f64 {
        let text = request(s.addr, "GET", "/metrics", None).text();
        text.lines()
            .find_map(|l| l.strip_prefix("neocloud:kv_cache_usage_perc "))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(kv_usage(s) > 0.0);
    drop(conn);
    wait_for("the cancelled request to leave the engine", || {
        metric(s, "neocloud:num_requests_running") == 0
    });
    // Its KV cache went with it.
    assert_eq!(kv_usage(s), 0.0);
    assert_eq!(
        metric(
            s,
            "neocloud:request_success_total{finished_reason=\"abort\"}"
        ),
        1
    );
    let generated = metric(s, "neocloud:generation_tokens_total");
    eprintln!("cancelled after {generated} tokens; the client read {received} events");
    assert!(
        generated as usize <= received + 4,
        "{generated} tokens generated for a client that read {received} events before leaving"
    );

    // One running, one waiting: the next request gets 503 with Retry-After.
    let (running, _) = open_stream(s, 2);
    let waiting = neocloud_testkit::http::send_chat(
        s.addr,
        &json!({"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    );
    wait_for("the second request to queue", || {
        metric(s, "neocloud:num_requests_waiting") == 1
    });
    let refused = chat(
        s,
        json!({"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    );
    assert_error(&refused, 503, "service_unavailable", None);
    assert_eq!(refused.header("retry-after"), Some("1"));
    // The waiting client leaves first: its request never starts.
    drop(waiting);
    drop(running);
    wait_for("the engine to drain", || {
        metric(s, "neocloud:num_requests_running") == 0
            && metric(s, "neocloud:num_requests_waiting") == 0
    });
    assert_eq!(
        metric(
            s,
            "neocloud:request_success_total{finished_reason=\"abort\"}"
        ),
        3
    );
    assert_eq!(
        metric(s, "neocloud:request_queue_time_seconds_count"),
        2,
        "the abandoned request never left the queue for the engine"
    );
    // And it serves again.
    let ok = chat(
        s,
        json!({"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// Teacher-forced log-probabilities through `/v1/completions` (echo,
/// max_tokens 0, token ids as names) agree with llama.cpp's, under the rule of
/// `crates/testkit/reference/README.md`. Asking for 20 alternatives puts every
/// reference top-5 token in the answer, so the rule is checked in full.
fn completions_score_prompts_like_llama_cpp(s: &Server) {
    for model in [GEMMA, QWEN] {
        for (li, line) in neocloud_testkit::reference_lines(model, "greedy.jsonl")
            .iter()
            .enumerate()
        {
            let prompt: Vec<u64> = line["prompt_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect();
            let completion: Vec<u64> = line["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect();
            let all: Vec<u64> = prompt.iter().chain(&completion).copied().collect();
            let resp = post_json(
                s.addr,
                "/v1/completions",
                &json!({"model": model, "prompt": all, "echo": true, "logprobs": 20, "max_tokens": 0, "return_tokens_as_token_ids": true}),
            );
            assert_eq!(resp.status, 200, "{}", resp.text());
            let body = resp.json();
            assert_eq!(
                body["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
                all.len()
            );
            assert_eq!(body["usage"]["completion_tokens"], 0);
            let lp = &body["choices"][0]["logprobs"];
            let tokens = lp["tokens"].as_array().unwrap();
            assert_eq!(tokens.len(), all.len());
            assert_eq!(tokens[0], format!("token_id:{}", all[0]));
            assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
            let mut position = 0usize;
            let mut total = 0f64;
            let mut count = 0usize;
            for step in line["steps"].as_array().unwrap() {
                let id = step["id"].as_u64().unwrap();
                while completion[position] != id {
                    position += 1;
                }
                let at = prompt.len() + position;
                position += 1;
                let top = lp["top_logprobs"][at].as_object().unwrap();
                assert_eq!(top.len(), 20);
                let ours = |id: u64| -> Option<f64> {
                    top.get(&format!("token_id:{id}")).and_then(|v| v.as_f64())
                };
                let refs: Vec<(u64, f64)> = step["top"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| (t["id"].as_u64().unwrap(), t["logprob"].as_f64().unwrap()))
                    .collect();
                let best = top
                    .iter()
                    .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
                    .unwrap()
                    .0;
                if refs[0].1 - refs[1].1 >= 0.25 {
                    assert_eq!(
                        *best,
                        format!("token_id:{}", refs[0].0),
                        "{model} prompt {li} step {position}"
                    );
                }
                // The chosen token's own log-probability is always reported.
                let chosen = lp["token_logprobs"][at].as_f64().unwrap();
                assert!(
                    (chosen - step["logprob"].as_f64().unwrap()).abs() < 1.5,
                    "{model} prompt {li}"
                );
                for (rid, rlp) in refs {
                    let v = ours(rid).unwrap_or_else(|| {
                        panic!("{model} prompt {li}: reference token {rid} not in our top 20")
                    });
                    total += (v - rlp).abs();
                    count += 1;
                }
            }
            let mean = total / count as f64;
            assert!(mean <= 0.25, "{model} prompt {li}: mean difference {mean}");
        }
    }
}

fn completions_generate_and_echo(s: &Server) {
    let resp = post_json(s.addr, "/v1/completions", &json!({"model": GEMMA, "prompt": "The meaning of life is", "max_tokens": 8, "temperature": 0, "echo": true, "logprobs": 2})).json();
    let choice = &resp["choices"][0];
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with("The meaning of life is not"), "{text}");
    let lp = &choice["logprobs"];
    assert!(lp["top_logprobs"].as_array().unwrap()[1..].iter().all(|t| t
        .as_object()
        .unwrap()
        .len()
        == 2));
    let n = resp["usage"]["prompt_tokens"].as_u64().unwrap()
        + resp["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(lp["tokens"].as_array().unwrap().len() as u64, n);
    assert_eq!(resp["usage"]["completion_tokens"], 8);
    let several = post_json(s.addr, "/v1/completions", &json!({"model": QWEN, "prompt": ["def add(a, b):", "SELECT"], "max_tokens": 4, "temperature": 0})).json();
    assert_eq!(several["choices"].as_array().unwrap().len(), 2);
    assert_eq!(several["choices"][1]["index"], 1);
    let suffix = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": QWEN, "prompt": "x", "suffix": "y"}),
    );
    assert_error(&suffix, 400, "invalid_request_error", Some("suffix"));
    let bad = post_json(
        s.addr,
        "/v1/completions",
        &json!({"model": QWEN, "prompt": [99999999]}),
    );
    assert_error(&bad, 400, "invalid_request_error", Some("prompt"));
}

fn tokenize_and_detokenize(s: &Server) {
    let line = &neocloud_testkit::reference_lines(QWEN, "tokenize.jsonl")
        .into_iter()
        .find(|l| {
            l["add_special"] == true
                && l["parse_special"] == true
                && l["text"].as_str().is_some_and(|t| t.len() > 10)
        })
        .unwrap();
    let resp = post_json(
        s.addr,
        "/tokenize",
        &json!({"model": QWEN, "prompt": line["text"]}),
    )
    .json();
    assert_eq!(resp["tokens"], line["tokens"]);
    assert_eq!(
        resp["count"].as_u64().unwrap() as usize,
        line["tokens"].as_array().unwrap().len()
    );
    let chat_line = &neocloud_testkit::reference_lines(QWEN, "chat_template.jsonl")[0];
    let chat = post_json(
        s.addr,
        "/tokenize",
        &json!({"model": QWEN, "messages": chat_line["request"]["messages"]}),
    )
    .json();
    assert_eq!(chat["count"], chat_line["prompt_token_count"]);
    let back = post_json(
        s.addr,
        "/detokenize",
        &json!({"model": QWEN, "tokens": resp["tokens"]}),
    )
    .json();
    assert_eq!(back["prompt"], line["text"]);
    let bad = post_json(
        s.addr,
        "/detokenize",
        &json!({"model": QWEN, "tokens": [u32::MAX]}),
    );
    assert_error(&bad, 400, "invalid_request_error", Some("tokens"));
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let server = Server::start(env!("CARGO_BIN_EXE_neocloud"), &["--model", GEMMA]);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = server.wait();
    assert_eq!(
        code,
        Some(0),
        "neocloud serve exits with success on SIGTERM"
    );
}

fn choice_texts(resp: &Value) -> Vec<String> {
    resp["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap().to_string())
        .collect()
}

fn several_choices_differ_by_seed(s: &Server) {
    let body = json!({
        "model": GEMMA, "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 12, "temperature": 1.0, "seed": 11, "n": 3,
    });
    let resp = chat(s, body.clone());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = resp.json();
    let texts = choice_texts(&resp);
    assert_eq!(texts.len(), 3);
    let indices: Vec<u64> = resp["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, vec![0, 1, 2]);
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
    // Reproducible as a whole, and choice 0 is the n = 1 answer.
    assert_eq!(choice_texts(&chat(s, body.clone()).json()), texts);
    let mut one = body;
    one["n"] = json!(1);
    assert_eq!(choice_texts(&chat(s, one).json())[0], texts[0]);
    let completion_tokens = resp["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        completion_tokens > 12 * 2,
        "usage sums the choices: {completion_tokens}"
    );
}

/// The data of every event of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    SseDecoder::new()
        .feed(body.as_bytes())
        .unwrap()
        .into_iter()
        .map(|e| e.data)
        .collect()
}

fn sse_chunks(resp: &neocloud_testkit::http::Response) -> Vec<Value> {
    assert_eq!(resp.status, 200, "{}", resp.text());
    let events = sse_data(&resp.text());
    assert_eq!(events.last().unwrap(), "[DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn streamed_logprobs_match_collected_ones(s: &Server) {
    let body = json!({
        "model": QWEN, "messages": [{"role": "user", "content": "Write a haiku about rust."}],
        "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 2,
    });
    let collected = chat(s, body.clone()).json();
    let want = collected["choices"][0]["logprobs"]["content"].clone();
    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let chunks = sse_chunks(&chat(s, stream_body));
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(Value::Array(streamed), want);
}

fn streamed_completions_match_collected_ones(s: &Server) {
    let body = json!({
        "model": GEMMA, "prompt": "The meaning of life is", "max_tokens": 10,
        "temperature": 0, "logprobs": 1, "echo": true,
    });
    let collected = post_json(s.addr, "/v1/completions", &body).json();
    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let chunks = sse_chunks(&post_json(s.addr, "/v1/completions", &stream_body));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, collected["choices"][0]["text"].as_str().unwrap());
    let tokens: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .flat_map(|c| c["logprobs"]["tokens"].as_array().unwrap().clone())
        .collect();
    assert_eq!(
        Value::Array(tokens),
        collected["choices"][0]["logprobs"]["tokens"]
    );
    let last = chunks.last().unwrap();
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][field], collected["usage"][field], "{field}");
    }
    let finish = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["finish_reason"].as_str())
        .collect::<Vec<_>>();
    assert_eq!(finish, vec!["length"]);
}

fn tool_calls_round_trip_with_qwen(s: &Server) {
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }]);
    let question = json!({"role": "user", "content": "What is the weather in Seoul?"});
    let body = json!({
        "model": QWEN, "messages": [question], "tools": tools,
        "temperature": 0, "max_tokens": 64,
    });
    let first = chat(s, body.clone()).json();
    let choice = &first["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{first}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["city"], "Seoul");

    // Streamed, the same call arrives in one delta before the finish.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let chunks = sse_chunks(&chat(s, stream_body));
    let streamed_call = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .find_map(|c| c["delta"].get("tool_calls"))
        .unwrap();
    assert_eq!(streamed_call[0]["function"], call["function"]);
    let finish = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .find_map(|c| c["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));

    // The result goes back; the template renders the call and the result.
    let result =
        json!({"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature_c\": 21}"});
    let messages = json!([question, choice["message"], result]);
    let rendered = post_json(
        s.addr,
        "/tokenize",
        &json!({"model": QWEN, "messages": messages, "tools": tools}),
    );
    assert_eq!(rendered.status, 200, "{}", rendered.text());
    let second = chat(
        s,
        json!({"model": QWEN, "messages": messages, "tools": tools, "temperature": 0, "max_tokens": 32}),
    );
    assert_eq!(second.status, 200, "{}", second.text());
    let second = second.json();
    let prompt_growth = second["usage"]["prompt_tokens"].as_u64().unwrap()
        - first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_growth >= 20,
        "the call and its result are in the prompt: {prompt_growth}"
    );
}

fn metrics_report_latency_histograms(s: &Server) {
    let text = request(s.addr, "GET", "/metrics", None).text();
    for name in [
        "neocloud:time_to_first_token_seconds",
        "neocloud:inter_token_latency_seconds",
        "neocloud:e2e_request_latency_seconds",
        "neocloud:request_queue_time_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {name} histogram")), "{name}");
        let count: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_count ")))
            .unwrap()
            .parse()
            .unwrap();
        let inf: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"+Inf\"}} ")))
            .unwrap()
            .parse()
            .unwrap();
        assert!(count > 0.0 && count == inf, "{name}: {count} vs {inf}");
    }
    assert!(text.contains(
        "neocloud:http_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}"
    ));
    assert!(text.contains("neocloud:kv_cache_usage_perc "));
    // Generated tokens add up: the counter equals the histogram's sum.
    let total: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("neocloud:generation_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    let summed: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("neocloud:request_generation_tokens_sum "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(total, summed);
}

fn json_mode_answers_are_json_objects(s: &Server) {
    for model in [GEMMA, QWEN] {
        for (temperature, seed) in [(0.0, 1), (1.0, 5)] {
            let resp = chat(
                s,
                json!({
                    "model": model,
                    "messages": [{"role": "user", "content": "Describe a cat as JSON with name, age and colors."}],
                    "response_format": {"type": "json_object"},
                    "temperature": temperature, "seed": seed, "max_tokens": 160,
                }),
            );
            assert_eq!(resp.status, 200, "{}", resp.text());
            let resp = resp.json();
            let choice = &resp["choices"][0];
            let text = choice["message"]["content"].as_str().unwrap();
            if choice["finish_reason"] == "stop" {
                let value: Value =
                    serde_json::from_str(text).unwrap_or_else(|e| panic!("{model}: {e}: {text}"));
                assert!(value.is_object(), "{model}: {text}");
            } else {
                // Cut by max_tokens: still the start of one object.
                assert_eq!(choice["finish_reason"], "length");
                assert!(text.trim_start().starts_with('{'), "{model}: {text}");
            }
        }
    }
    let schema = chat(
        s,
        json!({
            "model": QWEN, "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        }),
    );
    assert_error(
        &schema,
        400,
        "invalid_request_error",
        Some("response_format"),
    );
}

/// `--activation-bits 8` reaches the engine: the same greedy request gets
/// log-probabilities that differ from the default server's, slightly.
#[test]
fn a_server_with_8_bit_activations_answers_with_its_own_numbers() {
    let body = json!({
        "model": GEMMA,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 3, "temperature": 0, "logprobs": true,
    });
    let first_logprob = |args: &[&str]| -> f64 {
        let server = Server::start(env!("CARGO_BIN_EXE_neocloud"), args);
        let resp = chat(&server, body.clone());
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.json()["choices"][0]["logprobs"]["content"][0]["logprob"]
            .as_f64()
            .unwrap()
    };
    let sixteen = first_logprob(&["--model", GEMMA]);
    let eight = first_logprob(&["--model", GEMMA, "--activation-bits", "8"]);
    eprintln!("first token's log-probability: {sixteen} with 16 bits, {eight} with 8");
    assert!((sixteen - eight).abs() < 0.5);
    // Without AVX-512 VNNI both run 16-bit products.
    if std::is_x86_feature_detected!("avx512vnni")
        && std::env::var_os("NEOCLOUD_PORTABLE_KERNELS").is_none()
    {
        assert_ne!(sixteen, eight);
    }
}
