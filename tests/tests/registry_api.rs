//! The bridge's registry API against a real MariaDB, over real HTTP:
//! operators' CRUD with validation, gateway tokens (hashed, per gateway),
//! ETag / If-None-Match, gzip, the admin subcommands (import, export,
//! tokens), and the document a gateway gets parsing with the agent's
//! own parser.

use std::io::Read as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context as _, ensure};
use edge_tests::{TestDatabase, init_logging};
use reqwest::StatusCode;
use serde_json::{Value, json};

const BRIDGE: &str = env!("CARGO_BIN_EXE_fault-bridge");
const ADMIN: &str = "admin-token-for-tests";

struct Api {
    base: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Api {
    async fn start(db_url: &str, dir: &Path) -> anyhow::Result<Self> {
        let token_file = dir.join("admin.token");
        std::fs::write(&token_file, format!("{ADMIN}\n"))?;
        let config = cloud_bridge::BridgeConfig::load(None, |k| match k {
            "CLOUD_BRIDGE_MYSQL_URL" => Some(db_url.to_string()),
            "CLOUD_BRIDGE_API_LISTEN" => Some("127.0.0.1:0".into()),
            "CLOUD_BRIDGE_ADMIN_TOKEN_FILE" => Some(token_file.display().to_string()),
            _ => None,
        })?;
        let pool = cloud_bridge::connect_and_migrate(&config).await?;
        let metrics = Arc::new(cloud_bridge::metrics::Metrics::new(
            &config.effective_routes(),
            Default::default(),
        ));
        let server = cloud_bridge::api::Server::bind(&config.api, pool, metrics).await?;
        let base = format!("http://{}", server.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            base,
            // Decoding by hand shows the server really sent gzip.
            http: reqwest::Client::builder().no_gzip().build()?,
            stop: Some(stop),
            task,
        })
    }

    fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn put(&self, path: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        let r = self
            .req(reqwest::Method::PUT, path, Some(ADMIN))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = r.status();
        Ok((
            status,
            serde_json::from_slice(&r.bytes().await?).unwrap_or(Value::Null),
        ))
    }

    async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<(StatusCode, Value)> {
        let r = self.req(reqwest::Method::GET, path, token).send().await?;
        let status = r.status();
        Ok((
            status,
            serde_json::from_slice(&r.bytes().await?).unwrap_or(Value::Null),
        ))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(std::time::Duration::from_secs(30), self.task)
            .await
            .context("the API did not stop")??
    }
}

