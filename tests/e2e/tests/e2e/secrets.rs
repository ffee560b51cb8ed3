//! Tokens, cookie keys and cookies never reach a log: a whole story (sign-up,
//! traffic, active copies, admin calls, refused tokens) with the control plane
//! and the filter at `debug`, then both logs are searched for every secret.

use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::envoy::TEST_COOKIE_KEY;
use prealloc_e2e::story::{send_requests, Stack, StackOptions, STEP_TIMEOUT};
use prealloc_wire::ConsumerState;

each_build! {
    #[tokio::test]
    async fn tokens_keys_and_cookies_never_reach_a_log(build) {
        let mut opts = StackOptions::new(Replication::Active).with_build(build);
        opts.control_plane_log = Some("debug".into());
        // The filter's own debug lines too (Envoy's would print request
        // headers, tokens included: run Envoy itself at info or above).
        opts.envoy.component_log_level = Some("wasm:debug,dynamic_modules:debug".into());
        let stack = Stack::start(&opts);
        let mut c = Client::new(stack.envoys[0].addr());
        let s = stack.sign_up(&mut c, STEP_TIMEOUT).await.expect("sign-up");
        send_requests(&mut c, &s.cookie, 3).await.expect("pinned");
        stack
            .wait_routed(&s.consumer, "registered", |e| {
                e.is_some_and(|e| e.state == ConsumerState::Registered)
            })
            .await
            .expect("registered");
        send_requests(&mut c, &s.cookie, 3).await.expect("replicated");
        let envoy_token = stack.cp.config().envoy_token.clone();
        let admin_token = stack.cp.config().admin_token.clone();
        assert_eq!(stack.cp.admin("GET", "/v1/pools", None).await.status, 200);
        // Refused tokens: one that is almost right, and the envoy token on an admin endpoint.
        let mut cp = Client::new(stack.cp.addr());
        let almost = format!("Bearer {}x", &admin_token[..admin_token.len() - 1]);
        let wrong = format!("Bearer {envoy_token}");
        for auth in [&almost, &wrong] {
            let r = cp
                .send("GET", "/v1/pools", &[("authorization", auth)], b"")
                .await
                .unwrap();
            assert_eq!(r.status, 403, "{}", r.text());
        }

        let cp_log = std::fs::read_to_string(stack.cp.log_path()).unwrap_or_default();
        let envoy_log = stack.envoys[0].log();
        assert!(cp_log.contains("/v1/routes"), "debug request lines were logged: {cp_log}");
        let cookie_value = s.cookie.trim_start_matches("prealloc=");
        for (what, secret) in [
            ("envoy token", envoy_token.as_str()),
            ("admin token", admin_token.as_str()),
            ("almost-admin token", &almost[7..]),
            ("cookie key", TEST_COOKIE_KEY),
            ("cookie", cookie_value),
        ] {
            assert!(!cp_log.contains(secret), "the {what} is in the control plane's log");
            assert!(!envoy_log.contains(secret), "the {what} is in Envoy's log");
        }
        stack.assert_no_violations();
    }
}
