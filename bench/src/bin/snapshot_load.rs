//! A new Envoy receiving a big routing table from the real control plane
//! (BENCHMARKS.md, "A new Envoy and a 1M table"): fills a real control
//! plane's database with N consumers all in their replication window (half
//! registering on their first manager, half registered on all three), restarts
//! the binary on it, then starts fresh Envoys of both builds, alternately,
//! with Envoy's default buffer settings, and measures for each:
//! - start → the whole table applied (its poller reports the control plane's
//!   version and N entries);
//! - the main thread's stalls while the table is applied: `GET /ready` on the
//!   admin port, one after the other on one connection, timed. Envoy's own
//!   start-up stalls its main thread too (the wasm build: for hundreds of
//!   milliseconds, table or not), so for this figure the control plane is
//!   stopped (SIGSTOP) while a second Envoy starts, and let go (SIGCONT) once
//!   that Envoy has been ready for 2 s: the stalls counted are the table's;
//! - Envoy's RSS with the table, against an Envoy of the same build with an
//!   empty table (a second control plane): bytes per entry.
//!
//! `bench/snapshot-load.sh [--consumers N] [--reps R]` builds and runs it.

use prealloc_bench::db::{manager_ids, now_ms, Filler};
use prealloc_bench::probe::Probe;
use prealloc_bench::procs;
use prealloc_bench::stats::{median, quantile};
use prealloc_e2e::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec};
use prealloc_e2e::envoy::{Build, Endpoint, Envoy, EnvoyConfig, EnvoyOptions};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Writes `n` consumers signed up now: even ones registering on their first
/// manager, odd ones registered (on three managers).
fn fill(cp: &ControlPlane, n: u64) -> Duration {
    let start = Instant::now();
    let mut f = Filler::open(cp);
    let now = now_ms();
    for i in 0..n {
        f.sign_up(i, now, if i % 2 == 1 { 2 } else { 0 });
    }
    f.finish();
    start.elapsed()
}

fn control_plane(consumers: u64, page_entries: Option<u64>, managers: usize) -> ControlPlane {
    let specs = manager_ids(managers)
        .iter()
        .map(|id| ManagerSpec {
            capacity: vec![("mailbox".to_owned(), consumers + 1000)],
            ..ManagerSpec::new(id, "http://127.0.0.1:9")
        })
        .collect();
    let mut cfg = ControlPlaneConfig::new(specs);
    // Registered at three copies, however many managers there are.
    cfg.replication_target = Some(3);
    cfg.pools = vec![("mailbox".into(), "local".into(), 10)];
    // Everyone stays in the table for the whole run.
    cfg.grace_period_ms = 86_400_000;
    cfg.log_level = Some("warn".into());
    if let Some(p) = page_entries {
        cfg.extra_toml = format!("[push]\npage_entries = {p}\n");
    }
    ControlPlane::start(cfg)
}

fn version(cp: &ControlPlane) -> u64 {
    let (_, body) =
        prealloc_e2e::client::blocking_get(cp.addr(), "/healthz", Duration::from_secs(5))
            .expect("/healthz");
    serde_json::from_str::<serde_json::Value>(&body).expect("healthz JSON")["version"]
        .as_u64()
        .expect("version")
}

/// One poller stat from the admin port (`None` while it does not answer).
fn stat(admin: std::net::SocketAddr, name: &str) -> Option<u64> {
    let (status, body) = prealloc_e2e::client::blocking_get(
        admin,
        &format!("/stats?filter={name}"),
        Duration::from_secs(30),
    )
    .ok()?;
    (status == 200).then_some(())?;
    body.lines().find_map(|l| {
        l.split_once(": ")
            .filter(|(k, _)| k.ends_with(name))
            .and_then(|(_, v)| v.trim().parse().ok())
    })
}

struct Load {
    /// Start (or, paused, the control plane let go) → the table applied.
    applied: Duration,
    ready: Duration,
    /// `GET /ready` latencies (ms) from the admin port's first answer to the table applied.
    ready_ms: Vec<f64>,
    rss_kib: u64,
    cpu_ms: f64,
}

