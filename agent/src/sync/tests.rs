use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
use crate::config::ValidationConfig;
use crate::outbox::{Item, Outbox, Raw};
use crate::registry::tests::{document, fences_json};
use crate::transforms::validate::decode_reading;

const TOKEN: &str = "s3cret-token-for-gw-1";

/// One canned HTTP/1.1 answer.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Send `Content-Length`; without it the body ends when the connection
    /// closes.
    content_length: bool,
}

impl Reply {
    fn document(etag: &str, body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status: 200,
            headers: vec![
                ("Content-Type", "application/json".into()),
                ("ETag", etag.into()),
            ],
            body: body.into(),
            content_length: true,
        }
    }

    fn not_modified(etag: &str) -> Self {
        Reply {
            status: 304,
            headers: vec![("ETag", etag.into())],
            body: Vec::new(),
            content_length: true,
        }
    }

    fn error(status: u16, error: &str, message: &str) -> Self {
        Reply {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body: serde_json::json!({"error": error, "message": message})
                .to_string()
                .into_bytes(),
            content_length: true,
        }
    }
}

/// A scripted cloud bridge on a loopback port: answers each request with
/// the next canned reply (503 once the script is used up) and keeps every
/// request head.
struct FakeBridge {
    base: String,
    requests: Arc<Mutex<Vec<String>>>,
    replies: Arc<Mutex<VecDeque<Reply>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeBridge {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let replies: Arc<Mutex<VecDeque<Reply>>> = Arc::new(Mutex::new(VecDeque::new()));
        let (req, rep) = (requests.clone(), replies.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                req.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let reply = rep
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or_else(|| Reply::error(503, "unavailable", "no reply scripted"));
                let mut out = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", reply.status);
                for (k, v) in &reply.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                if reply.content_length {
                    out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
                }
                out.push_str("\r\n");
                // The client may hang up early (a body over the limit).
                let _ = stream.write_all(out.as_bytes()).await;
                let _ = stream.write_all(&reply.body).await;
                let _ = stream.shutdown().await;
            }
        });
        FakeBridge {
            base,
            requests,
            replies,
            task,
        }
    }

    fn push(&self, reply: Reply) {
        self.replies.lock().unwrap().push_back(reply);
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn last_request(&self) -> String {
        self.requests().pop().expect("a request reached the bridge")
    }
}

impl Drop for FakeBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of a header in a request head (names are case-insensitive).
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

fn test_config(dir: &tempfile::TempDir, base: &str) -> Config {
    let token_file = dir.path().join("registry.token");
    std::fs::write(&token_file, format!("  {TOKEN}\n")).unwrap();
    Config::from_toml(
        &format!(
            "gateway_id = \"gw-1\"\ndata_dir = {:?}\n[sources.demo]\n[kafka]\nbrokers = \"127.0.0.1:9092\"\n\
             [registry]\nunknown_device = \"reject\"\n\
             [cloud_sync]\nurl = \"{base}/\"\ntoken_file = {:?}\n",
            dir.path().join("data").display().to_string(),
            token_file.display().to_string(),
        ),
        "test",
    )
    .unwrap()
}

/// The outbox as the agent opens it (tables, data plane).
fn outbox(config: &Config) -> Outbox {
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let mut outbox = Outbox::open(&config.database_path(), SyncMode::Full, "gw-1", 3).unwrap();
    outbox.configure(config).unwrap();
    outbox
}

fn cloud_sync(config: &Config, stats: &Arc<Stats>) -> CloudSync {
    let mut sync = CloudSync::from_config(config, stats.clone())
        .unwrap()
        .expect("cloud_sync is configured");
    sync.max_body_bytes = 64 * 1024;
    sync
}

fn current(config: &Config) -> RegistryInfo {
    let conn = open_connection(&config.database_path(), SyncMode::Full).unwrap();
    registry::current(&conn)
        .unwrap()
        .expect("a registry applied")
}

/// Writes one reading of `device` inside the "yard" fence; returns
/// (valid, rejected, alerts) of its batch.
fn write_reading(outbox: &mut Outbox, device: &str, seq: u64) -> (u64, u64, u64) {
    let now = now_ms();
    let payload = serde_json::json!({
        "device_id": device, "seq": seq, "ts": now,
        "temperature": 20.0, "humidity": 50.0, "battery": 90.0,
        "lat": 48.2, "lon": 11.2, "speed": 10.0
    })
    .to_string();
    let reading =
        decode_reading(payload.as_bytes(), None, now, &ValidationConfig::default()).unwrap();
    let out = outbox
        .write_batch(&mut [Item::Reading(reading, Raw::None)], now)
        .unwrap();
    (out.valid, out.rejected, out.alerts)
}

