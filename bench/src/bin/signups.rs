//! Durable sign-ups against the real control plane, driven from outside by
//! wrk (`POST /v1/registrations`, 64 connections), in rounds until N
//! consumers are registered, with a stall probe beside it (BENCHMARKS.md,
//! "Sign-ups from 0 to N consumers").
//!
//! Per round: sign-ups/s and wrk's latency percentiles, the consumers reached,
//! and the longest time the control plane took to answer `GET /healthz`
//! (polled back to back on its own connection): a stall anywhere in the
//! process shows there. With `--stacks`, every stall over 100 ms also gets
//! the control plane's thread stacks from gdb (`target/signup-stalls/`), taken
//! while the stall is still going on.
//!
//! With `--prefill P`, P consumers signed up and replicated a day ago are
//! written into the database first (settled: in the database, not in
//! memory), the control plane is restarted on it (restart time and RSS are
//! printed), and the rounds run from there until P + N.
//!
//! With `--store postgres`, the control plane keeps its state in a throwaway
//! PostgreSQL server (`prealloc_e2e::postgres`, fsync on, same disk) instead
//! of a SQLite file; `bench/signups-stores.sh` runs both, interleaved.
//!
//! `bench/signups.sh [--consumers N] [--prefill P] [--round S] [--connections C] [--depth D] [--store sqlite|postgres] [--stacks]`

use prealloc_bench::probe::Probe;
use prealloc_bench::procs::{self, WrkOptions};
use prealloc_e2e::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec, Replication};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    consumers: u64,
    round: Duration,
    connections: u32,
    depth: u64,
    /// Managers `m1..mN`, each able to hold every consumer.
    managers: usize,
    /// Settled consumers written into the database before the rounds.
    prefill: u64,
    stacks: bool,
    postgres: bool,
}

fn args() -> Args {
    let mut a = Args {
        consumers: 1_000_000,
        round: Duration::from_secs(10),
        connections: 64,
        depth: 50_000,
        managers: 3,
        prefill: 0,
        stacks: false,
        postgres: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--stacks" {
            a.stacks = true;
            continue;
        }
        if flag == "--store" {
            a.postgres = match it.next().as_deref() {
                Some("sqlite") => false,
                Some("postgres") => true,
                other => panic!("--store {other:?}: expected sqlite or postgres"),
            };
            continue;
        }
        let v: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--consumers" => a.consumers = v,
            "--round" => a.round = Duration::from_secs(v),
            "--connections" => a.connections = v as u32,
            "--depth" => a.depth = v,
            "--managers" => a.managers = v as usize,
            "--prefill" => a.prefill = v,
            _ => panic!("usage: signups [--consumers N] [--prefill P] [--round S] [--connections C] [--depth D] [--managers M] [--stacks]"),
        }
    }
    a
}

/// A metric's value in the control plane's `/metrics` (first sample).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Polls `/healthz` back to back; keeps the longest answer since the last
/// `take`, and, with `stacks`, dumps the process's threads during a stall.
struct StallProbe {
    longest_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl StallProbe {
    fn start(cp: &ControlPlane, stacks: Option<PathBuf>) -> StallProbe {
        let longest_us = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // When the outstanding probe was sent (µs since `epoch`), 0 when none.
        let epoch = Instant::now();
        let sent_us = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let addr = cp.addr();
        {
            let (longest, stop, sent) = (longest_us.clone(), stop.clone(), sent_us.clone());
            threads.push(std::thread::spawn(move || {
                let mut p = Probe::new(addr);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    sent.store(epoch.elapsed().as_micros() as u64 + 1, Ordering::Relaxed);
                    let _ = p.get_path("/healthz", &[]);
                    sent.store(0, Ordering::Relaxed);
                    longest.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }));
        }
        if let (Some(dir), Some(pid)) = (stacks, cp.pid()) {
            let (stop, sent) = (stop.clone(), sent_us.clone());
            let dumped = Mutex::new(0u64);
            threads.push(std::thread::spawn(move || {
                let _ = std::fs::create_dir_all(&dir);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                    let s = sent.load(Ordering::Relaxed);
                    let now = epoch.elapsed().as_micros() as u64;
                    let mut last = dumped.lock().unwrap();
                    if s == 0 || now - s < 100_000 || *last == s {
                        continue;
                    }
                    *last = s;
                    let out = std::process::Command::new("gdb")
                        .args([
                            "-p",
                            &pid.to_string(),
                            "-batch",
                            "-ex",
                            "thread apply all bt 25",
                        ])
                        .output();
                    if let Ok(o) = out {
                        let f = dir.join(format!("stall-{:.1}s.txt", s as f64 / 1e6));
                        let _ = std::fs::write(&f, &o.stdout);
                        eprintln!("  stacks of a stall in {}", f.display());
                    }
                }
            }));
        }
        StallProbe {
            longest_us,
            stop,
            threads,
        }
    }

    fn take(&self) -> u64 {
        self.longest_us.swap(0, Ordering::Relaxed)
    }
}

