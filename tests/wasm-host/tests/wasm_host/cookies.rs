//! Consumer cookies: forged, expired and malformed ones make the request anonymous and are counted by reason; valid ones are found as browsers send them.

use crate::support::*;
use prealloc_wire::ConsumerState;

fn assert_anonymous(vm: &prealloc_wasm_host::Vm, cookie_header: &str) {
    let s = send(vm, &[("cookie", cookie_header)]);
    assert!(
        s.is_forwarded(),
        "an invalid cookie must not block the request"
    );
    assert_eq!(
        s.forwarded_request_header(ROUTE_HEADER),
        None,
        "{cookie_header}"
    );
    assert_eq!(
        s.forwarded_request_header(CONSUMER_HEADER),
        None,
        "{cookie_header}"
    );
}

#[test]
fn a_cookie_signed_with_an_unknown_key_is_anonymous_and_counted_as_bad_mac() {
    let (host, vm) = filter();
    let forged = cookie_signed(
        FORGER_KEY,
        &consumer(1),
        ConsumerState::Registered,
        &["manager_a"],
        host.now_unix_s() + 60,
    );
    assert_anonymous(&vm, &forged);
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::cookie_rejected("bad_mac")), 1);
    assert_eq!(host.counter(&metric::cookie_rejected("expired")), 0);
}

#[test]
fn a_tampered_cookie_is_anonymous_and_counted_as_bad_mac() {
    let (host, vm) = filter();
    let good = cookie(
        &host,
        &consumer(1),
        ConsumerState::Registering,
        &["manager_a"],
    );
    // Flip one payload character: still base64url, no longer what was signed.
    let mut bytes = good.into_bytes();
    let at = "prealloc=".len() + 3;
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    assert_anonymous(&vm, &String::from_utf8(bytes).unwrap());
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::cookie_rejected("bad_mac")), 1);
}

#[test]
fn an_expired_cookie_is_anonymous_and_counted_as_expired() {
    let (host, vm) = filter();
    let expired = cookie_signed(
        KEY,
        &consumer(1),
        ConsumerState::Registered,
        &["manager_a"],
        host.now_unix_s() - 1,
    );
    assert_anonymous(&vm, &expired);
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::cookie_rejected("expired")), 1);
    assert_eq!(host.counter(&metric::cookie_rejected("bad_mac")), 0);
}

#[test]
fn a_cookie_expires_when_the_hosts_clock_passes_its_expiry() {
    let (host, vm) = filter();
    let c = cookie_signed(
        KEY,
        &consumer(1),
        ConsumerState::Registering,
        &["manager_a"],
        host.now_unix_s() + 10,
    );
    assert_eq!(
        route_of(&vm, &[("cookie", &c)]).as_deref(),
        Some("manager_a")
    );
    host.advance_time(std::time::Duration::from_secs(11));
    host.tick(&vm); // the worker reads the clock on its tick
    assert_anonymous(&vm, &c);
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::cookie_rejected("expired")), 1);
}

#[test]
fn malformed_cookies_are_anonymous_and_counted_as_malformed() {
    let (host, vm) = filter();
    let cases = [
        "prealloc=garbage",
        "prealloc=!!!.???",
        "prealloc=AAAA.BBBB",
        "prealloc=a.b.c",
        "prealloc=\"AAAA",
    ];
    for case in cases {
        let before = host.metrics();
        assert_anonymous(&vm, case);
        host.tick(&vm); // counters are sent on the worker's tick
        let after = host.metrics();
        let changed: Vec<&String> = after.keys().filter(|k| after[*k] != before[*k]).collect();
        assert!(
            changed.contains(&&metric::cookie_rejected("malformed")),
            "{case:?} was not counted as malformed; counters changed: {changed:?}"
        );
    }
}

#[test]
fn a_missing_or_emptied_cookie_is_anonymous_and_counted_as_missing() {
    let (host, vm) = filter();
    // An empty value is what a browser sends after the cookie was cleared.
    for case in ["other=1", "prealloc="] {
        assert_anonymous(&vm, case);
    }
    send(&vm, &[]);
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::cookie_rejected("missing")), 3);
    assert_eq!(host.counter(&metric::cookie_rejected("malformed")), 0);
}

#[test]
fn the_consumer_cookie_is_found_among_other_cookies_and_cookie_headers() {
    let (host, vm) = filter();
    let me = consumer(7);
    let c = cookie(&host, &me, ConsumerState::Registering, &["manager_b"]);
    let value = c.trim_start_matches("prealloc=");
    let spaced = format!("a=1;  prealloc={value} ;b=2");
    let quoted = format!("theme=dark; prealloc=\"{value}\"");
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("cookie", spaced.as_str())],
        vec![("cookie", quoted.as_str())],
        // Envoy hands several Cookie headers over separately; the cookie is in the second.
        vec![("cookie", "a=1; b=2"), ("cookie", c.as_str())],
    ];
    for extra in cases {
        let s = send(&vm, &extra);
        assert_eq!(
            s.forwarded_request_header(ROUTE_HEADER).as_deref(),
            Some("manager_b"),
            "{extra:?}"
        );
        assert_eq!(
            s.forwarded_request_header(CONSUMER_HEADER).as_deref(),
            Some(me.as_str()),
            "{extra:?}"
        );
    }
}

#[test]
fn a_cookie_signed_with_an_older_listed_key_still_verifies() {
    let (host, vm) = filter();
    let c = cookie_signed(
        OLD_KEY,
        &consumer(3),
        ConsumerState::Registering,
        &["manager_c"],
        host.now_unix_s() + 60,
    );
    assert_eq!(
        route_of(&vm, &[("cookie", &c)]).as_deref(),
        Some("manager_c")
    );
}

#[test]
fn a_key_removed_from_the_configuration_no_longer_verifies() {
    let mut config = filter_json();
    config["filter"]["cookie"]["keys"] =
        serde_json::json!([String::from_utf8(KEY.to_vec()).unwrap()]);
    let (host, vm) = filter_with(config);
    let c = cookie_signed(
        OLD_KEY,
        &consumer(3),
        ConsumerState::Registering,
        &["manager_c"],
        host.now_unix_s() + 60,
    );
    assert_anonymous(&vm, &c);
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(&metric::cookie_rejected("bad_mac")), 1);
}

#[test]
fn a_custom_cookie_name_is_honoured() {
    let mut config = filter_json();
    config["filter"]["cookie"]["name"] = serde_json::json!("pa");
    let (host, vm) = filter_with(config);
    let c = cookie(
        &host,
        &consumer(4),
        ConsumerState::Registering,
        &["manager_a"],
    );
    assert_anonymous(&vm, &c);
    let renamed = c.replacen("prealloc=", "pa=", 1);
    assert_eq!(
        route_of(&vm, &[("cookie", &renamed)]).as_deref(),
        Some("manager_a")
    );
}