/// Collects log lines written while it is the thread's default subscriber.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::Write::write(&mut *self.0.lock().unwrap(), buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits for `done` (checked every 5 ms) up to `limit`.
async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_new_registry_is_applied_and_the_next_batch_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let bridge = FakeBridge::start().await;
    let config = test_config(&dir, &bridge.base);
    let stats = Arc::new(Stats::default());
    let mut outbox = outbox(&config);
    let mut sync = cloud_sync(&config, &stats);
    assert_eq!(
        sync.url(),
        format!("{}/v1/gateways/gw-1/registry", bridge.base)
    );

    bridge.push(Reply::document("\"v1\"", document().to_string()));
    let SyncOutcome::Updated(info) = sync.sync_once().await else {
        panic!("expected an update")
    };
    assert_eq!((info.generation, info.devices, info.fences), (1, 2, 2));
    assert_eq!(info.source, format!("cloud:{}", bridge.base));
    assert_eq!(info.content_hash, "\"v1\"");
    let first = bridge.last_request();
    assert!(
        first.starts_with("GET /v1/gateways/gw-1/registry HTTP/1.1\r\n"),
        "{first}"
    );
    assert_eq!(
        header(&first, "authorization"),
        Some(format!("Bearer {TOKEN}"))
    );
    assert_eq!(header(&first, "if-none-match"), None);
    // truck-1 is registered and inside the "yard" fence: valid, `enter`.
    assert_eq!(write_reading(&mut outbox, "truck-1", 1), (1, 0, 1));
    let plane = outbox.plane().counters();
    assert_eq!((plane.registry_generation, plane.fences), (1, 2));

    // v2 drops truck-1 and the "yard" fence, applied by the sync's own
    // connection while the outbox's stays open.
    let mut doc = document();
    doc["version"] = "v2".into();
    doc["devices"] = serde_json::json!([{"device_id": "sensor-9"}]);
    doc["fences"]["features"] = serde_json::json!([fences_json()["features"][1]]);
    bridge.push(Reply::document("\"v2\"", doc.to_string()));
    let SyncOutcome::Updated(info) = sync.sync_once().await else {
        panic!("expected an update")
    };
    assert_eq!((info.generation, info.devices, info.fences), (2, 1, 1));
    assert_eq!(
        header(&bridge.last_request(), "if-none-match").as_deref(),
        Some("\"v1\"")
    );
    assert_eq!(write_reading(&mut outbox, "truck-1", 2), (0, 1, 0));
    assert_eq!(write_reading(&mut outbox, "sensor-9", 1), (1, 0, 0));
    let plane = outbox.plane().counters();
    assert_eq!((plane.registry_generation, plane.fences), (2, 1));
    assert_eq!(stats.registry_sync.total(SyncResult::Updated), 2);
    assert_eq!(stats.registry_info().map(|r| r.version), Some("v2".into()));
}

#[tokio::test]
async fn not_modified_keeps_the_registry_and_counts_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let bridge = FakeBridge::start().await;
    let config = test_config(&dir, &bridge.base);
    let stats = Arc::new(Stats::default());
    let _outbox = outbox(&config);
    let mut sync = cloud_sync(&config, &stats);
    bridge.push(Reply::document("\"v1\"", document().to_string()));
    assert!(matches!(sync.sync_once().await, SyncOutcome::Updated(_)));
    let before = current(&config);

    bridge.push(Reply::not_modified("\"v1\""));
    assert!(matches!(sync.sync_once().await, SyncOutcome::Unchanged));
    assert_eq!(
        header(&bridge.last_request(), "if-none-match").as_deref(),
        Some("\"v1\"")
    );
    // A bridge that ignores If-None-Match: same ETag, nothing applied.
    bridge.push(Reply::document("\"v1\"", document().to_string()));
    assert!(matches!(sync.sync_once().await, SyncOutcome::Unchanged));
    assert_eq!(current(&config), before);
    assert_eq!(stats.registry_sync.total(SyncResult::Unchanged), 2);
    assert_eq!(stats.registry_sync.total(SyncResult::Updated), 1);
}

