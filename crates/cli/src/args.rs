//! Every flag of every subcommand, defined once: parsing, `--help` and
//! validation all come from these definitions. Flags that have an environment
//! variable say so in `--help`; a flag given on the command line wins over
//! the variable.

use clap::{Args, Parser, Subcommand, ValueEnum};
use eventplane::{Config, DiscoveryKind, Scope, TransportKind};
use std::path::PathBuf;

/// eventplane: the event plane for distributed LLM serving. Workers publish
/// KV-cache events, load metrics and active sequences; routers subscribe.
#[derive(Debug, Parser)]
#[command(name = "eventplane", version)]
pub struct Cli {
    /// Log level for messages on stderr (error, warn, info, debug, trace), or a
    /// tracing filter; EVENTPLANE_LOG overrides it [default: info; warn for
    /// `demo`, whose output is its table].
    #[arg(long, global = true)]
    pub log: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the live messages of a channel as JSON lines, with sequence
    /// notices (gaps, restarts) and publishers coming and going.
    Tail(TailArgs),
    /// Publish a JSON value (or one per line of stdin) on a channel.
    Publish(PublishArgs),
    /// Measure: the transports (`bench transport`), the KV index (`bench
    /// index --workload FILE`), the relay (`bench relay`) or the frontend's
    /// routing overhead (`bench frontend`).
    Bench(BenchCommand),
    /// Internal: the remote half of a two-process benchmark.
    #[command(hide = true)]
    BenchPeer(BenchPeerArgs),
    /// The whole system on this machine, nothing to install: mock workers
    /// and a frontend replaying a real trace, once per routing mode, then a
    /// side-by-side table (prefix-cache hit rate, TTFT, latency, balance).
    Demo(DemoArgs),
    /// Publishers and a subscriber under faults: a worker killed with
    /// SIGKILL, a new one, one restarted; what the subscriber saw.
    DemoFaults(DemoFaultsArgs),
    /// Run the frontend: an OpenAI-compatible API that routes each request
    /// to the worker caching its prefix (found through discovery) and
    /// proxies the answer.
    Frontend(FrontendArgs),
    /// Run a worker: the mock engine (a simulated vLLM-style KV cache and
    /// scheduler with an OpenAI-compatible API) publishing KV events and
    /// load metrics, registered in discovery.
    Worker(WorkerArgs),
}

/// Where the event plane is: transport and discovery.
#[derive(Debug, Clone, Args)]
pub struct PlaneArgs {
    /// Transport: nats (the default; through a NATS server, see --nats-server) or zmq (peer to
    /// peer, no server; publishers are found through discovery).
    #[arg(long, env = "DYN_EVENT_PLANE", value_parser = |s: &str| s.parse::<TransportKind>())]
    pub event_plane: Option<TransportKind>,

    /// Discovery backend: file (one machine, the default), etcd (many machines, see
    /// --etcd-endpoints) or mem (one process).
    #[arg(long, env = "DYN_DISCOVERY_BACKEND", value_parser = |s: &str| s.parse::<DiscoveryKind>())]
    pub discovery: Option<DiscoveryKind>,

    /// Directory of the file discovery backend [default: $XDG_RUNTIME_DIR/eventplane/discovery,
    /// else $TMPDIR/eventplane-$UID/discovery, with /tmp for an unset TMPDIR].
    #[arg(long, env = "DYN_DISCOVERY_DIR")]
    pub discovery_dir: Option<PathBuf>,

    /// Address that ZMQ publishers bind and advertise [default: 127.0.0.1].
    #[arg(long, env = "DYN_EVENT_PLANE_HOST")]
    pub host: Option<String>,

    /// NATS server URLs, comma-separated [default: nats://localhost:4222]. Credentials and
    /// TLS come from NATS_USER/NATS_PASSWORD, NATS_TOKEN or NATS_CREDS, and NATS_CA,
    /// NATS_CERT/NATS_KEY (see the README).
    #[arg(long, env = "NATS_SERVER")]
    pub nats_server: Option<String>,

