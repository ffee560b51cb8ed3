//! The poller singleton: long-polls the routes contract and writes the table into shared data; keeps the last good table on errors and backs off.

use crate::support::*;
use prealloc_wasm_host::{Host, HttpCall, Vm};
use prealloc_wire::{
    Availability, ConsumerId, ConsumerState, ManagerRoute, RouteEntry, RoutesKind, RoutesResponse,
    ROUTES_PROTOCOL,
};
use std::collections::BTreeMap;
use std::time::Duration;

const UPDATES: &str = metric::POLLER_UPDATES;
const ERRORS: &str = metric::POLLER_ERRORS;

fn poller() -> (Host, Vm) {
    let host = Host::new();
    let vm = host.new_vm();
    assert!(vm.configure_plugin(&poller_json().to_string()));
    (host, vm)
}

/// The one outstanding poll, ticking the poller until it sends one (at most
/// ten seconds of host time); returns it with the host time that passed.
fn next_poll(host: &Host, vm: &Vm) -> (HttpCall, Duration) {
    let start = host.now();
    let deadline = start + Duration::from_secs(10);
    loop {
        let calls = host.pending_http_calls();
        assert!(
            calls.len() <= 1,
            "more than one poll outstanding: {calls:#?}"
        );
        if let Some(call) = calls.into_iter().next() {
            let waited = host.now().duration_since(start).unwrap_or_default();
            return (call, waited);
        }
        assert!(
            host.now() < deadline,
            "the poller sent no poll within 10 s of ticks"
        );
        host.tick(vm);
    }
}

fn query(call: &HttpCall) -> BTreeMap<String, String> {
    let path = call.path();
    let (route, q) = path.split_once('?').unwrap_or((path, ""));
    assert_eq!(route, "/v1/routes", "poll path {path}");
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn manager(id: &str, availability: Availability) -> ManagerRoute {
    ManagerRoute {
        id: id.into(),
        cluster: format!("manager_{id}"),
        location: "eu".into(),
        availability,
    }
}

fn entry(consumer: &ConsumerId, state: ConsumerState, replicas: &[&str]) -> RouteEntry {
    RouteEntry {
        consumer: consumer.clone(),
        state,
        replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
    }
}

fn managers() -> Vec<ManagerRoute> {
    vec![
        manager("m1", Availability::Available),
        manager("m2", Availability::Available),
        manager("m3", Availability::Draining),
    ]
}

fn full(epoch: &str, version: u64, upsert: Vec<RouteEntry>) -> RoutesResponse {
    RoutesResponse {
        protocol: ROUTES_PROTOCOL,
        after: None,
        next: None,
        epoch: epoch.into(),
        version,
        kind: RoutesKind::Full,
        managers: managers(),
        upsert,
        remove: vec![],
    }
}

fn answer(host: &Host, call: &HttpCall, r: &RoutesResponse) {
    host.answer_http_call(
        call.token,
        200,
        &[("content-type", "application/json")],
        &serde_json::to_vec(r).unwrap(),
    );
}

/// A poller that applied a full snapshot (epoch e1, version 7) of consumers 1 and 2.
fn synced() -> (Host, Vm) {
    let (host, vm) = poller();
    let (call, _) = next_poll(&host, &vm);
    answer(
        &host,
        &call,
        &full(
            "e1",
            7,
            vec![
                entry(&consumer(1), ConsumerState::Registering, &["m1"]),
                entry(&consumer(2), ConsumerState::Registered, &["m1", "m2"]),
            ],
        ),
    );
    (host, vm)
}

fn entry_of(host: &Host, n: u8) -> Option<String> {
    entry_in(host, &consumer(n))
}

#[test]
fn the_first_poll_asks_for_a_full_snapshot_with_the_bearer_token() {
    let (host, vm) = poller();
    let (call, _) = next_poll(&host, &vm);
    assert_eq!(call.upstream, "prealloc_control_plane");
    assert_eq!(call.header(":method"), Some("GET"));
    assert_eq!(call.header(":authority"), Some("prealloc-control-plane"));
    assert_eq!(call.header("authorization"), Some("Bearer envoy-token"));
    let q = query(&call);
    assert_eq!(q.get("since").map(String::as_str), Some("0"));
    assert_eq!(q.get("wait_ms").map(String::as_str), Some("30000"));
    assert_eq!(q.get("epoch"), None);
    assert!(
        call.timeout_ms > 30000,
        "the call must outlive the server's hold: {} ms",
        call.timeout_ms
    );
}

#[test]
fn a_full_snapshot_is_written_to_shared_data_and_the_next_poll_continues_from_it() {
    let (host, vm) = synced();
    assert_eq!(entry_of(&host, 1).as_deref(), Some("1|g|manager_m1"));
    assert_eq!(
        entry_of(&host, 2).as_deref(),
        Some("1|r|manager_m1,manager_m2")
    );
    let managers = host
        .shared_data_str(MANAGERS_KEY)
        .expect("managers written");
    let mut lines: Vec<&str> = managers.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        vec![
            "manager_m1 available",
            "manager_m2 available",
            "manager_m3 draining"
        ]
    );
    assert_eq!(host.counter(UPDATES), 1);
    let (call, waited) = next_poll(&host, &vm);
    let q = query(&call);
    assert_eq!(
        (q["since"].as_str(), q.get("epoch").map(String::as_str)),
        ("7", Some("e1"))
    );
    assert!(
        waited <= Duration::from_millis(u64::from(vm.tick_period_ms())),
        "a long-poll loop does not wait: {waited:?}"
    );
}

