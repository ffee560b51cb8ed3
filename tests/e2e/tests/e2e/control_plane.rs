//! The control plane launcher, and the poller against the real control plane.

use crate::support::{cookie_for, served_by, tally};
use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec};
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