impl Drop for StallProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn main() {
    let a = args();
    let root = prealloc_e2e::envoy::workspace_root();
    let managers = prealloc_bench::db::manager_ids(a.managers)
        .iter()
        .map(|id| ManagerSpec {
            capacity: vec![(
                "mailbox".to_owned(),
                a.prefill + a.consumers + a.depth + 100_000,
            )],
            ..ManagerSpec::new(id, "http://127.0.0.1:9")
        })
        .collect();
    let mut cfg = ControlPlaneConfig::new(managers);
    // Reported mode and nothing reported: every consumer stays registering,
    // so it stays in the routing table: the table grows to N with the database.
    cfg.replication = Replication::Reported;
    cfg.pools = vec![("mailbox".into(), "local".into(), a.depth)];
    // wrk never confirms: keep the registrations (leases) for the whole run.
    cfg.registration_lease_ms = Some(86_400_000);
    cfg.log_level = Some("warn".into());
    assert!(
        !(a.postgres && a.prefill > 0),
        "--prefill writes a SQLite file: not with --store postgres"
    );
    let postgres = a
        .postgres
        .then(|| prealloc_e2e::postgres::Postgres::start().unwrap_or_else(|e| panic!("{e}")));
    cfg.postgres_url = postgres.as_ref().map(|pg| pg.url());
    eprintln!(
        "store: {}",
        cfg.postgres_url
            .as_deref()
            .unwrap_or("sqlite (a temp file)")
    );
    let mut cp = ControlPlane::start(cfg);
    if a.prefill > 0 {
        cp.kill9();
        let t = Instant::now();
        let mut f = prealloc_bench::db::Filler::open(&cp);
        let long_ago = prealloc_bench::db::now_ms() - 86_400_000;
        // A copy on every manager: registered (the target is "all"), so settled.
        for i in 0..a.prefill {
            f.sign_up(i, long_ago + i / 100, a.managers - 1);
        }
        f.finish();
        let filled = t.elapsed();
        cp.set_start_timeout(Duration::from_secs(1800));
        let t = Instant::now();
        cp.restart();
        eprintln!(
            "{} settled consumers written in {:.1} s; control plane restarted in {:.2} s, RSS {} MiB",
            a.prefill,
            filled.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            cp.pid().map(procs::rss_kib).unwrap_or(0) / 1024
        );
    }
    let target = a.prefill + a.consumers;
    let metrics = || {
        let mut p = Probe::new(cp.addr());
        p.get_path("/metrics", &[])
            .map(|r| r.body)
            .unwrap_or_default()
    };
    let wait_depth = |want: f64| {
        let deadline = Instant::now() + Duration::from_secs(600);
        while metric(&metrics(), "prealloc_pool_depth").unwrap_or(0.0) < want {
            assert!(Instant::now() < deadline, "the pool never filled");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let t = Instant::now();
    wait_depth(a.depth as f64);
    eprintln!(
        "pool filled to {} in {:.1} s",
        a.depth,
        t.elapsed().as_secs_f64()
    );

    let requests =
        std::env::temp_dir().join(format!("prealloc-signups-{}.txt", std::process::id()));
    std::fs::write(
        &requests,
        format!(
            "Authorization: Bearer {}\tContent-Type: application/json\n",
            cp.config().envoy_token
        ),
    )
    .expect("request file");
    let wrk = WrkOptions {
        script: root.join("bench/wrk/cycle.lua"),
        connections: a.connections,
        cpu: None,
        request: Some((
            "POST".into(),
            "/v1/registrations".into(),
            r#"{"resource_type":"mailbox"}"#.into(),
        )),
    };
    let probe = StallProbe::start(&cp, a.stacks.then(|| root.join("target/signup-stalls")));
    let url = cp.url();
    println!("| consumers after round | sign-ups/s | p50 / p99 / max (ms) | errors | longest /healthz (ms) | control plane RSS (MiB) |");
    println!("|---|---|---|---|---|---|");
    let mut total = (0u64, 0f64, 0u64, 0u64);
    loop {
        let r = procs::run_wrk(&wrk, &url, &requests, a.round).unwrap_or_else(|e| panic!("{e}"));
        let m = metrics();
        let consumers = metric(&m, "prealloc_consumers").unwrap_or(0.0) as u64;
        let rss = cp.pid().map(procs::rss_kib).unwrap_or(0);
        println!(
            "| {consumers} | {:.0} | {:.2} / {:.2} / {:.1} | {} | {:.1} | {} |",
            r.rps(),
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.max_us as f64 / 1000.0,
            r.errors,
            probe.take() as f64 / 1000.0,
            rss / 1024
        );
        total = (
            total.0 + r.requests,
            total.1 + r.duration_s,
            total.2.max(r.p99_us),
            total.3 + r.errors,
        );
        if consumers >= target {
            break;
        }
        // Let pre-allocation catch up if the pool ran low during the round.
        wait_depth((a.depth / 2) as f64);
    }
    println!(
        "\n{} sign-ups in {:.1} s of load: {:.0}/s; worst round p99 {:.2} ms; {} errors",
        total.0,
        total.1,
        total.0 as f64 / total.1,
        total.2 as f64 / 1000.0,
        total.3
    );
    let _ = std::fs::remove_file(&requests);
}