    /// etcd client URLs, comma-separated [default: http://localhost:2379].
    #[arg(long, env = "ETCD_ENDPOINTS")]
    pub etcd_endpoints: Option<String>,
}

impl PlaneArgs {
    /// The configuration: defaults, then environment, then these flags.
    pub fn config(&self) -> Result<Config, eventplane::ConfigError> {
        let mut c = Config::from_env()?;
        if let Some(t) = self.event_plane {
            c.transport = t;
        }
        if let Some(d) = self.discovery {
            c.discovery = d;
        }
        if let Some(dir) = &self.discovery_dir {
            c.discovery_dir = Some(dir.clone());
        }
        if let Some(h) = &self.host {
            c.host = h.clone();
        }
        // Flags override the environment; parse them as their variables.
        let flags = Config::from_lookup(|k| match k {
            "NATS_SERVER" => self.nats_server.clone(),
            "ETCD_ENDPOINTS" => self.etcd_endpoints.clone(),
            _ => None,
        })?;
        if self.nats_server.is_some() {
            c.nats.servers = flags.nats.servers;
        }
        if self.etcd_endpoints.is_some() {
            c.etcd_endpoints = flags.etcd_endpoints;
        }
        Ok(c)
    }
}

/// Which channel.
#[derive(Debug, Clone, Args)]
pub struct ChannelArgs {
    /// Namespace.
    #[arg(long, short = 'n', default_value = "dynamo")]
    pub namespace: String,
    /// Component within the namespace.
    #[arg(long, short = 'c')]
    pub component: String,
    /// Endpoint within the component (optional).
    #[arg(long, short = 'e')]
    pub endpoint: Option<String>,
    /// Topic, e.g. kv-events, kv-metrics, active-sequences.
    #[arg(long, short = 't')]
    pub topic: String,
}

impl ChannelArgs {
    pub fn channel(&self) -> Result<eventplane::Channel, eventplane_core::NameError> {
        let mut scope = Scope::new(&self.namespace, &self.component)?;
        if let Some(ep) = &self.endpoint {
            scope = scope.with_endpoint(ep)?;
        }
        scope.channel(&self.topic)
    }
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub plane: PlaneArgs,
    #[command(flatten)]
    pub channel: ChannelArgs,
    /// Do not print message payloads, only their envelope fields.
    #[arg(long)]
    pub no_values: bool,
    /// Do not print messages at all (notices, discovery changes and the final
    /// summary still print).
    #[arg(long)]
    pub quiet: bool,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Report a publisher as silent after this many milliseconds without a
    /// message or heartbeat.
    #[arg(long, default_value_t = 5000)]
    pub silence_ms: u64,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub plane: PlaneArgs,
    #[command(flatten)]
    pub channel: ChannelArgs,
    /// The JSON value to publish (sent as MessagePack).
    #[arg(long, default_value = "null", conflicts_with = "stdin")]
    pub value: String,
    /// Publish one JSON value per line of stdin instead.
    #[arg(long)]
    pub stdin: bool,
    /// How many times to publish the value.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Messages per second (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Publisher id: keep it stable across restarts so subscribers recognise
    /// a restart as a new incarnation [default: random].
    #[arg(long)]
    pub publisher_id: Option<u64>,
    /// Before publishing, wait until this many subscribers have joined.
    #[arg(long, default_value_t = 0)]
    pub wait_subscribers: u64,
    /// Give up waiting for subscribers after this many seconds.
    #[arg(long, default_value_t = 30)]
    pub wait_timeout_s: u64,
    /// After publishing, stay registered (heartbeating) until interrupted.
    #[arg(long)]
    pub hold: bool,
}

#[derive(Debug, Args)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub target: BenchTarget,
}

