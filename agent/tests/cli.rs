//! The `edge-agent` binary: config errors, live progress, clean stop on
//! Ctrl-C (SIGINT) with a consistent outbox, and a restart that continues.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_edge-agent");

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    // Port 1 on loopback: nothing listens, so the uplink stays down and the
    // outbox must absorb everything.
    let text = format!(
        r#"
gateway_id = "cli-test"
data_dir = "{}"
[sources.demo]
devices = 50
readings_per_second = 2000
invalid_fraction = 0.05
seed = 7
[kafka]
brokers = "127.0.0.1:1"
retry_backoff_max_seconds = 1
{extra}
"#,
        dir.join("data").display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn start(config: &Path) -> Running {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .env("RUST_LOG", "info")
        .spawn()
        .expect("start edge-agent");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Running { child, lines }
}

impl Running {
    /// Waits for a stderr line matching `pred`, failing after `limit`.
    fn wait_line(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!(
            "no line with {what} within {limit:?}; got:\n{}",
            seen.join("\n")
        );
    }

    fn interrupt_and_wait(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("edge-agent did not stop within 30 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Number in a progress line after `label`, e.g. "valid 123".
fn field(line: &str, label: &str) -> u64 {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == label {
            return words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    0
}

fn outbox_state(dir: &Path) -> (String, i64, i64, i64) {
    let conn = rusqlite::Connection::open(dir.join("data/edge-agent.db")).expect("open db");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity");
    let (batches, max): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(MAX(batch_seq), 0) FROM outbox_batch",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("outbox");
    let rejects: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(count), 0) FROM reject_count",
            [],
            |r| r.get(0),
        )
        .expect("rejects");
    (check, batches, max, rejects)
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[outbox]\nbatch_max_records = 0\n");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`outbox.batch_max_records` = 0: 1 to 100000"),
        "{err}"
    );

    let out = Command::new(BIN)
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

#[test]
fn check_config_accepts_the_embedded_default() {
    let out = Command::new(BIN).arg("check-config").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sim-gateway-1"));
}

#[test]
fn ctrl_c_stops_cleanly_and_a_restart_continues() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");

    let agent = start(&config);
    let line = agent.wait_line(
        "progress with valid readings and the uplink down",
        Duration::from_secs(60),
        |l| l.starts_with("in ") && field(l, "valid") > 500 && l.contains("DOWN"),
    );
    assert!(line.contains("outbox absorbing"), "{line}");
    let status = agent.interrupt_and_wait();
    assert!(status.success(), "exit status {status:?}");

    let (check, batches1, max1, rejects1) = outbox_state(dir.path());
    assert_eq!(check, "ok");
    assert!(batches1 > 0, "the outbox keeps what Kafka did not take");
    assert!(rejects1 > 0, "invalid demo readings are counted durably");

    let agent = start(&config);
    let line = agent.wait_line("an outbox open line", Duration::from_secs(30), |l| {
        l.contains("outbox open")
    });
    assert!(
        line.contains(&format!("backlog_batches={batches1}")),
        "{line}"
    );
    agent.wait_line("progress after restart", Duration::from_secs(60), |l| {
        l.starts_with("in ") && field(l, "valid") > 200
    });
    let status = agent.interrupt_and_wait();
    assert!(status.success(), "exit status {status:?}");

    let (check, batches2, max2, rejects2) = outbox_state(dir.path());
    assert_eq!(check, "ok");
    assert!(
        batches2 > batches1 && max2 > max1,
        "new batches after restart: {batches1}/{max1} -> {batches2}/{max2}"
    );
    assert!(rejects2 > rejects1);
}

#[test]
fn doctor_reports_each_check_with_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("doctor.toml");
    std::fs::write(
        &path,
        format!(
            r#"
gateway_id = "doctor-test"
data_dir = "{}"
[[sources.serial]]
path = "{}"
[kafka]
brokers = "127.0.0.1:1"
[registry]
file = "{}"
"#,
            dir.path().join("data").display(),
            dir.path().join("no-such-tty").display(),
            dir.path().join("registry.json").display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("registry.json"),
        r#"{"version": "1", "fences": {"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"id": "bowtie"}, "geometry": {"type": "Polygon",
             "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}}]}}"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in:\n{text}"))
            .to_string()
    };
    assert!(line("config").starts_with("ok"), "{text}");
    // A self-intersecting fence: the file is refused, naming the feature.
    assert!(
        line("registry").starts_with("FAIL") && line("registry").contains("feature 0"),
        "{text}"
    );
    assert!(
        line("serial").starts_with("FAIL") && line("serial").contains("not present"),
        "{text}"
    );
    assert!(
        line("kafka 127.0.0.1:1").starts_with("FAIL") && line("kafka").contains("unreachable"),
        "{text}"
    );
    assert!(
        line("disk").starts_with("ok") || line("disk").starts_with("WARN"),
        "{text}"
    );
    assert!(
        line("clock").starts_with("ok") || line("clock").starts_with("WARN"),
        "{text}"
    );
    assert!(text.contains("verdict: NOT ready"), "{text}");
}

#[test]
fn tells_systemd_ready_feeds_the_watchdog_and_says_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    // Also covers the batch writer's linger path.
    let config = write_config(dir.path(), "[outbox]\nbatch_linger_ms = 5\n");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 128];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(next(), "READY=1");
    assert_eq!(next(), "WATCHDOG=1");
    assert_eq!(next(), "WATCHDOG=1");
    Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let mut rest = Vec::new();
    loop {
        let m = next();
        if m == "STOPPING=1" {
            break;
        }
        rest.push(m);
        assert!(rest.len() < 20, "no STOPPING=1 after SIGINT: {rest:?}");
    }
    let status = child.wait().unwrap();
    assert!(status.success());
}

