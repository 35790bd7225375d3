//! A fault-injecting mock of an OpenAI-compatible upstream, for gateway
//! tests and gateway-cost benchmarks: real HTTP on loopback, one thread per
//! connection, answering `/v1/chat/completions` (streamed or not),
//! `/v1/models` and `/health` in a chosen way.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How the mock behaves.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// Answers at once with `tokens` tokens.
    Fast {
        /// Tokens per answer.
        tokens: usize,
    },
    /// Waits `per_token` before each token.
    Slow {
        /// Tokens per answer.
        tokens: usize,
        /// Delay before each.
        per_token: Duration,
    },
    /// Every `every`-th request gets a 500; the others are fast.
    Flaky {
        /// Period of failures.
        every: u64,
    },
    /// Every request gets 429 with `Retry-After: secs`.
    RateLimited {
        /// The header's value.
        secs: u64,
    },
    /// Streams `tokens` tokens, then stops writing without closing.
    HangAfter {
        /// Tokens before the hang.
        tokens: usize,
    },
    /// Streams events that are not JSON.
    GarbageSse,
    /// Closes the connection after `tokens` tokens of a stream.
    DieAfter {
        /// Tokens before the close.
        tokens: usize,
    },
    /// Streams `tokens` tokens, then one event that never ends: `data: `
    /// and `x`s, 64 KiB at a time, up to 256 MiB or until the client leaves.
    EndlessEvent {
        /// Tokens before the endless event.
        tokens: usize,
    },
    /// Every request gets this status line, extra headers (each ending in
    /// CRLF) and body: a redirect, or an error with a body of its own.
    Fixed {
        /// For example `307 Temporary Redirect`.
        status: String,
        /// For example `location: http://.../v1/chat/completions\r\n`.
        headers: String,
        /// The body.
        body: String,
    },
}

/// A running mock; stops accepting when dropped.
pub struct MockUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl MockUpstream {
    /// Starts a mock on a free loopback port.
    pub fn start(behaviour: Behaviour) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                // Small writes go out at once, as a real server's would.
                let _ = conn.set_nodelay(true);
                let (behaviour, count) = (behaviour.clone(), count.clone());
                std::thread::spawn(move || serve(conn, &behaviour, &count));
            }
        });
        MockUpstream {
            addr,
            requests,
            stop,
        }
    }

    /// The base URL, ending in `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Completion requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// One request: its path, its body, and whether the client asked to close.
struct Request {
    path: String,
    body: String,
    close: bool,
}

/// Reads one request.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1)?.to_owned();
    let mut length = 0usize;
    let mut close = false;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
            if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        path,
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
    })
}

fn respond(conn: &mut TcpStream, status: &str, extra: &str, body: &str) -> bool {
    write!(
        conn,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .is_ok()
}

fn chunk(conn: &mut TcpStream, data: &str) -> bool {
    let frame = format!("data: {data}\n\n");
    write!(conn, "{:x}\r\n{frame}\r\n", frame.len()).is_ok() && conn.flush().is_ok()
}

/// One chunk of the chunked body holding `bytes` as they are (no SSE
/// framing).
fn chunk_raw(conn: &mut TcpStream, bytes: &str) -> bool {
    write!(conn, "{:x}\r\n{bytes}\r\n", bytes.len()).is_ok() && conn.flush().is_ok()
}

fn token_chunk(i: usize) -> String {
    format!(
        r#"{{"id":"mock","object":"chat.completion.chunk","created":0,"model":"mock","choices":[{{"index":0,"delta":{{"content":"t{i} "}},"finish_reason":null}}]}}"#
    )
}

fn serve(conn: TcpStream, behaviour: &Behaviour, count: &AtomicU64) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    while let Some(req) = read_request(&mut reader) {
        if !serve_one(&mut writer, &req, behaviour, count) || req.close {
            return;
        }
    }
}