#[derive(Debug, Subcommand)]
pub enum BenchTarget {
    /// Publisher → subscriber: sustained throughput, loss past it, latency.
    Transport(TransportBenchArgs),
    /// Replay a KV workload (*.kvops.jsonl[.gz]) through the prefix index:
    /// event throughput, lookup latency, memory, and the answers' fingerprint.
    Index(IndexBenchArgs),
    /// The relay: an engine publishing vLLM-format KV events as fast as it
    /// can, the relay decoding, re-hashing and republishing them, and a
    /// subscriber receiving them; block events per second end to end.
    Relay(RelayBenchArgs),
    /// The frontend's routing overhead: requests at a fixed rate through a
    /// KV-routing frontend to mock workers that compute nothing; time to
    /// the first byte of the answer.
    Frontend(FrontendBenchArgs),
}

#[derive(Debug, Args)]
pub struct FrontendBenchArgs {
    /// Requests per second offered (open loop).
    #[arg(long, default_value_t = 1000.0, value_parser = positive_f64)]
    pub rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0, value_parser = positive_f64)]
    pub seconds: f64,
    /// Mock workers behind the frontend.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub workers: u64,
    /// Blocks (of 16 tokens) per prompt; prompts share prefixes.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub prompt_blocks: u64,
}

#[derive(Debug, Args)]
pub struct RelayBenchArgs {
    /// Engine batches to send (each one BlockStored and one BlockRemoved
    /// event). Kept under the sockets' high-water marks, so nothing is
    /// dropped.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=90_000))]
    pub batches: u64,
    /// Blocks per event.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub blocks_per_event: u64,
    /// Tokens per block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub block_size: u64,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchTransport {
    /// eventplane over ZMQ, subscriber in this process.
    Zmq,
    /// eventplane's in-process transport.
    Mem,
    /// Raw libzmq PUB/SUB, the ZMQ baseline.
    RawZmq,
    /// eventplane over NATS (a `nats-server`; see --nats-server).
    Nats,
    /// Raw async-nats publish/subscribe through the same server, the NATS baseline.
    RawNats,
}