#[test]
fn import_replays_a_jsonl_file_once_and_refuses_a_busy_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    // Fewer records per batch than two chunks of lines hold.
    let config = write_config(dir.path(), "[outbox]\nbatch_max_records = 100\n");
    let file = dir.path().join("backfill.jsonl");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut text = String::new();
    for seq in 1..=500u64 {
        text.push_str(&format!(
            "{{\"device_id\":\"imp-{}\",\"seq\":{seq},\"ts\":{},\"temperature\":20.5,\"humidity\":40,\"battery\":90,\"lat\":48.1,\"lon\":11.5,\"speed\":0}}\n",
            seq % 5,
            now - 3_600_000 + seq
        ));
    }
    text.push_str("{broken json\n\n");
    text.push_str(&format!(
        "{{\"device_id\":\"imp-1\",\"padding\":\"{}\"}}\n",
        "x".repeat(100_000)
    ));
    std::fs::write(&file, &text).unwrap();

    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("import")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("500 valid, 2 rejected, 0 duplicates"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("100.0%"),
        "a progress bar is shown"
    );

    // Importing the same file again adds nothing.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("import")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("0 valid, 2 rejected, 500 duplicates"),
        "{stdout}"
    );

    let conn = rusqlite::Connection::open(dir.path().join("data/edge-agent.db")).unwrap();
    let counts: Vec<(String, i64)> = conn
        .prepare("SELECT reason, count FROM reject_count ORDER BY reason")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        counts,
        vec![
            ("malformed_json".to_string(), 2),
            ("payload_too_large".to_string(), 2)
        ]
    );
    // Rejects name their line, counted across the blank one.
    let origins: Vec<String> = conn
        .prepare("SELECT DISTINCT topic FROM quarantine ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let name = file.display();
    assert_eq!(
        origins,
        vec![format!("import:{name}:501"), format!("import:{name}:503")]
    );
    // Every batch keeps to outbox.batch_max_records; none is lost.
    let (largest, total): (i64, i64) = conn
        .query_row(
            "SELECT MAX(records), SUM(records) FROM outbox_batch",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(largest <= 100, "a batch of {largest} records");
    assert_eq!(total, 500 + 4, "500 readings and 4 dead letters");
    drop(conn);

    // While an agent runs on the data folder, an import is refused.
    let agent = start(&config);
    agent.wait_line("the agent running", Duration::from_secs(30), |l| {
        l.contains("outbox open")
    });
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("import")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another edge-agent is using the data folder"),
        "{err}"
    );
    assert!(agent.interrupt_and_wait().success());
}

