//! Forged, tampered or expired cookies make the request anonymous; they never
//! steer routing. Rotating the cookie key logs nobody out.

use crate::support::{cookie_for, cookie_signed, new_consumer, now_unix, DataPlane};
use prealloc_e2e::manager::RequestKind;
use prealloc_filter_core::cookie::verify;
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

each_build! {
    #[tokio::test]
    async fn rotating_the_cookie_key_logs_nobody_out(build) {
        const OLD: &str = "the-old-cookie-key-of-at-least-32-bytes";
        const NEW: &str = "the-new-cookie-key-of-at-least-32-bytes";
        let now = now_unix();
        let ivy = new_consumer();
        let old_cookie = cookie_signed(&ivy, ConsumerState::Registering, &["m1"], now + 3600, OLD.as_bytes());
        let new_cookie = cookie_signed(&ivy, ConsumerState::Registering, &["m1"], now + 3600, NEW.as_bytes());
        // The documented order, one Envoy config at a time: add the new key at the
        // end everywhere, move it to the front, remove the old one after max_age_s.
        for (step, keys, old_routes) in [
            ("before", vec![OLD], true),
            ("new key appended", vec![OLD, NEW], true),
            ("new key first", vec![NEW, OLD], true),
            ("old key removed", vec![NEW], false),
        ] {
            let dp = DataPlane::start_with(build, |cfg| {
                cfg.filter["cookie"]["keys"] = serde_json::json!(keys);
            });
            for m in ["m1", "m2"] {
                dp.manager(m).hold(ivy.as_str());
            }
            let by = |cookie: &str| {
                let cookie = cookie.to_owned();
                let mut client = dp.client();
                async move { client.get("/inbox", &[("cookie", &cookie)]).await.served_by() }
            };
            let want = if old_routes { "m1" } else { "default" };
            assert_eq!(by(&old_cookie).await.as_deref(), Some(want), "{step}: the old key's cookie");
            let new_known = keys.contains(&NEW);
            let want = if new_known { "m1" } else { "default" };
            assert_eq!(by(&new_cookie).await.as_deref(), Some(want), "{step}: the new key's cookie");
            // What this Envoy issues (here: the upgrade once the table says
            // registered) is signed with the first key.
            dp.routes.upsert(&ivy, ConsumerState::Registered, &["m1", "m2"]);
            dp.caught_up();
            let r = dp.client().get("/inbox", &[("cookie", &old_cookie)]).await;
            if old_routes {
                let set = r
                    .header_all("set-cookie")
                    .into_iter()
                    .find(|v| v.starts_with("prealloc="))
                    .unwrap_or_else(|| panic!("{step}: no upgrade: {:?}", r.headers));
                let value = set["prealloc=".len()..].split(';').next().unwrap_or("");
                assert!(verify(value, &[keys[0].as_bytes()], now).is_ok(), "{step}: signed with the first key");
                if keys[0] != OLD {
                    assert!(verify(value, &[OLD.as_bytes()], now).is_err(), "{step}: not with the old key");
                }
            }
            dp.assert_no_violations();
        }
    }
}
