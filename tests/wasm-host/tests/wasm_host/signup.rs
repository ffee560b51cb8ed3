//! Sign-up through the filter: held while the control plane registers, forwarded to the first manager, cookie only on success, give-back on refusal, 503 when the control plane fails.

use crate::support::*;
use prealloc_filter_core::cookie::verify;
use prealloc_wasm_host::{Action, Host, HttpCall, HttpStream, Vm};
use prealloc_wire::{ConsumerState, ErrorBody, Registration, ResourceRef};
use serde_json::json;
use std::time::Duration;

const SIGNUPS_OK: &str = "prealloc_signups_ok";
const SIGNUPS_REFUSED: &str = "prealloc_signups_refused";
const SIGNUPS_UNAVAILABLE: &str = "prealloc_signups_unavailable";

fn signup_filter() -> (Host, Vm) {
    let mut config = filter_json();
    config["filter"]["signup"] = json!({
        "path": "/signup",
        "token": "signup-token",
        "resource_type": "mailbox",
        "location": "eu",
        "timeout_ms": 1500,
    });
    filter_with(config)
}

fn registration(n: u8) -> Registration {
    Registration {
        consumer: consumer(n),
        manager: "m2".into(),
        cluster: "manager_m2".into(),
        resource: ResourceRef {
            id: 42,
            resource_type: "mailbox".into(),
            name: "mailbox-42".into(),
            location: "eu".into(),
        },
    }
}

/// A sign-up request arrives (with a spoofed consumer header); returns the
/// stream, held, and the registration call it made.
fn start_signup<'v>(host: &Host, vm: &'v Vm) -> (HttpStream<'v>, HttpCall) {
    let mut s = vm.new_http_stream();
    let action = s.request_headers(
        &get_with(&[
            (CONSUMER_HEADER, "AAAAAAAAAAAAAAAAAAAAAA"),
            ("content-type", "application/json"),
        ])
        .into_iter()
        .map(|(k, v)| {
            if k == ":method" {
                (k, "POST")
            } else if k == ":path" {
                (k, "/signup?src=web")
            } else {
                (k, v)
            }
        })
        .collect::<Vec<_>>(),
        false,
    );
    assert_eq!(
        action,
        Action::Pause,
        "a sign-up is held while the control plane registers it"
    );
    assert_eq!(
        s.request_body(b"{\"name\":\"ann\"}", true),
        Action::Pause,
        "its body waits too"
    );
    let calls = host.pending_http_calls();
    assert_eq!(calls.len(), 1, "one registration call: {calls:#?}");
    (s, calls.into_iter().next().unwrap())
}

fn answer_registration(host: &Host, call: &HttpCall, reg: &Registration) {
    host.answer_http_call(
        call.token,
        201,
        &[("content-type", "application/json")],
        &serde_json::to_vec(reg).unwrap(),
    );
}

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body)
        .expect("the 503 body is an ErrorBody")
        .error
}

#[test]
fn a_signup_asks_the_control_plane_for_a_registration() {
    let (host, vm) = signup_filter();
    let (_s, call) = start_signup(&host, &vm);
    assert_eq!(call.upstream, "prealloc_control_plane");
    assert_eq!(call.header(":method"), Some("POST"));
    assert_eq!(call.path(), "/v1/registrations");
    assert_eq!(call.header("authorization"), Some("Bearer signup-token"));
    assert_eq!(call.timeout_ms, 1500);
    let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(body, json!({"resource_type": "mailbox", "location": "eu"}));
}

