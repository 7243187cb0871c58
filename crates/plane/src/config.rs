//! Configuration of an event plane: defaults, then environment variables,
//! then (in the CLI) flags. Every variable is listed in [`ENV_VARS`] and in
//! the README.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use eventplane_core::QueueLimits;
use eventplane_nats::{NatsAuth, NatsOptions};

/// The default etcd endpoint.
pub const DEFAULT_ETCD_ENDPOINT: &str = "http://localhost:2379";

/// Every environment variable eventplane reads, with what it does.
pub const ENV_VARS: &[(&str, &str)] = &[
    (
        "DYN_EVENT_PLANE",
        "transport: `nats` (default; needs a NATS server) or `zmq` (peer to peer, no server)",
    ),
    (
        "DYN_DISCOVERY_BACKEND",
        "discovery: `file` (default; one machine), `etcd` (many machines) or `mem` (in-process only)",
    ),
    (
        "NATS_SERVER",
        "NATS server URLs, comma-separated (default `nats://localhost:4222`); `tls://` requires TLS, `nats://user:pass@host` carries credentials",
    ),
    ("NATS_USER", "NATS user name (with `NATS_PASSWORD`)"),
    ("NATS_PASSWORD", "NATS password (with `NATS_USER`)"),
    ("NATS_TOKEN", "NATS authentication token"),
    ("NATS_CREDS", "path of a NATS `.creds` file (JWT + NKey)"),
    ("NATS_CA", "PEM file of CA certificates to trust for NATS TLS"),
    ("NATS_CERT", "client certificate for NATS TLS (with `NATS_KEY`)"),
    ("NATS_KEY", "client key for NATS TLS (with `NATS_CERT`)"),
    ("NATS_TLS_REQUIRED", "`1` or `true`: require TLS to NATS even with `nats://` URLs"),
    (
        "DYN_EVENT_PLANE_NATS_BUFFER",
        "envelopes each NATS publisher holds while disconnected (default 32768); more are dropped and reported as gaps",
    ),
    (
        "ETCD_ENDPOINTS",
        "etcd client URLs, comma-separated (default `http://localhost:2379`)",
    ),
    (
        "ETCD_LEASE_TTL",
        "etcd lease TTL of registrations, in seconds (default 10)",
    ),
    (
        "DYN_DISCOVERY_DIR",
        "directory of the `file` discovery backend",
    ),
    (
        "DYN_EVENT_PLANE_HOST",
        "address ZMQ publishers bind and advertise (default 127.0.0.1)",
    ),
    (
        "DYN_EVENT_PLANE_HWM",
        "high-water marks, in messages: ZMQ send and receive queues, and each NATS subscription's buffer",
    ),
    (
        "DYN_EVENT_PLANE_HEARTBEAT_MS",
        "heartbeat interval of idle publishers, in milliseconds",
    ),
    (
        "DYN_EVENT_PLANE_LEASE_TTL_MS",
        "discovery lease TTL of publishers, in milliseconds",
    ),
    (
        "DYN_EVENT_PLANE_MAX_MESSAGE_BYTES",
        "largest envelope sent or accepted, in bytes",
    ),
    (
        "DYN_EVENT_PLANE_QUEUE_BYTES",
        "bound of each in-process subscriber's queue, in bytes (a ZMQ subscriber is bounded by its receive high-water mark)",
    ),
];

/// A configuration value that is not one of the accepted ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: expected {expected}")]
pub struct ConfigError {
    /// The setting (with the variable or flag that sets it).
    pub what: String,
    /// The value given.
    pub value: String,
    /// What would have been accepted.
    pub expected: String,
}