#[tokio::test]
async fn invalid_documents_are_refused_and_the_last_good_registry_stays() {
    let dir = tempfile::tempdir().unwrap();
    let bridge = FakeBridge::start().await;
    let config = test_config(&dir, &bridge.base);
    let stats = Arc::new(Stats::default());
    let mut outbox = outbox(&config);
    let mut sync = cloud_sync(&config, &stats);
    bridge.push(Reply::document("\"v1\"", document().to_string()));
    assert!(matches!(sync.sync_once().await, SyncOutcome::Updated(_)));
    let good = current(&config);

    let polygon = |ring: serde_json::Value| {
        let mut doc = document();
        doc["devices"] = serde_json::json!([{"device_id": "new-device"}]);
        doc["fences"]["features"][1]["geometry"] =
            serde_json::json!({"type": "Polygon", "coordinates": [ring]});
        doc.to_string()
    };
    let cases = [
        (
            "not JSON",
            "{\"version\": \"v2\", \"devices\": [".to_string(),
            "registry is not valid",
        ),
        (
            "unclosed ring",
            polygon(serde_json::json!([
                [0.0, 0.0],
                [1.0, 0.0],
                [1.0, 1.0],
                [0.0, 1.0]
            ])),
            "a ring must be closed",
        ),
        (
            "self-intersecting ring",
            polygon(serde_json::json!([
                [0.0, 0.0],
                [1.0, 1.0],
                [1.0, 0.0],
                [0.0, 1.0],
                [0.0, 0.0]
            ])),
            "is not a valid polygon",
        ),
        (
            "bad device",
            {
                let mut doc = document();
                doc["devices"][0]["device_id"] = "bad/id".into();
                doc.to_string()
            },
            "registry device 0",
        ),
    ];
    for (what, body, reason) in cases {
        bridge.push(Reply::document("\"v2\"", body));
        match sync.sync_once().await {
            SyncOutcome::Rejected(e) => assert!(e.to_string().contains(reason), "{what}: {e}"),
            other => panic!("{what}: expected a rejection, got {other:?}"),
        }
        // Nothing of it applied; the next request still names v1.
        assert_eq!(current(&config), good, "{what}");
    }
    bridge.push(Reply::not_modified("\"v1\""));
    assert!(matches!(sync.sync_once().await, SyncOutcome::Unchanged));
    assert_eq!(
        header(&bridge.last_request(), "if-none-match").as_deref(),
        Some("\"v1\"")
    );
    assert_eq!(stats.registry_sync.total(SyncResult::Rejected), 4);
    // The writer still uses v1: truck-1 known, new-device unknown.
    assert_eq!(write_reading(&mut outbox, "truck-1", 1), (1, 0, 1));
    assert_eq!(write_reading(&mut outbox, "new-device", 1), (0, 1, 0));
    assert_eq!(outbox.plane().counters().registry_generation, 1);
}

#[tokio::test]
async fn oversized_responses_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bridge = FakeBridge::start().await;
    let config = test_config(&dir, &bridge.base);
    let stats = Arc::new(Stats::default());
    let _outbox = outbox(&config);
    let mut sync = cloud_sync(&config, &stats);
    let limit = sync.max_body_bytes;
    // A valid document padded past the limit with whitespace.
    let mut big = document().to_string();
    big.push_str(&" ".repeat(limit as usize));

    // Declared up front.
    bridge.push(Reply::document("\"big\"", big.clone()));
    match sync.sync_once().await {
        SyncOutcome::Rejected(SyncError::TooLarge { declared, .. }) => {
            assert_eq!(declared, Some(big.len() as u64))
        }
        other => panic!("expected too large, got {other:?}"),
    }
    // No Content-Length: stopped while reading.
    let mut reply = Reply::document("\"big\"", big.clone());
    reply.content_length = false;
    bridge.push(reply);
    match sync.sync_once().await {
        SyncOutcome::Rejected(SyncError::TooLarge { declared, .. }) => assert_eq!(declared, None),
        other => panic!("expected too large, got {other:?}"),
    }
    // Small compressed, over the limit once decompressed.
    let mut reply = Reply::document("\"big\"", gzip(big.as_bytes()));
    assert!((reply.body.len() as u64) < limit);
    reply.headers.push(("Content-Encoding", "gzip".into()));
    bridge.push(reply);
    match sync.sync_once().await {
        SyncOutcome::Rejected(e @ SyncError::TooLarge { .. }) => {
            assert!(
                e.to_string().contains("larger than the 65536-byte limit"),
                "{e}"
            )
        }
        other => panic!("expected too large, got {other:?}"),
    }
    assert_eq!(stats.registry_sync.total(SyncResult::Rejected), 3);
    let conn = open_connection(&config.database_path(), SyncMode::Full).unwrap();
    assert_eq!(registry::current(&conn).unwrap(), None);
}

