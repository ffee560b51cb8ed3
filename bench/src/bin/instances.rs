//! Durable sign-ups on 1, 2 and 3 control planes sharing one PostgreSQL
//! database (`[store] shared = true`), against SQLite and unshared PostgreSQL
//! in the same run, interleaved; then propagation across instances: a
//! sign-up on one instance until a long-poll held on another answers with it
//! (BENCHMARKS.md, section 4).
//!
//! Per case: a fresh throwaway PostgreSQL server (or SQLite file), N release
//! control planes on it, the pool filled, then wrk (one process per
//! instance, the connections split between them) for `--seconds`.
//!
//! `bench/instances.sh [--reps R] [--seconds S] [--connections C] [--depth D] [--samples N]`

use prealloc_bench::procs::{self, WrkOptions};
use prealloc_e2e::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec, Replication};
use prealloc_e2e::postgres::Postgres;
use std::time::{Duration, Instant};

struct Args {
    reps: usize,
    seconds: u64,
    connections: u32,
    depth: u64,
    samples: usize,
}

fn args() -> Args {
    let mut a = Args {
        reps: 3,
        seconds: 10,
        connections: 64,
        depth: 20_000,
        samples: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--reps" => a.reps = v as usize,
            "--seconds" => a.seconds = v,
            "--connections" => a.connections = v as u32,
            "--depth" => a.depth = v,
            "--samples" => a.samples = v as usize,
            _ => panic!("usage: instances [--reps R] [--seconds S] [--connections C] [--depth D] [--samples N]"),
        }
    }
    a
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    Sqlite,
    Postgres,
    Shared(usize),
}

impl Case {
    fn name(self) -> String {
        match self {
            Case::Sqlite => "SQLite, 1 control plane".into(),
            Case::Postgres => "PostgreSQL, 1 control plane".into(),
            Case::Shared(n) => format!("PostgreSQL shared, {n} control plane(s)"),
        }
    }
}

fn config(a: &Args, pg: Option<&Postgres>, shared: bool) -> ControlPlaneConfig {
    let managers = ["m1", "m2", "m3"]
        .iter()
        .map(|id| ManagerSpec {
            capacity: vec![("mailbox".to_owned(), 10_000_000)],
            ..ManagerSpec::new(id, "http://127.0.0.1:9")
        })
        .collect();
    let mut cfg = ControlPlaneConfig::new(managers);
    cfg.replication = Replication::Reported;
    cfg.pools = vec![("mailbox".into(), "local".into(), a.depth)];
    cfg.registration_lease_ms = Some(86_400_000);
    cfg.log_level = Some("warn".into());
    cfg.postgres_url = pg.map(|p| p.url());
    cfg.postgres_shared = shared;
    cfg
}

