//! The status page over HTTP: sign-in (admin or read-only status token) into
//! an HttpOnly cookie, the page and its data, availability from the page.

use crate::support::{parse, Plane, Setup, ADMIN, ENVOY};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde_json::Value;

const STATUS_TOKEN: &str = "status-read-only-token-0123";

async fn send(
    p: &Plane,
    method: Method,
    path: &str,
    cookie: Option<&str>,
    content_type: &str,
    body: &str,
) -> (StatusCode, hyper::HeaderMap, String) {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    if !body.is_empty() {
        b = b.header("content-type", content_type);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = p.app.handle(req).await;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// Marks a manager from the page (`cookie`: the session, if any).
async fn mark(
    p: &Plane,
    cookie: Option<&str>,
    manager: &str,
    availability: &str,
) -> (StatusCode, hyper::HeaderMap, String) {
    let body = serde_json::json!({ "manager": manager, "availability": availability });
    send(
        p,
        Method::POST,
        "/status/availability",
        cookie,
        "application/json",
        &body.to_string(),
    )
    .await
}

/// Signs in with `token`; the `Cookie` header value on success.
async fn sign_in(p: &Plane, token: &str) -> Result<String, (StatusCode, String)> {
    let form = format!("token={}", token.replace('+', "%2B"));
    let (s, h, body) = send(
        p,
        Method::POST,
        "/status/sign-in",
        None,
        "application/x-www-form-urlencoded",
        &form,
    )
    .await;
    if s != StatusCode::SEE_OTHER {
        return Err((s, body));
    }
    assert_eq!(h["location"], "/status");
    let set = h["set-cookie"].to_str().unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/status"] {
        assert!(set.contains(attr), "{set}");
    }
    Ok(set.split(';').next().unwrap().to_owned())
}

/// A control plane on `db` with a read-only status token configured.
async fn start_on(db: crate::support::Db) -> Plane {
    let text = Setup::default().toml(&db).replace(
        "[tokens]\n",
        &format!("[tokens]\nstatus = \"{STATUS_TOKEN}\"\n"),
    );
    let config = prealloc_control_plane::Config::parse(&text, std::path::Path::new("/")).unwrap();
    Plane::start_with(config, db).await
}

async fn start() -> Plane {
    start_on(crate::support::Db::new()).await
}

#[tokio::test]
async fn the_page_needs_a_sign_in_and_a_wrong_token_is_told_so() {
    let p = start().await;
    let (s, h, body) = send(&p, Method::GET, "/status", None, "", "").await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(body.contains("type=\"password\""), "a sign-in form: {body}");
    assert!(!body.contains("Connected Envoys"), "not the page itself");

    for wrong in ["not-the-token", ENVOY, ""] {
        let (s, body) = sign_in(&p, wrong).await.unwrap_err();
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{wrong}");
        assert!(body.contains("That token is not valid"), "{body}");
    }
    // Nothing behind the page without a session.
    let (s, _, body) = send(&p, Method::GET, "/status/data", None, "", "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    let (s, _, _) = send(
        &p,
        Method::GET,
        "/status/data",
        Some("prealloc_status=0123"),
        "",
        "",
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = mark(&p, None, "m1", "down").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn signed_in_with_the_admin_token_the_page_shows_the_state_and_marks_managers() {
    let p = start().await;
    p.wait_depth(10).await;
    p.register().await;
    let cookie = sign_in(&p, ADMIN).await.unwrap();
    let (s, _, body) = send(&p, Method::GET, "/status", Some(&cookie), "", "").await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("Connected Envoys"), "the page");

    let (s, _, body) = send(&p, Method::GET, "/status/data", Some(&cookie), "", "").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let d: Value = parse(body.as_bytes());
    assert_eq!(d["role"], "admin");
    assert_eq!(d["managers"].as_array().unwrap().len(), 3, "{d}");
    assert_eq!(d["pools"][0]["target_depth"], 10, "{d}");
    assert_eq!(d["consumers"], 1);
    assert_eq!(d["registrations_total"], 1);
    assert!(d["replication_lag"].as_array().unwrap().len() > 5);

    let (s, _, body) = mark(&p, Some(&cookie), "m2", "down").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, m) = p
        .call(Method::GET, "/v1/managers/m2", Some(ADMIN), None)
        .await;
    assert_eq!(m["availability"], "down");
    let (_, _, body) = send(&p, Method::GET, "/status/data", Some(&cookie), "", "").await;
    let d: Value = parse(body.as_bytes());
    let m2 = d["managers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "m2")
        .unwrap()
        .clone();
    assert_eq!(m2["availability"], "down");

    // Signed out: the cookie no longer works.
    let (s, _, _) = send(&p, Method::POST, "/status/sign-out", Some(&cookie), "", "").await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (s, _, _) = send(&p, Method::GET, "/status/data", Some(&cookie), "", "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_status_token_can_look_but_not_change_anything() {
    let p = start().await;
    let cookie = sign_in(&p, STATUS_TOKEN).await.unwrap();
    let (s, _, body) = send(&p, Method::GET, "/status/data", Some(&cookie), "", "").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(parse(body.as_bytes())["role"], "read-only");
    let (s, _, body) = mark(&p, Some(&cookie), "m1", "down").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (_, m) = p
        .call(Method::GET, "/v1/managers/m1", Some(ADMIN), None)
        .await;
    assert_eq!(m["availability"], "available");
    // The status token is no API token.
    let (s, _) = p
        .call(Method::GET, "/v1/pools", Some(STATUS_TOKEN), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// The `recent` list of `/status/data`.
async fn recent(p: &Plane, cookie: &str) -> Vec<Value> {
    let (s, _, body) = send(p, Method::GET, "/status/data", Some(cookie), "", "").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    parse(body.as_bytes())["recent"].as_array().unwrap().clone()
}

#[tokio::test]
async fn the_latest_sign_ups_show_k_of_n_newest_first_bounded_and_after_a_restart() {
    use prealloc_control_plane::registry::RECENT;
    let p = start().await;
    let mut ids = Vec::new();
    for _ in 0..RECENT + 5 {
        p.wait_depth(10).await;
        ids.push(p.register().await["consumer"].as_str().unwrap().to_owned());
    }
    let cookie = sign_in(&p, ADMIN).await.unwrap();
    let shown = recent(&p, &cookie).await;
    let newest: Vec<&str> = ids.iter().rev().take(RECENT).map(String::as_str).collect();
    let listed: Vec<&str> = shown
        .iter()
        .map(|c| c["consumer"].as_str().unwrap())
        .collect();
    assert_eq!(listed, newest, "the {RECENT} latest, newest first");
    let latest = &shown[0];
    assert_eq!(latest["state"], "registering");
    assert_eq!(
        (latest["copies"].clone(), latest["target"].clone()),
        (1.into(), 3.into())
    );

    // A copy reported through the API moves it to 2 of 3; the third registers it.
    let (first, latest_id) = (
        latest["first_manager"].as_str().unwrap().to_owned(),
        newest[0],
    );
    let others: Vec<String> = ["m1", "m2", "m3"]
        .iter()
        .filter(|m| **m != first)
        .map(|m| m.to_string())
        .collect();
    assert_eq!(p.replica(latest_id, &others[0]).await.0, StatusCode::OK);
    assert_eq!(recent(&p, &cookie).await[0]["copies"], 2);
    assert_eq!(p.replica(latest_id, &others[1]).await.0, StatusCode::OK);
    let done = recent(&p, &cookie).await[0].clone();
    assert_eq!(
        (done["copies"].clone(), done["state"].clone()),
        (3.into(), "registered".into())
    );
    let waited = done["waited_ms"].as_u64().unwrap();

    // A restart rebuilds the list from the database: same consumers, same order.
    let p = start_on(p.stop().await).await;
    let cookie = sign_in(&p, ADMIN).await.unwrap();
    let shown = recent(&p, &cookie).await;
    let listed: Vec<&str> = shown
        .iter()
        .map(|c| c["consumer"].as_str().unwrap())
        .collect();
    assert_eq!(listed, newest);
    assert_eq!(
        shown[0]["waited_ms"].as_u64(),
        Some(waited),
        "registered: how long it took"
    );
}
