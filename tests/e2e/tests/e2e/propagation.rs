//! A routing-table change reaches a running Envoy without a restart, and fast.

use crate::support::{cookie_for, new_consumer, DataPlane};
use prealloc_wire::ConsumerState;
use std::time::{Duration, Instant};

each_build! {
    #[tokio::test]
    async fn table_change_reaches_envoy_without_restart(build) {
        let dp = DataPlane::start(build);
        let ivan = new_consumer();
        dp.manager("m1").hold(ivan.as_str());
        let cookie = cookie_for(&ivan, ConsumerState::Registering, &["m1"]);
        let mut c = dp.client();
        let r = c.get("/", &[("cookie", &cookie)]).await;
        assert_eq!(
            r.served_by().as_deref(),
            Some("m1"),
            "pinned before the change"
        );

        // Replication to m2 completes: m2 holds the data before the table says so.
        dp.manager("m2").hold(ivan.as_str());
        let version = dp
            .routes
            .upsert(&ivan, ConsumerState::Registering, &["m1", "m2"]);
        let changed = dp.routes.changed_at(version).unwrap();

        // Probe until a request lands on m2 (round-robin over m1,m2 alternates, so at most 2 probes after arrival).
        let deadline = Instant::now() + Duration::from_secs(10);
        let routed = loop {
            let r = c.get("/", &[("cookie", &cookie)]).await;
            if r.served_by().as_deref() == Some("m2") {
                break changed.elapsed();
            }
            assert_eq!(r.served_by().as_deref(), Some("m1"));
            assert!(Instant::now() < deadline, "the change never reached Envoy");
        };
        let applied = dp
            .routes
            .applied_at(version)
            .map(|at| at.duration_since(changed));
        eprintln!(
            "PROPAGATION: table change -> poller applied (next poll) {:?}; -> first request routed by it {:?}",
            applied, routed
        );
        assert!(routed < Duration::from_secs(2), "took {routed:?}");
        assert!(
            dp.envoy.stat("prealloc_poller_updates") >= 2,
            "a full snapshot, then the delta"
        );

        // The entry leaves the table: back to the cookie's first manager.
        let removed = dp.routes.remove(&ivan);
        dp.routes.wait_until_caught_up(1, crate::support::CATCH_UP);
        assert!(dp.routes.applied_at(removed).is_some());
        for _ in 0..4 {
            assert_eq!(
                c.get("/", &[("cookie", &cookie)])
                    .await
                    .served_by()
                    .as_deref(),
                Some("m1")
            );
        }
        dp.assert_no_violations();
    }
}
