//! Self-tests of the routes stub: it must speak the wire contract the poller relies on.

use prealloc_e2e::client::Client;
use prealloc_e2e::routes_stub::{manager_route, Fault, RoutesStub};
use prealloc_wire::{ConsumerId, ConsumerState, RoutesKind, RoutesQuery, RoutesResponse};
use std::time::{Duration, Instant};

const TOKEN: &str = "t0ken";

async fn poll(c: &mut Client, q: &RoutesQuery, token: &str) -> (u16, Option<RoutesResponse>) {
    let auth = format!("Bearer {token}");
    let r = c.get(&q.to_path(), &[("authorization", &auth)]).await;
    let body = if r.status == 200 {
        Some(serde_json::from_slice(&r.body).expect("RoutesResponse"))
    } else {
        None
    };
    (r.status, body)
}

fn q(since: u64, epoch: &str, wait_ms: u64) -> RoutesQuery {
    RoutesQuery {
        since,
        epoch: Some(epoch.to_owned()),
        wait_ms: Some(wait_ms),
        node: None,
        after: None,
    }
}

#[tokio::test]
async fn stub_answers_full_then_delta_then_holds() {
    let stub = RoutesStub::start(TOKEN);
    stub.set_managers(vec![manager_route("m1"), manager_route("m2")]);
    let a = ConsumerId::from_bytes([1; 16]);
    let b = ConsumerId::from_bytes([2; 16]);
    stub.upsert(&a, ConsumerState::Registering, &["m1"]);
    let mut c = Client::new(stub.addr());

    let (status, _) = poll(&mut c, &RoutesQuery::default(), "wrong").await;
    assert_eq!(status, 401);

    let (_, full) = poll(
        &mut c,
        &RoutesQuery {
            since: 0,
            epoch: None,
            wait_ms: Some(10),
            node: None,
            after: None,
        },
        TOKEN,
    )
    .await;
    let full = full.unwrap();
    assert_eq!(full.kind, RoutesKind::Full);
    assert_eq!(full.upsert.len(), 1);
    assert_eq!(full.managers.len(), 2);
    let epoch = full.epoch.clone();

    stub.upsert(&b, ConsumerState::Registering, &["m2"]);
    stub.remove(&a);
    let (_, delta) = poll(&mut c, &q(full.version, &epoch, 10), TOKEN).await;
    let delta = delta.unwrap();
    assert_eq!(delta.kind, RoutesKind::Delta);
    assert_eq!(
        delta.upsert.iter().map(|e| &e.consumer).collect::<Vec<_>>(),
        vec![&b]
    );
    assert_eq!(delta.remove, vec![a.clone()]);

    let started = Instant::now();
    let (_, unchanged) = poll(&mut c, &q(delta.version, &epoch, 150), TOKEN).await;
    assert_eq!(unchanged.unwrap().kind, RoutesKind::Unchanged);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "held for wait_ms"
    );

    // A held poll is answered as soon as the table changes.
    let waiter = {
        let addr = stub.addr();
        let query = q(delta.version, &epoch, 10_000);
        tokio::spawn(async move { poll(&mut Client::new(addr), &query, TOKEN).await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while stub.held() == 0 {
        assert!(Instant::now() < deadline, "the poll was never held");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let changed_version = stub.upsert(&a, ConsumerState::Registered, &["m1", "m2"]);
    let changed = stub.changed_at(changed_version).unwrap();
    let (_, woke) = waiter.await.unwrap();
    let woke = woke.unwrap();
    assert_eq!(woke.kind, RoutesKind::Delta);
    assert_eq!(woke.version, changed_version);
    assert!(
        changed.elapsed() < Duration::from_secs(2),
        "answered promptly, not after the wait"
    );
}

#[tokio::test]
async fn stub_sends_full_on_new_epoch_or_gap_and_injects_faults() {
    let stub = RoutesStub::start(TOKEN);
    let a = ConsumerId::from_bytes([3; 16]);
    stub.upsert(&a, ConsumerState::Registering, &["m1"]);
    let mut c = Client::new(stub.addr());
    let (_, r) = poll(&mut c, &RoutesQuery::default(), TOKEN).await;
    let r = r.unwrap();

    let (_, other_epoch) = poll(&mut c, &q(r.version, "other", 10), TOKEN).await;
    assert_eq!(other_epoch.unwrap().kind, RoutesKind::Full);

    stub.upsert(&a, ConsumerState::Registered, &["m1"]);
    stub.forget_history();
    let (_, gap) = poll(&mut c, &q(r.version, &r.epoch, 10), TOKEN).await;
    assert_eq!(gap.unwrap().kind, RoutesKind::Full);

    stub.new_epoch("e2");
    let (_, new_epoch) = poll(&mut c, &q(stub.version() - 1, &r.epoch, 10), TOKEN).await;
    let new_epoch = new_epoch.unwrap();
    assert_eq!(
        (new_epoch.kind, new_epoch.epoch.as_str()),
        (RoutesKind::Full, "e2")
    );

    stub.set_fault(Some(Fault {
        status: 200,
        body: "not json".into(),
    }));
    let raw = c
        .get(
            &q(new_epoch.version, "e2", 10).to_path(),
            &[("authorization", "Bearer t0ken")],
        )
        .await;
    assert_eq!(raw.text(), "not json");
    assert_eq!(stub.polls().last().unwrap().kind, None);
}
