//! Helpers for tests that run the real `eventplane` binary: a child process
//! whose stdout JSON lines arrive on a channel, killed when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long any one expected line may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// Runs `eventplane ARGS` to completion (logging warnings only) and returns
/// its output; fails the test, with the process's stderr, if it failed.
pub fn run_ok<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args(args)
        .env("EVENTPLANE_LOG", "warn")
        .output()
        .expect("the eventplane binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A running `eventplane` process.
pub struct Proc {
    pub name: String,
    pub child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Proc {
    /// Starts `eventplane ARGS` with the file discovery backend in `dir`.
    pub fn start(name: &str, dir: &Path, args: &[&str]) -> Proc {
        Self::start_with_env(name, dir, args, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub fn start_with_env(name: &str, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_eventplane"));
        cmd.args(args)
            .env("DYN_DISCOVERY_BACKEND", "file")
            .env("DYN_DISCOVERY_DIR", dir)
            .env("DYN_EVENT_PLANE", "zmq")
            .env("EVENTPLANE_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(name, &mut cmd)
    }

    /// Starts any command whose stdout is JSON lines.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        Self::spawn_with_stdin(name, cmd.stdin(Stdio::null()))
    }

    /// Like [`spawn`](Self::spawn), with stdin piped for [`send`](Self::send).
    pub fn spawn_interactive(name: &str, cmd: &mut Command) -> Proc {
        Self::spawn_with_stdin(name, cmd.stdin(Stdio::piped()))
    }

    /// Writes one line to the process's stdin (see
    /// [`spawn_interactive`](Self::spawn_interactive)).
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin piped");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot write to stdin: {e}", self.name));
    }

    fn spawn_with_stdin(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => panic!("{tag}: stdout line is not JSON ({e}): {line}"),
                }
            }
        });
        Proc {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    /// The next stdout line, waiting at most [`WAIT`].
    pub fn next_line(&self) -> serde_json::Value {
        self.lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("{}: no output line within {WAIT:?}: {e}", self.name))
    }

    /// Reads lines until one matches `pred`; returns it. Lines skipped on the
    /// way are passed to `seen`.
    pub fn until(
        &self,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
        mut seen: impl FnMut(&serde_json::Value),
    ) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|e| {
                panic!("{}: expected line not seen within {WAIT:?}: {e}", self.name)
            });
            if pred(&line) {
                return line;
            }
            seen(&line);
        }
    }

    /// Reads the next line of the given `type`, skipping others.
    pub fn until_type(&self, ty: &str) -> serde_json::Value {
        self.until(|l| l["type"] == ty, |_| {})
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: sending a signal to our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Waits for the process to exit; panics if it takes longer than [`WAIT`].
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workspace's root directory.
pub fn workspace_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The Python interpreter for interop tests, checked to import `modules`:
/// `$EVENTPLANE_PYTHON`, else `<root>/.venv/bin/python` (created by
/// `scripts/test.sh`). `None` (skip) when there is none, except under `CI`,
/// where a missing interpreter or module fails the test.
pub fn python(root: &Path, modules: &[&str]) -> Option<std::path::PathBuf> {
    let venv = root.join(".venv/bin/python");
    let python = match std::env::var_os("EVENTPLANE_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => std::path::PathBuf::from(p),
        None if venv.exists() => venv,
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "no Python for the interop test: set EVENTPLANE_PYTHON or run scripts/test.sh \
                 (which creates {} with pyzmq, msgpack and msgspec)",
                venv.display()
            );
            eprintln!("skipped: no venv (run scripts/test.sh)");
            return None;
        }
    };
    let import = format!("import {}", modules.join(", "));
    let ok = Command::new(&python)
        .args(["-c", &import])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        ok.success(),
        "{} cannot `{import}`: run scripts/test.sh (or pip install the packages)",
        python.display()
    );
    Some(python)
}

