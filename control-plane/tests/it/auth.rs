//! Bearer tokens: 401 when missing or malformed, 403 when wrong for the endpoint.

use crate::support::{Plane, Setup, ADMIN, ENVOY};
use hyper::{Method, StatusCode};
use prealloc_control_plane::api::ct_eq;

#[tokio::test]
async fn missing_token_is_401_and_says_how_to_send_one() {
    let p = Plane::start(&Setup::default()).await;
    let (s, h, v) = p
        .call_full(Method::GET, "/v1/routes?protocol=2&since=0", None, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"], "missing_token");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("Authorization: Bearer"));
    assert!(h.get("www-authenticate").is_some());
}

#[tokio::test]
async fn malformed_header_is_401() {
    let p = Plane::start(&Setup::default()).await;
    let req = hyper::Request::builder()
        .uri("/v1/pools")
        .header("authorization", format!("Basic {ADMIN}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = p.app.handle(req).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn envoy_token_on_an_admin_endpoint_is_403_naming_the_admin_token() {
    let p = Plane::start(&Setup::default()).await;
    for (m, path) in [
        (Method::GET, "/v1/pools"),
        (Method::GET, "/v1/managers"),
        (Method::PUT, "/v1/managers/m1/availability"),
        (
            Method::POST,
            "/v1/consumers/AAAAAAAAAAAAAAAAAAAAAA/replicas",
        ),
    ] {
        let (s, v) = p
            .call(m, path, Some(ENVOY), Some(serde_json::json!({})))
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(v["error"], "wrong_token");
        assert!(v["message"].as_str().unwrap().contains("admin token"));
    }
}

#[tokio::test]
async fn every_endpoint_refuses_what_its_table_row_does_not_allow() {
    // Walks the API table itself, so an endpoint added later is covered too.
    let p = Plane::start(&Setup::default()).await;
    let mut checked = 0;
    for (method, pattern, who) in prealloc_control_plane::api::access_table() {
        let path = format!("/{}", pattern.replace('*', "AAAAAAAAAAAAAAAAAAAAAA"));
        let body = (method != Method::GET).then(|| serde_json::json!({}));
        let status = |token| {
            let (m, path, body) = (method.clone(), path.clone(), body.clone());
            let p = &p;
            async move { p.call(m, &path, token, body).await.0 }
        };
        match who {
            "open" => {
                assert_eq!(status(None).await, StatusCode::OK, "{method} {path}");
            }
            "envoy" => {
                assert_eq!(
                    status(None).await,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path}"
                );
                let s = status(Some("not-a-token-at-all-xxxx")).await;
                assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path}");
                for token in [ENVOY, ADMIN] {
                    let s = status(Some(token)).await;
                    assert!(
                        s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN,
                        "{method} {path} refused a good token: {s}"
                    );
                }
            }
            "admin" => {
                assert_eq!(
                    status(None).await,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path}"
                );
                let (s, v) = p
                    .call(method.clone(), &path, Some(ENVOY), body.clone())
                    .await;
                assert_eq!(
                    s,
                    StatusCode::FORBIDDEN,
                    "{method} {path} with the envoy token"
                );
                assert_eq!(v["error"], "wrong_token", "{method} {path}");
                let s = status(Some(ADMIN)).await;
                assert!(
                    s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN,
                    "{method} {path} refused the admin token: {s}"
                );
            }
            "page" => {
                // The status page checks its sign-in cookie itself: without one
                // only the sign-in form and sign-in/out answer (status.rs).
                let s = status(None).await;
                let allowed = match pattern {
                    "status" => s == StatusCode::OK,
                    "status/sign-in" => s == StatusCode::UNAUTHORIZED,
                    "status/sign-out" => s == StatusCode::SEE_OTHER,
                    _ => s == StatusCode::UNAUTHORIZED,
                };
                assert!(allowed, "{method} {path} without a session answered {s}");
            }
            other => panic!("unknown access {other:?}"),
        }
        checked += 1;
    }
    assert!(checked >= 13, "only {checked} endpoints in the table");
}

#[tokio::test]
async fn unknown_token_is_403_and_admin_token_works_everywhere() {
    let p = Plane::start(&Setup::default()).await;
    let (s, v) = p
        .call(
            Method::GET,
            "/v1/routes?protocol=2&since=0",
            Some("not-a-token-at-all-xxxx"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["error"], "invalid_token");
    let (s, _) = p
        .call(
            Method::GET,
            "/v1/routes?protocol=2&since=0",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = p
        .call(
            Method::GET,
            "/v1/routes?protocol=2&since=0",
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn healthz_and_metrics_need_no_token() {
    let p = Plane::start(&Setup::default()).await;
    let (s, v) = p.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "ok");
    let (s, v) = p.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.as_str().unwrap().contains("prealloc_pool_depth"));
}

#[test]
fn constant_time_compare_is_equality() {
    assert!(ct_eq(b"abc", b"abc"));
    assert!(!ct_eq(b"abc", b"abd"));
    assert!(!ct_eq(b"abc", b"abcd"));
    assert!(!ct_eq(b"", b"a"));
    assert!(ct_eq(b"", b""));
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let p = Plane::start(&Setup::default()).await;
    for value in [
        format!("Bearer {ADMIN}"),
        format!("bearer {ADMIN}"),
        format!("BEARER {ADMIN}"),
        format!("bEaReR  {ADMIN}"),
    ] {
        let req = hyper::Request::builder()
            .uri("/v1/pools")
            .header("authorization", &value)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = p.app.handle(req).await;
        assert_eq!(resp.status(), StatusCode::OK, "{value:?}");
    }
    for value in [
        "Bearer",
        "Bearer ",
        "Bearerx y",
        format!("Token {ADMIN}").as_str(),
    ] {
        let req = hyper::Request::builder()
            .uri("/v1/pools")
            .header("authorization", value)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = p.app.handle(req).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{value:?}");
    }
}