fn square(id: &str, gateway: Option<&str>, x: f64) -> Value {
    let mut props = json!({"id": id, "name": format!("fence {id}")});
    if let Some(g) = gateway {
        props["gateway_id"] = json!(g);
    }
    json!({"type": "Feature", "properties": props, "geometry": {"type": "Polygon",
        "coordinates": [[[x, 0.0], [x + 1.0, 0.0], [x + 1.0, 1.0], [x, 1.0], [x, 0.0]]]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_api_against_mariadb() -> anyhow::Result<()> {
    init_logging();
    let db = TestDatabase::create("edge_registry").await?;
    let dir = tempfile::tempdir()?;
    let api = Api::start(&db.url, dir.path()).await?;
    let result = scenario(&api, &db.url, dir.path()).await;
    let stopped = api.stop().await;
    db.drop_now().await;
    result.and(stopped)
}

async fn scenario(api: &Api, db_url: &str, dir: &Path) -> anyhow::Result<()> {
    use reqwest::Method;

    // Operators: create, replace, read, validate.
    let (s, v) = api
        .put(
            "/v1/devices/pump-1",
            json!({"gateway_id": "gw-a", "device_type": "pump", "site": "north",
                   "thresholds": {"temperature": [-10.0, 60.0]}}),
        )
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["device_id"], "pump-1");
    let (s, _) = api
        .put(
            "/v1/devices/pump-1",
            json!({"gateway_id": "gw-a", "site": "south"}),
        )
        .await?;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = api.get("/v1/devices/pump-1", Some(ADMIN)).await?;
    assert_eq!((s, v["site"].as_str()), (StatusCode::OK, Some("south")));
    assert_eq!(v["gateway_id"], "gw-a");
    api.put("/v1/devices/pump-2", json!({"gateway_id": "gw-b"}))
        .await?;
    api.put("/v1/devices/shared-1", json!({"name": "on every gateway"}))
        .await?;

    let (s, v) = api
        .put(
            "/v1/devices/bad-1",
            json!({"thresholds": {"temperature": [60.0, -10.0]}}),
        )
        .await?;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("thresholds.temperature"),
        "{v}"
    );
    let (s, v) = api
        .put("/v1/devices/bad-2", json!({"colour": "red"}))
        .await?;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        v["message"].as_str().unwrap_or("").contains("colour"),
        "{v}"
    );
    let (s, v) = api.get("/v1/devices/no%20way", Some(ADMIN)).await?;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_id"))
    );
    let (s, _) = api.get("/v1/devices/bad-1", Some(ADMIN)).await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "a refused device is not stored");
    let big = json!({"name": "x".repeat(2 * 1024 * 1024)});
    // On a connection of its own: the server answers 413 without reading
    // the body and closes that connection, which must not be the pooled
    // one the next request reuses.
    let once = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let s = once
        .put(format!("{}/v1/devices/big-1", api.base))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(big.to_string())
        .send()
        .await?
        .status();
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);

    let (s, v) = api
        .put("/v1/fences/yard-a", square("yard-a", Some("gw-a"), 0.0))
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    api.put("/v1/fences/yard-b", square("yard-b", Some("gw-b"), 5.0))
        .await?;
    let bowtie = json!({"type": "Feature", "properties": {}, "geometry": {"type": "Polygon",
        "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}});
    let (s, v) = api.put("/v1/fences/bow", bowtie).await?;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("not a valid polygon"),
        "{v}"
    );

    // Listing pages through by id.
    let (_, page) = api.get("/v1/devices?limit=2", Some(ADMIN)).await?;
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    assert_eq!(ids, ["pump-1", "pump-2"]);
    assert_eq!(page["next_after"], "pump-2");
    let (_, page) = api
        .get("/v1/devices?limit=2&after=pump-2", Some(ADMIN))
        .await?;
    assert_eq!(page["items"][0]["device_id"], "shared-1");
    assert_eq!(page["next_after"], Value::Null);
    let (_, page) = api.get("/v1/devices?gateway_id=gw-b", Some(ADMIN)).await?;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
    let (s, _) = api.get("/v1/devices?limit=0", Some(ADMIN)).await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = api
        .get("/v1/fences?after=d%C3%A9v%E4%B8%80", Some(ADMIN))
        .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // Ids are case-sensitive, as on the agent: `PUMP-1` is a device of its
    // own, not a replacement of `pump-1`.
    let (s, v) = api
        .put("/v1/devices/PUMP-1", json!({"gateway_id": "GW-A"}))
        .await?;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, v) = api.get("/v1/devices/pump-1", Some(ADMIN)).await?;
    assert_eq!(v["gateway_id"], "gw-a", "{v}");
    let (_, page) = api.get("/v1/devices?gateway_id=gw-a", Some(ADMIN)).await?;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    let r = api
        .req(Method::DELETE, "/v1/devices/PUMP-1", Some(ADMIN))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (s, _) = api.get("/v1/devices/pump-1", Some(ADMIN)).await?;
    assert_eq!(s, StatusCode::OK);

    // Auth: none, wrong, and a gateway token outside its own registry.
    let (s, _) = api.get("/v1/devices", None).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api.get("/v1/devices", Some("guess")).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = api.get("/v1/gateways/gw-a/registry", Some(ADMIN)).await?;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_gateway"))
    );
    let r = api
        .req(Method::POST, "/v1/gateways/gw-a/token", Some(ADMIN))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::CREATED);
    let token_a = serde_json::from_slice::<Value>(&r.bytes().await?)?["token"]
        .as_str()
        .context("a token")?
        .to_string();
    let r = api
        .req(Method::POST, "/v1/gateways/gw-b/token", Some(ADMIN))
        .send()
        .await?;
    let token_b = serde_json::from_slice::<Value>(&r.bytes().await?)?["token"]
        .as_str()
        .context("a token")?
        .to_string();
    let (s, _) = api.get("/v1/devices", Some(&token_a)).await?;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = api
        .get("/v1/gateways/gw-b/registry", Some(&token_a))
        .await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // Only the hash is stored.
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(1)
        .connect(db_url)
        .await?;
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT token_sha256 FROM gateways WHERE gateway_id = 'gw-a'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(stored.len(), 32);
    assert!(!String::from_utf8_lossy(&stored).contains(&token_a[4..20]));

    // The gateway's document: its own entries and the shared ones, valid
    // for the agent, with an ETag; 304 while unchanged.
    let r = api
        .req(Method::GET, "/v1/gateways/gw-a/registry", Some(&token_a))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r
        .headers()
        .get("etag")
        .context("an ETag")?
        .to_str()?
        .to_string();
    let text = r.text().await?;
    let doc =
        edge_agent::registry::parse_registry(&text).context("the agent accepts the document")?;
    let ids: Vec<&str> = doc.devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(ids, ["pump-1", "shared-1"]);
    assert_eq!(doc.fences.len(), 1);
    assert_eq!(&*doc.fences[0].id, "yard-a");
    assert_eq!(format!("\"{}\"", doc.version), etag);
    let not_modified = |etag: String| {
        let r = api
            .req(Method::GET, "/v1/gateways/gw-a/registry", Some(&token_a))
            .header("if-none-match", etag);
        async move { anyhow::Ok(r.send().await?.status()) }
    };
    assert_eq!(not_modified(etag.clone()).await?, StatusCode::NOT_MODIFIED);
    // Another gateway's change leaves gw-a's content, so its ETag, as is.
    api.put(
        "/v1/devices/pump-2",
        json!({"gateway_id": "gw-b", "site": "east"}),
    )
    .await?;
    assert_eq!(not_modified(etag.clone()).await?, StatusCode::NOT_MODIFIED);
    // A shared device changes it.
    api.put("/v1/devices/shared-1", json!({"name": "renamed"}))
        .await?;
    assert_eq!(not_modified(etag.clone()).await?, StatusCode::OK);

    // gzip when asked (this client does not decode by itself).
    let r = api
        .req(Method::GET, "/v1/gateways/gw-a/registry", Some(&token_a))
        .header("accept-encoding", "gzip")
        .send()
        .await?;
    assert_eq!(
        r.headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    let compressed = r.bytes().await?;
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&compressed[..]).read_to_string(&mut plain)?;
    let doc = edge_agent::registry::parse_registry(&plain)?;
    assert_eq!(
        doc.devices
            .iter()
            .find(|d| d.device_id == "shared-1")
            .and_then(|d| d.name.as_deref()),
        Some("renamed")
    );
    let (s, _) = api
        .get("/v1/gateways/gw-b/registry", Some(&token_b))
        .await?;
    assert_eq!(s, StatusCode::OK);

    // Delete, then revoke: the revoked token no longer reads.
    let r = api
        .req(Method::DELETE, "/v1/fences/yard-a", Some(ADMIN))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = api
        .req(Method::DELETE, "/v1/fences/yard-a", Some(ADMIN))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = api
        .req(Method::DELETE, "/v1/gateways/gw-b", Some(ADMIN))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (s, _) = api
        .get("/v1/gateways/gw-b/registry", Some(&token_b))
        .await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Health, readiness (no consumer runs in this process) and metrics.
    let (s, _) = api.get("/health", None).await?;
    assert_eq!(s, StatusCode::OK);
    let metrics = api
        .req(Method::GET, "/metrics", None)
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("bridge_api_requests_total{route=\"/v1/gateways/{gateway_id}/registry\",status=\"304\"} 2"),
        "{metrics}"
    );

    // The admin subcommands: import CSV and GeoJSON (all or nothing),
    // export what a gateway gets, issue a token.
    let csv = dir.join("devices.csv");
    std::fs::write(
        &csv,
        "device_id,gateway_id,device_type,tags,threshold_temperature_min,threshold_temperature_max\n\
         csv-1,gw-c,pump,zone=north;line=2,-5,70\ncsv-2,,,,,\n",
    )?;
    let bad_csv = dir.join("bad.csv");
    std::fs::write(
        &bad_csv,
        "device_id,threshold_readings\ncsv-3,1\ncsv-4,lots\n",
    )?;
    let fences = dir.join("fences.geojson");
    std::fs::write(
        &fences,
        json!({"type": "FeatureCollection", "features": [square("dock", Some("gw-c"), 10.0), square("gate", None, 20.0)]}).to_string(),
    )?;
    let cli = |args: &[&str]| {
        let out = Command::new(BRIDGE)
            .args(args)
            .env("CLOUD_BRIDGE_MYSQL_URL", db_url)
            .env("RUST_LOG", "warn")
            .output()
            .expect("running the bridge binary");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = cli(&["registry", "import", csv.to_str().unwrap()]);
    ensure!(ok, "import failed: {err}");
    assert!(err.contains("imported 2 devices"), "{err}");
    let (ok, _, err) = cli(&["registry", "import", bad_csv.to_str().unwrap()]);
    assert!(
        !ok && err.contains("line 3, column threshold_readings"),
        "{err}"
    );
    let (s, _) = api.get("/v1/devices/csv-3", Some(ADMIN)).await?;
    assert_eq!(s, StatusCode::NOT_FOUND, "a refused import writes nothing");
    let (ok, _, err) = cli(&["registry", "import", fences.to_str().unwrap()]);
    ensure!(ok && err.contains("imported 2 fences"), "{err}");
    let (ok, token_c, err) = cli(&["gateway", "token", "gw-c"]);
    ensure!(ok, "{err}");
    let (ok, out, err) = cli(&["registry", "export", "--gateway", "gw-c"]);
    ensure!(ok, "{err}");
    let exported = edge_agent::registry::parse_registry(out.trim())?;
    let mut ids: Vec<&str> = exported
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, ["csv-1", "csv-2", "shared-1"]);
    let csv1 = exported
        .devices
        .iter()
        .find(|d| d.device_id == "csv-1")
        .context("csv-1")?;
    assert_eq!(csv1.thresholds.temperature, Some([-5.0, 70.0]));
    assert_eq!(csv1.tags.get("line").map(String::as_str), Some("2"));
    let mut fence_ids: Vec<&str> = exported.fences.iter().map(|f| &*f.id).collect();
    fence_ids.sort();
    assert_eq!(fence_ids, ["dock", "gate"]);
    // The API serves exactly what export printed, to the token the CLI issued.
    let served = api
        .req(
            Method::GET,
            "/v1/gateways/gw-c/registry",
            Some(token_c.trim()),
        )
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(served, out.trim());
    pool.close().await;
    Ok(())
}