#[test]
fn a_registered_signup_goes_to_the_first_manager_and_gets_a_registering_cookie() {
    let (host, vm) = signup_filter();
    let (mut s, call) = start_signup(&host, &vm);
    answer_registration(&host, &call, &registration(3));
    assert!(s.request_resumed(), "the held sign-up resumes");
    assert_eq!(
        s.forwarded_request_header_values(ROUTE_HEADER),
        vec!["manager_m2".to_owned()]
    );
    assert_eq!(
        s.forwarded_request_header_values(CONSUMER_HEADER),
        vec![consumer(3).to_string()]
    );
    assert_eq!(
        s.forwarded_request_header("x-prealloc-resource").as_deref(),
        Some("mailbox-42")
    );
    assert_eq!(
        s.forwarded_request_header("x-prealloc-resource-type")
            .as_deref(),
        Some("mailbox")
    );
    assert_eq!(s.forwarded_request_body(), b"{\"name\":\"ann\"}");
    assert!(s
        .foreign_calls()
        .iter()
        .any(|c| c.name == "clear_route_cache"));

    // The manager accepted: the answer is held until the registration is confirmed.
    let action = s.response_headers(&[(":status", "201")], false);
    assert_eq!(action, Action::Pause, "held for the confirmation");
    assert!(
        s.forwarded_response_header_values("set-cookie").is_empty(),
        "no cookie before it"
    );
    let confirm = host
        .pending_http_calls()
        .pop()
        .expect("a confirmation call");
    assert_eq!(confirm.header(":method"), Some("POST"));
    assert_eq!(
        confirm.header(":path").map(str::to_owned),
        Some(format!("/v1/registrations/{}/confirm", consumer(3)))
    );
    host.answer_http_call(confirm.token, 200, &[], b"{}");
    assert!(s.response_resumed(), "the held answer goes on");
    let set = s.forwarded_response_header_values("set-cookie");
    assert_eq!(set.len(), 1, "{set:?}");
    for attribute in [
        "Path=/",
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
        "Max-Age=2592000",
    ] {
        assert!(
            set[0].contains(attribute),
            "{attribute} missing in {}",
            set[0]
        );
    }
    let value = set[0]
        .trim_start_matches("prealloc=")
        .split(';')
        .next()
        .unwrap();
    let claims = verify(value, &[KEY], host.now_unix_s()).expect("the new cookie verifies");
    assert_eq!(claims.consumer, consumer(3));
    assert_eq!(claims.state, ConsumerState::Registering);
    assert_eq!(claims.replicas, vec!["manager_m2".to_owned()]);
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(SIGNUPS_OK), 1);
    drop(s);

    // The new cookie pins the next request to the first manager.
    let c = format!("prealloc={value}");
    assert_eq!(
        route_of(&vm, &[("cookie", &c)]).as_deref(),
        Some("manager_m2")
    );
}

#[test]
fn a_refused_signup_gets_no_cookie_and_its_registration_is_given_back() {
    let (host, vm) = signup_filter();
    let (mut s, call) = start_signup(&host, &vm);
    answer_registration(&host, &call, &registration(4));
    s.response_headers(&[(":status", "409")], false);
    assert_eq!(
        s.forwarded_response_header_values("set-cookie"),
        Vec::<String>::new()
    );
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(SIGNUPS_REFUSED), 1);
    drop(s);
    // The root context sends the give-back on its tick, so it outlives the request.
    host.tick(&vm);
    let calls = host.pending_http_calls();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].header(":method"), Some("DELETE"));
    assert_eq!(
        calls[0].path(),
        format!("/v1/registrations/{}", consumer(4))
    );
    assert_eq!(
        calls[0].header("authorization"),
        Some("Bearer signup-token")
    );
    host.answer_http_call(calls[0].token, 204, &[], b"");
    host.advance_time(Duration::from_secs(30));
    host.tick(&vm); // the worker reads the clock on its tick
    host.tick(&vm);
    assert!(
        host.pending_http_calls().is_empty(),
        "a done give-back is not sent again"
    );
}

#[test]
fn a_failed_give_back_is_retried_after_a_backoff() {
    let (host, vm) = signup_filter();
    let (mut s, call) = start_signup(&host, &vm);
    answer_registration(&host, &call, &registration(5));
    s.response_headers(&[(":status", "500")], false);
    drop(s);
    host.tick(&vm);
    let first = host.pending_http_calls().pop().expect("a give-back");
    let failed_at = host.now();
    host.fail_http_call(first.token);
    host.tick(&vm);
    assert!(
        host.pending_http_calls().is_empty(),
        "no retry before its backoff"
    );
    let deadline = failed_at + Duration::from_secs(10);
    let retry = loop {
        if let Some(c) = host.pending_http_calls().pop() {
            break c;
        }
        assert!(host.now() < deadline, "no give-back retry within 10 s");
        host.tick(&vm);
    };
    assert!(host.now().duration_since(failed_at).unwrap() >= Duration::from_secs(1));
    assert_eq!(retry.path(), format!("/v1/registrations/{}", consumer(5)));
    // 404: the control plane no longer has it, which also counts as done.
    host.answer_http_call(retry.token, 404, &[], b"");
    host.advance_time(Duration::from_secs(60));
    host.tick(&vm); // the worker reads the clock on its tick
    host.tick(&vm);
    assert!(host.pending_http_calls().is_empty());
}

