//! When the table says registered but the cookie still says registering, the response upgrades the cookie.

use crate::support::{cookie_for, new_consumer, now_unix, served_by, tally, DataPlane};
use prealloc_e2e::envoy::TEST_COOKIE_KEY;
use prealloc_filter_core::cookie::verify;
use prealloc_wire::ConsumerState;

each_build! {
    #[tokio::test]
    async fn registered_table_entry_upgrades_a_registering_cookie(build) {
        let dp = DataPlane::start(build);
        let mike = new_consumer();
        for m in ["m1", "m2"] {
            dp.manager(m).hold(mike.as_str());
        }
        dp.routes
            .upsert(&mike, ConsumerState::Registered, &["m1", "m2"]);
        dp.caught_up();
        let old = cookie_for(&mike, ConsumerState::Registering, &["m1"]);

        let mut c = dp.client();
        let r = c.get("/", &[("cookie", &old)]).await;
        let set_cookie = r
            .header_all("set-cookie")
            .into_iter()
            .find(|v| v.starts_with("prealloc="))
            .unwrap_or_else(|| panic!("no upgraded cookie in {:?}", r.headers))
            .to_owned();
        let value = set_cookie["prealloc=".len()..].split(';').next().unwrap();
        let claims =
            verify(value, &[TEST_COOKIE_KEY.as_bytes()], now_unix()).expect("upgraded cookie verifies");
        assert_eq!(claims.consumer, mike);
        assert_eq!(claims.state, ConsumerState::Registered);
        assert_eq!(claims.replicas, ["manager_m1", "manager_m2"]);

        // The upgraded cookie alone (entry gone) keeps the consumer balanced over both replicas.
        dp.routes.remove(&mike);
        dp.caught_up();
        let upgraded = format!("prealloc={value}");
        let served = served_by(&mut c, &upgraded, 20).await;
        assert_eq!(
            tally(&served).into_iter().collect::<Vec<_>>(),
            [("m1".to_owned(), 10), ("m2".to_owned(), 10)]
        );
        assert!(dp.envoy.settled_stat("prealloc_cookies_upgraded") >= 1);
        dp.assert_no_violations();
    }
}
