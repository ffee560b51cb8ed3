//! Failures below the store seam: a failing commit changes nothing anyone can
//! see, and a dead writer makes the control plane say so instead of looking healthy.

use crate::support::{Plane, Setup, ADMIN, ENVOY};
use hyper::{Method, StatusCode};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;

async fn health(p: &Plane) -> (StatusCode, serde_json::Value) {
    p.call(Method::GET, "/healthz", None, None).await
}

#[tokio::test]
async fn a_failed_commit_answers_503_bumps_no_version_publishes_nothing_and_reloads() {
    let (p, faults) = Plane::start_faulty(&Setup::default()).await;
    p.wait_depth(10).await;
    let before = p.register().await;
    let consumer = before["consumer"].as_str().unwrap().to_owned();
    p.wait_depth(10).await;
    let (_, h) = health(&p).await;
    let (epoch, version) = (
        h["epoch"].as_str().unwrap().to_owned(),
        h["version"].as_u64().unwrap(),
    );
    let loads = faults.loads.load(Ordering::SeqCst);

    faults.set_fail_commits(true);
    let (s, headers, v) = p
        .call_full(
            Method::POST,
            "/v1/registrations",
            Some(ENVOY),
            Some(json!({"resource_type": "mailbox"})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "storage_failed", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("disk I/O error"),
        "{v}"
    );
    assert_eq!(
        headers.get("retry-after").map(|h| h.to_str().unwrap()),
        Some("1")
    );

    let (s, v) = p.replica(&consumer, "m2").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("storage_failed"))
    );
    let (s, v) = p
        .call(
            Method::PUT,
            "/v1/managers/m3/availability",
            Some(ADMIN),
            Some(json!({"availability": "down"})),
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("storage_failed"))
    );
    assert!(faults.failed_commits.load(Ordering::SeqCst) >= 3);

    // No version moved and no poller was woken: a long-poll at the old version waits it out.
    let (_, h) = health(&p).await;
    assert_eq!(h["version"].as_u64(), Some(version));
    let r = p
        .routes(&format!("since={version}&epoch={epoch}&wait_ms=300"))
        .await;
    assert_eq!(r["kind"], "unchanged", "{r}");

    // The in-memory state was read back from the store: what failed is gone.
    assert!(
        faults.loads.load(Ordering::SeqCst) > loads,
        "the state was reloaded"
    );
    let (_, c) = p.consumer(&consumer).await;
    assert_eq!(c["replicas"].as_array().unwrap().len(), 1, "{c}");
    let (_, m3) = p
        .call(Method::GET, "/v1/managers/m3", Some(ADMIN), None)
        .await;
    assert_eq!(m3["availability"], "available");
    let pools = p.pools().await;
    assert_eq!(
        pools[0]["depth"], 10,
        "the resource of the failed sign-up is still ready: {pools}"
    );

    // Once the store works again, so does everything else.
    faults.set_fail_commits(false);
    p.register().await;
    let (s, _) = p.replica(&consumer, "m2").await;
    assert_eq!(s, StatusCode::OK);
    let (_, h) = health(&p).await;
    assert!(h["version"].as_u64().unwrap() > version);
}

/// The database gone (commits and reads fail, as when PostgreSQL restarts):
/// memory holds what the failed batch did and cannot be read back, so every
/// write is refused until a reload succeeds, and then nothing of it remains.
#[tokio::test]
async fn writes_are_refused_until_the_state_is_read_back_after_a_failed_commit() {
    let (p, faults) = Plane::start_faulty(&Setup::default()).await;
    p.wait_depth(10).await;
    faults.set_fail_commits(true);
    faults.set_fail_loads(true);
    let signup = || {
        p.call(
            Method::POST,
            "/v1/registrations",
            Some(ENVOY),
            Some(json!({"resource_type": "mailbox"})),
        )
    };
    let (s, v) = signup().await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("storage_failed")),
        "{v}"
    );
    // Commits work again but reads do not: the state cannot be trusted, so
    // no write is applied (none reaches the store).
    faults.set_fail_commits(false);
    let commits = faults.commits.load(Ordering::SeqCst);
    let (s, v) = signup().await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("storage_failed")),
        "{v}"
    );
    assert!(
        v["message"].as_str().unwrap().contains("cannot be read"),
        "{v}"
    );
    assert_eq!(
        faults.commits.load(Ordering::SeqCst),
        commits,
        "nothing was committed"
    );
    // Reads back: writes are taken, and the refused sign-ups left nothing.
    faults.set_fail_loads(false);
    let reg = p.register().await;
    p.wait_depth(10).await;
    // Memory lists the registering consumers: only the one accepted.
    let (_, list) = p
        .call(
            Method::GET,
            "/v1/consumers?state=registering",
            Some(ADMIN),
            None,
        )
        .await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["consumer"].as_str())
        .collect();
    assert_eq!(ids, [reg["consumer"].as_str().unwrap()], "{list}");
}

#[tokio::test]
async fn a_panicking_writer_fails_healthz_and_every_later_write() {
    let (p, faults) = Plane::start_faulty(&Setup::default()).await;
    p.wait_depth(10).await;
    assert_eq!(health(&p).await.0, StatusCode::OK);

    faults.set_panic_on_commit(true);
    let (s, v) = p
        .call(
            Method::POST,
            "/v1/registrations",
            Some(ENVOY),
            Some(json!({"resource_type": "mailbox"})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "writer_failed", "{v}");

    let (s, v) = health(&p).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "writer_failed");
    assert!(
        v["message"].as_str().unwrap().contains("injected panic"),
        "{v}"
    );

    let (s, v) = p.replica("AAAAAAAAAAAAAAAAAAAAAA", "m2").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("writer_failed"))
    );
}

#[tokio::test]
async fn a_served_control_plane_exits_with_an_error_when_its_writer_dies() {
    let (mut p, faults) = Plane::start_faulty(&Setup::default()).await;
    p.wait_depth(10).await;
    let cp = p.cp.take().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served = tokio::spawn(prealloc_control_plane::server::serve(
        cp,
        listener,
        std::future::pending(),
    ));
    faults.set_panic_on_commit(true);
    let (s, _) = p
        .call(
            Method::POST,
            "/v1/registrations",
            Some(ENVOY),
            Some(json!({"resource_type": "mailbox"})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let result = tokio::time::timeout(Duration::from_secs(15), served)
        .await
        .expect("serve returns once the writer died")
        .unwrap();
    let err = result.expect_err("serve reports the failure");
    assert!(
        format!("{err:#}").contains("writer thread panicked"),
        "{err:#}"
    );
}
