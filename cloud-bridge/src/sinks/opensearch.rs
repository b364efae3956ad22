//! Alerts into OpenSearch/Elasticsearch with `_bulk`.
//!
//! Every alert is indexed under its deterministic `alert_id`, so a retry or
//! a replay after a crash overwrites the same document: the index holds each
//! alert once. Each item of a bulk response is inspected: rejections that
//! may pass later (429, 5xx) are retried; permanent ones (mapping or parse
//! errors, 4xx) go to `bridge_dead_letters` with the reason. Kafka offsets
//! are committed only once every alert of the batch is indexed or
//! dead-lettered.

use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

use crate::config::OpenSearchSinkConfig;

/// Largest alert document accepted from Kafka.
pub const MAX_ALERT_BYTES: usize = 64 * 1024;

/// One alert from Kafka.
#[derive(Debug, Clone)]
pub struct AlertRecord {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
}

/// What became of one alert in a bulk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    Indexed,
    /// May pass later (429, 5xx).
    Retry(String),
    /// Will never pass (mapping, parse, 4xx): dead-letter it.
    Permanent {
        reason: String,
        message: String,
    },
}

pub struct AlertSink {
    client: reqwest::Client,
    bulk_url: String,
    index: String,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Deserialize)]
struct BulkResponse {
    #[serde(default)]
    items: Vec<std::collections::BTreeMap<String, BulkItem>>,
}

#[derive(Deserialize)]
struct BulkItem {
    status: u16,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// The alert's id, if the payload is an alert.
pub fn alert_id(payload: &[u8]) -> Result<String, String> {
    if payload.len() > MAX_ALERT_BYTES {
        return Err(format!(
            "alert of {} bytes exceeds {MAX_ALERT_BYTES}",
            payload.len()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("alert_id").and_then(|id| id.as_str()) {
        Some(id) if !id.is_empty() && id.len() <= 512 => Ok(id.to_string()),
        _ => Err("no alert_id of 1 to 512 characters".to_string()),
    }
}

impl AlertSink {
    pub fn new(config: &OpenSearchSinkConfig) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading opensearch.ca_file {}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem).with_context(|| {
                format!(
                    "opensearch.ca_file {} is not a PEM certificate",
                    ca.display()
                )
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let password = match &config.password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| {
                        format!("reading opensearch.password_file {}", path.display())
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => None,
        };
        Ok(Self {
            client: builder
                .build()
                .context("building the OpenSearch HTTP client")?,
            bulk_url: format!("{}/_bulk", config.url.trim_end_matches('/')),
            index: config.index.clone(),
            username: config.username.clone(),
            password,
        })
    }

    /// Sends one `_bulk` request; returns the outcome of each document, in
    /// order. `Err` when the request as a whole failed (retry it all).
    pub async fn bulk(&self, docs: &[(String, &[u8])]) -> anyhow::Result<Vec<ItemOutcome>> {
        let mut body = Vec::with_capacity(docs.iter().map(|(_, d)| d.len() + 96).sum());
        for (id, doc) in docs {
            let action = serde_json::json!({"index": {"_index": self.index, "_id": id}});
            serde_json::to_writer(&mut body, &action)?;
            body.push(b'\n');
            body.extend_from_slice(doc);
            body.push(b'\n');
        }
        let mut request = self
            .client
            .post(&self.bulk_url)
            .header("Content-Type", "application/x-ndjson")
            .body(body);
        if let Some(user) = &self.username {
            request = request.basic_auth(user, self.password.as_ref());
        }
        let response = request.send().await.context("sending _bulk")?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .context("reading the _bulk response")?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).to_string();
            anyhow::bail!("_bulk answered HTTP {status}: {text}");
        }
        let parsed: BulkResponse = serde_json::from_slice(&bytes)
            .context("the _bulk response is not what OpenSearch sends")?;
        if parsed.items.len() != docs.len() {
            anyhow::bail!(
                "_bulk answered {} items for {} documents",
                parsed.items.len(),
                docs.len()
            );
        }
        Ok(parsed
            .items
            .into_iter()
            .map(|item| match item.into_values().next() {
                Some(i) => classify(i.status, i.error.as_ref()),
                None => ItemOutcome::Retry("empty bulk item".into()),
            })
            .collect())
    }
}

fn classify(status: u16, error: Option<&serde_json::Value>) -> ItemOutcome {
    let kind = error
        .and_then(|e| e.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("error")
        .to_string();
    let reason = error
        .and_then(|e| e.get("reason"))
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_string();
    match status {
        200..=299 => ItemOutcome::Indexed,
        429 | 500..=599 => ItemOutcome::Retry(format!("{status} {kind}: {reason}")),
        _ => ItemOutcome::Permanent {
            reason: kind,
            message: format!("HTTP {status}: {reason}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_classified_by_status() {
        assert_eq!(classify(201, None), ItemOutcome::Indexed);
        assert_eq!(classify(200, None), ItemOutcome::Indexed);
        assert!(matches!(classify(429, None), ItemOutcome::Retry(_)));
        assert!(matches!(classify(503, None), ItemOutcome::Retry(_)));
        let e = serde_json::json!({"type": "mapper_parsing_exception", "reason": "failed to parse field [lat]"});
        assert_eq!(
            classify(400, Some(&e)),
            ItemOutcome::Permanent {
                reason: "mapper_parsing_exception".into(),
                message: "HTTP 400: failed to parse field [lat]".into()
            }
        );
    }

    #[test]
    fn alert_ids_are_required() {
        assert_eq!(
            alert_id(br#"{"alert_id": "d:1:f:enter"}"#).unwrap(),
            "d:1:f:enter"
        );
        assert!(alert_id(b"{").unwrap_err().starts_with("not JSON"));
        assert!(alert_id(br#"{"alert_id": ""}"#).is_err());
        assert!(alert_id(br#"{"id": 1}"#).is_err());
        assert!(alert_id(&vec![b' '; MAX_ALERT_BYTES + 1]).is_err());
    }
}
