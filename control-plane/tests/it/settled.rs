//! Settled consumers (registered, confirmed, out of the route window) leave
//! memory: the database keeps them, and every call about one still answers
//! as if it were in memory, before and after a restart.

use crate::support::{Plane, Setup, ADMIN, ENVOY};
use hyper::{Method, StatusCode};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The status page follows this many newest sign-ups: they stay in memory.
const RECENT: u64 = 20;

fn setup() -> Setup {
    Setup {
        // One copy registers a consumer at once; it settles 300 ms later.
        target: "1",
        grace_ms: 300,
        target_depth: 40,
        ..Setup::default()
    }
}

async fn wait_metric(p: &Plane, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = p.metric(name).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed {got}, never {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A record without what depends on the table and on the manager's load
/// (other sign-ups move it), not on the consumer.
fn without_table(mut rec: Value) -> Value {
    rec.as_object_mut().unwrap().remove("in_routing_table");
    let first = rec["first_manager"].as_object_mut().unwrap();
    first.remove("used");
    first.remove("free");
    rec
}

async fn managers(p: &Plane) -> Value {
    p.call(Method::GET, "/v1/managers", Some(ADMIN), None)
        .await
        .1
}

#[tokio::test]
async fn settled_consumers_leave_memory_and_every_call_about_them_still_answers() {
    let p = Plane::start(&setup()).await;
    p.wait_depth(40).await;
    let mut ids = Vec::new();
    let mut before = Vec::new();
    for _ in 0..RECENT + 5 {
        let reg = p.register().await;
        let c = reg["consumer"].as_str().unwrap().to_owned();
        let (s, v) = p
            .call(
                Method::POST,
                &format!("/v1/registrations/{c}/confirm"),
                Some(ENVOY),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (s, rec) = p.consumer(&c).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(rec["in_routing_table"], true, "{rec}");
        before.push(rec);
        ids.push(c);
    }
    // Out of the window, the five oldest leave memory; the newest 20 stay.
    wait_metric(&p, "prealloc_routes_entries", 0).await;
    wait_metric(&p, "prealloc_consumers_in_memory", RECENT).await;
    assert_eq!(p.metric("prealloc_consumers").await, RECENT + 5);
    let used_before = managers(&p).await;

    // Read back from the database: the same record.
    let settled = &ids[0];
    let (s, rec) = p.consumer(settled).await;
    assert_eq!(s, StatusCode::OK, "{rec}");
    assert_eq!(rec["in_routing_table"], false);
    assert_eq!(without_table(rec), without_table(before[0].clone()));

    // A late copy of a settled consumer is recorded once.
    let first = before[0]["first_manager"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = if first == "m1" { "m2" } else { "m1" };
    let (s, ack) = p.replica(settled, other).await;
    assert_eq!(s, StatusCode::OK, "{ack}");
    assert_eq!(ack["added"], true);
    assert_eq!(ack["state"], "registered");
    assert_eq!(ack["replicas"], serde_json::json!([first, other]));
    let (_, ack) = p.replica(settled, other).await;
    assert_eq!(ack["added"], false, "{ack}");
    let (_, rec) = p.consumer(settled).await;
    let held: Vec<&str> = rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["manager"].as_str().unwrap())
        .collect();
    assert_eq!(held, [first.as_str(), other]);
    // It stays out of memory and out of the table.
    assert_eq!(p.metric("prealloc_consumers_in_memory").await, RECENT);
    let table = p.routes("since=0").await;
    assert!(
        !table["entries"].to_string().contains(settled.as_str()),
        "a settled consumer is back in the table: {table}"
    );

    // Confirmed long ago: never given back, and confirming again is a no-op.
    let (s, v) = p
        .call(
            Method::DELETE,
            &format!("/v1/registrations/{settled}"),
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("registration_confirmed"))
    );
    let (s, v) = p
        .call(
            Method::POST,
            &format!("/v1/registrations/{settled}/confirm"),
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(
        (s, v["newly"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{v}"
    );

    // Unknown ones are still unknown.
    let stranger = prealloc_wire::ConsumerId::from_bytes([9; 16]).to_string();
    let (s, _) = p.replica(&stranger, "m1").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = p.consumer(&stranger).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Lists come from the database: every consumer, in id order.
    let (s, list) = p
        .call(
            Method::GET,
            "/v1/consumers?state=registered&limit=100",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["consumer"].as_str().unwrap())
        .collect();
    let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
    sorted.sort();
    assert_eq!(listed, sorted);

    // After a restart: the same counts, the same capacity used, the same records.
    let (_, rec_before_restart) = p.consumer(settled).await;
    let db = p.stop().await;
    let p = Plane::start_on(&setup(), db).await;
    assert_eq!(p.metric("prealloc_consumers").await, RECENT + 5);
    assert_eq!(p.metric("prealloc_consumers_in_memory").await, RECENT);
    assert_eq!(managers(&p).await, used_before);
    let (_, rec) = p.consumer(settled).await;
    assert_eq!(rec, rec_before_restart);
}