#[test]
fn import_into_a_full_outbox_stops_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[outbox]\nbatch_max_bytes = 4096\nbatch_max_records = 10\nmax_size_bytes = 16384\n",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let text: String = (1..=2000u64)
        .map(|seq| {
            format!(
                "{{\"device_id\":\"full-1\",\"seq\":{seq},\"ts\":{now},\"temperature\":20.5,\"humidity\":40,\"battery\":90,\"lat\":48.1,\"lon\":11.5,\"speed\":0}}\n"
            )
        })
        .collect();
    let file = dir.path().join("big.jsonl");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("import")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an import that did not finish must not exit 0"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the outbox is full"), "{err}");
    assert!(err.contains("import again"), "{err}");
}

#[test]
fn drop_oldest_keeps_the_outbox_bounded_and_counts_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[outbox]\nbatch_max_bytes = 4096\nmax_size_bytes = 65536\nwhen_full = \"drop_oldest\"\n",
    );
    let agent = start(&config);
    let line = agent.wait_line("readings dropped", Duration::from_secs(60), |l| {
        l.contains("DROPPED")
    });
    assert!(line.contains("outbox.when_full = drop_oldest"), "{line}");
    assert!(agent.interrupt_and_wait().success());
    let conn = rusqlite::Connection::open(dir.path().join("data/edge-agent.db")).unwrap();
    let bytes: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(bytes), 0) FROM outbox_batch",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(bytes <= 65536 + 4096 * 2, "outbox holds {bytes} bytes");
    let dropped: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'dropped_records'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(dropped > 0);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn raw_request(listen: &str, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(listen).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn metrics_health_and_status_of_a_running_and_a_stopped_agent() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let registry = dir.path().join("registry.json");
    std::fs::write(
        &registry,
        r#"{"version": "v7", "devices": [{"device_id": "demo-000001", "device_type": "t"}],
            "fences": {"type": "FeatureCollection", "features": []}}"#,
    )
    .unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[http]\nlisten = \"{listen}\"\n[registry]\nfile = \"{}\"\n",
            registry.display()
        ),
    );
    let agent = start(&config);
    agent.wait_line(
        "progress with valid readings and the uplink down",
        Duration::from_secs(60),
        |l| l.starts_with("in ") && field(l, "valid") > 500 && l.contains("DOWN"),
    );

    let (code, metrics) = edge_agent::ops::fetch(&listen, "/metrics")
        .unwrap()
        .unwrap();
    assert_eq!(code, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in:\n{metrics}"))
    };
    assert!(value("edge_readings_valid_total") > 0.0);
    assert!(value("edge_registry_cache_hits_total") > 0.0);
    assert!(value("edge_unknown_device_readings_total") > 0.0);
    assert_eq!(value("edge_registry_generation"), 1.0);
    assert_eq!(value("edge_uplink_up"), 0.0);
    assert!(metrics.contains("edge_readings_rejected_total{reason=\"unknown_device\"} 0"));
    // Outbox writes are timed; with the uplink down no Kafka commit is.
    assert!(value("edge_outbox_commit_seconds_count") > 0.0);
    assert_eq!(value("edge_kafka_commit_seconds_count"), 0.0);

    let (code, health) = edge_agent::ops::fetch(&listen, "/health").unwrap().unwrap();
    assert_eq!(code, 200, "{health}");
    assert!(health.contains("uplink down"), "{health}");
    let (code, _) = edge_agent::ops::fetch(&listen, "/nope").unwrap().unwrap();
    assert_eq!(code, 404);
    let post = raw_request(&listen, b"POST /status HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let mut huge = b"GET /status HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 20_000));
    let big = raw_request(&listen, &huge);
    assert!(big.starts_with("HTTP/1.1 431"), "{big}");

    let out = Command::new(BIN)
        .args(["--config"])
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("gateway cli-test"), "{text}");
    assert!(text.contains("healthy"), "{text}");
    assert!(text.contains("uplink: down"), "{text}");
    assert!(text.contains("registry: version v7 from file:"), "{text}");
    assert!(text.contains("devices known: 50"), "{text}");
    assert!(
        text.contains("latency since start: outbox writes p50 ≤ ")
            && text.contains("Kafka commits: none yet"),
        "{text}"
    );
    assert!(text.contains("recent warnings/errors"), "{text}");

    let status = agent.interrupt_and_wait();
    assert!(status.success());
    let out = Command::new(BIN)
        .args(["--config"])
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("edge-agent is not running"), "{text}");
    assert!(text.contains("devices known: 50"), "{text}");
    assert!(text.contains("registry: version v7"), "{text}");
    assert!(text.contains("batches /"), "{text}");
}

