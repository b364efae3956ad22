//! `edge-agent doctor`: checks what the agent depends on and prints a
//! verdict per check, so a gateway can be diagnosed without reading logs.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use rdkafka::producer::{BaseProducer, Producer};

use crate::config::{Config, SerialSourceConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
}

fn check(name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        verdict,
        detail: detail.into(),
    }
}

/// Runs every check. `origin` says where the config came from.
pub async fn run(config: &Config, origin: &str) -> Vec<Check> {
    let mut checks = vec![check(
        "config",
        Verdict::Ok,
        format!("{origin} is valid (gateway {})", config.gateway_id),
    )];
    for serial in &config.sources.serial {
        checks.push(serial_port(serial));
    }
    if let Some(mqtt) = &config.sources.mqtt {
        let addr = format!("{}:{}", mqtt.host, mqtt.port);
        let name = format!("mqtt broker {addr}");
        checks.push(
            match tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect(&addr),
            )
            .await
            {
                Ok(Ok(_)) => check(name, Verdict::Ok, "reachable"),
                Ok(Err(e)) => check(name, Verdict::Fail, format!("cannot connect: {e}")),
                Err(_) => check(name, Verdict::Fail, "no answer within 3 s"),
            },
        );
    }
    let kafka_config = config.clone();
    checks.push(
        tokio::task::spawn_blocking(move || kafka(&kafka_config))
            .await
            .unwrap_or_else(|e| check("kafka", Verdict::Fail, format!("check crashed: {e}"))),
    );
    if let Some(file) = &config.registry.file {
        checks.push(registry_file(file));
    }
    checks.push(disk(config));
    checks.push(clock());
    checks
}

fn registry_file(file: &Path) -> Check {
    let name = format!("registry {}", file.display());
    match crate::registry::read_registry_file(file) {
        Ok((r, _)) => check(
            name,
            Verdict::Ok,
            format!(
                "valid: version {}, {} devices, {} fences",
                r.version,
                r.devices.len(),
                r.fences.len()
            ),
        ),
        Err(e) => check(
            name,
            Verdict::Fail,
            format!("{e}; the agent keeps its last good registry until this is fixed"),
        ),
    }
}

fn serial_port(serial: &SerialSourceConfig) -> Check {
    let name = format!("serial {}", serial.path.display());
    if !serial.path.exists() {
        return check(
            name,
            Verdict::Fail,
            "not present: is the adapter plugged in? `ls -l /dev/serial/by-id/` lists the connected ones",
        );
    }
    match tokio_serial::new(serial.path.to_string_lossy(), serial.baud_rate).open() {
        Ok(_) => check(
            name,
            Verdict::Ok,
            format!("present and opens at {} baud", serial.baud_rate),
        ),
        Err(e) => check(
            name,
            Verdict::Fail,
            format!(
                "present but cannot be opened: {e} (is another program using it, or is the user missing from the dialout group?)"
            ),
        ),
    }
}

fn kafka(config: &Config) -> Check {
    let k = &config.kafka;
    let name = format!("kafka {}", k.brokers);
    if let Some(path) = &k.sasl_password_file
        && let Err(e) = std::fs::metadata(path)
    {
        return check(
            name,
            Verdict::Fail,
            format!("kafka.sasl_password_file {}: {e}", path.display()),
        );
    }
    let producer: BaseProducer = match crate::sinks::kafka::client_config(k).create() {
        Ok(p) => p,
        Err(e) => return check(name, Verdict::Fail, format!("client setup failed: {e}")),
    };
    let metadata = match producer
        .client()
        .fetch_metadata(None, Duration::from_secs(5))
    {
        Ok(m) => m,
        Err(e) => {
            return check(
                name,
                Verdict::Fail,
                format!(
                    "unreachable: {e}. The agent keeps working and buffers in the outbox meanwhile"
                ),
            );
        }
    };
    let missing: Vec<&str> = [
        &k.topic_data,
        &k.topic_dlq,
        &k.topic_alerts,
        &k.topic_offsets,
    ]
    .into_iter()
    .filter(|t| {
        !metadata
            .topics()
            .iter()
            .any(|m| m.name() == t.as_str() && m.error().is_none())
    })
    .map(String::as_str)
    .collect();
    if missing.is_empty() {
        check(
            name,
            Verdict::Ok,
            format!(
                "reachable, {} broker(s), topics present",
                metadata.brokers().len()
            ),
        )
    } else {
        check(
            name,
            Verdict::Warn,
            format!(
                "reachable, but topics missing: {} (the offsets topic is created by the agent; create the others or enable auto-creation)",
                missing.join(", ")
            ),
        )
    }
}

/// Free bytes of the file system holding `path` (or its nearest existing
/// ancestor).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let mut p = path;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("."));
        if p.as_os_str().is_empty() {
            p = Path::new(".");
            break;
        }
    }
    let c_path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string for the duration of the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

fn disk(config: &Config) -> Check {
    let name = format!("disk {}", config.data_dir.display());
    let need = config.outbox.max_size_bytes;
    match free_bytes(&config.data_dir) {
        Ok(free) if free >= 2 * need => check(
            name,
            Verdict::Ok,
            format!("{} MiB free, outbox bound {} MiB", free >> 20, need >> 20),
        ),
        Ok(free) if free >= need => check(
            name,
            Verdict::Warn,
            format!(
                "{} MiB free: a full outbox ({} MiB) plus WAL would leave little room",
                free >> 20,
                need >> 20
            ),
        ),
        Ok(free) => check(
            name,
            Verdict::Fail,
            format!(
                "{} MiB free, less than outbox.max_size_bytes ({} MiB): lower the bound or free space",
                free >> 20,
                need >> 20
            ),
        ),
        Err(e) => check(name, Verdict::Fail, format!("cannot inspect: {e}")),
    }
}

fn clock() -> Check {
    let now = crate::pipeline::now_ms();
    // 2024-01-01: a clock before this was never set (no RTC, no network).
    if now < 1_704_067_200_000 {
        return check(
            "clock",
            Verdict::Fail,
            format!(
                "system time {now} ms is before 2024: set the clock (timestamps are checked against it)"
            ),
        );
    }
    // SAFETY: adjtimex only reads the kernel's clock state into the zeroed
    // struct we own (modes = 0 changes nothing).
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    match state {
        -1 => check(
            "clock",
            Verdict::Warn,
            format!(
                "cannot read the clock state: {}",
                std::io::Error::last_os_error()
            ),
        ),
        libc::TIME_ERROR => check(
            "clock",
            Verdict::Warn,
            "not synchronised by NTP yet: readings are checked against this clock (validation.max_future_skew_seconds)",
        ),
        _ => check("clock", Verdict::Ok, "synchronised"),
    }
}

/// Prints the checks; returns the worst verdict.
pub fn print(checks: &[Check]) -> Verdict {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        println!("{}  {:width$}  {}", c.verdict, c.name, c.detail);
    }
    let worst = checks
        .iter()
        .map(|c| c.verdict)
        .max()
        .unwrap_or(Verdict::Ok);
    println!(
        "{}",
        match worst {
            Verdict::Ok => "verdict: ready",
            Verdict::Warn => "verdict: will run, see the warnings",
            Verdict::Fail => "verdict: NOT ready, fix the failures above",
        }
    );
    worst
}
