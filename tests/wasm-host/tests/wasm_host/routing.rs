//! Routing decisions for known consumers: first manager, round-robin over the replica set, down managers, all down.

use crate::support::*;
use prealloc_filter_core::cookie::verify;
use prealloc_wire::ConsumerState::{Registered, Registering};

#[test]
fn a_registering_consumer_without_table_entry_goes_to_its_first_manager() {
    let (host, vm) = filter();
    let me = consumer(1);
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    for _ in 0..5 {
        let s = send(&vm, &[("cookie", &c)]);
        assert_eq!(
            s.forwarded_request_header(ROUTE_HEADER).as_deref(),
            Some("manager_a")
        );
        assert_eq!(
            s.forwarded_request_header(CONSUMER_HEADER).as_deref(),
            Some(me.as_str())
        );
        // Header changes by wasm no longer clear Envoy's route cache by themselves.
        let calls: Vec<String> = s.foreign_calls().into_iter().map(|c| c.name).collect();
        assert!(
            calls.contains(&"clear_route_cache".to_owned()),
            "foreign calls: {calls:?}"
        );
    }
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::decision("first_manager")), 5);
}

#[test]
fn an_empty_table_value_means_no_entry() {
    let (host, vm) = filter();
    let me = consumer(1);
    host.set_shared_data(&entry_key(&me), b"");
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    assert_eq!(
        route_of(&vm, &[("cookie", &c)]).as_deref(),
        Some("manager_a")
    );
}

#[test]
fn a_table_entry_spreads_requests_round_robin_over_exactly_its_replica_set() {
    let (host, vm) = filter();
    let me = consumer(1);
    set_entry(
        &host,
        &me,
        Registering,
        &["manager_a", "manager_b", "manager_c"],
    );
    // Another consumer's entry must not leak into this consumer's routing.
    set_entry(
        &host,
        &consumer(2),
        Registering,
        &["manager_d", "manager_e"],
    );
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    let counts = spread(&vm, &c, 300);
    assert_even_over(&counts, &["manager_a", "manager_b", "manager_c"]);
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::decision("table")), 300);
}

#[test]
fn a_grown_table_entry_is_used_by_the_next_request() {
    let (host, vm) = filter();
    let me = consumer(1);
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    set_entry(&host, &me, Registering, &["manager_a"]);
    assert_even_over(&spread(&vm, &c, 4), &["manager_a"]);
    set_entry(&host, &me, Registering, &["manager_a", "manager_b"]);
    assert_even_over(&spread(&vm, &c, 40), &["manager_a", "manager_b"]);
}

#[test]
fn down_managers_are_skipped() {
    let (host, vm) = filter();
    let me = consumer(1);
    set_entry(
        &host,
        &me,
        Registering,
        &["manager_a", "manager_b", "manager_c"],
    );
    set_availability(
        &host,
        &vm,
        &[
            ("manager_a", "available"),
            ("manager_b", "down"),
            ("manager_c", "draining"),
        ],
    );
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    assert_even_over(&spread(&vm, &c, 100), &["manager_a", "manager_c"]);
}

#[test]
fn a_manager_coming_back_up_takes_requests_again_after_the_availability_refresh() {
    let (host, vm) = filter();
    let me = consumer(1);
    set_entry(&host, &me, Registering, &["manager_a", "manager_b"]);
    set_availability(
        &host,
        &vm,
        &[("manager_a", "available"), ("manager_b", "down")],
    );
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    assert_even_over(&spread(&vm, &c, 10), &["manager_a"]);
    set_availability(
        &host,
        &vm,
        &[("manager_a", "available"), ("manager_b", "available")],
    );
    assert_even_over(&spread(&vm, &c, 10), &["manager_a", "manager_b"]);
}

#[test]
fn when_every_replica_is_down_the_filter_answers_503_with_retry_after() {
    let (host, vm) = filter();
    let me = consumer(1);
    set_entry(&host, &me, Registering, &["manager_a", "manager_b"]);
    set_availability(
        &host,
        &vm,
        &[
            ("manager_a", "down"),
            ("manager_b", "down"),
            ("manager_c", "available"),
        ],
    );
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    let s = send(&vm, &[("cookie", &c)]);
    assert!(!s.is_forwarded());
    let reply = s.local_reply().expect("a local reply");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("5"));
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(metric::ALL_DOWN_REPLIES), 1);
}

#[test]
fn retry_after_follows_the_configuration() {
    let mut config = filter_json();
    config["filter"]["retry_after_s"] = serde_json::json!(17);
    let (host, vm) = filter_with(config);
    let me = consumer(1);
    set_availability(&host, &vm, &[("manager_a", "down")]);
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    let reply = send(&vm, &[("cookie", &c)])
        .local_reply()
        .expect("a local reply");
    assert_eq!(
        (reply.status, reply.header("retry-after")),
        (503, Some("17"))
    );
}

