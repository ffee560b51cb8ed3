//! Clients cannot pick a cluster or claim a consumer: route and x-prealloc-* headers are removed.

use crate::support::{cookie_for, new_consumer, served_by, DataPlane};
use prealloc_wire::ConsumerState;

each_build! {
    #[tokio::test]
    async fn client_route_header_is_ignored_for_anonymous_requests(build) {
        let dp = DataPlane::start(build);
        let mut c = dp.client();
        for cluster in [
            "manager_m1",
            "manager_m2",
            "manager_m3",
            "prealloc_control_plane",
        ] {
            let r = c.get("/", &[("x-prealloc-cluster", cluster)]).await;
            assert_eq!(
                r.served_by().as_deref(),
                Some("default"),
                "spoofed {cluster}"
            );
        }
        assert!(dp.managers.iter().all(|m| m.requests().is_empty()));
        assert_eq!(
            dp.routes.polls().iter().filter(|p| !p.authorized).count(),
            0
        );
        assert_eq!(dp.envoy.settled_stat("prealloc_reserved_headers_removed"), 4);
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn client_route_header_is_ignored_for_consumers(build) {
        let dp = DataPlane::start(build);
        let erin = new_consumer();
        dp.manager("m1").hold(erin.as_str());
        let cookie = cookie_for(&erin, ConsumerState::Registering, &["m1"]);
        let mut c = dp.client();
        for _ in 0..5 {
            let r = c
                .get(
                    "/",
                    &[("cookie", &cookie), ("x-prealloc-cluster", "manager_m2")],
                )
                .await;
            assert_eq!(r.served_by().as_deref(), Some("m1"));
        }
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn client_consumer_header_never_reaches_a_manager(build) {
        let dp = DataPlane::start(build);
        let frank = new_consumer();
        let mallory = new_consumer();
        dp.manager("m1").hold(frank.as_str());
        let mut c = dp.client();
        // Anonymous, claiming to be frank: stays anonymous, the claim is stripped.
        let r = c.get("/", &[("x-prealloc-consumer", frank.as_str())]).await;
        assert_eq!(r.served_by().as_deref(), Some("default"));
        assert_eq!(dp.default.requests()[0].header("x-prealloc-consumer"), None);
        // Frank's cookie with a header claiming to be mallory: the manager learns frank.
        let cookie = cookie_for(&frank, ConsumerState::Registering, &["m1"]);
        let served = served_by(&mut c, &cookie, 1).await;
        assert_eq!(served, ["m1"]);
        let seen = dp.manager("m1").requests();
        assert_eq!(seen[0].header("x-prealloc-consumer"), Some(frank.as_str()));
        assert!(dp.manager("m1").requests_of(mallory.as_str()).is_empty());
        dp.assert_no_violations();
    }
}

each_build! {
    /// A CGI/WSGI-style manager folds `_` into `-`: `x_prealloc_consumer` would
    /// reach it as the consumer header. Envoy drops underscore headers (the
    /// template's `headers_with_underscores_action`) and the filter removes
    /// look-alikes of its reserved headers as well.
    #[tokio::test]
    async fn underscore_look_alikes_of_reserved_headers_never_reach_a_manager(build) {
        let dp = DataPlane::start(build);
        let alice = new_consumer();
        let bob = new_consumer();
        dp.manager("m1").hold(alice.as_str());
        let cookie = cookie_for(&alice, ConsumerState::Registered, &["m1"]);
        let mut c = dp.client();
        let r = c
            .get(
                "/",
                &[
                    ("cookie", &cookie),
                    ("x_prealloc_consumer", bob.as_str()),
                    ("X_Prealloc-Cluster", "manager_m2"),
                    ("x_prealloc_resource", "mailbox-1"),
                ],
            )
            .await;
        assert_eq!(r.served_by().as_deref(), Some("m1"), "{}", r.text());
        let seen = dp.manager("m1").requests_of(alice.as_str());
        assert_eq!(seen.len(), 1);
        assert!(
            seen[0].headers.iter().all(|(n, _)| !n.contains('_')),
            "no underscore header reached the manager: {:?}",
            seen[0].headers
        );
        // Only the filter's own: the consumer, and (wasm) the route header it set.
        assert_eq!(seen[0].header("x-prealloc-resource"), None);
        if let Some(route) = seen[0].header("x-prealloc-cluster") {
            assert_eq!(route, "manager_m1");
        }
        assert_eq!(seen[0].header("x-prealloc-consumer"), Some(alice.as_str()));
        dp.assert_no_violations();
    }
}

each_build! {
    /// Even with the cookie key, a cookie naming an Envoy cluster that is no
    /// manager's (here the control plane's) reaches nothing but the default
    /// backend: only clusters of the managers list are destinations.
    #[tokio::test]
    async fn a_signed_cookie_naming_a_non_manager_cluster_is_anonymous(build) {
        let dp = DataPlane::start(build);
        let id = new_consumer();
        let claims = prealloc_filter_core::cookie::Claims {
            consumer: id,
            state: ConsumerState::Registered,
            expires_at: crate::support::now_unix() + 3600,
            replicas: vec!["prealloc_control_plane".to_owned()],
        };
        let forged = format!(
            "prealloc={}",
            prealloc_filter_core::cookie::sign(&claims, prealloc_e2e::envoy::TEST_COOKIE_KEY.as_bytes())
        );
        let mut c = dp.client();
        for _ in 0..3 {
            let r = c.get("/v1/routes?protocol=2&since=0", &[("cookie", &forged)]).await;
            assert_eq!(r.served_by().as_deref(), Some("default"), "{}", r.text());
        }
        assert!(
            dp.routes.polls().iter().all(|p| p.authorized),
            "no client request reached the control plane"
        );
        assert_eq!(dp.envoy.settled_stat("prealloc_cookies_rejected_unknown_cluster"), 3);
        dp.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn the_host_header_and_oversized_headers_choose_nothing(build) {
        let dp = DataPlane::start(build);
        let fay = new_consumer();
        dp.manager("m1").hold(fay.as_str());
        let cookie = cookie_for(&fay, ConsumerState::Registering, &["m1"]);
        let mut c = dp.client();
        let m2 = dp.manager("m2").addr().to_string();
        let cp = dp.routes.addr().to_string();
        for host in ["manager_m2", "prealloc_control_plane", "m2", &m2, &cp] {
            let r = c.get("/", &[("host", host)]).await;
            assert_eq!(r.served_by().as_deref(), Some("default"), "anonymous, Host {host}");
            let r = c.get("/", &[("host", host), ("cookie", &cookie)]).await;
            assert_eq!(r.served_by().as_deref(), Some("m1"), "fay, Host {host}");
        }
        // Over Envoy's header limit (60 KiB by default): refused before any filter runs.
        let huge = format!("prealloc={}", "A".repeat(70 * 1024));
        let r = prealloc_e2e::client::Client::new(dp.envoy.addr())
            .send("GET", "/", &[("cookie", &huge)], b"")
            .await;
        match &r {
            Ok(r) => {
                assert_eq!(r.status, 431, "{}", r.text());
                assert!(r.served_by().is_none());
            }
            // Envoy may also close the connection on a head this large.
            Err(e) => println!("70 KiB header: connection closed ({e})"),
        }
        // Under Envoy's limit but over the filter's cookie cap (3000 bytes): anonymous.
        let long = format!("prealloc={}", "A".repeat(4000));
        let r = dp.client().get("/", &[("cookie", &long)]).await;
        assert_eq!(r.served_by().as_deref(), Some("default"));
        assert!(dp.managers.iter().all(|m| m.name() == "m1" || m.requests().is_empty()));
        assert_eq!(
            dp.routes.polls().iter().filter(|p| !p.authorized).count(),
            0,
            "nothing reached the control plane"
        );
        dp.assert_no_violations();
    }
}
