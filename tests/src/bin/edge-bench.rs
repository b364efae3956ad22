//! edge-bench: the end-to-end load benchmark.
//!
//! Runs the real `edge-agent` (and `cloud-bridge`) binaries against the
//! test services (`tests/services/up`), drives them at a target rate and
//! writes, per run, a JSON result and an SVG plot (throughput and latency
//! percentiles over time). `suite` runs the reference points, a rate sweep
//! and the latency run, and writes `summary.md`. `sinks` measures the
//! bridge alone draining a pre-filled backlog into MariaDB and OpenSearch.
//!
//! Build the binaries in release mode first:
//!   cargo build --release -p edge-agent -p cloud-bridge -p edge-tests --bin edge-bench

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use edge_tests::bench::{self, BucketPercentiles, Feed, RunResult, RunSpec};
use edge_tests::sinkbench::{SinkBenchSpec, SinkTuning};

#[derive(Parser)]
#[command(about = "End-to-end load benchmark of the edge agent")]
struct Cli {
    /// The agent binary (default: `edge-agent` next to this one).
    #[arg(long, global = true)]
    agent_bin: Option<PathBuf>,
    /// The bridge binary (default: `cloud-bridge` next to this one).
    #[arg(long, global = true)]
    bridge_bin: Option<PathBuf>,
    /// Where results, plots and logs go.
    #[arg(long, global = true, default_value = "bench-results")]
    out: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum FeedArg {
    Mqtt,
    Direct,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run.
    Run {
        #[arg(long, value_enum, default_value = "mqtt")]
        feed: FeedArg,
        /// Readings per second; 0 = open loop.
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Seconds.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Also run the bridge into MariaDB and measure the rows.
        #[arg(long)]
        bridge: bool,
        /// MQTT connections the devices share.
        #[arg(long, default_value_t = 2)]
        connections: usize,
        #[arg(long, default_value = "run")]
        name: String,
        /// Milliseconds of round trip added between the agent and Kafka
        /// (half each way, through a proxy on the broker's WAN listener),
        /// as for a broker in a cloud region. The bridge and the measuring
        /// consumer connect directly.
        #[arg(long, default_value_t = 0)]
        kafka_rtt_ms: u64,
        /// Register the devices and have them drive through this many
        /// geofences (MQTT feed): enrichment, fence state and alerts on
        /// the path. Without it the devices are unregistered and stay put.
        #[arg(long)]
        fences: Option<usize>,
    },
    /// Reference point: a transactional Kafka producer alone.
    KafkaAlone {
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Records per transaction.
        #[arg(long, default_value_t = 4096)]
        per_transaction: usize,
    },
    /// Reference point: what Mosquitto alone passes from the simulated
    /// devices to one QoS 1 subscriber (no agent).
    MosquittoAlone {
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Readings per second over all devices (0 = open loop).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// MQTT connections the devices share.
        #[arg(long, default_value_t = 2)]
        connections: usize,
    },
    /// Reference points, the rate sweep and the latency run; writes summary.md.
    Suite {
        /// Seconds per run.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Rates of the sweep (0 = open loop).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "1000,10000,50000,100000,0"
        )]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        #[arg(long, default_value_t = 2)]
        connections: usize,
    },
    /// The bridge's sinks alone: drain a pre-filled backlog into MariaDB
    /// (exactly-once) and OpenSearch (alerts).
    Sinks(SinksArgs),
}

