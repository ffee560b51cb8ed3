//! Two control planes on one PostgreSQL database (`[store] shared = true`):
//! each takes sign-ups, no resource is ever handed out twice, each sees the
//! other's consumers, and both publish the same routing table at the same
//! versions. Runs in the default pass against the run's PostgreSQL server
//! (`PREALLOC_TEST_PG_URL`); the PostgreSQL pass leaves it out.

use crate::support::{Db, PgDb, Plane, Setup, ENVOY};
use hyper::{Method, StatusCode};
use prealloc_control_plane::{Config, ControlPlane};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

fn shared_config(setup: &Setup, db: &PgDb) -> Config {
    let text = format!(
        "{}[store]\nkind = \"postgres\"\nurl = \"{}\"\nshared = true\n",
        setup.toml_without_store(),
        db.url
    );
    Config::parse(&text, Path::new("/")).expect("shared config is valid")
}

async fn start(config: Config) -> Plane {
    let cp = ControlPlane::start(config)
        .await
        .expect("a control plane starts on the shared database");
    let app = cp.app();
    Plane {
        cp: Some(cp),
        app,
        db: Db::sqlite(),
    }
}

/// The full table as a poller would get it: consumer → replicas.
async fn table(p: &Plane) -> (u64, BTreeMap<String, Value>) {
    let r = p.routes("").await;
    let version = r["version"].as_u64().unwrap();
    let entries = r["upsert"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["consumer"].as_str().unwrap().to_owned(),
                e["replicas"].clone(),
            )
        })
        .collect();
    (version, entries)
}

async fn signup(p: &Plane) -> (StatusCode, Value) {
    p.call(
        Method::POST,
        "/v1/registrations",
        Some(ENVOY),
        Some(json!({"resource_type": "mailbox"})),
    )
    .await
}

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn two_control_planes_on_a_shared_database_hand_each_resource_out_once_and_publish_one_table()
{
    let db = PgDb::create();
    let setup = Setup {
        target_depth: 30,
        ..Setup::default()
    };
    let a = start(shared_config(&setup, &db)).await;
    let b = start(shared_config(&setup, &db)).await;
    // Both allocators fill the one pool: to its depth, not twice over.
    a.wait_depth(30).await;
    b.wait_depth(30).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.pools().await[0]["depth"], 30);

    // Sign-ups on both at once.
    let mut done = Vec::new();
    for _ in 0..4 {
        let (x, y) = tokio::join!(
            futures_util::future::join_all((0..10).map(|_| signup(&a))),
            futures_util::future::join_all((0..10).map(|_| signup(&b)))
        );
        done.extend(x.into_iter().map(|r| ("a", r)));
        done.extend(y.into_iter().map(|r| ("b", r)));
    }
    let mut resources = HashSet::new();
    let mut consumers = Vec::new();
    for (on, (s, v)) in &done {
        if *s == StatusCode::SERVICE_UNAVAILABLE {
            continue; // the pool ran dry for a moment: refused, nothing taken
        }
        assert_eq!(*s, StatusCode::CREATED, "on {on}: {v}");
        let id = v["resource"]["id"].as_u64().unwrap();
        assert!(resources.insert(id), "resource {id} handed out twice: {v}");
        consumers.push((*on, v["consumer"].as_str().unwrap().to_owned()));
    }
    assert!(
        consumers.len() >= 30,
        "{} sign-ups went through",
        consumers.len()
    );

    // Each sees the other's consumers, and takes calls about them.
    for (on, c) in &consumers {
        let other = if *on == "a" { &b } else { &a };
        let rec = eventually(&format!("{c} seen by the other"), async || {
            let (s, v) = other.consumer(c).await;
            (s == StatusCode::OK).then_some(v)
        })
        .await;
        assert_eq!(rec["consumer"], c.as_str());
    }
    let (on, c) = &consumers[0];
    let other = if *on == "a" { &b } else { &a };
    let (s, v) = other.replica(c, "m2").await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // One table, at one version, on both.
    let (va, ta) = eventually("both at one version", async || {
        let (va, ta) = table(&a).await;
        let (vb, tb) = table(&b).await;
        (va == vb && ta == tb).then_some((va, ta))
    })
    .await;
    for (_, c) in &consumers {
        assert!(
            ta.contains_key(c),
            "{c} missing from the table at version {va}"
        );
    }
    // A poller moving between them reads the same delta from either.
    let epoch = a.routes("").await["epoch"].as_str().unwrap().to_owned();
    assert_eq!(b.routes("").await["epoch"], epoch.as_str(), "one epoch");
    for since in [va.saturating_sub(7), va.saturating_sub(3), va - 1] {
        let q = format!("since={since}&epoch={epoch}&wait_ms=0");
        let (da, db) = (a.routes(&q).await, b.routes(&q).await);
        assert_eq!(da, db, "delta since {since}");
    }
    assert_eq!(
        ta[c.as_str()].as_array().unwrap().len(),
        2,
        "the copy on m2 is routed"
    );

    // A change on one reaches a long-poll on the other at once.
    let (vb, _) = table(&b).await;
    let epoch = b.routes("").await["epoch"].as_str().unwrap().to_owned();
    let query = format!("since={vb}&epoch={epoch}&wait_ms=5000");
    let poll = b.routes(&query);
    let t = Instant::now();
    let (r, (s, v)) = tokio::join!(poll, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        signup(&a).await
    });
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(r["kind"], "delta", "{r}");
    let new = v["consumer"].as_str().unwrap();
    assert!(
        r["upsert"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["consumer"] == new),
        "{r}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    drop(a);
    drop(b);
    drop(db);
}

