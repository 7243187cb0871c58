//! # eventplane-discovery
//!
//! Who is out there: publishers register where they can be reached under a
//! key with a lease, and subscribers list and watch keys by prefix.
//!
//! - [`Discovery`]: the trait every backend implements (register with a TTL
//!   kept alive until the [`Registration`] is dropped, list, watch).
//! - [`MemDiscovery`]: in-process, for tests and single-process embedding.
//! - [`FileDiscovery`]: a directory shared by the processes of one machine,
//!   the embedded default: one file per registration, kept fresh by its
//!   owner, expired by anyone who sees it stale or its owner dead.
//! - `EtcdDiscovery` (cargo feature `etcd`): an etcd cluster, for fleets
//!   spanning machines: registrations under leases that its owner re-creates
//!   by itself when etcd loses them, watches on etcd's watch API that resume
//!   from their last revision. The feature is off by default because the
//!   `etcd-client` crate compiles etcd's protobuf definitions with `protoc`
//!   at build time, which a fresh machine does not have.
//!
//! Watches deliver a state: the watcher remembers what it has reported and
//! emits only differences as [`WatchEvent`]s, a changed value as `Removed`
//! then `Added`. Events go through a bounded channel that the watcher
//! awaits, so a slow consumer delays events but never loses one, and a
//! watcher's memory is bounded by the number of live entries, not by the rate
//! of change. The mem and file backends diff successive snapshots; etcd
//! applies its watch events and re-lists when it must.

#[cfg(feature = "etcd")]
mod etcd;
mod file;
mod mem;
mod watch;

use async_trait::async_trait;
use std::fmt;
use std::time::Duration;

#[cfg(feature = "etcd")]
pub use etcd::{EtcdDiscovery, EtcdOptions, EtcdStats};
pub use file::{FileDiscovery, SCAN_INTERVAL as FILE_SCAN_INTERVAL};
pub use mem::MemDiscovery;
pub use watch::Watch;

/// A registered key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key, `/`-separated by convention.
    pub key: String,
    /// The value: JSON, so operators can read it.
    pub value: serde_json::Value,
}

/// A change seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// An entry appeared (or its value changed: then `Removed` comes first).
    Added(Entry),
    /// An entry is gone: withdrawn, or its lease expired.
    Removed {
        /// The key that went away.
        key: String,
    },
}

/// Why a discovery operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The key is empty, too long or contains a NUL byte.
    #[error("invalid discovery key {key:?}: {reason}")]
    InvalidKey {
        /// The key given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The backend's storage failed.
    #[error("discovery backend `{backend}` at {location}: {source}")]
    Io {
        /// Backend name.
        backend: &'static str,
        /// Where (a path, an address).
        location: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// etcd cannot be reached (at start-up), or failed a request.
    #[error("cannot reach etcd at {endpoints} (set ETCD_ENDPOINTS): {reason}")]
    Etcd {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// What failed, and etcd's or the connection's error.
        reason: String,
    },
}

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// Default lease TTL: how long an entry outlives its owner's last keepalive.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

pub(crate) fn check_key(key: &str) -> Result<(), DiscoveryError> {
    let reason = if key.is_empty() {
        "empty"
    } else if key.len() > MAX_KEY_LEN {
        "longer than 512 bytes"
    } else if key.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(DiscoveryError::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

/// One of a backend's health figures, for a metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryMetric {
    /// Its name, without the backend's prefix (`leases_lost`).
    pub name: &'static str,
    /// What it counts.
    pub help: &'static str,
    /// Its value now.
    pub value: u64,
    /// A level (it goes up and down), not a running total.
    pub gauge: bool,
}

/// A discovery backend. See the crate docs.
#[async_trait]
pub trait Discovery: Send + Sync + fmt::Debug + 'static {
    /// The backend's name (`mem`, `file`, ...).
    fn name(&self) -> &'static str;

    /// Health figures (outages survived, leases lost, ...) for metrics;
    /// none by default.
    fn metrics(&self) -> Vec<DiscoveryMetric> {
        Vec::new()
    }

    /// Registers `value` under `key` with a lease of `ttl`, kept alive until the
    /// returned [`Registration`] is dropped or withdrawn. If the owner dies
    /// without withdrawing, the entry expires within `ttl`. Registering a key
    /// that exists replaces its value.
    async fn register(
        &self,
        key: &str,
        value: serde_json::Value,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError>;

    /// The live entries whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, DiscoveryError>;

    /// Watches `prefix`: first an `Added` for every live entry, then every
    /// change.
    async fn watch(&self, prefix: &str) -> Result<Watch, DiscoveryError>;
}

/// What a backend keeps alive for one registration.
pub trait Lease: Send + Sync + fmt::Debug {
    /// Withdraws the registration now. Called at most once.
    fn withdraw(&mut self);
}

/// A live registration. Dropping it withdraws the entry.
#[derive(Debug)]
pub struct Registration {
    key: String,
    lease: Option<Box<dyn Lease>>,
}

impl Registration {
    /// A registration of `key` held by `lease`. Backends call this.
    pub fn new(key: String, lease: Box<dyn Lease>) -> Self {
        Self {
            key,
            lease: Some(lease),
        }
    }

    /// The registered key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Withdraws the entry now (the same as dropping it, but explicit).
    pub fn withdraw(mut self) {
        self.take_and_withdraw();
    }

    fn take_and_withdraw(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            lease.withdraw();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.take_and_withdraw();
    }
}