/// The agent's cloud sync against the real registry API: the first pull
/// applies the gateway's registry, an operator's change reaches the
/// running agent without a restart, and while the API is down the agent
/// keeps its copy and counts failed syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_syncs_its_registry_from_the_bridge() -> anyhow::Result<()> {
    init_logging();
    let sfx = edge_tests::unique("sync");
    let topics = [
        format!("data-{sfx}"),
        format!("dlq-{sfx}"),
        format!("alerts-{sfx}"),
        format!("offsets-{sfx}"),
    ];
    edge_tests::create_topics(&[
        (&topics[0], 1, false),
        (&topics[1], 1, false),
        (&topics[2], 1, false),
        (&topics[3], 1, true),
    ])
    .await?;
    let db = TestDatabase::create("edge_sync").await?;
    let dir = tempfile::tempdir()?;
    let api = Api::start(&db.url, dir.path()).await?;
    let result = sync_scenario(api, &sfx, &topics, dir.path()).await;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    edge_tests::delete_topics(&names).await;
    db.drop_now().await;
    result
}

fn agent_registry(db: &Path) -> anyhow::Result<Option<(String, String, i64)>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let row = conn.query_row(
        "SELECT version, source, devices FROM registry_info WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    );
    match row {
        Ok(v) => Ok(Some(v)),
        Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
        Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.contains("no such table") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn sync_scenario(
    api: Api,
    sfx: &str,
    topics: &[String; 4],
    dir: &Path,
) -> anyhow::Result<()> {
    use std::time::Duration;
    let gateway = format!("gw-{sfx}");
    api.put(
        "/v1/devices/sync-1",
        json!({"gateway_id": gateway, "site": "a"}),
    )
    .await?;
    api.put("/v1/devices/sync-2", json!({})).await?;
    api.put("/v1/devices/other-1", json!({"gateway_id": "someone-else"}))
        .await?;
    api.put(
        "/v1/fences/sync-yard",
        square("sync-yard", Some(&gateway), 0.0),
    )
    .await?;
    let r = api
        .req(
            reqwest::Method::POST,
            &format!("/v1/gateways/{gateway}/token"),
            Some(ADMIN),
        )
        .send()
        .await?;
    ensure!(
        r.status() == StatusCode::CREATED,
        "issuing the token: {}",
        r.status()
    );
    let token: Value = serde_json::from_slice(&r.bytes().await?)?;
    let token_file = dir.join("gateway.token");
    std::fs::write(&token_file, token["token"].as_str().context("a token")?)?;

    let data_dir = dir.join("agent");
    let toml = format!(
        r#"
gateway_id = "{gateway}"
data_dir = "{data}"
[sources.demo]
devices = 2
readings_per_second = 5
seed = 1
device_prefix = "sync-"
[kafka]
brokers = "{brokers}"
topic_data = "{t0}"
topic_dlq = "{t1}"
topic_alerts = "{t2}"
topic_offsets = "{t3}"
[http]
listen = ""
[progress]
interval_seconds = 0
[cloud_sync]
url = "{base}"
token_file = "{token}"
interval_seconds = 5
timeout_seconds = 5
"#,
        data = data_dir.display(),
        brokers = edge_tests::kafka_brokers(),
        t0 = topics[0],
        t1 = topics[1],
        t2 = topics[2],
        t3 = topics[3],
        base = api.base,
        token = token_file.display(),
    );
    let config = edge_agent::Config::from_toml(&toml, "cloud sync test")?;
    let stats = Arc::new(edge_agent::Stats::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(edge_agent::run(config, stats.clone(), async {
        let _ = stopped.await;
    }));
    let db_path = data_dir.join("edge-agent.db");
    let outcome = async {
        // The first pull: this gateway's device and the shared one.
        let (version, source, devices) =
            edge_tests::wait_for("the first sync", Duration::from_secs(60), || {
                let p = db_path.clone();
                async move {
                    Ok(agent_registry(&p)
                        .ok()
                        .flatten()
                        .filter(|(_, s, _)| s.starts_with("cloud:")))
                }
            })
            .await?;
        assert_eq!(devices, 2, "sync-1 and sync-2, not other-1");
        assert_eq!(source, format!("cloud:{}", api.base));
        // An operator's change reaches the running agent.
        api.put("/v1/devices/sync-3", json!({"gateway_id": gateway}))
            .await?;
        let (new_version, _, devices) = edge_tests::wait_for(
            "the change to reach the agent",
            Duration::from_secs(60),
            || {
                let (p, v) = (db_path.clone(), version.clone());
                async move {
                    Ok(agent_registry(&p)
                        .ok()
                        .flatten()
                        .filter(|(nv, _, _)| *nv != v))
                }
            },
        )
        .await?;
        assert_eq!(devices, 3);
        // The bridge goes away: the agent keeps the copy and counts failures.
        api.stop().await?;
        let failed = stats
            .registry_sync
            .total(edge_agent::stats::SyncResult::Failed);
        edge_tests::wait_for(
            "a failed sync while the API is down",
            Duration::from_secs(60),
            || {
                let n = stats
                    .registry_sync
                    .total(edge_agent::stats::SyncResult::Failed);
                async move { Ok((n > failed).then_some(())) }
            },
        )
        .await?;
        let (kept, _, devices) =
            agent_registry(&db_path)?.context("the registry is still there")?;
        assert_eq!((kept, devices), (new_version, 3));
        anyhow::Ok(())
    }
    .await;
    let _ = stop.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(60), agent).await;
    outcome?;
    stopped
        .context("the agent did not stop")??
        .map_err(|e| anyhow::anyhow!("agent failed: {e}"))?;
    Ok(())
}
