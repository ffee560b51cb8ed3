//! Replication in both modes: reported copies and active copies through the manager contract.

use crate::support::{ids, Plane, Setup, TestManager};
use hyper::StatusCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn others(first: &str) -> Vec<String> {
    ["m1", "m2", "m3"]
        .iter()
        .filter(|m| **m != first)
        .map(|m| m.to_string())
        .collect()
}

#[tokio::test]
async fn reported_copies_grow_the_replica_set_until_registered() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap();
    let first = reg["manager"].as_str().unwrap();
    let rest = others(first);
    let (s, ack) = p.replica(c, &rest[0]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ack["added"], true);
    assert_eq!(ack["state"], "registering");
    assert_eq!(ack["replicas"], serde_json::json!([first, rest[0]]));
    let (_, ack) = p.replica(c, &rest[1]).await;
    assert_eq!(ack["state"], "registered");
    assert_eq!(ack["replicas"].as_array().unwrap().len(), 3);
    let (_, rec) = p.consumer(c).await;
    assert_eq!(rec["state"], "registered");
    assert!(rec["registered_ms"].as_u64().unwrap() >= rec["created_ms"].as_u64().unwrap());
    let routes = p.routes("since=0").await;
    assert_eq!(routes["upsert"][0]["state"], "registered");
    assert_eq!(
        routes["upsert"][0]["replicas"][0], first,
        "the first manager stays first"
    );
}

#[tokio::test]
async fn reporting_the_same_copy_twice_changes_nothing() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap();
    let rest = others(reg["manager"].as_str().unwrap());
    p.replica(c, &rest[0]).await;
    let v1 = p.routes("since=0").await["version"].as_u64().unwrap();
    let (s, ack) = p.replica(c, &rest[0]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ack["added"], false);
    assert_eq!(ack["replicas"].as_array().unwrap().len(), 2);
    let (s, ack) = p.replica(c, reg["manager"].as_str().unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ack["added"], false, "the first manager already holds it");
    assert_eq!(
        p.routes("since=0").await["version"].as_u64().unwrap(),
        v1,
        "no new version"
    );
}

#[tokio::test]
async fn unknown_consumer_is_404_and_unknown_manager_is_400() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let (s, v) = p.replica("AAAAAAAAAAAAAAAAAAAAAA", "m1").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "unknown_consumer");
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    let (s, v) = p.replica(&c, "m7").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "unknown_manager");
    assert!(v["message"].as_str().unwrap().contains("m7"));
    let (s, v) = p.replica("not-an-id", "m1").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "bad_consumer_id");
}