#[derive(clap::Args)]
struct SinksArgs {
    /// Enriched readings for the MariaDB sink (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Alerts for the OpenSearch sink (0: skip it).
    #[arg(long, default_value_t = 200_000)]
    alerts: u64,
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Records per Kafka transaction when pre-filling.
    #[arg(long, default_value_t = 4096)]
    per_transaction: usize,
    /// Bridge `mysql.batch_max_records` (default: the bridge's).
    #[arg(long)]
    batch_max_records: Option<usize>,
    /// Bridge `mysql.batch_linger_ms`.
    #[arg(long)]
    batch_linger_ms: Option<u64>,
    /// Bridge `mysql.rows_per_insert`.
    #[arg(long)]
    rows_per_insert: Option<usize>,
    /// Bridge `opensearch.bulk_max_docs`.
    #[arg(long)]
    bulk_max_docs: Option<usize>,
    /// Bridge `opensearch.batch_linger_ms`.
    #[arg(long)]
    alerts_linger_ms: Option<u64>,
    /// Extra librdkafka property of the bridge's consumers, KEY=VALUE
    /// (repeatable).
    #[arg(long, value_parser = key_value)]
    librdkafka: Vec<(String, String)>,
    /// Fail when nothing is stored for this many seconds.
    #[arg(long, default_value_t = 60)]
    stall_seconds: u64,
    /// Seconds between `SELECT COUNT(*)` queries on MariaDB during a drain.
    /// Progress comes from the sink's offsets; the table is counted once
    /// they stop moving. Each count scans an index: once a second, that
    /// took MariaDB about 0.17 s of CPU per second, from the sink.
    #[arg(long, default_value_t = 60)]
    count_every: u64,
    /// Before each drain, wait up to this many seconds for the machine to
    /// be quiet (0: don't wait).
    #[arg(long, default_value_t = 0)]
    wait_quiet: u64,
    #[arg(long, default_value = "sinks")]
    name: String,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let agent_bin = cli
        .agent_bin
        .clone()
        .unwrap_or_else(|| sibling("edge-agent"));
    let bridge_bin = cli
        .bridge_bin
        .clone()
        .unwrap_or_else(|| sibling("cloud-bridge"));
    let needed = match cli.command {
        Cmd::Sinks(_) => vec![&bridge_bin],
        _ => vec![&agent_bin, &bridge_bin],
    };
    for bin in needed {
        if !bin.exists() {
            eprintln!(
                "edge-bench: {} not found. Build it first: cargo build --release -p edge-agent -p cloud-bridge \
                 (or pass --agent-bin/--bridge-bin)",
                bin.display()
            );
            return ExitCode::from(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let spec =
        |name: &str, feed: Feed, rate: f64, devices, duration, bridge, connections| RunSpec {
            name: name.to_string(),
            feed,
            devices,
            rate,
            duration: Duration::from_secs(duration),
            bridge,
            connections,
            agent_bin: agent_bin.clone(),
            bridge_bin: bridge_bin.clone(),
            out_dir: cli.out.clone(),
            kafka_rtt: Duration::ZERO,
            fences: None,
        };
    let result = runtime.block_on(async {
        match &cli.command {
            Cmd::Run {
                feed,
                rate,
                devices,
                duration,
                bridge,
                connections,
                name,
                kafka_rtt_ms,
                fences,
            } => {
                let feed = match feed {
                    FeedArg::Mqtt => Feed::Mqtt,
                    FeedArg::Direct => Feed::Direct,
                };
                let r = bench::run(&RunSpec {
                    kafka_rtt: Duration::from_millis(*kafka_rtt_ms),
                    fences: *fences,
                    ..spec(
                        name,
                        feed,
                        *rate,
                        *devices,
                        *duration,
                        *bridge,
                        *connections,
                    )
                })
                .await?;
                println!("{}", summary_row(&r));
                Ok(())
            }
            Cmd::KafkaAlone {
                duration,
                per_transaction,
            } => {
                let (d, n) = (Duration::from_secs(*duration), *per_transaction);
                let (rate, ms) = tokio::task::spawn_blocking(move || bench::kafka_alone(d, n)).await??;
                println!("Kafka transactional producer alone: {rate:.0} records/s, {n} per transaction, {ms:.1} ms per transaction");
                Ok(())
            }
            Cmd::MosquittoAlone {
                duration,
                rate,
                devices,
                connections,
            } => {
                let (passed, latency) = bench::mosquitto_alone(
                    *devices,
                    *connections,
                    Duration::from_secs(*duration),
                    *rate,
                )
                .await?;
                println!(
                    "Mosquitto alone: {passed:.0} readings/s ({devices} devices over {connections} connections, one QoS 1 subscriber); \
                     device to subscriber p50 / p99 / p99.9 / max {:.0} / {:.0} / {:.0} / {:.0} ms",
                    latency.p50, latency.p99, latency.p999, latency.max
                );
                Ok(())
            }
            Cmd::Suite {
                duration,
                rates,
                devices,
                connections,
            } => suite(&spec, *duration, rates, *devices, *connections, &cli.out).await,
            Cmd::Sinks(a) => {
                let r = edge_tests::sinkbench::run(&SinkBenchSpec {
                    name: a.name.clone(),
                    metrics: a.records,
                    alerts: a.alerts,
                    devices: a.devices,
                    partitions: a.partitions,
                    per_transaction: a.per_transaction,
                    tuning: SinkTuning {
                        mysql_batch_max_records: a.batch_max_records,
                        mysql_batch_linger_ms: a.batch_linger_ms,
                        mysql_rows_per_insert: a.rows_per_insert,
                        opensearch_bulk_max_docs: a.bulk_max_docs,
                        opensearch_batch_linger_ms: a.alerts_linger_ms,
                        librdkafka_options: a.librdkafka.clone(),
                    },
                    stall_timeout: Duration::from_secs(a.stall_seconds),
                    count_every: Duration::from_secs(a.count_every),
                    quiet_wait: Duration::from_secs(a.wait_quiet),
                    bridge_bin: bridge_bin.clone(),
                    out_dir: cli.out.clone(),
                })
                .await?;
                print!("{}", r.summary());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

type SpecFn<'a> = dyn Fn(&str, Feed, f64, usize, u64, bool, usize) -> RunSpec + 'a;

async fn suite(
    spec: &SpecFn<'_>,
    duration: u64,
    rates: &[f64],
    devices: usize,
    connections: usize,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let d = Duration::from_secs(duration);
    eprintln!("reference: Mosquitto alone ({duration} s)");
    let (mosquitto, _) = bench::mosquitto_alone(devices, connections, d, 0.0).await?;
    eprintln!("  {mosquitto:.0} readings/s");
    eprintln!("reference: Mosquitto alone at 10000 readings/s ({duration} s)");
    let (_, broker_hop) = bench::mosquitto_alone(devices, connections, d, 10_000.0).await?;
    eprintln!(
        "  device to subscriber p50 / p99 {:.0} / {:.0} ms",
        broker_hop.p50, broker_hop.p99
    );
    eprintln!("reference: Kafka transactional producer alone ({duration} s)");
    let (kafka, kafka_ms) =
        tokio::task::spawn_blocking(move || bench::kafka_alone(d, 4096)).await??;
    eprintln!("  {kafka:.0} records/s, {kafka_ms:.1} ms per transaction of 4096");
    let mut runs: Vec<RunResult> = Vec::new();
    for &rate in rates {
        let name = if rate > 0.0 {
            format!("sweep-mqtt-{rate:.0}")
        } else {
            "sweep-mqtt-open".to_string()
        };
        runs.push(
            bench::run(&spec(
                &name,
                Feed::Mqtt,
                rate,
                devices,
                duration,
                true,
                connections,
            ))
            .await?,
        );
    }
    // The agent's share without the bridge and MariaDB competing for the
    // same cores: what the Mosquitto-alone reference compares with.
    runs.push(
        bench::run(&spec(
            "agent-mqtt-open",
            Feed::Mqtt,
            0.0,
            devices,
            duration,
            false,
            connections,
        ))
        .await?,
    );
    runs.push(
        bench::run(&spec(
            "direct-open",
            Feed::Direct,
            0.0,
            devices,
            duration,
            false,
            connections,
        ))
        .await?,
    );
    runs.push(
        bench::run(&spec(
            "latency-mqtt-10000",
            Feed::Mqtt,
            10_000.0,
            devices,
            duration.max(30),
            true,
            connections,
        ))
        .await?,
    );
    let mut md = String::new();
    md += &format!(
        "# edge-bench suite\n\nMachine: {} cores, {}. {devices} devices, {connections} MQTT connections, {duration} s per run.\n\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_else(|| "unknown CPU".into())
    );
    md += &format!(
        "Reference points: Mosquitto alone {mosquitto:.0} readings/s (same devices, one QoS 1 subscriber), \
         and at 10000 readings/s device to subscriber p50 / p99 {:.0} / {:.0} ms; \
         Kafka transactional producer alone {kafka:.0} records/s ({kafka_ms:.1} ms per transaction of 4096 records).\n\n",
        broker_hop.p50, broker_hop.p99
    );
    md += "| run | target/s | accepted/s | committed/s | stored/s | p50 / p99 / p99.9 to Kafka (ms) | p50 / p99 / p99.9 to MariaDB (ms) | RSS max (MB) | CPU (%) | backlog max (MB) |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &runs {
        md += &summary_row(r);
        md += "\n";
    }
    for (name, what) in [
        ("agent-mqtt-open", "with Kafka but without the bridge"),
        (
            "sweep-mqtt-open",
            "with the bridge and MariaDB on the same cores",
        ),
    ] {
        if let Some(open) = runs.iter().find(|r| r.name == name) {
            md += &format!(
                "\nThrough MQTT, {what}, the agent accepted {:.0}% of what Mosquitto alone passes ({:.0} of {mosquitto:.0} readings/s).\n",
                open.accepted_per_s / mosquitto * 100.0,
                open.accepted_per_s
            );
        }
    }
    md += "\nWhere the latency to Kafka goes, after the warm-up (device to agent: `received_at` of the records, \
           millisecond clocks; outbox writes and Kafka commits: the agent's histograms, as bucket bounds):\n\n\
           | run | device to agent p50 / p99 (ms) | outbox writes p50 / p99, over 10 ms | Kafka commits p50 / p99, over 10 ms |\n\
           |---|---|---|---|\n";
    for r in runs.iter().filter(|r| r.target_rate > 0.0) {
        let st = &r.stages;
        let bucket = |b: &BucketPercentiles| {
            format!(
                "{} / {}, {} of {}",
                BucketPercentiles::show(b.p50_ms),
                BucketPercentiles::show(b.p99_ms),
                b.over_10ms,
                b.count
            )
        };
        md += &format!(
            "| {} | {:.0} / {:.0} | {} | {} |\n",
            r.name,
            st.to_agent.p50,
            st.to_agent.p99,
            bucket(&st.outbox_commit),
            bucket(&st.kafka_commit)
        );
    }
    std::fs::write(out.join("summary.md"), &md)?;
    print!("{md}");
    Ok(())
}

fn summary_row(r: &RunResult) -> String {
    let target = if r.target_rate > 0.0 {
        format!("{:.0}", r.target_rate)
    } else {
        "open".into()
    };
    let lat = |p: &bench::Percentiles| {
        if p.count == 0 {
            "–".to_string()
        } else {
            format!("{:.0} / {:.0} / {:.0}", p.p50, p.p99, p.p999)
        }
    };
    format!(
        "| {} ({}) | {target} | {:.0} | {:.0} | {} | {} | {} | {:.1} | {:.0} | {:.1} |",
        r.name,
        r.feed,
        r.accepted_per_s,
        r.committed_per_s,
        if r.stored > 0 {
            format!("{:.0}", r.stored_per_s)
        } else {
            "–".into()
        },
        lat(&r.kafka_latency),
        lat(&r.mysql_latency),
        r.rss_max_mb,
        r.cpu_mean_percent,
        r.backlog_max_bytes / 1e6
    )
}