/// A stand-in for the cloud bridge's registry API: the first request gets
/// `registry` with ETag "v1", later ones 304 when they name it. Returns its
/// base URL and every request head received.
fn fake_bridge(registry: &'static str) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            let reply = if head.contains("if-none-match: \"v1\"") {
                "HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n".to_string()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{registry}",
                    registry.len()
                )
            };
            seen.lock().unwrap().push(head);
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    (base, heads)
}

#[test]
fn cloud_sync_applies_the_registry_and_stops_with_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("registry.token");
    // check-config and the start refuse a missing token file, naming the key.
    let missing = format!(
        "[cloud_sync]\nurl = \"http://127.0.0.1:1\"\ntoken_file = \"{}\"\n",
        token.display()
    );
    let config = write_config(dir.path(), &missing);
    for args in [&["check-config"][..], &[]] {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("`cloud_sync.token_file`") && err.contains("cannot read it"),
            "{args:?}: {err}"
        );
    }

    std::fs::write(&token, "cli-token\n").unwrap();
    let (base, heads) = fake_bridge(
        r#"{"version": "cloud-1", "devices": [{"device_id": "demo-000001", "device_type": "t"}],
            "fences": {"type": "FeatureCollection", "features": []}}"#,
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let config = write_config(
        dir.path(),
        &format!(
            "[http]\nlisten = \"{listen}\"\n[cloud_sync]\nurl = \"{base}\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    );
    let agent = start(&config);
    let line = agent.wait_line(
        "the registry applied from the cloud",
        Duration::from_secs(60),
        |l| l.contains("registry from the cloud applied"),
    );
    assert!(
        line.contains("version=cloud-1") && line.contains("generation=1"),
        "{line}"
    );
    agent.wait_line(
        "progress with valid readings",
        Duration::from_secs(60),
        |l| l.starts_with("in ") && field(l, "valid") > 100,
    );
    let (code, metrics) = edge_agent::ops::fetch(&listen, "/metrics")
        .unwrap()
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("edge_registry_sync_total{result=\"updated\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nedge_registry_generation 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nedge_registry_sync_age_seconds "),
        "{metrics}"
    );
    {
        let heads = heads.lock().unwrap();
        assert!(
            heads[0].starts_with("get /v1/gateways/cli-test/registry http/1.1"),
            "{heads:?}"
        );
        assert!(
            heads[0].contains("authorization: bearer cli-token\r\n"),
            "{heads:?}"
        );
    }
    let status = agent.interrupt_and_wait();
    assert!(status.success(), "exit status {status:?}");

    // A restart sends the stored ETag and is answered 304: nothing applied.
    let agent = start(&config);
    agent.wait_line("the cloud sync started", Duration::from_secs(60), |l| {
        l.contains("cloud sync of the registry started")
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while heads.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "no second request to the bridge");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        heads.lock().unwrap()[1].contains("if-none-match: \"v1\"\r\n"),
        "{:?}",
        heads.lock().unwrap()
    );
    let status = agent.interrupt_and_wait();
    assert!(status.success(), "exit status {status:?}");
    let conn = rusqlite::Connection::open(dir.path().join("data/edge-agent.db")).unwrap();
    let (generation, source): (i64, String) = conn
        .query_row(
            "SELECT generation, source FROM registry_info WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((generation, source), (1, format!("cloud:{base}")));
}