fn depth(cp: &ControlPlane) -> u64 {
    cp.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("prealloc_pool_depth"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn run_case(a: &Args, case: Case, requests: &std::path::Path) -> Outcome {
    let pg = (case != Case::Sqlite).then(|| Postgres::start().unwrap_or_else(|e| panic!("{e}")));
    let n = match case {
        Case::Shared(n) => n,
        _ => 1,
    };
    let cfg = config(a, pg.as_ref(), matches!(case, Case::Shared(_)));
    let cps: Vec<ControlPlane> = (0..n).map(|_| ControlPlane::start(cfg.clone())).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while cps.iter().any(|cp| depth(cp) < a.depth) {
        assert!(Instant::now() < deadline, "the pool never filled");
        std::thread::sleep(Duration::from_millis(200));
    }
    let root = prealloc_e2e::envoy::workspace_root();
    let wrk = WrkOptions {
        script: root.join("bench/wrk/cycle.lua"),
        connections: (a.connections / n as u32).max(1),
        cpu: None,
        request: Some((
            "POST".into(),
            "/v1/registrations".into(),
            r#"{"resource_type":"mailbox"}"#.into(),
        )),
    };
    let seconds = Duration::from_secs(a.seconds);
    let results: Vec<procs::WrkResult> = std::thread::scope(|s| {
        let handles: Vec<_> = cps
            .iter()
            .map(|cp| {
                let (wrk, url) = (&wrk, cp.url());
                s.spawn(move || {
                    procs::run_wrk(wrk, &url, requests, seconds).unwrap_or_else(|e| panic!("{e}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let requests_done: u64 = results.iter().map(|r| r.requests).sum();
    let duration = results.iter().map(|r| r.duration_s).fold(0.0, f64::max);
    Outcome {
        rps: requests_done as f64 / duration,
        p50_ms: results.iter().map(|r| r.p50_us).max().unwrap_or(0) as f64 / 1000.0,
        p99_ms: results.iter().map(|r| r.p99_us).max().unwrap_or(0) as f64 / 1000.0,
        errors: results.iter().map(|r| r.errors).sum(),
    }
}

/// A sign-up on instance 0 until a long-poll held on instance 1 answers with
/// it, `samples` times, without other load: milliseconds, sorted.
fn propagation(a: &Args) -> Vec<f64> {
    let pg = Postgres::start().unwrap_or_else(|e| panic!("{e}"));
    let cfg = config(a, Some(&pg), true);
    let (one, two) = (ControlPlane::start(cfg.clone()), ControlPlane::start(cfg));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut out = Vec::with_capacity(a.samples);
    rt.block_on(async {
        while depth(&one) < 100 || depth(&two) < 100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for _ in 0..a.samples {
            let r = two.admin("GET", "/v1/routes?protocol=2", None).await.json();
            let (version, epoch) = (
                r["version"].as_u64().unwrap(),
                r["epoch"].as_str().unwrap().to_owned(),
            );
            let path = format!("/v1/routes?protocol=2&since={version}&epoch={epoch}&wait_ms=5000");
            let poll = two.admin("GET", &path, None);
            let signup = async {
                // Let the long-poll reach the other instance first.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let t = Instant::now();
                let r = one
                    .admin(
                        "POST",
                        "/v1/registrations",
                        Some(&serde_json::json!({"resource_type": "mailbox"})),
                    )
                    .await;
                assert_eq!(r.status, 201, "{}", r.text());
                (t, r.json()["consumer"].as_str().unwrap().to_owned())
            };
            let (answer, (sent, consumer)) = tokio::join!(poll, signup);
            let routed = Instant::now();
            let body = answer.json();
            assert!(
                body["upsert"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|e| e["consumer"] == consumer.as_str())),
                "the other instance's answer lacks the new consumer: {body}"
            );
            out.push(routed.duration_since(sent).as_secs_f64() * 1000.0);
        }
    });
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

fn main() {
    let a = args();
    let requests =
        std::env::temp_dir().join(format!("prealloc-instances-{}.txt", std::process::id()));
    std::fs::write(
        &requests,
        format!(
            "Authorization: Bearer {}\tContent-Type: application/json\n",
            config(&a, None, false).envoy_token
        ),
    )
    .expect("request file");
    let cases = [
        Case::Sqlite,
        Case::Postgres,
        Case::Shared(1),
        Case::Shared(2),
        Case::Shared(3),
    ];
    let mut all: Vec<(Case, Vec<Outcome>)> = cases.iter().map(|&c| (c, Vec::new())).collect();
    for rep in 0..a.reps {
        // Rotated, so no case always runs first.
        for k in 0..cases.len() {
            let case = cases[(k + rep) % cases.len()];
            let o = run_case(&a, case, &requests);
            eprintln!(
                "rep {} {}: {:.0} sign-ups/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                rep + 1,
                case.name(),
                o.rps,
                o.p50_ms,
                o.p99_ms,
                o.errors
            );
            if let Some((_, v)) = all.iter_mut().find(|(c, _)| *c == case) {
                v.push(o);
            }
        }
    }
    println!("| case | sign-ups/s, median (min–max) | p99 ms, median (min–max) | errors |");
    println!("|---|---|---|---|");
    for (case, v) in &all {
        let mut rps: Vec<f64> = v.iter().map(|o| o.rps).collect();
        let mut p99: Vec<f64> = v.iter().map(|o| o.p99_ms).collect();
        rps.sort_by(f64::total_cmp);
        p99.sort_by(f64::total_cmp);
        let errors: u64 = v.iter().map(|o| o.errors).sum();
        println!(
            "| {} | {:.0} ({:.0}–{:.0}) | {:.2} ({:.2}–{:.2}) | {errors} |",
            case.name(),
            pct(&rps, 0.5),
            rps[0],
            rps[rps.len() - 1],
            pct(&p99, 0.5),
            p99[0],
            p99[p99.len() - 1],
        );
    }
    let p = propagation(&a);
    println!(
        "\npropagation across instances ({} sign-ups on one, a long-poll held on the other): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        p.len(),
        pct(&p, 0.5),
        pct(&p, 0.9),
        pct(&p, 0.99),
        p.last().copied().unwrap_or(f64::NAN)
    );
    let _ = std::fs::remove_file(&requests);
}
