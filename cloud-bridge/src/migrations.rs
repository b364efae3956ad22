//! Versioned, idempotent schema migrations, valid on MySQL 8 and MariaDB
//! 10.11. Run at start-up under a named lock so that several bridge
//! instances starting together do not race.

use sqlx::{Acquire, MySqlPool, Row};
use tracing::info;

/// (version, description, statements). Never edit a released migration;
/// add a new one.
const MIGRATIONS: &[(i64, &str, &[&str])] = &[(
    1,
    "metrics, offsets and dead letters",
    &[
        "CREATE TABLE IF NOT EXISTS iot_metrics (
            device_id       VARCHAR(64)     NOT NULL,
            seq             BIGINT UNSIGNED NOT NULL,
            device_seq      BIGINT UNSIGNED NOT NULL,
            epoch           BIGINT UNSIGNED NULL,
            ts_ms           BIGINT          NOT NULL,
            temperature     DOUBLE          NOT NULL,
            humidity        DOUBLE          NOT NULL,
            battery         DOUBLE          NOT NULL,
            lat             DOUBLE          NOT NULL,
            lon             DOUBLE          NOT NULL,
            speed           DOUBLE          NOT NULL,
            attributes      TEXT            NULL,
            gateway_id      VARCHAR(64)     NOT NULL,
            received_at_ms  BIGINT          NOT NULL,
            kafka_partition INT             NOT NULL,
            kafka_offset    BIGINT          NOT NULL,
            stored_at       TIMESTAMP(3)    NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
            PRIMARY KEY (device_id, seq),
            KEY iot_metrics_ts (ts_ms)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        "CREATE TABLE IF NOT EXISTS bridge_offsets (
            sink            VARCHAR(64)  NOT NULL,
            topic           VARCHAR(249) NOT NULL,
            kafka_partition INT          NOT NULL,
            next_offset     BIGINT       NOT NULL,
            updated_at      TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
            PRIMARY KEY (sink, topic, kafka_partition)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        "CREATE TABLE IF NOT EXISTS bridge_dead_letters (
            id              BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
            sink            VARCHAR(64)  NOT NULL,
            topic           VARCHAR(249) NOT NULL,
            kafka_partition INT          NOT NULL,
            kafka_offset    BIGINT       NOT NULL,
            reason          VARCHAR(64)  NOT NULL,
            message         TEXT         NOT NULL,
            payload         MEDIUMBLOB   NULL,
            created_at      TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
            UNIQUE KEY bridge_dead_letters_origin (sink, topic, kafka_partition, kafka_offset)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    ],
), (
    2,
    "registry (devices, geofences, gateways) and the iot-dlq table",
    &[
        // `body` is the entry exactly as gateways receive it; the other
        // columns are there for operators' queries.
        "CREATE TABLE IF NOT EXISTS device_metadata (
            device_id   VARCHAR(64)  NOT NULL PRIMARY KEY,
            gateway_id  VARCHAR(64)  NULL,
            device_type VARCHAR(64)  NULL,
            name        VARCHAR(256) NULL,
            site        VARCHAR(256) NULL,
            body        TEXT         NOT NULL,
            updated_at  TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
            KEY device_metadata_gateway (gateway_id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        "CREATE TABLE IF NOT EXISTS geofences (
            fence_id    VARCHAR(64)  NOT NULL PRIMARY KEY,
            gateway_id  VARCHAR(64)  NULL,
            name        VARCHAR(256) NULL,
            feature     MEDIUMTEXT   NOT NULL,
            updated_at  TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
            KEY geofences_gateway (gateway_id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        // Bumped in the same transaction as every registry change: API
        // instances cache rendered documents per revision.
        "CREATE TABLE IF NOT EXISTS registry_revision (
            id       TINYINT NOT NULL PRIMARY KEY,
            revision BIGINT  NOT NULL
        ) ENGINE=InnoDB",
        "INSERT IGNORE INTO registry_revision (id, revision) VALUES (1, 0)",
        // Only a SHA-256 of each gateway's token is stored.
        "CREATE TABLE IF NOT EXISTS gateways (
            gateway_id   VARCHAR(64)  NOT NULL PRIMARY KEY,
            token_sha256 BINARY(32)   NOT NULL,
            created_at   TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
            rotated_at   TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
            UNIQUE KEY gateways_token (token_sha256)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        "CREATE TABLE IF NOT EXISTS iot_dlq (
            id              BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
            gateway_id      VARCHAR(64)  NULL,
            received_at_ms  BIGINT       NULL,
            source          VARCHAR(64)  NULL,
            source_topic    VARCHAR(256) NULL,
            reason          VARCHAR(64)  NOT NULL,
            message         TEXT         NOT NULL,
            payload         MEDIUMTEXT   NULL,
            payload_hex     MEDIUMTEXT   NULL,
            payload_bytes   BIGINT       NULL,
            kafka_topic     VARCHAR(249) NOT NULL,
            kafka_partition INT          NOT NULL,
            kafka_offset    BIGINT       NOT NULL,
            stored_at       TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
            UNIQUE KEY iot_dlq_origin (kafka_topic, kafka_partition, kafka_offset),
            KEY iot_dlq_reason (reason, stored_at),
            KEY iot_dlq_gateway (gateway_id, received_at_ms)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    ],
), (
    3,
    "iot_metrics without the ts_ms index",
    // Every row also went into this secondary index, at a random place in
    // it (rows are inserted in primary-key order): it cost the MySQL sink
    // 25 to 35 % of its throughput (README, "Cloud bridge sinks").
    // Readings of a device over time are read through the primary key;
    // operators who query across devices by time add it back themselves.
    // Before migration 4, whose copy of the table would rebuild it.
    &["DROP INDEX iot_metrics_ts ON iot_metrics"],
), (
    4,
    "case-sensitive ids",
    // Ids are 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-', and
    // case-sensitive, as the agent treats them. Under the tables' default
    // collation (utf8mb4_general_ci on MariaDB, utf8mb4_0900_ai_ci on
    // MySQL 8) `Dev-1` and `dev-1` were one key: the second device's
    // readings were refused as duplicates of the first's, and a gateway's
    // registry matched the devices of a gateway differing only in case.
    // latin1_general_cs is case-sensitive, gives each of those 65
    // characters its own weight, and exists on both servers; a `_bin`
    // collation would flag the columns BINARY, which clients then decode
    // as bytes instead of text. Ids the sinks accepted before they checked
    // the rule (not latin1, trailing spaces) could not convert or could
    // collide: the migration refuses to start while any id breaks the rule
    // (see `check_ids`), and names the rows.
    &[
        "ALTER TABLE iot_metrics
            MODIFY device_id  VARCHAR(64) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
            MODIFY gateway_id VARCHAR(64) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL",
        "ALTER TABLE bridge_offsets
            MODIFY sink  VARCHAR(64)  CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
            MODIFY topic VARCHAR(249) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL",
        "ALTER TABLE bridge_dead_letters
            MODIFY sink  VARCHAR(64)  CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
            MODIFY topic VARCHAR(249) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL",
        "ALTER TABLE device_metadata
            MODIFY device_id  VARCHAR(64) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
            MODIFY gateway_id VARCHAR(64) CHARACTER SET latin1 COLLATE latin1_general_cs NULL",
        "ALTER TABLE geofences
            MODIFY fence_id   VARCHAR(64) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
            MODIFY gateway_id VARCHAR(64) CHARACTER SET latin1 COLLATE latin1_general_cs NULL",
        "ALTER TABLE gateways
            MODIFY gateway_id VARCHAR(64) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL",
    ],
)];

/// Applies every migration not yet recorded in `schema_migrations`.
pub async fn migrate(pool: &MySqlPool) -> Result<Vec<i64>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let conn = conn.acquire().await?;
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('cloud_bridge_migrations', 60)")
        .fetch_one(&mut *conn)
        .await?;
    if locked != Some(1) {
        return Err(sqlx::Error::Protocol(
            "could not take the migration lock within 60 s; is another bridge stuck migrating?"
                .into(),
        ));
    }
    let result = async {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version     BIGINT       NOT NULL PRIMARY KEY,
                description VARCHAR(255) NOT NULL,
                applied_at  TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
            ) ENGINE=InnoDB",
        )
        .execute(&mut *conn)
        .await?;
        let applied: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations")
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.get::<i64, _>(0))
            .collect();
        let mut newly = Vec::new();
        for (version, description, statements) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            if *version == 4 {
                check_ids(&mut *conn).await?;
            }
            for statement in *statements {
                // MySQL 8 has no `DROP INDEX IF EXISTS`: a migration cut
                // short after its DROP must not fail when run again.
                if let Some((index, table)) = dropped_index(statement) {
                    let present: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM information_schema.STATISTICS \
                         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME = ?",
                    )
                    .bind(table)
                    .bind(index)
                    .fetch_one(&mut *conn)
                    .await?;
                    if present == 0 {
                        continue;
                    }
                }
                sqlx::query(statement).execute(&mut *conn).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, description) VALUES (?, ?)")
                .bind(version)
                .bind(description)
                .execute(&mut *conn)
                .await?;
            info!(version, description, "applied migration");
            newly.push(*version);
        }
        Ok::<_, sqlx::Error>(newly)
    }
    .await;
    let _ = sqlx::query("SELECT RELEASE_LOCK('cloud_bridge_migrations')")
        .execute(&mut *conn)
        .await;
    result
}

