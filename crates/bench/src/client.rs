//! HTTP to the targets: one streamed request at a time, timed chunk by
//! chunk; token counts come from `usage` in the last chunk, so targets that
//! pack several tokens per chunk are timed correctly.

use std::time::{Duration, Instant};

use neocloud_openai::sse::{SseDecoder, DONE};
use serde_json::{json, Value};

use crate::error::BenchError;
use crate::target::Target;

/// How one request went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Seconds from the start of the level to sending.
    pub sent_at: f64,
    /// Seconds from sending to the first generated text.
    pub ttft: Option<f64>,
    /// Seconds from sending to the end of the stream.
    pub e2e: f64,
    /// Seconds between consecutive chunks that carried text.
    pub chunk_gaps: Vec<f64>,
    /// Generated tokens (`usage.completion_tokens`, else chunks with text).
    pub output_tokens: u64,
    /// Prompt tokens (`usage.prompt_tokens`).
    pub input_tokens: Option<u64>,
    /// Why it failed: `http_503`, `timeout`, `connect`, `stream`, `error_event`.
    pub error: Option<String>,
}

impl Outcome {
    /// Time per output token after the first.
    pub fn tpot(&self) -> Option<f64> {
        let ttft = self.ttft?;
        (self.output_tokens > 1).then(|| (self.e2e - ttft) / (self.output_tokens - 1) as f64)
    }
}

/// The HTTP client shared by every request of a run.
pub struct Client {
    http: reqwest::Client,
    /// Longest wait for the next chunk.
    idle_timeout: Duration,
}

impl Client {
    /// A client that follows no redirects and gives up on a stream that is
    /// silent for `idle_timeout`.
    pub fn new(idle_timeout: Duration) -> Result<Self, BenchError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(1024)
            .build()
            .map_err(|e| BenchError::InvalidArgument(format!("HTTP client: {e}")))?;
        Ok(Client { http, idle_timeout })
    }

    fn post(&self, target: &Target, url: String) -> reqwest::RequestBuilder {
        let req = self.http.post(url);
        match &target.api_key {
            Some(key) => req.bearer_auth(key.expose()),
            None => req,
        }
    }

    /// The first model a target lists.
    pub async fn first_model(&self, target: &Target) -> Result<String, BenchError> {
        let fail = |message: String| BenchError::Target {
            target: target.name.clone(),
            message,
        };
        let mut req = self.http.get(format!("{}/models", target.base_url));
        if let Some(key) = &target.api_key {
            req = req.bearer_auth(key.expose());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| fail(format!("GET /models: {e}")))?;
        let list: Value = resp
            .json()
            .await
            .map_err(|e| fail(format!("GET /models: {e}")))?;
        list["data"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| fail("GET /models lists no model; pass model=".into()))
    }

    /// Tokens in `text` by the target's own tokenizer: `/tokenize` in
    /// vLLM's and neocloud's shape, else in llama.cpp's. `None` when the
    /// target has neither.
    pub async fn tokenize(&self, target: &Target, text: &str) -> Option<usize> {
        let url = format!("{}/tokenize", target.root_url());
        let bodies = [
            json!({"model": target.model(), "prompt": text, "add_special_tokens": false}),
            json!({"content": text, "add_special": false}),
        ];
        for body in bodies {
            let Ok(resp) = self.post(target, url.clone()).json(&body).send().await else {
                return None;
            };
            if !resp.status().is_success() {
                continue;
            }
            let Ok(v) = resp.json::<Value>().await else {
                continue;
            };
            if let Some(tokens) = v.get("tokens").and_then(Value::as_array) {
                return Some(tokens.len());
            }
        }
        None
    }

    /// GETs the target's `/metrics` text, when it has one.
    pub async fn metrics_text(&self, target: &Target) -> Option<String> {
        let resp = self
            .http
            .get(format!("{}/metrics", target.root_url()))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.text().await.ok()
    }

    /// Sends one streamed request and times it.
    pub async fn run(&self, target: &Target, path: &str, body: &Value) -> Outcome {
        let start = Instant::now();
        let mut out = Outcome::default();
        let sent = self
            .post(target, format!("{}{path}", target.base_url))
            .json(body)
            .send();
        let resp = match tokio::time::timeout(self.idle_timeout, sent).await {
            Err(_) => return failed(out, start, "timeout"),
            Ok(Err(e)) if e.is_connect() => return failed(out, start, "connect"),
            Ok(Err(e)) if e.is_timeout() => return failed(out, start, "timeout"),
            Ok(Err(_)) => return failed(out, start, "stream"),
            Ok(Ok(r)) => r,
        };
        if !resp.status().is_success() {
            let kind = format!("http_{}", resp.status().as_u16());
            return failed(out, start, &kind);
        }
        let mut resp = resp;
        let mut decoder = SseDecoder::new();
        let mut last_text: Option<Instant> = None;
        let mut text_chunks = 0u64;
        let mut usage_tokens = None;
        let mut done = false;
        while !done {
            let chunk = match tokio::time::timeout(self.idle_timeout, resp.chunk()).await {
                Err(_) => return failed(out, start, "timeout"),
                Ok(Err(_)) => return failed(out, start, "stream"),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            let now = Instant::now();
            let Ok(events) = decoder.feed(&chunk) else {
                return failed(out, start, "stream");
            };
            for event in events {
                if event.is_error() {
                    return failed(out, start, "error_event");
                }
                if event.data == DONE {
                    done = true;
                    break;
                }
                let Ok(v) = serde_json::from_str::<Value>(&event.data) else {
                    return failed(out, start, "stream");
                };
                if v.get("error").is_some() {
                    return failed(out, start, "error_event");
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    usage_tokens = u["completion_tokens"].as_u64();
                    out.input_tokens = u["prompt_tokens"].as_u64();
                }
                let has_text = v["choices"].as_array().is_some_and(|choices| {
                    choices.iter().any(|c| {
                        let delta = &c["delta"];
                        let content = delta["content"].as_str().or(c["text"].as_str());
                        content.is_some_and(|t| !t.is_empty())
                            || delta.get("tool_calls").is_some_and(|t| !t.is_null())
                            || delta["reasoning_content"]
                                .as_str()
                                .is_some_and(|t| !t.is_empty())
                    })
                });
                if has_text {
                    text_chunks += 1;
                    match last_text {
                        None => out.ttft = Some((now - start).as_secs_f64()),
                        Some(t) => out.chunk_gaps.push((now - t).as_secs_f64()),
                    }
                    last_text = Some(now);
                }
            }
        }
        out.e2e = start.elapsed().as_secs_f64();
        out.output_tokens = usage_tokens.unwrap_or(text_chunks);
        if !done {
            out.error = Some("stream".into());
        }
        out
    }
}

fn failed(mut out: Outcome, start: Instant, kind: &str) -> Outcome {
    out.e2e = start.elapsed().as_secs_f64();
    out.error = Some(kind.to_owned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpot_excludes_the_first_token() {
        let o = Outcome {
            ttft: Some(0.5),
            e2e: 1.5,
            output_tokens: 11,
            ..Outcome::default()
        };
        assert!((o.tpot().unwrap() - 0.1).abs() < 1e-12);
        let one = Outcome {
            ttft: Some(0.5),
            e2e: 0.5,
            output_tokens: 1,
            ..Outcome::default()
        };
        assert_eq!(one.tpot(), None);
    }
}
