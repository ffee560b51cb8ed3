//! The status page with many consumers in the database (BENCHMARKS.md,
//! "Status page"): fills a real control plane's SQLite database with N
//! consumers through the control plane's own registry (the same ops a sign-up
//! writes, committed in large batches: far faster than N HTTP sign-ups),
//! restarts the real binary on it, then measures in headless Chromium how long
//! `/status` takes to load and show its data, and how many bytes it moves;
//! also `GET /status/data` alone over HTTP.
//!
//! `bench/status-page.sh [--consumers N] [--reps R]` builds and runs it.

use prealloc_bench::db::{manager_ids, now_ms, Filler};
use prealloc_bench::stats::{median, min_max};
use prealloc_e2e::browser::Browser;
use prealloc_e2e::client::Client;
use prealloc_e2e::control_plane::{ControlPlane, ControlPlaneConfig, ManagerSpec};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Consumers signed up "now" (in their replication window); the rest long ago.
const RECENT: u64 = 1000;

fn range(v: &[f64]) -> String {
    let (lo, hi) = min_max(v);
    format!("{lo:.1}–{hi:.1}")
}

/// Writes `n` consumers: all but the last [`RECENT`] signed up and fully
/// replicated a day ago (out of the table), the last ones now, half of them
/// still registering. Returns how long it took.
fn fill(cp: &ControlPlane, n: u64) -> Duration {
    let start = Instant::now();
    let mut f = Filler::open(cp);
    let now = now_ms();
    let long_ago = now - 86_400_000;
    for i in 0..n {
        let recent = i >= n.saturating_sub(RECENT);
        let t = if recent { now } else { long_ago + i / 100 };
        f.sign_up(i, t, if recent && i % 2 == 0 { 1 } else { 2 });
    }
    f.finish();
    start.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut consumers = 1_000_000u64;
    let mut reps = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v: u64 = args
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{a} needs a number"));
        match a.as_str() {
            "--consumers" => consumers = v,
            "--reps" => reps = v as usize,
            _ => panic!("usage: status_page [--consumers N] [--reps R]"),
        }
    }
    let managers = manager_ids(3)
        .iter()
        .map(|id| ManagerSpec {
            capacity: vec![("mailbox".to_owned(), consumers + 1000)],
            ..ManagerSpec::new(id, "http://127.0.0.1:9")
        })
        .collect();
    let mut cfg = ControlPlaneConfig::new(managers);
    cfg.pools = vec![("mailbox".into(), "local".into(), 10)];
    cfg.grace_period_ms = 3_600_000;
    cfg.log_level = Some("warn".into());
    let mut cp = ControlPlane::start(cfg);
    cp.kill9();
    let filled = fill(&cp, consumers);
    let db_bytes = std::fs::metadata(cp.database_path())
        .map(|m| m.len())
        .unwrap_or(0);
    cp.set_start_timeout(Duration::from_secs(1800));
    let t = Instant::now();
    cp.restart();
    let restart = t.elapsed();
    let rss = cp.pid().map(prealloc_bench::procs::rss_kib).unwrap_or(0);
    println!(
        "{consumers} consumers written in {:.1} s (database {:.0} MiB); control plane restarted in {:.2} s, RSS {:.0} MiB",
        filled.as_secs_f64(),
        db_bytes as f64 / 1048576.0,
        restart.as_secs_f64(),
        rss as f64 / 1024.0
    );

    // The page in Chromium: sign in once, then load it `reps` times.
    let browser = Browser::start().unwrap_or_else(|e| panic!("{e}"));
    let mut page = browser.page().await.unwrap_or_else(|e| panic!("{e}"));
    let url = format!("{}/status", cp.url());
    page.navigate(&url).await.unwrap();
    page.type_into("#token", &cp.config().admin_token)
        .await
        .unwrap();
    page.forget_events();
    page.click("button[type=submit]").await.unwrap();
    page.wait_event("Page.loadEventFired").await.unwrap();
    let (mut load, mut shown, mut bytes, mut data_ms) = (vec![], vec![], vec![], vec![]);
    let mut shown_consumers = String::new();
    for _ in 0..reps {
        page.navigate(&url).await.unwrap();
        // The page marks when it first rendered its data (status.html).
        let at = page
            .wait_for(
                "performance.getEntriesByName('status-data-shown')[0]?.startTime",
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        shown.push(at.as_f64().unwrap_or(0.0));
        shown_consumers = page
            .eval("document.querySelector('#consumers').innerText")
            .await
            .unwrap()
            .as_str()
            .unwrap_or("")
            .to_owned();
        let m: Value = page
            .eval(
                "(() => { const n = performance.getEntriesByType('navigation')[0]; \
                 const d = performance.getEntriesByType('resource').filter(r => r.name.includes('/status/data'))[0]; \
                 return { load: n.loadEventEnd, page: n.transferSize, data: d ? d.transferSize : 0, data_ms: d ? d.duration : 0 }; })()",
            )
            .await
            .unwrap();
        load.push(m["load"].as_f64().unwrap_or(0.0));
        bytes.push(m["page"].as_f64().unwrap_or(0.0) + m["data"].as_f64().unwrap_or(0.0));
        data_ms.push(m["data_ms"].as_f64().unwrap_or(0.0));
    }

    // GET /status/data alone, on one keep-alive connection.
    let session = {
        let form = format!("token={}", cp.config().admin_token);
        let r = Client::new(cp.addr())
            .send(
                "POST",
                "/status/sign-in",
                &[("content-type", "application/x-www-form-urlencoded")],
                form.as_bytes(),
            )
            .await
            .expect("sign in");
        r.headers["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    };
    let mut c = Client::new(cp.addr());
    let mut http_ms = Vec::new();
    let mut data_bytes = 0;
    for _ in 0..200 {
        let t = Instant::now();
        let r = c
            .send("GET", "/status/data", &[("cookie", &session)], b"")
            .await
            .expect("/status/data");
        http_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.status, 200);
        data_bytes = r.body.len();
    }
    http_ms.sort_by(|a, b| a.total_cmp(b));
    let p99 = http_ms[http_ms.len() * 99 / 100];
    println!("page shows {shown_consumers} consumers");
    println!("| figure | median | range ({reps} loads) |");
    println!("|---|---|---|");
    for (figure, v) in [
        ("navigation to data shown (ms)", &shown),
        ("load event (ms)", &load),
        ("`/status/data` in the page (ms)", &data_ms),
        ("bytes over the wire (page + data)", &bytes),
    ] {
        println!("| {figure} | {:.1} | {} |", median(v), range(v));
    }
    println!(
        "`GET /status/data` alone, 200 requests on one connection: median {:.2} ms, p99 {:.2} ms, {} bytes",
        median(&http_ms),
        p99,
        data_bytes
    );
}