/// `(index, table)` of a `DROP INDEX index ON table` statement.
fn dropped_index(statement: &str) -> Option<(&str, &str)> {
    let rest = statement.strip_prefix("DROP INDEX ")?;
    let (index, table) = rest.split_once(" ON ")?;
    Some((index.trim(), table.trim()))
}

/// The columns migration 4 makes case-sensitive latin1.
const ID_COLUMNS: [(&str, &str); 11] = [
    ("iot_metrics", "device_id"),
    ("iot_metrics", "gateway_id"),
    ("bridge_offsets", "sink"),
    ("bridge_offsets", "topic"),
    ("bridge_dead_letters", "sink"),
    ("bridge_dead_letters", "topic"),
    ("device_metadata", "device_id"),
    ("device_metadata", "gateway_id"),
    ("geofences", "fence_id"),
    ("geofences", "gateway_id"),
    ("gateways", "gateway_id"),
];

/// Refuses migration 4 while a stored id breaks the id rule: it might not
/// convert to latin1, or collide with another once trailing spaces no
/// longer count. Names the table, the column and a few of the ids.
async fn check_ids(conn: &mut sqlx::MySqlConnection) -> Result<(), sqlx::Error> {
    for (table, column) in ID_COLUMNS {
        // Kafka allows topic names of up to 249 characters.
        let max = if column == "topic" { 249 } else { 64 };
        // Table and column names are the constants above, not input.
        let bad: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT CAST({column} AS CHAR) FROM {table} \
             WHERE {column} IS NOT NULL AND NOT ({column} REGEXP '^[A-Za-z0-9._-]{{1,{max}}}$') LIMIT 3"
        ))
        .fetch_all(&mut *conn)
        .await?;
        if !bad.is_empty() {
            return Err(sqlx::Error::Protocol(format!(
                "migration 4 (case-sensitive ids) cannot run: {table}.{column} holds ids that are not 1 to {max} \
                 characters of A-Z, a-z, 0-9, '.', '_' or '-', for example {bad:?}. They were stored before the \
                 bridge checked ids, and the agent never sends such ids: correct or delete those rows, then start \
                 the bridge again"
            )));
        }
    }
    Ok(())
}
