//! The bridge as a service, against real Kafka, MariaDB and OpenSearch:
//! routes from configuration (readings into MySQL *and* an OpenSearch
//! index, dead letters into `iot_dlq`), `/ready`, `/metrics` with the
//! consumer lag, and a clean exit on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use edge_tests::{
    TestDatabase, create_topics, delete_topics, init_logging, kafka_brokers, opensearch_url,
    unique, wait_for,
};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const BRIDGE: &str = env!("CARGO_BIN_EXE_fault-bridge");
const READINGS: u64 = 300;
const DEAD_LETTERS: u64 = 25;
const UNREADABLE: u64 = 3;
/// Readings of `DEV-n`, with the seqs of `dev-n`'s: ids are case-sensitive.
const CASE_TWINS: u64 = 20;
/// A device id the agent never sends (not ASCII).
const FOREIGN_ID: &str = "d\u{e9}v-1";

fn reading(i: u64) -> String {
    reading_of(&format!("dev-{}", i % 7), i)
}

fn reading_of(device_id: &str, i: u64) -> String {
    serde_json::json!({
        "device_id": device_id, "seq": i, "device_seq": i, "ts": 1_700_000_000_000i64 + i as i64,
        "temperature": 20.5, "humidity": 40.0, "battery": 3.7, "lat": 48.1, "lon": 11.5, "speed": 0.0,
        "gateway_id": "gw-routes", "received_at": 1_700_000_000_100i64 + i as i64, "registered": false
    })
    .to_string()
}