#[test]
fn an_unreachable_control_plane_gets_a_503_with_retry_after_and_no_cookie() {
    let (host, vm) = signup_filter();
    let (s, call) = start_signup(&host, &vm);
    host.fail_http_call(call.token);
    assert!(!s.is_forwarded());
    let reply = s.local_reply().expect("a local reply");
    assert_eq!(
        (reply.status, reply.header("retry-after")),
        (503, Some("5"))
    );
    assert_eq!(error_of(&reply.body), "control_plane_unreachable");
    assert!(reply.header("set-cookie").is_none());
    // Counters are sent on the worker's tick (no host call per request).
    host.tick(&vm);
    assert_eq!(host.counter(SIGNUPS_UNAVAILABLE), 1);
}

#[test]
fn an_empty_pool_gets_the_control_planes_503_and_retry_after() {
    let (host, vm) = signup_filter();
    let (s, call) = start_signup(&host, &vm);
    let body = serde_json::to_vec(&ErrorBody {
        error: "pool_empty".into(),
        message: "no mailbox ready".into(),
    })
    .unwrap();
    host.answer_http_call(
        call.token,
        503,
        &[("retry-after", "7"), ("content-type", "application/json")],
        &body,
    );
    let reply = s.local_reply().expect("a local reply");
    assert_eq!(
        (reply.status, reply.header("retry-after")),
        (503, Some("7"))
    );
    assert_eq!(error_of(&reply.body), "pool_empty");
}

#[test]
fn an_unusable_registration_gets_a_503_and_is_given_back() {
    let (host, vm) = signup_filter();
    let (s, call) = start_signup(&host, &vm);
    let mut reg = registration(6);
    reg.cluster = "manager m2; evil".into();
    answer_registration(&host, &call, &reg);
    let reply = s.local_reply().expect("a local reply");
    assert_eq!(reply.status, 503);
    assert_eq!(error_of(&reply.body), "registration_invalid");
    drop(s);
    host.tick(&vm);
    let calls = host.pending_http_calls();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(
        calls[0].path(),
        format!("/v1/registrations/{}", consumer(6))
    );
}

#[test]
fn a_garbage_registration_answer_gets_a_503_and_no_cookie() {
    let (host, vm) = signup_filter();
    let (s, call) = start_signup(&host, &vm);
    host.answer_http_call(call.token, 201, &[], b"<html>oops</html>");
    let reply = s.local_reply().expect("a local reply");
    assert_eq!(reply.status, 503);
    assert_eq!(error_of(&reply.body), "registration_invalid");
}

#[test]
fn other_methods_and_paths_are_not_signups() {
    let (host, vm) = signup_filter();
    for (method, path) in [
        ("GET", "/signup"),
        ("POST", "/signup/x"),
        ("POST", "/login"),
    ] {
        let mut s = vm.new_http_stream();
        let action = s.request_headers(
            &[
                (":method", method),
                (":path", path),
                (":authority", "app.example"),
            ],
            true,
        );
        assert_eq!(action, Action::Continue, "{method} {path}");
        assert_eq!(s.forwarded_request_header(ROUTE_HEADER), None);
    }
    assert!(host.pending_http_calls().is_empty());
}

#[test]
fn a_missing_control_plane_cluster_gets_a_503_not_a_hang() {
    let (host, vm) = signup_filter();
    host.remove_cluster("prealloc_control_plane");
    let mut s = vm.new_http_stream();
    s.request_headers(
        &[
            (":method", "POST"),
            (":path", "/signup"),
            (":authority", "app.example"),
        ],
        true,
    );
    let reply = s.local_reply().expect("a local reply at once");
    assert_eq!(reply.status, 503);
    assert_eq!(error_of(&reply.body), "control_plane_unreachable");
    assert!(host.pending_http_calls().is_empty());
}

#[test]
fn a_signup_whose_registration_was_reclaimed_gets_a_503_and_no_cookie() {
    let (host, vm) = signup_filter();
    let (mut s, call) = start_signup(&host, &vm);
    answer_registration(&host, &call, &registration(4));
    assert_eq!(
        s.response_headers(&[(":status", "201")], false),
        Action::Pause
    );
    let confirm = host
        .pending_http_calls()
        .pop()
        .expect("a confirmation call");
    // The lease ran out first: the control plane no longer knows the registration.
    host.answer_http_call(
        confirm.token,
        404,
        &[],
        br#"{"error":"unknown_consumer","message":"x"}"#,
    );
    let reply = s
        .local_reply()
        .expect("a 503 instead of the manager's answer");
    assert_eq!(reply.status, 503);
    assert_eq!(error_of(&reply.body), "registration_expired");
    assert!(s.forwarded_response_header_values("set-cookie").is_empty());
    assert!(!s.response_resumed());
    host.tick(&vm);
    assert_eq!(host.counter(SIGNUPS_OK), 0);
}