#[derive(Debug, Args)]
pub struct TransportBenchArgs {
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,4096")]
    pub sizes: Vec<usize>,
    /// Transports to measure. Each one's baseline is added when missing (raw-zmq for zmq and
    /// mem, raw-nats for nats): ratios compare with it.
    #[arg(
        long,
        alias = "transport",
        value_delimiter = ',',
        default_value = "mem,zmq,nats"
    )]
    pub transports: Vec<BenchTransport>,
    /// NATS server for the nats transports [default: a nats-server this bench starts on a free
    /// loopback port].
    #[arg(long)]
    pub nats_server: Option<String>,
    /// Also run every transport but `mem` with its publisher in a second
    /// process (the bench starts `eventplane bench-peer`); `false`: one
    /// process only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub two_process: bool,
    /// Seconds per throughput trial.
    #[arg(long, default_value_t = 1.0, value_parser = positive_seconds)]
    pub trial_s: f64,
    /// Throughput bisections per transport. Each step of a bisection runs
    /// every transport's trial in turn (so a noisy moment of the machine
    /// lands on all of them); the sustained rate reported is the median of
    /// the rounds. With 6 or more, the paired throughput ratio gets a 95 %
    /// interval and a verdict on the target.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub throughput_rounds: u32,
    /// Offered rate of the latency run, messages per second.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub latency_rate: u64,
    /// Seconds of each latency round.
    #[arg(long, default_value_t = 3.0, value_parser = positive_seconds)]
    pub latency_s: f64,
    /// Latency rounds per transport, alternating between transports (each
    /// round starting one transport later, so every one takes every place
    /// and none runs twice in a row); each percentile reported is the
    /// median of the rounds. With 6 or more, the paired p99 ratio gets a
    /// 95 % interval and a verdict on the target (met, missed, unresolved).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub latency_rounds: u32,
    /// Repeat a latency round (up to 3 more times, then keep the quietest
    /// attempt) while the hypervisor takes more than this percentage of the
    /// VM's CPU during it ("steal", from /proc/stat). On a shared VM p99
    /// follows the neighbours' load round by round; this keeps the rounds
    /// compared to the quieter moments, the same rule for every transport.
    /// Likewise a throughput trial that loses messages while the host is
    /// that busy is run again (up to 3 times a step) instead of counting as
    /// a failure. The JSON rows list each kept round's steal and how many
    /// rounds and trials were repeated. Default: keep every round and trial.
    #[arg(long, value_name = "PCT", value_parser = parse_percent)]
    pub max_steal: Option<f64>,
    /// Also run each baseline a second time, as a row of its own
    /// (`raw-libzmq-control`, `raw-async-nats-control`) taking its turns and
    /// compared with the baseline like the other transports. Two runs of the
    /// same code differ only by the host's noise, so the control's ratios show
    /// how far from 1.00 a ratio lands by chance during this run: the
    /// resolution of the others.
    #[arg(long)]
    pub control: bool,
    /// Send this many payload bytes in the control rows instead of the
    /// row's size (needs --control; the row is named
    /// `…-control-<BYTES>B`). The control then measures, round by round
    /// beside the baseline, what the baseline itself pays for a longer or
    /// shorter message: with `--sizes 100 --control-size 128`, what raw
    /// pays for a message as long as the bench's eventplane messages over
    /// NATS (a 100 B payload in wire format 2's envelope). (Rows of different
    /// sizes run minutes apart, and on a shared host they differ by more
    /// than a size's effect; a paired control does not.)
    #[arg(long, value_name = "BYTES", requires = "control")]
    pub control_size: Option<usize>,
    /// Measure latency only: skip the throughput bisection and the unpaced
    /// trial (their columns are left empty). For quick comparisons while
    /// tuning; the README's table comes from a full run.
    #[arg(long)]
    pub latency_only: bool,
    /// Where eventplane's subscriber receives: on a thread of its own that
    /// blocks in `recv_blocking` (as the raw libzmq baseline's does), or with
    /// `recv().await` in the bench's current-thread async runtime (as the
    /// raw async-nats baseline's does). `auto`: a thread over ZMQ, async
    /// otherwise (over NATS the client's messages come from the runtime, and
    /// a thread adds a hop: measured 0.69× raw throughput against 0.80×).
    #[arg(long, value_enum, default_value_t = ReceiveOn::Auto)]
    pub receive: ReceiveOn,
    /// Print the results as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Where a benchmark's subscriber receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReceiveOn {
    /// A thread over ZMQ, async otherwise.
    Auto,
    /// A thread of its own, blocking in `recv_blocking`.
    Thread,
    /// `recv().await` on the async runtime.
    Async,
}

#[derive(Debug, Args)]
pub struct IndexBenchArgs {
    /// The workload to replay (format: shared/workloads/FORMAT.md).
    #[arg(long)]
    pub workload: PathBuf,
    /// Also run lookups without pause on a second thread (through a
    /// lock-free reader) while the events are applied, and report their
    /// latency too.
    #[arg(long)]
    pub concurrent_queries: bool,
    /// Replay the workload this many times (fresh index each time) and report
    /// the median run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..))]
    pub runs: u32,
}

