//! The etcd backend: registrations, listings and watches on an etcd cluster.
//!
//! This module owns everything between the [`Discovery`] trait and etcd:
//! the client connections, the lease of every registration and the thread
//! that keeps those leases alive, the watchers, and the counters of what
//! went wrong ([`EtcdStats`]).
//!
//! It is compiled only with the cargo feature `etcd`: the `etcd-client`
//! crate generates its gRPC code from etcd's `.proto` files at build time
//! with `protoc` (Debian: `protobuf-compiler libprotobuf-dev`), which a fresh
//! machine lacks, and the default build must work there.
//!
//! - **Registrations**: each one is a key put under a lease of its own with
//!   the registration's TTL. A dedicated OS thread running its own
//!   current-thread tokio runtime (and its own etcd connection) sends the
//!   keepalives every third of the TTL, so a starved or blocked application
//!   runtime cannot let a lease lapse. When a keepalive finds the lease gone
//!   (it expired during a network cut, someone revoked it, etcd was restarted
//!   without its data), the owner grants a new lease and puts its key again
//!   by itself, logs it and counts it. Dropping the [`Registration`] revokes
//!   the lease (which deletes the key) from that thread: the dropping thread
//!   only sends a message. The newest registration of a key owns it: an older
//!   one of the same process never puts its value back.
//! - **Watches** use etcd's watch API: a listing at revision `R` (an `Added`
//!   per entry), then a watch from `R + 1`. After an interruption the watcher
//!   reads the prefix as it was at the last revision it applied; if that
//!   equals what it knows, it resumes the watch from the next revision and
//!   loses nothing. If the revision was compacted, or etcd's history is not
//!   the one it knew (etcd lost its data and started its revisions again),
//!   it lists the prefix anew and reports the difference from what it had
//!   reported: no `Added` or `Removed` is missed either way.
//! - **Failures**: requests are retried for up to
//!   [`EtcdOptions::request_timeout`] (a stopped member of a cluster is
//!   skipped that way); keepalives and watches retry until etcd answers
//!   again. An outage is logged once when it starts and once when it ends,
//!   not at every retry, and counted in [`EtcdStats`].

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, Error as EtcdError, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, WatchOptions,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

use crate::watch::{Closed, Emitter};
use crate::{check_key, Discovery, DiscoveryError, Entry, Lease, Registration, Watch};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs of the cluster's members (`http://host:port`, or
    /// `host:port`), as in `ETCD_ENDPOINTS`. Requests are spread over them
    /// and retried on another when one fails.
    pub endpoints: Vec<String>,
    /// How long [`EtcdDiscovery::connect`] may take to get an answer from
    /// the cluster; also the limit of every connection attempt.
    pub connect_timeout: Duration,
    /// How long one operation (register, list, the start of a watch,
    /// a keepalive round trip) may take, its retries included.
    pub request_timeout: Duration,
    /// HTTP/2 keepalive ping interval on connections with an open stream:
    /// a watch whose server vanished without closing the connection (a
    /// network cut) notices within this interval plus `request_timeout`,
    /// and resumes elsewhere. etcd sends GOAWAY to clients that ping more
    /// often than its `--grpc-keepalive-min-time` (5 s by default).
    pub keepalive_interval: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
        }
    }
}

/// What happened to an [`EtcdDiscovery`] so far: gauges (`registrations`,
/// `watches`) and counters (the rest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EtcdStats {
    /// Registrations alive now.
    pub registrations: u64,
    /// Watches alive now.
    pub watches: u64,
    /// Outages that ended: a keepalive or a watch that had failed got an
    /// answer from etcd again.
    pub reconnects: u64,
    /// Leases found gone while their registration was alive (expired during
    /// an outage, revoked by someone else, lost with etcd's data).
    pub leases_lost: u64,
    /// Registrations put back under a new lease after such a loss.
    pub reregistrations: u64,
    /// Interrupted watches resumed from their last revision.
    pub watch_resumes: u64,
    /// Interrupted watches that listed their prefix anew instead (revision
    /// compacted, or etcd's history changed).
    pub watch_relists: u64,
    /// Operations that failed after their retries (each failed attempt of a
    /// keepalive or a watch during an outage counts).
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    registrations: AtomicU64,
    watches: AtomicU64,
    reconnects: AtomicU64,
    leases_lost: AtomicU64,
    reregistrations: AtomicU64,
    watch_resumes: AtomicU64,
    watch_relists: AtomicU64,
    errors: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> EtcdStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EtcdStats {
            registrations: get(&self.registrations),
            watches: get(&self.watches),
            reconnects: get(&self.reconnects),
            leases_lost: get(&self.leases_lost),
            reregistrations: get(&self.reregistrations),
            watch_resumes: get(&self.watch_resumes),
            watch_relists: get(&self.watch_relists),
            errors: get(&self.errors),
        }
    }
}

