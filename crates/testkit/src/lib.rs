//! # eventplane-testkit
//!
//! Integration tests run against real servers, never mocks. This crate starts
//! them: [`nats`] (a `nats-server`, or a cluster of them) and [`etcd`] (one
//! member or a cluster), each on free loopback ports with its data in a
//! temporary directory, and stops them when dropped.
//!
//! The binaries come from the system (`scripts/test.sh` installs Debian's
//! `nats-server` and `etcd-server` when missing); a missing one fails the test
//! with a message that says so.

pub mod etcd;
pub mod nats;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long a server may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A loopback TCP port that was free a moment ago (bound to port 0, then
/// released). Servers get every port explicitly from here: 4222 and 2379 may
/// be taken by a system service.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// The path of a system binary: on `PATH`, else in `/usr/sbin` or
/// `/usr/bin` (Debian puts `nats-server` in `/usr/sbin`, which a user's
/// `PATH` may lack).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The path of a system binary, or a panic telling how to install it.
pub fn require_binary(name: &str, package: &str) -> PathBuf {
    find_binary(name).unwrap_or_else(|| {
        panic!("`{name}` is not installed; scripts/test.sh installs it (apt-get install {package})")
    })
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd`, named `name` in panics.
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    /// A guard with no process yet (to be replaced by a spawned one).
    pub fn not_started(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            child: None,
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` and, for a fatal one, reaps the process.
    pub fn signal(&mut self, signal: i32) {
        if let Some(child) = &mut self.child {
            // SAFETY: kill(2) on a pid we own and have not reaped.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Kills (SIGKILL) and reaps the process. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process gracefully (SIGTERM), waiting for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => return,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                }
            }
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `ready` every 20 ms until it returns `Ok(true)`. Panics, with
/// `what` and the last lines of the server's `log`, when `ready` returns an
/// error (the server exited, say) or after [`READY_TIMEOUT`].
pub fn wait_until(what: &str, log: &Path, mut ready: impl FnMut() -> Result<bool, String>) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let failure = match ready() {
            Ok(true) => return,
            Ok(false) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Ok(false) => format!("not ready within {READY_TIMEOUT:?}"),
            Err(e) => e,
        };
        panic!(
            "{what}: {failure}; the last lines of its log ({}):\n{}",
            log.display(),
            log_tail(log)
        );
    }
}

/// The last 40 lines of a log file (empty if it cannot be read).
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// True when something accepts TCP connections on loopback `port`.
pub fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}
