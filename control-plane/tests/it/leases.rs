//! A registration is a lease: provisional until the filter confirms it (the
//! first manager accepted the sign-up), reclaimed when never confirmed, and a
//! confirmed one is never given back.

use crate::support::{Db, Plane, Setup, ADMIN, ENVOY};
use hyper::{Method, StatusCode};
use std::time::{Duration, Instant};

fn with_lease(ms: u64) -> Setup {
    Setup {
        extra: format!("registration_lease_ms = {ms}"),
        ..Setup::default()
    }
}

async fn confirm(p: &Plane, consumer: &str) -> (StatusCode, serde_json::Value) {
    p.call(
        Method::POST,
        &format!("/v1/registrations/{consumer}/confirm"),
        Some(ENVOY),
        None,
    )
    .await
}

async fn give_back(p: &Plane, consumer: &str) -> (StatusCode, serde_json::Value) {
    p.call(
        Method::DELETE,
        &format!("/v1/registrations/{consumer}"),
        Some(ENVOY),
        None,
    )
    .await
}

#[tokio::test]
async fn a_confirmed_registration_is_never_given_back() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap();
    let (s, v) = confirm(&p, c).await;
    assert_eq!(
        (s, v["newly"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{v}"
    );
    let (s, v) = confirm(&p, c).await;
    assert_eq!(
        (s, v["newly"].as_bool()),
        (StatusCode::OK, Some(false)),
        "idempotent: {v}"
    );
    p.wait_depth(10).await;
    let (s, v) = give_back(&p, c).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"], "registration_confirmed");
    // Nothing changed: the consumer keeps its resource, the pool is as it was.
    let (s, rec) = p.consumer(c).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(rec["resource"]["id"], reg["resource"]["id"]);
    assert!(rec["confirmed_ms"].is_u64(), "{rec}");
    assert_eq!(p.pools().await[0]["depth"], 10);
}

#[tokio::test]
async fn a_replicated_consumer_counts_as_confirmed() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap();
    let other = if reg["manager"] == "m1" { "m2" } else { "m1" };
    let (s, _) = p.replica(c, other).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = give_back(&p, c).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("registration_confirmed"))
    );
}

#[tokio::test]
async fn an_unconfirmed_registration_is_given_back_or_reclaimed_when_its_lease_ends() {
    let p = Plane::start(&with_lease(300)).await;
    p.wait_depth(10).await;
    // Given back before its lease ends (a manager refused the sign-up).
    let a = p.register().await["consumer"].as_str().unwrap().to_owned();
    let (s, _) = give_back(&p, &a).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Never confirmed: reclaimed after 300 ms.
    let reg = p.register().await;
    let b = reg["consumer"].as_str().unwrap();
    let in_table = p.routes("since=0").await;
    assert!(
        in_table["upsert"].to_string().contains(b),
        "in the table while provisional"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _) = p.consumer(b).await;
        if s == StatusCode::NOT_FOUND {
            break;
        }
        assert!(Instant::now() < deadline, "never reclaimed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The route change is published just after the record goes.
    while p.routes("since=0").await["upsert"].to_string().contains(b) {
        assert!(
            Instant::now() < deadline,
            "still in the table after its reclaim"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The resource is back: ready again (the pool may now stand above its target).
    let depth = p.pools().await[0]["depth"].as_u64().unwrap();
    assert!(depth >= 10, "depth {depth}");
    assert_eq!(p.metric("prealloc_registrations_reclaimed_total").await, 1);
    // A confirmation after the reclaim is refused: the filter then answers 503, no cookie.
    let (s, v) = confirm(&p, b).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_consumer")),
        "{v}"
    );
}

#[tokio::test]
async fn a_confirmed_registration_outlives_its_lease() {
    let p = Plane::start(&with_lease(200)).await;
    p.wait_depth(10).await;
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    assert_eq!(confirm(&p, &c).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(p.consumer(&c).await.0, StatusCode::OK);
    assert_eq!(p.metric("prealloc_registrations_reclaimed_total").await, 0);
}

/// The control plane committed a registration and stopped before anyone
/// confirmed it (kill -9 between commit and answer looks the same): after the
/// restart the lease still runs out and the resource comes back.
#[tokio::test]
async fn a_lease_survives_a_restart_and_is_reclaimed_after_it() {
    let setup = with_lease(400);
    let p = Plane::start(&setup).await;
    p.wait_depth(10).await;
    let provisional = p.register().await["consumer"].as_str().unwrap().to_owned();
    let confirmed = p.register().await["consumer"].as_str().unwrap().to_owned();
    assert_eq!(confirm(&p, &confirmed).await.0, StatusCode::OK);
    let db: Db = p.stop().await;
    let p = Plane::start_on(&setup, db).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.consumer(&provisional).await.0 != StatusCode::NOT_FOUND {
        assert!(
            Instant::now() < deadline,
            "the provisional registration was not reclaimed after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        p.consumer(&confirmed).await.0,
        StatusCode::OK,
        "the confirmed one stays"
    );
    let _ = ADMIN;
}