#[test]
fn a_delta_upserts_and_removes_entries() {
    let (host, vm) = synced();
    let (call, _) = next_poll(&host, &vm);
    let delta = RoutesResponse {
        protocol: ROUTES_PROTOCOL,
        after: None,
        next: None,
        epoch: "e1".into(),
        version: 9,
        kind: RoutesKind::Delta,
        managers: managers(),
        upsert: vec![
            entry(&consumer(1), ConsumerState::Registering, &["m1", "m3"]),
            entry(&consumer(3), ConsumerState::Registering, &["m2"]),
        ],
        remove: vec![consumer(2)],
    };
    answer(&host, &call, &delta);
    assert_eq!(
        entry_of(&host, 1).as_deref(),
        Some("1|g|manager_m1,manager_m3")
    );
    assert_eq!(
        entry_of(&host, 2),
        None,
        "a removed entry leaves its bucket"
    );
    assert_eq!(entry_of(&host, 3).as_deref(), Some("1|g|manager_m2"));
    let (call, _) = next_poll(&host, &vm);
    assert_eq!(query(&call)["since"], "9");
}

#[test]
fn an_unchanged_answer_keeps_the_table_and_polls_again() {
    let (host, vm) = synced();
    let (call, _) = next_poll(&host, &vm);
    let unchanged = RoutesResponse {
        kind: RoutesKind::Unchanged,
        upsert: vec![],
        ..full("e1", 7, vec![])
    };
    answer(&host, &call, &unchanged);
    assert_eq!(entry_of(&host, 1).as_deref(), Some("1|g|manager_m1"));
    assert_eq!(
        entry_of(&host, 2).as_deref(),
        Some("1|r|manager_m1,manager_m2")
    );
    let (call, _) = next_poll(&host, &vm);
    assert_eq!(query(&call)["since"], "7");
}

#[test]
fn a_delta_from_another_epoch_is_refused_and_forces_a_full_snapshot() {
    let (host, vm) = synced();
    let (call, _) = next_poll(&host, &vm);
    let foreign = RoutesResponse {
        protocol: ROUTES_PROTOCOL,
        after: None,
        next: None,
        epoch: "e2".into(),
        version: 8,
        kind: RoutesKind::Delta,
        managers: managers(),
        upsert: vec![entry(&consumer(1), ConsumerState::Registering, &["m2"])],
        remove: vec![consumer(2)],
    };
    answer(&host, &call, &foreign);
    assert_eq!(
        entry_of(&host, 1).as_deref(),
        Some("1|g|manager_m1"),
        "nothing of the refused delta applies"
    );
    assert_eq!(
        entry_of(&host, 2).as_deref(),
        Some("1|r|manager_m1,manager_m2")
    );
    assert_eq!(host.counter(ERRORS), 1);
    let (call, _) = next_poll(&host, &vm);
    assert_eq!(
        query(&call)["since"],
        "0",
        "the next poll asks for a full snapshot"
    );
    // The new epoch's snapshot replaces the whole table.
    answer(
        &host,
        &call,
        &full(
            "e2",
            3,
            vec![entry(&consumer(3), ConsumerState::Registering, &["m2"])],
        ),
    );
    assert_eq!(entry_of(&host, 1), None);
    assert_eq!(entry_of(&host, 2), None);
    assert_eq!(entry_of(&host, 3).as_deref(), Some("1|g|manager_m2"));
    let (call, _) = next_poll(&host, &vm);
    let q = query(&call);
    assert_eq!(
        (q["since"].as_str(), q.get("epoch").map(String::as_str)),
        ("3", Some("e2"))
    );
}