#[tokio::test]
async fn a_manager_going_down_registers_whoever_holds_every_other_copy() {
    // `target = "all"`, reported mode: two of three copies, then the third
    // manager goes down for good. Its consumers must not stay registering.
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap().to_owned();
    let first = reg["manager"].as_str().unwrap().to_owned();
    let rest = others(&first);
    let (_, ack) = p.replica(&c, &rest[0]).await;
    assert_eq!(ack["state"], "registering");
    // A second consumer with only the first copy stays registering.
    let lone = p.register().await;
    let lone_first = lone["manager"].as_str().unwrap().to_owned();
    let lone = lone["consumer"].as_str().unwrap().to_owned();
    let start = p.routes("since=0").await;
    let (since, epoch) = (start["version"].as_u64().unwrap(), &start["epoch"]);

    let (s, _) = p
        .call(
            hyper::Method::PUT,
            &format!("/v1/managers/{}/availability", rest[1]),
            Some(crate::support::ADMIN),
            Some(serde_json::json!({"availability": "down"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, rec) = p.consumer(&c).await;
    assert_eq!(rec["state"], "registered", "{rec}");
    assert_eq!(rec["replication_target"], 2, "{rec}");
    let (_, rec) = p.consumer(&lone).await;
    assert_eq!(rec["state"], "registering", "one copy of two: {rec}");
    // Envoys learn it from the next delta.
    let delta = p
        .routes(&format!("since={since}&epoch={}", epoch.as_str().unwrap()))
        .await;
    assert_eq!(delta["kind"], "delta", "{delta}");
    let entry = delta["upsert"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["consumer"] == c.as_str())
        .unwrap_or_else(|| panic!("no route change for {c}: {delta}"));
    assert_eq!(entry["state"], "registered", "{delta}");

    // Durable: a restart keeps it registered.
    let db = p.stop().await;
    let p = Plane::start_on(&Setup::default(), db).await;
    let (_, rec) = p.consumer(&c).await;
    assert_eq!(rec["state"], "registered", "after restart: {rec}");
    // The lone consumer registers once every manager that is up holds it.
    for m in others(&lone_first).iter().filter(|m| **m != rest[1]) {
        p.replica(&lone, m).await;
    }
    let (_, rec) = p.consumer(&lone).await;
    assert_eq!(rec["state"], "registered", "{rec}");
}

async fn set_availability(p: &Plane, manager: &str, availability: &str) {
    let (s, v) = p
        .call(
            hyper::Method::PUT,
            &format!("/v1/managers/{manager}/availability"),
            Some(crate::support::ADMIN),
            Some(serde_json::json!({ "availability": availability })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn only_copies_on_managers_that_are_up_count() {
    // target = 2 over two managers; the consumer's only copy is on its first
    // manager, which goes down: one copy on a down manager is no copy at all.
    let mut setup = Setup {
        target: "2",
        ..Setup::default()
    };
    setup.managers.truncate(2);
    let p = Plane::start(&setup).await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap().to_owned();
    let first = reg["manager"].as_str().unwrap().to_owned();
    let other = if first == "m1" { "m2" } else { "m1" };
    set_availability(&p, &first, "down").await;
    let (_, rec) = p.consumer(&c).await;
    assert_eq!(rec["state"], "registering", "{rec}");
    let (_, ack) = p.replica(&c, other).await;
    assert_eq!(
        ack["state"], "registered",
        "one copy on the one manager up: {ack}"
    );
}

#[tokio::test]
async fn with_every_manager_down_nobody_becomes_registered() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    for m in ["m1", "m2", "m3"] {
        set_availability(&p, m, "down").await;
    }
    let (_, rec) = p.consumer(&c).await;
    assert_eq!(rec["state"], "registering", "{rec}");
}

#[tokio::test]
async fn a_manager_retired_in_the_config_settles_its_waiting_consumers_at_start() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap().to_owned();
    let rest = others(reg["manager"].as_str().unwrap());
    p.replica(&c, &rest[0]).await;
    let db = p.stop().await;
    // The operator retires rest[1] in the config (no availability in the database).
    let mut config = Setup::default().config(&db);
    config
        .managers
        .iter_mut()
        .find(|m| m.id == rest[1])
        .unwrap()
        .availability = prealloc_wire::Availability::Down;
    let p = Plane::start_with(config, db).await;
    p.wait_consumer(&c, "registered at start", |v| v["state"] == "registered")
        .await;
}

#[tokio::test]
async fn a_numeric_target_registers_after_that_many_copies() {
    let p = Plane::start(&Setup {
        target: "2",
        ..Setup::default()
    })
    .await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap();
    assert_eq!(p.consumer(c).await.1["replication_target"], 2);
    let (_, ack) = p
        .replica(c, &others(reg["manager"].as_str().unwrap())[0])
        .await;
    assert_eq!(ack["state"], "registered");
}

#[tokio::test]
async fn a_target_of_one_registers_at_sign_up() {
    let p = Plane::start(&Setup {
        target: "1",
        ..Setup::default()
    })
    .await;
    p.wait_depth(10).await;
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    assert_eq!(p.consumer(&c).await.1["state"], "registered");
}

#[tokio::test]
async fn registered_consumers_leave_the_table_after_the_grace_period() {
    let p = Plane::start(&Setup {
        grace_ms: 150,
        ..Setup::default()
    })
    .await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap().to_owned();
    let start = p.routes("since=0").await;
    let epoch = start["epoch"].as_str().unwrap().to_owned();
    let mut since = start["version"].as_u64().unwrap();
    for m in others(reg["manager"].as_str().unwrap()) {
        p.replica(&c, &m).await;
    }
    let registered_at = Instant::now();
    // Follow the deltas like a poller until the entry is removed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = p
            .routes(&format!("since={since}&epoch={epoch}&wait_ms=2000"))
            .await;
        assert_eq!(r["kind"], "delta", "{r}");
        since = r["version"].as_u64().unwrap();
        if ids(&r, "remove").contains(&c) {
            break;
        }
        assert!(Instant::now() < deadline, "entry never removed");
    }
    assert!(
        registered_at.elapsed() >= Duration::from_millis(100),
        "removed before the grace period"
    );
    let (_, rec) = p.consumer(&c).await;
    assert_eq!(rec["state"], "registered", "the record stays");
    assert_eq!(rec["in_routing_table"], false);
    // A late report is still recorded, but does not bring the entry back.
    let (s, _) = p.replica(&c, reg["manager"].as_str().unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(ids(&p.routes("since=0").await, "upsert").is_empty());
}

async fn active_setup(n: usize) -> (Vec<TestManager>, Plane) {
    let mut ms = Vec::new();
    for _ in 0..n {
        ms.push(TestManager::start().await);
    }
    let urls: Vec<String> = ms.iter().map(|m| m.url.clone()).collect();
    let p = Plane::start(&Setup {
        mode: "active",
        ..Setup::with_managers(&urls)
    })
    .await;
    p.wait_depth(10).await;
    (ms, p)
}

fn index(manager: &str) -> usize {
    manager.trim_start_matches('m').parse::<usize>().unwrap() - 1
}

#[tokio::test]
async fn active_mode_copies_the_data_to_every_manager_then_registers() {
    let (ms, p) = active_setup(3).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap().to_owned();
    // The sign-up reaches the first manager: it now holds the data.
    ms[index(reg["manager"].as_str().unwrap())].hold(&c, b"mailbox bytes \x00\xff");
    let rec = p
        .wait_consumer(&c, "registered", |v| v["state"] == "registered")
        .await;
    assert_eq!(rec["replicas"].as_array().unwrap().len(), 3);
    for m in &ms {
        assert_eq!(
            m.held(&c).as_deref(),
            Some(&b"mailbox bytes \x00\xff"[..]),
            "every manager holds the same bytes"
        );
    }
    let metrics = p.call(hyper::Method::GET, "/metrics", None, None).await.1;
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("prealloc_active_copies_total 2"));
}

#[tokio::test]
async fn active_mode_waits_for_the_sign_up_and_retries_failed_copies() {
    let (ms, p) = active_setup(3).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap().to_owned();
    let first = index(reg["manager"].as_str().unwrap());
    let second = (first + 1) % 3;
    ms[second].state.fail_put.store(2, Ordering::SeqCst);
    // Not held anywhere yet: the first manager answers 404 and nothing is copied.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ms[first].state.gets.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the control plane never tried to read the data"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        p.consumer(&c).await.1["replicas"].as_array().unwrap().len(),
        1
    );
    ms[first].hold(&c, b"late data");
    let rec = p
        .wait_consumer(&c, "registered", |v| v["state"] == "registered")
        .await;
    assert_eq!(rec["replicas"].as_array().unwrap().len(), 3);
    assert_eq!(ms[second].held(&c).as_deref(), Some(&b"late data"[..]));
    assert_eq!(
        ms[second].state.fail_put.load(Ordering::SeqCst),
        0,
        "both failures were hit and retried"
    );
}

#[tokio::test]
async fn a_copy_answered_after_its_timeout_is_retried_and_counted_once() {
    let (ms, p) = active_setup(3).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap().to_owned();
    let first = index(reg["manager"].as_str().unwrap());
    let slow = (first + 1) % 3;
    // The copy lands at once, but the answer comes after the timeout, twice.
    ms[slow].state.slow_puts.store(2, Ordering::SeqCst);
    ms[first].hold(&c, b"data");
    let rec = p
        .wait_consumer(&c, "registered", |v| v["state"] == "registered")
        .await;
    let managers: Vec<&str> = rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["manager"].as_str().unwrap())
        .collect();
    let distinct: std::collections::BTreeSet<_> = managers.iter().collect();
    assert_eq!(managers.len(), 3, "{rec}");
    assert_eq!(distinct.len(), 3, "a copy counted twice: {rec}");
    assert!(
        ms[slow].state.puts.load(Ordering::SeqCst) >= 3,
        "both slow answers were retried"
    );
    assert_eq!(ms[slow].state.slow_puts.load(Ordering::SeqCst), 0);
    // Metrics follow the commit (the record above may be seen a moment earlier).
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.metric("prealloc_replicas_recorded_total").await < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.metric("prealloc_replicas_recorded_total").await, 2);
    assert!(p.metric("prealloc_active_copy_failures_total").await >= 2);
}

