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
use futures_util::StreamExt as _;

/// Settings and mappings of an index the bridge creates.
const INDEX_BODY: &str = r#"{
  "mappings": {
    "dynamic_templates": [
      {"strings": {"match_mapping_type": "string", "mapping": {"type": "keyword", "ignore_above": 1024}}}
    ],
    "properties": {
      "ts": {"type": "date", "format": "epoch_millis"},
      "raised_at": {"type": "date", "format": "epoch_millis"},
      "received_at": {"type": "date", "format": "epoch_millis"}
    }
  }
}"#;

/// Largest alert document accepted from Kafka.
pub const MAX_ALERT_BYTES: usize = 64 * 1024;

/// Most `_bulk` requests one batch is split into and sent at once.
pub const MAX_CONCURRENT_REQUESTS: usize = 2;

/// Most document bytes in one `_bulk` request, well under OpenSearch's
/// default `http.max_content_length` (100 MiB) even for large documents.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// Fewest alerts worth a request of their own when splitting a batch.
const MIN_DOCS_PER_REQUEST: usize = 250;

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
    /// `{url}/{index}`.
    index_url: String,
    bulk_url: String,
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
            index_url: format!("{}/{}", config.url.trim_end_matches('/'), config.index),
            // Only each item's status and error come back: OpenSearch
            // writes, and the bridge parses, a fraction of the response.
            bulk_url: format!(
                "{}/{}/_bulk?filter_path=items.*.status,items.*.error",
                config.url.trim_end_matches('/'),
                config.index
            ),
            username: config.username.clone(),
            password,
        })
    }

    /// Creates the index with the bridge's mapping unless it exists. An
    /// index that exists (made by an operator or by an index template) is
    /// left as it is.
    ///
    /// The mapping keeps every string a `keyword` (ids, kinds, events and
    /// attributes are filtered and counted, never searched as prose):
    /// OpenSearch's dynamic default indexes each string twice, as analysed
    /// text and as a keyword, which costs about a third of its indexing
    /// time. `ts`, `raised_at` and `received_at` are dates (epoch ms).
    pub async fn ensure_index(&self) -> anyhow::Result<bool> {
        let mut head = self.client.head(&self.index_url);
        if let Some(user) = &self.username {
            head = head.basic_auth(user, self.password.as_ref());
        }
        let status = head
            .send()
            .await
            .context("asking OpenSearch whether the index exists")?
            .status();
        if status.is_success() {
            return Ok(false);
        }
        if status != reqwest::StatusCode::NOT_FOUND {
            anyhow::bail!("OpenSearch answered {status} when asked whether the index exists");
        }
        let mut put = self
            .client
            .put(&self.index_url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(INDEX_BODY);
        if let Some(user) = &self.username {
            put = put.basic_auth(user, self.password.as_ref());
        }
        let response = put.send().await.context("creating the index")?;
        let status = response.status();
        if status.is_success() {
            return Ok(true);
        }
        let text = response.text().await.unwrap_or_default();
        // Another instance created it meanwhile.
        if text.contains("resource_already_exists_exception") {
            return Ok(false);
        }
        anyhow::bail!(
            "OpenSearch refused to create the index ({status}): {}",
            text.chars().take(500).collect::<String>()
        )
    }

    /// Indexes `docs` with `_bulk`; returns the outcome of each document,
    /// in order. Large batches go out as up to [`MAX_CONCURRENT_REQUESTS`]
    /// requests at once, so several of OpenSearch's write threads index
    /// them in parallel. `Err` when a request as a whole failed (retry all:
    /// the deterministic ids make indexing a document twice harmless).
    pub async fn bulk(&self, docs: &[(String, &[u8])]) -> anyhow::Result<Vec<ItemOutcome>> {
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        let bytes: usize = docs.iter().map(|(id, d)| id.len() + d.len()).sum();
        let requests = (docs.len() / MIN_DOCS_PER_REQUEST)
            .clamp(1, MAX_CONCURRENT_REQUESTS)
            .max(bytes.div_ceil(MAX_REQUEST_BYTES));
        let per_request = docs.len().div_ceil(requests);
        let mut outcomes = Vec::with_capacity(docs.len());
        let mut results = futures_util::stream::iter(docs.chunks(per_request))
            .map(|c| self.bulk_request(c))
            .buffered(MAX_CONCURRENT_REQUESTS);
        while let Some(result) = results.next().await {
            outcomes.extend(result?);
        }
        Ok(outcomes)
    }

    /// One `_bulk` request.
    async fn bulk_request(&self, docs: &[(String, &[u8])]) -> anyhow::Result<Vec<ItemOutcome>> {
        let mut body = Vec::with_capacity(docs.iter().map(|(id, d)| d.len() + id.len() + 24).sum());
        for (id, doc) in docs {
            // The index is in the URL: the action names the id only.
            body.extend_from_slice(br#"{"index":{"_id":"#);
            serde_json::to_writer(&mut body, id)?;
            body.extend_from_slice(b"}}\n");
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