#[tokio::test]
async fn http_errors_count_as_failed_and_log_the_bridge_message() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let dir = tempfile::tempdir().unwrap();
    let bridge = FakeBridge::start().await;
    let config = test_config(&dir, &bridge.base);
    let stats = Arc::new(Stats::default());
    let _outbox = outbox(&config);
    let mut sync = cloud_sync(&config, &stats);

    for (status, message, hint) in [
        (401, "token not recognised", "check cloud_sync.token_file"),
        (
            403,
            "token is for gw-2",
            "the token is not for gateway gw-1",
        ),
        (
            404,
            "no gateway gw-1",
            "the bridge does not know gateway gw-1",
        ),
    ] {
        bridge.push(Reply::error(status, "denied", message));
        match sync.sync_once().await {
            SyncOutcome::Failed(SyncError::Status {
                status: s,
                message: m,
            }) => {
                assert_eq!(s, status);
                assert!(m.contains(message) && m.contains(hint), "{m}");
            }
            other => panic!("{status}: expected a failure, got {other:?}"),
        }
        let log = logs.text();
        assert!(
            log.lines().any(|l| l.contains("ERROR")
                && l.contains(&format!("HTTP {status}"))
                && l.contains(message)
                && l.contains("keeping the last good registry")),
            "{log}"
        );
    }
    assert_eq!(stats.registry_sync.total(SyncResult::Failed), 3);
    // An unreachable bridge fails too, naming the cause.
    drop(bridge);
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut offline = cloud_sync(&test_config(&dir, &url), &stats);
    match offline.sync_once().await {
        SyncOutcome::Failed(SyncError::Request(e)) => assert!(e.contains(&url), "{e}"),
        other => panic!("expected a request failure, got {other:?}"),
    }
    assert_eq!(stats.registry_sync.total(SyncResult::Failed), 4);
    assert!(
        !logs.text().contains(TOKEN),
        "the token leaked into the log"
    );
}

#[tokio::test]
async fn the_stored_etag_is_sent_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bridge = FakeBridge::start().await;
    let config = test_config(&dir, &bridge.base);
    let stats = Arc::new(Stats::default());
    let _outbox = outbox(&config);
    {
        let mut sync = cloud_sync(&config, &stats);
        bridge.push(Reply::document("W/\"v1\"", document().to_string()));
        assert!(matches!(sync.sync_once().await, SyncOutcome::Updated(_)));
    }
    // A new process: the ETag comes from SQLite.
    let stats = Arc::new(Stats::default());
    let mut sync = cloud_sync(&config, &stats);
    bridge.push(Reply::not_modified("W/\"v1\""));
    assert!(matches!(sync.sync_once().await, SyncOutcome::Unchanged));
    assert_eq!(
        header(&bridge.last_request(), "if-none-match").as_deref(),
        Some("W/\"v1\"")
    );
    assert_eq!(current(&config).generation, 1);

    // Another bridge URL is another source: no If-None-Match.
    let other = test_config(&dir, &format!("{}/other-bridge", bridge.base));
    let mut sync = cloud_sync(&other, &stats);
    bridge.push(Reply::document("W/\"v1\"", document().to_string()));
    assert!(matches!(sync.sync_once().await, SyncOutcome::Updated(_)));
    let head = bridge.last_request();
    assert!(
        head.starts_with("GET /other-bridge/v1/gateways/gw-1/registry "),
        "{head}"
    );
    assert_eq!(header(&head, "if-none-match"), None);
    assert_eq!(current(&config).generation, 2);
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn a_gzip_response_is_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let bridge = FakeBridge::start().await;
    let config = test_config(&dir, &bridge.base);
    let stats = Arc::new(Stats::default());
    let _outbox = outbox(&config);
    let mut sync = cloud_sync(&config, &stats);
    let mut reply = Reply::document("\"gz\"", gzip(document().to_string().as_bytes()));
    reply.headers.push(("Content-Encoding", "gzip".into()));
    bridge.push(reply);
    let SyncOutcome::Updated(info) = sync.sync_once().await else {
        panic!("expected an update")
    };
    assert_eq!(
        (info.version.as_str(), info.devices, info.fences),
        ("2026-11-26.1", 2, 2)
    );
    let accept = header(&bridge.last_request(), "accept-encoding").unwrap_or_default();
    assert!(accept.split(',').any(|e| e.trim() == "gzip"), "{accept}");
}