/// Answers one request; `false` when the connection must end.
fn serve_one(
    writer: &mut TcpStream,
    req: &Request,
    behaviour: &Behaviour,
    count: &AtomicU64,
) -> bool {
    if req.path.ends_with("/models") {
        return respond(
            writer,
            "200 OK",
            "",
            r#"{"object":"list","data":[{"id":"mock","object":"model","created":0,"owned_by":"mock"}]}"#,
        );
    }
    if req.path.ends_with("/health") {
        return respond(writer, "200 OK", "", r#"{"status":"ok"}"#);
    }
    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
    let stream = req.body.contains("\"stream\":true") || req.body.contains("\"stream\": true");
    let (tokens, delay) = match *behaviour {
        Behaviour::Fast { tokens } => (tokens, Duration::ZERO),
        Behaviour::Slow { tokens, per_token } => (tokens, per_token),
        Behaviour::Flaky { every } => {
            if n.is_multiple_of(every.max(1)) {
                return respond(
                    writer,
                    "500 Internal Server Error",
                    "",
                    r#"{"error":{"message":"upstream secret detail","type":"server_error"}}"#,
                );
            }
            (4, Duration::ZERO)
        }
        Behaviour::RateLimited { secs } => {
            return respond(
                writer,
                "429 Too Many Requests",
                &format!("retry-after: {secs}\r\n"),
                r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#,
            );
        }
        Behaviour::HangAfter { tokens }
        | Behaviour::DieAfter { tokens }
        | Behaviour::EndlessEvent { tokens } => (tokens, Duration::ZERO),
        Behaviour::GarbageSse => (0, Duration::ZERO),
        Behaviour::Fixed {
            ref status,
            ref headers,
            ref body,
        } => return respond(writer, status, headers, body),
    };
    if !stream {
        std::thread::sleep(delay * tokens as u32);
        let text: String = (0..tokens).map(|i| format!("t{i} ")).collect();
        let answer = format!(
            r#"{{"id":"mock","object":"chat.completion","created":0,"model":"mock","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"length"}}],"usage":{{"prompt_tokens":1,"completion_tokens":{tokens},"total_tokens":{}}}}}"#,
            tokens + 1
        );
        return respond(writer, "200 OK", "", &answer);
    }
    if write!(
        writer,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    if *behaviour == Behaviour::GarbageSse {
        return chunk(writer, "this is not json") && write!(writer, "0\r\n\r\n").is_ok();
    }
    for i in 0..tokens {
        std::thread::sleep(delay);
        if !chunk(writer, &token_chunk(i)) {
            return false;
        }
    }
    match behaviour {
        Behaviour::HangAfter { .. } => {
            // Silent but open, until the client gives up.
            std::thread::sleep(Duration::from_secs(3600));
            return false;
        }
        Behaviour::DieAfter { .. } => return false,
        Behaviour::EndlessEvent { .. } => {
            let filler = "x".repeat(64 << 10);
            if !chunk_raw(writer, "data: ") {
                return false;
            }
            for _ in 0..(256 << 20) / filler.len() {
                if !chunk_raw(writer, &filler) {
                    return false;
                }
            }
            return false;
        }
        _ => {}
    }
    let usage = format!(
        r#"{{"id":"mock","object":"chat.completion.chunk","created":0,"model":"mock","choices":[{{"index":0,"delta":{{}},"finish_reason":"length"}}],"usage":{{"prompt_tokens":1,"completion_tokens":{tokens},"total_tokens":{}}}}}"#,
        tokens + 1
    );
    chunk(writer, &usage) && chunk(writer, "[DONE]") && write!(writer, "0\r\n\r\n").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{post_json, request};
    use serde_json::json;

    fn chat(m: &MockUpstream, stream: bool) -> crate::http::Response {
        post_json(
            m.addr,
            "/v1/chat/completions",
            &json!({"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": stream}),
        )
    }

    #[test]
    fn fast_answers_collected_and_streamed() {
        let m = MockUpstream::start(Behaviour::Fast { tokens: 3 });
        let r = chat(&m, false);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["usage"]["completion_tokens"], 3);
        let s = chat(&m, true).text();
        assert_eq!(s.matches("\"content\":\"t").count(), 3);
        assert!(s.contains("data: [DONE]"));
        assert_eq!(m.requests(), 2);
        assert_eq!(
            request(m.addr, "GET", "/v1/models", None).json()["data"][0]["id"],
            "mock"
        );
    }

    #[test]
    fn faults_happen_as_configured() {
        let flaky = MockUpstream::start(Behaviour::Flaky { every: 2 });
        let statuses: Vec<u16> = (0..4).map(|_| chat(&flaky, false).status).collect();
        assert_eq!(statuses, vec![200, 500, 200, 500]);
        let limited = MockUpstream::start(Behaviour::RateLimited { secs: 7 });
        let r = chat(&limited, false);
        assert_eq!((r.status, r.header("retry-after")), (429, Some("7")));
        let dying = MockUpstream::start(Behaviour::DieAfter { tokens: 2 });
        let s = chat(&dying, true).text();
        assert_eq!(s.matches("\"content\"").count(), 2);
        assert!(!s.contains("[DONE]"));
        let garbage = MockUpstream::start(Behaviour::GarbageSse);
        assert!(chat(&garbage, true)
            .text()
            .contains("data: this is not json"));
    }

    #[test]
    fn a_hanging_stream_stays_open_and_silent() {
        let m = MockUpstream::start(Behaviour::HangAfter { tokens: 2 });
        let body = json!({"model": "mock", "messages": [], "stream": true}).to_string();
        let mut conn = TcpStream::connect(m.addr).unwrap();
        write!(
            conn,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        let err = loop {
            match conn.read(&mut buf) {
                Ok(0) => panic!("closed"),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert!(matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ));
        assert_eq!(
            String::from_utf8_lossy(&seen)
                .matches("\"content\"")
                .count(),
            2
        );
    }
}
