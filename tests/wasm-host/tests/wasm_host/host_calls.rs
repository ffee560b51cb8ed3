//! Host calls per request, by case: each is a crossing of the VM boundary that
//! Envoy pays for on every request (BENCHMARKS.md lists these counts). The
//! bounds fail a change that adds calls to the request path without saying so.

use crate::support::*;
use prealloc_wire::ConsumerState;

/// Host calls of one whole request (headers in, response headers out, stream end).
fn calls_of(vm: &prealloc_wasm_host::Vm, request: &[(&str, &str)]) -> u64 {
    let before = vm.host_calls();
    let mut s = vm.new_http_stream();
    s.request_headers(request, true);
    s.response_headers(&[(":status", "200")], true);
    s.finish();
    vm.host_calls() - before
}

/// (case, host calls per request) for the three request-path cases, measured
/// after a few warm-up requests (first-use costs do not count).
pub fn per_case() -> Vec<(&'static str, u64)> {
    let (host, vm) = filter();
    // As in Envoy once the poller ran: the managers list is in shared data.
    set_availability(
        &host,
        &vm,
        &[("manager_m1", "available"), ("manager_m2", "available")],
    );
    let c = consumer(7);
    let registered = cookie(
        &host,
        &c,
        ConsumerState::Registered,
        &["manager_m1", "manager_m2"],
    );
    let registering = cookie(&host, &c, ConsumerState::Registering, &["manager_m1"]);
    set_entry(
        &host,
        &c,
        ConsumerState::Registering,
        &["manager_m1", "manager_m2"],
    );
    let cases: [(&str, Vec<(&str, &str)>); 3] = [
        ("anonymous", vec![(":method", "GET"), (":path", "/")]),
        (
            "registered cookie",
            vec![(":method", "GET"), (":path", "/"), ("cookie", &registered)],
        ),
        (
            "table hit",
            vec![(":method", "GET"), (":path", "/"), ("cookie", &registering)],
        ),
    ];
    cases
        .iter()
        .map(|(name, headers)| {
            for _ in 0..3 {
                calls_of(&vm, headers);
            }
            (*name, calls_of(&vm, headers))
        })
        .collect()
}

#[test]
fn host_calls_per_request_stay_within_their_budget() {
    let counts = per_case();
    for (case, n) in &counts {
        println!("HOST CALLS per request, {case}: {n}");
    }
    // (case, most host calls allowed): today's counts, recorded in BENCHMARKS.md.
    for (case, budget) in [("anonymous", 1), ("registered cookie", 4), ("table hit", 5)] {
        let n = counts
            .iter()
            .find(|(c, _)| *c == case)
            .map(|(_, n)| *n)
            .unwrap();
        assert!(
            n <= budget,
            "{case}: {n} host calls per request, budget {budget}"
        );
        assert!(n > 0, "{case}: the counter counts");
    }
}

#[test]
fn request_counters_are_sent_on_the_workers_tick_not_per_request() {
    let (host, vm) = filter();
    for _ in 0..5 {
        let mut s = vm.new_http_stream();
        s.request_headers(&[(":method", "GET"), (":path", "/")], true);
        s.finish();
    }
    assert_eq!(
        host.counter(&metric::decision("anonymous")),
        0,
        "not sent yet"
    );
    host.tick(&vm);
    assert_eq!(host.counter(&metric::decision("anonymous")), 5);
    host.tick(&vm);
    assert_eq!(host.counter(&metric::decision("anonymous")), 5, "sent once");
}