/// What every part of one [`EtcdDiscovery`] shares.
#[derive(Debug)]
struct Shared {
    opts: EtcdOptions,
    /// The endpoints, comma-separated, for messages.
    endpoints: String,
    counters: Counters,
    /// Keys whose value was reported as not JSON, so each is logged once.
    bad_values: Mutex<HashSet<String>>,
}

impl Shared {
    fn error(&self, reason: impl fmt::Display) -> DiscoveryError {
        DiscoveryError::Etcd {
            endpoints: self.endpoints.clone(),
            reason: reason.to_string(),
        }
    }

    /// Parses a stored value; `None` (logged once per key) if it is not JSON.
    fn parse(&self, key: &str, bytes: &[u8]) -> Option<serde_json::Value> {
        match serde_json::from_slice(bytes) {
            Ok(value) => Some(value),
            Err(e) => {
                let first = self
                    .bad_values
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.to_owned());
                if first {
                    tracing::warn!(key, error = %e, "etcd entry whose value is not JSON ignored");
                }
                None
            }
        }
    }

    async fn client(&self) -> Result<Client, EtcdError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.opts.connect_timeout)
            .with_keep_alive(self.opts.keepalive_interval, self.opts.request_timeout)
            // Pings only while a stream (a watch, a keepalive) is open: etcd
            // answers pings on an idle connection with GOAWAY.
            .with_keep_alive_while_idle(false)
            // A member cut off from its cluster's leader refuses requests
            // (and cancels watches) instead of serving stale data; the
            // retries then go to another member.
            .with_require_leader(true);
        Client::connect(&self.opts.endpoints, Some(options)).await
    }
}

/// The state of one actor (the keepalives, a watch) towards etcd: logs an
/// outage once when it starts and once when it ends.
#[derive(Debug)]
struct Outage {
    what: String,
    since: Mutex<Option<Instant>>,
}

impl Outage {
    fn new(what: String) -> Self {
        Self {
            what,
            since: Mutex::new(None),
        }
    }

    fn failed(&self, shared: &Shared, error: &dyn fmt::Display) {
        bump(&shared.counters.errors);
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if since.is_none() {
            *since = Some(Instant::now());
            tracing::warn!(endpoints = %shared.endpoints, what = %self.what, error = %error,
                "etcd unreachable or failing; retrying until it answers");
        } else {
            tracing::debug!(what = %self.what, error = %error, "etcd still failing");
        }
    }

    fn ok(&self, shared: &Shared) {
        let since = self.since.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(since) = since {
            bump(&shared.counters.reconnects);
            tracing::info!(endpoints = %shared.endpoints, what = %self.what,
                outage_ms = since.elapsed().as_millis() as u64, "etcd answers again");
        }
    }
}

/// gRPC status codes (from the gRPC specification) that retrying cannot fix.
const NOT_RETRYABLE: [i32; 8] = [
    3,  // INVALID_ARGUMENT
    5,  // NOT_FOUND
    6,  // ALREADY_EXISTS
    7,  // PERMISSION_DENIED
    9,  // FAILED_PRECONDITION
    11, // OUT_OF_RANGE: a compacted or future revision
    12, // UNIMPLEMENTED
    16, // UNAUTHENTICATED
];

/// gRPC NOT_FOUND: etcd's answer about a lease that does not exist.
const NOT_FOUND: i32 = 5;

/// gRPC OUT_OF_RANGE: etcd's answer to a read at a compacted revision or
/// at a revision it has not reached.
const OUT_OF_RANGE: i32 = 11;

fn grpc_code(e: &EtcdError) -> Option<i32> {
    match e {
        EtcdError::GRpcStatus(status) => Some(status.code() as i32),
        _ => None,
    }
}