/// A subscriber to the `dynamo/backend` KV events over ZMQ with file
/// discovery in `dir`, returned once it has joined `publishers` publishers
/// (their welcome heartbeats), so nothing they publish afterwards is missed.
/// The plane is returned too: it must outlive the subscriber.
pub async fn kv_events_joined(
    dir: &Path,
    publishers: usize,
) -> (
    eventplane::EventPlane,
    eventplane::Subscriber<eventplane_kv::event::KvEventBatch>,
) {
    use eventplane::{Config, DiscoveryKind, Event, EventPlane, Notice, Scope, TransportKind};
    let plane = EventPlane::start(Config {
        transport: TransportKind::Zmq,
        discovery: DiscoveryKind::File,
        discovery_dir: Some(dir.to_path_buf()),
        ..Config::default()
    })
    .await
    .expect("event plane");
    let channel = Scope::new("dynamo", "backend")
        .and_then(|s| s.channel(eventplane_kv::event::KV_EVENTS_TOPIC))
        .expect("channel");
    let mut sub = plane.subscriber(&channel).await.expect("subscriber");
    let mut joined = 0;
    tokio::time::timeout(WAIT, async {
        while joined < publishers {
            match sub.recv().await {
                Some(Event::Notice(Notice::Joined { .. })) => joined += 1,
                Some(_) => {}
                None => panic!("KV event subscription ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("joined {joined} of {publishers} KV publishers within {WAIT:?}"));
    (plane, sub)
}

/// The arguments of an `eventplane publish` that sends `count` load reports
/// at `rate` per second on `dynamo/workers/load` as publisher `id`, once one
/// subscriber has joined, and stays up afterwards.
pub fn load_publisher_args(id: u64, count: u64, rate: u64) -> Vec<String> {
    [
        "publish",
        "-c",
        "workers",
        "-t",
        "load",
        "--publisher-id",
        &id.to_string(),
        "--value",
        r#"{"blocks_used":7}"#,
        "--count",
        &count.to_string(),
        "--rate",
        &rate.to_string(),
        "--wait-subscribers",
        "1",
        "--hold",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The value of an un-labelled metric in an OpenMetrics text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// GETs `url` and parses the answer as JSON (panics on any failure: a test
/// helper).
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// GETs `url` and returns the body as text (a `/metrics` page, say).
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// POSTs `body` as JSON to `url` and parses the answer as JSON.
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    client
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Sends a 2-token completion to a frontend at `url`: (HTTP status, the
/// worker that served it, its cached prefix blocks), from the frontend's
/// `x-eventplane-*` headers. A 200 must carry the 2 tokens asked for.
pub async fn complete(client: &reqwest::Client, url: &str, prompt: &str) -> (u16, u64, u64) {
    let r = client
        .post(format!("{url}/v1/completions"))
        .json(&serde_json::json!({"prompt": prompt, "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (worker, cached) = (
        header("x-eventplane-worker"),
        header("x-eventplane-cached-blocks"),
    );
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        status != 200 || body["usage"]["completion_tokens"] == 2,
        "{body}"
    );
    (status, worker, cached)
}

/// Waits for a frontend's `ready` line and for `workers` workers to have
/// joined it, both as routable workers and on its KV event stream: (its
/// URL, their ids).
pub fn frontend_with_workers(
    frontend: &Proc,
    workers: usize,
) -> (String, std::collections::HashSet<u64>) {
    let url = frontend.until_type("ready")["url"]
        .as_str()
        .expect("url in the ready line")
        .to_owned();
    // Routable is not enough: a request answered before the frontend's KV
    // subscriber has joined that worker's event stream stores blocks the
    // router never hears of (they precede the stream it joined, so they are
    // not a gap either). Wait for both.
    let mut joined = std::collections::HashSet::new();
    let mut heard = std::collections::HashSet::new();
    while joined.len() < workers || heard.len() < workers {
        let line = frontend.until(
            |l| l["type"] == "worker_joined" || l["type"] == "kv_events_joined",
            |_| {},
        );
        let id = line["worker_id"].as_u64().expect("worker_id");
        if line["type"] == "worker_joined" {
            joined.insert(id);
        } else {
            heard.insert(id);
        }
    }
    (url, joined)
}
