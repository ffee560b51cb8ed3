//! Hundreds of consumers signing up and sending requests concurrently while active replication runs.

use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::envoy::EnvoyOptions;
use prealloc_e2e::story::{send_requests, spread, tally, Stack, StackOptions, STEP_TIMEOUT};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONSUMERS: usize = 240;
const CONCURRENCY: usize = 40;
/// Requests per consumer while its data is being replicated.
const EARLY_REQUESTS: usize = 4;
const WORKERS: u32 = 2;

struct Done {
    consumer: String,
    first: String,
    cookie: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_consumers_sign_up_and_send_requests_while_replication_runs() {
    let mut opts = StackOptions::new(Replication::Active);
    // Long enough that every entry is still in the table for the final round (which upgrades the cookies).
    opts.grace_period_ms = 120_000;
    opts.pool_depth = 100;
    opts.envoy = EnvoyOptions {
        concurrency: WORKERS,
        ..EnvoyOptions::default()
    };
    let stack = Arc::new(Stack::start(&opts));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(45);

    // Phase 1: sign-ups and early requests, CONCURRENCY connections at a time.
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let stack = stack.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < CONSUMERS {
                assert!(Instant::now() < deadline, "phase 1 overran its deadline");
                let mut c = Client::new(stack.envoys[0].addr());
                let su = stack
                    .sign_up(&mut c, STEP_TIMEOUT)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let mut cookie = su.cookie.clone();
                for _ in 0..EARLY_REQUESTS {
                    let b = send_requests(&mut c, &cookie, 1)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    if let Some((up, _)) = b.upgraded {
                        cookie = up;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                done.push(Done {
                    consumer: su.consumer.to_string(),
                    first: su.first,
                    cookie,
                });
            }
            done
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.extend(t.await.expect("a consumer task panicked"));
    }
    let phase1 = started.elapsed();
    assert_eq!(done.len(), CONSUMERS);
    let firsts = tally(&done.iter().map(|d| d.first.clone()).collect::<Vec<_>>());
    println!(
        "[load] {CONSUMERS} sign-ups + {} requests in {phase1:?}; first managers {firsts:?}",
        CONSUMERS * EARLY_REQUESTS
    );
    stack.assert_no_violations();

    // Replication finishes: every consumer registered, every copy on every manager.
    loop {
        let r = stack
            .cp
            .admin("GET", "/v1/consumers?state=registering&limit=5", None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.json().as_array().is_some_and(|a| a.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumers still registering: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in &done {
        for m in &stack.managers {
            assert!(
                m.holds(&d.consumer),
                "{} lacks a copy of {}",
                m.name(),
                d.consumer
            );
        }
    }
    stack
        .wait_envoys_caught_up()
        .unwrap_or_else(|e| panic!("{e}"));

    // Phase 2: every consumer, fully replicated, sends 3 requests concurrently.
    let done = Arc::new(done);
    let mut tasks = Vec::new();
    for k in 0..CONCURRENCY {
        let stack = stack.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut c = Client::new(stack.envoys[0].addr());
            for d in done.iter().skip(k).step_by(CONCURRENCY) {
                let b = send_requests(&mut c, &d.cookie, 3)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                out.push((d.consumer.clone(), b.served));
            }
            out
        }));
    }
    // Each consumer's replica order (first manager first, then copies as they landed).
    let r = stack
        .cp
        .admin(
            "GET",
            &format!("/v1/consumers?state=registered&limit={}", CONSUMERS + 10),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let order: std::collections::HashMap<String, Vec<String>> = r
        .json()
        .as_array()
        .expect("a list of consumer records")
        .iter()
        .map(|v| {
            let id = v["consumer"].as_str().unwrap_or_default().to_owned();
            let reps = v["replicas"].as_array().into_iter().flatten();
            (
                id,
                reps.filter_map(|r| r["manager"].as_str().map(str::to_owned))
                    .collect(),
            )
        })
        .collect();
    let mut served = Vec::new();
    let mut positions = Vec::new();
    let mut per_consumer_spread = std::collections::BTreeMap::<usize, usize>::new();
    let all: Vec<String> = ["m1", "m2", "m3"].iter().map(|s| s.to_string()).collect();
    for t in tasks {
        for (consumer, s) in t.await.expect("a phase 2 task panicked") {
            let reps = &order[&consumer];
            for m in &s {
                let i = reps
                    .iter()
                    .position(|r| r == m)
                    .expect("served by one of its replicas");
                positions.push(format!("replica #{i}"));
            }
            *per_consumer_spread
                .entry(spread(&tally(&s), &all))
                .or_insert(0) += 1;
            served.extend(s);
        }
    }
    let t = tally(&served);
    let p = tally(&positions);
    let pos: Vec<String> = (0..3).map(|i| format!("replica #{i}")).collect();
    println!(
        "[load] phase 2: {} requests of registered consumers over {WORKERS} workers: by manager {t:?} \
         (max-min {}), by position in the consumer's replica set {p:?} (max-min {}); \
         per-consumer max-min of its 3 requests -> consumers: {per_consumer_spread:?}; total {:?}",
        served.len(),
        spread(&t, &all),
        spread(&p, &pos),
        started.elapsed()
    );
    // One round-robin counter per worker picks the replica by position: exact to ±1 per worker.
    assert!(
        spread(&p, &pos) <= WORKERS as usize,
        "uneven round-robin: {p:?}"
    );
    // By manager it depends on how the consumers' replica orders mix: within 10% of the mean.
    let mean = served.len() / 3;
    for m in &all {
        let n = t.get(m).copied().unwrap_or(0);
        assert!(
            n.abs_diff(mean) * 10 <= mean,
            "{m} got {n} of {}: {t:?}",
            served.len()
        );
    }
    stack.assert_no_violations();
    let total: usize = stack.servers().map(|s| s.requests().len()).sum();
    println!(
        "[load] invariant: 0 of {total} requests reached a manager without the consumer's data"
    );
}
