//! The two invariants under the faults users meet, on real parts: the control
//! plane killed with -9 under load or down for a while, Envoy restarted
//! mid-traffic, a manager going down, draining and coming back. Every test
//! ends with the invariant checker (no request reached a manager without the
//! consumer's data) and prints its figures (`--no-capture` shows them).

use prealloc_e2e::client::{Client, Response};
use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::manager::Holder;
use prealloc_e2e::story::{
    consumer_cookie, post_signup, send_requests, SignedUp, Stack, StackOptions, MANAGER_IDS,
    STEP_TIMEOUT,
};
use prealloc_wire::{Availability, ConsumerId, ConsumerState};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an availability change may take to be routed by every Envoy here.
const PROPAGATION_BOUND: Duration = Duration::from_secs(2);

fn options(build: prealloc_e2e::envoy::Build) -> StackOptions {
    let mut o = StackOptions::new(Replication::Reported).with_build(build);
    // Entries stay in the table for the whole test: routing by the table is what is checked.
    o.grace_period_ms = 120_000;
    o
}

/// Signs up `n` consumers through Envoy #0.
async fn sign_up_many(stack: &Stack, n: usize) -> Vec<SignedUp> {
    let mut c = Client::new(stack.envoys[0].addr());
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(stack.sign_up(&mut c, STEP_TIMEOUT).await.expect("sign-up"));
    }
    out
}

/// Copies `s` to every other manager and reports each copy, then waits until
/// every Envoy routes it as registered.
async fn register(stack: &Stack, s: &SignedUp) {
    for m in MANAGER_IDS.iter().filter(|m| **m != s.first) {
        stack.manager(m).hold(s.consumer.as_str());
        let r = stack.cp.report_replica(&s.consumer, m).await;
        assert_eq!(r.status, 200, "replica report: {}", r.text());
    }
    stack
        .wait_routed(&s.consumer, "registered", |e| {
            e.is_some_and(|e| e.state == ConsumerState::Registered)
        })
        .await
        .unwrap();
}

