//! The bridge's HTTP API: the registry gateways sync from, the operators'
//! device and geofence administration, health, readiness and metrics.
//!
//! Auth: `Authorization: Bearer <token>`. The admin token (from a file;
//! only its SHA-256 is kept) may do everything; a gateway's token (issued
//! by `POST /v1/gateways/{id}/token` or `cloud-bridge gateway token`, only
//! its SHA-256 stored in MySQL) may only read that gateway's registry.
//! Token hashes are compared in constant time. `/health`, `/ready`,
//! `/metrics` and `/openapi.json` are open.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::MySqlPool;
use tracing::{info, warn};

use crate::config::ApiConfig;
use crate::metrics::Metrics;
use crate::registry::{self, DeviceEntry, FenceEntry, StoreError};

/// The OpenAPI 3 document describing this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Rendered registry documents kept in memory, in bytes (JSON and gzip).
const CACHE_BYTES: usize = 256 * 1024 * 1024;

/// An API error: status, a machine-readable code and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(m) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m),
            StoreError::Db(e) => e.into(),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        warn!(error = %e, "registry API: MySQL error");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the registry database is not reachable; retry later",
        )
    }
}

/// A registry document rendered for one gateway at one revision.
struct Rendered {
    revision: i64,
    etag: String,
    json: Bytes,
    gzip: Bytes,
}

struct Inner {
    pool: MySqlPool,
    admin: Option<[u8; 32]>,
    metrics: Arc<Metrics>,
    cache: Mutex<HashMap<String, Arc<Rendered>>>,
}

#[derive(Clone)]
pub struct ApiState(Arc<Inner>);

impl ApiState {
    /// `admin_token`: the admin bearer token (`None`: admin endpoints off).
    pub fn new(pool: MySqlPool, admin_token: Option<&str>, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Inner {
            pool,
            admin: admin_token.map(registry::token_hash),
            metrics,
            cache: Mutex::new(HashMap::new()),
        }))
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing `Authorization: Bearer <token>`",
            )
        })?
        .to_str()
        .unwrap_or("");
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

impl ApiState {
    fn is_admin(&self, token_hash: &[u8; 32]) -> bool {
        self.0
            .admin
            .as_ref()
            .is_some_and(|h| registry::hashes_equal(h, token_hash))
    }

    /// Admin only; a gateway's token gets 403, anything else 401.
    async fn require_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let hash = registry::token_hash(bearer(headers)?);
        if self.is_admin(&hash) {
            return Ok(());
        }
        let gateway: Option<String> =
            sqlx::query_scalar("SELECT gateway_id FROM gateways WHERE token_sha256 = ?")
                .bind(&hash[..])
                .fetch_optional(&self.0.pool)
                .await?;
        Err(match gateway {
            Some(g) => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the token of gateway {g} may only read that gateway's registry"),
            ),
            None => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token"),
        })
    }
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if edge_agent::config::is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("{what} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"),
        ))
    }
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/gateways/{gateway_id}/registry", get(gateway_registry))
        .route("/v1/gateways/{gateway_id}/token", post(issue_token))
        .route(
            "/v1/gateways/{gateway_id}",
            axum::routing::delete(revoke_gateway),
        )
        .route("/v1/registry", get(fleet_registry))
        .route("/v1/devices", get(list_devices))
        .route(
            "/v1/devices/{device_id}",
            get(get_device).put(put_device).delete(delete_device),
        )
        .route("/v1/fences", get(list_fences))
        .route(
            "/v1/fences/{fence_id}",
            get(get_fence).put(put_fence).delete(delete_fence),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                "no such endpoint; see /openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(registry::MAX_ENTRY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    state
        .0
        .metrics
        .api_request(&route, response.status().as_u16());
    response
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(state): State<ApiState>) -> Response {
    let mut reasons = Vec::new();
    let ping = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.0.pool),
    )
    .await;
    match ping {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => reasons.push(format!("MySQL: {e}")),
        Err(_) => reasons.push("MySQL did not answer within 2 s".to_string()),
    }
    for r in &state.0.metrics.routes {
        if !r.running.load(std::sync::atomic::Ordering::Relaxed) {
            reasons.push(format!(
                "the {} route of topic {} is not running",
                r.sink, r.topic
            ));
        }
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({"ready": reasons.is_empty(), "reasons": reasons})),
    )
        .into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.0.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

fn gzip(bytes: &[u8]) -> Bytes {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(bytes);
    Bytes::from(enc.finish().unwrap_or_default())
}