fn envoy_config(cp: &ControlPlane, build: Build, admin_port: u16) -> EnvoyConfig {
    let dead = Endpoint::new("127.0.0.1", 9);
    let mut cfg = EnvoyConfig::new(
        cp.config()
            .managers
            .iter()
            .map(|m| (m.id.clone(), dead.clone()))
            .collect(),
        dead.clone(),
        Endpoint::from(cp.addr()),
    );
    cfg.poller = json!({ "token": cp.config().envoy_token });
    cfg.admin_port = admin_port;
    cfg.build = build;
    cfg
}

/// Starts an Envoy of `build` against `cp` and waits for `entries` entries at
/// the control plane's version, timing `/ready` all along. `paused`: the
/// control plane is stopped until the Envoy has been ready for 2 s, and times
/// count from then.
fn load(
    cp: &ControlPlane,
    build: Build,
    entries: u64,
    writes_per_turn: Option<u64>,
    paused: bool,
) -> Load {
    let want = version(cp);
    let cp_pid = cp.pid().expect("control plane runs").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &cp_pid])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {cp_pid}");
    };
    let profiled = entries > 0 && !paused && std::env::var_os("BENCH_ENVOY_PROFILE").is_some();
    let admin_port = procs::free_port();
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(!paused));
    let t0 = Instant::now();
    let prober = {
        let (stop, counting) = (stop.clone(), counting.clone());
        std::thread::spawn(move || {
            let mut probe = Probe::new(admin);
            let mut samples = Vec::new();
            let mut first = None;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match probe.get_path("/ready", &[]) {
                    Ok(a) if a.status == 200 => {
                        first.get_or_insert_with(|| t0.elapsed());
                        if counting.load(Ordering::Relaxed) {
                            samples.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    _ => std::thread::sleep(Duration::from_millis(2)),
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (first, samples)
        })
    };
    let opts = EnvoyOptions {
        log_level: "warn".into(),
        ready_timeout: Duration::from_secs(120),
        // Envoy on a core of its own (snapshot-load.sh runs this driver, and
        // with it the control plane, on the other one).
        wrapper: wrapper(build, profiled),
        ..EnvoyOptions::default()
    };
    let mut ec = envoy_config(cp, build, admin_port);
    if let Some(w) = writes_per_turn {
        ec.poller["writes_per_turn"] = w.into();
    }
    if paused {
        signal("-STOP");
    }
    let envoy = Envoy::start(&ec, &opts);
    let mut t0 = t0;
    if paused {
        std::thread::sleep(Duration::from_secs(2));
        counting.store(true, Ordering::Relaxed);
        t0 = Instant::now();
        signal("-CONT");
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v = stat(admin, "prealloc_poller_version").unwrap_or(0);
        let n = stat(admin, "prealloc_poller_entries").unwrap_or(0);
        if v >= want && n == entries {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: table not applied: version {v} of {want}, {n} of {entries} entries; log: {}",
            build.name(),
            envoy.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let applied = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (ready, ready_ms) = prober.join().expect("prober");
    let pid = envoy.pid();
    if profiled {
        // The profiler writes its data when interrupted, not when killed.
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        std::thread::sleep(Duration::from_secs(5));
    }
    Load {
        applied,
        ready: ready.unwrap_or_default(),
        ready_ms,
        rss_kib: procs::rss_kib(pid),
        cpu_ms: procs::cpu_ns(pid) as f64 / 1e6,
    }
}

/// What Envoy runs under: `taskset` when `BENCH_ENVOY_CPU` names a core, and,
/// for the timed load only, `BENCH_ENVOY_PROFILE` (a command line, `{build}`
/// replaced by the build's name), e.g.
/// `BENCH_ENVOY_PROFILE="perf record -e cpu-clock -g -o /tmp/{build}.perf"`.
fn wrapper(build: Build, profiled: bool) -> Vec<String> {
    let mut w: Vec<String> = std::env::var("BENCH_ENVOY_CPU")
        .ok()
        .map(|c| vec!["taskset".to_owned(), "-c".to_owned(), c])
        .unwrap_or_default();
    if let Some(p) = std::env::var("BENCH_ENVOY_PROFILE")
        .ok()
        .filter(|_| profiled)
    {
        w.extend(
            p.replace("{build}", build.name())
                .split_whitespace()
                .map(str::to_owned),
        );
    }
    w
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn main() {
    let mut consumers = 1_000_000u64;
    let mut reps = 3usize;
    let mut page_entries = None;
    let mut writes_per_turn = None;
    let mut managers = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v: u64 = args
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{a} needs a number"));
        match a.as_str() {
            "--consumers" => consumers = v,
            "--reps" => reps = v as usize,
            "--page-entries" => page_entries = Some(v),
            "--writes-per-turn" => writes_per_turn = Some(v),
            "--managers" => managers = v as usize,
            _ => panic!("usage: snapshot_load [--consumers N] [--reps R] [--page-entries P] [--writes-per-turn W] [--managers M]"),
        }
    }
    let mut cp = control_plane(consumers, page_entries, managers);
    cp.kill9();
    let filled = fill(&cp, consumers);
    cp.set_start_timeout(Duration::from_secs(1800));
    let t = Instant::now();
    cp.restart();
    let restart = t.elapsed();
    let cp_rss = cp.pid().map(procs::rss_kib).unwrap_or(0);
    let empty = control_plane(0, page_entries, managers);
    let empty_rss = empty.pid().map(procs::rss_kib).unwrap_or(0);
    println!(
        "{consumers} consumers in the window written in {:.1} s; control plane restarted in {:.2} s, RSS {:.0} MiB (an empty one: {:.0} MiB): {:.0} bytes per consumer in the window",
        filled.as_secs_f64(),
        restart.as_secs_f64(),
        cp_rss as f64 / 1024.0,
        empty_rss as f64 / 1024.0,
        (cp_rss.saturating_sub(empty_rss) * 1024) as f64 / consumers as f64
    );
    println!(
        "{managers} managers, page_entries {}, writes_per_turn {}",
        page_entries.map_or("the control plane's default".to_owned(), |p| p.to_string()),
        writes_per_turn.map_or("the poller's default".to_owned(), |p| p.to_string())
    );
    println!("| rep | build | start → ready (ms) | start → table applied (ms) | Envoy CPU (ms) | RSS with table / empty (MiB) | bytes per entry | ready Envoy, table applied (ms) | `/ready` answers meanwhile | `/ready` p50 / p99 / max (ms) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for rep in 0..reps {
        let builds = if rep % 2 == 0 {
            [Build::Wasm, Build::Native]
        } else {
            [Build::Native, Build::Wasm]
        };
        for build in builds {
            let base = load(&empty, build, 0, writes_per_turn, false);
            let l = load(&cp, build, consumers, writes_per_turn, false);
            let p = load(&cp, build, consumers, writes_per_turn, true);
            println!(
                "| {} | {} | {:.0} | **{:.0}** | {:.0} | {:.0} / {:.0} | **{:.0}** | {:.0} | {} | {:.2} / {:.2} / **{:.1}** |",
                rep + 1,
                build.name(),
                l.ready.as_secs_f64() * 1e3,
                l.applied.as_secs_f64() * 1e3,
                l.cpu_ms,
                l.rss_kib as f64 / 1024.0,
                base.rss_kib as f64 / 1024.0,
                (l.rss_kib.saturating_sub(base.rss_kib) * 1024) as f64 / consumers as f64,
                p.applied.as_secs_f64() * 1e3,
                p.ready_ms.len(),
                median(&p.ready_ms),
                quantile(&sorted(&p.ready_ms), 0.99),
                p.ready_ms.iter().cloned().fold(0.0, f64::max),
            );
        }
    }
}
