//! Connection limits against a real `neocloud serve` on loopback: request
//! heads and bodies have deadlines (which also close idle connections),
//! the number of connections is capped, the open-file limit is raised at
//! start, and a stream nobody reads is cancelled, and metered.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use neocloud_testkit::http::{exchange, request, Server};
use serde_json::{json, Value};

const GEMMA: &str = "gemma-3-270m";

/// Whether the server has closed `conn` (a read sees the end, or a reset).
fn closed_by_server(mut conn: &TcpStream) -> bool {
    conn.set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let mut byte = [0u8; 1];
    match conn.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(_) => true,
    }
}

/// A client that connects and says nothing, and one that sends half a
/// request head, both stayed open for as long as they liked. Now the head
/// deadline closes both.
#[test]
fn idle_and_half_sent_connections_are_closed_at_the_head_deadline() {
    let server = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--model", GEMMA, "--header-timeout-secs", "1"],
    );
    let mut conns: Vec<TcpStream> = Vec::new();
    for i in 0..40 {
        let mut conn = TcpStream::connect(server.addr).unwrap();
        if i % 2 == 1 {
            conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n")
                .unwrap();
        }
        conns.push(conn);
    }
    // A keep-alive connection left idle after an answer is closed too.
    let mut kept = TcpStream::connect(server.addr).unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(kept.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.contains("200"), "{status}");
    conns.push(kept);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open = conns.iter().filter(|c| !closed_by_server(c)).count();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} connections still open 30 s after a 1 s head deadline"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(request(server.addr, "GET", "/health", None).status, 200);
}

/// A body that stops arriving gets a 408 in OpenAI's shape.
#[test]
fn a_body_that_stops_arriving_gets_408() {
    let server = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--model", GEMMA, "--body-timeout-secs", "1"],
    );
    let resp = exchange(
        server.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    );
    assert_eq!(resp.status, 408, "{}", resp.text());
    let err = resp.json()["error"].clone();
    assert_eq!(err["type"], "request_timeout", "{err}");
    assert!(err["message"].as_str().unwrap().contains("1 s"), "{err}");
}

/// Past the cap, a new client waits (and the server says so in its log)
/// until a connection closes; it is then served.
#[test]
fn past_the_connection_cap_new_clients_wait_for_a_place() {
    let log = std::env::temp_dir().join(format!("nc-conn-cap-{}.log", std::process::id()));
    let server = Server::start_with(
        env!("CARGO_BIN_EXE_neocloud"),
        &[
            "--model",
            GEMMA,
            "--max-connections",
            "3",
            "--header-timeout-secs",
            "120",
        ],
        &[],
        std::fs::File::create(&log).unwrap(),
    );
    // Start's health checks have closed their connections; three idle ones
    // now take every place.
    std::thread::sleep(Duration::from_millis(300));
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let addr = server.addr;
    let waiting = std::thread::spawn(move || request(addr, "GET", "/health", None).status);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!waiting.is_finished(), "served past the connection cap");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("connection limit reached"), "{text}");
    idle.pop();
    assert_eq!(waiting.join().unwrap(), 200);
    drop(idle);
}

/// The soft limit on open files is raised to the hard one at start, so a
/// low default (1,024 on many systems) does not lock clients out.
#[test]
fn the_open_file_limit_is_raised_at_start() {
    let hard: u64 = String::from_utf8(
        Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap_or(u64::MAX);
    if hard <= 512 {
        eprintln!("SKIPPED: the hard open-file limit here ({hard}) leaves nothing to raise");
        return;
    }
    let mut child = Command::new("sh")
        .args([
            "-c",
            "ulimit -Sn 512 && exec \"$0\" serve --host 127.0.0.1 --port 0 --model gemma-3-270m",
            env!("CARGO_BIN_EXE_neocloud"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let row = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = row.split_whitespace().collect();
    let soft: u64 = fields[3].parse().unwrap();
    assert!(soft > 512, "the soft limit stayed low: {row}");
    assert_eq!(fields[3], fields[4], "{row}");
}

/// A streaming client that never reads once kept its request running to
/// the end, its events piling up. Past the write timeout the request is
/// cancelled, and what it generated until then is metered.
#[test]
fn a_stream_nobody_reads_is_cancelled_and_metered() {
    let usage = std::env::temp_dir().join(format!("nc-noread-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&usage);
    let server = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &[
            "--model",
            GEMMA,
            "--write-timeout-secs",
            "2",
            "--usage-log",
            usage.to_str().unwrap(),
        ],
    );
    // Wide events (20 alternatives per token, four choices) fill the
    // socket buffers soon.
    let max_tokens = 3000;
    let body = json!({
        "model": GEMMA,
        "messages": [{"role": "user", "content": "Count to a million."}],
        "max_tokens": max_tokens, "n": 4, "logprobs": true, "top_logprobs": 20,
        "ignore_eos": true, "temperature": 0, "stream": true,
    });
    let conn = neocloud_testkit::http::send_chat(server.addr, &body);
    let deadline = Instant::now() + Duration::from_secs(300);
    let record: Value = loop {
        let records = std::fs::read_to_string(&usage).unwrap_or_default();
        if let Some(line) = records.lines().next() {
            break serde_json::from_str(line).unwrap();
        }
        assert!(Instant::now() < deadline, "the request never ended");
        std::thread::sleep(Duration::from_millis(250));
    };
    drop(conn);
    assert_eq!(record["finish_reason"], "abort", "{record}");
    let completion = record["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0, "{record}");
    assert!(completion < 4 * max_tokens, "{record}");
    assert!(record["prompt_tokens"].as_u64().unwrap() > 0, "{record}");
    // The engine is free again.
    assert_eq!(
        neocloud_testkit::http::post_json(
            server.addr,
            "/v1/chat/completions",
            &json!({"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
        )
        .status,
        200
    );
}

/// The value of `neocloud:open_connections`, read on a connection of its
/// own (which counts itself).
fn open_connections(addr: std::net::SocketAddr) -> u64 {
    let text = request(addr, "GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix("neocloud:open_connections "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A client that asks for a large answer and never reads it once held its
/// connection, and its place under the cap, for as long as it liked. A
/// write that makes no progress for the write timeout closes it.
#[test]
fn an_answer_nobody_reads_closes_its_connection_at_the_write_timeout() {
    let server = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &[
            "--model",
            GEMMA,
            "--write-timeout-secs",
            "2",
            // Long enough that only the write timeout can close it.
            "--header-timeout-secs",
            "600",
            "--body-limit",
            "8000000",
        ],
    );
    // Tokenising 4 MB of words answers with several MB of token ids, more
    // than the sockets' buffers hold.
    let body = json!({"model": GEMMA, "prompt": "one two three four ".repeat(200_000)}).to_string();
    // A small receive buffer, set before the connection is made (it sizes
    // the window): the answer stays in the server's socket, whose writes
    // then make no progress.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut conn: TcpStream = socket.into();
    write!(
        conn,
        "POST /tokenize HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    // The server has read the whole body (the write above returned), so
    // ours is open until its answer stalls for the write timeout. (A
    // previous asking connection may still be closing: it can only make
    // the count higher, never lower.)
    while open_connections(server.addr) > 1 {
        assert!(
            Instant::now() < deadline,
            "the unread answer still holds its connection"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        closed_after_reading(&mut conn),
        "the connection is still open"
    );
    drop(conn);
}

/// Whether the server has closed `conn`, once what it sent is read.
fn closed_after_reading(conn: &mut TcpStream) -> bool {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}
