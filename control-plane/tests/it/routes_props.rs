//! Push property: a poller that applies every answer the wire way always ends up
//! with exactly the server's table, whatever it missed (deltas, gaps, epochs).

use prealloc_control_plane::routes::Routes;
use prealloc_wire::{
    ConsumerId, ConsumerState, RouteEntry, RoutesKind, RoutesQuery, RoutesResponse,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Step {
    /// Commit a batch of (consumer, Some(replica count) = upsert | None = remove).
    Publish(Vec<(u8, Option<u8>)>),
    /// The poller asks with its own state.
    Poll,
    /// The poller forgets its epoch (a restarted Envoy).
    Forget,
}

fn id(n: u8) -> ConsumerId {
    ConsumerId::from_bytes([n; 16])
}

fn entry(n: u8, replicas: u8) -> RouteEntry {
    RouteEntry {
        consumer: id(n),
        state: if replicas >= 3 {
            ConsumerState::Registered
        } else {
            ConsumerState::Registering
        },
        replicas: (1..=replicas.max(1)).map(|r| format!("m{r}")).collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_poller_applying_answers_converges_to_the_table(
        log_limit in 1usize..6,
        steps in prop::collection::vec(prop_oneof![
            4 => prop::collection::vec((0u8..8, prop::option::of(1u8..4)), 1..4).prop_map(Step::Publish),
            3 => Just(Step::Poll),
            1 => Just(Step::Forget),
        ], 1..60),
    ) {
        let routes = Routes::new("epoch-a".into(), 1, vec![], vec![], log_limit);
        let mut server: BTreeMap<ConsumerId, RouteEntry> = BTreeMap::new();
        let mut version = 1u64;
        let mut client: BTreeMap<ConsumerId, RouteEntry> = BTreeMap::new();
        let mut since = 0u64;
        let mut epoch: Option<String> = None;
        for s in steps {
            match s {
                Step::Publish(changes) => {
                    version += 1;
                    let changes: Vec<_> = changes
                        .into_iter()
                        .map(|(n, r)| {
                            let e = r.map(|r| entry(n, r));
                            match &e {
                                Some(e) => { server.insert(id(n), e.clone()); }
                                None => { server.remove(&id(n)); }
                            }
                            (id(n), e)
                        })
                        .collect();
                    routes.publish(version, changes, None);
                }
                Step::Forget => epoch = None,
                Step::Poll => {
                    let q = RoutesQuery { since, epoch: epoch.clone(), wait_ms: Some(0), node: None };
                    let Some(answer) = routes.answer(&q) else {
                        prop_assert_eq!(&client, &server, "told to wait while behind");
                        continue;
                    };
                    let r: RoutesResponse = serde_json::from_slice(&answer.to_json()).expect("wire JSON");
                    match r.kind {
                        RoutesKind::Full => {
                            client = r.upsert.into_iter().map(|e| (e.consumer.clone(), e)).collect();
                        }
                        RoutesKind::Delta => {
                            prop_assert!(since > 0 && epoch.is_some(), "a delta for a new poller");
                            for e in r.upsert { client.insert(e.consumer.clone(), e); }
                            for c in r.remove { client.remove(&c); }
                        }
                        RoutesKind::Unchanged => {}
                    }
                    since = r.version;
                    epoch = Some(r.epoch);
                    prop_assert_eq!(since, version);
                    prop_assert_eq!(&client, &server);
                }
            }
        }
    }
}