fn retryable(e: &EtcdError) -> bool {
    match e {
        EtcdError::GRpcStatus(_) => grpc_code(e).is_none_or(|c| !NOT_RETRYABLE.contains(&c)),
        EtcdError::InvalidArgs(_) | EtcdError::InvalidUri(_) | EtcdError::Utf8Error(_) => false,
        EtcdError::LeaseKeepAliveError(_) => false,
        _ => true,
    }
}

/// An etcd error in one line: the gRPC code and message, and the root cause
/// (`Connection refused (os error 111)`) rather than every layer's wrapper.
struct Describe<'a>(&'a EtcdError);

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (head, mut cause): (String, Option<&(dyn std::error::Error + 'static)>) = match self.0 {
            EtcdError::GRpcStatus(status) => (
                format!("{:?}: {}", status.code(), status.message()),
                std::error::Error::source(status),
            ),
            EtcdError::TransportError(e) => (e.to_string(), std::error::Error::source(e)),
            e => (e.to_string(), None),
        };
        f.write_str(&head)?;
        let mut root = None;
        while let Some(e) = cause {
            root = Some(e);
            cause = e.source();
        }
        match root.map(ToString::to_string) {
            Some(root) if !head.contains(&root) => write!(f, " ({root})"),
            _ => Ok(()),
        }
    }
}

fn timed_out(what: &str, after: Duration) -> EtcdError {
    EtcdError::IoError(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what}: no answer within {after:?}"),
    ))
}

