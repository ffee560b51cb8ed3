//! A bounded soak on real parts: sign-ups, traffic and active replication
//! through one Envoy for a fixed time, with one fault of each kind on a
//! schedule, while the memory of Envoy and the control plane is sampled.
//!
//! `cargo xtask soak --minutes N` runs it (the `prealloc-soak` binary); the
//! e2e suite runs a 20-second version of the same code. It passes with every
//! fault run, zero violations, zero answers that are neither a manager's 200
//! nor a documented 503, and no acknowledged sign-up lost; memory is reported,
//! and on runs of a minute or more Envoy's growth from just after its restart
//! to the end (faults 3 to 7 included) is checked against a bound.

use crate::client::Client;
use crate::control_plane::Replication;
use crate::envoy::Build;
use crate::story::{consumer_cookie, post_signup, Stack, StackOptions, STEP_TIMEOUT};
use prealloc_wire::{Availability, ConsumerId};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Envoy may grow this much over the window after the last restart before the
/// soak calls it a leak (allocator and wasm heap warm-up stay well under it).
pub const ENVOY_GROWTH_BOUND: u64 = 16 << 20;

/// How to soak.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    pub build: Build,
    /// Concurrent clients, each signing up and sending requests.
    pub clients: usize,
    /// Each client signs up once per this period.
    pub signup_every: Duration,
}

impl SoakOptions {
    pub fn new(duration: Duration, build: Build) -> SoakOptions {
        SoakOptions {
            duration,
            build,
            clients: 8,
            signup_every: Duration::from_millis(400),
        }
    }
}

/// One memory sample.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Duration,
    /// Resident set sizes, bytes (0 while the process is down).
    pub envoy_rss: u64,
    pub control_plane_rss: u64,
    /// Consumers the control plane knows (`prealloc_consumers`).
    pub consumers: u64,
}

/// What a soak saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub build: String,
    pub duration: Duration,
    /// When each fault started, and what it was.
    pub faults: Vec<(Duration, String)>,
    /// Sign-ups answered with a cookie.
    pub signups: usize,
    /// Sign-ups answered without a cookie, by status (pool filling, control
    /// plane down, a failing or slow manager).
    pub signups_refused: BTreeMap<u16, usize>,
    /// Requests a manager answered 200.
    pub served: usize,
    /// Requests answered 503 + `Retry-After` (every replica down, or a pinned
    /// consumer's manager down): documented, not a failure.
    pub unavailable: usize,
    /// Connections refused or reset (Envoy being restarted).
    pub connection_errors: usize,
    /// Answers that are none of the above.
    pub bad: Vec<String>,
    /// Requests that reached a server without the consumer's data.
    pub violations: usize,
    /// Acknowledged sign-ups the control plane no longer knows.
    pub lost: Vec<String>,
    pub samples: Vec<Sample>,
    /// Start of the window after the last process restart, where memory must stay flat.
    pub window_start: Duration,
}

impl SoakReport {
    /// Median of `f` over the samples in `[from, to)`.
    fn median(&self, from: Duration, to: Duration, f: impl Fn(&Sample) -> u64) -> u64 {
        let mut v: Vec<u64> = self
            .samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .map(f)
            .filter(|&x| x > 0)
            .collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }

    /// `(at the start, at the end)` of the window, medians of its first and last tenth.
    pub fn window(&self, f: impl Fn(&Sample) -> u64 + Copy) -> (u64, u64) {
        let tenth =
            (self.duration.saturating_sub(self.window_start) / 10).max(Duration::from_secs(1));
        let first = self.median(self.window_start, self.window_start + tenth, f);
        let last = self.median(
            self.duration.saturating_sub(tenth),
            self.duration + tenth,
            f,
        );
        (first, last)
    }

    pub fn envoy_growth(&self) -> i64 {
        let (a, b) = self.window(|s| s.envoy_rss);
        b as i64 - a as i64
    }

    /// Whether Envoy's memory stayed flat; judged on runs of a minute or
    /// more (a shorter window holds too few samples to tell).
    pub fn memory_flat(&self) -> bool {
        self.duration < Duration::from_secs(60) || self.envoy_growth() < ENVOY_GROWTH_BOUND as i64
    }

    /// Whether the soak held: every fault ran, zero violations, no bad answer,
    /// nothing lost, Envoy's memory flat.
    pub fn passed(&self) -> bool {
        self.faults.len() == SCHEDULE.len()
            && self.violations == 0
            && self.bad.is_empty()
            && self.lost.is_empty()
            && self.memory_flat()
    }

