//! Pre-allocation with provisioning: resources are provisioned before they are
//! handed out, and a failing manager never leaks capacity.

use crate::support::{Plane, Setup, TestManager, ADMIN};
use hyper::Method;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

async fn provisioned_setup(depth: u64) -> (Vec<TestManager>, Setup) {
    let mut ms = Vec::new();
    for _ in 0..3 {
        ms.push(TestManager::start().await);
    }
    let urls: Vec<String> = ms.iter().map(|m| m.url.clone()).collect();
    let mut setup = Setup {
        target_depth: depth,
        ..Setup::with_managers(&urls)
    };
    for m in &mut setup.managers {
        m.3 = true;
    }
    (ms, setup)
}

async fn used(p: &Plane, manager: &str) -> u64 {
    let (_, v) = p
        .call(
            Method::GET,
            &format!("/v1/managers/{manager}"),
            Some(ADMIN),
            None,
        )
        .await;
    v["capacity"]["mailbox"]["used"].as_u64().unwrap()
}

#[tokio::test]
async fn pools_fill_with_resources_each_manager_provisioned() {
    let (ms, setup) = provisioned_setup(9).await;
    let p = Plane::start(&setup).await;
    p.wait_depth(9).await;
    let mut all = HashSet::new();
    for m in &ms {
        let got = m.state.provisioned.lock().unwrap().clone();
        assert_eq!(got.len(), 3, "round-robin: three each");
        for id in got {
            assert!(all.insert(id), "resource {id} provisioned twice");
        }
    }
    // A registration hands out a resource its manager provisioned.
    let reg = p.register().await;
    let m = reg["manager"]
        .as_str()
        .unwrap()
        .trim_start_matches('m')
        .parse::<usize>()
        .unwrap()
        - 1;
    let id = reg["resource"]["id"].as_u64().unwrap();
    assert!(ms[m].state.provisioned.lock().unwrap().contains(&id));
}

#[tokio::test]
async fn a_manager_that_always_fails_gets_its_capacity_back() {
    let (ms, setup) = provisioned_setup(6).await;
    ms[1].state.fail_provision.store(u32::MAX, Ordering::SeqCst);
    let p = Plane::start(&setup).await;
    p.wait_depth(6).await;
    let pools = p.pools().await;
    assert_eq!(pools[0]["ready_by_manager"]["m2"], 0);
    // Every reservation on m2 is given back after its attempts: nothing stays reserved.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let provisioning = p.pools().await[0]["provisioning"].as_u64().unwrap();
        let u = used(&p, "m2").await;
        if provisioning == 0 && u == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "m2 keeps {u} used, {provisioning} provisioning"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = p.call(Method::GET, "/metrics", None, None).await.1;
    assert!(!metrics
        .as_str()
        .unwrap()
        .contains("prealloc_provision_abandoned_total 0\n"));
}

#[tokio::test]
async fn slow_provisioning_times_out_and_is_retried() {
    let (ms, setup) = provisioned_setup(3).await;
    // Timeout is 300 ms in test configs: the first answer of each manager is too late.
    for m in &ms {
        m.state.provision_delay_ms.store(600, Ordering::SeqCst);
    }
    let p = Plane::start(&setup).await;
    // Wait for the first timed-out attempts, then let the managers answer in time.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = p.call(Method::GET, "/metrics", None, None).await.1;
        if !m
            .as_str()
            .unwrap()
            .contains("prealloc_provision_attempt_failures_total 0\n")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no provisioning attempt timed out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for m in &ms {
        m.state.provision_delay_ms.store(0, Ordering::SeqCst);
    }
    p.wait_depth(3).await;
    let provisioned: usize = ms
        .iter()
        .map(|m| m.state.provisioned.lock().unwrap().len())
        .sum();
    assert!(provisioned >= 3, "retried attempts provisioned the pool");
}

#[tokio::test]
async fn capacity_is_never_exceeded_when_demand_outgrows_it() {
    let mut setup = Setup {
        target_depth: 50,
        ..Setup::default()
    };
    for m in &mut setup.managers {
        m.2 = 4;
    }
    let p = Plane::start(&setup).await;
    p.wait_depth(12).await;
    for _ in 0..12 {
        p.register().await;
    }
    for m in ["m1", "m2", "m3"] {
        assert_eq!(used(&p, m).await, 4);
    }
    let (s, _) = p
        .call(
            Method::POST,
            "/v1/registrations",
            Some(crate::support::ENVOY),
            Some(serde_json::json!({"resource_type": "mailbox"})),
        )
        .await;
    assert_eq!(s, hyper::StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn calls_to_managers_carry_the_configured_token() {
    let (ms, mut setup) = provisioned_setup(3).await;
    setup.manager_token = Some("manager-secret-123".into());
    let p = Plane::start(&setup).await;
    p.wait_depth(3).await;
    for m in &ms {
        let seen = m.state.tokens_seen.lock().unwrap().clone();
        assert!(!seen.is_empty());
        assert!(
            seen.iter()
                .all(|t| t.as_deref() == Some("Bearer manager-secret-123")),
            "{seen:?}"
        );
    }
    // The admin API shows the managers, never their tokens.
    for path in ["/v1/managers", "/v1/managers/m1"] {
        let (s, v) = p
            .call(hyper::Method::GET, path, Some(crate::support::ADMIN), None)
            .await;
        assert_eq!(s, hyper::StatusCode::OK);
        assert!(!v.to_string().contains("manager-secret-123"), "{path}: {v}");
    }
}

#[tokio::test]
async fn unfinished_provisioning_resumes_after_a_restart() {
    let (ms, setup) = provisioned_setup(6).await;
    // Every first answer is far slower than the 300 ms timeout: reservations stay
    // `provisioning` while the control plane stops.
    for m in &ms {
        m.state.provision_delay_ms.store(5_000, Ordering::SeqCst);
    }
    let p = Plane::start(&setup).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.pools().await[0]["provisioning"].as_u64().unwrap() < 6 {
        assert!(Instant::now() < deadline, "reservations never made");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let db = p.stop().await;
    for m in &ms {
        m.state.provision_delay_ms.store(0, Ordering::SeqCst);
    }
    let p = Plane::start_on(&setup, db).await;
    p.wait_depth(6).await;
    let mut ids: Vec<u64> = ms
        .iter()
        .flat_map(|m| m.state.provisioned.lock().unwrap().clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids,
        (1..=6).collect::<Vec<u64>>(),
        "the same six reservations were provisioned, no new ones"
    );
    for m in ["m1", "m2", "m3"] {
        assert_eq!(used(&p, m).await, 2, "no capacity leaked on {m}");
    }
}
