//! The PostgreSQL store and the SQLite store agree: the same batches, in
//! random order and with random failures (ops on rows that are missing),
//! leave both with the same state, as every read of the seam sees it.
//!
//! Runs in the default (SQLite) pass, against the run's PostgreSQL server
//! (`PREALLOC_TEST_PG_URL`); the PostgreSQL pass leaves it out.

use crate::support::{pg_admin, PgDb};
use prealloc_control_plane::config::{PasswordSource, PostgresConfig};
use prealloc_control_plane::store::{
    LoadWindow, Op, PostgresStore, ReplicaRow, ResourceRow, ResourceState, Snapshot, SqliteStore,
    Store, StoreRead,
};
use proptest::prelude::*;

fn state() -> impl Strategy<Value = ResourceState> {
    prop_oneof![
        Just(ResourceState::Provisioning),
        Just(ResourceState::Ready),
        Just(ResourceState::Assigned)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let id = 1u64..7;
    let at = 0u64..20_000;
    let consumer = (0u8..5).prop_map(|c| format!("c{c}"));
    let manager = (1u8..4).prop_map(|m| format!("m{m}"));
    prop_oneof![
        ((0u8..3), (0u8..3)).prop_map(|(k, v)| Op::SetMeta {
            key: format!("k{k}"),
            value: format!("v{v}")
        }),
        (manager.clone(), any::<bool>()).prop_map(|(manager, up)| Op::SetAvailability {
            manager,
            availability: if up { "available" } else { "down" }.into()
        }),
        (id.clone(), state(), manager.clone(), at.clone(), (0u8..3)).prop_map(
            |(id, state, manager, created_ms, t)| Op::PutResource(ResourceRow {
                id,
                resource_type: format!("t{}", t % 2),
                name: format!("r-{id}"),
                location: "eu".into(),
                manager,
                state,
                consumer: None,
                created_ms,
            })
        ),
        (id.clone(), state(), proptest::option::of(consumer.clone())).prop_map(
            |(id, state, consumer)| Op::SetResourceState {
                id,
                state,
                consumer
            }
        ),
        id.clone().prop_map(|id| Op::DeleteResource { id }),
        (
            id.clone(),
            consumer,
            at.clone(),
            proptest::option::of(at.clone())
        )
            .prop_map(
                |(resource, consumer, created_ms, registered_ms)| Op::Assign {
                    resource,
                    consumer,
                    created_ms,
                    registered_ms
                }
            ),
        id.clone().prop_map(|resource| Op::Unassign { resource }),
        (id.clone(), at.clone()).prop_map(|(resource, registered_ms)| Op::SetRegistered {
            resource,
            registered_ms
        }),
        (id.clone(), at.clone()).prop_map(|(resource, at_ms)| Op::Confirm { resource, at_ms }),
        (id, manager, at).prop_map(|(resource, manager, at_ms)| Op::PutReplica(ReplicaRow {
            resource,
            manager,
            at_ms
        })),
    ]
}

fn window() -> impl Strategy<Value = LoadWindow> {
    prop_oneof![
        Just(LoadWindow::ALL),
        (0u64..30_000, 0u64..10_000, 0usize..4).prop_map(|(now_ms, grace_ms, recent)| {
            LoadWindow {
                now_ms,
                grace_ms,
                recent,
            }
        }),
    ]
}

/// A snapshot with the rows in one order (tables come back in their own).
fn normal(mut s: Snapshot) -> Snapshot {
    s.meta.sort();
    s.availability.sort();
    s.settled
        .sort_by(|a, b| (&a.manager, &a.resource_type).cmp(&(&b.manager, &b.resource_type)));
    s
}

fn compare(sqlite: &mut SqliteStore, pg: &mut PostgresStore, w: LoadWindow) {
    let a = normal(sqlite.load(w).unwrap());
    let b = normal(pg.load(w).unwrap());
    assert_eq!(a.meta, b.meta, "meta, {w:?}");
    assert_eq!(a.availability, b.availability, "availability, {w:?}");
    assert_eq!(a.resources, b.resources, "resources, {w:?}");
    assert_eq!(a.consumers, b.consumers, "consumers, {w:?}");
    assert_eq!(a.replicas, b.replicas, "replicas, {w:?}");
    assert_eq!(a.settled, b.settled, "settled counts, {w:?}");
}

#[test]
fn postgres_and_sqlite_stores_agree_on_every_read_after_the_same_batches() {
    let db = PgDb::create();
    let pg = std::cell::RefCell::new(
        PostgresStore::open(&PostgresConfig {
            url: db.url.clone(),
            password: PasswordSource::None,
            shared: false,
        })
        .expect("the PostgreSQL store opens"),
    );
    let config = ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        batches in proptest::collection::vec(proptest::collection::vec(op(), 1..12), 1..25),
        windows in proptest::collection::vec(window(), 1..4),
    )| {
        let mut pg = pg.borrow_mut();
        let pg = &mut *pg;
        pg_admin(&db.url, "TRUNCATE meta, manager_availability, resources, replicas");
        let dir = tempfile::tempdir().unwrap();
        let mut sqlite = SqliteStore::open(&dir.path().join("p.db")).unwrap();
        for batch in &batches {
            let (a, b) = (sqlite.commit(batch), pg.commit(batch));
            prop_assert_eq!(a.is_ok(), b.is_ok(), "{:?}: sqlite {:?}, postgres {:?}", batch, a, b);
        }
        for w in windows {
            compare(&mut sqlite, pg, w);
        }
        for registered_only in [false, true] {
            for limit in [0, 2, 100] {
                prop_assert_eq!(
                    sqlite.consumer_ids(registered_only, limit).unwrap(),
                    pg.consumer_ids(registered_only, limit).unwrap()
                );
            }
        }
        for c in 0..5 {
            for resource in 0..8 {
                let id = format!("c{c}");
                prop_assert_eq!(
                    sqlite.consumer(&id, resource).unwrap(),
                    pg.consumer(&id, resource).unwrap()
                );
            }
        }
    });
}
