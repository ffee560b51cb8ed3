//! Many Envoys long-polling one control plane (BENCHMARKS.md, section 7): N
//! pollers, each on its own connection and with its own node id, hold
//! `GET /v1/routes` at the current version; then the control plane's memory
//! and CPU with all of them idle, and, for a series of changes (one sign-up
//! each), the time from sending the sign-up until each poller holds the
//! change: p50/p99 over every (change, poller) pair and the time until the
//! last poller has it.
//!
//! `bench/longpolls.sh [--pollers N] [--changes C]`

use prealloc_bench::procs;
use prealloc_bench::stats::quantile;
use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec};
use prealloc_wire::{RoutesQuery, RoutesResponse};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The control plane's table version now (a full snapshot's `version`).
async fn routes_version(c: &mut Client, token: &str) -> u64 {
    let r = c
        .send(
            "GET",
            "/v1/routes?protocol=2&since=0",
            &[("authorization", token)],
            b"",
        )
        .await
        .expect("routes");
    serde_json::from_slice::<RoutesResponse>(&r.body)
        .expect("a routes answer")
        .version
}

/// Per poller: each new version it received, and when.
type Arrivals = Arc<Mutex<Vec<Vec<(u64, Instant)>>>>;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let mut pollers = 1000usize;
    let mut changes = 50usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v: usize = args
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{a} needs a number"));
        match a.as_str() {
            "--pollers" => pollers = v,
            "--changes" => changes = v,
            _ => panic!("usage: longpolls [--pollers N] [--changes C]"),
        }
    }
    let managers = ["m1", "m2", "m3"]
        .iter()
        .map(|id| ManagerSpec {
            capacity: vec![("mailbox".to_owned(), 100_000)],
            ..ManagerSpec::new(id, "http://127.0.0.1:9")
        })
        .collect();
    let mut cfg = ControlPlaneConfig::new(managers);
    cfg.pools = vec![("mailbox".into(), "local".into(), 1000)];
    cfg.registration_lease_ms = Some(86_400_000);
    cfg.log_level = Some("warn".into());
    let cp = ControlPlane::start(cfg);
    let pid = cp.pid().expect("control plane pid");
    let addr = cp.addr();
    let token = format!("Bearer {}", cp.config().envoy_token);
    let rss_before = procs::rss_kib(pid);

    // Each poller: long-poll, record when each version arrived, poll again.
    let arrivals: Arrivals = Arc::new(Mutex::new(vec![Vec::new(); pollers]));
    for i in 0..pollers {
        let (arrivals, token) = (arrivals.clone(), token.clone());
        tokio::spawn(async move {
            let mut c = Client::new(addr);
            let mut q = RoutesQuery {
                since: 0,
                epoch: None,
                wait_ms: Some(30_000),
                node: Some(format!("bench-{i}")),
                after: None,
            };
            loop {
                let Ok(r) = c
                    .send("GET", &q.to_path(), &[("authorization", &token)], b"")
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let at = Instant::now();
                let Ok(body) = serde_json::from_slice::<RoutesResponse>(&r.body) else {
                    continue;
                };
                // Snapshot pages: follow them to the last; the position moves then.
                q.after = body.next;
                if q.after.is_some() {
                    q.since = body.version;
                    q.epoch = Some(body.epoch);
                    continue;
                }
                if body.version != q.since {
                    arrivals.lock().await[i].push((body.version, at));
                }
                q.since = body.version;
                q.epoch = Some(body.epoch);
            }
        });
    }
    let waiting = || {
        let (_, m) = prealloc_e2e::client::blocking_get(addr, "/metrics", Duration::from_secs(5))
            .unwrap_or_default();
        m.lines()
            .find_map(|l| l.strip_prefix("prealloc_routes_waiting_pollers "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    let t = Instant::now();
    while waiting() < pollers {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "only {} pollers held",
            waiting()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{pollers} long-polls held after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = procs::rss_kib(pid);
    let cpu0 = procs::cpu_ns(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu_ms = (procs::cpu_ns(pid) - cpu0) as f64 / 1e6 / 10.0;

    // Changes: one sign-up each, 200 ms apart; its version is in the answer's routes.
    let mut signup = Client::new(addr);
    let v0 = routes_version(&mut signup, &token).await;
    let mut sent = Vec::new();
    let mut answered = Vec::new();
    let cpu1 = procs::cpu_ns(pid);
    let t1 = Instant::now();
    for _ in 0..changes {
        // Pollers may hold the change before the sign-up's own answer is read
        // (publish and answer follow the same commit): time from the send.
        let before = Instant::now();
        let r = signup
            .send(
                "POST",
                "/v1/registrations",
                &[
                    ("authorization", &token),
                    ("content-type", "application/json"),
                ],
                br#"{"resource_type":"mailbox"}"#,
            )
            .await
            .expect("sign-up");
        assert_eq!(r.status, 201, "{}", r.text());
        sent.push(before);
        answered.push(before.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy_cpu_ms = (procs::cpu_ns(pid) - cpu1) as f64 / 1e6 / t1.elapsed().as_secs_f64();
    // Each sign-up is one version (one commit each, 200 ms apart): the k-th new version.
    let arrivals = arrivals.lock().await.clone();
    let v1 = routes_version(&mut signup, &token).await;
    assert_eq!(v1, v0 + changes as u64, "one version per sign-up");
    let first_version = v0 + 1;
    let (mut each, mut last, mut missing) = (Vec::new(), Vec::new(), 0usize);
    for (k, sent_at) in sent.iter().enumerate() {
        let want = first_version + k as u64;
        let mut worst = 0f64;
        for a in &arrivals {
            match a.iter().find(|(v, _)| *v >= want) {
                Some((_, at)) => {
                    let ms = at.saturating_duration_since(*sent_at).as_secs_f64() * 1000.0;
                    each.push(ms);
                    worst = worst.max(ms);
                }
                None => missing += 1,
            }
        }
        last.push(worst);
    }
    each.sort_by(|a, b| a.total_cmp(b));
    answered.sort_by(|a, b| a.total_cmp(b));
    last.sort_by(|a, b| a.total_cmp(b));
    println!(
        "control plane RSS {} MiB before the pollers, {} MiB with {pollers} held: {:.1} KiB per poller",
        rss_before / 1024,
        rss_idle / 1024,
        (rss_idle.saturating_sub(rss_before)) as f64 / pollers as f64
    );
    println!("control plane CPU with {pollers} idle long-polls: {idle_cpu_ms:.2} ms per second");
    println!(
        "control plane CPU during the changes (5 per second to {pollers} pollers): {busy_cpu_ms:.1} ms per second"
    );
    println!(
        "{changes} changes x {pollers} pollers, from sending the sign-up: its answer p50 {:.2} ms; a poller holds it p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; the last poller holds it p50 {:.2} ms, p99 {:.2} ms; {missing} never arrived",
        quantile(&answered, 0.5),
        quantile(&each, 0.5),
        quantile(&each, 0.99),
        quantile(&each, 1.0),
        quantile(&last, 0.5),
        quantile(&last, 0.99)
    );
}
