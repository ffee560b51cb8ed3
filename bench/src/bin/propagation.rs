//! Propagation through the real control plane to real Envoys (BENCHMARKS.md,
//! "Propagation to 1 and 10 Envoys"): the same stack as the end-to-end tests
//! (control plane, M recording managers (3 unless `--managers M`), E Envoys long-polling it), C
//! consumers signed up through Envoy, then for each consumer in turn (one
//! change each): its data is placed on a second manager and that copy is
//! reported; from the moment the report is acknowledged (committed), every
//! Envoy is probed with the consumer's registering cookie until one of its
//! requests is served by that second manager (only the new entry names it:
//! the cookie and the old entry name the first manager alone). Reported: p50/p99/max of the time
//! until each Envoy routes by the change and until every Envoy does, and the
//! invariant checker's count of requests that reached a manager without the
//! data.
//!
//! With `--window N`, N more consumers are in the table the whole time
//! (written into the database through the registry, the control plane
//! restarted on it, every Envoy loading it before the changes start).
//!
//! With `--shared`, two control planes share a throwaway PostgreSQL database:
//! the Envoys poll the first, the copies are reported to the second, so each
//! change crosses instances (the batch log, `NOTIFY`, the catch-up) before
//! it reaches an Envoy.
//!
//! `bench/propagation.sh [--envoys E] [--changes C] [--build wasm|native] [--window N] [--managers M] [--shared]`

use prealloc_bench::db::{now_ms, Filler};
use prealloc_bench::stats::quantile;
use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::envoy::Build;
use prealloc_e2e::story::{SignedUp, Stack, StackOptions, STEP_TIMEOUT};
use std::time::{Duration, Instant};

/// Probes one Envoy until a request with `cookie` is served by `second`;
/// the time from `from`.
async fn until_routed(client: &mut Client, cookie: &str, second: &str, from: Instant) -> f64 {
    loop {
        if let Ok(r) = client
            .send("GET", "/inbox", &[("cookie", cookie)], b"")
            .await
        {
            if r.served_by().is_some_and(|s| s == second) {
                return from.elapsed().as_secs_f64() * 1e3;
            }
        }
        assert!(
            from.elapsed() < STEP_TIMEOUT,
            "not routed within {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut envoys = 1usize;
    let mut changes = 1000usize;
    let mut build = Build::Native;
    let mut window = 0u64;
    let mut managers = 3usize;
    let mut shared = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--shared" {
            shared = true;
            continue;
        }
        let v = args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--envoys" => envoys = v.parse().expect("--envoys N"),
            "--changes" => changes = v.parse().expect("--changes C"),
            "--window" => window = v.parse().expect("--window N"),
            "--managers" => managers = v.parse().expect("--managers M"),
            "--build" => {
                build = match v.as_str() {
                    "wasm" => Build::Wasm,
                    "native" => Build::Native,
                    _ => panic!("--build wasm|native"),
                }
            }
            _ => panic!(
                "usage: propagation [--envoys E] [--changes C] [--build wasm|native] [--window N] [--managers M] [--shared]"
            ),
        }
    }
    let mut o = StackOptions::new(Replication::Reported).with_build(build);
    o.envoys = envoys;
    o.managers = managers;
    o.grace_period_ms = 3_600_000;
    o.pool_depth = 200;
    o.manager_capacity = window + changes as u64 + 1000;
    o.control_plane_log = Some("warn".into());
    assert!(
        !(shared && window > 0),
        "--window fills a SQLite file: not with --shared"
    );
    let pg =
        shared.then(|| prealloc_e2e::postgres::Postgres::start().unwrap_or_else(|e| panic!("{e}")));
    if let Some(pg) = &pg {
        o.postgres_url = Some(pg.url());
        o.control_planes = 2;
        o.envoys_poll_first_only = true;
    }
    let mut stack = Stack::start(&o);
    if window > 0 {
        let t = Instant::now();
        stack.cp.kill9();
        let mut f = Filler::open(&stack.cp);
        let now = now_ms();
        for i in 0..window {
            f.sign_up(i, now, if i % 2 == 1 { 2 } else { 0 });
        }
        f.finish();
        stack.cp.set_start_timeout(Duration::from_secs(600));
        stack.cp.restart();
        let deadline = Instant::now() + Duration::from_secs(600);
        for e in &stack.envoys {
            e.wait_for_stat("prealloc_poller_entries", deadline - Instant::now(), |v| {
                v >= window
            });
        }
        eprintln!(
            "bench: {window} consumers in the window, every Envoy holds them after {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let t = Instant::now();
    let mut people: Vec<SignedUp> = Vec::with_capacity(changes);
    let mut c = Client::new(stack.envoys[0].addr());
    for _ in 0..changes {
        people.push(stack.sign_up(&mut c, STEP_TIMEOUT).await.expect("sign-up"));
    }
    stack.wait_envoys_caught_up().expect("caught up");
    eprintln!(
        "bench: {changes} consumers signed up in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let mut clients: Vec<Client> = stack.envoys.iter().map(|e| Client::new(e.addr())).collect();
    let (mut each, mut every) = (Vec::new(), Vec::new());
    let names: Vec<String> = stack.managers.iter().map(|m| m.name().to_owned()).collect();
    for (k, s) in people.iter().enumerate() {
        // The second copy goes to each other manager in turn.
        let others: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|m| *m != s.first)
            .collect();
        let second = others[k % others.len()].to_owned();
        stack.manager(&second).hold(s.consumer.as_str());
        // Shared: to the instance the Envoys do not poll.
        let to = stack.more_cps.first().unwrap_or(&stack.cp);
        let r = to.report_replica(&s.consumer, &second).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let acked = Instant::now();
        // One probe per Envoy at once, each on its own kept connection.
        let probes: Vec<_> = clients
            .drain(..)
            .map(|mut c| {
                let (cookie, second) = (s.cookie.clone(), second.clone());
                tokio::spawn(async move {
                    let t = until_routed(&mut c, &cookie, &second, acked).await;
                    (c, t)
                })
            })
            .collect();
        let mut times = Vec::with_capacity(probes.len());
        for p in probes {
            let (c, t) = p.await.expect("probe");
            clients.push(c);
            times.push(t);
        }
        every.push(times.iter().cloned().fold(0.0, f64::max));
        each.extend(times);
    }
    each.sort_by(|a, b| a.total_cmp(b));
    every.sort_by(|a, b| a.total_cmp(b));
    let violations = stack.violations().len();
    println!(
        "| {}{} | {envoys} | {window} | {changes} | {:.2} / {:.2} / **{:.2}** / {:.2} | {:.2} / **{:.2}** / {:.2} | {violations} |",
        build.name(),
        if shared { ", across 2 shared instances" } else { "" },
        quantile(&each, 0.5),
        quantile(&each, 0.9),
        quantile(&each, 0.99),
        each.last().copied().unwrap_or(f64::NAN),
        quantile(&every, 0.5),
        quantile(&every, 0.99),
        every.last().copied().unwrap_or(f64::NAN),
    );
}
