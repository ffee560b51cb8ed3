//! A registering consumer is pinned to its first manager until replicas are known.

use crate::support::{cookie_for, new_consumer, served_by, DataPlane};
use prealloc_wire::ConsumerState;

each_build! {
    #[tokio::test]
    async fn registering_consumer_without_table_entry_goes_to_first_manager(build) {
        let dp = DataPlane::start(build);
        let alice = new_consumer();
        dp.manager("m2").hold(alice.as_str());
        let cookie = cookie_for(&alice, ConsumerState::Registering, &["m2"]);

        let mut c = dp.client();
        let served = served_by(&mut c, &cookie, 12).await;
        assert!(
            served.iter().all(|s| s == "m2"),
            "all on the first manager: {served:?}"
        );
        let seen = dp.manager("m2").requests_of(alice.as_str());
        assert_eq!(seen.len(), 12);
        assert!(seen
            .iter()
            .all(|r| r.header("x-prealloc-consumer") == Some(alice.as_str())));
        assert_eq!(dp.envoy.settled_stat("prealloc_requests_first_manager"), 12);
        assert_eq!(dp.envoy.settled_stat("prealloc_table_misses"), 12);
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn registering_consumer_with_single_replica_entry_stays_on_first_manager(build) {
        let dp = DataPlane::start(build);
        let bob = new_consumer();
        dp.manager("m3").hold(bob.as_str());
        dp.routes.upsert(&bob, ConsumerState::Registering, &["m3"]);
        dp.caught_up();
        let cookie = cookie_for(&bob, ConsumerState::Registering, &["m3"]);

        let served = served_by(&mut dp.client(), &cookie, 10).await;
        assert!(served.iter().all(|s| s == "m3"), "{served:?}");
        assert_eq!(dp.envoy.settled_stat("prealloc_requests_table"), 10);
        assert_eq!(dp.envoy.settled_stat("prealloc_table_hits"), 10);
        dp.assert_no_violations();
    }
}