#[test]
fn a_full_snapshot_of_a_new_epoch_drops_entries_it_does_not_list() {
    let (host, vm) = synced();
    let (call, _) = next_poll(&host, &vm);
    answer(
        &host,
        &call,
        &full(
            "e9",
            1,
            vec![entry(
                &consumer(2),
                ConsumerState::Registered,
                &["m2", "m1"],
            )],
        ),
    );
    assert_eq!(entry_of(&host, 1), None);
    assert_eq!(
        entry_of(&host, 2).as_deref(),
        Some("1|r|manager_m2,manager_m1")
    );
}

/// Makes the outstanding poll fail with `fail`, then checks the table stayed,
/// the error was counted, and the retry waited at least `min_wait`.
fn assert_failure_keeps_table_and_backs_off(fail: impl Fn(&Host, &HttpCall)) {
    let (host, vm) = synced();
    let (call, _) = next_poll(&host, &vm);
    let failed_at = host.now();
    fail(&host, &call);
    assert_eq!(entry_of(&host, 1).as_deref(), Some("1|g|manager_m1"));
    assert_eq!(
        entry_of(&host, 2).as_deref(),
        Some("1|r|manager_m1,manager_m2")
    );
    assert_eq!(host.counter(ERRORS), 1);
    assert!(
        host.pending_http_calls().is_empty(),
        "the poller retries only after a backoff"
    );
    let (retry, _) = next_poll(&host, &vm);
    let waited = host.now().duration_since(failed_at).unwrap();
    let period = Duration::from_millis(u64::from(vm.tick_period_ms()));
    assert!(
        waited >= Duration::from_millis(100) && waited <= Duration::from_millis(100) + period,
        "the retry waited {waited:?}, expected min_backoff_ms 100 (tick period {period:?})"
    );
    let q = query(&retry);
    assert_eq!(
        (q["since"].as_str(), q.get("epoch").map(String::as_str)),
        ("7", Some("e1"))
    );
}

#[test]
fn a_garbage_response_keeps_the_last_good_table_counts_and_backs_off() {
    assert_failure_keeps_table_and_backs_off(|host, call| {
        host.answer_http_call(call.token, 200, &[], b"{\"epoch\": 3, <html>")
    });
}

#[test]
fn a_500_keeps_the_last_good_table_counts_and_backs_off() {
    assert_failure_keeps_table_and_backs_off(|host, call| {
        host.answer_http_call(
            call.token,
            500,
            &[],
            b"{\"error\":\"db\",\"message\":\"down\"}",
        )
    });
}

#[test]
fn a_failed_call_keeps_the_last_good_table_counts_and_backs_off() {
    assert_failure_keeps_table_and_backs_off(|host, call| host.fail_http_call(call.token));
}

#[test]
fn a_response_with_a_bad_entry_is_not_half_applied_to_that_entry() {
    let (host, vm) = synced();
    let (call, _) = next_poll(&host, &vm);
    let delta = RoutesResponse {
        protocol: ROUTES_PROTOCOL,
        after: None,
        next: None,
        epoch: "e1".into(),
        version: 8,
        kind: RoutesKind::Delta,
        managers: managers(),
        // m9 is no known manager: that entry keeps its previous value.
        upsert: vec![entry(
            &consumer(1),
            ConsumerState::Registering,
            &["m1", "m9"],
        )],
        remove: vec![],
    };
    answer(&host, &call, &delta);
    assert_eq!(entry_of(&host, 1).as_deref(), Some("1|g|manager_m1"));
}