#[test]
fn when_every_replica_is_down_the_first_manager_policy_routes_to_the_first_manager() {
    let mut config = filter_json();
    config["filter"]["when_all_down"] = serde_json::json!("first_manager");
    let (host, vm) = filter_with(config);
    let me = consumer(1);
    set_entry(&host, &me, Registering, &["manager_b", "manager_a"]);
    set_availability(&host, &vm, &[("manager_a", "down"), ("manager_b", "down")]);
    let c = cookie(&host, &me, Registering, &["manager_b"]);
    let s = send(&vm, &[("cookie", &c)]);
    assert_eq!(s.local_reply(), None);
    assert_eq!(
        s.forwarded_request_header(ROUTE_HEADER).as_deref(),
        Some("manager_b")
    );
}

#[test]
fn a_registered_cookie_spreads_requests_over_its_own_replicas() {
    let (host, vm) = filter();
    let me = consumer(9);
    let c = cookie(
        &host,
        &me,
        Registered,
        &["manager_a", "manager_b", "manager_c", "manager_d"],
    );
    let counts = spread(&vm, &c, 202);
    assert_even_over(
        &counts,
        &["manager_a", "manager_b", "manager_c", "manager_d"],
    );
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::decision("cookie")), 202);
}

#[test]
fn a_registered_cookie_skips_down_replicas() {
    let (host, vm) = filter();
    set_availability(
        &host,
        &vm,
        &[
            ("manager_a", "available"),
            ("manager_b", "down"),
            ("manager_c", "available"),
        ],
    );
    let c = cookie(
        &host,
        &consumer(9),
        Registered,
        &["manager_a", "manager_b", "manager_c"],
    );
    assert_even_over(&spread(&vm, &c, 50), &["manager_a", "manager_c"]);
}

#[test]
fn a_registering_cookie_is_upgraded_when_the_table_says_registered() {
    let (host, vm) = filter();
    let me = consumer(5);
    set_entry(&host, &me, Registered, &["manager_a", "manager_b"]);
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    let mut s = send(&vm, &[("cookie", &c)]);
    s.response_headers(&[(":status", "200"), ("content-type", "text/plain")], false);
    let set_cookies = s.forwarded_response_header_values("set-cookie");
    let ours: Vec<&String> = set_cookies
        .iter()
        .filter(|v| v.starts_with("prealloc="))
        .collect();
    assert_eq!(ours.len(), 1, "one consumer Set-Cookie: {set_cookies:?}");
    let value = ours[0]
        .trim_start_matches("prealloc=")
        .split(';')
        .next()
        .unwrap();
    let claims = verify(value, &[KEY], host.now_unix_s())
        .expect("the upgraded cookie verifies with the first key");
    assert_eq!(claims.consumer, me);
    assert_eq!(claims.state, Registered);
    assert_eq!(
        claims.replicas,
        vec!["manager_a".to_owned(), "manager_b".to_owned()]
    );
    assert!(claims.expires_at > host.now_unix_s());
}

#[test]
fn a_registering_consumer_still_registering_gets_no_new_cookie() {
    let (host, vm) = filter();
    let me = consumer(5);
    set_entry(&host, &me, Registering, &["manager_a", "manager_b"]);
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    let mut s = send(&vm, &[("cookie", &c)]);
    s.response_headers(&[(":status", "200")], false);
    assert_eq!(
        s.forwarded_response_header_values("set-cookie"),
        Vec::<String>::new()
    );
}

#[test]
fn each_filter_worker_keeps_its_own_round_robin_over_the_shared_table() {
    // Two worker VMs of one Envoy share the table (one vm_id) but not their counters.
    let host = prealloc_wasm_host::Host::new();
    let w1 = host.new_vm();
    let w2 = host.new_vm();
    for w in [&w1, &w2] {
        assert!(w.configure_plugin(&filter_json().to_string()));
    }
    let me = consumer(1);
    set_entry(&host, &me, Registering, &["manager_a", "manager_b"]);
    let c = cookie(&host, &me, Registering, &["manager_a"]);
    assert_even_over(&spread(&w1, &c, 10), &["manager_a", "manager_b"]);
    assert_even_over(&spread(&w2, &c, 10), &["manager_a", "manager_b"]);
}

#[test]
fn a_signed_cookie_naming_a_cluster_outside_the_managers_list_is_anonymous() {
    let (host, vm) = filter();
    set_availability(&host, &vm, &[("manager_a", "available")]);
    let c = cookie(&host, &consumer(3), Registered, &["prealloc_control_plane"]);
    let mut s = vm.new_http_stream();
    s.request_headers(&[(":method", "GET"), (":path", "/"), ("cookie", &c)], true);
    assert_eq!(
        s.forwarded_request_header(ROUTE_HEADER),
        None,
        "no route to it"
    );
    assert_eq!(s.forwarded_request_header(CONSUMER_HEADER), None);
    s.finish();
    host.tick(&vm);
    assert_eq!(host.counter("prealloc_cookies_rejected_unknown_cluster"), 1);
    assert_eq!(host.counter(&metric::decision("anonymous")), 1);
    // A listed cluster next to it still routes, to the listed one only.
    let c = cookie(
        &host,
        &consumer(3),
        Registered,
        &["prealloc_control_plane", "manager_a"],
    );
    assert_even_over(&spread(&vm, &c, 6), &["manager_a"]);
}
