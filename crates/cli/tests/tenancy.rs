//! Tenants and keys through the real binary: `neocloud tenants` and
//! `neocloud keys` write a real database (a SQLite file, and PostgreSQL
//! when `NEOCLOUD_TEST_DATABASE_URL` names one), and `neocloud serve` over
//! it lets in only valid keys, each to its own models (RELIABILITY row 13:
//! another tenant's models are 404), with the tenant in every usage record
//! and no secret in the log.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

use neocloud_testkit::http::{request_with_headers, Response, Server};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_neocloud");
const GEMMA: &str = "gemma-3-270m";

/// The databases to run on: a fresh SQLite file, and PostgreSQL when
/// configured.
fn databases(name: &str) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("nc-tenancy-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut out = vec![format!("sqlite:{}", dir.join("neocloud.db").display())];
    match std::env::var("NEOCLOUD_TEST_DATABASE_URL") {
        Ok(url) => out.push(url),
        Err(_) => eprintln!(
            "SKIPPED on PostgreSQL: NEOCLOUD_TEST_DATABASE_URL is not set (.ci/run sets it)"
        ),
    }
    out
}

/// Runs `neocloud ARGS` on `database`; its standard output, or a panic with
/// its error.
fn neocloud(database: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("NEOCLOUD_DATABASE_URL", database)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "neocloud {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn unique(base: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{base}-{}-{}", std::process::id(), t % 1_000_000_000)
}

fn call(
    server: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Response {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let body = body.map(|b| b.to_string());
    request_with_headers(
        server.addr,
        method,
        path,
        &headers,
        body.as_deref().map(str::as_bytes),
    )
}

/// The ledger's rows of `tenant`, read from the database.
fn ledger_rows(database: &str, tenant: &str) -> Vec<neocloud_tenancy::ledger::LedgerRow> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = neocloud_tenancy::Store::open(database).await.unwrap();
        let rows = store.ledger_rows(Some(tenant)).await.unwrap();
        store.close().await;
        rows
    })
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
}

