//! Restarts on the same database: nothing acknowledged is lost, the epoch stays.

use crate::support::{ids, Plane, Setup, ADMIN};
use hyper::{Method, StatusCode};
use std::collections::HashSet;

/// Full snapshots list entries in no particular order.
fn sorted(v: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.to_string())
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_restart_keeps_consumers_replicas_availability_epoch_and_version() {
    let setup = Setup::default();
    let p = Plane::start(&setup).await;
    p.wait_depth(10).await;
    let mut consumers = Vec::new();
    for _ in 0..5 {
        consumers.push(p.register().await);
    }
    let c0 = consumers[0]["consumer"].as_str().unwrap().to_owned();
    let first0 = consumers[0]["manager"].as_str().unwrap().to_owned();
    let other = if first0 == "m1" { "m2" } else { "m1" };
    p.replica(&c0, other).await;
    p.call(
        Method::PUT,
        "/v1/managers/m3/availability",
        Some(ADMIN),
        Some(serde_json::json!({"availability": "draining"})),
    )
    .await;
    let before = p.routes("since=0").await;
    let rec_before = p.consumer(&c0).await.1;
    let resources: HashSet<u64> = consumers
        .iter()
        .map(|c| c["resource"]["id"].as_u64().unwrap())
        .collect();
    let db = p.stop().await;

    let p = Plane::start_on(&setup, db).await;
    let after = p.routes("since=0").await;
    assert_eq!(after["epoch"], before["epoch"], "same epoch after restart");
    assert_eq!(
        after["version"], before["version"],
        "same version after restart"
    );
    assert_eq!(sorted(&after["upsert"]), sorted(&before["upsert"]));
    assert_eq!(after["managers"], before["managers"]);
    let rec_after = p.consumer(&c0).await.1;
    assert_eq!(rec_after["replicas"], rec_before["replicas"]);
    assert_eq!(rec_after["resource"], rec_before["resource"]);
    let m3 = p
        .call(Method::GET, "/v1/managers/m3", Some(ADMIN), None)
        .await
        .1;
    assert_eq!(m3["availability"], "draining");
    // A poller that was up to date is held, not flooded, after the restart.
    let r = p
        .routes(&format!(
            "since={}&epoch={}&wait_ms=50",
            before["version"],
            before["epoch"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r["kind"], "unchanged");
    // New registrations never reuse a resource.
    p.wait_depth(10).await;
    let fresh = p.register().await;
    assert!(!resources.contains(&fresh["resource"]["id"].as_u64().unwrap()));
    p.wait_depth(10).await;
}

#[tokio::test]
async fn registered_consumers_past_their_grace_stay_out_of_the_table_after_restart() {
    let setup = Setup {
        target: "1",
        grace_ms: 0,
        ..Setup::default()
    };
    let p = Plane::start(&setup).await;
    p.wait_depth(10).await;
    let c = p.register().await["consumer"].as_str().unwrap().to_owned();
    let db = p.stop().await;
    let p = Plane::start_on(&setup, db).await;
    assert_eq!(p.consumer(&c).await.0, StatusCode::OK);
    assert!(!ids(&p.routes("since=0").await, "upsert").contains(&c));
}

#[tokio::test]
async fn a_database_naming_a_manager_missing_from_the_config_is_refused() {
    let setup = Setup::default();
    let p = Plane::start(&setup).await;
    p.wait_depth(10).await;
    let db = p.stop().await;
    let mut fewer = Setup::default();
    fewer.managers.truncate(2);
    let err = prealloc_control_plane::ControlPlane::start(fewer.config(&db))
        .await
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("m3") && msg.contains("missing from the config"),
        "{msg}"
    );
}

/// One control plane writes a database at a time: a second one on the same
/// database is refused at start (SQLite: a lock on the file; PostgreSQL: an
/// advisory lock held by the writer's connection), and the first goes on.
#[tokio::test]
async fn a_second_control_plane_on_the_same_database_is_refused_while_the_first_runs() {
    let setup = Setup::default();
    let p = Plane::start(&setup).await;
    p.wait_depth(10).await;
    let err = prealloc_control_plane::ControlPlane::start(setup.config(&p.db))
        .await
        .err()
        .expect("a second control plane was started on the same database");
    let msg = format!("{err:#}");
    assert!(msg.contains("another control plane"), "{msg}");
    p.register().await;
    // Once the first has stopped, the database is free.
    let db = p.stop().await;
    let p = Plane::start_on(&setup, db).await;
    p.register().await;
}
