//! Forged, tampered or expired cookies make the request anonymous; they never steer routing.

use crate::support::{cookie_for, cookie_signed, new_consumer, now_unix, DataPlane};
use prealloc_e2e::manager::RequestKind;
use prealloc_wire::ConsumerState;

each_build! {
    #[tokio::test]
    async fn cookie_signed_with_unknown_key_is_anonymous(build) {
        let dp = DataPlane::start(build);
        let grace = new_consumer();
        dp.manager("m1").hold(grace.as_str());
        let forged = cookie_signed(
            &grace,
            ConsumerState::Registered,
            &["m1", "m2", "m3"],
            now_unix() + 3600,
            b"an-attacker-key-of-at-least-32-bytes!!",
        );
        let r = dp.client().get("/", &[("cookie", &forged)]).await;
        assert_eq!(r.served_by().as_deref(), Some("default"));
        assert_eq!(dp.default.count(RequestKind::Anonymous), 1);
        assert_eq!(dp.envoy.settled_stat("prealloc_cookies_rejected_bad_mac"), 1);
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn tampered_and_expired_cookies_are_anonymous(build) {
        let dp = DataPlane::start(build);
        let heidi = new_consumer();
        dp.manager("m2").hold(heidi.as_str());
        let good = cookie_for(&heidi, ConsumerState::Registering, &["m2"]);
        // Flip one payload character (keeping base64url) so the MAC no longer matches.
        let value = good.strip_prefix("prealloc=").unwrap();
        let mut bytes = value.as_bytes().to_vec();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        let tampered = format!("prealloc={}", String::from_utf8(bytes).unwrap());
        let expired = crate::support::cookie_signed(
            &heidi,
            ConsumerState::Registering,
            &["m2"],
            now_unix() - 1,
            prealloc_e2e::envoy::TEST_COOKIE_KEY.as_bytes(),
        );
        let mut c = dp.client();
        for cookie in [
            tampered.as_str(),
            expired.as_str(),
            "prealloc=",
            "prealloc=garbage.garbage",
        ] {
            let r = c.get("/", &[("cookie", cookie)]).await;
            assert_eq!(r.served_by().as_deref(), Some("default"), "cookie {cookie}");
        }
        assert_eq!(dp.envoy.settled_stat("prealloc_cookies_rejected_expired"), 1);
        let bad = dp.envoy.settled_stat("prealloc_cookies_rejected_bad_mac")
            + dp.envoy.settled_stat("prealloc_cookies_rejected_malformed")
            + dp.envoy.settled_stat("prealloc_cookies_rejected_missing");
        assert_eq!(
            bad, 3,
            "tampered, empty and garbage cookies each counted once"
        );
        // The genuine cookie still works on the same connection.
        let r = c.get("/", &[("cookie", &good)]).await;
        assert_eq!(r.served_by().as_deref(), Some("m2"));
        dp.assert_no_violations();
    }
}
