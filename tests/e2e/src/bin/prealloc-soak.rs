//! `prealloc-soak`: the bounded soak (`prealloc_e2e::soak`) from the command line.
//!
//! `cargo xtask soak [--minutes N] [--build wasm|native]` builds everything and
//! runs this with `PREALLOC_ENVOY`, `PREALLOC_WASM`, `PREALLOC_NATIVE` and
//! `PREALLOC_CONTROL_PLANE` set. Exits 0 if the soak held, 1 otherwise.

use prealloc_e2e::envoy::Build;
use prealloc_e2e::soak::{run, SoakOptions};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "\
usage: prealloc-soak [--minutes N] [--seconds N] [--build wasm|native]

Runs sign-ups, traffic and active replication through one Envoy for N minutes
(default 5) with one fault of each kind (control plane kill -9, Envoy restart,
a manager down, draining, slow, failing, refusing copies), sampling Envoy's
and the control plane's memory every second. Prints the figures; exits 1 on a
violation, a bad answer, a lost sign-up, a fault that did not run, or (on runs
of a minute or more) Envoy memory growth over the bound.
";

fn parse() -> Result<SoakOptions, String> {
    let mut duration = Duration::from_secs(300);
    let mut build = Build::Wasm;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--minutes" => {
                let v = value("--minutes")?;
                let m: f64 = v
                    .parse()
                    .ok()
                    .filter(|m: &f64| m.is_finite() && *m > 0.0 && *m < 10_000.0)
                    .ok_or(format!("--minutes {v:?}: a positive number of minutes"))?;
                duration = Duration::from_secs_f64(m * 60.0);
            }
            "--seconds" => {
                let v = value("--seconds")?;
                duration = Duration::from_secs(
                    v.parse()
                        .map_err(|_| format!("--seconds {v:?}: not a number"))?,
                );
            }
            "--build" => build = value("--build")?.parse()?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if duration < Duration::from_secs(10) {
        return Err("a soak needs at least 10 seconds".into());
    }
    Ok(SoakOptions::new(duration, build))
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("prealloc-soak: {e}\n");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = rt.block_on(run(&opts, &mut |line| println!("{line}")));
    println!("{}", report.summary());
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
