//! `edge-sim`: simulated devices for the edge agent.
//!
//! ```text
//! edge-sim serial --pty                       # make a virtual serial port, print its path
//! edge-sim serial --port /dev/ttyUSB0 --devices 4 --readings 1000
//! edge-sim mqtt --broker 127.0.0.1:1883 --devices 100 --readings 100 --rate 1000
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use edge_tests::sim::{
    ByteFaults, SerialRunEnd, SerialSim, SerialSimConfig, Track, bin_reading, json_reading,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_serial::SerialPortBuilderExt;

#[derive(Parser)]
#[command(
    version,
    about = "Simulated devices for edge-agent: serial (firmware-proto) and MQTT (JSON and /bin)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Number of devices.
    #[arg(long, default_value_t = 4)]
    devices: u32,
    /// Readings per device.
    #[arg(long, default_value_t = 1000)]
    readings: u32,
    /// Readings per second over all devices (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seed of the random generator: the same seed gives the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Boot epoch of the first device (default: the current Unix time).
    #[arg(long)]
    boot_epoch: Option<u32>,
    /// Centre of the GPS tracks, "lat,lon".
    #[arg(long, default_value = "48.137,11.575")]
    track_center: String,
    /// Radius of the GPS tracks in degrees of latitude.
    #[arg(long, default_value_t = 0.01)]
    track_radius: f64,
}