    /// The figures, one per line.
    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let (e0, e1) = self.window(|s| s.envoy_rss);
        let (c0, c1) = self.window(|s| s.control_plane_rss);
        let (n0, n1) = self.window(|s| s.consumers);
        let per_consumer = if n1 > n0 {
            format!(
                "{:.0} B per consumer added",
                (c1 as f64 - c0 as f64) / (n1 - n0) as f64
            )
        } else {
            "no consumer added".to_owned()
        };
        let mut out = format!(
            "soak ({}, {:?}): {} sign-ups with a cookie, refused {:?}; {} requests served, \
             {} answered 503 + Retry-After, {} connection errors while Envoy restarted\n",
            self.build,
            self.duration,
            self.signups,
            self.signups_refused,
            self.served,
            self.unavailable,
            self.connection_errors
        );
        for (at, f) in &self.faults {
            out.push_str(&format!("  fault at {:>6.1}s: {f}\n", at.as_secs_f64()));
        }
        out.push_str(&format!(
            "  memory from {:.1}s to the end: Envoy {:.1} → {:.1} MiB ({:+.1} MiB, bound {} MiB); \
             control plane {:.1} → {:.1} MiB with {n0} → {n1} consumers ({per_consumer})\n",
            self.window_start.as_secs_f64(),
            mib(e0),
            mib(e1),
            (e1 as f64 - e0 as f64) / (1 << 20) as f64,
            ENVOY_GROWTH_BOUND >> 20,
            mib(c0),
            mib(c1),
        ));
        out.push_str(&format!(
            "  violations: {}, bad answers: {}, acknowledged sign-ups lost: {} → {}",
            self.violations,
            self.bad.len(),
            self.lost.len(),
            if self.passed() { "PASSED" } else { "FAILED" }
        ));
        for b in self.bad.iter().take(5) {
            out.push_str(&format!("\n  bad: {b}"));
        }
        for l in self.lost.iter().take(5) {
            out.push_str(&format!("\n  lost: {l}"));
        }
        out
    }
}

/// Resident set size of a process, bytes (0 if it is gone).
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[derive(Default)]
struct Tally {
    acked: Vec<ConsumerId>,
    refused: BTreeMap<u16, usize>,
    served: usize,
    unavailable: usize,
    connection_errors: usize,
    bad: Vec<String>,
}

