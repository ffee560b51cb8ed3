//! kill -9 durability: every acknowledged registration and replica survives SIGKILL
//! of the real binary.

use crate::support::{http, Setup, ADMIN, ENVOY};
use hyper::{Method, StatusCode};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary() -> std::path::PathBuf {
    std::env::var_os("PREALLOC_CONTROL_PLANE")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_prealloc-control-plane").into())
}

fn spawn(config: &Path) -> (Proc, SocketAddr) {
    let mut child = Command::new(binary())
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "spawn prealloc-control-plane (set PREALLOC_CONTROL_PLANE or run cargo xtask test)",
        );
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("address");
    (Proc(child), addr)
}

#[tokio::test]
async fn acknowledged_registrations_and_replicas_survive_kill_9() {
    let db = crate::support::Db::new();
    let config = db.dir.path().join("prealloc.toml");
    let setup = Setup {
        target_depth: 200,
        ..Setup::default()
    };
    std::fs::write(&config, setup.toml(&db)).unwrap();
    let (mut proc, addr) = spawn(&config);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(addr, Method::GET, "/v1/pools", Some(ADMIN), None)
        .await
        .1[0]["depth"]
        != 200
    {
        assert!(Instant::now() < deadline, "pool never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Concurrent sign-ups (group commit in action), then one replica report each.
    let mut tasks = Vec::new();
    for _ in 0..150 {
        tasks.push(tokio::spawn(async move {
            let (s, reg) = http(
                addr,
                Method::POST,
                "/v1/registrations",
                Some(ENVOY),
                Some(serde_json::json!({"resource_type": "mailbox"})),
            )
            .await;
            assert_eq!(s, StatusCode::CREATED);
            let c = reg["consumer"].as_str().unwrap().to_owned();
            let other = if reg["manager"] == "m1" { "m2" } else { "m1" };
            let (s, _) = http(
                addr,
                Method::POST,
                &format!("/v1/consumers/{c}/replicas"),
                Some(ADMIN),
                Some(serde_json::json!({"manager": other})),
            )
            .await;
            assert_eq!(s, StatusCode::OK);
            (
                c,
                reg["manager"].as_str().unwrap().to_owned(),
                other.to_owned(),
                reg["resource"]["id"].as_u64().unwrap(),
            )
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    let (_, before) = http(
        addr,
        Method::GET,
        "/v1/routes?protocol=2&since=0",
        Some(ENVOY),
        None,
    )
    .await;
    // SIGKILL: no shutdown path runs.
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    drop(proc);

    let (_proc, addr) = spawn(&config);
    let (_, after) = http(
        addr,
        Method::GET,
        "/v1/routes?protocol=2&since=0",
        Some(ENVOY),
        None,
    )
    .await;
    assert_eq!(after["epoch"], before["epoch"]);
    assert!(after["version"].as_u64() >= before["version"].as_u64());
    for (c, first, other, resource) in &acked {
        let (s, rec) = http(
            addr,
            Method::GET,
            &format!("/v1/consumers/{c}"),
            Some(ADMIN),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "consumer {c} lost");
        assert_eq!(rec["resource"]["id"].as_u64(), Some(*resource));
        let reps: Vec<&str> = rec["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["manager"].as_str().unwrap())
            .collect();
        assert_eq!(
            reps,
            [first.as_str(), other.as_str()],
            "replica lost for {c}"
        );
    }
    assert_eq!(after["upsert"].as_array().unwrap().len(), acked.len());
}
