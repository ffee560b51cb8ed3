//! The same API over a real socket on port 0, with graceful shutdown.

use crate::support::{http, Db, Setup, ADMIN, ENVOY};
use hyper::{Method, StatusCode};
use prealloc_control_plane::Server;
use std::time::{Duration, Instant};

#[tokio::test]
async fn register_report_and_long_poll_over_http() {
    let db = Db::new();
    let server = Server::start(Setup::default().config(&db))
        .await
        .expect("server starts");
    let addr = server.addr();
    assert_ne!(addr.port(), 0);
    let (s, v) = http(addr, Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(addr, Method::GET, "/v1/pools", Some(ADMIN), None)
        .await
        .1[0]["depth"]
        != 10
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, full) = http(
        addr,
        Method::GET,
        "/v1/routes?protocol=2&since=0",
        Some(ENVOY),
        None,
    )
    .await;
    let q = format!(
        "/v1/routes?protocol=2&since={}&epoch={}&wait_ms=10000",
        full["version"],
        full["epoch"].as_str().unwrap()
    );
    let poll = tokio::spawn(async move { http(addr, Method::GET, &q, Some(ENVOY), None).await });
    let (s, reg) = http(
        addr,
        Method::POST,
        "/v1/registrations",
        Some(ENVOY),
        Some(serde_json::json!({"resource_type": "mailbox"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, delta) = poll.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(delta["upsert"][0]["consumer"], reg["consumer"]);
    let c = reg["consumer"].as_str().unwrap();
    let (s, ack) = http(
        addr,
        Method::POST,
        &format!("/v1/consumers/{c}/replicas"),
        Some(ADMIN),
        Some(serde_json::json!({"manager": "m1"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ack}");
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_held_long_polls_at_once() {
    let db = Db::new();
    let server = Server::start(Setup::default().config(&db))
        .await
        .expect("server starts");
    let addr = server.addr();
    let (_, full) = http(
        addr,
        Method::GET,
        "/v1/routes?protocol=2&since=0",
        Some(ENVOY),
        None,
    )
    .await;
    let q = format!(
        "/v1/routes?protocol=2&since={}&epoch={}&wait_ms=60000",
        full["version"],
        full["epoch"].as_str().unwrap()
    );
    let poll = tokio::spawn(async move { http(addr, Method::GET, &q, Some(ENVOY), None).await });
    // Shut down only once the poll is held.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, m) = http(addr, Method::GET, "/metrics", None, None).await;
        if m.as_str()
            .unwrap()
            .contains("prealloc_routes_waiting_pollers 1")
        {
            break;
        }
        assert!(Instant::now() < deadline, "poll never held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    server.shutdown().await;
    let (s, v) = poll.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["kind"], "unchanged");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_too() {
    use http_body_util::{BodyExt, Full};
    let db = Db::new();
    let server = Server::start(Setup::default().config(&db))
        .await
        .expect("server starts");
    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = hyper::Request::get(format!(
        "http://{}/v1/routes?protocol=2&since=0",
        server.addr()
    ))
    .header("authorization", format!("Bearer {ENVOY}"))
    .body(Full::new(bytes::Bytes::new()))
    .unwrap();
    let resp = client.request(req).await.expect("h2c answer");
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["kind"], "full");
    server.shutdown().await;
}

/// What control-plane/README.md documents as the one exception to JSON errors:
/// requests hyper refuses before routing get its status and an empty body.
#[tokio::test]
async fn protocol_level_refusals_are_the_documented_exception() {
    use std::io::{Read, Write};
    let db = Db::new();
    let server = Server::start(Setup::default().config(&db))
        .await
        .expect("server starts");
    let addr = server.addr();
    let ask = move |req: Vec<u8>| {
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(&req);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let huge_header = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(600 * 1024)
    );
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70 * 1024));
    let not_http = b"\x16\x03\x01 not http at all\r\n\r\n".to_vec();
    for (req, want) in [
        (huge_header.into_bytes(), "431"),
        (long_uri.into_bytes(), "414"),
        (not_http, "400"),
    ] {
        let answer = ask(req).await.unwrap();
        let status = answer.split_whitespace().nth(1).unwrap_or("");
        assert_eq!(status, want, "{answer:.200}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(body.is_empty(), "empty body: {body:?}");
    }
    server.shutdown().await;
}
