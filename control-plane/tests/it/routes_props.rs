//! Push property: a poller that applies every answer the wire way always ends up
//! with exactly the server's table, whatever it missed (deltas, gaps, epochs).

use prealloc_control_plane::routes::Routes;
use prealloc_wire::{
    ConsumerId, ConsumerState, RouteEntry, RoutesKind, RoutesQuery, RoutesResponse, ROUTES_PROTOCOL,
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

/// A poller following the wire contract (`prealloc_wire`), as plainly as it can be written.
#[derive(Default)]
struct Client {
    table: BTreeMap<[u8; 16], RouteEntry>,
    since: u64,
    epoch: Option<String>,
    /// A snapshot being paged in: (epoch, version, next cursor).
    paging: Option<(String, u64, ConsumerId)>,
    /// Pages are cut from the live table: after a snapshot, the table is
    /// exactly a version's table only from the version its last page was cut at.
    exact_from: u64,
}

impl Client {
    fn query(&self) -> RoutesQuery {
        match &self.paging {
            Some((e, v, next)) => RoutesQuery {
                since: *v,
                epoch: Some(e.clone()),
                wait_ms: Some(0),
                node: None,
                after: Some(next.clone()),
            },
            None => RoutesQuery {
                since: self.since,
                epoch: self.epoch.clone(),
                wait_ms: Some(0),
                node: None,
                after: None,
            },
        }
    }

    /// Applies an answer; whether it left the client at a complete version.
    fn apply(&mut self, r: RoutesResponse) -> Result<bool, TestCaseError> {
        prop_assert_eq!(r.protocol, ROUTES_PROTOCOL);
        match r.kind {
            RoutesKind::Full => {
                let lo = r.after.as_ref().map(ConsumerId::to_bytes);
                let hi = r.next.as_ref().map(ConsumerId::to_bytes);
                if let Some((e, v, next)) = &self.paging {
                    if r.after.is_some() {
                        prop_assert_eq!(
                            (e, *v, Some(next)),
                            (&r.epoch, r.version, r.after.as_ref())
                        );
                    }
                } else {
                    prop_assert!(r.after.is_none(), "a continuation nobody asked for");
                }
                let page: BTreeMap<[u8; 16], RouteEntry> = r
                    .upsert
                    .into_iter()
                    .map(|e| (e.consumer.to_bytes(), e))
                    .collect();
                for k in page.keys() {
                    prop_assert!(
                        lo.is_none_or(|lo| *k > lo) && hi.is_none_or(|hi| *k <= hi),
                        "an entry outside its page"
                    );
                }
                self.table.retain(|k, _| {
                    let inside = lo.is_none_or(|lo| *k > lo) && hi.is_none_or(|hi| *k <= hi);
                    !inside || page.contains_key(k)
                });
                self.table.extend(page);
                match r.next {
                    Some(next) => {
                        self.paging = Some((r.epoch, r.version, next));
                        return Ok(false);
                    }
                    None => self.paging = None,
                }
            }
            RoutesKind::Delta => {
                prop_assert!(
                    self.paging.is_none() && self.since > 0 && self.epoch.is_some(),
                    "a delta out of turn"
                );
                for e in r.upsert {
                    self.table.insert(e.consumer.to_bytes(), e);
                }
                for c in r.remove {
                    self.table.remove(&c.to_bytes());
                }
            }
            RoutesKind::Unchanged => {}
        }
        self.since = r.version;
        self.epoch = Some(r.epoch);
        Ok(true)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever the page size, however changes interleave with the pages of a
    /// snapshot, and whatever the poller missed (deltas, gaps, epochs): every
    /// complete version it reaches is a version the server had, and once it has
    /// caught up its table is exactly the server's.
    #[test]
    fn a_poller_applying_answers_converges_to_the_table(
        log_limit in 1usize..12,
        page_entries in 1usize..5,
        steps in prop::collection::vec(prop_oneof![
            4 => prop::collection::vec((0u8..8, prop::option::of(1u8..4)), 1..4).prop_map(Step::Publish),
            3 => Just(Step::Poll),
            1 => Just(Step::Forget),
        ], 1..60),
    ) {
        let routes = Routes::new("epoch-a".into(), 1, vec![], vec![], log_limit, page_entries);
        let mut server: BTreeMap<[u8; 16], RouteEntry> = BTreeMap::new();
        let mut history: Vec<BTreeMap<[u8; 16], RouteEntry>> = vec![BTreeMap::new(), BTreeMap::new()];
        let mut version = 1u64;
        let mut client = Client::default();
        let poll = |client: &mut Client, history: &[BTreeMap<[u8; 16], RouteEntry>], now: u64| -> Result<bool, TestCaseError> {
            let Some(answer) = routes.answer(&client.query()) else {
                return Ok(false);
            };
            let r: RoutesResponse = serde_json::from_slice(&answer.to_json()).expect("wire JSON");
            let size = r.upsert.len() + r.remove.len();
            prop_assert!(size <= page_entries, "an answer of {} changes, pages of {}", size, page_entries);
            if r.kind == RoutesKind::Full {
                prop_assert!(r.upsert.len() <= page_entries);
            }
            let full = r.kind == RoutesKind::Full;
            if client.apply(r)? {
                if full {
                    client.exact_from = now;
                }
                if client.since >= client.exact_from {
                    let at = usize::try_from(client.since).unwrap();
                    prop_assert_eq!(&client.table, &history[at], "the table at version {}", client.since);
                }
            }
            Ok(true)
        };
        for s in steps {
            match s {
                Step::Publish(changes) => {
                    version += 1;
                    let changes: Vec<_> = changes
                        .into_iter()
                        .map(|(n, r)| {
                            let e = r.map(|r| entry(n, r));
                            match &e {
                                Some(e) => { server.insert(id(n).to_bytes(), e.clone()); }
                                None => { server.remove(&id(n).to_bytes()); }
                            }
                            (id(n), e)
                        })
                        .collect();
                    routes.publish(version, changes, None);
                    history.push(server.clone());
                }
                Step::Forget => {
                    client.epoch = None;
                    client.paging = None;
                }
                Step::Poll => {
                    poll(&mut client, &history, version)?;
                }
            }
        }
        // Caught up: nothing more to answer, and the same table.
        let mut polls = 0;
        while poll(&mut client, &history, version)? {
            polls += 1;
            prop_assert!(polls < 100, "never caught up");
        }
        prop_assert_eq!(client.since, version);
        prop_assert_eq!(&client.table, &server);
    }
}
