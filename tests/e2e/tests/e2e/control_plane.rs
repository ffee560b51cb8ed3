//! The control plane launcher, and the poller against the real control plane.

use crate::support::{cookie_for, served_by, tally};
use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec, Replication};
use prealloc_e2e::envoy::{Envoy, EnvoyConfig, EnvoyOptions, TEST_ENVOY_TOKEN};
use prealloc_e2e::manager::{assert_no_violations, DefaultBackend, TestManager};
use prealloc_wire::{ConsumerState, Registration};
use std::time::{Duration, Instant};

fn managers() -> Vec<TestManager> {
    ["m1", "m2", "m3"]
        .iter()
        .map(|id| TestManager::start(id))
        .collect()
}

fn cp_config(managers: &[TestManager]) -> ControlPlaneConfig {
    ControlPlaneConfig::new(
        managers
            .iter()
            .map(|m| ManagerSpec::new(m.name(), &m.url()))
            .collect(),
    )
}

async fn register(cp: &ControlPlane) -> Registration {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = Client::new(cp.addr())
            .send(
                "POST",
                "/v1/registrations",
                &[
                    ("authorization", &format!("Bearer {TEST_ENVOY_TOKEN}")),
                    ("content-type", "application/json"),
                ],
                br#"{"resource_type":"mailbox"}"#,
            )
            .await
            .unwrap();
        if r.status == 201 {
            return serde_json::from_slice(&r.body).expect("a Registration");
        }
        // 503 while the pool is still being filled right after start-up.
        assert_eq!(r.status, 503, "registration refused: {}", r.text());
        assert!(Instant::now() < deadline, "pool never filled: {}", r.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn control_plane_keeps_a_registration_across_kill_9() {
    let ms = managers();
    let mut cp = ControlPlane::start(cp_config(&ms));
    let reg = register(&cp).await;
    assert!(["m1", "m2", "m3"].contains(&reg.manager.as_str()));
    assert_eq!(reg.cluster, format!("manager_{}", reg.manager));

    let port = cp.port();
    cp.restart();
    assert_eq!(cp.port(), port, "restarted on the same port");
    let rec = cp.consumer(&reg.consumer).await;
    assert_eq!(rec["consumer"], reg.consumer.as_str(), "{rec}");
    assert_no_violations(&ms);
}

each_build! {
    /// Envoy's poller against the real control plane: a reported replica reaches routing.
    #[tokio::test]
    async fn reported_replica_reaches_envoy_from_the_real_control_plane(build) {
        let ms = managers();
        let default = DefaultBackend::start();
        let cp = ControlPlane::start(cp_config(&ms));
        let envoy = Envoy::start(
            &EnvoyConfig::new(
                ms.iter()
                    .map(|m| (m.name().to_owned(), m.addr().into()))
                    .collect(),
                default.addr().into(),
                cp.addr().into(),
            )
            .with_build(build),
            &EnvoyOptions::default(),
        );
        let reg = register(&cp).await;
        let first = ms.iter().find(|m| m.name() == reg.manager).unwrap();
        let second = ms.iter().find(|m| m.name() != reg.manager).unwrap();
        // The sign-up itself is issue 4's story; here the first manager simply holds the data.
        first.hold(reg.consumer.as_str());
        let cookie = cookie_for(&reg.consumer, ConsumerState::Registering, &[&reg.manager]);
        let mut c = Client::new(envoy.addr());
        assert!(served_by(&mut c, &cookie, 4)
            .await
            .iter()
            .all(|s| *s == reg.manager));

        second.hold(reg.consumer.as_str());
        let reported = Instant::now();
        let r = cp.report_replica(&reg.consumer, second.name()).await;
        assert!(
            r.status < 300,
            "replica report refused: {} {}",
            r.status,
            r.text()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let routed = loop {
            let r = c.get("/", &[("cookie", &cookie)]).await;
            if r.served_by().as_deref() == Some(second.name()) {
                break reported.elapsed();
            }
            assert!(Instant::now() < deadline, "the replica never reached Envoy");
        };
        eprintln!("PROPAGATION (real control plane): replica report sent -> first request routed to it {routed:?}");
        let served = served_by(&mut c, &cookie, 20).await;
        let counts = tally(&served);
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert!(counts.values().all(|n| n.abs_diff(10) <= 1), "{counts:?}");
        assert_no_violations(ms.iter().chain([default.as_manager()]));
    }
}

each_build! {
    #[tokio::test]
    async fn the_control_plane_lists_every_envoy_polling_it_and_the_table_it_holds(build) {
        let mut opts = prealloc_e2e::story::StackOptions::new(Replication::Reported).with_build(build);
        opts.envoys = 2;
        // Envoy #0 is named in its config; #1 gets the filter's default.
        opts.node_ids = vec![Some("edge-a".into())];
        let stack = prealloc_e2e::story::Stack::start(&opts);
        stack.wait_envoys_caught_up().expect("caught up");
        let version = stack.routes_version().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let listed = loop {
            let l = stack.cp.admin("GET", "/v1/pollers", None).await.json();
            let all = l.as_array().cloned().unwrap_or_default();
            let caught_up = all.len() == 2 && all.iter().all(|p| p["behind"] == 0 && p["waiting"] == 1);
            if caught_up || std::time::Instant::now() > deadline {
                break all;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(listed.len(), 2, "{listed:?}");
        let names: Vec<&str> = listed.iter().map(|p| p["node"].as_str().unwrap()).collect();
        assert!(names.contains(&"edge-a"), "{names:?}");
        let default = names.iter().find(|n| **n != "edge-a").unwrap();
        assert!(default.starts_with("envoy-"), "the default node id: {default}");
        for p in &listed {
            assert_eq!(p["version"], version, "{p}");
            assert_eq!(p["behind"], 0, "{p}");
            assert_eq!(p["waiting"], 1, "a long-poll held: {p}");
        }
        let metrics = stack.cp.metrics();
        assert!(metrics.contains("prealloc_pollers_connected 2"), "{metrics}");
        stack.assert_no_violations();
    }
}