/// True when `If-None-Match` lists `etag` (or `*`).
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            let mut parts = e.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| p.trim().replace(' ', "") == "q=0");
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// Serves a rendered registry (cached per gateway and revision) with its
/// ETag; 304 when the client has it already.
async fn serve_registry(
    state: &ApiState,
    key: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let revision = registry::revision(&state.0.pool).await?;
    let cache_key = key.unwrap_or("").to_string();
    let cached = state
        .0
        .cache
        .lock()
        .ok()
        .and_then(|c| c.get(&cache_key).cloned())
        .filter(|r| r.revision == revision);
    let rendered = match cached {
        Some(r) => r,
        None => {
            let doc = registry::document(&state.0.pool, key)
                .await
                .map_err(|e| match e {
                    StoreError::Invalid(m) => {
                        warn!(
                            gateway = key.unwrap_or("(fleet)"),
                            "registry cannot be served: {m}"
                        );
                        ApiError::new(StatusCode::CONFLICT, "registry_invalid", m)
                    }
                    StoreError::Db(e) => e.into(),
                })?;
            let json = Bytes::from(doc.json.into_bytes());
            let rendered = Arc::new(Rendered {
                revision: doc.revision,
                etag: format!("\"{}\"", doc.version),
                gzip: gzip(&json),
                json,
            });
            if let Ok(mut c) = state.0.cache.lock() {
                let used: usize = c.values().map(|r| r.json.len() + r.gzip.len()).sum();
                if used + rendered.json.len() + rendered.gzip.len() > CACHE_BYTES {
                    c.clear();
                }
                c.insert(cache_key, rendered.clone());
            }
            rendered
        }
    };
    let etag = HeaderValue::from_str(&rendered.etag)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "bad ETag"))?;
    let mut response = if none_match(headers, &rendered.etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else if accepts_gzip(headers) {
        let mut r = rendered.gzip.clone().into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        rendered.json.clone().into_response()
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    Ok(response)
}

async fn gateway_registry(
    State(state): State<ApiState>,
    Path(gateway_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_id("gateway_id", &gateway_id)?;
    let hash = registry::token_hash(bearer(&headers)?);
    let stored = registry::gateway_token_hash(&state.0.pool, &gateway_id).await?;
    let own = stored
        .as_ref()
        .is_some_and(|h| registry::hashes_equal(h, &hash));
    if !own {
        if state.is_admin(&hash) {
            if stored.is_none() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_gateway",
                    format!(
                        "gateway {gateway_id} is not registered; issue its token with POST /v1/gateways/{gateway_id}/token"
                    ),
                ));
            }
        } else {
            let other: Option<String> =
                sqlx::query_scalar("SELECT gateway_id FROM gateways WHERE token_sha256 = ?")
                    .bind(&hash[..])
                    .fetch_optional(&state.0.pool)
                    .await?;
            return Err(match other {
                Some(g) => ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("this token belongs to gateway {g}, not {gateway_id}"),
                ),
                None => ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    format!("not a valid token for gateway {gateway_id}"),
                ),
            });
        }
    }
    serve_registry(&state, Some(&gateway_id), &headers).await
}

async fn fleet_registry(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    serve_registry(&state, None, &headers).await
}

async fn issue_token(
    State(state): State<ApiState>,
    Path(gateway_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    check_id("gateway_id", &gateway_id)?;
    let token = registry::issue_token(&state.0.pool, &gateway_id).await?;
    info!(gateway = %gateway_id, "gateway token issued");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"gateway_id": gateway_id, "token": token})),
    )
        .into_response())
}

async fn revoke_gateway(
    State(state): State<ApiState>,
    Path(gateway_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    check_id("gateway_id", &gateway_id)?;
    if registry::revoke_gateway(&state.0.pool, &gateway_id).await? {
        info!(gateway = %gateway_id, "gateway token revoked");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_gateway",
            format!("gateway {gateway_id} is not registered"),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    gateway_id: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

impl Page {
    fn check(&self) -> Result<u32, ApiError> {
        if let Some(g) = &self.gateway_id {
            check_id("gateway_id", g)?;
        }
        // `after` is an id from `next_after`; anything else cannot be
        // compared with the id columns (migration 4).
        if let Some(a) = &self.after {
            check_id("after", a)?;
        }
        match self.limit.unwrap_or(100) {
            n @ 1..=registry::MAX_PAGE => Ok(n),
            n => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_limit",
                format!("limit {n}: must be 1 to {}", registry::MAX_PAGE),
            )),
        }
    }
}

fn page_json(items: Vec<Value>, limit: u32, last: Option<String>) -> Response {
    let next = if items.len() as u32 == limit {
        last
    } else {
        None
    };
    axum::Json(json!({"items": items, "next_after": next})).into_response()
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no {what} {id:?}"),
    )
}