#[derive(Subcommand)]
enum Command {
    /// Devices on a serial bus speaking firmware-proto.
    Serial {
        /// Serial device to write to (the agent reads the other end).
        #[arg(long, conflicts_with = "pty")]
        port: Option<String>,
        /// Create a pseudo-terminal pair and print the path for the agent.
        #[arg(long)]
        pty: bool,
        #[arg(long, default_value_t = 115_200)]
        baud: u32,
        /// Probability that a byte towards the gateway is lost.
        #[arg(long, default_value_t = 0.0)]
        drop_rate: f64,
        /// Probability that a byte towards the gateway is corrupted.
        #[arg(long, default_value_t = 0.0)]
        corrupt_rate: f64,
        /// Fraction of readings made invalid on purpose (latitude out of range).
        #[arg(long, default_value_t = 0.0)]
        invalid_fraction: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Write readings as JSON lines (for `edge-agent import`, and its benchmark).
    Jsonl {
        /// Output file.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Fraction of lines made invalid on purpose.
        #[arg(long, default_value_t = 0.0)]
        invalid_fraction: f64,
        /// Write values as sensors send them: temperature, humidity,
        /// battery and speed with two decimals, lat and lon with six (about
        /// 0.1 m), instead of every digit of a random f64.
        #[arg(long)]
        sensor_precision: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Write a registry file for the simulated devices (`sim-00000`...),
    /// with square geofences spread along their GPS tracks, for the agent's
    /// `registry.file`.
    Registry {
        /// Output file.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Number of geofences along the tracks.
        #[arg(long, default_value_t = 0)]
        fences: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Devices publishing to an MQTT broker with QoS 1.
    Mqtt {
        /// Broker address.
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker: String,
        /// Prefix before `devices/`, as in the agent's `topic_prefix`.
        #[arg(long, default_value = "")]
        topic_prefix: String,
        /// Fraction of readings made invalid on purpose.
        #[arg(long, default_value_t = 0.0)]
        invalid_fraction: f64,
        /// Fraction of readings sent as firmware-proto frames on `/bin`.
        #[arg(long, default_value_t = 0.0)]
        bin_fraction: f64,
        #[command(flatten)]
        common: Common,
    },
}

fn track(common: &Common) -> anyhow::Result<Track> {
    let (lat, lon) = common
        .track_center
        .split_once(',')
        .context("--track-center must be \"lat,lon\"")?;
    Ok(Track {
        center_lat: lat.trim().parse().context("--track-center latitude")?,
        center_lon: lon.trim().parse().context("--track-center longitude")?,
        radius_deg: common.track_radius,
        step_rad: 0.02,
        angle: 0.0,
    })
}

/// One track per device, each starting at a random angle.
fn device_tracks(common: &Common, rng: &mut StdRng) -> anyhow::Result<Vec<Track>> {
    let base = track(common)?;
    Ok((0..common.devices)
        .map(|_| Track {
            angle: rng.random_range(0.0..std::f64::consts::TAU),
            ..base
        })
        .collect())
}

fn boot_epoch(common: &Common) -> u32 {
    common.boot_epoch.unwrap_or_else(|| {
        (edge_tests::now_ms() / 1000).clamp(0, i32::MAX as i64 - 1_000_000) as u32
    })
}

fn check_rate(name: &str, v: f64) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&v) {
        bail!("{name} must be between 0 and 1, got {v}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serial {
            port,
            pty,
            baud,
            drop_rate,
            corrupt_rate,
            invalid_fraction,
            common,
        } => {
            check_rate("--invalid-fraction", invalid_fraction)?;
            check_rate("--drop-rate", drop_rate)?;
            check_rate("--corrupt-rate", corrupt_rate)?;
            if !(1..=200).contains(&common.devices) {
                bail!(
                    "--devices must be 1 to 200 on one serial bus, got {}",
                    common.devices
                );
            }
            let config = SerialSimConfig {
                devices: common.devices as u8,
                readings_per_device: common.readings,
                readings_per_second: common.rate,
                invalid_fraction,
                seed: common.seed,
                uplink_faults: ByteFaults {
                    drop_rate,
                    corrupt_rate,
                },
                downlink_faults: ByteFaults::default(),
                boot_epoch: boot_epoch(&common),
                id_prefix: "sim-serial-".into(),
                track: track(&common)?,
            };
            let mut sim = SerialSim::new(config);
            let started = Instant::now();
            let mut last = Instant::now();
            let mut report = |p: &edge_tests::sim::SerialProgress| {
                if last.elapsed() >= Duration::from_secs(1) {
                    last = Instant::now();
                    eprintln!(
                        "produced {}/{} acked {} retransmission rounds {}",
                        p.produced, p.total, p.acked, p.retransmissions
                    );
                }
                false
            };
            let end = if pty {
                let (mut master, slave) = tokio_serial::SerialStream::pair()
                    .context("creating a pseudo-terminal pair")?;
                let name = tokio_serial::SerialPort::name(&slave)
                    .context("the pseudo-terminal has no name")?;
                println!("serial device for the agent: {name}");
                println!("  [[sources.serial]]\n  path = \"{name}\"");
                // Keep the slave open so the port exists until the agent opens it.
                let _slave = slave;
                sim.run(&mut master, &mut report).await
            } else {
                let path = port.context("give --port PATH or --pty")?;
                let mut stream = tokio_serial::new(&path, baud)
                    .open_native_async()
                    .with_context(|| format!("opening {path}"))?;
                sim.run(&mut stream, &mut report).await
            };
            let p = sim.progress();
            match end {
                SerialRunEnd::Done => {
                    println!(
                        "done: {} readings acknowledged in {:.1} s, {} retransmission rounds",
                        p.acked,
                        started.elapsed().as_secs_f64(),
                        p.retransmissions
                    );
                    Ok(())
                }
                SerialRunEnd::Stopped => Ok(()),
                SerialRunEnd::PortLost(e) => bail!(
                    "serial port lost after {} acknowledged readings: {e}",
                    p.acked
                ),
            }
        }
        Command::Registry {
            out,
            fences,
            common,
        } => registry(&out, fences, &common),
        Command::Jsonl {
            out,
            invalid_fraction,
            sensor_precision,
            common,
        } => {
            check_rate("--invalid-fraction", invalid_fraction)?;
            jsonl(&out, invalid_fraction, sensor_precision, &common)
        }
        Command::Mqtt {
            broker,
            topic_prefix,
            invalid_fraction,
            bin_fraction,
            common,
        } => {
            check_rate("--invalid-fraction", invalid_fraction)?;
            check_rate("--bin-fraction", bin_fraction)?;
            mqtt(
                &broker,
                &topic_prefix,
                invalid_fraction,
                bin_fraction,
                &common,
            )
            .await
        }
    }
}

fn registry(out: &std::path::Path, fences: u32, common: &Common) -> anyhow::Result<()> {
    let base = track(common)?;
    let devices: Vec<serde_json::Value> = (0..common.devices)
        .map(|d| {
            serde_json::json!({
                "device_id": format!("sim-{d:05}"),
                "device_type": "tracker",
                "name": format!("Simulated tracker {d}"),
                "site": "sim",
                "tags": {"fleet": format!("f{}", d % 10)},
            })
        })
        .collect();
    // Squares scattered around the circle the devices drive along (within
    // three radii of its centre, each 0.4 radius wide): some lie across the
    // track, so devices enter and leave them every few dozen readings, as a
    // vehicle passes depots and yards, while every position is still looked
    // up against all fences.
    let mut rng = StdRng::seed_from_u64(common.seed ^ 0x6765_6f66);
    let lon_scale = base.center_lat.to_radians().cos().max(0.1);
    let half = base.radius_deg * 0.2;
    let features: Vec<serde_json::Value> = (0..fences)
        .map(|i| {
            let lat = base.center_lat + base.radius_deg * rng.random_range(-3.0..3.0);
            let lon = base.center_lon + base.radius_deg * rng.random_range(-3.0..3.0) / lon_scale;
            edge_tests::sim::square_fence(u64::from(i), lat, lon, half, lon_scale)
        })
        .collect();
    let doc = serde_json::json!({
        "version": format!("sim-{}-{}-{}", common.devices, fences, common.seed),
        "devices": devices,
        "fences": {"type": "FeatureCollection", "features": features},
    });
    std::fs::write(out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "wrote {} devices and {fences} fences to {}",
        common.devices,
        out.display()
    );
    Ok(())
}

/// Decimals of each value with `--sensor-precision`.
const SENSOR_DECIMALS: [(&str, i32); 6] = [
    ("temperature", 2),
    ("humidity", 2),
    ("battery", 2),
    ("speed", 2),
    ("lat", 6),
    ("lon", 6),
];

fn jsonl(
    out: &std::path::Path,
    invalid_fraction: f64,
    sensor_precision: bool,
    common: &Common,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut rng = StdRng::seed_from_u64(common.seed);
    let base_epoch = boot_epoch(common);
    let mut tracks = device_tracks(common, &mut rng)?;
    let started = Instant::now();
    let ts0 = edge_tests::now_ms() - i64::from(common.readings) * 1000;
    let mut lines = 0u64;
    for seq in 1..=common.readings {
        for d in 0..common.devices {
            let device = format!("sim-{d:05}");
            let ts = ts0 + i64::from(seq) * 1000;
            let mut v = json_reading(
                &device,
                u64::from(seq),
                base_epoch + d,
                ts,
                &mut tracks[d as usize],
                &mut rng,
            );
            if sensor_precision {
                for (field, decimals) in SENSOR_DECIMALS {
                    if let Some(x) = v[field].as_f64() {
                        let scale = 10f64.powi(decimals);
                        v[field] = ((x * scale).round() / scale).into();
                    }
                }
            }
            if invalid_fraction > 0.0 && rng.random_bool(invalid_fraction) {
                v["humidity"] = "wet".into();
            }
            serde_json::to_writer(&mut w, &v)?;
            w.write_all(b"\n")?;
            lines += 1;
        }
    }
    w.flush()?;
    println!(
        "wrote {lines} lines to {} in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn mqtt(
    broker: &str,
    prefix: &str,
    invalid_fraction: f64,
    bin_fraction: f64,
    common: &Common,
) -> anyhow::Result<()> {
    let (host, port) = broker
        .rsplit_once(':')
        .context("--broker must be host:port")?;
    let port: u16 = port.parse().context("--broker port")?;
    let mut opts = MqttOptions::new(format!("edge-sim-{}", common.seed), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    // Keep the session: unacknowledged publishes are resent after a reconnect.
    opts.set_clean_session(false);
    opts.set_inflight(500);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked_in_loop = acked.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked_in_loop.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("MQTT connection: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    let mut rng = StdRng::seed_from_u64(common.seed);
    let base_epoch = boot_epoch(common);
    let mut tracks = device_tracks(common, &mut rng)?;
    let total = u64::from(common.devices) * u64::from(common.readings);
    let started = Instant::now();
    let mut last = Instant::now();
    let mut sent = 0u64;
    for seq in 1..=common.readings {
        for d in 0..common.devices {
            let device = format!("sim-mqtt-{d:05}");
            let epoch = base_epoch + d;
            let ts = edge_tests::now_ms();
            let topic = format!("{prefix}devices/{device}/telemetry");
            let (topic, payload) = if rng.random_bool(bin_fraction) {
                (
                    format!("{topic}/bin"),
                    bin_reading(seq, epoch, ts as u64, &mut tracks[d as usize], &mut rng),
                )
            } else {
                let mut v = json_reading(
                    &device,
                    u64::from(seq),
                    epoch,
                    ts,
                    &mut tracks[d as usize],
                    &mut rng,
                );
                if rng.random_bool(invalid_fraction) {
                    match rng.random_range(0..3) {
                        0 => v["temperature"] = "warm".into(),
                        1 => v["lat"] = 95.0.into(),
                        _ => {
                            v.as_object_mut().map(|o| o.remove("battery"));
                        }
                    }
                }
                (topic, v.to_string().into_bytes())
            };
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await?;
            sent += 1;
            if common.rate > 0.0 {
                let due = started + Duration::from_secs_f64(sent as f64 / common.rate);
                tokio::time::sleep_until(due.into()).await;
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                eprintln!(
                    "sent {sent}/{total} acknowledged by the broker {}",
                    acked.load(std::sync::atomic::Ordering::Relaxed)
                );
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(std::sync::atomic::Ordering::Relaxed) < total {
        if Instant::now() > deadline {
            bail!(
                "the broker acknowledged only {} of {total} readings within 60 s",
                acked.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "done: {total} readings published and acknowledged in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
