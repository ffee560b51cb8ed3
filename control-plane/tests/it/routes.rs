//! The routes long-poll: immediate on change, held otherwise, full on gap or epoch.

use crate::support::{ids, Plane, Setup, ENVOY};
use hyper::{Method, StatusCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn current(p: &Plane) -> (String, u64) {
    let r = p.routes("since=0").await;
    (
        r["epoch"].as_str().unwrap().to_owned(),
        r["version"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn since_zero_is_a_full_snapshot_with_every_manager() {
    let p = Plane::start(&Setup::default()).await;
    let r = p.routes("since=0").await;
    assert_eq!(r["kind"], "full");
    assert!(
        r["version"].as_u64().unwrap() >= 1,
        "a full snapshot never says version 0"
    );
    assert_eq!(r["epoch"].as_str().unwrap().len(), 32);
    let clusters: Vec<&str> = r["managers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["cluster"].as_str().unwrap())
        .collect();
    assert_eq!(clusters, ["manager_m1", "manager_m2", "manager_m3"]);
}

#[tokio::test]
async fn a_held_poll_answers_at_once_when_a_consumer_registers() {
    let p = Arc::new(Plane::start(&Setup::default()).await);
    p.wait_depth(10).await;
    let (epoch, version) = current(&p).await;
    let poller = {
        let p = p.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = p
                .routes(&format!("since={version}&epoch={epoch}&wait_ms=10000"))
                .await;
            (r, t.elapsed())
        })
    };
    // The poller is held before the change (the waiting gauge says so).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p
        .call(Method::GET, "/metrics", None, None)
        .await
        .1
        .as_str()
        .unwrap()
        .contains("prealloc_routes_waiting_pollers 1")
    {
        assert!(Instant::now() < deadline, "poller never held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    let (r, took) = poller.await.unwrap();
    assert_eq!(r["kind"], "delta");
    assert_eq!(ids(&r, "upsert"), vec![c]);
    assert_eq!(r["upsert"][0]["state"], "registering");
    assert_eq!(r["version"].as_u64().unwrap(), version + 1);
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
}

#[tokio::test]
async fn a_poll_without_changes_is_held_then_unchanged() {
    let p = Plane::start(&Setup {
        target_depth: 0,
        ..Setup::default()
    })
    .await;
    let (epoch, version) = current(&p).await;
    let t = Instant::now();
    let r = p
        .routes(&format!("since={version}&epoch={epoch}&wait_ms=300"))
        .await;
    let took = t.elapsed();
    assert_eq!(r["kind"], "unchanged");
    assert_eq!(r["version"].as_u64().unwrap(), version);
    assert!(took >= Duration::from_millis(290), "held only {took:?}");
    assert!(took < Duration::from_secs(3), "held {took:?}");
}

#[tokio::test]
async fn unknown_epoch_or_future_version_gets_a_full_snapshot() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    let (epoch, version) = current(&p).await;
    let r = p
        .routes(&format!("since={version}&epoch=someoneelse&wait_ms=5000"))
        .await;
    assert_eq!(r["kind"], "full");
    assert_eq!(ids(&r, "upsert"), vec![c.clone()]);
    let typed: prealloc_wire::RoutesResponse =
        serde_json::from_value(r.clone()).expect("a wire RoutesResponse");
    assert_eq!(typed.upsert[0].consumer.as_str(), c);
    assert_eq!(typed.managers.len(), 3);
    let r = p
        .routes(&format!(
            "since={}&epoch={epoch}&wait_ms=5000",
            version + 100
        ))
        .await;
    assert_eq!(r["kind"], "full");
    let r = p.routes(&format!("since={version}&wait_ms=0")).await;
    assert_eq!(r["kind"], "full", "no epoch means full");
}

#[tokio::test]
async fn a_gap_beyond_the_change_log_gets_a_full_snapshot() {
    let p = Plane::start(&Setup {
        change_log: 2,
        ..Setup::default()
    })
    .await;
    p.wait_depth(10).await;
    let (epoch, v0) = current(&p).await;
    let mut all = Vec::new();
    for _ in 0..5 {
        all.push(p.register().await["consumer"].as_str().unwrap().to_owned());
    }
    let r = p
        .routes(&format!("since={v0}&epoch={epoch}&wait_ms=0"))
        .await;
    assert_eq!(r["kind"], "full");
    let mut got = ids(&r, "upsert");
    got.sort();
    all.sort();
    assert_eq!(got, all);
    // The latest change is still a delta.
    let v = r["version"].as_u64().unwrap();
    let r = p
        .routes(&format!("since={}&epoch={epoch}&wait_ms=0", v - 1))
        .await;
    assert_eq!(r["kind"], "delta");
    assert_eq!(r["upsert"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn deltas_coalesce_to_the_latest_entry_per_consumer() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let (epoch, v0) = current(&p).await;
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    let first = p.consumer(&c).await.1["first_manager"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = if first == "m1" { "m2" } else { "m1" };
    p.replica(&c, other).await;
    let r = p
        .routes(&format!("since={v0}&epoch={epoch}&wait_ms=0"))
        .await;
    assert_eq!(r["kind"], "delta");
    assert_eq!(r["upsert"].as_array().unwrap().len(), 1);
    assert_eq!(
        r["upsert"][0]["replicas"],
        serde_json::json!([first, other])
    );
}

#[tokio::test]
async fn a_poller_of_another_protocol_is_refused_clearly() {
    let p = Plane::start(&Setup::default()).await;
    // A filter of an older release sends no protocol; a newer one another number.
    for (path, says) in [
        ("/v1/routes?since=0", "upgrade the filter"),
        ("/v1/routes?protocol=1&since=0", "speaks protocol=2"),
        (
            "/v1/routes?protocol=3&since=0&wait_ms=0",
            "speaks protocol=2",
        ),
    ] {
        let (s, v) = p.call(Method::GET, path, Some(ENVOY), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["error"], "unsupported_protocol", "{path}: {v}");
        assert!(v["message"].as_str().unwrap().contains(says), "{path}: {v}");
    }
    assert_eq!(p.metric("prealloc_routes_protocol_refused_total").await, 3);
    // Every answer says its protocol.
    assert_eq!(p.routes("since=0").await["protocol"], 2);
}

/// Follows the pages of a snapshot from its first page; (version, ids in page order, pages).
async fn page_through(p: &Plane, node: &str) -> (u64, Vec<String>, usize) {
    let first = p.routes(&format!("since=0&node={node}")).await;
    let (epoch, version) = (
        first["epoch"].as_str().unwrap().to_owned(),
        first["version"].as_u64().unwrap(),
    );
    let mut seen = ids(&first, "upsert");
    let mut pages = 1;
    let mut next = first["next"].as_str().map(str::to_owned);
    while let Some(after) = next {
        let r = p
            .routes(&format!(
                "since={version}&epoch={epoch}&after={after}&node={node}"
            ))
            .await;
        assert_eq!(r["kind"], "full");
        assert_eq!(r["after"], after.as_str());
        assert_eq!(
            r["version"].as_u64(),
            Some(version),
            "every page carries the snapshot's version"
        );
        seen.extend(ids(&r, "upsert"));
        next = r["next"].as_str().map(str::to_owned);
        pages += 1;
    }
    (version, seen, pages)
}

#[tokio::test]
async fn a_snapshot_comes_in_pages_in_id_order_and_a_delta_catches_up() {
    let p = Plane::start(&Setup {
        page_entries: 3,
        ..Setup::default()
    })
    .await;
    p.wait_depth(10).await;
    let mut registered = Vec::new();
    for _ in 0..8 {
        registered.push(p.register().await["consumer"].as_str().unwrap().to_owned());
    }
    let first = p.routes("since=0").await;
    assert_eq!(
        ids(&first, "upsert").len(),
        3,
        "a page holds page_entries entries"
    );
    let (version, seen, pages) = page_through(&p, "pager").await;
    assert_eq!(pages, 3, "8 entries in pages of 3");
    let bytes = |c: &String| prealloc_wire::ConsumerId::parse(c).unwrap().to_bytes();
    assert!(
        seen.windows(2).all(|w| bytes(&w[0]) < bytes(&w[1])),
        "pages in the byte order of consumer ids: {seen:?}"
    );
    let mut want = registered.clone();
    want.sort_by_key(bytes);
    assert_eq!(seen, want);

    // Changes while paging (here: after it) arrive as deltas since the
    // snapshot's version, a page of changes at a time, each at a real version.
    for _ in 0..4 {
        p.register().await;
    }
    let epoch = first["epoch"].as_str().unwrap();
    let d = p
        .routes(&format!("since={version}&epoch={epoch}&wait_ms=0"))
        .await;
    assert_eq!(d["kind"], "delta");
    assert_eq!(ids(&d, "upsert").len(), 3, "at most a page of changes");
    assert_eq!(
        d["version"].as_u64(),
        Some(version + 3),
        "ends at a committed version"
    );
    let d2 = p
        .routes(&format!("since={}&epoch={epoch}&wait_ms=0", version + 3))
        .await;
    assert_eq!(ids(&d2, "upsert").len(), 1);
    assert_eq!(d2["version"].as_u64(), Some(version + 4));

    // A continuation of another epoch's snapshot starts over from the first page.
    let r = p
        .routes(&format!("since={version}&epoch=other&after={}", want[0]))
        .await;
    assert_eq!((r["kind"].as_str(), r.get("after")), (Some("full"), None));
    let (s, v) = p
        .call(
            Method::GET,
            "/v1/routes?protocol=2&since=1&after=short",
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains("after="), "{v}");
}

#[tokio::test]
async fn a_snapshot_paged_in_while_the_log_turns_over_still_ends_in_a_delta() {
    // A log of 2 changes: far fewer than the sign-ups made while a poller pages.
    let p = Plane::start(&Setup {
        page_entries: 2,
        change_log: 2,
        ..Setup::default()
    })
    .await;
    p.wait_depth(10).await;
    for _ in 0..6 {
        p.register().await;
    }
    let first = p.routes("since=0").await;
    let (epoch, version) = (
        first["epoch"].as_str().unwrap().to_owned(),
        first["version"].as_u64().unwrap(),
    );
    // Five commits while the snapshot is being paged in.
    for _ in 0..5 {
        p.register().await;
    }
    let mut next = first["next"].as_str().map(str::to_owned);
    while let Some(after) = next {
        let r = p
            .routes(&format!("since={version}&epoch={epoch}&after={after}"))
            .await;
        assert_eq!(r["version"].as_u64(), Some(version), "{r}");
        next = r["next"].as_str().map(str::to_owned);
    }
    // The log kept the changes after the snapshot's version for it.
    let d = p
        .routes(&format!("since={version}&epoch={epoch}&wait_ms=0"))
        .await;
    assert_eq!(d["kind"], "delta", "{d}");
    assert!(d["version"].as_u64().unwrap() > version);
}

#[tokio::test]
async fn bad_query_is_400() {
    let p = Plane::start(&Setup::default()).await;
    let (s, v) = p
        .call(
            Method::GET,
            "/v1/routes?protocol=2&since=abc",
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().contains("since"));
}

async fn pollers(p: &Plane) -> serde_json::Value {
    let (s, l) = p
        .call(
            Method::GET,
            "/v1/pollers",
            Some(crate::support::ADMIN),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{l}");
    l
}

#[tokio::test]
async fn pollers_that_name_their_node_are_listed_with_how_far_behind_they_are() {
    let p = Plane::start(&Setup::default()).await;
    p.wait_depth(10).await;
    let (epoch, v) = current(&p).await;
    // edge-a starts from nothing, edge-b is up to date.
    p.routes("since=0&node=edge-a").await;
    p.routes(&format!("since={v}&epoch={epoch}&wait_ms=0&node=edge-b"))
        .await;
    p.register().await;
    // The registration's change is published just after its answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let l = loop {
        let l = pollers(&p).await;
        if l[1]["behind"].as_u64().is_some_and(|b| b > 0) || Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(l[0]["node"], "edge-a", "{l}");
    assert!(
        l[0]["behind"].is_null(),
        "another epoch: a full snapshot next: {l}"
    );
    assert_eq!(l[1]["node"], "edge-b");
    assert_eq!(l[1]["version"], v);
    assert!(l[1]["behind"].as_u64().unwrap() >= 1, "{l}");
    assert_eq!(l[1]["waiting"], 0, "answered");
    assert!(p.metric("prealloc_pollers_connected").await == 2);

    // A held poll counts as waiting until it is answered.
    let (_, now) = current(&p).await;
    let held = {
        let app = p.app.clone();
        let path =
            format!("/v1/routes?protocol=2&since={now}&epoch={epoch}&wait_ms=5000&node=edge-b");
        tokio::spawn(async move {
            app.handle(crate::support::request(
                Method::GET,
                &path,
                Some(ENVOY),
                None,
            ))
            .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while pollers(&p).await[1]["waiting"] != 1 {
        assert!(Instant::now() < deadline, "the held poll was never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pollers(&p).await[1]["behind"], 0);
    p.register().await;
    held.await.unwrap();
    assert_eq!(pollers(&p).await[1]["waiting"], 0);

    // A node id that is not URL-safe is refused.
    let (s, v) = p
        .call(
            Method::GET,
            "/v1/routes?protocol=2&since=0&node=a%20b",
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["message"].as_str().unwrap().contains("node"), "{v}");
}

#[tokio::test]
async fn thousands_of_held_pollers_all_wake_on_one_change() {
    let p = Arc::new(Plane::start(&Setup::default()).await);
    p.wait_depth(10).await;
    let (epoch, version) = current(&p).await;
    let n = 2000;
    let mut polls = Vec::new();
    for _ in 0..n {
        let p = p.clone();
        let q = format!("since={version}&epoch={epoch}&wait_ms=20000");
        polls.push(tokio::spawn(async move { p.routes(&q).await }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = p.call(Method::GET, "/metrics", None, None).await.1;
        if m.as_str()
            .unwrap()
            .contains(&format!("prealloc_routes_waiting_pollers {n}"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "pollers never all held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = Instant::now();
    p.register().await;
    for h in polls {
        let r = h.await.unwrap();
        assert_eq!(r["kind"], "delta");
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "waking took {:?}",
        t.elapsed()
    );
}
