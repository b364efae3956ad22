//! The OpenAPI document against the router: every documented operation is
//! served, every route is documented, secured operations refuse requests
//! without a token with a documented status. (The behaviour against a real
//! MariaDB is tested in tests/tests/registry_api.rs.)

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use tower::ServiceExt as _;

use super::*;

fn state() -> ApiState {
    // Never connected: every request below is answered before MySQL is used
    // (or, for /ready, reports it unreachable).
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .acquire_timeout(Duration::from_millis(200))
        .connect_lazy("mysql://nobody@127.0.0.1:1/none")
        .expect("a lazy pool is only a description");
    let routes = crate::BridgeConfig::load(None, |_| None)
        .unwrap()
        .effective_routes();
    ApiState::new(
        pool,
        Some("admin-secret"),
        Arc::new(Metrics::new(&routes, Default::default())),
    )
}

fn spec() -> openapiv3::OpenAPI {
    serde_json::from_str(OPENAPI).expect("openapi.json is an OpenAPI 3 document")
}

fn operations(spec: &openapiv3::OpenAPI) -> Vec<(String, Method, openapiv3::Operation)> {
    let mut out = Vec::new();
    for (path, item) in &spec.paths.paths {
        let item = item.as_item().expect("no $ref path items");
        for (method, op) in item.iter() {
            out.push((
                path.clone(),
                Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                op.clone(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn every_documented_operation_is_served_and_guarded() {
    let spec = spec();
    assert!(spec.openapi.starts_with("3.0"));
    let ops = operations(&spec);
    assert!(ops.len() >= 16, "{} operations documented", ops.len());
    for (path, method, op) in ops {
        let uri = path
            .replace("{gateway_id}", "gw-1")
            .replace("{device_id}", "pump-1")
            .replace("{fence_id}", "yard");
        let body = if method == Method::PUT {
            Body::from("{}")
        } else {
            Body::empty()
        };
        let response = router(state())
            .oneshot(
                Request::builder()
                    .method(&method)
                    .uri(&uri)
                    .body(body)
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path} is documented but not routed"
        );
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("no_route"),
            "{method} {path} is documented but not routed"
        );
        let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
        if secured {
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} without a token"
            );
        }
        let documented = op.responses.responses.keys().any(|code| match code {
            openapiv3::StatusCode::Code(c) => *c == status.as_u16(),
            openapiv3::StatusCode::Range(r) => *r == status.as_u16() / 100,
        });
        assert!(
            documented,
            "{method} {path} answered {status}, which is not documented"
        );
        assert!(
            op.operation_id.is_some(),
            "{method} {path} has no operationId"
        );
    }
}

#[test]
fn every_route_is_documented() {
    let spec = spec();
    let source = include_str!("mod.rs");
    let mut routes = 0;
    for piece in source.split(".route(").skip(1) {
        let piece = piece
            .trim_start()
            .strip_prefix('"')
            .expect("a route path literal");
        let path = &piece[..piece.find('"').unwrap()];
        routes += 1;
        assert!(
            spec.paths.paths.contains_key(path),
            "route {path} is not in openapi.json"
        );
    }
    assert_eq!(
        routes,
        spec.paths.paths.len(),
        "routes and documented paths differ"
    );
}

#[tokio::test]
async fn open_endpoints_answer_without_a_token() {
    let response = router(state())
        .oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = router(state())
        .oneshot(Request::get("/ready").body(Body::empty()).unwrap())
        .await
        .unwrap();
    // No MySQL behind this state and no route running: not ready, with reasons.
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert!(v["reasons"].as_array().unwrap().len() >= 2, "{v}");
}

#[test]
fn conditional_and_encoding_headers_are_read_as_http_says() {
    let mut h = HeaderMap::new();
    h.insert(
        header::IF_NONE_MATCH,
        HeaderValue::from_static("\"a\", W/\"b\""),
    );
    assert!(none_match(&h, "\"b\""));
    assert!(!none_match(&h, "\"c\""));
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("br, gzip;q=0.8"),
    );
    assert!(accepts_gzip(&h));
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("gzip;q=0"),
    );
    assert!(!accepts_gzip(&h));
    let mut h = HeaderMap::new();
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
    assert_eq!(bearer(&h).unwrap_err().status, StatusCode::UNAUTHORIZED);
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("bearer  tok "),
    );
    assert_eq!(bearer(&h).unwrap(), "tok");
}