#[derive(Debug, Args)]
pub struct BenchPeerArgs {
    /// Which publisher to run: zmq, raw-zmq, nats or raw-nats.
    #[arg(long, value_enum)]
    pub transport: BenchTransport,
    /// Endpoint (raw-zmq) to bind, discovery directory (zmq) or server URL (nats, raw-nats).
    #[arg(long)]
    pub target: String,
    /// Topic of the bench channel (zmq).
    #[arg(long, default_value = "t")]
    pub topic: String,
    /// Payload size.
    #[arg(long)]
    pub size: usize,
    /// Messages to send.
    #[arg(long)]
    pub count: u64,
    /// Messages per second (0: unpaced).
    #[arg(long)]
    pub rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RouterMode {
    /// The cheapest worker by cost: cached prefix against load.
    Kv,
    /// Workers in turn.
    RoundRobin,
    /// A worker at random.
    Random,
}

#[derive(Debug, Args)]
pub struct FrontendArgs {
    #[command(flatten)]
    pub plane: PlaneArgs,
    /// Namespace of the workers.
    #[arg(long, short = 'n', default_value = "dynamo")]
    pub namespace: String,
    /// Component of the workers.
    #[arg(long, short = 'c', default_value = "backend")]
    pub component: String,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1")]
    pub http_host: std::net::IpAddr,
    /// Port of the HTTP API (0: any free port; the URL is printed).
    #[arg(long, default_value_t = 8000)]
    pub http_port: u16,
    /// How to choose a worker.
    #[arg(long, value_enum, default_value = "kv")]
    pub router_mode: RouterMode,
    /// Route without KV events: predict caches from our own decisions
    /// (approximate index); opens no event-plane socket.
    #[arg(long)]
    pub no_kv_events: bool,
    /// Share request bookings with the other frontends of the same
    /// namespace and component over the event plane, so all route on one
    /// view of load.
    #[arg(long)]
    pub router_replica_sync: bool,
    /// What a cached block is worth against a block of load in the cost
    /// (higher favours cache hits, lower favours balance).
    #[arg(long, default_value_t = 8.0, value_parser = non_negative_f64)]
    pub overlap_weight: f64,
    /// Softmax temperature of the choice (0: always the cheapest, ties at
    /// random).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    pub router_temperature: f64,
    /// Tokens per block for hashing prompts [default: the workers' own,
    /// from their registrations].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub block_size: Option<u32>,
    /// This replica's id [default: random].
    #[arg(long)]
    pub router_id: Option<u64>,
    /// A Hugging Face tokenizer.json to tokenize prompts with (it must be
    /// the workers' own) [default: the built-in tokenizer of the mock engine].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// A number that `ok` accepts, or an error saying what was `expected`.
fn parse_f64_where(s: &str, ok: impl Fn(f64) -> bool, expected: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if ok(v) => Ok(v),
        _ => Err(format!("expected {expected}, got `{s}`")),
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    parse_f64_where(
        s,
        |v| (0.0..=100.0).contains(&v),
        "a percentage from 0 to 100",
    )
}

/// A duration in seconds: finite and above zero (a trial of no time would
/// send nothing and pass at any rate).
fn positive_seconds(s: &str) -> Result<f64, String> {
    parse_f64_where(s, |v| v > 0.0 && v.is_finite(), "a number of seconds > 0")
}

fn non_negative_f64(s: &str) -> Result<f64, String> {
    parse_f64_where(s, |v| v >= 0.0 && v.is_finite(), "a number ≥ 0")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// The built-in simulated engine.
    Mock,
    /// Relay a vLLM engine's KV events (--kv-events-endpoint).
    Vllm,
    /// Relay an SGLang engine's KV events (same format as vLLM's).
    Sglang,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub plane: PlaneArgs,
    /// Which engine.
    #[arg(long, value_enum, default_value = "mock")]
    pub engine: EngineKind,
    /// Namespace the worker publishes and registers in.
    #[arg(long, short = 'n', default_value = "dynamo")]
    pub namespace: String,
    /// Component within the namespace.
    #[arg(long, short = 'c', default_value = "backend")]
    pub component: String,
    /// Model name served (requests naming another model get 404).
    #[arg(long, default_value = "mock-model")]
    pub model: String,
    /// Worker id in KV events, load metrics and discovery (keep it across
    /// restarts so routers recognise the worker) [default: random].
    #[arg(long)]
    pub worker_id: Option<u64>,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1")]
    pub http_host: std::net::IpAddr,
    /// Port of the HTTP API (0: any free port; the chosen URL is printed).
    #[arg(long, default_value_t = 0)]
    pub http_port: u16,
    /// KV blocks in the simulated pool.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub num_gpu_blocks: u64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub block_size: u64,
    /// Most requests running at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_num_seqs: u64,
    /// Most tokens computed in one engine step (longer prompts prefill in
    /// chunks).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_num_batched_tokens: u64,
    /// Run the simulated GPU this many times faster than real time.
    #[arg(long, default_value_t = 1.0, value_parser = positive_f64)]
    pub speedup: f64,
    /// Requests that may wait to be admitted before new ones get 503.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue: u64,
    /// Mock: also publish KV events in vLLM's own ZMQ format on this port
    /// (0: any free port), with vLLM's replay socket on the next port, e.g.
    /// to test a relay against it.
    #[arg(long)]
    pub zmq_kv_events_port: Option<u16>,
    /// Relay: the engine's KV-event PUB socket (rank 0's with
    /// --data-parallel-size; rank r uses port + r), e.g. tcp://127.0.0.1:5557.
    #[arg(long, required_if_eq_any = [("engine", "vllm"), ("engine", "sglang")])]
    pub kv_events_endpoint: Option<String>,
    /// Relay: the engine's replay (ROUTER) socket, rank 0's; rank r uses
    /// port + r. Without it, missing messages cannot be recovered.
    #[arg(long)]
    pub replay_endpoint: Option<String>,
    /// Relay: the engine's OpenAI API, registered for frontends.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub engine_url: String,
    /// Relay: data-parallel ranks of the engine, each with its own sockets.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub data_parallel_size: u32,
    /// Relay: the engine's topic filter (vLLM's default: empty).
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,
    /// Relay: engine blocks tracked per rank, at most (the engine-hash map
    /// needed to translate removals).
    #[arg(long, default_value_t = 4_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tracked_blocks: u64,
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("expected a positive number, got `{s}`")),
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The trace to replay (Mooncake format: timestamp, input_length,
    /// output_length, hash_ids) [default: shared/data/mooncake/conversation_trace.jsonl,
    /// looked up beside the project and the working directory].
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Replay only the first N requests of the trace.
    #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,
    /// Time compression: the trace's timestamps and the workers' simulated
    /// GPU both run this many times faster than real time.
    #[arg(long, default_value_t = 60.0, value_parser = positive_f64)]
    pub speedup: f64,
    /// Mock workers.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub workers: u64,
    /// Tokens per block, and per trace hash id (the trace's blocks are 512
    /// tokens; a smaller size keeps the demo fast with the same prefix
    /// structure).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=512))]
    pub block_size: u64,
    /// KV blocks per worker (one trace hash id each).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(16..))]
    pub num_gpu_blocks: u64,
    /// Routing modes to compare, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kv,kv-no-events,round-robin,random"
    )]
    pub modes: Vec<DemoMode>,
    /// Weight of the prefill term in the KV modes' cost (see `frontend
    /// --overlap-weight`).
    #[arg(long, default_value_t = 8.0, value_parser = non_negative_f64)]
    pub overlap_weight: f64,
    /// Print the table as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also draw the table as an SVG chart.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DemoMode {
    /// KV-aware routing fed by KV events.
    Kv,
    /// KV-aware routing predicted from the router's own decisions.
    KvNoEvents,
    /// Workers in turn.
    RoundRobin,
    /// A worker at random.
    Random,
}

#[derive(Debug, Args)]
pub struct DemoFaultsArgs {
    #[command(flatten)]
    pub plane: PlaneArgs,
    /// Number of publishers (workers).
    #[arg(long, default_value_t = 3)]
    pub publishers: u64,
    /// Messages per second per publisher.
    #[arg(long, default_value_t = 20_000.0)]
    pub rate: f64,
    /// Seconds each phase lasts.
    #[arg(long, default_value_t = 1.0)]
    pub phase_s: f64,
}