#[tokio::test]
async fn active_mode_skips_down_managers_and_the_target_does_not_wait_for_them() {
    let (ms, p) = active_setup(3).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap().to_owned();
    let first = index(reg["manager"].as_str().unwrap());
    let down = (first + 1) % 3;
    let down_id = format!("m{}", down + 1);
    let path = format!("/v1/managers/{down_id}/availability");
    let set = |availability: &'static str| {
        p.call(
            hyper::Method::PUT,
            &path,
            Some(crate::support::ADMIN),
            Some(serde_json::json!({ "availability": availability })),
        )
    };
    set("down").await;
    ms[first].hold(&c, b"x");
    // `target = "all"` counts the managers that are not down: two copies make it registered.
    let v = p
        .wait_consumer(&c, "registered without the down manager", |v| {
            v["state"] == "registered"
        })
        .await;
    assert_eq!(v["replicas"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["replication_target"], 2, "{v}");
    assert!(
        ms[down].held(&c).is_none(),
        "nothing copied to a down manager"
    );

    // Back: a new consumer needs all three again.
    set("available").await;
    let reg = p.register().await;
    let c2 = reg["consumer"].as_str().unwrap().to_owned();
    ms[index(reg["manager"].as_str().unwrap())].hold(&c2, b"y");
    let v = p
        .wait_consumer(&c2, "registered on all three", |v| {
            v["state"] == "registered"
        })
        .await;
    assert_eq!(v["replicas"].as_array().unwrap().len(), 3, "{v}");
    assert!(ms[down].held(&c2).is_some());
}

#[tokio::test]
async fn active_copies_resume_after_a_restart() {
    let mut ms = Vec::new();
    for _ in 0..3 {
        ms.push(TestManager::start().await);
    }
    let urls: Vec<String> = ms.iter().map(|m| m.url.clone()).collect();
    let setup = Setup {
        mode: "active",
        ..Setup::with_managers(&urls)
    };
    let p = Plane::start(&setup).await;
    p.wait_depth(10).await;
    let reg = p.register().await;
    let c = reg["consumer"].as_str().unwrap().to_owned();
    let db = p.stop().await;
    // The sign-up lands while the control plane is down.
    ms[index(reg["manager"].as_str().unwrap())].hold(&c, b"while down");
    let p = Plane::start_on(&setup, db).await;
    p.wait_consumer(&c, "registered", |v| v["state"] == "registered")
        .await;
    assert!(ms
        .iter()
        .all(|m| m.held(&c).as_deref() == Some(&b"while down"[..])));
}
