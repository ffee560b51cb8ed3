//! The prealloc demo: control plane, three managers and real Envoy on loopback, the story narrated, then curl at will.
//!
//! `cargo xtask demo [--once] [--build native]` builds everything and runs this with
//! `PREALLOC_ENVOY`, `PREALLOC_WASM`, `PREALLOC_NATIVE` and `PREALLOC_CONTROL_PLANE` set.

use prealloc_e2e::control_plane::Replication;
use prealloc_e2e::envoy::Build;
use prealloc_e2e::manager::RequestKind;
use prealloc_e2e::story::{run_story, Stack, StackOptions, StoryOptions, SIGNUP_PATH};
use std::net::TcpListener;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: prealloc-demo [--once] [--build wasm|native] [--port N] [--mode active|reported]

Starts the prealloc control plane (fresh SQLite database), three managers
(m1, m2, m3) and Envoy 1.40 with the prealloc filter, all on 127.0.0.1, and
runs the story of one consumer: sign-up, pinned requests, replication,
round-robin, cookie upgrade, the routing-table entry expiring.

  --once         run the story, then exit (0 if every step held, 1 otherwise)
  --build B      the data plane Envoy runs: wasm (prealloc_filter.wasm, default)
                 or native (the dynamic module libprealloc_native.so)
  --port N       Envoy's listener port (default 10000; a free port if 10000 is
                 taken and --port was not given)
  --mode M       replication mode: active (the control plane copies the data,
                 default) or reported (the demo reports each copy)

Binaries: PREALLOC_ENVOY, PREALLOC_WASM, PREALLOC_NATIVE, PREALLOC_CONTROL_PLANE
(cargo xtask demo sets them).
";

const DEFAULT_PORT: u16 = 10000;
/// The control plane's port and tokens of control-plane/examples/prealloc.toml, so its README's curl examples work.
const CONTROL_PLANE_PORT: u16 = 7070;
const ENVOY_TOKEN: &str = "envoy-demo-token-change-me";
const ADMIN_TOKEN: &str = "admin-demo-token-change-me";
/// Registered consumers stay this long in the routing table (short, so the story shows them leaving).
const GRACE_MS: u64 = 3000;

struct Args {
    once: bool,
    port: Option<u16>,
    mode: Replication,
    build: Build,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        once: false,
        port: None,
        mode: Replication::Active,
        build: Build::Wasm,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--once" => a.once = true,
            "--port" => {
                let v = it.next().ok_or("--port needs a number")?;
                a.port = Some(
                    v.parse()
                        .map_err(|_| format!("--port {v:?}: expected a port number"))?,
                );
            }
            "--build" => {
                let v = it.next().ok_or("--build needs wasm or native")?;
                a.build = v.parse().map_err(|e| format!("--build: {e}"))?;
            }
            "--mode" => match it.next().as_deref() {
                Some("active") => a.mode = Replication::Active,
                Some("reported") => a.mode = Replication::Reported,
                other => return Err(format!("--mode {other:?}: expected active or reported")),
            },
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(a)
}

/// The listener port: the asked or default one if free; the default falls back to a free port.
fn choose_port(asked: Option<u16>) -> Result<u16, String> {
    let port = asked.unwrap_or(DEFAULT_PORT);
    match TcpListener::bind(("127.0.0.1", port)) {
        // Released right away for Envoy to bind.
        Ok(_) => Ok(port),
        Err(e) if asked.is_some() => Err(format!(
            "cannot listen on 127.0.0.1:{port} ({e}); choose another with --port"
        )),
        Err(e) => {
            println!("port {port} is not free ({e}); Envoy takes a free port instead");
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("prealloc-demo: {e}");
            return ExitCode::from(2);
        }
    };
    // Launchers panic with a message saying what is missing; show just that message,
    // and let the unwinding drop (stop) every child started so far.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        eprintln!("prealloc-demo failed: {msg}");
    }));
    match std::panic::catch_unwind(|| run(args)) {
        Ok(code) => code,
        Err(_) => ExitCode::FAILURE,
    }
}