/// `(consumer, resource id)` of every consumer the control plane holds.
async fn resources(stack: &Stack) -> Vec<(String, u64)> {
    let r = stack
        .cp
        .admin("GET", "/v1/consumers?limit=100000", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let list = v.as_array().cloned().unwrap_or_default();
    assert!(!list.is_empty(), "no consumers listed: {v}");
    list.iter()
        .map(|c| {
            (
                c["consumer"].as_str().unwrap_or_default().to_owned(),
                c["resource"]["id"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// What the load tasks of the kill -9 test saw acknowledged.
#[derive(Default)]
struct Acks {
    /// consumer → (first manager, resource name) of every sign-up answered with a cookie.
    registrations: BTreeMap<ConsumerId, (String, String)>,
    /// (consumer, manager) of every replica report answered 200.
    replicas: Vec<(ConsumerId, String)>,
    /// Sign-ups answered 503 (pool filling, or the control plane down).
    refused: usize,
    /// Replica reports that got no 200 (the control plane down).
    reports_failed: usize,
    /// Requests with a cookie that were not answered 200 by a manager.
    bad_requests: Vec<String>,
}

/// One load task: sign up, use the cookie, copy to one other manager and report it.
async fn load(
    envoy: SocketAddr,
    cp: SocketAddr,
    admin: String,
    holders: Vec<Holder>,
    acks: Arc<Mutex<Acks>>,
    stop: Arc<AtomicBool>,
) {
    let mut client = Client::new(envoy);
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let r = match post_signup(&mut client).await {
            Ok(r) => r,
            Err(_) => {
                client = Client::new(envoy);
                continue;
            }
        };
        let Ok(Some((value, claims))) = consumer_cookie(&r) else {
            acks.lock().unwrap().refused += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let first = r.served_by().unwrap_or_default();
        let resource = r.json()["resource"].as_str().unwrap_or("?").to_owned();
        acks.lock()
            .unwrap()
            .registrations
            .insert(claims.consumer.clone(), (first.clone(), resource));
        let cookie = format!("prealloc={value}");
        match send_requests(&mut client, &cookie, 2).await {
            Ok(b) if b.served.iter().all(|s| *s == first) => {}
            Ok(b) => acks.lock().unwrap().bad_requests.push(format!(
                "{} pinned to {first} served by {:?}",
                claims.consumer, b.served
            )),
            Err(e) => acks.lock().unwrap().bad_requests.push(e),
        }
        // One copy to the next manager, then its report (in flight when the kill comes, for some).
        let Some(to) = holders
            .iter()
            .filter(|h| h.name() != first)
            .nth(n % 2)
            .cloned()
        else {
            continue;
        };
        to.hold(claims.consumer.as_str());
        let body = serde_json::json!({ "manager": to.name() }).to_string();
        let report = Client::new(cp)
            .send(
                "POST",
                &format!("/v1/consumers/{}/replicas", claims.consumer),
                &[
                    ("authorization", &admin),
                    ("content-type", "application/json"),
                ],
                body.as_bytes(),
            )
            .await;
        let mut a = acks.lock().unwrap();
        match report {
            Ok(r) if r.status == 200 => a
                .replicas
                .push((claims.consumer.clone(), to.name().to_owned())),
            _ => a.reports_failed += 1,
        }
    }
}

each_build! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn kill_9_under_concurrent_signups_and_replica_reports_loses_nothing(build) {
        let mut opts = options(build);
        opts.pool_depth = 200;
        let mut stack = Stack::start(&opts);
        // The pool has filled once a sign-up gets through.
        sign_up_many(&stack, 1).await;
        let epoch = stack.routes().await.expect("routes").epoch;

        let acks = Arc::new(Mutex::new(Acks::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let holders: Vec<Holder> = stack.managers.iter().map(|m| m.holder()).collect();
        let admin = format!("Bearer {}", stack.cp.config().admin_token);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(load(
                    stack.envoys[0].addr(),
                    stack.cp.addr(),
                    admin.clone(),
                    holders.clone(),
                    acks.clone(),
                    stop.clone(),
                ))
            })
            .collect();

        // Kill it while the tasks are mid-call, leave it down, bring it back, twice.
        let mut kills = 0;
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let before = acks.lock().unwrap().registrations.len();
            stack.cp.kill9();
            kills += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
            stack.cp.restart();
            assert!(before > 0, "no sign-up got through before kill {kills}");
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.expect("load task");
        }

        let acks = std::mem::take(&mut *acks.lock().unwrap());
        let mut lost = Vec::new();
        for (c, (first, _)) in &acks.registrations {
            let v = stack.cp.consumer(c).await;
            if v["first_manager"]["id"] != first.as_str() {
                lost.push(format!("{c}: first manager {first}, record {v}"));
            }
        }
        for (c, m) in &acks.replicas {
            let v = stack.cp.consumer(c).await;
            let held = v["replicas"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|r| r["manager"] == m.as_str()));
            if !held {
                lost.push(format!("{c}: acknowledged copy on {m} missing from {v}"));
            }
        }
        let all = resources(&stack).await;
        let distinct: BTreeSet<u64> = all.iter().map(|(_, r)| *r).collect();
        let epoch_after = stack.routes().await.expect("routes").epoch;
        println!(
            "kill -9 ×{kills} under load ({}): {} sign-ups acknowledged, {} replica reports \
             acknowledged, {} sign-ups answered 503, {} reports unanswered; {} consumers hold {} \
             distinct resources; lost: {}",
            build.name(),
            acks.registrations.len(),
            acks.replicas.len(),
            acks.refused,
            acks.reports_failed,
            all.len(),
            distinct.len(),
            lost.len()
        );
        assert!(lost.is_empty(), "acknowledged writes lost: {lost:#?}");
        assert_eq!(distinct.len(), all.len(), "a resource handed to two consumers: {all:?}");
        assert_eq!(epoch_after, epoch, "same database, same epoch");
        assert!(acks.bad_requests.is_empty(), "{:#?}", acks.bad_requests);
        assert!(acks.replicas.len() >= 10, "too little load to mean anything");
        stack.wait_envoys_caught_up().expect("caught up");
        stack.assert_no_violations();
    }
}

each_build! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_plane_down_for_a_while_routing_goes_on_and_the_poller_resyncs(build) {
        let mut stack = Stack::start(&options(build));
        let people = sign_up_many(&stack, 4).await;
        let (registered, pinned) = people.split_at(2);
        for s in registered {
            register(&stack, s).await;
        }
        stack.wait_envoys_caught_up().unwrap();
        let envoy = &stack.envoys[0];
        let errors_before = envoy.stat("prealloc_poller_errors");

        stack.cp.kill9();
        let down = Duration::from_secs(4);
        let since = Instant::now();
        let mut client = Client::new(envoy.addr());
        let mut served: BTreeMap<ConsumerId, BTreeSet<String>> = BTreeMap::new();
        let mut requests = 0;
        let mut signup_503 = 0;
        while since.elapsed() < down {
            for s in &people {
                let b = send_requests(&mut client, &s.cookie, 3).await.expect("routed");
                requests += 3;
                served.entry(s.consumer.clone()).or_default().extend(b.served);
            }
            let r = post_signup(&mut client).await.expect("sign-up");
            assert_eq!(r.status, 503, "sign-up while the control plane is down: {}", r.text());
            assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok()), "{:?}", r.headers);
            assert!(consumer_cookie(&r).unwrap().is_none());
            signup_503 += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let errors_down = envoy.stat("prealloc_poller_errors") - errors_before;
        for s in registered {
            assert_eq!(served[&s.consumer].len(), 3, "registered: every replica: {served:?}");
        }
        for s in pinned {
            assert_eq!(
                served[&s.consumer],
                BTreeSet::from([s.first.clone()]),
                "registering: its first manager only"
            );
        }
        // Backoff is capped (max_backoff_ms 1000 in the test config): the poller
        // keeps trying about once a second, not in a tight loop and not never.
        assert!(
            (4..=12).contains(&errors_down),
            "{errors_down} poller errors in {down:?}"
        );

        let restarted = Instant::now();
        stack.cp.restart();
        // The poller comes back by itself: a change made now reaches this Envoy.
        register(&stack, &pinned[0]).await;
        let resynced = restarted.elapsed();
        let b = send_requests(&mut client, &pinned[0].cookie, 6).await.unwrap();
        assert_eq!(b.tally().len(), 3, "{:?}", b.served);
        let again = stack.sign_up(&mut client, STEP_TIMEOUT).await.expect("sign-ups are back");
        println!(
            "control plane down {down:?} ({}): {requests} requests routed, {signup_503} sign-ups \
             answered 503 + Retry-After, {errors_down} poller errors; resynced {resynced:?} after \
             restart; new sign-up {}",
            build.name(),
            again.consumer
        );
        stack.assert_no_violations();
    }
}

each_build! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn envoy_restarted_mid_traffic_keeps_every_consumer_on_its_data(build) {
        let mut stack = Stack::start(&options(build));
        let people = sign_up_many(&stack, 6).await;
        for s in &people[..3] {
            register(&stack, s).await;
        }
        let table = stack
            .wait_table("three registered", STEP_TIMEOUT, |t| {
                t.upsert.iter().filter(|e| e.state == ConsumerState::Registered).count() == 3
            })
            .await
            .unwrap();
        let entries = table.upsert.len() as u64;

        let addr = stack.envoys[0].addr();
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let stop = stop.clone();
            let cookies: Vec<(String, String)> =
                people.iter().map(|s| (s.cookie.clone(), s.first.clone())).collect();
            tokio::spawn(async move {
                let (mut ok, mut refused, mut bad) = (0usize, 0usize, Vec::new());
                let mut client = Client::new(addr);
                while !stop.load(Ordering::Relaxed) {
                    for (cookie, _) in &cookies {
                        match client.send("GET", "/inbox", &[("cookie", cookie)], b"").await {
                            Ok(r) if r.status == 200 && r.served_by().is_some() => ok += 1,
                            Ok(r) => bad.push(format!("{} {:?}", r.status, r.text())),
                            Err(_) => {
                                // Envoy is being restarted: connect again.
                                refused += 1;
                                client = Client::new(addr);
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                }
                (ok, refused, bad)
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = Instant::now();
        stack.restart_envoy(0);
        let ready = t0.elapsed();
        stack.envoys[0].wait_for_stat("prealloc_poller_entries", STEP_TIMEOUT, |v| v == entries);
        let complete = t0.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        let (ok, refused, bad) = traffic.await.unwrap();
        println!(
            "Envoy restart ({}): ready after {ready:?}, table of {entries} entries complete after \
             {complete:?}; {ok} requests served, {refused} refused while it was down, {} bad",
            build.name(),
            bad.len()
        );
        assert!(bad.is_empty(), "answers that were not a manager's 200: {bad:?}");
        // From ready (listener up, poller started) to the whole table: the first poll.
        assert!(
            complete - ready < Duration::from_secs(3),
            "table complete {:?} after the new Envoy was ready",
            complete - ready
        );
        // After: registered consumers spread over their replicas again.
        let mut client = Client::new(addr);
        let b = send_requests(&mut client, &people[0].cookie, 6).await.unwrap();
        assert_eq!(b.tally().len(), 3, "{:?}", b.served);
        stack.assert_no_violations();
    }
}

each_build! {
    /// A new Envoy receives the table in pages of two entries and applies it
    /// one write per main-thread turn, while consumers are being replicated:
    /// requests meanwhile are routed by entries of a table only partly written
    /// (and by cookies where no entry is written yet), and never reach a
    /// manager without the consumer's data.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_applied_in_pages_and_turns_never_routes_to_a_manager_without_the_data(build) {
        let mut o = options(build);
        o.control_plane_toml = "[push]\npage_entries = 2\n".into();
        o.poller.insert("writes_per_turn".into(), 1.into());
        let mut stack = Stack::start(&o);
        let people = sign_up_many(&stack, 24).await;
        for s in &people[..8] {
            register(&stack, s).await;
        }
        let addr = stack.envoys[0].addr();
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let stop = stop.clone();
            let cookies: Vec<String> = people.iter().map(|s| s.cookie.clone()).collect();
            tokio::spawn(async move {
                let (mut ok, mut bad) = (0usize, Vec::new());
                let mut client = Client::new(addr);
                while !stop.load(Ordering::Relaxed) {
                    for cookie in &cookies {
                        match client.send("GET", "/inbox", &[("cookie", cookie)], b"").await {
                            Ok(r) if r.status == 200 && r.served_by().is_some() => ok += 1,
                            Ok(r) => bad.push(format!("{} {:?}", r.status, r.text())),
                            Err(_) => {
                                client = Client::new(addr);
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                }
                (ok, bad)
            })
        };
        let updates_before = stack.envoys[0].stat("prealloc_poller_updates");
        stack.restart_envoy(0);
        // Replication goes on while the new Envoy pages the table in.
        for s in &people[8..16] {
            register(&stack, s).await;
        }
        stack.wait_envoys_caught_up().unwrap();
        let entries = stack.envoys[0].wait_for_stat("prealloc_poller_entries", STEP_TIMEOUT, |v| v == 24);
        let updates = stack.envoys[0].stat("prealloc_poller_updates");
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let (ok, bad) = traffic.await.unwrap();
        println!(
            "paged table ({}): {entries} entries in {updates} answers after the restart \
             (before it: {updates_before}); {ok} requests served",
            build.name()
        );
        assert!(updates >= 12, "24 entries in pages of 2: {updates} answers");
        assert!(bad.is_empty(), "answers that were not a manager's 200: {bad:?}");
        assert!(ok > 0);
        // Registered consumers are spread over their replicas by the table.
        let mut client = Client::new(addr);
        let b = send_requests(&mut client, &people[12].cookie, 6).await.unwrap();
        assert_eq!(b.tally().len(), 3, "{:?}", b.served);
        stack.assert_no_violations();
    }
}

/// Waits until `check` holds for the answers Envoy gives now; returns how long it took.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if check().await {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < STEP_TIMEOUT,
            "{what}: not within {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Capacity the control plane counts as used on `manager` (reserved, ready or assigned).
async fn used_on(stack: &Stack, manager: &str) -> u64 {
    let v = stack
        .cp
        .admin("GET", &format!("/v1/managers/{manager}"), None)
        .await
        .json();
    v["capacity"]["mailbox"]["used"].as_u64().expect("used")
}

async fn get(client: &mut Client, cookie: &str) -> Response {
    client
        .send("GET", "/inbox", &[("cookie", cookie)], b"")
        .await
        .expect("request")
}

each_build! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_manager_down_draining_and_back(build) {
        let stack = Stack::start(&options(build));
        let people = sign_up_many(&stack, 6).await;
        let pinned = people.iter().find(|s| s.first == "m1").expect("a sign-up on m1").clone();
        let replicated = people.iter().find(|s| s.first != "m1").expect("another").clone();
        register(&stack, &replicated).await;
        let mut client = Client::new(stack.envoys[0].addr());
        let mut timings = Vec::new();

        // Down: the pinned consumer gets 503 + Retry-After, the replicated one its other replicas.
        assert_eq!(stack.cp.set_availability("m1", Availability::Down).await.status, 200);
        let t = until("pinned consumer refused", async || {
            let r = get(&mut client, &pinned.cookie).await;
            r.status == 503 && r.header("retry-after").is_some()
        })
        .await;
        timings.push(("down", t));
        let b = send_requests(&mut client, &replicated.cookie, 12).await.unwrap();
        assert!(!b.served.contains(&"m1".to_owned()), "{:?}", b.served);
        for _ in 0..6 {
            let s = stack.sign_up(&mut client, STEP_TIMEOUT).await.unwrap();
            assert_ne!(s.first, "m1", "a new sign-up on a down manager");
        }

        // Draining: it serves the consumers it holds, takes no new ones.
        assert_eq!(stack.cp.set_availability("m1", Availability::Draining).await.status, 200);
        let t = until("pinned consumer served by m1 again", async || {
            get(&mut client, &pinned.cookie).await.served_by().as_deref() == Some("m1")
        })
        .await;
        timings.push(("draining", t));
        let b = send_requests(&mut client, &replicated.cookie, 12).await.unwrap();
        assert_eq!(b.tally().len(), 3, "draining still serves its replicas: {:?}", b.served);
        for _ in 0..6 {
            let s = stack.sign_up(&mut client, STEP_TIMEOUT).await.unwrap();
            assert_ne!(s.first, "m1", "a new sign-up on a draining manager");
        }

        // Back: sign-ups reach it again, and pre-allocation reserves there again.
        let used_before = used_on(&stack, "m1").await;
        assert_eq!(stack.cp.set_availability("m1", Availability::Available).await.status, 200);
        let t0 = Instant::now();
        let mut on_m1 = 0;
        for _ in 0..9 {
            if stack.sign_up(&mut client, STEP_TIMEOUT).await.unwrap().first == "m1" {
                on_m1 += 1;
            }
        }
        timings.push(("available (first sign-ups)", t0.elapsed()));
        assert!(on_m1 > 0, "no sign-up reached m1 after it came back");
        let t = until("pre-allocation reserves on m1 again", async || {
            used_on(&stack, "m1").await > used_before
        })
        .await;
        timings.push(("pre-allocation on m1 (after the sign-ups)", t));

        println!(
            "availability changes ({}): {}; {on_m1} of 9 sign-ups on m1 once back",
            build.name(),
            timings
                .iter()
                .map(|(w, t)| format!("{w}: {t:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (w, t) in &timings[..2] {
            assert!(*t < PROPAGATION_BOUND, "{w} took {t:?}");
        }
        stack.assert_no_violations();
    }
}
