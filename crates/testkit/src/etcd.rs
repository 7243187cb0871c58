//! Real `etcd` processes for tests: one member ([`EtcdServer`]) or a cluster
//! ([`EtcdCluster`]), on free loopback ports, with their data in a temporary
//! directory, killed when dropped.
//!
//! Every port is passed explicitly (Debian's `etcd-server` package runs a
//! system service on 2379). A server is ready when its `/health` endpoint
//! answers `{"health":"true"}`, which needs an elected leader. Its log goes to
//! `etcd.log` in its directory and is printed when it fails to become ready.
//!
//! A server can be stopped, killed, restarted on the same data (the
//! registrations and revisions survive) and restarted wiped (a fresh data
//! directory: the data loss of a badly run etcd, whose revisions start again
//! from 1).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{free_port, require_binary, wait_until, ChildGuard};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name no other server of this machine uses.
fn unique_name() -> String {
    format!(
        "ep-etcd-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// One etcd member: its flags, its directory and, while it runs, its process.
#[derive(Debug)]
pub struct EtcdServer {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// `name=peer-url,...` of the whole cluster.
    initial_cluster: String,
    cluster_token: String,
    dir: tempfile::TempDir,
    child: Option<ChildGuard>,
}

impl EtcdServer {
    /// Starts a one-member cluster and waits until it is ready.
    pub fn start() -> Self {
        let mut server = Self::configure(free_port(), free_port(), None, &unique_name());
        server.spawn();
        server.wait_ready();
        server
    }

    /// A member of the cluster `initial_cluster` (not started).
    fn configure(
        client_port: u16,
        peer_port: u16,
        cluster: Option<(&str, &str)>,
        name: &str,
    ) -> Self {
        let own = format!("{name}=http://127.0.0.1:{peer_port}");
        let (initial_cluster, cluster_token) = match cluster {
            Some((members, token)) => (members.to_owned(), token.to_owned()),
            None => (own, format!("{name}-token")),
        };
        Self {
            name: name.to_owned(),
            client_port,
            peer_port,
            initial_cluster,
            cluster_token,
            dir: tempfile::Builder::new()
                .prefix("ep-etcd-")
                .tempdir()
                .expect("create a temporary directory for etcd"),
            child: None,
        }
    }

    /// The URL clients connect to: `http://127.0.0.1:<port>`.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The member's name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The data directory (`--data-dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Whether the process runs (started and not stopped or killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The last lines of the server's log (every incarnation's).
    pub fn log_tail(&self) -> String {
        crate::log_tail(&self.log_path())
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "etcd {} already runs", self.name);
        let etcd = require_binary("etcd", "etcd-server");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the etcd log");
        let err_log = log.try_clone().expect("clone the etcd log handle");
        let client = self.client_url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.cluster_token])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        // The server reads ETCD_* variables as flags: keep the test's own
        // (ETCD_ENDPOINTS, ...) away from it.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(var);
            }
        }
        // etcd 3.4 refuses to start on an architecture it does not support
        // officially unless told to; amd64 needs nothing.
        let goarch = match std::env::consts::ARCH {
            "x86_64" => None,
            "aarch64" => Some("arm64"),
            "x86" => Some("386"),
            other => Some(other),
        };
        if let Some(arch) = goarch {
            cmd.env("ETCD_UNSUPPORTED_ARCH", arch);
        }
        self.child = Some(ChildGuard::spawn(&format!("etcd {}", self.name), &mut cmd));
    }

    /// Waits until `/health` says so; panics with the log's tail if the
    /// process exits or the wait times out.
    fn wait_ready(&self) {
        let pid = self.child.as_ref().and_then(ChildGuard::pid);
        let port = self.client_port;
        let what = format!("etcd {} on port {port}", self.name);
        wait_until(&what, &self.log_path(), || match pid {
            Some(pid) if !process_alive(pid) => Err("it exited".into()),
            _ => Ok(healthy(port)),
        });
    }

    /// Stops the server gracefully (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.stop();
        }
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts the server again on the same data directory and ports (stopping
    /// it first if it runs) and waits until it is ready. In a cluster, the
    /// member is ready once a leader is elected.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready();
    }

    /// Restarts the server with its data directory emptied: every key, lease
    /// and revision is gone. For a one-member cluster only.
    pub fn restart_wiped(&mut self) {
        self.stop();
        let data = self.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data).expect("remove etcd's data directory");
        }
        self.spawn();
        self.wait_ready();
    }

    /// Starts a member previously stopped, without waiting (a cluster member
    /// is only healthy once a quorum runs).
    fn start_unready(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }
}

/// A cluster of etcd members on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one is ready.
    pub fn start(n: usize) -> Self {
        assert!(n > 0, "a cluster has members");
        let base = unique_name();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let names: Vec<String> = (0..n).map(|i| format!("{base}-m{i}")).collect();
        let initial = names
            .iter()
            .zip(&ports)
            .map(|(name, (_, peer))| format!("{name}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("{base}-token");
        let mut members: Vec<EtcdServer> = names
            .iter()
            .zip(&ports)
            .map(|(name, &(client, peer))| {
                EtcdServer::configure(client, peer, Some((&initial, &token)), name)
            })
            .collect();
        // All at once: each member waits for the others to elect a leader.
        for m in &mut members {
            m.start_unready();
        }
        for m in &members {
            m.wait_ready();
        }
        Self { members }
    }

    /// Every member's client URL.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::client_url).collect()
    }

    /// Member `i`.
    pub fn member(&self, i: usize) -> &EtcdServer {
        &self.members[i]
    }

    /// Member `i`, to stop, kill or restart it.
    pub fn member_mut(&mut self, i: usize) -> &mut EtcdServer {
        &mut self.members[i]
    }

    /// Stops member `i` gracefully (SIGTERM).
    pub fn stop_member(&mut self, i: usize) {
        self.members[i].stop();
    }
}

/// True when etcd on loopback `port` answers `GET /health` with
/// `"health":"true"`.
pub fn healthy(port: u16) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut s =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(1000)))?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body.contains("\"health\":\"true\""))
    };
    probe().unwrap_or(false)
}

/// Whether `pid` runs (exists and is not a zombie waiting to be reaped).
fn process_alive(pid: u32) -> bool {
    let stat = Path::new("/proc").join(pid.to_string()).join("stat");
    match std::fs::read_to_string(stat) {
        // The state follows the command name in parentheses, which may
        // itself contain spaces or parentheses.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
