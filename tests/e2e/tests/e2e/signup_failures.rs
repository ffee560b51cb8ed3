//! Sign-ups through real Envoy where things could go wrong: a manager refusing, failing or
//! unreachable (registration given back, no capacity leaked), the control plane down (503), path tricks around the sign-up path.

use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::manager::RequestKind;
use prealloc_e2e::story::{
    consumer_cookie, first_signup, post_signup, Stack, StackOptions, STEP_TIMEOUT,
};
use std::time::{Duration, Instant};

each_build! {
    #[tokio::test]
    async fn refused_signup_sets_no_cookie_and_gives_the_registration_back(build) {
        let stack = Stack::start(&StackOptions::new(Replication::Active).with_build(build));
        for m in &stack.managers {
            m.refuse_signups();
        }
        let mut c = Client::new(stack.envoys[0].addr());
        // The pool may still be filling right after start: 503 until a registration is made.
        let r = first_signup(&mut c).await;
        assert_eq!(
            r.status,
            409,
            "the manager's refusal passes through: {}",
            r.text()
        );
        assert!(
            consumer_cookie(&r).unwrap().is_none(),
            "no cookie on a refused sign-up: {:?}",
            r.headers
        );
        let signups: Vec<_> = stack.managers.iter().flat_map(|m| m.signups()).collect();
        assert_eq!(signups.len(), 1, "{signups:?}");
        assert!(!signups[0].accepted);
        let consumer = prealloc_wire::ConsumerId::parse(&signups[0].consumer).expect("a consumer id");

        // The filter gives the registration back: the control plane forgets the consumer.
        stack.cp.wait_forgotten(&consumer).await;
        assert_eq!(stack.envoys[0].settled_stat("prealloc_signups_refused"), 1);
        // Nobody holds data of the refused consumer, and nothing was copied. (The active replicator may
        // have tried to read the data before the give-back: 404, the first manager never held it.)
        let reads = |stack: &Stack| -> usize {
            stack
                .managers
                .iter()
                .map(|m| m.count(RequestKind::Replication))
                .sum()
        };
        for m in &stack.managers {
            assert!(
                !m.holds(consumer.as_str()),
                "{} holds a refused consumer",
                m.name()
            );
            let puts = m
                .requests()
                .into_iter()
                .filter(|r| r.kind == RequestKind::Replication && r.method == "PUT");
            assert_eq!(
                puts.count(),
                0,
                "{} got a copy of a refused consumer",
                m.name()
            );
        }
        // Once given back, the replicator stops trying (its retry period here is at most 200 ms).
        let before = reads(&stack);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            reads(&stack),
            before,
            "the control plane kept copying a given-back consumer"
        );
        stack.assert_no_violations();
    }
}

/// `(capacity used on the managers, what accounts for it)`: resources in the
/// pool (ready or being provisioned) plus consumers holding one. Equal when no
/// capacity leaked.
async fn capacity(stack: &Stack) -> (u64, u64) {
    let managers = stack.cp.admin("GET", "/v1/managers", None).await.json();
    let used = managers
        .as_array()
        .expect("managers")
        .iter()
        .map(|m| m["capacity"]["mailbox"]["used"].as_u64().expect("used"))
        .sum();
    let pools = stack.cp.admin("GET", "/v1/pools", None).await.json();
    let pooled = pools[0]["ready_total"].as_u64().expect("ready_total")
        + pools[0]["provisioning"].as_u64().expect("provisioning");
    let consumers = stack.cp.admin("GET", "/v1/consumers", None).await.json();
    (
        used,
        pooled + consumers.as_array().map_or(0, Vec::len) as u64,
    )
}

