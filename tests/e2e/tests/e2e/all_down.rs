//! Managers marked down are skipped; when all of a consumer's replicas are down the client gets 503 + Retry-After.

use crate::support::{cookie_for, new_consumer, served_by, tally, DataPlane};
use prealloc_wire::{Availability, ConsumerState};

each_build! {
    #[tokio::test]
    async fn down_replica_is_skipped(build) {
        let dp = DataPlane::start(build);
        let judy = new_consumer();
        for m in ["m1", "m2"] {
            dp.manager(m).hold(judy.as_str());
        }
        dp.routes
            .upsert(&judy, ConsumerState::Registering, &["m1", "m2"]);
        dp.routes.set_availability("m1", Availability::Down);
        dp.caught_up();
        let cookie = cookie_for(&judy, ConsumerState::Registering, &["m1"]);
        // The availability cache refreshes on a tick; wait until requests avoid m1.
        let mut c = dp.client();
        wait_until_served_by(&mut c, &cookie, "m2").await;
        let served = served_by(&mut c, &cookie, 10).await;
        assert_eq!(
            tally(&served).keys().collect::<Vec<_>>(),
            ["m2"],
            "{served:?}"
        );
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn all_replicas_down_answers_503_with_retry_after(build) {
        let dp = DataPlane::start(build);
        let ken = new_consumer();
        for m in ["m1", "m2"] {
            dp.manager(m).hold(ken.as_str());
        }
        dp.routes
            .upsert(&ken, ConsumerState::Registering, &["m1", "m2"]);
        dp.routes.set_availability("m1", Availability::Down);
        dp.routes.set_availability("m2", Availability::Down);
        dp.caught_up();
        let cookie = cookie_for(&ken, ConsumerState::Registering, &["m1"]);
        let mut c = dp.client();
        let r = wait_until_status(&mut c, &cookie, 503).await;
        assert_eq!(r.header("retry-after"), Some("5"));
        for m in &dp.managers {
            m.clear_requests();
        }
        for _ in 0..5 {
            assert_eq!(c.get("/", &[("cookie", &cookie)]).await.status, 503);
        }
        assert!(
            dp.managers.iter().all(|m| m.requests().is_empty()),
            "nothing reached a manager"
        );
        assert!(dp.envoy.settled_stat("prealloc_all_down_replies") >= 6);

        // Recovery: m2 comes back and takes the consumer's requests again.
        dp.routes.set_availability("m2", Availability::Available);
        dp.caught_up();
        wait_until_served_by(&mut c, &cookie, "m2").await;
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn all_replicas_down_goes_to_first_manager_when_configured(build) {
        let dp = DataPlane::start_with(build, |cfg| cfg.filter["when_all_down"] = "first_manager".into());
        let liz = new_consumer();
        for m in ["m1", "m2"] {
            dp.manager(m).hold(liz.as_str());
        }
        dp.routes
            .upsert(&liz, ConsumerState::Registering, &["m1", "m2"]);
        dp.routes.set_availability("m1", Availability::Down);
        dp.routes.set_availability("m2", Availability::Down);
        dp.caught_up();
        let cookie = cookie_for(&liz, ConsumerState::Registering, &["m1"]);
        let mut c = dp.client();
        // Before the availability reaches the worker's cache, round-robin may still pick m2.
        wait_until_served_by(&mut c, &cookie, "m1").await;
        let served = served_by(&mut c, &cookie, 6).await;
        assert!(served.iter().all(|s| s == "m1"), "{served:?}");
        assert!(dp.envoy.settled_stat("prealloc_requests_all_down_first_manager") >= 6);
        dp.assert_no_violations();
    }
}

/// Waits until `STREAK` requests in a row are served by `who`. Each worker
/// refreshes its availability cache on a tick and no stat tells when; but
/// round-robin over two replicas alternates, so a streak proves the refresh.
async fn wait_until_served_by(c: &mut prealloc_e2e::client::Client, cookie: &str, who: &str) {
    const STREAK: usize = 4;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut streak = 0;
    loop {
        let r = c.get("/", &[("cookie", cookie)]).await;
        if r.served_by().as_deref() == Some(who) {
            streak += 1;
            if streak == STREAK {
                return;
            }
            continue;
        }
        streak = 0;
        assert!(
            std::time::Instant::now() < deadline,
            "never served by {who}; last: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

async fn wait_until_status(
    c: &mut prealloc_e2e::client::Client,
    cookie: &str,
    status: u16,
) -> prealloc_e2e::client::Response {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = c.get("/", &[("cookie", cookie)]).await;
        if r.status == status {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never answered {status}; last: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