async fn list_devices(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    let limit = page.check()?;
    let devices = registry::list_devices(
        &state.0.pool,
        page.gateway_id.as_deref(),
        page.after.as_deref(),
        limit,
    )
    .await?;
    let last = devices.last().map(|d| d.meta.device_id.clone());
    Ok(page_json(
        devices.iter().map(DeviceEntry::to_json).collect(),
        limit,
        last,
    ))
}

async fn get_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    check_id("device_id", &id)?;
    match registry::get_device(&state.0.pool, &id).await? {
        Some(d) => Ok(axum::Json(d.to_json()).into_response()),
        None => Err(not_found("device", &id)),
    }
}

async fn put_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    check_id("device_id", &id)?;
    let device = DeviceEntry::from_json(Some(&id), &body)?;
    let created = registry::put_device(&state.0.pool, &device).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(device.to_json())).into_response())
}

async fn delete_device(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    check_id("device_id", &id)?;
    if registry::delete_device(&state.0.pool, &id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found("device", &id))
    }
}

async fn list_fences(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    let limit = page.check()?;
    let fences = registry::list_fences(
        &state.0.pool,
        page.gateway_id.as_deref(),
        page.after.as_deref(),
        limit,
    )
    .await?;
    let last = fences.last().map(|f| f.fence_id.clone());
    Ok(page_json(
        fences.iter().map(FenceEntry::to_json).collect(),
        limit,
        last,
    ))
}

async fn get_fence(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    check_id("fence_id", &id)?;
    match registry::get_fence(&state.0.pool, &id).await? {
        Some(f) => Ok(axum::Json(f.to_json()).into_response()),
        None => Err(not_found("fence", &id)),
    }
}

async fn put_fence(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    check_id("fence_id", &id)?;
    let fence = FenceEntry::from_json(Some(&id), &body)?;
    let created = registry::put_fence(&state.0.pool, &fence).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(fence.to_json())).into_response())
}

async fn delete_fence(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.require_admin(&headers).await?;
    check_id("fence_id", &id)?;
    if registry::delete_fence(&state.0.pool, &id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found("fence", &id))
    }
}

/// Reads a secret from a file: trimmed, non-empty, at most 4 KiB.
pub fn read_secret_file(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("reading {what} {}", path.display()))?;
    anyhow::ensure!(
        meta.len() <= 4096,
        "{what} {} is {} bytes; a token file holds one token (at most 4 KiB)",
        path.display(),
        meta.len()
    );
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    let secret = text.trim().to_string();
    anyhow::ensure!(!secret.is_empty(), "{what} {} is empty", path.display());
    Ok(secret)
}

/// A bound listener with its router, plain or TLS.
pub struct Server {
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    addr: SocketAddr,
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading api.tls_cert_file {}", cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "api.tls_cert_file {} holds no certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "reading api.tls_key_file {} (a PEM private key)",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("api.tls_cert_file and api.tls_key_file do not form a certificate and its key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl Server {
    /// Reads the admin token and TLS files and binds the listener: every
    /// configuration problem shows at start, not at the first request.
    pub async fn bind(
        config: &ApiConfig,
        pool: MySqlPool,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let admin = match &config.admin_token_file {
            Some(path) => Some(read_secret_file(path, "api.admin_token_file")?),
            None => {
                warn!("no api.admin_token_file: the registry admin endpoints answer 401");
                None
            }
        };
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("listening on api.listen {}", config.listen))?;
        let addr = listener.local_addr()?;
        let state = ApiState::new(pool, admin.as_deref(), metrics);
        Ok(Self {
            listener,
            router: router(state),
            tls,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` resolves; requests in progress finish.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        info!(address = %self.addr, "registry API listening ({scheme})");
        match self.tls {
            None => axum::serve(self.listener, self.router)
                .with_graceful_shutdown(shutdown)
                .await
                .context("serving the registry API"),
            Some(acceptor) => serve_tls(self.listener, self.router, acceptor, shutdown).await,
        }
    }
}

async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        connections.spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        info!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                info!(%peer, error = %e, "connection ended with an error");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    // Let requests in progress finish, within reason.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests;
