//! Sign-up through the filter with the real control plane: first manager, forwarded headers, cookie.

use crate::support::served_by;
use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec};
use prealloc_e2e::envoy::{Envoy, EnvoyConfig, EnvoyOptions, TEST_COOKIE_KEY, TEST_ENVOY_TOKEN};
use prealloc_e2e::manager::{assert_no_violations, DefaultBackend, TestManager};
use prealloc_filter_core::cookie::verify;
use prealloc_wire::ConsumerState;
use std::time::{Duration, Instant};

each_build! {
    #[tokio::test]
    async fn signup_lands_on_the_first_manager_and_sets_the_cookie(build) {
        let ms: Vec<TestManager> = ["m1", "m2", "m3"]
            .iter()
            .map(|id| TestManager::start(id))
            .collect();
        let default = DefaultBackend::start();
        let cp = ControlPlane::start(ControlPlaneConfig::new(
            ms.iter()
                .map(|m| ManagerSpec::new(m.name(), &m.url()))
                .collect(),
        ));
        let mut cfg = EnvoyConfig::new(
            ms.iter()
                .map(|m| (m.name().to_owned(), m.addr().into()))
                .collect(),
            default.addr().into(),
            cp.addr().into(),
        );
        cfg.build = build;
        cfg.filter["signup"] = serde_json::json!({
            "path": "/signup", "token": TEST_ENVOY_TOKEN, "resource_type": "mailbox",
        });
        let envoy = Envoy::start(&cfg, &EnvoyOptions::default());
        let mut c = Client::new(envoy.addr());

        // Right after start the pool may still be filling: 503 + Retry-After until it is not.
        let deadline = Instant::now() + Duration::from_secs(10);
        let r = loop {
            let r = c
                .send(
                    "POST",
                    "/signup",
                    &[("content-type", "application/json")],
                    b"{\"name\":\"pat\"}",
                )
                .await
                .unwrap();
            if r.status != 503 {
                break r;
            }
            assert!(
                r.header("retry-after").is_some(),
                "503 without Retry-After: {}",
                r.text()
            );
            assert!(
                Instant::now() < deadline,
                "sign-up kept failing: {}",
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            r.status,
            201,
            "sign-up answer: {} {:?}",
            r.text(),
            r.headers
        );
        let first = r.served_by().expect("answered by a manager");
        let set_cookie = r
            .header_all("set-cookie")
            .into_iter()
            .find(|v| v.starts_with("prealloc="))
            .expect("a consumer cookie")
            .to_owned();
        let value = set_cookie["prealloc=".len()..]
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = verify(&value, &[TEST_COOKIE_KEY.as_bytes()], now).expect("the cookie verifies");
        assert_eq!(claims.state, ConsumerState::Registering);
        assert_eq!(claims.replicas, [format!("manager_{first}")]);
        let m = ms.iter().find(|m| m.name() == first).unwrap();
        let signups = m.signups();
        assert_eq!(signups.len(), 1);
        assert_eq!(signups[0].consumer, claims.consumer.as_str());
        assert_eq!(signups[0].resource_type, "mailbox");
        assert!(m.holds(claims.consumer.as_str()));

        let cookie = format!("prealloc={value}");
        let served = served_by(&mut c, &cookie, 6).await;
        assert!(served.iter().all(|s| *s == first), "pinned: {served:?}");
        assert_no_violations(ms.iter().chain([default.as_manager()]));
    }
}
