//! Requests without a valid consumer cookie: no route header, no consumer header, whatever the client sends.

use crate::support::*;
use prealloc_wire::ConsumerState;

#[test]
fn a_request_without_cookie_gets_no_route_and_no_consumer_header() {
    let (_host, vm) = filter();
    let s = send(&vm, &[]);
    assert!(s.is_forwarded());
    assert_eq!(s.forwarded_request_header(ROUTE_HEADER), None);
    assert_eq!(s.forwarded_request_header(CONSUMER_HEADER), None);
    // The rest of the request is untouched.
    assert_eq!(
        s.forwarded_request_header(":path").as_deref(),
        Some("/inbox")
    );
}

#[test]
fn a_request_with_other_cookies_only_is_anonymous() {
    let (_host, vm) = filter();
    let s = send(&vm, &[("cookie", "session=abc; theme=dark")]);
    assert_eq!(s.forwarded_request_header(ROUTE_HEADER), None);
    assert_eq!(s.forwarded_request_header(CONSUMER_HEADER), None);
    assert_eq!(
        s.forwarded_request_header("cookie").as_deref(),
        Some("session=abc; theme=dark")
    );
}

#[test]
fn a_spoofed_route_header_is_removed_from_an_anonymous_request() {
    let (_host, vm) = filter();
    let s = send(
        &vm,
        &[
            (ROUTE_HEADER, "manager_evil"),
            ("X-Prealloc-Cluster", "manager_evil2"),
        ],
    );
    assert!(s.is_forwarded());
    assert_eq!(
        s.forwarded_request_header_values(ROUTE_HEADER),
        Vec::<String>::new()
    );
}

#[test]
fn underscore_look_alikes_of_reserved_headers_are_removed_too() {
    // Envoy forwards them by default; CGI/WSGI managers fold `_` into `-`.
    let (_host, vm) = filter();
    let s = send(
        &vm,
        &[
            ("x_prealloc_consumer", "AAAAAAAAAAAAAAAAAAAAAA"),
            ("X_PREALLOC_CLUSTER", "manager_m2"),
            ("x_prealloc-resource", "mailbox-1"),
            ("x_other", "kept"),
        ],
    );
    let left: Vec<String> = s
        .forwarded_request_headers()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.replace('_', "-").starts_with("x-prealloc-"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
    assert_eq!(
        s.forwarded_request_header("x_other").as_deref(),
        Some("kept")
    );
}

#[test]
fn every_reserved_prealloc_header_is_removed_and_others_are_kept() {
    let (_host, vm) = filter();
    let s = send(
        &vm,
        &[
            (CONSUMER_HEADER, "AAAAAAAAAAAAAAAAAAAAAA"),
            ("x-prealloc-resource", "mailbox-1"),
            ("x-prealloc-resource-type", "mailbox"),
            ("x-prealloc-anything", "x"),
            ("x-preallocated", "kept: not the reserved prefix"),
            ("x-other", "kept"),
        ],
    );
    let reserved: Vec<String> = s
        .forwarded_request_headers()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("x-prealloc-"))
        .collect();
    assert_eq!(reserved, Vec::<String>::new());
    assert_eq!(
        s.forwarded_request_header("x-other").as_deref(),
        Some("kept")
    );
    assert_eq!(
        s.forwarded_request_header("x-preallocated").as_deref(),
        Some("kept: not the reserved prefix")
    );
}

#[test]
fn a_spoofed_route_and_consumer_header_cannot_override_a_valid_cookies_decision() {
    let (host, vm) = filter();
    let me = consumer(1);
    let other = consumer(2);
    let c = cookie(&host, &me, ConsumerState::Registering, &["manager_a"]);
    let s = send(
        &vm,
        &[
            (ROUTE_HEADER, "manager_evil"),
            (CONSUMER_HEADER, other.as_str()),
            ("cookie", &c),
        ],
    );
    assert_eq!(
        s.forwarded_request_header_values(ROUTE_HEADER),
        vec!["manager_a".to_owned()]
    );
    assert_eq!(
        s.forwarded_request_header_values(CONSUMER_HEADER),
        vec![me.to_string()]
    );
}

#[test]
fn anonymous_requests_are_counted() {
    let (host, vm) = filter();
    for _ in 0..3 {
        send(&vm, &[]);
    }
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::decision("anonymous")), 3);
}
