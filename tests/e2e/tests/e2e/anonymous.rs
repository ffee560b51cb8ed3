//! Anonymous requests (no cookie) go to the default backend.

use crate::support::DataPlane;
use prealloc_e2e::manager::RequestKind;

each_build! {
    #[tokio::test]
    async fn request_without_cookie_goes_to_default_backend(build) {
        let dp = DataPlane::start(build);
        let mut c = dp.client();
        for i in 0..5 {
            let r = c.get(&format!("/welcome/{i}"), &[]).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.served_by().as_deref(), Some("default"));
        }
        assert_eq!(dp.default.count(RequestKind::Anonymous), 5);
        assert_eq!(dp.envoy.settled_stat("prealloc_requests_anonymous"), 5);
        assert_eq!(dp.envoy.settled_stat("prealloc_cookies_rejected_missing"), 5);
        for m in &dp.managers {
            assert!(
                m.requests().is_empty(),
                "{} got anonymous traffic",
                m.name()
            );
        }
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn unrelated_cookies_leave_the_request_anonymous(build) {
        let dp = DataPlane::start(build);
        let mut c = dp.client();
        let r = c.get("/", &[("cookie", "session=abc; theme=dark")]).await;
        assert_eq!(r.served_by().as_deref(), Some("default"));
        let seen = &dp.default.requests()[0];
        assert_eq!(seen.header("x-prealloc-consumer"), None);
        assert_eq!(seen.header("x-prealloc-cluster"), None);
        dp.assert_no_violations();
    }
}
