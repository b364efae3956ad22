use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::BridgeConfig;
use clap::{Parser, Subcommand};

/// Cloud bridge: Kafka into MySQL and OpenSearch, exactly once; the device
/// registry the gateways sync from.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML); `CLOUD_BRIDGE_*` environment variables override it.
    #[arg(long, short, global = true, env = "CLOUD_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Apply schema migrations and exit.
    Migrate,
    /// The device registry and geofences in MySQL.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Gateways' registry API tokens.
    #[command(subcommand)]
    Gateway(GatewayCommand),
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Import devices (`.csv`) or geofences (`.geojson`, `.json`: a GeoJSON
    /// FeatureCollection). Every row is validated before anything is
    /// written; the import is one transaction.
    Import {
        file: PathBuf,
        /// Delete the devices (or fences) the file does not list.
        #[arg(long)]
        replace: bool,
    },
    /// Print a registry document (the agent's format; what a gateway gets).
    Export {
        /// Only what this gateway gets (default: the whole fleet).
        #[arg(long)]
        gateway: Option<String>,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum GatewayCommand {
    /// Register a gateway or rotate its token; prints the new token once
    /// (only its SHA-256 is stored).
    Token { gateway_id: String },
    /// Revoke a gateway's token.
    Revoke { gateway_id: String },
}

/// The `cloud-bridge` command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,rdkafka=warn,sqlx=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match BridgeConfig::load(cli.config.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cloud-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloud-bridge: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Run) {
            Command::Migrate => crate::connect_and_migrate(&config).await.map(|_| ()),
            Command::Registry(c) => registry_command(&config, c).await,
            Command::Gateway(c) => gateway_command(&config, c).await,
            Command::Run => {
                let stats = Arc::new(crate::sinks::mysql::MysqlSinkStats::default());
                crate::run(config, stats, shutdown_signal()).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloud-bridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn registry_command(config: &BridgeConfig, command: RegistryCommand) -> anyhow::Result<()> {
    use crate::registry;
    use anyhow::Context as _;
    match command {
        RegistryCommand::Import { file, replace } => {
            let ext = file
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .unwrap_or_default();
            let size = std::fs::metadata(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            anyhow::ensure!(
                size <= edge_agent::registry::MAX_REGISTRY_BYTES,
                "{} is {size} bytes, more than the {}-byte limit",
                file.display(),
                edge_agent::registry::MAX_REGISTRY_BYTES
            );
            let progress = |what: &'static str, total: usize| {
                let mut last = std::time::Instant::now();
                move |done: usize| {
                    if done == total || last.elapsed() >= std::time::Duration::from_secs(1) {
                        eprintln!("{what}: {done}/{total} written");
                        last = std::time::Instant::now();
                    }
                }
            };
            match ext.as_str() {
                "csv" => {
                    let reader = std::fs::File::open(&file)
                        .with_context(|| format!("opening {}", file.display()))?;
                    let devices = registry::devices_from_csv(std::io::BufReader::new(reader))
                        .with_context(|| {
                            format!("{} refused; nothing was written", file.display())
                        })?;
                    let pool = crate::connect_and_migrate(config).await?;
                    let n = registry::put_devices(
                        &pool,
                        &devices,
                        replace,
                        progress("devices", devices.len()),
                    )
                    .await?;
                    eprintln!(
                        "imported {n} devices from {}{}",
                        file.display(),
                        if replace { " (others deleted)" } else { "" }
                    );
                }
                "geojson" | "json" => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let fences = registry::fences_from_geojson(&text).with_context(|| {
                        format!("{} refused; nothing was written", file.display())
                    })?;
                    let pool = crate::connect_and_migrate(config).await?;
                    let n = registry::put_fences(
                        &pool,
                        &fences,
                        replace,
                        progress("fences", fences.len()),
                    )
                    .await?;
                    eprintln!(
                        "imported {n} fences from {}{}",
                        file.display(),
                        if replace { " (others deleted)" } else { "" }
                    );
                }
                _ => anyhow::bail!(
                    "{}: give devices as .csv or geofences as .geojson/.json",
                    file.display()
                ),
            }
            Ok(())
        }
        RegistryCommand::Export { gateway, output } => {
            if let Some(g) = &gateway {
                anyhow::ensure!(
                    edge_agent::config::is_valid_id(g),
                    "--gateway {g:?} is not a valid id"
                );
            }
            let pool = crate::connect_and_migrate(config).await?;
            let doc = registry::document(&pool, gateway.as_deref()).await?;
            match output {
                Some(path) => {
                    std::fs::write(&path, doc.json.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "exported {} devices and {} fences (version {}) to {}",
                        doc.devices,
                        doc.fences,
                        doc.version,
                        path.display()
                    );
                }
                None => println!("{}", doc.json),
            }
            Ok(())
        }
    }
}

async fn gateway_command(config: &BridgeConfig, command: GatewayCommand) -> anyhow::Result<()> {
    let pool = crate::connect_and_migrate(config).await?;
    match command {
        GatewayCommand::Token { gateway_id } => {
            let token = crate::registry::issue_token(&pool, &gateway_id).await?;
            eprintln!(
                "token for gateway {gateway_id} (shown once; put it in the agent's cloud_sync.token_file):"
            );
            println!("{token}");
        }
        GatewayCommand::Revoke { gateway_id } => {
            anyhow::ensure!(
                crate::registry::revoke_gateway(&pool, &gateway_id).await?,
                "gateway {gateway_id} is not registered"
            );
            eprintln!("revoked the token of gateway {gateway_id}");
        }
    }
    Ok(())
}
