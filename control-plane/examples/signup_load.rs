//! Sign-up load: fires N registrations over real HTTP with C concurrent clients and
//! prints throughput and latency percentiles.
//!
//! Self-contained (starts a control plane on a temp database, pre-fills the pool):
//!     cargo run --release -p prealloc-control-plane --example signup_load -- --n 50000 --concurrency 64
//! Against a running control plane:
//!     cargo run --release -p prealloc-control-plane --example signup_load -- --url http://127.0.0.1:7070 --token <envoy token>

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prealloc_control_plane::{Config, Server};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    n: usize,
    concurrency: usize,
    url: Option<String>,
    token: String,
    resource_type: String,
}

fn args() -> Args {
    let mut a = Args {
        n: 20_000,
        concurrency: 64,
        url: None,
        token: "envoy-load-token-0123456789".into(),
        resource_type: "mailbox".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--n" => a.n = v().parse().expect("--n is a number"),
            "--concurrency" => a.concurrency = v().parse().expect("--concurrency is a number"),
            "--url" => a.url = Some(v()),
            "--token" => a.token = v(),
            "--resource-type" => a.resource_type = v(),
            "-h" | "--help" => {
                println!("signup_load [--n N] [--concurrency C] [--url URL --token ENVOY_TOKEN] [--resource-type T]");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}; see --help"),
        }
    }
    a
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args();
    let mut server = None;
    let _dir;
    let url = match &a.url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let dir = tempfile::tempdir()?;
            let depth = a.n + 1000;
            let text = format!(
                "listen = \"127.0.0.1:0\"\ndatabase = {:?}\n[tokens]\nenvoy = \"{}\"\nadmin = \"admin-load-token-0123456789\"\n\
                 [[managers]]\nid = \"m1\"\ncluster = \"manager_m1\"\nlocation = \"l\"\nadmin_url = \"http://127.0.0.1:9\"\ncapacity = {{ mailbox = {depth} }}\n\
                 [[managers]]\nid = \"m2\"\ncluster = \"manager_m2\"\nlocation = \"l\"\nadmin_url = \"http://127.0.0.1:9\"\ncapacity = {{ mailbox = {depth} }}\n\
                 [[managers]]\nid = \"m3\"\ncluster = \"manager_m3\"\nlocation = \"l\"\nadmin_url = \"http://127.0.0.1:9\"\ncapacity = {{ mailbox = {depth} }}\n\
                 [[pools]]\nresource_type = \"mailbox\"\nlocation = \"l\"\ntarget_depth = {depth}\n",
                dir.path().join("load.db").display().to_string(),
                a.token
            );
            let cfg = Config::parse(&text, Path::new("/"))?;
            let s = Server::start(cfg).await?;
            let url = format!("http://{}", s.addr());
            // Wait for the pool: the measurement is of sign-ups, not of pre-allocation.
            let t = Instant::now();
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            loop {
                let req = Request::get(format!("{url}/v1/pools"))
                    .header("authorization", "Bearer admin-load-token-0123456789")
                    .body(Full::new(Bytes::new()))?;
                let body = client
                    .request(req)
                    .await?
                    .into_body()
                    .collect()
                    .await?
                    .to_bytes();
                let v: serde_json::Value = serde_json::from_slice(&body)?;
                if v[0]["depth"].as_u64() >= Some(depth as u64) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            eprintln!(
                "pool pre-filled with {depth} resources in {:?}",
                t.elapsed()
            );
            server = Some(s);
            _dir = dir;
            url
        }
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(a.concurrency)
        .build_http();
    let body = Bytes::from(serde_json::json!({ "resource_type": a.resource_type }).to_string());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let client = client.clone();
        let url = url.clone();
        let token = a.token.clone();
        let body = body.clone();
        let next = next.clone();
        let n = a.n;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failed = 0usize;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let req = Request::builder()
                    .method(Method::POST)
                    .uri(format!("{url}/v1/registrations"))
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("request");
                let t = Instant::now();
                match client.request(req).await {
                    Ok(resp) => {
                        let ok = resp.status() == StatusCode::CREATED;
                        let _ = resp.into_body().collect().await;
                        if ok {
                            lat.push(t.elapsed());
                        } else {
                            failed += 1;
                        }
                    }
                    Err(_) => failed += 1,
                }
            }
            (lat, failed)
        }));
    }
    let mut lat = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await?;
        lat.extend(l);
        failed += f;
    }
    let took = start.elapsed();
    lat.sort();
    println!(
        "sign-ups: {} ok, {} failed, concurrency {}, {:.2?} total\nthroughput: {:.0}/s\nlatency: p50 {:.2?}  p90 {:.2?}  p99 {:.2?}  max {:.2?}",
        lat.len(),
        failed,
        a.concurrency,
        took,
        lat.len() as f64 / took.as_secs_f64(),
        pct(&lat, 0.50),
        pct(&lat, 0.90),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );
    // Group-commit figures from the server's own metrics.
    let req = Request::get(format!("{url}/metrics")).body(Full::new(Bytes::new()))?;
    if let Ok(resp) = client.request(req).await {
        let text =
            String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
        let get = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|r| r.strip_prefix(' '))
                        .and_then(|v| v.parse().ok())
                })
                .unwrap_or(0.0)
        };
        let commits = get("prealloc_store_commits_total");
        let commands = get("prealloc_store_commands_total");
        let secs = get("prealloc_store_commit_seconds_sum");
        if commits > 0.0 {
            println!(
                "store: {commits} commits, {:.1} commands per commit, {:.2} ms per commit (since start)",
                commands / commits,
                secs * 1000.0 / commits
            );
        }
    }
    if let Some(s) = server {
        s.shutdown().await;
    }
    Ok(())
}
