//! A registration is a lease through real Envoy: the filter confirms it once the
//! first manager accepted the sign-up, and only then issues the cookie. A
//! sign-up that outlasts its lease, or whose confirmation cannot reach the
//! control plane, gets a 503 without a cookie, and the control plane reclaims
//! the registration, also across a kill -9.

use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::{ControlPlane, Replication};
use prealloc_e2e::manager::RequestKind;
use prealloc_e2e::story::{
    consumer_cookie, first_signup, post_signup, Stack, StackOptions, STEP_TIMEOUT,
};
use prealloc_wire::ConsumerId;
use std::time::{Duration, Instant};

fn with_lease(build: prealloc_e2e::envoy::Build, lease_ms: u64) -> StackOptions {
    let mut o = StackOptions::new(Replication::Reported).with_build(build);
    o.registration_lease_ms = Some(lease_ms);
    o
}

/// The consumer of the `nth` sign-up (in arrival order) the managers accepted.
fn signed_up_consumer(stack: &Stack, nth: usize) -> ConsumerId {
    let mut signups: Vec<_> = stack
        .managers
        .iter()
        .flat_map(|m| m.requests())
        .filter(|r| r.kind == RequestKind::SignUp)
        .collect();
    signups.sort_by_key(|r| r.at);
    let s = signups
        .get(nth)
        .unwrap_or_else(|| panic!("sign-up {nth} never reached a manager: {signups:?}"));
    assert!(s.status < 300, "{s:?}");
    ConsumerId::parse(s.consumer.as_deref().unwrap_or_default()).expect("a consumer id")
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

each_build! {
    #[tokio::test]
    async fn a_signup_slower_than_its_lease_gets_a_503_and_the_registration_is_reclaimed(build) {
        let stack = Stack::start(&with_lease(build, 500));
        let mut c = Client::new(stack.envoys[0].addr());

        // A prompt sign-up is confirmed: it keeps its consumer past the lease.
        let r = first_signup(&mut c).await;
        assert!(r.status < 300, "{} {}", r.status, r.text());
        assert!(consumer_cookie(&r).unwrap().is_some(), "{:?}", r.headers);
        let kept = signed_up_consumer(&stack, 0);
        assert!(
            stack.cp.consumer(&kept).await["confirmed_ms"].is_u64(),
            "the filter confirmed the registration before issuing the cookie"
        );

        // A manager slower than the lease: it accepts, but the registration is gone by then.
        for m in &stack.managers {
            m.delay_signups(Duration::from_millis(1500));
        }
        let r = post_signup(&mut c).await.expect("sign-up request");
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"], "registration_expired", "{}", r.text());
        assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
        assert!(
            consumer_cookie(&r).unwrap().is_none(),
            "no cookie for a reclaimed registration: {:?}",
            r.headers
        );
        let late = signed_up_consumer(&stack, 1);
        stack.cp.wait_forgotten(&late).await;
        wait_reclaimed(&stack.cp, 1).await;
        // The confirmed consumer outlived two leases.
        assert_eq!(stack.cp.consumer(&kept).await["consumer"], kept.as_str());
        assert_eq!(stack.envoys[0].settled_stat("prealloc_signups_ok"), 1);
        assert_eq!(stack.envoys[0].settled_stat("prealloc_signups_unavailable"), 1);
        stack.assert_no_violations();
    }
}

each_build! {
    /// The control plane is killed (-9) after it committed the registration and
    /// before the manager answers; whether it is back in time decides between a
    /// cookie and a 503, and nothing is lost either way.
    #[tokio::test]
    async fn a_control_plane_killed_during_a_signup_loses_no_registration(build) {
        let mut stack = Stack::start(&with_lease(build, 2000));
        let mut c = Client::new(stack.envoys[0].addr());
        let r = first_signup(&mut c).await;
        assert!(r.status < 300, "{} {}", r.status, r.text());

        // Back before the manager answers: the confirmation reaches the restarted
        // control plane, which kept the registration.
        for m in &stack.managers {
            m.delay_signups(Duration::from_millis(1500));
        }
        let addr = stack.envoys[0].addr();
        let pending = tokio::spawn(async move {
            post_signup(&mut Client::new(addr)).await.expect("sign-up request")
        });
        wait_registrations(&stack.cp, 2).await;
        stack.cp.restart();
        let r = pending.await.expect("sign-up task");
        assert!(r.status < 300, "{} {}", r.status, r.text());
        assert!(consumer_cookie(&r).unwrap().is_some(), "{:?}", r.headers);
        let survived = signed_up_consumer(&stack, 1);
        assert!(stack.cp.consumer(&survived).await["confirmed_ms"].is_u64());

        // Still down when the manager answers: no cookie, and the restarted
        // control plane reclaims the registration when its lease runs out.
        let pending = tokio::spawn(async move {
            post_signup(&mut Client::new(addr)).await.expect("sign-up request")
        });
        wait_registrations(&stack.cp, 1).await;
        stack.cp.kill9();
        let r = pending.await.expect("sign-up task");
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"], "control_plane_unreachable", "{}", r.text());
        assert!(consumer_cookie(&r).unwrap().is_none(), "{:?}", r.headers);
        let orphan = signed_up_consumer(&stack, 2);
        stack.cp.restart();
        stack.cp.wait_forgotten(&orphan).await;
        wait_reclaimed(&stack.cp, 1).await;
        assert!(stack.cp.consumer(&survived).await["confirmed_ms"].is_u64());
        stack.assert_no_violations();
    }
}

/// Waits until this control-plane process has reclaimed `n` registrations,
/// and checks it reclaimed no more. The consumer is gone from `GET
/// /v1/consumers` as soon as the writer applied the reclaim; the counter
/// follows once the batch is committed, a few milliseconds later.
async fn wait_reclaimed(cp: &ControlPlane, n: u64) {
    let name = "prealloc_registrations_reclaimed_total";
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let got = metric(&cp.metrics(), name);
        if got >= Some(n) {
            assert_eq!(got, Some(n), "{name}");
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {got:?}, not {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until this control-plane process has made `n` registrations.
async fn wait_registrations(cp: &ControlPlane, n: u64) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while metric(&cp.metrics(), "prealloc_registrations_total") < Some(n) {
        assert!(Instant::now() < deadline, "no registration {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