#[test]
fn consecutive_failures_double_the_backoff_up_to_its_cap() {
    let (host, vm) = poller();
    let period = Duration::from_millis(u64::from(vm.tick_period_ms()));
    let (mut call, _) = next_poll(&host, &vm);
    let mut waits = Vec::new();
    for _ in 0..5 {
        let failed_at = host.now();
        host.answer_http_call(call.token, 503, &[], b"");
        call = next_poll(&host, &vm).0;
        waits.push(host.now().duration_since(failed_at).unwrap());
    }
    // min_backoff_ms 100, max_backoff_ms 400.
    for (wait, expected) in waits.iter().zip([100u64, 200, 400, 400, 400]) {
        let expected = Duration::from_millis(expected);
        assert!(
            *wait >= expected && *wait <= expected + period,
            "waits {waits:?}, tick period {period:?}"
        );
    }
    assert_eq!(host.counter(ERRORS), 5);
    // A success resets the backoff: the next poll follows at once.
    answer(&host, &call, &full("e1", 1, vec![]));
    let (_, waited) = next_poll(&host, &vm);
    assert!(
        waited <= period,
        "after a success the poller polls again at once, waited {waited:?}"
    );
}

#[test]
fn the_filter_routes_with_the_table_the_poller_writes() {
    // One Envoy: the poller singleton and a filter worker share the vm_id's shared data.
    let host = Host::new();
    let poller = host.new_vm();
    assert!(poller.configure_plugin(&poller_json().to_string()));
    let worker = host.new_vm();
    assert!(worker.configure_plugin(&filter_json().to_string()));
    let me = consumer(1);
    let c = cookie(&host, &me, ConsumerState::Registering, &["manager_m1"]);
    assert_even_over(&spread(&worker, &c, 4), &["manager_m1"]);

    let (call, _) = next_poll(&host, &poller);
    answer(
        &host,
        &call,
        &full(
            "e1",
            2,
            vec![entry(&me, ConsumerState::Registering, &["m1", "m2"])],
        ),
    );
    assert_even_over(&spread(&worker, &c, 20), &["manager_m1", "manager_m2"]);

    // m2 goes down: after the worker's availability refresh it is skipped.
    let (call, _) = next_poll(&host, &poller);
    let mut down = RoutesResponse {
        kind: RoutesKind::Delta,
        ..full("e1", 3, vec![])
    };
    down.managers[1].availability = Availability::Down;
    answer(&host, &call, &down);
    host.tick(&worker);
    assert_even_over(&spread(&worker, &c, 10), &["manager_m1"]);

    // The entry leaves the table: the cookie's first manager again.
    let (call, _) = next_poll(&host, &poller);
    let removal = RoutesResponse {
        kind: RoutesKind::Delta,
        remove: vec![me.clone()],
        ..full("e1", 4, vec![])
    };
    answer(&host, &call, &removal);
    assert_eq!(entry_in(&host, &me), None);
    assert_even_over(&spread(&worker, &c, 4), &["manager_m1"]);
}

#[test]
fn a_missing_control_plane_cluster_is_counted_and_retried_with_backoff() {
    let host = Host::new();
    host.remove_cluster("prealloc_control_plane");
    let vm = host.new_vm();
    assert!(vm.configure_plugin(&poller_json().to_string()));
    for _ in 0..20 {
        host.tick(&vm);
    }
    assert!(host.pending_http_calls().is_empty());
    let errors = host.counter(ERRORS);
    // 20 ticks of the poller's period with a 100..400 ms backoff: some retries, not one per tick.
    let elapsed_ms = 20 * u64::from(vm.tick_period_ms());
    assert!(
        errors >= 2 && errors <= elapsed_ms / 100 + 1,
        "{errors} dispatch errors over {elapsed_ms} ms"
    );
}

#[test]
fn the_managers_are_written_before_the_entries_that_name_them() {
    // ARCHITECTURE.md: a reader must never see an entry naming a manager whose availability is not written yet.
    let (host, vm) = poller();
    let (call, _) = next_poll(&host, &vm);
    answer(
        &host,
        &call,
        &full(
            "e1",
            2,
            vec![entry(&consumer(1), ConsumerState::Registering, &["m3"])],
        ),
    );
    let keys: Vec<String> = host
        .shared_data_writes()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let managers_at = keys
        .iter()
        .position(|k| k == MANAGERS_KEY)
        .expect("managers written");
    let entry_at = keys
        .iter()
        .position(|k| *k == entry_key(&consumer(1)))
        .expect("entry written");
    assert!(managers_at < entry_at, "write order: {keys:?}");
}

