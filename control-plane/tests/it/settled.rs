//! Settled consumers (registered, confirmed, out of the route window) leave
//! memory: the database keeps them, and every call about one still answers
//! as if it were in memory, before and after a restart.

use crate::support::{Plane, Setup, ADMIN, ENVOY};
use hyper::{Method, StatusCode};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The status page follows this many newest sign-ups: they stay in memory.
const RECENT: u64 = 20;

fn setup() -> Setup {
    Setup {
        // One copy registers a consumer at once; it settles 300 ms later.
        target: "1",
        grace_ms: 300,
        target_depth: 40,
        ..Setup::default()
    }
}

async fn wait_metric(p: &Plane, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = p.metric(name).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed {got}, never {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A record without what depends on the table and on the manager's load
/// (other sign-ups move it), not on the consumer.
fn without_table(mut rec: Value) -> Value {
    rec.as_object_mut().unwrap().remove("in_routing_table");
    let first = rec["first_manager"].as_object_mut().unwrap();
    first.remove("used");
    first.remove("free");
    rec
}

async fn managers(p: &Plane) -> Value {
    p.call(Method::GET, "/v1/managers", Some(ADMIN), None)
        .await
        .1
}

#[tokio::test]
async fn settled_consumers_leave_memory_and_every_call_about_them_still_answers() {
    let p = Plane::start(&setup()).await;
    p.wait_depth(40).await;
    let mut ids = Vec::new();
    let mut before = Vec::new();
    for _ in 0..RECENT + 5 {
        let reg = p.register().await;
        let c = reg["consumer"].as_str().unwrap().to_owned();
        let (s, v) = p
            .call(
                Method::POST,
                &format!("/v1/registrations/{c}/confirm"),
                Some(ENVOY),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (s, rec) = p.consumer(&c).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(rec["in_routing_table"], true, "{rec}");
        before.push(rec);
        ids.push(c);
    }
    // Out of the window, the five oldest leave memory; the newest 20 stay.
    wait_metric(&p, "prealloc_routes_entries", 0).await;
    wait_metric(&p, "prealloc_consumers_in_memory", RECENT).await;
    assert_eq!(p.metric("prealloc_consumers").await, RECENT + 5);
    let used_before = managers(&p).await;

    // Read back from the database: the same record.
    let settled = &ids[0];
    let (s, rec) = p.consumer(settled).await;
    assert_eq!(s, StatusCode::OK, "{rec}");
    assert_eq!(rec["in_routing_table"], false);
    assert_eq!(without_table(rec), without_table(before[0].clone()));

    // A late copy of a settled consumer is recorded once.
    let first = before[0]["first_manager"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = if first == "m1" { "m2" } else { "m1" };
    let (s, ack) = p.replica(settled, other).await;
    assert_eq!(s, StatusCode::OK, "{ack}");
    assert_eq!(ack["added"], true);
    assert_eq!(ack["state"], "registered");
    assert_eq!(ack["replicas"], serde_json::json!([first, other]));
    let (_, ack) = p.replica(settled, other).await;
    assert_eq!(ack["added"], false, "{ack}");
    let (_, rec) = p.consumer(settled).await;
    let held: Vec<&str> = rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["manager"].as_str().unwrap())
        .collect();
    assert_eq!(held, [first.as_str(), other]);
    // It stays out of memory and out of the table.
    assert_eq!(p.metric("prealloc_consumers_in_memory").await, RECENT);
    let table = p.routes("since=0").await;
    assert!(
        !table["entries"].to_string().contains(settled.as_str()),
        "a settled consumer is back in the table: {table}"
    );

    // Confirmed long ago: never given back, and confirming again is a no-op.
    let (s, v) = p
        .call(
            Method::DELETE,
            &format!("/v1/registrations/{settled}"),
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("registration_confirmed"))
    );
    let (s, v) = p
        .call(
            Method::POST,
            &format!("/v1/registrations/{settled}/confirm"),
            Some(ENVOY),
            None,
        )
        .await;
    assert_eq!(
        (s, v["newly"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{v}"
    );

    // Unknown ones are still unknown.
    let stranger = prealloc_wire::ConsumerId::from_bytes([9; 16]).to_string();
    let (s, _) = p.replica(&stranger, "m1").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = p.consumer(&stranger).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Lists come from the database: every consumer, in resource order.
    let (s, list) = p
        .call(
            Method::GET,
            "/v1/consumers?state=registered&limit=100",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["consumer"].as_str().unwrap())
        .collect();
    let mut by_resource: Vec<(u64, &str)> = before
        .iter()
        .map(|r| {
            (
                r["resource"]["id"].as_u64().unwrap(),
                r["consumer"].as_str().unwrap(),
            )
        })
        .collect();
    by_resource.sort();
    let in_order: Vec<&str> = by_resource.into_iter().map(|(_, c)| c).collect();
    assert_eq!(listed, in_order);

    // After a restart: the same counts, the same capacity used, the same records.
    let (_, rec_before_restart) = p.consumer(settled).await;
    let db = p.stop().await;
    let p = Plane::start_on(&setup(), db).await;
    assert_eq!(p.metric("prealloc_consumers").await, RECENT + 5);
    assert_eq!(p.metric("prealloc_consumers_in_memory").await, RECENT);
    assert_eq!(managers(&p).await, used_before);
    let (_, rec) = p.consumer(settled).await;
    assert_eq!(rec, rec_before_restart);
}

/// A database from before minted ids (random ones, which name no resource):
/// the migration keeps them in a table of their own, and a settled consumer
/// with such an id is still found.
#[tokio::test]
async fn an_older_sqlite_databases_consumers_stay_findable_once_settled() {
    use prealloc_control_plane::registry::{NewId, Registry};
    use prealloc_control_plane::store::{LoadWindow, SqliteStore, Store};
    let p = Plane::start_on(&setup(), crate::support::Db::sqlite()).await;
    p.wait_depth(40).await;
    let db = p.stop().await;
    // A consumer signed up a day ago under a random id, as releases before did.
    let old = prealloc_wire::ConsumerId::from_bytes(rand::random());
    {
        let config = setup().config(&db);
        let mut store = SqliteStore::open(&db.sqlite_path()).unwrap();
        let mut reg =
            Registry::from_snapshot(&config, &store.load(LoadWindow::ALL).unwrap()).unwrap();
        let day_ago = prealloc_control_plane::now_ms() - 86_400_000;
        let mut ops = Vec::new();
        reg.register(
            "mailbox",
            None,
            NewId::Given(old.clone()),
            day_ago,
            &mut ops,
        )
        .unwrap();
        reg.confirm(&old, day_ago, &mut ops).unwrap();
        store.commit(&ops).unwrap();
    }
    // Back to the schema before the migration that keeps such ids.
    let conn = rusqlite::Connection::open(db.sqlite_path()).unwrap();
    conn.execute_batch(
        "DROP TABLE legacy_consumer_ids; DELETE FROM migrations WHERE name = '0003_legacy_consumer_ids';",
    )
    .unwrap();
    drop(conn);

    let p = Plane::start_on(&setup(), db).await;
    // Twenty newer sign-ups push it off the status page's list: it leaves memory.
    for _ in 0..RECENT + 1 {
        p.register().await;
    }
    wait_metric(&p, "prealloc_consumers_in_memory", RECENT + 1).await;
    let (s, rec) = p.consumer(old.as_str()).await;
    assert_eq!(s, StatusCode::OK, "{rec}");
    assert_eq!(
        (rec["state"].as_str(), rec["in_routing_table"].as_bool()),
        (Some("registered"), Some(false))
    );
    let first = rec["first_manager"]["id"].as_str().unwrap().to_owned();
    let other = if first == "m1" { "m2" } else { "m1" };
    let (s, ack) = p.replica(old.as_str(), other).await;
    assert_eq!(
        (s, ack["added"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{ack}"
    );
}