#[tokio::test]
async fn the_task_backs_off_warns_once_when_stale_recovers_and_stops() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let dir = tempfile::tempdir().unwrap();
    let bridge = FakeBridge::start().await;
    let config = test_config(&dir, &bridge.base);
    let stats = Arc::new(Stats::default());
    let mut outbox = outbox(&config);
    // A copy synced from this bridge an hour ago.
    let doc = registry::parse_registry(&document().to_string()).unwrap();
    let source = format!("cloud:{}", bridge.base);
    registry::apply(
        outbox.connection(),
        &doc,
        &source,
        "\"v1\"",
        now_ms() - 3_600_000,
    )
    .unwrap();

    let mut sync = cloud_sync(&config, &stats);
    sync.interval = Duration::from_millis(300);
    sync.first_backoff = Duration::from_millis(10);
    for _ in 0..3 {
        bridge.push(Reply::error(503, "unavailable", "bridge restarting"));
    }
    bridge.push(Reply::not_modified("\"v1\""));
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(sync.run(stop_rx));

    wait_until("three failures and a 304", Duration::from_secs(10), || {
        stats.registry_sync.total(SyncResult::Unchanged) == 1
    })
    .await;
    assert_eq!(stats.registry_sync.total(SyncResult::Failed), 3);
    let requests = bridge.requests();
    assert!(
        requests[..4]
            .iter()
            .all(|r| header(r, "if-none-match").as_deref() == Some("\"v1\"")),
        "{requests:?}"
    );
    let age = stats.registry_sync.age_seconds(now_ms()).unwrap();
    assert!(age < 5.0, "age {age} after a 304");
    wait_until("the recovery line", Duration::from_secs(5), || {
        logs.text().contains("no longer stale")
    })
    .await;
    let log = logs.text();
    let before_recovery = &log[..log.find("no longer stale").unwrap()];
    assert_eq!(
        before_recovery.matches("the registry is stale").count(),
        1,
        "{log}"
    );
    assert_eq!(
        before_recovery.matches("bridge restarting").count(),
        3,
        "{log}"
    );

    let text = crate::ops::metrics_text(&crate::ops::OpsState::new(stats.clone(), "gw-1"));
    assert!(
        text.contains("edge_registry_sync_total{result=\"unchanged\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("edge_registry_sync_total{result=\"rejected\"} 0"),
        "{text}"
    );
    assert!(text.contains("\nedge_registry_sync_age_seconds "), "{text}");
    assert!(text.contains("\nedge_registry_generation 1\n"), "{text}");

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the sync task stops at once")
        .unwrap();
    assert!(logs.text().contains("cloud sync of the registry stopped"));
    assert!(
        !logs.text().contains(TOKEN),
        "the token leaked into the log"
    );
}

#[test]
fn setup_reads_the_token_and_refuses_bad_token_and_ca_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&dir, "https://bridge.example.com:8080");
    let stats = Arc::new(Stats::default());
    // Outside a runtime, as `check-config` does.
    let sync = CloudSync::from_config(&config, stats.clone())
        .unwrap()
        .unwrap();
    assert_eq!(sync.token, TOKEN);
    assert_eq!(sync.source, "cloud:https://bridge.example.com:8080");

    let error = |config: &Config| match CloudSync::from_config(config, stats.clone()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected a setup error"),
    };
    let token_file = config.cloud_sync.as_ref().unwrap().token_file.clone();
    std::fs::write(&token_file, " \n").unwrap();
    let e = error(&config);
    assert!(
        e.starts_with("invalid config: `cloud_sync.token_file` = "),
        "{e}"
    );
    assert!(
        e.ends_with("the file is empty; put the bearer token in it"),
        "{e}"
    );
    std::fs::write(&token_file, "a".repeat(5000)).unwrap();
    assert!(error(&config).contains("the file is 5000 bytes"));
    std::fs::write(&token_file, "two words").unwrap();
    let e = error(&config);
    assert!(e.contains("printable ASCII without spaces"), "{e}");
    assert!(!e.contains("two words"), "{e}");
    std::fs::remove_file(&token_file).unwrap();
    assert!(error(&config).contains("cannot read it"));

    std::fs::write(&token_file, TOKEN).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let mut with_ca = config.clone();
    with_ca.cloud_sync.as_mut().unwrap().ca_file = Some(ca.clone());
    let e = error(&with_ca);
    assert!(
        e.starts_with("invalid config: `cloud_sync.ca_file` = "),
        "{e}"
    );
    assert!(e.contains("no CERTIFICATE block"), "{e}");
    with_ca.cloud_sync.as_mut().unwrap().ca_file = Some(dir.path().join("missing.pem"));
    assert!(error(&with_ca).contains("a readable PEM file"));
}
