//! The bridge's schema migrations against a real MariaDB: applied once,
//! run again after being cut short, and the upgrade of a database at
//! version 2 holding rows (the `ts_ms` index goes, ids become
//! case-sensitive, no row is lost, an id breaking the rule stops the
//! upgrade with its name).

use edge_tests::{TestDatabase, init_logging};
use sqlx::MySqlPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_resume_and_upgrade_rows() -> anyhow::Result<()> {
    init_logging();
    let db = TestDatabase::create("edge_migrations").await?;
    let pool = MySqlPool::connect(&db.url).await?;
    let result = scenario(&pool).await;
    pool.close().await;
    db.drop_now().await;
    result
}

async fn ts_index_present(pool: &MySqlPool) -> anyhow::Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.STATISTICS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'iot_metrics' AND INDEX_NAME = 'iot_metrics_ts'",
    )
    .fetch_one(pool)
    .await?;
    Ok(n > 0)
}

async fn collation(pool: &MySqlPool, table: &str, column: &str) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar(
        "SELECT COLLATION_NAME FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
    )
    .bind(table)
    .bind(column)
    .fetch_one(pool)
    .await?)
}

const ROW: &str = "INSERT IGNORE INTO iot_metrics (device_id, seq, device_seq, ts_ms, temperature, humidity, battery, \
                   lat, lon, speed, gateway_id, received_at_ms, kafka_partition, kafka_offset) \
                   VALUES (?, ?, ?, 1, 1, 1, 1, 1, 1, 1, 'gw-1', 1, 0, ?)";

async fn insert(pool: &MySqlPool, device: &str, seq: u64) -> anyhow::Result<u64> {
    Ok(sqlx::query(ROW)
        .bind(device)
        .bind(seq)
        .bind(seq)
        .bind(seq as i64)
        .execute(pool)
        .await?
        .rows_affected())
}

async fn scenario(pool: &MySqlPool) -> anyhow::Result<()> {
    use cloud_bridge::migrations::migrate;

    // A fresh database gets every version, once.
    assert_eq!(migrate(pool).await?, [1, 2, 3, 4]);
    assert_eq!(migrate(pool).await?, Vec::<i64>::new());
    assert!(!ts_index_present(pool).await?);
    for (table, column) in [
        ("iot_metrics", "device_id"),
        ("iot_metrics", "gateway_id"),
        ("bridge_offsets", "topic"),
        ("device_metadata", "device_id"),
        ("geofences", "fence_id"),
        ("gateways", "gateway_id"),
    ] {
        assert_eq!(
            collation(pool, table, column).await?,
            "latin1_general_cs",
            "{table}.{column}"
        );
    }
    // Two devices differing only in case are two keys.
    assert_eq!(insert(pool, "Dev-1", 7).await?, 1);
    assert_eq!(insert(pool, "dev-1", 7).await?, 1);
    assert_eq!(insert(pool, "dev-1", 7).await?, 0, "the key still holds");

    // Cut short after its statements ran but before it was recorded: the
    // next start runs them again, and the index already gone is no error.
    sqlx::query("DELETE FROM schema_migrations WHERE version IN (3, 4)")
        .execute(pool)
        .await?;
    assert_eq!(migrate(pool).await?, [3, 4]);

    // Upgrade: a database as version 2 left it (case-insensitive ids, the
    // ts_ms index), holding rows.
    sqlx::query("DELETE FROM iot_metrics").execute(pool).await?;
    sqlx::query(
        "ALTER TABLE iot_metrics \
         MODIFY device_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci NOT NULL, \
         ADD KEY iot_metrics_ts (ts_ms)",
    )
    .execute(pool)
    .await?;
    sqlx::query("DELETE FROM schema_migrations WHERE version IN (3, 4)")
        .execute(pool)
        .await?;
    assert_eq!(insert(pool, "Dev-1", 1).await?, 1);
    assert_eq!(insert(pool, "dev-1", 1).await?, 0, "version 2 folds case");
    assert_eq!(insert(pool, "dev-1", 2).await?, 1);
    assert_eq!(insert(pool, "pump.7_x", 3).await?, 1);
    // An id the sinks took before they checked ids, which latin1 cannot
    // hold: migration 4 refuses to run and names it; migration 3 ran.
    assert_eq!(insert(pool, "d\u{e9}v-\u{4e00}", 4).await?, 1);
    assert!(ts_index_present(pool).await?);
    let err = migrate(pool).await.unwrap_err().to_string();
    assert!(
        err.contains("migration 4 (case-sensitive ids) cannot run: iot_metrics.device_id")
            && err.contains("d\u{e9}v-\u{4e00}"),
        "{err}"
    );
    assert!(!ts_index_present(pool).await?);
    assert_eq!(
        collation(pool, "iot_metrics", "device_id").await?,
        "utf8mb4_general_ci"
    );
    sqlx::query("DELETE FROM iot_metrics WHERE seq = 4")
        .execute(pool)
        .await?;
    assert_eq!(migrate(pool).await?, [4]);
    assert_eq!(
        collation(pool, "iot_metrics", "device_id").await?,
        "latin1_general_cs"
    );
    let rows: Vec<(String, u64)> =
        sqlx::query_as("SELECT device_id, seq FROM iot_metrics ORDER BY seq")
            .fetch_all(pool)
            .await?;
    assert_eq!(
        rows,
        [
            ("Dev-1".to_string(), 1),
            ("dev-1".to_string(), 2),
            ("pump.7_x".to_string(), 3)
        ]
    );
    assert_eq!(insert(pool, "dev-1", 1).await?, 1, "now a key of its own");
    Ok(())
}
