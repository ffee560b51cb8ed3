//! Registrations: take a ready resource, answer the registration, give it back.

use crate::support::{ids, Plane, Setup, ADMIN, ENVOY};
use hyper::{Method, StatusCode};
use prealloc_wire::{ConsumerId, Registration};
use serde_json::json;
use std::collections::{HashMap, HashSet};

#[tokio::test]
async fn registration_answers_consumer_manager_cluster_and_resource() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let v = p.register().await;
    let r: Registration = serde_json::from_value(v.clone()).expect("wire Registration");
    assert!(ConsumerId::parse(r.consumer.as_str()).is_ok());
    assert_eq!(r.cluster, format!("manager_{}", r.manager));
    assert_eq!(r.resource.resource_type, "mailbox");
    assert_eq!(r.resource.location, "eu");
    assert_eq!(r.resource.name, format!("mailbox-{}", r.resource.id));
    let (s, rec) = p.consumer(r.consumer.as_str()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(rec["state"], "registering");
    assert_eq!(rec["resource"]["name"], r.resource.name);
    assert_eq!(rec["resource"]["manager"], r.manager);
    assert_eq!(rec["resource"]["state"], "assigned");
    assert_eq!(rec["first_manager"]["id"], r.manager);
    assert_eq!(rec["first_manager"]["capacity"], 100);
    assert_eq!(rec["replicas"][0]["manager"], r.manager);
    assert_eq!(rec["replication_target"], 3);
    assert_eq!(rec["in_routing_table"], true);
    assert!(rec["created_ms"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn registrations_spread_round_robin_and_never_share_a_resource() {
    let p = Plane::start(&Setup {
        target_depth: 30,
        ..Setup::default()
    })
    .await;
    p.wait_depth(30).await;
    let mut per_manager: HashMap<String, usize> = HashMap::new();
    let mut resources = HashSet::new();
    let mut consumers = HashSet::new();
    for _ in 0..30 {
        let v = p.register().await;
        *per_manager
            .entry(v["manager"].as_str().unwrap().to_owned())
            .or_default() += 1;
        assert!(
            resources.insert(v["resource"]["id"].as_u64().unwrap()),
            "resource handed out twice"
        );
        assert!(consumers.insert(v["consumer"].as_str().unwrap().to_owned()));
    }
    let counts: Vec<usize> = per_manager.values().copied().collect();
    assert_eq!(counts.len(), 3, "{per_manager:?}");
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{per_manager:?}"
    );
}

#[tokio::test]
async fn unknown_resource_type_and_location_are_400_naming_which() {
    let p = Plane::start(&Setup::default()).await;
    let (s, v) = p
        .call(
            Method::POST,
            "/v1/registrations",
            Some(ENVOY),
            Some(json!({"resource_type": "shard"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "unknown_resource_type");
    assert!(v["message"].as_str().unwrap().contains("shard"));
    let (s, v) = p
        .call(
            Method::POST,
            "/v1/registrations",
            Some(ENVOY),
            Some(json!({"resource_type": "mailbox", "location": "mars"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "unknown_location");
    assert!(v["message"].as_str().unwrap().contains("mars"));
    let (s, v) = p
        .call(
            Method::POST,
            "/v1/registrations",
            Some(ENVOY),
            Some(json!({"resource_type": "mailbox", "extra": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "bad_json");
}

#[tokio::test]
async fn empty_pool_is_503_with_retry_after() {
    let mut setup = Setup::default();
    for m in &mut setup.managers {
        m.2 = 1;
    }
    let p = Plane::start(&setup).await;
    p.wait_depth(3).await;
    for _ in 0..3 {
        p.register().await;
    }
    let (s, h, v) = p
        .call_full(
            Method::POST,
            "/v1/registrations",
            Some(ENVOY),
            Some(json!({"resource_type": "mailbox"})),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"], "pool_empty");
    assert!(v["message"].as_str().unwrap().contains("mailbox"));
    assert_eq!(h.get("retry-after").unwrap(), "1");
}

#[tokio::test]
async fn deleting_a_registration_gives_the_resource_back_and_drops_the_route() {
    // One resource per manager: the pool cannot refill, so depth shows the give-back.
    let mut setup = Setup::default();
    for m in &mut setup.managers {
        m.2 = 1;
    }
    let p = Plane::start(&setup).await;
    p.wait_depth(3).await;
    let v = p.register().await;
    let c = v["consumer"].as_str().unwrap().to_owned();
    let before = p.routes("since=0").await;
    assert!(ids(&before, "upsert").contains(&c));
    let (s, _) = p
        .call(
            Method::DELETE,
            &format!("/v1/registrations/{c}"),
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(p.consumer(&c).await.0, StatusCode::NOT_FOUND);
    let epoch = before["epoch"].as_str().unwrap();
    let delta = p
        .routes(&format!(
            "since={}&epoch={epoch}&wait_ms=0",
            before["version"]
        ))
        .await;
    assert_eq!(delta["kind"], "delta");
    assert!(ids(&delta, "remove").contains(&c), "{delta}");
    // The resource is ready again.
    p.wait_depth(3).await;
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(p.register().await["resource"].clone());
    }
    assert!(
        again.contains(&v["resource"]),
        "the given-back resource is handed out again"
    );
    let (s, v) = p
        .call(
            Method::DELETE,
            &format!("/v1/registrations/{c}"),
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "unknown_consumer");
}

#[tokio::test]
async fn availability_down_stops_registrations_on_that_manager_and_is_pushed() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let (s, v) = p
        .call(
            Method::PUT,
            "/v1/managers/m2/availability",
            Some(ADMIN),
            Some(json!({"availability": "down"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["availability"], "down");
    let r = p.routes("since=0").await;
    let m2 = r["managers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "m2")
        .unwrap()
        .clone();
    assert_eq!(m2["availability"], "down");
    for _ in 0..12 {
        let v = p.register().await;
        assert_ne!(v["manager"], "m2");
    }
    let (s, v) = p
        .call(
            Method::PUT,
            "/v1/managers/m9/availability",
            Some(ADMIN),
            Some(json!({"availability": "down"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "unknown_manager");
    let (s, v) = p
        .call(
            Method::PUT,
            "/v1/managers/m1/availability",
            Some(ADMIN),
            Some(json!({"availability": "sleepy"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "bad_json");
}

#[tokio::test]
async fn managers_pools_and_consumers_are_listed_for_admins() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    p.wait_depth(10).await;
    let (s, m) = p.call(Method::GET, "/v1/managers", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m.as_array().unwrap().len(), 3);
    let used: u64 = m
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["capacity"]["mailbox"]["used"].as_u64().unwrap())
        .sum();
    assert_eq!(used, 11, "10 ready + 1 assigned: {m}");
    let (s, one) = p
        .call(Method::GET, "/v1/managers/m1", Some(ADMIN), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["cluster"], "manager_m1");
    let (s, list) = p
        .call(
            Method::GET,
            "/v1/consumers?state=registering",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list[0]["consumer"], c.as_str());
    let (_, list) = p
        .call(
            Method::GET,
            "/v1/consumers?state=registered",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(list.as_array().unwrap().len(), 0);
    let (s, v) = p
        .call(Method::GET, "/v1/consumers?colour=red", Some(ADMIN), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let p = Plane::start(&Setup::default()).await;
    let (s, v) = p.call(Method::GET, "/v2/nothing", Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "not_found");
    let (s, h, _) = p
        .call_full(Method::GET, "/v1/registrations", Some(ENVOY), None)
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h.get("allow").unwrap(), "POST");
}