async fn on_duty(p: &Plane) -> bool {
    let (_, h) = p.call(Method::GET, "/healthz", None, None).await;
    h["duties"].as_bool().unwrap()
}

/// One control plane at a time runs the background duties (pre-allocation,
/// reclaiming unconfirmed registrations, expiry, active copies) for every
/// consumer, whoever signed it up; when it stops, another takes them over.
#[tokio::test]
async fn the_background_duties_run_on_one_control_plane_and_pass_to_another_when_it_stops() {
    let db = PgDb::create();
    let setup = Setup {
        target_depth: 10,
        extra: "registration_lease_ms = 300".into(),
        ..Setup::default()
    };
    let a = start(shared_config(&setup, &db)).await;
    a.wait_depth(10).await;
    let b = start(shared_config(&setup, &db)).await;
    b.wait_depth(10).await;
    assert!(
        on_duty(&a).await,
        "the first control plane holds the duty lease"
    );
    assert!(!on_duty(&b).await);

    // Sign-ups on b, never confirmed: a, on duty, reclaims them and refills.
    let mut taken = Vec::new();
    for _ in 0..4 {
        taken.push(b.register().await["consumer"].as_str().unwrap().to_owned());
    }
    for c in &taken {
        eventually(&format!("{c} reclaimed by the duty holder"), async || {
            (b.consumer(c).await.0 == StatusCode::NOT_FOUND).then_some(())
        })
        .await;
    }
    // Their resources are back, beside the ones a refilled the pool with.
    b.wait_depth(14).await;

    // a stops: b takes the duties over, and does them.
    let a_db = a.stop().await;
    drop(a_db);
    eventually("the duties passed to b", async || {
        on_duty(&b).await.then_some(())
    })
    .await;
    let c = b.register().await["consumer"].as_str().unwrap().to_owned();
    eventually("b reclaims its own unconfirmed sign-up", async || {
        (b.consumer(&c).await.0 == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    // Confirmed sign-ups keep their resources: b refills the pool.
    let depth = b.pools().await[0]["depth"].as_u64().unwrap();
    for _ in 0..depth - 5 {
        let c = b.register().await["consumer"].as_str().unwrap().to_owned();
        let (s, v) = b
            .call(
                Method::POST,
                &format!("/v1/registrations/{c}/confirm"),
                Some(ENVOY),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    b.wait_depth(10).await;
}

fn unshared_config(setup: &Setup, db: &PgDb) -> Config {
    let text = format!(
        "{}[store]\nkind = \"postgres\"\nurl = \"{}\"\n",
        setup.toml_without_store(),
        db.url
    );
    Config::parse(&text, Path::new("/")).expect("config is valid")
}

/// A control plane with `shared` and one without never write one database
/// together, whichever starts first.
#[tokio::test]
async fn shared_and_unshared_control_planes_never_write_one_database_together() {
    let db = PgDb::create();
    let setup = Setup::default();
    let alone = start(unshared_config(&setup, &db)).await;
    let err = ControlPlane::start(shared_config(&setup, &db))
        .await
        .err()
        .expect("a shared control plane started beside an unshared one");
    assert!(
        format!("{err:#}").contains("without `store.shared`"),
        "{err:#}"
    );
    drop(alone.stop().await);
    let shared = start(shared_config(&setup, &db)).await;
    let err = ControlPlane::start(unshared_config(&setup, &db))
        .await
        .err()
        .expect("an unshared control plane started beside a shared one");
    assert!(format!("{err:#}").contains("writer lock"), "{err:#}");
    shared.wait_depth(10).await;
    shared.register().await;
}

/// An instance whose next batch is gone from the log (pruned while it could
/// not read it) cannot catch up: it stops taking writes and fails `/healthz`,
/// so it gets restarted, instead of writing from a state that is behind.
#[tokio::test]
async fn a_control_plane_that_fell_behind_the_batch_log_stops_taking_writes() {
    let db = PgDb::create();
    let setup = Setup::default();
    let p = start(shared_config(&setup, &db)).await;
    p.wait_depth(10).await;
    // Another instance's batch, with the ones before it pruned.
    crate::support::pg_admin(
        &db.url,
        "INSERT INTO batches (seq, instance, at_ms, ops)
         SELECT max(seq) + 5, 'gone', 0, '[]' FROM batches",
    );
    let (s, v) = signup(&p).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "writer_failed", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("fell behind"),
        "{v}"
    );
    let (s, h) = p.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{h}");
}