macro_rules! choice {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            /// Every accepted value.
            pub const VALUES: &'static [&'static str] = &[$($s),+];

            /// The value's name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }

        impl FromStr for $name {
            type Err = ConfigError;
            fn from_str(s: &str) -> Result<Self, ConfigError> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($s => Ok($name::$var),)+
                    _ => Err(ConfigError { what: $what.into(), value: s.into(), expected: format!("one of: {}", Self::VALUES.join(", ")) }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

choice!(
    /// Which transport carries events.
    TransportKind, "event plane (DYN_EVENT_PLANE / --event-plane)" {
        /// Through a NATS server or cluster (the default).
        Nats => "nats",
        /// Peer to peer over ZMQ; publishers found through discovery.
        Zmq => "zmq",
    }
);

choice!(
    /// Which discovery backend finds publishers.
    DiscoveryKind, "discovery backend (DYN_DISCOVERY_BACKEND / --discovery)" {
        /// A directory shared by the processes of one machine.
        File => "file",
        /// An etcd cluster.
        Etcd => "etcd",
        /// In this process only.
        Mem => "mem",
    }
);

/// Everything needed to build an event plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The transport.
    pub transport: TransportKind,
    /// The discovery backend.
    pub discovery: DiscoveryKind,
    /// Directory of the file backend (`None`: [`eventplane_discovery::FileDiscovery::default_dir`]).
    pub discovery_dir: Option<PathBuf>,
    /// Address ZMQ publishers bind and advertise.
    pub host: String,
    /// ZMQ high-water marks, in messages.
    pub hwm: i32,
    /// Heartbeat interval of idle publishers.
    pub heartbeat_interval: Duration,
    /// Discovery lease TTL of publishers.
    pub lease_ttl: Duration,
    /// Largest envelope sent or accepted.
    pub max_message_bytes: usize,
    /// Bounds of each subscriber's queue.
    pub queue: QueueLimits,
    /// NATS servers, auth, TLS and buffering (used with [`TransportKind::Nats`]).
    pub nats: NatsOptions,
    /// etcd client URLs (used with [`DiscoveryKind::Etcd`]).
    pub etcd_endpoints: Vec<String>,
    /// Lease TTL of registrations in etcd; replaces `lease_ttl` when the
    /// discovery backend is etcd.
    pub etcd_lease_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            transport: TransportKind::Nats,
            discovery: DiscoveryKind::File,
            discovery_dir: None,
            host: "127.0.0.1".into(),
            hwm: eventplane_zmq::DEFAULT_HWM,
            heartbeat_interval: Duration::from_secs(1),
            lease_ttl: eventplane_discovery::DEFAULT_TTL,
            max_message_bytes: eventplane_core::DEFAULT_MAX_MESSAGE_BYTES,
            queue: QueueLimits::default(),
            nats: NatsOptions::default(),
            etcd_endpoints: vec![DEFAULT_ETCD_ENDPOINT.to_owned()],
            etcd_lease_ttl: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Defaults overridden by the environment variables of [`ENV_VARS`].
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Defaults overridden by whatever `lookup` returns for each variable
    /// (testable without touching the process environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("DYN_EVENT_PLANE") {
            c.transport = v.parse()?;
        }
        if let Some(v) = get("DYN_DISCOVERY_BACKEND") {
            c.discovery = v.parse()?;
        }
        if let Some(v) = get("DYN_DISCOVERY_DIR") {
            c.discovery_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = get("DYN_EVENT_PLANE_HOST") {
            c.host = v.trim().to_owned();
        }
        if let Some(v) = get("DYN_EVENT_PLANE_HWM") {
            c.hwm = number("DYN_EVENT_PLANE_HWM", &v, 1..=i32::MAX as u64)? as i32;
        }
        if let Some(v) = get("DYN_EVENT_PLANE_HEARTBEAT_MS") {
            c.heartbeat_interval =
                Duration::from_millis(number("DYN_EVENT_PLANE_HEARTBEAT_MS", &v, 10..=3_600_000)?);
        }
        if let Some(v) = get("DYN_EVENT_PLANE_LEASE_TTL_MS") {
            c.lease_ttl =
                Duration::from_millis(number("DYN_EVENT_PLANE_LEASE_TTL_MS", &v, 100..=3_600_000)?);
        }
        if let Some(v) = get("DYN_EVENT_PLANE_MAX_MESSAGE_BYTES") {
            c.max_message_bytes =
                number("DYN_EVENT_PLANE_MAX_MESSAGE_BYTES", &v, 64..=1 << 30)? as usize;
        }
        if let Some(v) = get("DYN_EVENT_PLANE_QUEUE_BYTES") {
            c.queue.max_bytes = number("DYN_EVENT_PLANE_QUEUE_BYTES", &v, 1024..=1 << 40)? as usize;
        }
        if let Some(v) = get("NATS_SERVER") {
            c.nats.servers = list("NATS_SERVER", &v)?;
        }
        c.nats.auth = match (
            get("NATS_USER"),
            get("NATS_PASSWORD"),
            get("NATS_TOKEN"),
            get("NATS_CREDS"),
        ) {
            (None, None, None, None) => NatsAuth::None,
            (Some(user), Some(password), None, None) => NatsAuth::UserPassword { user, password },
            (None, None, Some(token), None) => NatsAuth::Token(token),
            (None, None, None, Some(path)) => NatsAuth::CredentialsFile(PathBuf::from(path)),
            _ => {
                return Err(ConfigError {
                    what: "NATS credentials (NATS_USER, NATS_PASSWORD, NATS_TOKEN, NATS_CREDS)"
                        .into(),
                    value: "an incomplete or mixed set".into(),
                    expected:
                        "NATS_USER with NATS_PASSWORD, or NATS_TOKEN alone, or NATS_CREDS alone"
                            .into(),
                })
            }
        };
        if let Some(v) = get("NATS_TLS_REQUIRED") {
            c.nats.tls.required = boolean("NATS_TLS_REQUIRED", &v)?;
        }
        c.nats.tls.ca = get("NATS_CA").map(PathBuf::from);
        c.nats.tls.client_cert = match (get("NATS_CERT"), get("NATS_KEY")) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            _ => {
                return Err(ConfigError {
                    what: "NATS client certificate (NATS_CERT, NATS_KEY)".into(),
                    value: "only one of the two".into(),
                    expected: "both NATS_CERT and NATS_KEY, or neither".into(),
                })
            }
        };
        if let Some(v) = get("DYN_EVENT_PLANE_NATS_BUFFER") {
            c.nats.buffer_messages =
                number("DYN_EVENT_PLANE_NATS_BUFFER", &v, 16..=1 << 24)? as usize;
        }
        if let Some(v) = get("ETCD_ENDPOINTS") {
            c.etcd_endpoints = list("ETCD_ENDPOINTS", &v)?;
        }
        if let Some(v) = get("ETCD_LEASE_TTL") {
            c.etcd_lease_ttl = Duration::from_secs(number("ETCD_LEASE_TTL", &v, 1..=3600)?);
        }
        c.nats.heartbeat_interval = c.heartbeat_interval;
        c.nats.subscription_messages = c.hwm as usize;
        c.nats.max_message_bytes = c.max_message_bytes;
        Ok(c)
    }
}

