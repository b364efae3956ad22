use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::{AgentError, Config, Stats};
use clap::{Parser, Subcommand};

/// Edge gateway agent: devices in, validated and durable, to Kafka exactly once.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML). Without it the built-in `board-configs/sim.toml` is used.
    #[arg(long, short, global = true, env = "EDGE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the config and exit.
    CheckConfig,
    /// Check config, serial ports, broker, Kafka, disk and clock; print a verdict per check.
    Doctor,
    /// Replay a JSON-lines file (one reading per line) into the outbox, with a
    /// progress bar. Stop the running agent first; it ships the result when
    /// it starts again.
    Import {
        /// The file, one JSON reading per line.
        file: PathBuf,
    },
    /// Show backlog, rates, device count, uplink state and recent errors of
    /// the running agent (from its http.listen endpoint), or what the data
    /// folder says when it is not running (exit code 3).
    Status {
        /// Print the running agent's `/status` JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Caps glibc's malloc at two arenas unless `MALLOC_ARENA_MAX` is set.
/// glibc gives threads that contend for the heap arenas of their own (up to
/// eight per core), and memory freed in an arena stays there. With the
/// agent's threads (tokio's, the batch writer, the uplink, librdkafka's)
/// that made 13 arena heaps at saturation through MQTT, and about 7 MB
/// more anonymous memory than with two arenas at the same point of a run
/// (README, Performance). Runs before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only tunes the allocator, and no other thread
        // exists yet to be allocating meanwhile.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// The `edge-agent` command line: parses the arguments, sets up logging and
/// runs the subcommand.
pub fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .with(crate::ops::RecentEventsLayer)
            .init();
    }
    let config = match &cli.config {
        Some(path) => Config::from_file(path),
        None => Config::embedded_default(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-agent: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            // The files the config names for the cloud sync (token, CA).
            if let Err(e) = crate::sync::CloudSync::from_config(&config, Arc::new(Stats::default()))
            {
                eprintln!("edge-agent: {e}");
                return ExitCode::from(2);
            }
            println!("config ok: gateway {}", config.gateway_id);
            ExitCode::SUCCESS
        }
        Command::Run => run(config),
        Command::Doctor => doctor(&config, cli.config.as_deref()),
        Command::Import { file } => import(config, &file),
        Command::Status { json } => status(&config, json),
    }
}

fn status(config: &Config, json: bool) -> ExitCode {
    let listen = &config.http.listen;
    let running = if listen.is_empty() {
        Ok(None)
    } else {
        crate::ops::fetch(listen, "/status")
    };
    match running {
        Ok(Some((200, body))) => {
            if json {
                print!("{body}");
                return ExitCode::SUCCESS;
            }
            match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) if v["gateway_id"].as_str() != Some(config.gateway_id.as_str()) => {
                    eprintln!(
                        "edge-agent: the agent answering on {listen} is gateway {}, not {} of this config; \
                         give each agent its own http.listen",
                        v["gateway_id"], config.gateway_id
                    );
                    ExitCode::FAILURE
                }
                Ok(v) => {
                    print!("{}", crate::ops::render_status(&v));
                    if v["healthy"].as_bool() == Some(true) {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("edge-agent: {listen} answered /status with invalid JSON: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Ok(Some((code, body))) => {
            eprintln!("edge-agent: {listen} answered /status with HTTP {code}: {body}");
            ExitCode::FAILURE
        }
        Ok(None) | Err(_) => {
            match &running {
                Err(e) => println!("edge-agent does not answer on {listen}: {e:#}"),
                Ok(_) if listen.is_empty() => {
                    println!("http.listen is off: showing what the data folder says")
                }
                Ok(_) => println!("edge-agent is not running (nothing listens on {listen})"),
            }
            match crate::ops::offline_status(config) {
                Ok(text) => print!("{text}"),
                Err(e) => eprintln!("edge-agent: cannot read the data folder: {e:#}"),
            }
            // 3: not running. Something there that does not answer is a
            // failure, not a stopped agent.
            if running.is_err() {
                ExitCode::FAILURE
            } else {
                ExitCode::from(3)
            }
        }
    }
}

/// The async runtime, or `None` after saying why it could not start.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("edge-agent: cannot start the async runtime: {e}");
            None
        }
    }
}

fn run(config: Config) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let stats = Arc::new(Stats::default());
    let result = runtime.block_on(crate::run(config, stats, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(AgentError::Fenced(e)) => {
            eprintln!("edge-agent: {e}");
            ExitCode::from(3)
        }
        Err(AgentError::Other(e)) => {
            eprintln!("edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn import(config: Config, file: &std::path::Path) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let stats = Arc::new(Stats::default());
    match runtime.block_on(crate::import::import(config, stats, file, true)) {
        Ok(s) => {
            println!(
                "imported {} lines ({} bytes) in {:.2} s: {} valid, {} rejected, {} duplicates ({:.0} readings/s)",
                s.lines,
                s.bytes,
                s.seconds,
                s.valid,
                s.rejected,
                s.duplicates,
                (s.valid + s.rejected + s.duplicates) as f64 / s.seconds.max(1e-3)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-agent: import failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn doctor(config: &Config, path: Option<&std::path::Path>) -> ExitCode {
    let origin = path.map_or_else(
        || "built-in board-configs/sim.toml".to_string(),
        |p| p.display().to_string(),
    );
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let checks = runtime.block_on(crate::doctor::run(config, &origin));
    match crate::doctor::print(&checks) {
        crate::doctor::Verdict::Fail => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