/// Runs `op` until it succeeds, fails for good, or `deadline` passes; a
/// failure that another attempt may fix (a connection refused by a stopped
/// member, no leader during an election) is retried after a short pause.
async fn retrying<T, F, Fut>(what: &str, deadline: Instant, mut op: F) -> Result<T, EtcdError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, EtcdError>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(20);
    let mut last: Option<EtcdError> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = match tokio::time::timeout(left, op()).await {
            Ok(result) => result,
            Err(_) => {
                return Err(last.unwrap_or_else(|| timed_out(what, started.elapsed())));
            }
        };
        match attempt {
            Ok(value) => return Ok(value),
            Err(e) if retryable(&e) && Instant::now() + pause < deadline => {
                tracing::debug!(what, error = %Describe(&e), "etcd request failed; retrying");
                last = Some(e);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The keys under a prefix with their stored values, at a revision.
#[derive(Debug)]
struct Snapshot {
    entries: BTreeMap<String, Vec<u8>>,
    revision: i64,
}

/// Reads every key under `prefix`, now (`at` = `None`) or as it was at
/// revision `at`. Keys that are not UTF-8 are skipped.
async fn fetch(
    client: &Client,
    shared: &Shared,
    prefix: &str,
    at: Option<i64>,
) -> Result<Snapshot, EtcdError> {
    let deadline = Instant::now() + shared.opts.request_timeout;
    let mut resp = retrying("list", deadline, || {
        let mut client = client.clone();
        let mut options = GetOptions::new().with_prefix();
        if let Some(rev) = at {
            options = options.with_revision(rev);
        }
        async move { client.get(prefix, Some(options)).await }
    })
    .await?;
    let revision = resp
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| EtcdError::Internal("etcd answered without a header".into()))?;
    let entries = resp
        .take_kvs()
        .into_iter()
        .filter_map(|kv| {
            let (key, value) = kv.into_key_value();
            String::from_utf8(key).ok().map(|key| (key, value))
        })
        .collect();
    Ok(Snapshot { entries, revision })
}

/// Service discovery on an etcd cluster. See the module docs. Clones share
/// the connections, the lease thread and the statistics.
#[derive(Clone)]
pub struct EtcdDiscovery {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// The connection of list, watch: driven by the application's runtime.
    client: Client,
    /// Commands to the lease thread.
    leases: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
}

impl fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("endpoints", &self.inner.shared.endpoints)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl EtcdDiscovery {
    /// Connects to etcd and checks that it answers (a read, which needs an
    /// elected leader) within `opts.connect_timeout`; the error names the
    /// endpoints tried and `ETCD_ENDPOINTS`. Starts the lease thread.
    pub async fn connect(opts: EtcdOptions) -> Result<Self, DiscoveryError> {
        let endpoints = if opts.endpoints.is_empty() {
            "(no endpoint)".to_owned()
        } else {
            opts.endpoints.join(",")
        };
        let shared = Arc::new(Shared {
            opts,
            endpoints,
            counters: Counters::default(),
            bad_values: Mutex::default(),
        });
        if shared.opts.endpoints.is_empty() {
            return Err(shared.error("no endpoint given"));
        }
        let timeout = shared.opts.connect_timeout;
        let deadline = Instant::now() + timeout;
        let client = tokio::time::timeout(timeout, async {
            let client = shared.client().await?;
            retrying("connect", deadline, || {
                let mut client = client.clone();
                async move {
                    client
                        .get("eventplane", Some(GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await?;
            Ok(client)
        })
        .await
        .unwrap_or_else(|_| Err(timed_out("connect", timeout)))
        .map_err(|e: EtcdError| shared.error(Describe(&e)))?;
        let leases = LeaseThread::start(shared.clone()).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                client,
                leases,
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// What happened so far: live registrations and watches, outages,
    /// leases lost and re-registered, watch resumes and re-listings, errors.
    pub fn stats(&self) -> EtcdStats {
        self.inner.shared.counters.snapshot()
    }

    /// The endpoints in use.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.shared.opts.endpoints
    }
}

#[async_trait]
impl Discovery for EtcdDiscovery {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn metrics(&self) -> Vec<crate::DiscoveryMetric> {
        let s = self.stats();
        let m = |name, help, value, gauge| crate::DiscoveryMetric {
            name,
            help,
            value,
            gauge,
        };
        vec![
            m(
                "registrations",
                "registrations alive now",
                s.registrations,
                true,
            ),
            m("watches", "watches alive now", s.watches, true),
            m("reconnects", "etcd outages that ended", s.reconnects, false),
            m(
                "leases_lost",
                "leases found gone while their registration was alive",
                s.leases_lost,
                false,
            ),
            m(
                "reregistrations",
                "registrations put back under a new lease",
                s.reregistrations,
                false,
            ),
            m(
                "watch_resumes",
                "interrupted watches resumed from their last revision",
                s.watch_resumes,
                false,
            ),
            m(
                "watch_relists",
                "interrupted watches that listed their prefix anew",
                s.watch_relists,
                false,
            ),
            m(
                "errors",
                "etcd operations that failed after their retries",
                s.errors,
                false,
            ),
        ]
    }

    async fn register(
        &self,
        key: &str,
        value: serde_json::Value,
        ttl: Duration,
    ) -> Result<Registration, DiscoveryError> {
        check_key(key)?;
        let shared = &self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let stopped = || shared.error("the lease thread has stopped");
        self.inner
            .leases
            .send(Command::Register {
                id,
                key: key.to_owned(),
                value: value.to_string().into_bytes(),
                ttl,
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map_err(|e| {
            bump(&shared.counters.errors);
            shared.error(format_args!("register {key:?}: {}", Describe(&e)))
        })?;
        bump(&shared.counters.registrations);
        Ok(Registration::new(
            key.to_owned(),
            Box::new(EtcdLease {
                id,
                leases: self.inner.leases.clone(),
                shared: shared.clone(),
            }),
        ))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, DiscoveryError> {
        let shared = &self.inner.shared;
        let snapshot = fetch(&self.inner.client, shared, prefix, None)
            .await
            .map_err(|e| {
                bump(&shared.counters.errors);
                shared.error(format_args!("list {prefix:?}: {}", Describe(&e)))
            })?;
        Ok(snapshot
            .entries
            .into_iter()
            .filter_map(|(key, bytes)| shared.parse(&key, &bytes).map(|value| Entry { key, value }))
            .collect())
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, DiscoveryError> {
        let shared = self.inner.shared.clone();
        // The first listing happens here, so that an unreachable etcd is an
        // error now rather than silence later.
        let first = fetch(&self.inner.client, &shared, prefix, None)
            .await
            .map_err(|e| {
                bump(&shared.counters.errors);
                shared.error(format_args!("watch {prefix:?}: {}", Describe(&e)))
            })?;
        let watcher = Watcher {
            client: self.inner.client.clone(),
            outage: Outage::new(format!("watch {prefix:?}")),
            prefix: prefix.to_owned(),
            stored: BTreeMap::new(),
            revision: 0,
            _gauge: WatchGauge::new(shared.clone()),
            shared,
        };
        Ok(Watch::spawn_with(move |emitter| {
            watcher.run(emitter, first)
        }))
    }
}

/// Counts one live watch in [`EtcdStats::watches`] until dropped.
#[derive(Debug)]
struct WatchGauge {
    shared: Arc<Shared>,
}

impl WatchGauge {
    fn new(shared: Arc<Shared>) -> Self {
        bump(&shared.counters.watches);
        Self { shared }
    }
}

impl Drop for WatchGauge {
    fn drop(&mut self) {
        self.shared.counters.watches.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Watches

/// What ended a watch stream.
enum Ended {
    /// The consumer dropped the [`Watch`].
    Closed,
    /// etcd cancelled the watch: its start revision was compacted.
    Compacted(i64),
    /// The stream failed or ended: resume.
    Interrupted(String),
}

/// What a watcher does next.
enum Step {
    /// Watch from the revision after the last one applied.
    Watch,
    /// Check that etcd still has the history the watcher knows, then watch.
    Resume,
    /// List the prefix anew and report the difference.
    Relist,
}

/// One watch: its etcd stream, and the state it has applied.
struct Watcher {
    client: Client,
    shared: Arc<Shared>,
    outage: Outage,
    prefix: String,
    /// Every key under the prefix with its stored value, as of `revision`
    /// (including values that are not JSON, which are not reported).
    stored: BTreeMap<String, Vec<u8>>,
    /// The revision `stored` reflects: the listing's, then the last event's.
    revision: i64,
    _gauge: WatchGauge,
}

impl Watcher {
    async fn run(mut self, mut emitter: Emitter, first: Snapshot) {
        if self.apply_snapshot(&mut emitter, first).await.is_err() {
            return;
        }
        let mut step = Step::Watch;
        let mut pause = MIN_PAUSE;
        loop {
            match step {
                Step::Watch => {}
                Step::Resume => match fetch(
                    &self.client,
                    &self.shared,
                    &self.prefix,
                    Some(self.revision),
                )
                .await
                {
                    Ok(then) if then.entries == self.stored => {
                        self.outage.ok(&self.shared);
                        bump(&self.shared.counters.watch_resumes);
                        tracing::debug!(prefix = %self.prefix, revision = self.revision,
                            "etcd watch resumes after its last revision");
                    }
                    Ok(_) => {
                        self.outage.ok(&self.shared);
                        self.relisting(format_args!(
                            "etcd's history differs from the one watched (data lost?) at revision {}",
                            self.revision
                        ));
                        step = Step::Relist;
                        continue;
                    }
                    Err(e) if grpc_code(&e) == Some(OUT_OF_RANGE) => {
                        self.outage.ok(&self.shared);
                        self.relisting(format_args!(
                            "etcd no longer has revision {} (compacted, or data lost): {}",
                            self.revision,
                            Describe(&e)
                        ));
                        step = Step::Relist;
                        continue;
                    }
                    Err(e) => {
                        self.outage.failed(&self.shared, &Describe(&e));
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_PAUSE);
                        continue;
                    }
                },
                Step::Relist => match fetch(&self.client, &self.shared, &self.prefix, None).await {
                    Ok(now) => {
                        self.outage.ok(&self.shared);
                        if self.apply_snapshot(&mut emitter, now).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        self.outage.failed(&self.shared, &Describe(&e));
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_PAUSE);
                        continue;
                    }
                },
            }
            match self.follow(&mut emitter, &mut pause).await {
                Ended::Closed => return,
                Ended::Compacted(compacted) => {
                    self.relisting(format_args!(
                        "etcd compacted revision {} away (now {compacted})",
                        self.revision + 1
                    ));
                    step = Step::Relist;
                }
                Ended::Interrupted(error) => {
                    self.outage.failed(&self.shared, &error);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                    step = Step::Resume;
                }
            }
        }
    }

    fn relisting(&self, why: fmt::Arguments<'_>) {
        bump(&self.shared.counters.watch_relists);
        tracing::info!(prefix = %self.prefix, endpoints = %self.shared.endpoints,
            "{why}; listing the prefix anew");
    }

    /// Takes `snapshot` as the new state and reports the difference.
    async fn apply_snapshot(
        &mut self,
        emitter: &mut Emitter,
        snapshot: Snapshot,
    ) -> Result<(), Closed> {
        let values = snapshot
            .entries
            .iter()
            .filter_map(|(key, bytes)| {
                self.shared
                    .parse(key, bytes)
                    .map(|value| (key.clone(), value))
            })
            .collect();
        self.stored = snapshot.entries;
        self.revision = snapshot.revision;
        emitter.replace_all(values).await
    }

    /// Watches from the revision after `self.revision`, applying events until
    /// the stream ends.
    async fn follow(&mut self, emitter: &mut Emitter, pause: &mut Duration) -> Ended {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision + 1);
        let mut client = self.client.clone();
        let timeout = self.shared.opts.request_timeout;
        let mut stream =
            match tokio::time::timeout(timeout, client.watch(self.prefix.as_str(), Some(options)))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Ended::Interrupted(Describe(&e).to_string()),
                Err(_) => return Ended::Interrupted(timed_out("watch", timeout).to_string()),
            };
        loop {
            // No timeout here: a quiet prefix has a quiet stream. A dead
            // connection is detected by the HTTP/2 keepalive.
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return Ended::Interrupted("etcd ended the watch stream".into()),
                Err(e) => return Ended::Interrupted(Describe(&e).to_string()),
            };
            if resp.created() {
                self.outage.ok(&self.shared);
                *pause = MIN_PAUSE;
            }
            if resp.compact_revision() > 0 {
                return Ended::Compacted(resp.compact_revision());
            }
            if resp.canceled() {
                return Ended::Interrupted(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                ));
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                self.revision = self.revision.max(kv.mod_revision());
                let Ok(key) = kv.key_str() else { continue };
                // A deleted key comes with version 0, a put one with its
                // version (1 and up). (`Event::event_type` would panic on an
                // event type this client does not know.)
                let value = if kv.version() == 0 {
                    self.stored.remove(key);
                    None
                } else {
                    self.stored.insert(key.to_owned(), kv.value().to_vec());
                    self.shared.parse(key, kv.value())
                };
                if emitter.set(key, value).await.is_err() {
                    return Ended::Closed;
                }
            }
        }
    }
}

/// Shortest and longest pause between two attempts of a failing watch or
/// keepalive.
const MIN_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Leases

/// A message to the lease thread.
enum Command {
    /// Grant a lease, put the key under it, answer, keep it alive.
    Register {
        id: u64,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
        reply: oneshot::Sender<Result<(), EtcdError>>,
    },
    /// Stop keeping registration `id` alive and revoke its lease.
    Withdraw { id: u64 },
}

/// A registration's hold on its lease, in the lease thread.
struct Held {
    key: String,
    /// Its current lease (0: none).
    lease: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

/// The thread that owns the leases of one [`EtcdDiscovery`].
struct LeaseThread {
    client: Client,
    shared: Arc<Shared>,
    outage: Arc<Outage>,
    /// The registration that owns each key: the newest one.
    owners: Arc<Mutex<HashMap<String, u64>>>,
}

impl LeaseThread {
    /// Starts the thread, with its runtime and its own connection (a
    /// connection is driven by tasks of the runtime that made it).
    async fn start(shared: Arc<Shared>) -> Result<mpsc::UnboundedSender<Command>, DiscoveryError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("ep-etcd-leases".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start the lease runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let client = match thread_shared.client().await {
                        Ok(client) => client,
                        Err(e) => {
                            let _ = ready_tx.send(Err(Describe(&e).to_string()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    LeaseThread {
                        client,
                        outage: Arc::new(Outage::new("lease keepalive".into())),
                        shared: thread_shared,
                        owners: Arc::default(),
                    }
                    .run(rx)
                    .await;
                });
            })
            .map_err(|e| shared.error(format!("cannot start the lease thread: {e}")))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(tx),
            Ok(Err(e)) => Err(shared.error(e)),
            Err(_) => Err(shared.error("the lease thread stopped")),
        }
    }

    async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut held: HashMap<u64, Held> = HashMap::new();
        let mut revocations = tokio::task::JoinSet::new();
        while let Some(command) = commands.recv().await {
            // A task that finished failed its first registration: forget it.
            held.retain(|_, h| !h.task.is_finished());
            while revocations.try_join_next().is_some() {}
            match command {
                Command::Register {
                    id,
                    key,
                    value,
                    ttl,
                    reply,
                } => {
                    let lease = Arc::new(AtomicI64::new(0));
                    let keeper = Keeper {
                        id,
                        key: key.clone(),
                        value,
                        ttl,
                        lease: lease.clone(),
                        client: self.client.clone(),
                        shared: self.shared.clone(),
                        outage: self.outage.clone(),
                        owners: self.owners.clone(),
                    };
                    let task = tokio::spawn(keeper.run(reply));
                    held.insert(id, Held { key, lease, task });
                }
                Command::Withdraw { id } => {
                    let Some(h) = held.remove(&id) else { continue };
                    h.task.abort();
                    {
                        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
                        if owners.get(&h.key) == Some(&id) {
                            owners.remove(&h.key);
                        }
                    }
                    let lease = h.lease.load(Ordering::SeqCst);
                    if lease != 0 {
                        revocations.spawn(revoke(self.client.clone(), self.shared.clone(), lease));
                    }
                }
            }
        }
        // Every handle is gone: finish the revocations under way, then stop.
        while revocations.join_next().await.is_some() {}
    }
}

/// Revokes `lease` (deleting its keys), best effort: if etcd cannot be
/// reached, the lease expires by itself.
async fn revoke(client: Client, shared: Arc<Shared>, lease: i64) {
    let deadline = Instant::now() + shared.opts.request_timeout;
    let result = retrying("revoke", deadline, || {
        let mut client = client.clone();
        async move { client.lease_revoke(lease).await }
    })
    .await;
    match result {
        Ok(_) => {}
        // Already gone (expired, or revoked by someone else): nothing to do.
        Err(e) if grpc_code(&e) == Some(NOT_FOUND) => {}
        Err(e) => {
            tracing::debug!(lease, error = %Describe(&e), "cannot revoke an etcd lease; it will expire by itself");
        }
    }
}

/// What a keepalive found.
#[derive(Debug)]
enum Refresh {
    Alive,
    Lost,
    Failed(String),
}

/// Keeps one registration alive, in the lease thread.
struct Keeper {
    id: u64,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
    lease: Arc<AtomicI64>,
    client: Client,
    shared: Arc<Shared>,
    outage: Arc<Outage>,
    owners: Arc<Mutex<HashMap<String, u64>>>,
}

impl Keeper {
    async fn run(mut self, reply: oneshot::Sender<Result<(), EtcdError>>) {
        let deadline = Instant::now() + self.shared.opts.request_timeout;
        match self.grant_and_put(deadline).await {
            Ok(()) => {
                // Ownership passes only now: a failed re-registration must
                // not make the previous one give its key up.
                self.owners
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(self.key.clone(), self.id);
                if reply.send(Ok(())).is_err() {
                    // The caller stopped waiting (its future was dropped):
                    // nobody holds this registration.
                    self.release().await;
                    return;
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
                self.release().await;
                return;
            }
        }
        let period = (self.ttl / 3).max(Duration::from_millis(100));
        let mut stream = None;
        let mut wait = period;
        loop {
            tokio::time::sleep(wait).await;
            if !self.owns_key() {
                // A newer registration of this process replaced the key: this
                // lease holds nothing any more.
                drop(stream.take());
                self.release().await;
                std::future::pending::<()>().await;
            }
            let refreshed = self.refresh(&mut stream).await;
            tracing::trace!(key = %self.key, result = ?refreshed, "etcd keepalive");
            match refreshed {
                Refresh::Alive => {
                    self.outage.ok(&self.shared);
                    wait = period;
                }
                Refresh::Lost => {
                    self.outage.ok(&self.shared);
                    stream = None;
                    self.recover().await;
                    wait = period;
                }
                Refresh::Failed(e) => {
                    stream = None;
                    self.outage.failed(&self.shared, &e);
                    wait = period.min(Duration::from_millis(500));
                }
            }
        }
    }

    /// Gives the key up (if this registration owns it) and revokes the
    /// lease (if there is one).
    async fn release(&self) {
        {
            let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
            if owners.get(&self.key) == Some(&self.id) {
                owners.remove(&self.key);
            }
        }
        let lease = self.lease.swap(0, Ordering::SeqCst);
        if lease != 0 {
            revoke(self.client.clone(), self.shared.clone(), lease).await;
        }
    }

    fn owns_key(&self) -> bool {
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.key)
            == Some(&self.id)
    }

    /// Grants a lease and puts the key under it.
    async fn grant_and_put(&mut self, deadline: Instant) -> Result<(), EtcdError> {
        let ttl = i64::try_from(self.ttl.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        let granted = retrying("grant a lease", deadline, || {
            let mut client = self.client.clone();
            async move { client.lease_grant(ttl, None).await }
        })
        .await?;
        let lease = granted.id();
        // Stored before the put, so that a withdrawal racing with it revokes
        // this lease (and with it the key).
        self.lease.store(lease, Ordering::SeqCst);
        retrying("put", deadline, || {
            let mut client = self.client.clone();
            let (key, value) = (self.key.clone(), self.value.clone());
            async move {
                client
                    .put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// One keepalive round trip on the lease's stream (opened if needed).
    async fn refresh(&self, stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>) -> Refresh {
        let lease = self.lease.load(Ordering::SeqCst);
        let round_trip = async {
            let Some((keeper, responses)) = stream.as_mut() else {
                // Opening the stream sends a keepalive and reads its answer.
                let mut client = self.client.clone();
                return match client.lease_keep_alive(lease).await {
                    Ok(opened) => {
                        *stream = Some(opened);
                        Ok(true)
                    }
                    // The client's word for a first answer with TTL 0.
                    Err(EtcdError::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(false),
                    Err(e) if grpc_code(&e) == Some(NOT_FOUND) => Ok(false),
                    Err(e) => Err(Describe(&e).to_string()),
                };
            };
            keeper
                .keep_alive()
                .await
                .map_err(|e| Describe(&e).to_string())?;
            match responses.message().await {
                Ok(Some(resp)) => Ok(resp.ttl() > 0),
                Ok(None) => Err("etcd closed the keepalive stream".to_owned()),
                Err(e) => Err(Describe(&e).to_string()),
            }
        };
        let timeout = self.shared.opts.request_timeout;
        match tokio::time::timeout(timeout, round_trip).await {
            Ok(Ok(true)) => Refresh::Alive,
            Ok(Ok(false)) => Refresh::Lost,
            Ok(Err(e)) => Refresh::Failed(e),
            Err(_) => Refresh::Failed(timed_out("keepalive", timeout).to_string()),
        }
    }

    /// The lease is gone: put the key back under a new one, retrying until
    /// etcd accepts it.
    async fn recover(&mut self) {
        bump(&self.shared.counters.leases_lost);
        tracing::warn!(key = %self.key, lease = self.lease.load(Ordering::SeqCst),
            endpoints = %self.shared.endpoints,
            "etcd lease lost (expired during an outage, revoked, or etcd lost its data); registering again");
        let mut pause = MIN_PAUSE;
        loop {
            if !self.owns_key() {
                self.lease.store(0, Ordering::SeqCst);
                return;
            }
            let deadline = Instant::now() + self.shared.opts.request_timeout;
            match self.grant_and_put(deadline).await {
                Ok(()) => {
                    self.outage.ok(&self.shared);
                    bump(&self.shared.counters.reregistrations);
                    tracing::info!(key = %self.key, lease = self.lease.load(Ordering::SeqCst),
                        endpoints = %self.shared.endpoints, "registered again in etcd");
                    return;
                }
                Err(e) => {
                    self.outage.failed(&self.shared, &Describe(&e));
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }
}

/// The [`Lease`] of an etcd registration: withdrawing tells the lease thread,
/// which revokes the lease; the caller never waits for etcd.
#[derive(Debug)]
struct EtcdLease {
    id: u64,
    leases: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Lease for EtcdLease {
    fn withdraw(&mut self) {
        let _ = self.leases.send(Command::Withdraw { id: self.id });
        self.shared
            .counters
            .registrations
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Register { id, key, .. } => f
                .debug_struct("Register")
                .field("id", id)
                .field("key", key)
                .finish(),
            Command::Withdraw { id } => f.debug_struct("Withdraw").field("id", id).finish(),
        }
    }
}