fn dead_letter(i: u64) -> String {
    serde_json::json!({
        "gateway_id": "gw-routes", "received_at": 1_700_000_000_000i64 + i as i64, "source": "mqtt",
        "topic": format!("devices/d{i}/telemetry"), "reason": if i.is_multiple_of(2) { "out_of_range" } else { "malformed_json" },
        "message": "test reject", "payload": "{\"temperature\": 900}", "payload_bytes": 20
    })
    .to_string()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_ready_metrics_and_sigterm() -> anyhow::Result<()> {
    init_logging();
    let sfx = unique("routes");
    let (data, dlq) = (format!("data-{sfx}"), format!("dlq-{sfx}"));
    let index = format!("readings-{}", sfx.to_ascii_lowercase());
    create_topics(&[(&data, 2, false), (&dlq, 1, false)]).await?;
    let db = TestDatabase::create("edge_routes").await?;
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    let result = scenario(&sfx, &data, &dlq, &index, &db.url, dir.path(), &http).await;
    delete_topics(&[&data, &dlq]).await;
    let _ = http
        .delete(format!("{}/{index}", opensearch_url()))
        .send()
        .await;
    db.drop_now().await;
    result
}

async fn scenario(
    sfx: &str,
    data: &str,
    dlq: &str,
    index: &str,
    db_url: &str,
    dir: &std::path::Path,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("enable.idempotence", "true")
        .create()?;
    for i in 0..READINGS {
        let key = format!("dev-{}", i % 7);
        producer
            .send(
                FutureRecord::to(data).key(&key).payload(&reading(i)),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    for i in 0..CASE_TWINS {
        let key = format!("DEV-{}", i % 7);
        producer
            .send(
                FutureRecord::to(data)
                    .key(&key)
                    .payload(&reading_of(&key, i)),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    producer
        .send(
            FutureRecord::to(data)
                .key(FOREIGN_ID)
                .payload(&reading_of(FOREIGN_ID, 1)),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    for i in 0..DEAD_LETTERS {
        producer
            .send(
                FutureRecord::<(), _>::to(dlq).payload(&dead_letter(i)),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    for _ in 0..UNREADABLE {
        producer
            .send(
                FutureRecord::<(), _>::to(dlq).payload(&b"\xff not json"[..]),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }

    let port = free_port()?;
    let config = dir.join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"g-{sfx}\"\n\
             [mysql]\nurl = \"{db_url}\"\n\
             [opensearch]\nurl = \"{os}\"\n\
             [api]\nlisten = \"127.0.0.1:{port}\"\n\
             [[routes]]\ntopic = \"{data}\"\nsink = \"mysql_metrics\"\n\
             [[routes]]\ntopic = \"{data}\"\nsink = \"opensearch\"\nindex = \"{index}\"\ndocument_id = \"device_seq\"\n\
             [[routes]]\ntopic = \"{dlq}\"\nsink = \"mysql_dlq\"\n",
            brokers = kafka_brokers(),
            os = opensearch_url(),
        ),
    )?;
    let log = dir.join("bridge.log");
    let mut child = Command::new(BRIDGE)
        .args(["--config", config.to_str().context("utf-8 path")?, "run"])
        .env("RUST_LOG", "info,rdkafka=warn,sqlx=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let outcome = async {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .connect(db_url)
            .await?;
        wait_for("/ready to answer 200", Duration::from_secs(60), || {
            let r = http.get(format!("{base}/ready")).send();
            async move { Ok(r.await.ok().filter(|r| r.status().is_success()).map(|_| ())) }
        })
        .await?;
        wait_for(
            "every reading in iot_metrics",
            Duration::from_secs(60),
            || {
                let q = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM iot_metrics")
                    .fetch_one(&pool);
                async move { Ok((q.await? as u64 >= READINGS + CASE_TWINS).then_some(())) }
            },
        )
        .await?;
        wait_for(
            "every dead letter in iot_dlq",
            Duration::from_secs(60),
            || {
                let q =
                    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM iot_dlq").fetch_one(&pool);
                async move { Ok((q.await? as u64 >= DEAD_LETTERS + UNREADABLE).then_some(())) }
            },
        )
        .await?;
        let count_url = format!("{}/{index}/_count", opensearch_url());
        let refresh_url = format!("{}/{index}/_refresh", opensearch_url());
        wait_for(
            "every reading in the OpenSearch index",
            Duration::from_secs(60),
            || {
                let (count, refresh) = (http.get(&count_url), http.post(&refresh_url));
                async move {
                    let _ = refresh.send().await;
                    let v: serde_json::Value =
                        serde_json::from_slice(&count.send().await?.bytes().await?)?;
                    Ok((v["count"].as_u64() >= Some(READINGS + CASE_TWINS)).then_some(()))
                }
            },
        )
        .await?;
        // Exactly: no row, dead letter or document twice.
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM iot_metrics")
            .fetch_one(&pool)
            .await?;
        ensure!(
            rows as u64 == READINGS + CASE_TWINS,
            "{rows} rows for {READINGS} readings and {CASE_TWINS} of devices differing only in case"
        );
        let twins: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM iot_metrics WHERE device_id LIKE 'DEV-%'")
                .fetch_one(&pool)
                .await?;
        assert_eq!(twins as u64, CASE_TWINS);
        let upper: String = sqlx::query_scalar(
            "SELECT device_id FROM iot_metrics WHERE device_id = 'DEV-3' AND seq = 10",
        )
        .fetch_one(&pool)
        .await?;
        assert_eq!(upper, "DEV-3");
        // The foreign id is a dead letter of both routes, not a row.
        let letters: Vec<(String, String)> =
            sqlx::query_as("SELECT sink, reason FROM bridge_dead_letters ORDER BY sink")
                .fetch_all(&pool)
                .await?;
        assert_eq!(
            letters,
            [
                ("mysql-metrics".to_string(), "invalid_field".to_string()),
                (format!("opensearch-{index}"), "no_document_id".to_string()),
            ]
        );
        let reasons: Vec<(String, i64)> =
            sqlx::query_as("SELECT reason, COUNT(*) FROM iot_dlq GROUP BY reason ORDER BY reason")
                .fetch_all(&pool)
                .await?;
        assert_eq!(
            reasons,
            [
                ("malformed_json".to_string(), (DEAD_LETTERS / 2) as i64),
                ("out_of_range".to_string(), DEAD_LETTERS.div_ceil(2) as i64),
                ("unreadable_dead_letter".to_string(), UNREADABLE as i64),
            ]
        );
        for device in ["dev-3", "DEV-3"] {
            let doc: serde_json::Value = serde_json::from_slice(
                &http
                    .get(format!("{}/{index}/_doc/{device}:10", opensearch_url()))
                    .send()
                    .await?
                    .bytes()
                    .await?,
            )?;
            assert_eq!(doc["_source"]["device_id"], device, "{doc}");
            assert_eq!(doc["_source"]["seq"], 10, "{doc}");
        }
        // The bridge created the index with its mapping: strings are
        // keywords only, times are dates.
        let mapping: serde_json::Value = serde_json::from_slice(
            &http
                .get(format!("{}/{index}/_mapping", opensearch_url()))
                .send()
                .await?
                .bytes()
                .await?,
        )?;
        let fields = &mapping[index]["mappings"]["properties"];
        assert_eq!(fields["device_id"]["type"], "keyword", "{mapping}");
        assert!(fields["device_id"]["fields"].is_null(), "{mapping}");
        assert_eq!(fields["gateway_id"]["type"], "keyword", "{mapping}");
        assert_eq!(fields["ts"]["type"], "date", "{mapping}");
        assert_eq!(fields["received_at"]["type"], "date", "{mapping}");
        let v: serde_json::Value =
            serde_json::from_slice(&http.get(&count_url).send().await?.bytes().await?)?;
        assert_eq!(v["count"].as_u64(), Some(READINGS + CASE_TWINS));

        // Metrics: what each route wrote, and the lag (librdkafka reports
        // it every 5 s) back at 0.
        let metrics = wait_for(
            "the consumer lag in /metrics",
            Duration::from_secs(30),
            || {
                let r = http.get(format!("{base}/metrics")).send();
                async move {
                    let text = r.await?.text().await?;
                    Ok(text.contains("bridge_consumer_lag{").then_some(text))
                }
            },
        )
        .await?;
        for line in [
            format!(
                "bridge_written_total{{topic=\"{data}\",sink=\"mysql_metrics\"}} {}",
                READINGS + CASE_TWINS
            ),
            format!(
                "bridge_written_total{{topic=\"{data}\",sink=\"opensearch\"}} {}",
                READINGS + CASE_TWINS
            ),
            format!(
                "bridge_written_total{{topic=\"{dlq}\",sink=\"mysql_dlq\"}} {}",
                DEAD_LETTERS + UNREADABLE
            ),
            format!("bridge_route_up{{topic=\"{dlq}\",sink=\"mysql_dlq\"}} 1"),
        ] {
            ensure!(metrics.contains(&line), "missing {line:?} in\n{metrics}");
        }
        pool.close().await;
        anyhow::Ok(())
    }
    .await;

    // SIGTERM: every route leaves its group and the process exits 0.
    // SAFETY: kill() on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = wait_for(
        "the bridge to exit after SIGTERM",
        Duration::from_secs(60),
        || {
            let s = child.try_wait();
            async move { Ok(s?) }
        },
    )
    .await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    outcome.with_context(|| format!("bridge log:\n{log_text}"))?;
    let status = status.inspect_err(|_| {
        let _ = child.kill();
    })?;
    ensure!(
        status.success(),
        "exit status {status} after SIGTERM; log:\n{log_text}"
    );
    ensure!(
        log_text.matches("leaving the consumer group").count() == 2,
        "both MySQL routes should leave their group; log:\n{log_text}"
    );
    Ok(())
}
