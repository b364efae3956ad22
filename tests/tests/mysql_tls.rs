//! The bridge's MySQL connection over TLS against the test MariaDB (which
//! tests/services/up starts with a throwaway CA): verified, and refused
//! when the server's certificate is not signed by the given CA.

use anyhow::Context as _;
use edge_tests::{TestDatabase, init_logging};

fn test_ca() -> String {
    std::env::var("EDGE_TEST_TLS_CA").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/edge-gateway/services/data/tls/ca.pem")
    })
}

fn bridge_config(url: &str) -> anyhow::Result<cloud_bridge::BridgeConfig> {
    Ok(cloud_bridge::BridgeConfig::load(None, |k| {
        (k == "CLOUD_BRIDGE_MYSQL_URL").then(|| url.to_string())
    })?)
}

#[tokio::test]
async fn the_bridge_connects_to_mysql_over_verified_tls() -> anyhow::Result<()> {
    init_logging();
    let db = TestDatabase::create("edge_tls").await?;
    let result = async {
        let ca = test_ca();
        anyhow::ensure!(
            std::path::Path::new(&ca).exists(),
            "{ca} is missing: restart the services with tests/services/up"
        );
        let url = format!("{}?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}", db.url);
        let pool = cloud_bridge::connect_and_migrate(&bridge_config(&url)?)
            .await
            .context("connecting over TLS")?;
        let (_, cipher): (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            .fetch_one(&pool)
            .await?;
        assert!(!cipher.is_empty(), "the session is not encrypted");
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'iot_dlq'",
        )
        .fetch_one(&pool)
        .await?;
        assert_eq!(tables, 1, "the migrations ran over TLS");
        pool.close().await;

        // Any other CA: the server is not trusted and the bridge says so.
        let other_ca = "/etc/ssl/certs/ca-certificates.crt";
        let url = format!("{}?ssl-mode=VERIFY_CA&ssl-ca={other_ca}", db.url);
        let err = cloud_bridge::connect_and_migrate(&bridge_config(&url)?)
            .await
            .expect_err("an untrusted server certificate must be refused");
        let text = format!("{err:#}");
        assert!(text.contains("connecting to MySQL"), "{text}");
        assert!(!text.contains(":edge@"), "the password must not be shown: {text}");
        Ok(())
    }
    .await;
    db.drop_now().await;
    result
}
