//! Replicated consumers are spread round-robin over exactly their replica set.

use crate::support::{cookie_for, new_consumer, served_by, tally, DataPlane};
use prealloc_wire::ConsumerState;

const N: usize = 60;

fn assert_even(counts: &std::collections::BTreeMap<String, usize>, replicas: &[&str], n: usize) {
    let names: Vec<&str> = counts.keys().map(String::as_str).collect();
    let mut expected: Vec<&str> = replicas.to_vec();
    expected.sort();
    assert_eq!(
        names, expected,
        "served by exactly the replica set: {counts:?}"
    );
    let share = n / replicas.len();
    for (m, c) in counts {
        assert!(
            c.abs_diff(share) <= 1,
            "{m} served {c} of {n}, expected {share}±1: {counts:?}"
        );
    }
}

each_build! {
    #[tokio::test]
    async fn replicated_consumer_is_spread_evenly_over_its_table_replicas(build) {
        let dp = DataPlane::start(build);
        let carol = new_consumer();
        for m in ["m1", "m3"] {
            dp.manager(m).hold(carol.as_str());
        }
        dp.routes
            .upsert(&carol, ConsumerState::Registering, &["m1", "m3"]);
        dp.caught_up();
        // The cookie still says "registering, first manager m1": the table adds m3.
        let cookie = cookie_for(&carol, ConsumerState::Registering, &["m1"]);

        let served = served_by(&mut dp.client(), &cookie, N).await;
        let counts = tally(&served);
        eprintln!("round-robin over m1,m3 from the table: {counts:?}");
        assert_even(&counts, &["m1", "m3"], N);
        assert!(dp.manager("m2").requests().is_empty());
        assert_eq!(dp.envoy.settled_stat("prealloc_requests_table"), N as u64);
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn registered_cookie_is_spread_over_its_replicas_without_table_entry(build) {
        let dp = DataPlane::start(build);
        let dave = new_consumer();
        for m in ["m1", "m2", "m3"] {
            dp.manager(m).hold(dave.as_str());
        }
        let cookie = cookie_for(&dave, ConsumerState::Registered, &["m2", "m1", "m3"]);

        let served = served_by(&mut dp.client(), &cookie, N).await;
        let counts = tally(&served);
        eprintln!("round-robin over the registered cookie's replicas: {counts:?}");
        assert_even(&counts, &["m1", "m2", "m3"], N);
        assert_eq!(dp.envoy.settled_stat("prealloc_requests_cookie"), N as u64);
        dp.assert_no_violations();
    }
}
