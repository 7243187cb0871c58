//! `eventplane`: the command-line entry point. Parses flags into validated
//! settings, sets up logging (to stderr: stdout is reserved for output that
//! programs read, such as `tail`'s JSON lines), runs the subcommand, and maps
//! failures to exit codes (2: bad configuration or flags, 1: anything else).

mod args;
mod bench;
mod demo;
mod demo_faults;
mod frontend;
mod pace;
mod publish;
mod tail;
mod worker;

use clap::Parser;

/// The system allocator, counting live bytes so `bench index` can report
/// the index's memory as measured rather than estimated.
#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    let default_level = match cli.command {
        args::Command::Demo(_) => "warn",
        _ => "info",
    };
    let level = cli.log.as_deref().unwrap_or(default_level);
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("EVENTPLANE_LOG").unwrap_or_else(|_| {
            // async-nats logs every client event at info (one line per
            // slow-consumer drop); the transport counts and logs them once.
            // notify (file discovery's directory watcher) logs at info when
            // a watched directory is removed, which says nothing to act on.
            tracing_subscriber::EnvFilter::new(format!("{level},async_nats=warn,notify=warn"))
        });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_target(false)
        .init();

    // Benchmarks receive on one thread, as the raw libzmq baseline does; a
    // multi-threaded runtime adds cross-thread wake-ups to every message.
    let mut builder = match cli.command {
        args::Command::Bench(_) | args::Command::BenchPeer(_) => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let config_error = e.chain().any(|c| {
                c.downcast_ref::<eventplane::ConfigError>().is_some()
                    || matches!(
                        c.downcast_ref::<eventplane::PlaneError>(),
                        Some(eventplane::PlaneError::Unsupported(_))
                    )
            });
            std::process::ExitCode::from(if config_error { 2 } else { 1 })
        }
    }
}

async fn run(command: args::Command) -> anyhow::Result<()> {
    match command {
        args::Command::Tail(a) => tail::run(a).await,
        args::Command::Publish(a) => publish::run(a).await,
        args::Command::Bench(b) => match b.target {
            // A signal drops the bench, and with it the `nats-server` it
            // started (killed on drop): the default action would end the
            // process without running any drop, leaving the server behind.
            args::BenchTarget::Transport(a) => tokio::select! {
                r = bench::transport::run(a) => r,
                r = interrupted() => {
                    r?;
                    anyhow::bail!("interrupted; stopped the servers the bench had started")
                }
            },
            args::BenchTarget::Index(a) => bench::index::run(a),
            args::BenchTarget::Relay(a) => bench::relay::run(a).await,
            args::BenchTarget::Frontend(a) => bench::frontend::run(a).await,
        },
        args::Command::BenchPeer(a) => bench::transport::peer(a).await,
        args::Command::Demo(a) => demo::run(a).await,
        args::Command::DemoFaults(a) => demo_faults::run(a).await,
        args::Command::Worker(a) => worker::run(a).await,
        args::Command::Frontend(a) => frontend::run(a).await,
    }
}

/// Resolves on Ctrl-C or `SIGTERM`: how long-running commands know to stop.
pub async fn interrupted() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
