//! Hundreds of consumers signing up and sending requests concurrently while active replication runs.

use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::envoy::EnvoyOptions;
use prealloc_e2e::envoy::TEST_COOKIE_KEY;
use prealloc_e2e::story::{send_requests, spread, tally, Batch, Stack, StackOptions, STEP_TIMEOUT};
use prealloc_filter_core::cookie::verify;
use prealloc_wire::ConsumerState;
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

each_build! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundreds_of_consumers_sign_up_and_send_requests_while_replication_runs(build) {
        let mut opts = StackOptions::new(Replication::Active).with_build(build);
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
        // Replication ran while they sent: early requests were routed pinned, by the table and by upgraded cookies.
        let routed = stack.envoys[0].stats_matching("prealloc_requests_");
        println!("[load] phase 1 routing (Envoy counters): {routed:?}");
        assert!(
            stack.envoys[0].settled_stat("prealloc_requests_table") > 0,
            "no request was routed by a replicated table entry: {routed:?}"
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
        // Every consumer registered in the pushed table (records can run ahead of it), applied by Envoy.
        stack
            .wait_table("every consumer registered", STEP_TIMEOUT, |t| {
                t.upsert.len() == CONSUMERS
                    && t.upsert
                        .iter()
                        .all(|e| e.state == ConsumerState::Registered)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));

        // Phase 2: a warm-up request each upgrades the cookies still saying registering (the table says
        // registered); then every consumer sends 3 requests concurrently, routed by its registered cookie.
        for (i, b) in round(&stack, &done, 1).await {
            if let Some((up, _)) = b.upgraded {
                done[i].cookie = up;
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for d in &done {
            let value = d
                .cookie
                .strip_prefix("prealloc=")
                .expect("a prealloc cookie");
            let claims = verify(value, &[TEST_COOKIE_KEY.as_bytes()], now).expect("cookie verifies");
            assert_eq!(
                claims.state,
                ConsumerState::Registered,
                "{} was not upgraded",
                d.consumer
            );
            assert_eq!(claims.replicas.len(), 3, "{}", d.consumer);
        }
        let mut served = Vec::new();
        let mut per_consumer_spread = std::collections::BTreeMap::<usize, usize>::new();
        let all: Vec<String> = ["m1", "m2", "m3"].iter().map(|s| s.to_string()).collect();
        for (_, b) in round(&stack, &done, 3).await {
            let s = b.served;
            *per_consumer_spread
                .entry(spread(&tally(&s), &all))
                .or_insert(0) += 1;
            served.extend(s);
        }
        let t = tally(&served);
        println!(
            "[load] phase 2: {} requests of registered consumers over {WORKERS} workers: {t:?} (max-min {}); \
             per-consumer max-min of its 3 requests -> consumers: {per_consumer_spread:?}; total {:?}",
            served.len(),
            spread(&t, &all),
            started.elapsed()
        );
        // One round-robin counter per worker, picking by manager name: exact to ±1 per worker.
        assert!(
            spread(&t, &all) <= WORKERS as usize,
            "uneven round-robin: {t:?}"
        );
        stack.assert_no_violations();
        let total: usize = stack.servers().map(|s| s.requests().len()).sum();
        println!(
            "[load] invariant: 0 of {total} requests reached a manager without the consumer's data"
        );
    }
}

/// Every consumer sends `n` requests with its cookie, CONCURRENCY connections at a time; `(index, batch)`.
async fn round(stack: &Arc<Stack>, done: &[Done], n: usize) -> Vec<(usize, Batch)> {
    let cookies: Arc<Vec<String>> = Arc::new(done.iter().map(|d| d.cookie.clone()).collect());
    let mut tasks = Vec::new();
    for k in 0..CONCURRENCY {
        let stack = stack.clone();
        let cookies = cookies.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut c = Client::new(stack.envoys[0].addr());
            for i in (k..cookies.len()).step_by(CONCURRENCY) {
                let b = send_requests(&mut c, &cookies[i], n)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                out.push((i, b));
            }
            out
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.expect("a request task panicked"));
    }
    out
}
