//! Bad input to the API: malformed JSON, unknown fields, wrong types,
//! oversized bodies, unknown or malformed ids. Each gets a clear 4xx with a
//! JSON `error` code and a `message`, and nothing is written.

use crate::support::{Plane, Setup, ADMIN, ENVOY};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde_json::Value;

async fn raw(
    p: &Plane,
    method: Method,
    path: &str,
    token: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    let resp = p.app.handle(req).await;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .expect("in-memory body")
        .to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{path}: {status} with a body that is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, v)
}

/// Everything a write could change, as the API shows it.
async fn state(p: &Plane) -> Vec<Value> {
    let mut out = Vec::new();
    for path in [
        "/v1/consumers?limit=1000",
        "/v1/pools",
        "/v1/managers",
        "/v1/routes?protocol=2&since=0",
    ] {
        let (s, v) = p.call(Method::GET, path, Some(ADMIN), None).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        out.push(v);
    }
    out
}

/// Method, path, token, body; the status and error code it must get.
type Case = (
    Method,
    String,
    &'static str,
    Vec<u8>,
    StatusCode,
    &'static str,
);

#[tokio::test]
async fn bad_requests_get_a_clear_4xx_and_change_nothing() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let live = reg["consumer"].as_str().unwrap().to_owned();
    p.wait_depth(10).await;
    let before = state(&p).await;

    let unknown = "AAAAAAAAAAAAAAAAAAAAAA";
    let big = format!(r#"{{"resource_type":"{}"}}"#, "m".repeat(70 * 1024)).into_bytes();
    let replicas = format!("/v1/consumers/{live}/replicas");
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/registrations".into(),
            ENVOY,
            b"{".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            "/v1/registrations".into(),
            ENVOY,
            br#"{"resource_type":"mailbox","extra":1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            "/v1/registrations".into(),
            ENVOY,
            br#"{"resource_type":7}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            "/v1/registrations".into(),
            ENVOY,
            b"[]".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            "/v1/registrations".into(),
            ENVOY,
            b"".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            "/v1/registrations".into(),
            ENVOY,
            vec![b'{', 0xff, 0xfe, b'}'],
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            "/v1/registrations".into(),
            ENVOY,
            big,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            Method::POST,
            "/v1/registrations".into(),
            ENVOY,
            br#"{"resource_type":"nope"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown_resource_type",
        ),
        (
            Method::POST,
            replicas.clone(),
            ADMIN,
            br#"{"manager":5}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            replicas.clone(),
            ADMIN,
            br#"{"manager":"m9"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown_manager",
        ),
        (
            Method::POST,
            replicas,
            ADMIN,
            br#"{"manager":"m2","at":1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            format!("/v1/consumers/{unknown}/replicas"),
            ADMIN,
            br#"{"manager":"m2"}"#.to_vec(),
            StatusCode::NOT_FOUND,
            "unknown_consumer",
        ),
        (
            Method::POST,
            "/v1/consumers/not-a-consumer-id/replicas".into(),
            ADMIN,
            br#"{"manager":"m2"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_consumer_id",
        ),
        (
            Method::PUT,
            "/v1/managers/m9/availability".into(),
            ADMIN,
            br#"{"availability":"down"}"#.to_vec(),
            StatusCode::NOT_FOUND,
            "unknown_manager",
        ),
        (
            Method::PUT,
            "/v1/managers/m1/availability".into(),
            ADMIN,
            br#"{"availability":"sideways"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::PUT,
            "/v1/managers/m1/availability".into(),
            ADMIN,
            br#"{"availability":"down","why":"x"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            format!("/v1/registrations/{unknown}/confirm"),
            ENVOY,
            Vec::new(),
            StatusCode::NOT_FOUND,
            "unknown_consumer",
        ),
        (
            Method::POST,
            "/v1/registrations/not-a-consumer-id/confirm".into(),
            ENVOY,
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "bad_consumer_id",
        ),
        (
            Method::DELETE,
            format!("/v1/registrations/{unknown}"),
            ENVOY,
            Vec::new(),
            StatusCode::NOT_FOUND,
            "unknown_consumer",
        ),
        (
            Method::DELETE,
            "/v1/registrations/not-a-consumer-id".into(),
            ENVOY,
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "bad_consumer_id",
        ),
        (
            Method::GET,
            "/v1/consumers/not-a-consumer-id".into(),
            ADMIN,
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "bad_consumer_id",
        ),
        (
            Method::GET,
            "/v1/consumers?state=sideways".into(),
            ADMIN,
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
        (
            Method::GET,
            "/v1/routes?protocol=2&since=abc".into(),
            ENVOY,
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
    ];
    let mut wrong = Vec::new();
    for (method, path, token, body, want, code) in cases {
        let (status, v) = raw(&p, method.clone(), &path, token, body).await;
        let clear = v["error"].is_string() && v["message"].as_str().is_some_and(|m| !m.is_empty());
        if status != want || v["error"] != code || !clear {
            wrong.push(format!(
                "{method} {path}: {status} {v} (want {want} {code})"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        state(&p).await,
        before,
        "a refused request changed something"
    );
}