each_build! {
    #[tokio::test]
    async fn failing_and_unreachable_managers_on_sign_up_leak_nothing(build) {
        let mut stack = Stack::start(&StackOptions::new(Replication::Reported).with_build(build));
        let mut c = Client::new(stack.envoys[0].addr());
        // The pool fills (one sign-up goes through), then the managers go bad.
        stack.sign_up(&mut c, STEP_TIMEOUT).await.expect("a first sign-up");
        let before = capacity(&stack).await;
        assert_eq!(before.0, before.1, "accounting before the faults");
        stack.manager("m1").set_signup_status(500);
        stack.manager("m2").set_signup_status(503);
        // m3 stops: Envoy cannot connect to it.
        let gone = stack.managers.iter().position(|m| m.name() == "m3").unwrap();
        drop(stack.managers.remove(gone));

        let mut statuses = Vec::new();
        for _ in 0..9 {
            let r = post_signup(&mut c).await.expect("sign-up request");
            assert!(r.status >= 500, "{} {}", r.status, r.text());
            assert!(consumer_cookie(&r).unwrap().is_none(), "{:?}", r.headers);
            statuses.push(r.status);
        }
        // Every registration is given back: only the first consumer is left, and
        // no capacity stays used by the failed sign-ups.
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let listed = stack.cp.admin("GET", "/v1/consumers", None).await.json();
            let n = listed.as_array().map_or(0, Vec::len);
            let now = capacity(&stack).await;
            if n == 1 && now.0 == now.1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "registrations not given back: {n} consumers, capacity used {} vs accounted {}",
                now.0,
                now.1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let refused = stack.envoys[0].settled_stat("prealloc_signups_refused");
        println!(
            "failing managers on sign-up ({}): answers {statuses:?}, {refused} given back, capacity used {} before, {} after, all accounted for",
            build.name(),
            before.0,
            capacity(&stack).await.0
        );
        assert_eq!(refused, 9);
        stack.assert_no_violations();
    }
}

each_build! {
    #[tokio::test]
    async fn control_plane_down_answers_503_with_retry_after_and_no_cookie(build) {
        let mut stack = Stack::start(&StackOptions::new(Replication::Active).with_build(build));
        stack.cp.kill9();
        let mut c = Client::new(stack.envoys[0].addr());
        let r = post_signup(&mut c).await.expect("sign-up request");
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
        assert_eq!(
            r.json()["error"],
            "control_plane_unreachable",
            "{}",
            r.text()
        );
        assert!(consumer_cookie(&r).unwrap().is_none());
        for m in &stack.managers {
            assert!(
                m.signups().is_empty(),
                "{} got a sign-up without a registration",
                m.name()
            );
        }
        assert!(stack.envoys[0].settled_stat("prealloc_signups_unavailable") >= 1);
        stack.assert_no_violations();
    }
}

each_build! {
    /// `//signup`, `/x/../signup` and `/%73ignup` are the sign-up path once
    /// normalised (the template's `normalize_path` and `merge_slashes`), so none
    /// of them slips past sign-up matching to a backend that normalises it later.
    #[tokio::test]
    async fn path_variants_of_the_signup_path_are_signups(build) {
        let stack = Stack::start(&StackOptions::new(Replication::Reported).with_build(build));
        let mut c = Client::new(stack.envoys[0].addr());
        for path in ["//signup", "/x/../signup", "/%73ignup", "/signup?ref=mail"] {
            let deadline = Instant::now() + STEP_TIMEOUT;
            let r = loop {
                let r = c
                    .send("POST", path, &[("content-type", "application/json")], b"{}")
                    .await
                    .expect("sign-up request");
                // 503 while the pool is still filling right after start.
                if r.status != 503 || Instant::now() >= deadline {
                    break r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert!(r.status < 300, "{path}: {} {}", r.status, r.text());
            assert!(
                consumer_cookie(&r).unwrap().is_some(),
                "{path} is a sign-up: it gets the cookie"
            );
        }
        assert_eq!(stack.default.count(RequestKind::Anonymous), 0, "nothing reached the default backend");
        let signups: usize = stack.managers.iter().map(|m| m.signups().len()).sum();
        assert_eq!(signups, 4);
        stack.assert_no_violations();
    }
}