fn run(args: Args) -> ExitCode {
    let port = match choose_port(args.port) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("prealloc-demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let t0 = Instant::now();
    println!(
        "prealloc demo: starting the control plane, 3 managers and Envoy ({} build) on 127.0.0.1 ...",
        args.build.name()
    );
    let mut opts = StackOptions::new(args.mode).with_build(args.build);
    opts.grace_period_ms = GRACE_MS;
    opts.listen_port = port;
    opts.tokens = (ENVOY_TOKEN.to_owned(), ADMIN_TOKEN.to_owned());
    opts.control_plane_port = match (
        args.port,
        TcpListener::bind(("127.0.0.1", CONTROL_PLANE_PORT)),
    ) {
        // --port 0 (as in tests): no fixed ports at all.
        (Some(0), _) | (_, Err(_)) => 0,
        (_, Ok(_)) => CONTROL_PLANE_PORT,
    };
    let mut stack = Stack::start(&opts);
    let envoy = stack.envoys[0].addr();
    println!(
        "  Envoy          http://{envoy}  (admin http://{})",
        stack.envoys[0].admin_addr()
    );
    println!(
        "  control plane  {}  (replication {}, grace period {GRACE_MS} ms)",
        stack.cp.url(),
        match args.mode {
            Replication::Active => "active",
            Replication::Reported => "reported",
        }
    );
    for m in &stack.managers {
        println!(
            "  manager {}     {}  (Envoy cluster manager_{})",
            m.name(),
            m.url(),
            m.name()
        );
    }
    println!(
        "  default        {}  (anonymous requests)",
        stack.default.url()
    );
    println!(
        "  logs           {}",
        stack.envoys[0].dir().join("envoy.log").display()
    );
    println!("                 {}", stack.cp.log_path().display());
    println!("ready in {:.1?}\n", t0.elapsed());

    let t1 = Instant::now();
    let story = rt.block_on(run_story(&stack, &StoryOptions::default(), &mut |line| {
        println!("[{:>5.2}s] {line}", t1.elapsed().as_secs_f64())
    }));
    let report = match story {
        Ok(r) => r,
        Err(e) => {
            eprintln!("\nprealloc-demo: the story failed: {e}");
            stack.envoys[0].keep_files_on_drop();
            stack.cp.keep_files_on_drop();
            eprintln!(
                "logs kept in {} and {}",
                stack.envoys[0].dir().display(),
                stack.cp.dir().display()
            );
            return ExitCode::FAILURE;
        }
    };
    println!("\nthe story held: every step checked, 0 requests reached a manager without the consumer's data.");
    if args.once {
        return ExitCode::SUCCESS;
    }

    let jar = std::env::temp_dir().join(format!("prealloc-demo-{}.cookies", std::process::id()));
    let jar = jar.display();
    let admin = &stack.cp.config().admin_token;
    let cp = stack.cp.url();
    println!(
        "
Try it (every request the managers see is printed below):

  # sign up: the filter registers you with the control plane, the first manager
  # answers, and the response sets your cookie
  curl -si -c {jar} -X POST http://{envoy}{SIGNUP_PATH}

  # your requests: pinned to the first manager until the copies land, then
  # round-robin (see \"manager\" in the answer)
  curl -s -b {jar} -c {jar} http://{envoy}/inbox

  # without a cookie: the default backend
  curl -s http://{envoy}/inbox

  # the control plane: you, the pools, the managers
  curl -s -H 'authorization: Bearer {admin}' '{cp}/v1/consumers?limit=10'
  curl -s -H 'authorization: Bearer {admin}' {cp}/v1/pools
  curl -s -H 'authorization: Bearer {admin}' -X PUT '{cp}/v1/managers/m3/availability' -d '{{\"availability\":\"down\"}}'

  # what Envoy counted
  curl -s 'http://{}/stats?filter=prealloc'

The story's consumer {} still works with its registered cookie:
  curl -s -H 'cookie: {}' http://{envoy}/inbox

Stop with Ctrl-C (stops Envoy, the control plane and the managers).
",
        stack.envoys[0].admin_addr(),
        report.signed_up.consumer,
        report.registered_cookie,
    );
    rt.block_on(watch(&stack));
    println!("\nstopping Envoy, the control plane and the managers ...");
    drop(stack);
    let _ = std::fs::remove_file(jar.to_string());
    println!("stopped.");
    ExitCode::SUCCESS
}

/// Prints every request the managers and the default backend receive, until Ctrl-C.
async fn watch(stack: &Stack) {
    let mut seen: Vec<usize> = stack.servers().map(|s| s.requests().len()).collect();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        // On Ctrl-C, print what arrived since the last round, then stop.
        let stop = tokio::select! {
            _ = &mut ctrl_c => true,
            _ = tokio::time::sleep(Duration::from_millis(100)) => false,
        };
        // New requests of every server, merged in arrival order.
        let mut fresh = Vec::new();
        for (i, s) in stack.servers().enumerate() {
            let reqs = s.requests();
            fresh.extend(reqs[seen[i]..].iter().cloned());
            seen[i] = reqs.len();
        }
        fresh.sort_by_key(|r| r.at);
        for r in &fresh {
            let who = r.consumer.as_deref().unwrap_or("-");
            let what = match r.kind {
                RequestKind::SignUp => format!(
                    "sign-up of {who} (resource {})",
                    r.header("x-prealloc-resource").unwrap_or("?")
                ),
                RequestKind::Consumer if r.held => format!("{} {} of {who}", r.method, r.path),
                RequestKind::Consumer => {
                    format!("{} {} of {who}: VIOLATION, no data here", r.method, r.path)
                }
                RequestKind::Anonymous => format!("{} {} (anonymous)", r.method, r.path),
                RequestKind::Replication if r.method == "GET" => {
                    format!("control plane reads {who}'s data to copy it")
                }
                RequestKind::Replication => format!("control plane copies {who}'s data here"),
                RequestKind::Provisioning | RequestKind::UnknownApi => {
                    format!("{} {}", r.method, r.path)
                }
            };
            println!("{:<7} <- {what} -> {}", r.manager, r.status);
        }
        if stop {
            return;
        }
    }
}
