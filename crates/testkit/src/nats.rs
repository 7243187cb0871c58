//! A real `nats-server` on loopback ([`NatsServer`]), or a cluster of them
//! ([`NatsCluster`]), each on free ports, with an HTTP monitoring port used to
//! know when it is ready (and, for a cluster, when its routes are up).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{accepts, free_port, require_binary, wait_until, ChildGuard};

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct NatsConfig {
    /// Extra lines of the server's configuration file (e.g.
    /// `max_payload: 1024`, an `authorization { ... }` block, `tls { ... }`).
    pub config: String,
}

/// One `nats-server` process. Killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    child: ChildGuard,
    port: u16,
    monitor: u16,
    cluster_port: Option<u16>,
    routes: Vec<u16>,
    config: NatsConfig,
    dir: tempfile::TempDir,
    name: String,
}

impl NatsServer {
    /// A plain server.
    pub fn start() -> Self {
        Self::start_with(NatsConfig::default())
    }

    /// A server with extra configuration.
    pub fn start_with(config: NatsConfig) -> Self {
        let s = Self::spawn("nats", config, None, Vec::new());
        s.wait_ready(0);
        s
    }

    fn spawn(name: &str, config: NatsConfig, cluster_port: Option<u16>, routes: Vec<u16>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = Self {
            child: ChildGuard::not_started(name),
            port: free_port(),
            monitor: free_port(),
            cluster_port,
            routes,
            config,
            dir,
            name: name.to_owned(),
        };
        s.child = s.launch();
        s
    }

    fn launch(&self) -> ChildGuard {
        let bin = require_binary("nats-server", "nats-server");
        let conf = self.dir.path().join("server.conf");
        let mut text = format!(
            "server_name: {}\nhost: 127.0.0.1\nport: {}\nhttp: 127.0.0.1:{}\n{}\n",
            self.name, self.port, self.monitor, self.config.config
        );
        if let Some(cp) = self.cluster_port {
            let routes: Vec<String> = self
                .routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            text.push_str(&format!(
                "cluster {{\n  name: ep\n  listen: 127.0.0.1:{cp}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            ));
        }
        std::fs::write(&conf, text).expect("write nats config");
        let log = std::fs::File::create(self.log_path()).expect("nats log file");
        ChildGuard::spawn(
            &self.name,
            Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn wait_ready(&self, routes: usize) {
        let (port, monitor) = (self.port, self.monitor);
        let what = format!("nats-server {} on port {port}", self.name);
        wait_until(&what, &self.log_path(), || {
            Ok(accepts(port)
                && (routes == 0
                    || http_get(monitor, "/routez")
                        .and_then(|b| num_routes(&b))
                        .is_some_and(|n| n >= routes)))
        });
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Stops the server gracefully (SIGTERM).
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Starts it again on the same ports (after [`stop`](Self::stop) or
    /// [`kill`](Self::kill)) and waits until it is ready.
    pub fn restart(&mut self) {
        self.child.kill();
        self.child = self.launch();
        self.wait_ready(0);
    }

    /// True while the process runs.
    pub fn is_running(&self) -> bool {
        self.child.pid().is_some()
    }
}

/// `n` servers routed into one cluster.
#[derive(Debug)]
pub struct NatsCluster {
    /// The members, in order.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` servers, each routed to all the others, and waits until
    /// every route is up.
    pub fn start(n: usize) -> Self {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let nodes: Vec<NatsServer> = (0..n)
            .map(|i| {
                let routes = cluster_ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, &p)| p)
                    .collect();
                NatsServer::spawn(
                    &format!("nats{}", i + 1),
                    NatsConfig::default(),
                    Some(cluster_ports[i]),
                    routes,
                )
            })
            .collect();
        for node in &nodes {
            node.wait_ready(n - 1);
        }
        Self { nodes }
    }

    /// Every member's URL, comma-separated (a `NATS_SERVER` value).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A plain HTTP/1.0 GET on loopback; the body, or `None` on any failure.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some(body.to_owned())
}

/// `num_routes` from a `/routez` body.
fn num_routes(body: &str) -> Option<usize> {
    let at = body.find("\"num_routes\"")?;
    let rest = body[at..].split_once(':')?.1.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A certificate authority and a server certificate for `127.0.0.1` and
/// `localhost`, made with the `openssl` command in `dir`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA's certificate (PEM): what clients trust.
    pub ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Creates them (P-256 keys, valid for a day).
    pub fn create(dir: &std::path::Path) -> Self {
        let bin = require_binary("openssl", "openssl");
        let f = |name: &str| dir.join(name);
        let ext = f("san.ext");
        std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("write ext");
        let run = |args: &[&str]| {
            let out = Command::new(&bin)
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=eventplane test CA",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ]);
        Self {
            ca: f("ca.pem"),
            cert: f("server.pem"),
            key: f("server.key"),
        }
    }

    /// The `tls { ... }` block of a server configuration using them.
    pub fn server_config(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n",
            self.cert.display().to_string(),
            self.key.display().to_string()
        )
    }
}
