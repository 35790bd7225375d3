//! The official `openai` Python package against a real `neocloud serve` on
//! loopback: the script in `openai_sdk/compat.py` drives chat (collected
//! and streamed, with usage), completions with echo and log-probabilities,
//! a tool call round trip with Qwen, `models.list()`, and the SDK's error
//! classes for 400, 404, 413 and 503. The package is installed with pip
//! into a virtual environment under the target directory on first run.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use neocloud_testkit::http::Server;

/// The `openai` release the script is checked against.
const OPENAI_PACKAGE: &str = "openai>=1.40,<3";

fn python() -> String {
    std::env::var("NEOCLOUD_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Held while the virtual environment is made: the tests of this file run
/// in parallel and must not both create it.
static VENV_SETUP: Mutex<()> = Mutex::new(());

/// A virtual environment with `openai`, made once and reused.
fn sdk_python() -> PathBuf {
    let _setup = VENV_SETUP
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-sdk-venv");
    let bin = venv.join("bin/python");
    let ready = venv.join(".installed");
    if ready.is_file() {
        return bin;
    }
    let status = Command::new(python())
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(status.success(), "python3 -m venv failed");
    let status = Command::new(&bin)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            OPENAI_PACKAGE,
        ])
        .status()
        .unwrap();
    assert!(status.success(), "pip install {OPENAI_PACKAGE} failed");
    std::fs::write(&ready, OPENAI_PACKAGE).unwrap();
    bin
}

/// Runs the compatibility script against `base_url`, with `api_key` when
/// the server wants one.
fn run_compat_script(python: &Path, base_url: &str, api_key: Option<&str>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk/compat.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(base_url)
        .args(api_key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"));
}

/// A tenant and a key in a fresh database: the database URL and the key.
fn tenant_with_key() -> (String, String) {
    let path =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sdk-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let database = format!("sqlite:{}", path.display());
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_neocloud"))
            .args(args)
            .env("NEOCLOUD_DATABASE_URL", &database)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["tenants", "create", "sdk"]);
    let key = run(&["keys", "create", "--tenant", "sdk"])
        .trim()
        .to_owned();
    (database, key)
}

/// With a tenant's key (and a wrong key is the SDK's AuthenticationError).
#[test]
fn the_official_openai_sdk_works_against_neocloud_serve() {
    let python = sdk_python();
    let (database, key) = tenant_with_key();
    let server = Server::start_with(
        env!("CARGO_BIN_EXE_neocloud"),
        &[
            "--model",
            "qwen2.5-coder-0.5b-instruct",
            "--model",
            "gemma-3-270m",
            "--queue",
            "1",
            "--max-batch",
            "1",
        ],
        &[("NEOCLOUD_DATABASE_URL", database.as_str())],
        std::process::Stdio::inherit(),
    );
    run_compat_script(&python, &format!("http://{}/v1", server.addr), Some(&key));
}

/// The same script through the fleet gateway, whose pools are the
/// in-process engine: the SDK cannot tell the difference.
#[test]
fn the_official_openai_sdk_works_through_the_fleet_gateway() {
    let python = sdk_python();
    let config = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-fleet.toml");
    std::fs::write(
        &config,
        r#"
queue = 1
max_batch = 1

[[pool]]
name = "qwen-cpu"
model = "qwen2.5-coder-0.5b-instruct"
accelerator = "cpu"
count = 2
upstreams = ["engine:qwen2.5-coder-0.5b-instruct"]

[[pool]]
name = "gemma-cpu"
model = "gemma-3-270m"
accelerator = "cpu"
count = 2
upstreams = ["engine:gemma-3-270m"]
"#,
    )
    .unwrap();
    let gateway = Server::start(
        env!("CARGO_BIN_EXE_neocloud"),
        &["--config", config.to_str().unwrap()],
    );
    run_compat_script(&python, &format!("http://{}/v1", gateway.addr), None);
}