#[test]
fn every_poll_names_the_node_configured_envoys_or_a_default() {
    // Configured.
    let host = Host::new();
    let vm = host.new_vm();
    let mut cfg = poller_json();
    cfg["poller"]["node_id"] = "edge-a".into();
    assert!(vm.configure_plugin(&cfg.to_string()));
    assert_eq!(query(&next_poll(&host, &vm).0)["node"], "edge-a");

    // Envoy's node id (`node.id`), when the config names none.
    let host = Host::new();
    host.set_property(&["node", "id"], b"envoy-eu-7");
    let vm = host.new_vm();
    assert!(vm.configure_plugin(&poller_json().to_string()));
    assert_eq!(query(&next_poll(&host, &vm).0)["node"], "envoy-eu-7");

    // Neither (or one that is not URL-safe): a default unique to this start.
    let host = Host::new();
    host.set_property(&["node", "id"], b"not url safe");
    let vm = host.new_vm();
    assert!(vm.configure_plugin(&poller_json().to_string()));
    let node = query(&next_poll(&host, &vm).0)["node"].clone();
    assert!(
        node.starts_with("envoy-") && node.len() == "envoy-".len() + 8,
        "{node}"
    );

    // A node id that is not URL-safe in the config is refused.
    let vm = Host::new().new_vm();
    let mut cfg = poller_json();
    cfg["poller"]["node_id"] = "a&b".into();
    assert!(!vm.configure_plugin(&cfg.to_string()));
}

#[test]
fn consumers_sharing_a_bucket_are_written_a_turn_at_a_time_each_turn_stored_once() {
    // ARCHITECTURE.md: the table's shared data is 65,536 buckets by the id's
    // first two bytes; the poller stores a bucket once per run of writes to it,
    // at the end of each turn, so readers see whole entries after every turn.
    let host = Host::new();
    let vm = host.new_vm();
    let mut cfg = poller_json();
    cfg["poller"]["writes_per_turn"] = 3.into();
    assert!(vm.configure_plugin(&cfg.to_string()));
    let ids: Vec<ConsumerId> = (0..10u8)
        .map(|n| {
            let mut b = [n; 16];
            b[0] = 7;
            b[1] = 7;
            ConsumerId::from_bytes(b)
        })
        .collect();
    let key = entry_key(&ids[0]);
    assert!(ids.iter().all(|c| entry_key(c) == key), "one bucket");
    let (call, _) = next_poll(&host, &vm);
    let upsert = ids
        .iter()
        .map(|c| entry(c, ConsumerState::Registering, &["m1"]))
        .collect();
    answer(&host, &call, &full("e1", 2, upsert));
    let mut seen = 0;
    for _ in 0..20 {
        // After every turn the bucket holds whole entries, never fewer than before.
        let held: Vec<Option<String>> = ids.iter().map(|c| entry_in(&host, c)).collect();
        let n = held.iter().filter(|e| e.is_some()).count();
        assert!(n >= seen, "the bucket lost entries: {n} after {seen}");
        assert!(
            held.iter().flatten().all(|e| e == "1|g|manager_m1"),
            "{held:?}"
        );
        seen = n;
        if n == ids.len() {
            break;
        }
        host.tick(&vm);
    }
    assert_eq!(seen, ids.len(), "the whole snapshot was applied");
    let stores = host
        .shared_data_writes()
        .iter()
        .filter(|(k, _)| *k == key)
        .count();
    // The answer's own turn writes the managers and 2 entries, then 3, 3, 2.
    assert_eq!(
        stores, 4,
        "stores of the bucket for 10 entries at 3 writes per turn"
    );

    // A delta removes two of them and moves one: the others stay.
    let (call, _) = next_poll(&host, &vm);
    let delta = RoutesResponse {
        kind: RoutesKind::Delta,
        upsert: vec![entry(&ids[5], ConsumerState::Registered, &["m1", "m2"])],
        remove: vec![ids[0].clone(), ids[9].clone()],
        ..full("e1", 3, vec![])
    };
    answer(&host, &call, &delta);
    for _ in 0..5 {
        host.tick(&vm);
    }
    for (i, c) in ids.iter().enumerate() {
        let want = match i {
            0 | 9 => None,
            5 => Some("1|r|manager_m1,manager_m2"),
            _ => Some("1|g|manager_m1"),
        };
        assert_eq!(entry_in(&host, c).as_deref(), want, "consumer {i}");
    }
}