#[test]
fn only_valid_keys_get_in_each_to_its_own_models() {
    for database in databases("keys") {
        let (acme, beta) = (unique("acme"), unique("beta"));
        neocloud(
            &database,
            &[
                "tenants",
                "create",
                &acme,
                "--rpm",
                "100",
                "--monthly-budget",
                "25.50",
            ],
        );
        neocloud(&database, &["tenants", "create", &beta]);
        let key = neocloud(
            &database,
            &[
                "keys",
                "create",
                "--tenant",
                &acme,
                "--models",
                GEMMA,
                "--expires",
                "1d",
            ],
        );
        let key = key.trim().to_owned();
        assert!(key.starts_with("nc-"), "{key}");
        let other = neocloud(
            &database,
            &[
                "keys",
                "create",
                "--tenant",
                &beta,
                "--models",
                "qwen2.5-coder-0.5b-instruct",
            ],
        );
        let other = other.trim().to_owned();
        let listed = neocloud(&database, &["keys", "list", "--tenant", &acme]);
        assert!(
            listed.contains(&key[3..19]) && !listed.contains(&key[20..]),
            "{listed}"
        );
        assert!(neocloud(&database, &["tenants", "list"]).contains("25.500000"));

        let dir = std::env::temp_dir().join(unique("nc-tenancy-serve"));
        std::fs::create_dir_all(&dir).unwrap();
        let usage = dir.join("usage.jsonl");
        let log = dir.join("server.log");
        let server = Server::start_with(
            BIN,
            &["--model", GEMMA, "--usage-log", usage.to_str().unwrap()],
            &[("NEOCLOUD_DATABASE_URL", database.as_str())],
            std::fs::File::create(&log).unwrap(),
        );
        // No key, a malformed one, a wrong secret, one wrong in its last
        // byte, one in another case: one 401 for all (RELIABILITY rows 10
        // and 11).
        let wrong = format!("{}{}", &key[..key.len() - 64], "0".repeat(64));
        let last = key.chars().last().unwrap();
        let flipped = format!(
            "{}{}",
            &key[..key.len() - 1],
            if last == 'a' { 'b' } else { 'a' }
        );
        let upper = key.to_uppercase();
        for bad in [
            None,
            Some("sk-not-ours"),
            Some(wrong.as_str()),
            Some(flipped.as_str()),
            Some(upper.as_str()),
        ] {
            let r = call(
                &server,
                "POST",
                "/v1/chat/completions",
                bad,
                Some(&chat(GEMMA)),
            );
            assert_eq!(r.status, 401, "{bad:?}: {}", r.text());
            let err = r.json()["error"].clone();
            assert_eq!(err["code"], "invalid_api_key", "{err}");
            assert!(!r.text().contains(&key[20..]));
        }
        // Probes need no key.
        assert_eq!(call(&server, "GET", "/health", None, None).status, 200);
        // The right key gets in, and its tenant is metered.
        let r = call(
            &server,
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(&chat(GEMMA)),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let models = call(&server, "GET", "/v1/models", Some(&key), None).json();
        assert_eq!(models["data"][0]["id"], GEMMA);
        // Another tenant's key does not see this model at all.
        let r = call(
            &server,
            "POST",
            "/v1/chat/completions",
            Some(&other),
            Some(&chat(GEMMA)),
        );
        assert_eq!(r.status, 404, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "model_not_found");
        let models = call(&server, "GET", "/v1/models", Some(&other), None).json();
        assert_eq!(models["data"], json!([]));
        let r = call(
            &server,
            "POST",
            "/tokenize",
            Some(&other),
            Some(&json!({"model": GEMMA, "prompt": "hi"})),
        );
        assert_eq!(r.status, 404, "{}", r.text());
        // Revoked, then refused.
        neocloud(&database, &["keys", "revoke", &key[3..19]]);
        let r = call(
            &server,
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(&chat(GEMMA)),
        );
        assert_eq!(r.status, 401, "{}", r.text());
        // SIGTERM: the ledger is flushed before the process exits.
        let status = Command::new("kill")
            .args(["-TERM", &server.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(server.wait(), Some(0));
        let ledger = ledger_rows(&database, &acme);
        assert_eq!(ledger.len(), 1, "{ledger:?}");
        assert_eq!(ledger[0].status, 200);
        assert_eq!(ledger[0].key_id.as_deref(), Some(&key[3..19]));
        assert!(ledger[0].completion_tokens > 0 && ledger[0].energy_millijoules > 0);
        let ledger = ledger_rows(&database, &beta);
        assert_eq!(ledger.len(), 1, "{ledger:?}");
        assert_eq!(ledger[0].status, 404);

        let records: Vec<Value> = neocloud_testkit::json_lines(&usage);
        let served: Vec<&Value> = records.iter().filter(|r| r["status"] == 200).collect();
        assert_eq!(served.len(), 1, "{records:?}");
        assert_eq!(served[0]["tenant"], json!(acme));
        assert_eq!(served[0]["key_id"], json!(&key[3..19]));
        let refused: Vec<&Value> = records.iter().filter(|r| r["status"] == 404).collect();
        assert_eq!(refused.len(), 1, "{records:?}");
        assert_eq!(refused[0]["tenant"], json!(beta));
        // No secret in the log.
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !text.contains(&key[20..]) && !text.contains(&other[20..]),
            "{text}"
        );
        assert!(text.contains("API keys required"), "{text}");
    }
}

/// With no tenant, a loopback server needs no key (and says so); any other
/// address refuses to start unless told to serve anonymously.
#[test]
fn without_tenants_only_loopback_serves_without_keys() {
    let dir = std::env::temp_dir().join(unique("nc-tenancy-anon"));
    std::fs::create_dir_all(&dir).unwrap();
    let database = format!("sqlite:{}", dir.join("empty.db").display());
    let out = Command::new(BIN)
        .args([
            "serve", "--host", "0.0.0.0", "--port", "0", "--model", GEMMA,
        ])
        .env("NEOCLOUD_DATABASE_URL", &database)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--allow-anonymous"), "{stderr}");

    let log = dir.join("server.log");
    let server = Server::start_with(
        BIN,
        &["--model", GEMMA],
        &[("NEOCLOUD_DATABASE_URL", database.as_str())],
        std::fs::File::create(&log).unwrap(),
    );
    let r = call(
        &server,
        "POST",
        "/v1/chat/completions",
        None,
        Some(&chat(GEMMA)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("no tenant defined"), "{text}");
}

/// A tenancy database that cannot be reached at start is a clear error,
/// not a server that answers unmetered (RELIABILITY row 28).
#[test]
fn an_unreachable_database_stops_the_start_with_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://neocloud:hunter2@127.0.0.1:{port}/nowhere");
    let out = Command::new(BIN)
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            GEMMA,
        ])
        .env("NEOCLOUD_DATABASE_URL", &url)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("opening the tenancy database"), "{stderr}");
    // The password is not shown.
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