/// A comma-separated list of addresses, none empty.
fn list(var: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    let items: Vec<String> = value.split(',').map(|s| s.trim().to_owned()).collect();
    if items.iter().any(String::is_empty) {
        return Err(ConfigError {
            what: var.into(),
            value: value.into(),
            expected: "a comma-separated list of URLs, none empty".into(),
        });
    }
    Ok(items)
}

fn boolean(var: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError {
            what: var.into(),
            value: value.into(),
            expected: "one of: 1, true, yes, on, 0, false, no, off".into(),
        }),
    }
}

fn number(
    var: &str,
    value: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    value
        .trim()
        .replace('_', "")
        .parse::<u64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| ConfigError {
            what: var.into(),
            value: value.into(),
            expected: format!("a whole number from {} to {}", range.start(), range.end()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_embedded_setup() {
        let c = from(&[]).unwrap();
        assert_eq!(
            (c.transport, c.discovery),
            (TransportKind::Nats, DiscoveryKind::File)
        );
        assert_eq!(c.nats.servers, vec!["nats://localhost:4222"]);
    }

    #[test]
    fn invalid_values_list_the_valid_ones() {
        let e = from(&[("DYN_EVENT_PLANE", "kafka")]).unwrap_err();
        assert_eq!(e.expected, "one of: nats, zmq");
        assert!(e.to_string().contains("DYN_EVENT_PLANE"), "{e}");
        let e = from(&[("DYN_DISCOVERY_BACKEND", "consul")]).unwrap_err();
        assert_eq!(e.expected, "one of: file, etcd, mem");
        let e = from(&[("DYN_EVENT_PLANE_HWM", "-3")]).unwrap_err();
        assert!(e.expected.starts_with("a whole number"));
    }

    #[test]
    fn variables_override_defaults() {
        let c = from(&[
            ("DYN_EVENT_PLANE", " ZMQ "),
            ("DYN_DISCOVERY_BACKEND", "mem"),
            ("DYN_EVENT_PLANE_HWM", "10_000"),
        ])
        .unwrap();
        assert_eq!(
            (c.transport, c.discovery, c.hwm),
            (TransportKind::Zmq, DiscoveryKind::Mem, 10_000)
        );
    }

    #[test]
    fn nats_and_etcd_settings() {
        let c = from(&[
            ("NATS_SERVER", "nats://a:4222, nats://b:4222"),
            ("NATS_USER", "u"),
            ("NATS_PASSWORD", "p"),
            ("NATS_TLS_REQUIRED", "true"),
            ("DYN_DISCOVERY_BACKEND", "etcd"),
            ("ETCD_ENDPOINTS", "http://e1:2379,http://e2:2379"),
            ("ETCD_LEASE_TTL", "3"),
        ])
        .unwrap();
        assert_eq!(c.nats.servers, vec!["nats://a:4222", "nats://b:4222"]);
        assert_eq!(
            c.nats.auth,
            NatsAuth::UserPassword {
                user: "u".into(),
                password: "p".into()
            }
        );
        assert!(c.nats.tls.required);
        assert_eq!(c.etcd_endpoints.len(), 2);
        assert_eq!(c.etcd_lease_ttl, Duration::from_secs(3));
        let e = from(&[("NATS_USER", "u")]).unwrap_err();
        assert!(e.to_string().contains("NATS_PASSWORD"), "{e}");
        let e = from(&[("NATS_TOKEN", "t"), ("NATS_CREDS", "/x")]).unwrap_err();
        assert!(e.expected.contains("NATS_TOKEN alone"), "{e}");
        let e = from(&[("NATS_SERVER", "nats://a,,nats://b")]).unwrap_err();
        assert!(e.to_string().contains("NATS_SERVER"), "{e}");
        let e = from(&[("NATS_CERT", "/c.pem")]).unwrap_err();
        assert!(e.to_string().contains("NATS_KEY"), "{e}");
    }

    #[test]
    fn every_variable_is_in_the_readme() {
        let readme = include_str!("../../../README.md");
        for (var, _) in ENV_VARS {
            assert!(
                readme.contains(&format!("`{var}`")),
                "{var} is missing from the README's configuration table"
            );
        }
    }
}