/// One client: a sign-up every `every`, and requests on its latest cookies in between.
async fn client(
    envoy: SocketAddr,
    every: Duration,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
) {
    let mut c = Client::new(envoy);
    let mut cookies: Vec<String> = Vec::new();
    let mut next_signup = Instant::now();
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_signup {
            next_signup += every;
            match post_signup(&mut c).await {
                Ok(r) => match consumer_cookie(&r) {
                    Ok(Some((value, claims))) if r.status < 300 => {
                        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                        t.acked.push(claims.consumer);
                        cookies.push(format!("prealloc={value}"));
                        if cookies.len() > 8 {
                            cookies.remove(0);
                        }
                    }
                    Ok(None) if r.status >= 400 => {
                        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                        *t.refused.entry(r.status).or_default() += 1;
                    }
                    other => {
                        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                        t.bad.push(format!(
                            "sign-up {} {:?}: {}",
                            r.status,
                            other.err(),
                            r.text()
                        ));
                    }
                },
                Err(_) => {
                    tally
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .connection_errors += 1;
                    c = Client::new(envoy);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if let Some(cookie) = cookies.get(turn % cookies.len().max(1)) {
            turn += 1;
            let r = c.send("GET", "/inbox", &[("cookie", cookie)], b"").await;
            let reconnect = r.is_err();
            {
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok(r) if r.status == 200 && r.served_by().is_some_and(|s| s != "default") => {
                        t.served += 1
                    }
                    Ok(r) if r.status == 503 && r.header("retry-after").is_some() => {
                        t.unavailable += 1
                    }
                    Ok(r) => t.bad.push(format!(
                        "GET {} by {:?}: {}",
                        r.status,
                        r.served_by(),
                        r.text()
                    )),
                    Err(_) => t.connection_errors += 1,
                }
            }
            if reconnect {
                c = Client::new(envoy);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The fault schedule: (fraction of the duration, fault). Process restarts come first, so the
/// rest of the run is a window where memory must stay flat.
const SCHEDULE: &[(f64, &str)] = &[
    (0.10, "kill -9 the control plane, restart it"),
    (0.20, "restart Envoy"),
    (0.30, "m2 down, then available"),
    (0.40, "m3 draining, then available"),
    (0.50, "m1 slow on sign-ups"),
    (0.60, "m2 failing sign-ups (500)"),
    (0.70, "m3 refusing copies (active replication retries)"),
];

/// Runs the soak; `say` narrates (one line per event).
///
/// Needs a multi-thread runtime: restarts block the thread that runs this.
pub async fn run(opts: &SoakOptions, say: &mut dyn FnMut(&str)) -> SoakReport {
    let mut so = StackOptions::new(Replication::Active).with_build(opts.build);
    // Registered consumers leave the table after 2 s: Envoy's table stays small.
    so.grace_period_ms = 2000;
    so.pool_depth = 50;
    // Room for every sign-up of a long soak (the test default of 1000 per
    // manager would run out after about 3000).
    so.manager_capacity = 10_000_000;
    let mut stack = Stack::start(&so);
    let envoy_addr = stack.envoys[0].addr();
    // The pool has filled once one sign-up goes through.
    stack
        .sign_up(&mut Client::new(envoy_addr), STEP_TIMEOUT)
        .await
        .expect("a first sign-up");
    say(&format!(
        "soak: {} for {:?}, {} clients, a sign-up each every {:?}",
        opts.build.name(),
        opts.duration,
        opts.clients,
        opts.signup_every
    ));

    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..opts.clients)
        .map(|_| {
            tokio::spawn(client(
                envoy_addr,
                opts.signup_every,
                tally.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let t0 = Instant::now();
    let hold = (opts.duration / 20).min(Duration::from_secs(3));
    let mut report = SoakReport {
        build: opts.build.name().to_owned(),
        duration: opts.duration,
        ..SoakReport::default()
    };
    let mut next_fault = 0;
    let mut next_sample = Duration::ZERO;
    let sample = |stack: &Stack, report: &mut SoakReport| {
        let consumers =
            crate::client::blocking_get(stack.cp.addr(), "/metrics", Duration::from_secs(2))
                .ok()
                .and_then(|(_, body)| {
                    body.lines()
                        .find_map(|l| l.strip_prefix("prealloc_consumers "))
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
                .unwrap_or(0.0) as u64;
        report.samples.push(Sample {
            at: t0.elapsed(),
            envoy_rss: rss(stack.envoys[0].pid()),
            control_plane_rss: stack.cp.pid().map_or(0, rss),
            consumers,
        });
    };
    while t0.elapsed() < opts.duration {
        if t0.elapsed() >= next_sample {
            sample(&stack, &mut report);
            next_sample += Duration::from_secs(1);
        }
        if let Some(&(at, what)) = SCHEDULE.get(next_fault) {
            if t0.elapsed() >= opts.duration.mul_f64(at) {
                next_fault += 1;
                report.faults.push((t0.elapsed(), what.to_owned()));
                say(&format!(
                    "soak: {:>6.1}s {what}",
                    t0.elapsed().as_secs_f64()
                ));
                fault(&mut stack, next_fault, hold).await;
                if next_fault <= 2 {
                    report.window_start = t0.elapsed() + Duration::from_secs(2);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    sample(&stack, &mut report);

    let t = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    report.signups = t.acked.len();
    report.signups_refused = t.refused;
    report.served = t.served;
    report.unavailable = t.unavailable;
    report.connection_errors = t.connection_errors;
    report.bad = t.bad;
    report.violations = stack.violations().len();
    let listed = stack
        .cp
        .admin("GET", "/v1/consumers?limit=10000000", None)
        .await
        .json();
    let known: BTreeSet<String> = listed
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["consumer"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    report.lost = t
        .acked
        .iter()
        .filter(|c| !known.contains(c.as_str()))
        .map(|c| c.to_string())
        .collect();
    report
}

/// Fault number `n` (1-based, as in [`SCHEDULE`]), undone after `hold`.
async fn fault(stack: &mut Stack, n: usize, hold: Duration) {
    match n {
        1 => {
            stack.cp.kill9();
            tokio::time::sleep(hold).await;
            stack.cp.restart();
        }
        2 => stack.restart_envoy(0),
        3 | 4 => {
            let (m, a) = if n == 3 {
                ("m2", Availability::Down)
            } else {
                ("m3", Availability::Draining)
            };
            stack.cp.set_availability(m, a).await;
            tokio::time::sleep(hold).await;
            stack.cp.set_availability(m, Availability::Available).await;
        }
        5 => {
            stack
                .manager("m1")
                .delay_signups(Duration::from_millis(800));
            tokio::time::sleep(hold).await;
            stack.manager("m1").delay_signups(Duration::ZERO);
        }
        6 => {
            stack.manager("m2").set_signup_status(500);
            tokio::time::sleep(hold).await;
            stack.manager("m2").set_signup_status(201);
        }
        7 => {
            stack.manager("m3").set_accept_copies(false);
            tokio::time::sleep(hold).await;
            stack.manager("m3").set_accept_copies(true);
        }
        _ => {}
    }
}
